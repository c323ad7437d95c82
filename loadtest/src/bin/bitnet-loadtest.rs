//! `bitnet-loadtest`: drives OpenAI chat-completion load at a server and reports what it saw.
//! A thin shell over [`loadtest::gen`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use loadtest::gen::{self, compare, Load, RunConfig, RunResult, WorkloadKind, WorkloadSpec};

const LONG_ABOUT: &str = "\
Drives OpenAI-compatible chat-completion load (POST URL/v1/chat/completions) and measures time to \
first token, inter-token latency, end-to-end latency, throughput and errors by kind (429 and 503 \
apart, connect, timeout, mid-stream).

Running load is the default action: `bitnet-loadtest --url ... --model ... --requests 100` is the \
same as `bitnet-loadtest run --url ...`. A run must be bounded by --duration, --requests or both, \
and only loopback targets are accepted unless --allow-remote is given. Ctrl-C ends a run early: \
requests in flight are cancelled, and the results so far are reported and written.

Exit status: 0 when the run finished and at least one request succeeded; 3 when requests were \
sent and none succeeded (the target was down or refused everything); 130 after Ctrl-C (the \
results so far are still written); 2 for a command line that does not parse; 1 for other bad \
arguments or a file that cannot be read or written.

Workloads:
  short-chat   a short question, a short answer (max_tokens 64)
  long-prompt  a 2,000-5,000 token document and a question (max_tokens 128)
  agent        multi-turn sessions: a long system prompt identical across sessions and runs, the
               whole growing history (assistant replies included) re-sent every turn, with
               --think-time between turns (max_tokens 192). The system prompt is OpenClaw's size
               by default, about 8,000 tokens by llama-sim's count: a server with a 4,096-token
               context refuses it (upstream) or truncates it (BitNet), as it would OpenClaw's.
               Give the server a larger context (llama-sim --ctx, llama-server -c) or the
               workload a shorter --system-prompt-chars.
  mix:K=W,...  sessions drawn with weights, e.g. mix:short-chat=70,agent=30

The same --seed gives the same prompts and, with --rate, the same arrival schedule.";

