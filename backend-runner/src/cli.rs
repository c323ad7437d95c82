//! Command-line flags. Every flag overrides the config file; the essentials are enough to
//! run without a file at all.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::config::{Config, ConfigError, RawConfig, RawHealth, RawLogs, RawRestart, RawStop};

/// Keeps N llama-server instances alive, each on its own cores, and tells the gateway which
/// can take work.
///
/// Each instance runs the known-good command line
///   llama-server -m MODEL --host HOST --port PORT -t THREADS -c CTX -ngl 0 --no-perf --metrics --slots
/// plus -np when --parallel is set and any arguments given after `--`. An instance is ready
/// when GET /health answers 200. Instances that exit, or stop answering while idle, are
/// restarted with a delay that doubles during a crash loop (5 s up to 60 s). The control
/// API lists the instances (GET /instances), restarts one after draining it
/// (POST /instances/NAME/restart), and serves GET /health and GET /metrics.
///
/// SIGTERM or SIGINT drains and stops every instance; a second signal kills them at once.
/// Instances die with the runner even if it is killed with SIGKILL.
///
/// Example, seven instances of 8 threads each on their own cores:
///
///   bitnet-runner --llama-server /opt/bitnet/build/bin/llama-server \
///       --model /models/ggml-model-i2_s.gguf --instances 7 --pin -- --temp 0.7
#[derive(Debug, Parser)]
#[command(
    name = "bitnet-runner",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
pub struct Cli {
    /// TOML config file (timing, log files and per-instance `[[instance]]` overrides live
    /// there). Flags given on the command line override its values.
    #[arg(long, value_name = "FILE", env = "BITNET_RUNNER_CONFIG")]
    pub config: Option<PathBuf>,

    /// llama-server binary: a path, or a name looked up on PATH [default: llama-server].
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,

    /// GGUF model file every instance serves (-m). Required here or in the file.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// Number of llama-server instances [default: 1, or the number of `[[instance]]` tables].
    #[arg(long, value_name = "N")]
    pub instances: Option<u32>,

    /// CPU threads per instance (-t); with --pin, also the number of cores each gets
    /// [default: 8].
    #[arg(long, short = 't', value_name = "T")]
    pub threads: Option<u32>,

    /// Context size per instance in tokens (-c) [default: 4096].
    #[arg(long, short = 'c', value_name = "C")]
    pub ctx: Option<u32>,

    /// Slots per instance (-np); not passed unless set, so llama-server's default applies.
    #[arg(long, value_name = "NP")]
    pub parallel: Option<u32>,

    /// IP address the instances listen on (--host) [default: 127.0.0.1].
    #[arg(long, value_name = "H")]
    pub host: Option<String>,

    /// Port of the first instance; instance i gets P + i [default: 8101]. With 0, each
    /// instance lets the OS pick a free port, read back from its log.
    #[arg(long, value_name = "P")]
    pub base_port: Option<u16>,

    /// Address of the control API [default: 127.0.0.1:8099]. Port 0 lets the OS choose; the
    /// bound address is printed on stdout.
    #[arg(long, value_name = "ADDR")]
    pub control: Option<String>,

    /// Give each instance its own disjoint set of cores (as many as its threads), from the
    /// cores this process may use. An impossible layout is refused at start.
    #[arg(long, overrides_with = "no_pin")]
    pub pin: bool,

    /// Do not pin instances (overrides `pin = true` in the file).
    #[arg(long, overrides_with = "pin")]
    pub no_pin: bool,

    /// Seconds an instance may take from start to /health 200 [default: 300].
    #[arg(long, value_name = "SECS")]
    pub startup_timeout: Option<f64>,

    /// First restart delay in seconds, doubling during a crash loop [default: 5].
    #[arg(long, value_name = "SECS")]
    pub restart_delay: Option<f64>,

    /// Seconds a planned restart waits for in-flight requests before stopping the instance
    /// anyway [default: 300].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<f64>,

