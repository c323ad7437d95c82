//! Accepting connections, serving HTTP/1.1 on them, and the two ways of stopping.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::config::{ConfigError, Dialect, SimConfig};
use super::routes;
use super::state::Sim;

/// Pause after a failed `accept` (such as running out of file descriptors), so the loop does
/// not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The shutdown future resolved. In the llama.cpp dialect in-flight requests were finished
    /// first; in the bitnet dialect every connection was dropped at once, as the fork dies on
    /// SIGTERM without draining.
    Shutdown,
    /// An injected crash: every connection was dropped mid-flight and the listener closed. A
    /// binary should now exit abruptly.
    Crashed,
}

/// Serves the simulated llama-server described by `cfg` on `listener` until `shutdown` resolves
/// or an injected crash happens.
///
/// The listener is bound by the caller, so tests can bind `127.0.0.1:0` and know the address
/// before serving starts. Fails only if `cfg` is invalid.
///
/// In the llama.cpp dialect, a shutdown waits for every in-flight request, so a request hung by
/// a fault keeps it waiting until its client disconnects.
pub async fn serve(
    listener: TcpListener,
    cfg: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, ConfigError> {
    cfg.validate()?;
    let sim = Arc::new(Sim::new(cfg));
    let graceful = GracefulShutdown::new();
    // Owning every connection task lets a crash drop them all at once.
    let mut conns = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    let crashed = sim.crashed();
    tokio::pin!(shutdown, crashed);

    loop {
        tokio::select! {
            biased;
            () = &mut crashed => {
                conns.abort_all();
                return Ok(Exit::Crashed);
            }
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Token events are small writes that must leave at once.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let conn_sim = sim.clone();
                let service = service_fn(move |req| {
                    let sim = conn_sim.clone();
                    async move { Ok::<_, Infallible>(routes::handle(sim, req).await) }
                });
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                conns.spawn(async move {
                    // A connection error (client reset, bad request line) concerns that client
                    // only.
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }

    drop(listener);
    match sim.cfg.dialect {
        Dialect::Bitnet => conns.abort_all(),
        Dialect::LlamaCpp => {
            tokio::select! {
                () = graceful.shutdown() => {}
                () = &mut crashed => {
                    conns.abort_all();
                    return Ok(Exit::Crashed);
                }
            }
        }
    }
    Ok(Exit::Shutdown)
}
