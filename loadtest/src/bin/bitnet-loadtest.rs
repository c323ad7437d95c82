//! `bitnet-loadtest`: drives OpenAI chat-completion load at a server and reports what it saw.
//! A thin shell over [`loadtest::gen`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use loadtest::gen::{self, compare, Load, RunConfig, RunResult, WorkloadSpec};

const LONG_ABOUT: &str = "\
Drives OpenAI-compatible chat-completion load (POST URL/v1/chat/completions) and measures time to \
first token, inter-token latency, end-to-end latency, throughput and errors by kind (429 and 503 \
apart, connect, timeout, mid-stream).

Running load is the default action: `bitnet-loadtest --url ... --model ... --requests 100` is the \
same as `bitnet-loadtest run --url ...`. A run must be bounded by --duration, --requests or both, \
and only loopback targets are accepted unless --allow-remote is given. Ctrl-C ends a run early: \
requests in flight are cancelled, and the results so far are reported and written.

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
    /// Open loop: sessions allowed in flight at once; arrivals beyond it are dropped and counted.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_in_flight: usize,
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
    /// Agent workload: seconds between receiving a reply and sending the next turn.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    think_time: f64,
    /// Agent workload: turns per session.
    #[arg(long, value_name = "N", default_value_t = 5)]
    turns: u32,
    /// Agent workload: length of the shared system prompt in characters (about 4 per token;
    /// the default is the size of OpenClaw's).
    #[arg(long, value_name = "CHARS", default_value_t = 38_000)]
    system_prompt_chars: usize,
    /// Seconds one request may take from sending to its last byte before it counts as a timeout.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    timeout: f64,
    /// With --duration: seconds requests still running at the end may take to finish before
    /// they are cut and counted as cancelled.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    drain: f64,
    /// Allow targets outside the loopback network.
    #[arg(long)]
    allow_remote: bool,
    /// Write the parameters, summary and per-request records to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (SVG charts) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
}

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
                max_in_flight: self.max_in_flight,
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
        cfg.think_time = seconds("--think-time", self.think_time)?;
        cfg.turns = self.turns;
        cfg.system_prompt_chars = self.system_prompt_chars;
        cfg.timeout = seconds("--timeout", self.timeout)?;
        cfg.drain = seconds("--drain", self.drain)?;
        cfg.allow_remote = self.allow_remote;
        cfg.progress = !self.quiet;
        Ok((cfg, self.json, self.report))
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (cfg, json, report) = args.into_config()?;
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
    Ok(())
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
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
            Ok(())
        }
        Some(Command::Report { results, html }) => {
            let result = RunResult::read_json(&results)?;
            print!("{}", result.table());
            if let Some(path) = html {
                result.write_html(&path)?;
                eprintln!("report written to {}", path.display());
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bitnet-loadtest: {err:#}");
            ExitCode::FAILURE
        }
    }
}