    /// Seconds between SIGTERM and SIGKILL when stopping an instance [default: 10].
    #[arg(long, value_name = "SECS")]
    pub stop_timeout: Option<f64>,

    /// Also write each instance's output to DIR/NAME.log, rotated by size (see `[logs]` in
    /// the config file).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Format of the runner's own log on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// Check the configuration (binary, model files, core plan, log directory, which it
    /// creates), print it resolved with the core plan, and exit without starting any
    /// instance. Ports held by another process now are warnings here, not errors: the old
    /// instances may still hold them until the runner replaces them.
    #[arg(long)]
    pub check_config: bool,

    /// Extra llama-server arguments, after `--`; they replace `extra_args` from the file.
    #[arg(last = true, value_name = "LLAMA_SERVER_ARGS")]
    pub llama_args: Vec<String>,
}

/// Runner log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// Reads the config file, if any, lays the flags over it and validates the result.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        file.overlay(self.into_raw()).validate()
    }

    fn into_raw(self) -> RawConfig {
        RawConfig {
            llama_server: self.llama_server,
            model: self.model,
            instances: self.instances,
            threads: self.threads,
            ctx: self.ctx,
            parallel: self.parallel,
            host: self.host,
            base_port: self.base_port,
            control: self.control,
            pin: match (self.pin, self.no_pin) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            extra_args: (!self.llama_args.is_empty()).then_some(self.llama_args),
            health: RawHealth {
                startup_timeout_secs: self.startup_timeout,
                ..RawHealth::default()
            },
            restart: RawRestart {
                delay_secs: self.restart_delay,
                ..RawRestart::default()
            },
            stop: RawStop {
                drain_timeout_secs: self.drain_timeout,
                timeout_secs: self.stop_timeout,
                ..RawStop::default()
            },
            logs: RawLogs {
                dir: self.log_dir,
                ..RawLogs::default()
            },
            instance: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Cli::parse_from(std::iter::once("bitnet-runner").chain(args.iter().copied())).into_config()
    }

    #[test]
    fn flags_alone_configure_the_instances() {
        let c = parse(&[
            "--model",
            "/m.gguf",
            "--instances",
            "2",
            "--threads",
            "4",
            "--ctx",
            "2048",
            "--parallel",
            "2",
            "--host",
            "0.0.0.0",
            "--base-port",
            "9000",
            "--control",
            "127.0.0.1:0",
            "--pin",
            "--llama-server",
            "/bin/llama",
            "--",
            "--temp",
            "0.5",
        ])
        .unwrap();
        assert_eq!(c.instances.len(), 2);
        let i = &c.instances[1];
        assert_eq!(
            (i.threads, i.ctx, i.parallel, i.port),
            (4, 2048, Some(2), 9001)
        );
        assert_eq!(i.host.to_string(), "0.0.0.0");
        assert_eq!(i.extra_args, ["--temp", "0.5"]);
        assert!(c.pin);
        assert_eq!(c.control.port(), 0);
        assert_eq!(c.llama_server, PathBuf::from("/bin/llama"));
    }

    #[test]
    fn no_pin_wins_over_an_earlier_pin() {
        assert!(!parse(&["-m", "/m", "--pin", "--no-pin"]).unwrap().pin);
        assert!(parse(&["-m", "/m", "--no-pin", "--pin"]).unwrap().pin);
    }

    #[test]
    fn timing_flags_reach_the_config() {
        let c = parse(&[
            "-m",
            "/m",
            "--restart-delay",
            "0.2",
            "--startup-timeout",
            "7",
            "--drain-timeout",
            "3",
            "--stop-timeout",
            "1",
        ])
        .unwrap();
        assert_eq!(c.timing.restart_delay.as_millis(), 200);
        assert_eq!(c.timing.startup_timeout.as_secs(), 7);
        assert_eq!(c.timing.drain_timeout.as_secs(), 3);
        assert_eq!(c.timing.stop_timeout.as_secs(), 1);
    }
}
