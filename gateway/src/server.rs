//! Accept: take connections, serve HTTP/1.1 and HTTP/2 on each, and shut down gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery;
use crate::health::spawn_probers;
use crate::routes::handle;
use crate::stall::{Activity, Idle, SendDeadline, Tracked};
use crate::state::Gateway;

/// How many connections the kernel may hold for us before we accept them. tokio's (and
/// std's) `bind` asks for 128: a thousand agents reconnecting at once overflow that, and the
/// ones dropped wait for the client's SYN retransmission, a whole second, before the gateway
/// even sees them. The kernel caps this at `net.core.somaxconn`, the knob to turn for more.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind the gateway's listening socket to `addr`, with a backlog of [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted gateway can take its port back while the old connections linger in
    // TIME_WAIT, as `TcpListener::bind` allows too.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

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
    serve_threads(listener, gw, 1, shutdown).await
}

/// [`serve`] on `threads` serving threads: the caller's, and `threads - 1` more, each with a
/// single-threaded runtime of its own accepting from the same socket.
///
/// A connection, its requests and the backend connections they use then stay on the
/// thread that accepted it, the way nginx's worker processes work: no request pays for a
/// wake-up on another thread, which a shared multi-threaded runtime charges several times
/// per request. State that is shared (pools, queues, metrics) is behind locks and atomics
/// already; a queued request on one thread is handed a slot freed on another.
pub async fn serve_threads(
    listener: TcpListener,
    gw: Arc<Gateway>,
    threads: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Background tasks (probes, discovery) are aborted when serving ends, however it ends.
    let _background = StopBackground(gw.clone());
    spawn_probers(&gw);
    discovery::spawn(&gw);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut others = Vec::new();
    for shard in 1..threads.max(1) {
        match spawn_shard(shard, &listener, &gw, stop_rx.clone()) {
            Ok(handle) => others.push(handle),
            Err(err) => {
                let _ = stop_tx.send(true);
                return Err(err);
            }
        }
    }
    let open = accept(0, listener, &gw, shutdown).await;
    let _ = stop_tx.send(true);
    gw.begin_shutdown();
    tracing::info!(drain_timeout = ?gw.config().drain_timeout, "shutting down: no new connections; draining in-flight responses");
    drain(&gw, open).await;
    for handle in others {
        let joined = tokio::task::spawn_blocking(move || handle.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("a serving thread ended abnormally");
        }
    }
    Ok(())
}

/// Start serving thread `shard` on a copy of `listener`'s socket; it stops accepting when
/// `stop` turns true and returns once its connections have drained.
fn spawn_shard(
    shard: usize,
    listener: &TcpListener,
    gw: &Arc<Gateway>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let socket = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    let rt = runtime()?;
    let gw = gw.clone();
    std::thread::Builder::new()
        .name(format!("serve-{shard}"))
        .spawn(move || {
            crate::forward::set_shard(shard);
            rt.block_on(async move {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(err) => {
                        tracing::error!(shard, error = %err, "a serving thread cannot use the listening socket");
                        return;
                    }
                };
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let open = accept(shard, listener, &gw, stopped).await;
                drain(&gw, open).await;
            });
        })
}

/// The single-threaded runtime each serving thread runs.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Accept connections as serving thread `shard` and serve each on a task of this thread
/// until `stop` resolves; the returned handle closes the connections still open.
async fn accept(
    shard: usize,
    listener: TcpListener,
    gw: &Arc<Gateway>,
    stop: impl Future<Output = ()>,
) -> OpenConnections {
    let open = OpenConnections::default();
    let accepted = gw
        .metrics
        .server
        .connections
        .with_label_values(&[&shard.to_string()]);
    tokio::pin!(stop);
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
            () = &mut stop => break,
        };
        accepted.inc();
        let Ok(permit) = gw.connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        // Tokens are small writes; never let Nagle hold one back.
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let gw2 = gw.clone();
        let activity2 = activity.clone();
        let svc = service_fn(move |req| {
            // Counted from here until the response body is dropped, so that a long stream
            // keeps its connection from counting as idle.
            let progress = activity2.start();
            let gw = gw2.clone();
            async move {
                let resp = handle(gw, req, peer).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, progress)))
            }
        });
        // Built per connection from the config in force, so a reload's limits apply to
        // new connections.
        let cfg = gw.config();
        let builder = connection_builder(&cfg);
        let (idle_after, send_timeout) = (cfg.header_read_timeout, cfg.send_timeout);
        drop(cfg);
        // Under TLS too: the record layer's writes are the socket's.
        let stream = SendDeadline::new(stream, send_timeout);
        let drain = open.watch();
        let acceptor = gw.tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    until_closed(conn.into_owned(), activity, idle_after, drain, peer).await
                }
                Some(acceptor) => {
                    // The handshake runs here, not in the accept loop, and is bounded so a
                    // silent client cannot hold a connection slot.
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let conn = builder.serve_connection(TokioIo::new(tls), svc);
                            until_closed(conn.into_owned(), activity, idle_after, drain, peer).await
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
    // Closing our copy of the socket; the kernel refuses new connections once every
    // serving thread has closed its own.
    drop(listener);
    open
}

