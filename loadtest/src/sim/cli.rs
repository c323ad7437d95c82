//! The `llama-sim` command line.
//!
//! Besides its own flags, `llama-sim` accepts the llama-server command line that launchers such
//! as `bitnet-runner` and BitNet's `run_inference_server.py` pass (`-t`, `-ngl`, `--no-perf`,
//! `--metrics`, `--slots`, `-np`, `-cb`, `-n`, `--temp`, `--api-key`, ...), so it can stand in
//! for the real binary unchanged.
//! llama-server spells some flags as several letters after one dash (`-np`, `-ngl`, `-cb`),
//! which clap reads as bundled short flags; [`SimArgs`] implements [`Parser`] by hand to
//! respell them before clap sees them.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser};

use super::config::{ConfigError, Dialect, Faults, SimConfig, DEFAULT_MODEL_PATH};

/// Simulates a llama-server with BitNet-like CPU timing: per-slot prompt caches, FIFO queueing
/// when all slots are busy, prompt evaluation and generation at fixed token rates, the upstream
/// llama.cpp or the older bitnet fork's API behaviour, and injectable faults.
///
/// Prints `llama-sim listening on http://ADDR:PORT` on stdout once it accepts connections.
///
/// Tokens are counted by a deterministic split of the text: every run of letters, digits and
/// `_` is a token per 12 characters, every `<|marker|>` is one, every other non-space character
/// is one. Chats are rendered with a ChatML-like template, so re-sent history is a prefix of the
/// next prompt and hits the slot cache.
#[derive(Debug, Clone, Args)]
#[command(verbatim_doc_comment)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 lets the system pick a free one (see the printed address).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// API behaviour to imitate: "llama.cpp" (current upstream llama-server) or "bitnet" (the
    /// 2024 fork bitnet.cpp builds: 1 slot, no prompt cache by default, usage on the finish
    /// chunk, `error:` stream events, 500 on `tools` and on null content, ignores
    /// max_completion_tokens, truncates long prompts, generates at most 4096 tokens per request
    /// as its launcher's `-n 4096` makes it, dies on SIGTERM without draining).
    #[arg(long, value_enum, default_value_t = Dialect::LlamaCpp)]
    pub dialect: Dialect,

    /// Model path to report; it is the model id unless --alias is given.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL_PATH)]
    pub model: String,

    /// Model id to report instead of the path.
    #[arg(short = 'a', long)]
    pub alias: Option<String>,

    /// Number of slots (requests processed at once); more requests wait in FIFO order and count
    /// as llamacpp:requests_deferred. In the bitnet dialect, giving this flag also enables
    /// GET /slots, as the fork's --slots does; without it /slots answers 501. Without N, as
    /// llama-server takes it, it only enables /slots.
    /// [default: 4 for llama.cpp, 1 for bitnet]
    #[arg(long, value_name = "N", num_args = 0..=1)]
    pub slots: Option<Option<usize>>,

    /// Number of slots, llama-server's spelling (`-np N` is accepted too). Same as --slots N
    /// except that it leaves /slots as the dialect has it.
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,

    /// Accepted for llama-server compatibility and ignored: speed comes from --prefill-rate
    /// and --decode-rate, not from threads.
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,

    /// Accepted for llama-server compatibility (`-ngl N` too) and ignored: the modelled
    /// server runs on the CPU.
    #[arg(long, value_name = "N")]
    pub n_gpu_layers: Option<i64>,

    /// Accepted for llama-server compatibility and ignored: there are no perf counters to
    /// turn off.
    #[arg(long)]
    pub no_perf: bool,

    /// Accepted for llama-server compatibility and ignored: GET /metrics is always served.
    #[arg(long)]
    pub metrics: bool,

    /// Accepted for llama-server compatibility (`-cb` too) and ignored: busy slots always
    /// generate at the same time.
    #[arg(long)]
    pub cont_batching: bool,

    /// The most tokens any request generates, as llama-server's `-n`: a request's own limit
    /// above it is cut to it. BitNet's launcher passes `-n 4096`, which the bitnet dialect
    /// assumes when this flag is absent. [default: none for llama.cpp, 4096 for bitnet]
    #[arg(short = 'n', long, value_name = "N")]
    pub n_predict: Option<usize>,

    /// Require `Authorization: Bearer KEY` (upstream also takes `X-Api-Key: KEY`) on every
    /// endpoint but /health and the model list, as llama-server's --api-key does; others get
    /// 401 "Invalid API Key".
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Switch GET /slots off (501), as llama-server's --no-slots does.
    #[arg(long, conflicts_with = "slots")]
    pub no_slots: bool,

    /// Accepted for llama-server compatibility and ignored: the simulator's text is not
    /// sampled, so sampling settings change nothing.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub temp: Option<f64>,

    /// Accepted for llama-server compatibility and ignored: the simulator serves HTTP on its
    /// own runtime, not on a pool of HTTP threads.
    #[arg(long, value_name = "N")]
    pub threads_http: Option<usize>,

    /// Accepted for llama-server compatibility (`-to SECS` too) and ignored: the simulator
    /// never times out a client's connection.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,

    /// Accepted for llama-server compatibility (`-sps F` too) and ignored: a request always
    /// goes to the free slot holding the longest prefix of its prompt.
    #[arg(long, value_name = "F")]
    pub slot_prompt_similarity: Option<f64>,

    /// Context size of each slot, in tokens. Upstream refuses longer prompts with 400
    /// exceed_context_size_error and stops generating at the end of the context; bitnet
    /// truncates the prompt and shifts the context.
    #[arg(
        short = 'c',
        long = "ctx",
        visible_alias = "ctx-size",
        default_value_t = 4096,
        value_name = "TOKENS"
    )]
    pub ctx: usize,

    /// Prompt evaluation speed, tokens per second. Only prompt tokens a slot does not already
    /// hold are evaluated.
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 60.0,
        value_name = "TOK_PER_S"
    )]
    pub prefill_rate: f64,

    /// Generation speed of each slot, tokens per second.
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 18.0,
        value_name = "TOK_PER_S"
    )]
    pub decode_rate: f64,

    /// Tokens generated when a request sets no max_tokens / max_completion_tokens / n_predict;
    /// the answer then ends with finish_reason "stop" (a limit gives "length").
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub default_max_tokens: usize,

    /// Multiplies every delay: prompt evaluation, generation, --load-time and --slow-start
    /// (0.01 runs 100 times faster). Reported timings are the scaled durations.
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 1.0,
        value_name = "F"
    )]
    pub time_scale: f64,

    /// Answer at once, without the modelled prompt evaluation and generation time, to measure
    /// the overhead of whatever sits in front. Reported timings still show the modelled
    /// durations; --load-time and the --slow-start fault still wait.
    #[arg(long)]
    pub zero_latency: bool,

    /// Seconds during which every endpoint, /health included, answers 503 "Loading model".
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 0.0,
        value_name = "SECS"
    )]
    pub load_time: f64,

    /// Fault: exit abruptly (status 134, as after an abort) when generation request N arrives.
    /// Generation requests (chat, completions, /completion) are numbered from 1 as they
    /// arrive, refused ones (bad JSON, say) included; no other endpoint counts.
    #[arg(long, value_name = "N")]
    pub crash_after: Option<u64>,

    /// Fault modifier: with --crash-after N, crash only once request N has streamed K tokens
    /// (or all of them, if it has fewer).
    #[arg(long, value_name = "K", requires = "crash_after")]
    pub crash_after_tokens: Option<usize>,

    /// Fault: accept selected generation requests and never answer them, not even a status
    /// line.
    #[arg(long)]
    pub hang_before_first_byte: bool,

    /// Fault: selected generation requests stop after K tokens (or before their end, if
    /// shorter) and never finish; the slot stays busy until the client disconnects.
    #[arg(long, value_name = "K")]
    pub hang_mid_stream_after: Option<usize>,

    /// Fault: selected generation requests fail after K tokens (or before their end, if
    /// shorter). Streams get the dialect's error event (upstream: `data: {"error":...}` and no
    /// `[DONE]`; bitnet: `error: {...}` then `[DONE]`); upstream streams failing before their first
    /// token, and non-streamed requests, get HTTP 500.
    #[arg(long, value_name = "K")]
    pub error_mid_stream_after: Option<usize>,

    /// Fault: delay before selected generation requests get any byte of an answer, in seconds.
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 0.0,
        value_name = "SECS"
    )]
    pub slow_start: f64,

    /// Fault: answer selected generation requests with 503 "Loading model" (/health stays 200).
    #[arg(long)]
    pub fail_503: bool,

    /// Which generation requests the per-request faults (hang, error, slow start, 503) select:
    /// every Nth, i.e. requests N, 2N, 3N... 1 selects all of them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub fault_every: u64,
}

