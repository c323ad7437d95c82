//! Accept: take connections, serve HTTP/1.1 and HTTP/2 on each, and shut down gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::discovery;
use crate::health::spawn_probers;
use crate::routes::handle;
use crate::state::Gateway;

/// Serve on `listener` until `shutdown` resolves, then stop accepting and let in-flight
/// responses finish for up to the configured drain timeout.
///
/// The listener is passed in so that tests (and the binary) bind first, learn the real
/// address, and never race another process for a port.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Background tasks (probes, discovery) are aborted when serving ends, however it ends.
    let _background = StopBackground(gw.clone());
    spawn_probers(&gw);
    discovery::spawn(&gw);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that never finishes its headers must not hold a connection forever.
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Tokens are small writes; never let Nagle hold one back.
        let _ = stream.set_nodelay(true);
        let gw2 = gw.clone();
        let svc = service_fn(move |req| {
            let gw = gw2.clone();
            async move { Ok::<_, Infallible>(handle(gw, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    gw.begin_shutdown();
    tracing::info!(drain_timeout = ?gw.config.drain_timeout, "shutting down: no new connections; draining in-flight responses");
    match tokio::time::timeout(gw.config.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("drain timeout reached; cutting the remaining connections"),
    }
    Ok(())
}

/// Aborts the gateway's background tasks when dropped.
struct StopBackground(Arc<Gateway>);

impl Drop for StopBackground {
    fn drop(&mut self) {
        self.0.stop_background();
    }
}
