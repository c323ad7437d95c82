//! The `bitnet-runner` binary: parse flags, check everything, supervise until a signal.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use backend_runner::cli::{Cli, LogFormat};
use backend_runner::launch::{exec_instance, Launcher, EXEC_ARG};
use backend_runner::{preflight, Runner};
use clap::Parser;
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;

/// Exit status for bad configuration or input, found before anything started.
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == EXEC_ARG) {
        // The launcher: on success this process has become llama-server and never gets here.
        let err = exec_instance(&args[2..]);
        eprintln!("bitnet-runner: {err}");
        return ExitCode::from(127);
    }

    let cli = Cli::parse();
    init_logging(cli.log_format);
    let check_only = cli.check_config;
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("bitnet-runner: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    if check_only {
        return match preflight::check_config(&config) {
            Ok((plan, busy)) => {
                print!("{}", backend_runner::summary::render(&config, &plan));
                for err in busy {
                    eprintln!(
                        "bitnet-runner: warning: {err}; it must be free when the runner starts"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("bitnet-runner: {err}");
                ExitCode::from(EXIT_BAD_INPUT)
            }
        };
    }
    let plan = match preflight::check(&config) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("bitnet-runner: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };

    // A current-thread runtime: instances are spawned from the main thread, which lives as
    // long as the process, so their parent-death signal fires only when the runner dies.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bitnet-runner: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.control).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!(
                    "bitnet-runner: cannot listen on control address {}: {err}",
                    config.control
                );
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        };
        let signals = match signal_channel() {
            Ok(rx) => rx,
            Err(err) => {
                eprintln!("bitnet-runner: cannot install signal handlers: {err}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        // Tests and scripts start us on port 0 and read the real address from this line.
        println!("bitnet-runner control API listening on http://{addr}");
        let runner = match Runner::start(&config, plan, Launcher::this_executable(), listener) {
            Ok(r) => r,
            Err(err) => {
                eprintln!("bitnet-runner: {err}");
                return ExitCode::FAILURE;
            }
        };
        match runner.run(signals).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bitnet-runner: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// One message per SIGTERM or SIGINT.
fn signal_channel() -> std::io::Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            if tx.send(()).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