/// A serving thread's open connections: each holds a watch on this, which it keeps until it
/// has closed.
///
/// hyper-util's `GracefulShutdown` works the same way, but only closes connections when the
/// whole thread drains; a connection here is also closed on its own when idle.
#[derive(Default)]
struct OpenConnections(watch::Sender<()>);

impl OpenConnections {
    /// A watch for one connection.
    fn watch(&self) -> watch::Receiver<()> {
        self.0.subscribe()
    }
}

/// Serve `conn` until it ends.
///
/// It is asked to close gracefully, finishing the requests in progress, when no request has
/// been in progress for `idle_after` (counted from the first poll if none ever started) or
/// when the thread drains. An HTTP/2 client is then sent a GOAWAY, which tells it that no
/// request it sends from now on will be served, so it can retry them on a new connection
/// instead of losing them to a bare close. hyper closes such a connection only once the
/// client has answered the GOAWAY's ping; one that neither answers nor closes is cut after
/// a further `idle_after` with nothing in progress.
async fn until_closed<I, S, B>(
    conn: auto::Connection<'static, I, S, TokioExecutor>,
    activity: Activity,
    idle_after: Duration,
    mut drain: watch::Receiver<()>,
    peer: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
    >,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    tokio::pin!(conn);
    let idle = activity.clone().idle(idle_after);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => return served,
            why = &mut idle => {
                if closing {
                    tracing::debug!(%peer, "asked to close and still open with nothing in progress; cutting");
                    return Ok(());
                }
                match why {
                    Idle::Silent => tracing::debug!(%peer, "no request within the header read timeout; closing"),
                    Idle::Quiet => tracing::debug!(%peer, "idle for the header read timeout; closing"),
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
                // The grace for a client that does not answer the GOAWAY.
                idle.set(activity.clone().idle(idle_after));
            }
            _ = drain.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Let this thread's open connections finish, for up to the configured drain timeout.
async fn drain(gw: &Gateway, open: OpenConnections) {
    let OpenConnections(tx) = open;
    let _ = tx.send(());
    match tokio::time::timeout(gw.config().drain_timeout, tx.closed()).await {
        Ok(()) => tracing::info!("connections drained"),
        Err(_) => tracing::warn!("drain timeout reached; cutting the remaining connections"),
    }
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
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Requests one HTTP/2 connection may have in progress at once; the client holds back the
/// rest. Each may buffer a body of up to `max_body_bytes` before admission, so this keeps
/// one connection's share of memory near what as many HTTP/1 connections could take.
/// nginx's default; hyper's own (200) is not part of its stable behaviour.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinSet;

    use super::bind;

    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_for_a_retransmission() {
        // Nothing accepts, so every connection must fit in the backlog. With the 128 that
        // tokio's own `bind` asks for, the kernel drops the SYNs of the rest, and their
        // connects take the client's one-second retransmission.
        let listener = bind("127.0.0.1:0".parse().unwrap()).expect("bound");
        let addr = listener.local_addr().unwrap();
        // The kernel caps the backlog at net.core.somaxconn (4096 by default since Linux 5.4).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst = cap.min(300);
        let mut connects = JoinSet::new();
        for _ in 0..burst {
            connects.spawn(tokio::time::timeout(
                Duration::from_millis(700),
                tokio::net::TcpStream::connect(addr),
            ));
        }
        let mut open = Vec::new();
        let mut late = 0;
        while let Some(done) = connects.join_next().await {
            match done.expect("the connect task ran") {
                Ok(stream) => open.push(stream.expect("connected")),
                Err(_) => late += 1,
            }
        }
        assert_eq!(
            late, 0,
            "{late} of {burst} connects waited for a retransmission"
        );
        drop(listener);
    }
}
