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

/// Connections the listening socket may hold before they are accepted. tokio's own `bind`
/// asks for 128, and a thousand clients connecting in the same instant (the fan-out
/// benchmark's bursts) overflowed it: the kernel dropped some of their SYNs and they
/// connected a second later, on the retransmission. A llama-sim reached directly then saw a
/// thinner burst than one reached through a proxy (whose listener has room for them all),
/// so the direct reference was not the same load. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the simulator's listening socket to `host:port` as tokio's `bind` does (each
/// address `host` resolves to in turn), then raises its backlog to [`LISTEN_BACKLOG`]:
/// `listen` on a socket that already listens only sets the new backlog, and nothing can
/// have connected before the caller learns the address.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind((host, port)).await?;
    socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG as i32)?;
    Ok(listener)
}

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

#[cfg(test)]
mod tests {
    use super::bind;

    #[tokio::test]
    async fn a_burst_of_clients_waits_in_the_backlog_not_for_a_retransmission() {
        // Nothing accepts, so every connection must fit in the backlog; with tokio's 128,
        // more than half of these would connect a second late.
        let listener = bind("127.0.0.1", 0).await.expect("bound");
        let addr = listener.local_addr().unwrap();
        let late = testkit::backlog::connects_left_waiting(addr, 300).await;
        assert_eq!(late, 0, "{late} connects waited for a retransmission");
        drop(listener);
    }
}
