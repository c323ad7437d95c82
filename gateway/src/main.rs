//! The `bitnet-gateway` binary: parse flags, load config, bind, serve until a signal.

use std::process::ExitCode;

use clap::Parser;
use gateway::cli::Cli;
use gateway::{logging, serve_threads, Gateway};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Declared before the runtime so that it is dropped after it: the last lines are
    // written before the process exits.
    let _log = logging::init(cli.log_format);
    let check_only = cli.check_config;
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("bitnet-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        // The files a start reads: a check that passes them by would pass a start that fails.
        let files = gateway::tls::upstream_tls(config.upstream_ca_file.as_deref()).and_then(|_| {
            match &config.tls {
                Some((cert, key)) => gateway::tls::TlsReloader::load(cert, key).map(drop),
                None => Ok(()),
            }
        });
        if let Err(err) = files {
            eprintln!("bitnet-gateway: {err}");
            return ExitCode::from(2);
        }
        print!("{}", gateway::summary::render(&config));
        return ExitCode::SUCCESS;
    }
    // This thread is the first serving thread; `workers - 1` more start in serve_threads,
    // each with a single-threaded runtime of its own.
    let rt = match gateway::server::runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bitnet-gateway: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listen = config.listen;
        let workers = config.workers;
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
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(err) => {
                eprintln!("bitnet-gateway: cannot install signal handlers: {err}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match gateway::server::bind(listen) {
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
        match serve_threads(listener, gw, workers, shutdown).await {
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

/// Resolves on SIGTERM or SIGINT. The handlers are installed here, at once, not when the
/// future is first polled: a signal that arrives after the gateway says it is listening
/// must stop it gracefully, never kill it.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
