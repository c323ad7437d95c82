//! `llama-sim`: serves a simulated llama-server until a signal or an injected crash.
//!
//! In the llama.cpp dialect SIGTERM and SIGINT finish in-flight requests, then exit 0 (a second
//! signal exits at once). In the bitnet dialect no handler is installed, so either signal kills
//! the process immediately, as it does the fork.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use loadtest::sim::{serve, Dialect, Exit, SimArgs};
use tokio::signal::unix::{signal, SignalKind};

/// Exit status of an abrupt crash, as after `abort()`.
const CRASH_STATUS: i32 = 134;
/// Exit status when a second signal cuts a graceful drain short.
const INTERRUPTED_STATUS: i32 = 130;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = SimArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = args.to_config()?;
    let listener = loadtest::sim::bind(&args.host, args.port)
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // Tests and benchmarks read this line to learn the port.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "llama-sim listening on http://{addr}")?;
    stdout.flush()?;

    let dialect = cfg.dialect;
    let shutdown = async move {
        if dialect == Dialect::Bitnet {
            // Default signal dispositions stay in place: SIGTERM kills the process mid-request.
            std::future::pending::<()>().await;
        }
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            std::process::exit(INTERRUPTED_STATUS);
        });
    };
    match serve(listener, cfg, shutdown).await? {
        Exit::Shutdown => Ok(()),
        Exit::Crashed => {
            eprintln!("llama-sim: injected crash");
            std::process::exit(CRASH_STATUS);
        }
    }
}