/// OpenAI-aware load generator for bitnet-gateway and llama-server.
#[derive(Parser)]
#[command(
    name = "bitnet-loadtest",
    version,
    about,
    long_about = LONG_ABOUT,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a load test (also the default when no subcommand is given).
    Run(Box<RunArgs>),
    /// Print two result files side by side with B/A ratios of the main figures.
    Compare {
        /// Baseline result file (written by --json).
        a: PathBuf,
        /// Result file to compare against the baseline.
        b: PathBuf,
    },
    /// Print the summary of a result file, and optionally render its HTML report.
    Report {
        /// Result file (written by --json).
        results: PathBuf,
        /// Write the HTML report to this file.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Base URL of the target, e.g. http://127.0.0.1:8090 (requests go to URL/v1/chat/completions).
    #[arg(long, value_name = "URL", required = true)]
    url: Option<String>,
    /// Value of the `model` field sent with every request.
    #[arg(long, value_name = "NAME", required = true)]
    model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`. Never written to result files.
    #[arg(
        long,
        value_name = "KEY",
        env = "BITNET_LOADTEST_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Closed loop: this many workers, each running one session at a time back to back
    /// (default 1 when --rate is not given).
    #[arg(long, value_name = "N", conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: start sessions at Poisson arrivals averaging this many per second. For
    /// single-request workloads that is requests per second; an agent session's later turns
    /// follow its own replies and think times.
    #[arg(long, value_name = "PER_SEC")]
    rate: Option<f64>,
    /// Open loop: sessions allowed in flight at once; arrivals beyond it are dropped and
    /// counted [default: 10000].
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// Stop starting requests after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Stop after sending this many requests (each agent turn counts as one).
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Request streamed responses (`stream: true`) and measure per-chunk timings.
    #[arg(long)]
    stream: bool,
    /// Traffic to send: short-chat, long-prompt, agent, or mix:KIND=WEIGHT,... (described in
    /// `bitnet-loadtest --help`).
    #[arg(long, value_name = "NAME", default_value = "short-chat")]
    workload: WorkloadSpec,
    /// `max_tokens` for every request, overriding each workload's default.
    #[arg(long, value_name = "N")]
    max_tokens: Option<u32>,
    /// Seed for prompts, workload choice and arrival times.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Agent workload: seconds between receiving a reply and sending the next turn
    /// [default: 2].
    #[arg(long, value_name = "SECS")]
    think_time: Option<f64>,
    /// Agent workload: turns per session [default: 5].
    #[arg(long, value_name = "N")]
    turns: Option<u32>,
    /// Agent workload: length of the shared system prompt in characters (about 4 per token;
    /// the default is the size of OpenClaw's) [default: 38000].
    #[arg(long, value_name = "CHARS")]
    system_prompt_chars: Option<usize>,
    /// Seconds one request may take from sending to its last byte before it counts as a timeout.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    timeout: f64,
    /// With --duration: seconds requests still running at the end may take to finish before
    /// they are cut and counted as cancelled [default: 10].
    #[arg(long, value_name = "SECS")]
    drain: Option<f64>,
    /// Allow targets outside the loopback network.
    #[arg(long)]
    allow_remote: bool,
    /// Write the parameters, summary and per-request records to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// With --json and --stream: keep when each token of each stream arrived, in
    /// microseconds since the run started, in the records' `token_us`. For studying where
    /// inter-token latency comes from; at most 10 million per run.
    #[arg(long)]
    token_times: bool,
    /// Write a self-contained HTML report (SVG charts) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// `--max-in-flight` when not given.
const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| anyhow!("{flag} must be a non-negative number of seconds, got {secs}"))
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<(RunConfig, Option<PathBuf>, Option<PathBuf>)> {
        let url = self.url.context("--url is required")?;
        let model = self.model.context("--model is required")?;
        let mut cfg = RunConfig::new(url, model);
        cfg.api_key = self.api_key;
        cfg.load = match self.rate {
            Some(rate) => Load::Open {
                rate,
                max_in_flight: self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            },
            None => Load::Closed {
                concurrency: self.concurrency.unwrap_or(1),
            },
        };
        cfg.duration = self
            .duration
            .map(|d| seconds("--duration", d))
            .transpose()?;
        cfg.max_requests = self.requests;
        cfg.stream = self.stream;
        cfg.workload = self.workload;
        cfg.max_tokens = self.max_tokens;
        cfg.seed = self.seed;
        // Settings for something the run does not do would be silently ignored.
        if self.max_in_flight.is_some() && self.rate.is_none() {
            bail!("--max-in-flight applies to the open loop, which --rate chooses");
        }
        if self.drain.is_some() && self.duration.is_none() {
            bail!("--drain applies to a run bounded by --duration");
        }
        if self.token_times && (self.json.is_none() || !self.stream) {
            bail!("--token-times records streamed tokens into the --json file: give --stream and --json");
        }
        cfg.token_times = self.token_times;
        let has_agent = cfg
            .workload
            .entries()
            .iter()
            .any(|(kind, _)| *kind == WorkloadKind::Agent);
        let agent_flags = [
            ("--think-time", self.think_time.is_some()),
            ("--turns", self.turns.is_some()),
            ("--system-prompt-chars", self.system_prompt_chars.is_some()),
        ];
        if let Some((flag, _)) = agent_flags.iter().find(|(_, given)| *given && !has_agent) {
            bail!(
                "{flag} applies to agent sessions, and --workload {} has none",
                cfg.workload
            );
        }
        if let Some(t) = self.think_time {
            cfg.think_time = seconds("--think-time", t)?;
        }
        if let Some(n) = self.turns {
            cfg.turns = n;
        }
        if let Some(n) = self.system_prompt_chars {
            cfg.system_prompt_chars = n;
        }
        cfg.timeout = seconds("--timeout", self.timeout)?;
        if let Some(d) = self.drain {
            cfg.drain = seconds("--drain", d)?;
        }
        cfg.allow_remote = self.allow_remote;
        cfg.progress = !self.quiet;
        Ok((cfg, self.json, self.report))
    }
}

/// How a run ended, for the exit status.
enum Ended {
    /// Finished, with at least one success (or nothing sent).
    Ran,
    /// Requests were sent and none succeeded.
    NothingSucceeded,
    /// Ctrl-C.
    Interrupted,
}

/// Fails now, not after the run, if `path` cannot be written: a long run's records must not
/// be lost to a typo in a directory name.
fn check_writable(flag: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("{flag} {}: is a directory", path.display());
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<Ended> {
    let (cfg, json, report) = args.into_config()?;
    if let Some(path) = &json {
        check_writable("--json", path)?;
    }
    if let Some(path) = &report {
        check_writable("--report", path)?;
    }
    let result = gen::run_until(cfg, async {
        // A failure to listen for Ctrl-C must not end the run.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        eprintln!("\ninterrupted: cancelling requests in flight");
    })
    .await?;
    print!("{}", result.table());
    if let Some(path) = json {
        result.write_json(&path)?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(path) = report {
        result.write_html(&path)?;
        eprintln!("report written to {}", path.display());
    }
    let s = &result.summary;
    Ok(if result.interrupted {
        Ended::Interrupted
    } else if s.requests > 0 && s.succeeded == 0 {
        eprintln!(
            "bitnet-loadtest: none of the {} requests succeeded",
            s.requests
        );
        Ended::NothingSucceeded
    } else {
        Ended::Ran
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<Ended> {
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::Compare { a, b }) => {
            let ra = RunResult::read_json(&a)?;
            let rb = RunResult::read_json(&b)?;
            print!(
                "{}",
                compare::render(&a.display().to_string(), &ra, &b.display().to_string(), &rb)
            );
            Ok(Ended::Ran)
        }
        Some(Command::Report { results, html }) => {
            let result = RunResult::read_json(&results)?;
            print!("{}", result.table());
            if let Some(path) = html {
                check_writable("--html", &path)?;
                result.write_html(&path)?;
                eprintln!("report written to {}", path.display());
            }
            Ok(Ended::Ran)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse()).await {
        Ok(Ended::Ran) => ExitCode::SUCCESS,
        Ok(Ended::NothingSucceeded) => ExitCode::from(3),
        Ok(Ended::Interrupted) => ExitCode::from(130),
        Err(err) => {
            eprintln!("bitnet-loadtest: {}", message(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: messages that already quote their cause (as
/// `PATH: ERROR` does) would otherwise print it twice.
fn message(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
