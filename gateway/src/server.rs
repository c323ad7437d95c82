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
        let Ok(permit) = gw.connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        // Tokens are small writes; never let Nagle hold one back.
        let _ = stream.set_nodelay(true);
        let gw2 = gw.clone();
        let svc = service_fn(move |req| {
            let gw = gw2.clone();
            async move { Ok::<_, Infallible>(handle(gw, req, peer).await) }
        });
        // Built per connection from the config in force, so a reload's limits apply to
        // new connections.
        let builder = connection_builder(&gw.config());
        let watcher = graceful.watcher();
        let acceptor = gw.tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    // The handshake runs here, not in the accept loop, and is bounded so a
                    // silent client cannot hold a connection slot.
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let conn = builder.serve_connection(TokioIo::new(tls), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    gw.begin_shutdown();
    tracing::info!(drain_timeout = ?gw.config().drain_timeout, "shutting down: no new connections; draining in-flight responses");
    match tokio::time::timeout(gw.config().drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("drain timeout reached; cutting the remaining connections"),
    }
    Ok(())
}

/// HTTP/1.1 and HTTP/2 settings for one client connection.
fn connection_builder(cfg: &crate::config::Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that never finishes its headers, or idles between requests, must not
        // hold a connection forever.
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Longest TLS handshake a client gets.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answer a connection over `max_connections` with a 503 and close it, so the client
/// learns why instead of hanging in the accept backlog.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = crate::error::error_body(
        "the gateway has reached its connection limit; retry later",
        "unavailable_error",
        "too_many_connections",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}

/// Aborts the gateway's background tasks when dropped.
struct StopBackground(Arc<Gateway>);

impl Drop for StopBackground {
    fn drop(&mut self) {
        self.0.stop_background();
    }
}
