//! The `bitnet-gateway` binary: parse flags, load config, bind, serve until a signal.

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
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("bitnet-gateway: cannot listen on {}: {err}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        // Tests and scripts start us on port 0 and read the real address from this line.
        println!("bitnet-gateway listening on http://{addr}");
        for m in &config.models {
            tracing::info!(model = %m.id, aliases = ?m.aliases, backends = m.backends.len(), "serving model");
        }
        let gw = Gateway::new(config);
        match serve(listener, gw, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bitnet-gateway: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