impl SimArgs {
    /// The server these flags describe.
    pub fn to_config(&self) -> Result<SimConfig, ConfigError> {
        let mut cfg = SimConfig::new(self.dialect);
        cfg.model_path.clone_from(&self.model);
        cfg.alias.clone_from(&self.alias);
        match (self.slots, self.parallel) {
            (Some(Some(a)), Some(b)) if a != b => {
                return Err(ConfigError::Invalid(
                    "slots",
                    "--slots N and --parallel N give different slot counts",
                ))
            }
            _ => {}
        }
        if let Some(n) = self.slots.flatten().or(self.parallel) {
            cfg.slots = n;
        }
        if self.slots.is_some() {
            cfg.slots_endpoint = true;
        }
        if self.no_slots {
            cfg.slots_endpoint = false;
        }
        cfg.n_predict = self.n_predict;
        cfg.api_key.clone_from(&self.api_key);
        cfg.ctx = self.ctx;
        cfg.prefill_rate = self.prefill_rate;
        cfg.decode_rate = self.decode_rate;
        cfg.default_max_tokens = self.default_max_tokens;
        cfg.time_scale = self.time_scale;
        cfg.zero_latency = self.zero_latency;
        cfg.load_time = secs("load_time", self.load_time)?;
        cfg.faults = Faults {
            crash_after: self.crash_after,
            crash_after_tokens: self.crash_after_tokens,
            hang_before_first_byte: self.hang_before_first_byte,
            hang_mid_stream_after: self.hang_mid_stream_after,
            error_mid_stream_after: self.error_mid_stream_after,
            slow_start: secs("slow_start", self.slow_start)?,
            fail_503: self.fail_503,
            every: self.fault_every,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// llama-server flags written as several letters after a single dash, and their spelling here.
const SINGLE_DASH_WORDS: [(&str, &str); 5] = [
    ("-np", "--parallel"),
    ("-ngl", "--n-gpu-layers"),
    ("-cb", "--cont-batching"),
    ("-to", "--timeout"),
    ("-sps", "--slot-prompt-similarity"),
];

/// Respells `-np 2`, `-np=2`, `-ngl 0`, `-cb`, `-to 600` and `-sps 0.5` as their long forms; everything else passes
/// unchanged, so bundled short flags of llama-sim's own keep working.
fn respell<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    args.into_iter()
        .map(|arg| {
            let arg: OsString = arg.into();
            let Some(text) = arg.to_str() else {
                return arg;
            };
            let (word, value) = match text.split_once('=') {
                Some((w, v)) => (w, Some(v)),
                None => (text, None),
            };
            match SINGLE_DASH_WORDS.iter().find(|(short, _)| *short == word) {
                Some((_, long)) => match value {
                    Some(v) => format!("{long}={v}").into(),
                    None => (*long).into(),
                },
                None => arg,
            }
        })
        .collect()
}

impl CommandFactory for SimArgs {
    fn command() -> clap::Command {
        SimArgs::augment_args(clap::Command::new("llama-sim").version(env!("CARGO_PKG_VERSION")))
    }

    fn command_for_update() -> clap::Command {
        SimArgs::augment_args_for_update(
            clap::Command::new("llama-sim").version(env!("CARGO_PKG_VERSION")),
        )
    }
}

// Every entry point goes through `try_parse_from`, so the respelling cannot be bypassed.
impl Parser for SimArgs {
    fn parse() -> Self {
        Self::parse_from(std::env::args_os())
    }

    fn try_parse() -> Result<Self, clap::Error> {
        Self::try_parse_from(std::env::args_os())
    }

    fn parse_from<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::try_parse_from(args).unwrap_or_else(|e| e.exit())
    }

    fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut matches = Self::command().try_get_matches_from(respell(args))?;
        Self::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut Self::command()))
    }

    fn update_from<I, T>(&mut self, args: I)
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        self.try_update_from(args).unwrap_or_else(|e| e.exit())
    }

    fn try_update_from<I, T>(&mut self, args: I) -> Result<(), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut matches = Self::command_for_update().try_get_matches_from(respell(args))?;
        self.update_from_arg_matches_mut(&mut matches)
            .map_err(|e| e.format(&mut Self::command_for_update()))
    }
}

