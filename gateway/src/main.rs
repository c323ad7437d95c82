//! The `bitnet-gateway` binary: parse flags, load config, bind, serve until a signal.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gateway::cli::{Cli, LogFormat};
use gateway::{serve, Gateway};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let check_only = cli.check_config;
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("bitnet-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bitnet-gateway: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listen = config.listen;
        if config.keys.is_open() && !listen.ip().is_loopback() {
            tracing::warn!(%listen, "no API keys are configured and the gateway listens beyond this machine: anyone who can reach it can use it");
        }
        for m in &config.models {
            tracing::info!(model = %m.id, aliases = ?m.aliases, backends = m.backends.len(), runner = ?m.runner.as_ref().map(|r| r.to_string()), dns = ?m.dns, "serving model");
        }
        let gw = match Gateway::new(config) {
            Ok(gw) => gw,
            Err(err) => {
                eprintln!("bitnet-gateway: {err}");
                return ExitCode::from(2);
            }
        };
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("bitnet-gateway: cannot listen on {listen}: {err}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let scheme = if gw.tls.is_some() { "https" } else { "http" };
        // Tests and scripts start us on port 0 and read the real address from this line.
        println!("bitnet-gateway listening on {scheme}://{addr}");
        tokio::spawn(reload_on_sighup(gw.clone(), cli));
        match serve(listener, gw, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bitnet-gateway: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP: re-read the config file (and flags) and apply it; an invalid one is logged,
/// naming the problem, and the old one stays in force.
async fn reload_on_sighup(gw: std::sync::Arc<Gateway>, cli: Cli) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let config = match cli.into_config() {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(error = %one_line(&err), "SIGHUP: config not reloaded; the old one stays in force");
                continue;
            }
        };
        match gw.reload(config) {
            Ok(r) => {
                tracing::info!(models_added = ?r.models_added, models_removed = ?r.models_removed, backends_added = r.backends_added, backends_removed = r.backends_removed, "SIGHUP: config reloaded (certificate too, if any)");
                for what in r.need_restart {
                    tracing::warn!(
                        setting = what,
                        "SIGHUP: this setting changed but takes effect only after a restart"
                    );
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "SIGHUP: config not reloaded (certificate not reloaded); the old one stays in force")
            }
        }
    }
}

/// An error on one log line: TOML errors quote the offending lines over several.
fn one_line(err: &dyn std::fmt::Display) -> String {
    err.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours are for a person at a terminal. In a file or a journal they are noise, and
    // styling every field name was a quarter of the gateway's work per proxied request.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