fn secs(name: &'static str, s: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| ConfigError::Invalid(name, "must be a number of seconds >= 0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_picks_its_slot_count_and_slots_endpoint() {
        let up = SimArgs::parse_from(["llama-sim"]).to_config().unwrap();
        assert_eq!((up.slots, up.slots_endpoint), (4, true));
        let bn = SimArgs::parse_from(["llama-sim", "--dialect", "bitnet"])
            .to_config()
            .unwrap();
        assert_eq!((bn.slots, bn.slots_endpoint), (1, false));
        let bn = SimArgs::parse_from(["llama-sim", "--dialect", "bitnet", "--slots", "2"])
            .to_config()
            .unwrap();
        assert_eq!((bn.slots, bn.slots_endpoint), (2, true));
    }

    #[test]
    fn the_runners_llama_server_command_line_is_accepted() {
        let args = [
            "llama-sim",
            "-m",
            "/models/x.gguf",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "-t",
            "8",
            "-c",
            "2048",
            "-ngl",
            "0",
            "--no-perf",
            "--metrics",
            "--slots",
            "-np",
            "2",
            "--dialect",
            "bitnet",
        ];
        let parsed = SimArgs::try_parse_from(args).expect("llama-server flags parse");
        assert_eq!((parsed.port, parsed.threads), (0, Some(8)));
        let cfg = parsed.to_config().unwrap();
        assert_eq!(cfg.dialect, Dialect::Bitnet);
        assert_eq!(cfg.model_path, "/models/x.gguf");
        assert_eq!((cfg.slots, cfg.slots_endpoint, cfg.ctx), (2, true, 2048));
    }

    #[test]
    fn bitnets_launcher_flags_are_taken_and_those_that_matter_act() {
        // run_inference_server.py's command line, plus flags both servers take.
        let args = [
            "llama-sim",
            "-m",
            "/m.gguf",
            "-c",
            "2048",
            "-t",
            "8",
            "-n",
            "4096",
            "--temp",
            "0.8",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "-cb",
            "--threads-http",
            "2",
            "-to",
            "600",
            "-sps",
            "0.5",
            "--api-key",
            "k",
            "--dialect",
            "bitnet",
        ];
        let cfg = SimArgs::try_parse_from(args).unwrap().to_config().unwrap();
        assert_eq!(cfg.n_predict, Some(4096));
        assert_eq!(cfg.api_key.as_deref(), Some("k"));
        let cfg = SimArgs::try_parse_from(["llama-sim", "--no-slots"])
            .unwrap()
            .to_config()
            .unwrap();
        assert!(!cfg.slots_endpoint);
        assert!(SimArgs::try_parse_from(["llama-sim", "--no-slots", "--slots"]).is_err());
    }

    #[test]
    fn negative_numbers_are_refused_by_name() {
        for (flag, name) in [
            ("--time-scale", "time_scale"),
            ("--decode-rate", "decode_rate"),
            ("--prefill-rate", "prefill_rate"),
            ("--load-time", "load_time"),
            ("--slow-start", "slow_start"),
        ] {
            let err = SimArgs::try_parse_from(["llama-sim", flag, "-1"])
                .unwrap()
                .to_config()
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{flag}: {err}");
        }
    }

    #[test]
    fn single_dash_words_take_values_with_or_without_equals_and_cb_is_a_switch() {
        let cfg = |args: &[&str]| {
            let mut all = vec!["llama-sim", "--dialect", "bitnet"];
            all.extend_from_slice(args);
            SimArgs::try_parse_from(all).unwrap().to_config().unwrap()
        };
        assert_eq!(cfg(&["-np=3"]).slots, 3);
        assert_eq!(cfg(&["-np", "2", "-cb", "-ngl=99"]).slots, 2);
        // -np sets the count but, unlike --slots, leaves the fork's /slots off.
        assert!(!cfg(&["-np", "2"]).slots_endpoint);
        // Bare --slots turns /slots on and keeps the dialect's count.
        let bare = cfg(&["--slots"]);
        assert_eq!((bare.slots, bare.slots_endpoint), (1, true));
        // Only whole words are respelled: -c512 is still -c with an attached value.
        assert_eq!(cfg(&["-c512"]).ctx, 512);
    }

    #[test]
    fn different_slot_counts_from_slots_and_parallel_are_refused() {
        let parse = |args: &[&str]| {
            let mut all = vec!["llama-sim"];
            all.extend_from_slice(args);
            SimArgs::try_parse_from(all).unwrap().to_config()
        };
        assert!(parse(&["--slots", "2", "-np", "3"]).is_err());
        assert_eq!(parse(&["--slots", "2", "-np", "2"]).unwrap().slots, 2);
    }

    #[test]
    fn invalid_numbers_are_refused() {
        let bad = |args: &[&str]| {
            let mut all = vec!["llama-sim"];
            all.extend_from_slice(args);
            SimArgs::try_parse_from(all)
                .expect("flags parse")
                .to_config()
                .is_err()
        };
        assert!(bad(&["--slots", "0"]));
        assert!(bad(&["--decode-rate", "0"]));
        assert!(bad(&["--time-scale=-1"]));
        assert!(bad(&["--load-time=-2"]));
        assert!(bad(&["--fault-every", "0"]));
        assert!(!bad(&["--time-scale", "0.01", "--slots", "2"]));
    }

    #[test]
    fn help_explains_every_flag() {
        let help = <SimArgs as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--host",
            "--port",
            "--dialect",
            "--model",
            "--alias",
            "--slots",
            "--ctx",
            "--prefill-rate",
            "--decode-rate",
            "--default-max-tokens",
            "--time-scale",
            "--zero-latency",
            "--load-time",
            "--crash-after",
            "--crash-after-tokens",
            "--hang-before-first-byte",
            "--hang-mid-stream-after",
            "--error-mid-stream-after",
            "--slow-start",
            "--fail-503",
            "--fault-every",
            "--parallel",
            "--threads",
            "--n-gpu-layers",
            "--no-perf",
            "--metrics",
            "--cont-batching",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        assert!(help.contains("[default: 60]") && help.contains("[default: 4096]"));
    }
}
