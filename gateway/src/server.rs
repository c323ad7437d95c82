//! Accept: take connections, serve HTTP/1.1 and HTTP/2 on each, and shut down gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use crate::body::RequestBody;
use crate::discovery;
use crate::gated::Gated;
use crate::health::spawn_probers;
use crate::http1;
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
/// single-threaded runtime of its own.
///
/// A connection, its requests and the backend connections they use then stay on the
/// thread that serves it, the way nginx's worker processes work: no request pays for a
/// wake-up on another thread, which a shared multi-threaded runtime charges several times
/// per request. State that is shared (pools, queues, metrics) is behind locks and atomics
/// already; a queued request on one thread is handed a slot freed on another.
///
/// The caller's thread accepts every connection and deals each to the thread serving the
/// fewest. Left to the kernel, with every thread accepting from the socket, whichever
/// thread is already awake wins: in a burst of 64 connections one thread of two took 57
/// to 63 of them, and the other was left nearly idle.
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
    let threads = threads.max(1);
    let load = Arc::new(Load::new(threads));
    let mut others = Vec::new();
    let mut handoffs = Vec::new();
    for shard in 1..threads {
        let (tx, rx) = mpsc::unbounded_channel();
        // On an error the handoffs made so far are dropped, which ends their threads.
        others.push(spawn_shard(shard, rx, &gw)?);
        handoffs.push(tx);
    }
    let open = accept(listener, &gw, &load, handoffs, shutdown).await;
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

/// A connection accepted by the first thread, on its way to the thread that serves it.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    held: Held,
}

/// Start serving thread `shard`: it serves the connections it is handed on `rx` until the
/// accepting thread drops the sender, then returns once they have drained.
fn spawn_shard(
    shard: usize,
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    gw: &Arc<Gateway>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = runtime()?;
    let gw = gw.clone();
    std::thread::Builder::new()
        .name(format!("serve-{shard}"))
        .spawn(move || {
            crate::forward::set_shard(shard);
            rt.block_on(async move {
                let open = OpenConnections::default();
                let served = served_counter(&gw, shard);
                // Ends when the sender is dropped, after every connection already handed
                // over: none is lost to shutdown.
                while let Some(h) = rx.recv().await {
                    match TcpStream::from_std(h.stream) {
                        Ok(stream) => spawn_connection(stream, h.peer, h.permit, h.held, &gw, &open, &served),
                        Err(err) => {
                            tracing::warn!(shard, error = %err, "a serving thread cannot take a connection")
                        }
                    }
                }
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

/// How many connections each serving thread holds open, to deal new ones evenly.
struct Load {
    open: Vec<AtomicUsize>,
}

impl Load {
    fn new(threads: usize) -> Self {
        Load {
            open: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// The thread with the fewest open connections, counted as holding one more until the
    /// returned guard is dropped. Ties go round from `turn`, so that short connections
    /// spread too.
    fn pick(self: &Arc<Self>, turn: &mut usize) -> Held {
        let n = self.open.len();
        *turn = (*turn + 1) % n;
        let shard = (0..n)
            .map(|i| (*turn + i) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.open[shard].fetch_add(1, Ordering::Relaxed);
        Held {
            load: self.clone(),
            shard,
        }
    }
}

/// One connection counted against its serving thread.
struct Held {
    load: Arc<Load>,
    shard: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.load.open[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept connections until `stop` resolves, serving the first thread's share here and
/// handing the rest to the other threads; the returned handle closes the connections
/// still open on this thread.
async fn accept(
    listener: TcpListener,
    gw: &Arc<Gateway>,
    load: &Arc<Load>,
    handoffs: Vec<mpsc::UnboundedSender<Handoff>>,
    stop: impl Future<Output = ()>,
) -> OpenConnections {
    let open = OpenConnections::default();
    let served = served_counter(gw, 0);
    let mut turn = 0;
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
        let Ok(permit) = gw.connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let held = load.pick(&mut turn);
        let Some(handoff) = held.shard.checked_sub(1).and_then(|i| handoffs.get(i)) else {
            spawn_connection(stream, peer, permit, held, gw, &open, &served);
            continue;
        };
        // Out of this thread's event loop, into the other's.
        match stream.into_std() {
            Ok(stream) => {
                let handed = handoff.send(Handoff {
                    stream,
                    peer,
                    permit,
                    held,
                });
                if handed.is_err() {
                    tracing::error!("a serving thread has stopped; a connection was closed");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot hand a connection over"),
        }
    }
    // Closing the socket: the kernel refuses new connections from here on. Dropping the
    // handoffs lets the other threads drain once they have taken what was handed to them.
    drop(listener);
    drop(handoffs);
    open
}

/// The count of connections served by thread `shard`.
fn served_counter(gw: &Gateway, shard: usize) -> prometheus::IntCounter {
    gw.metrics
        .server
        .connections
        .with_label_values(&[&shard.to_string()])
}

/// Serve one connection on a task of the current thread.
fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    held: Held,
    gw: &Arc<Gateway>,
    open: &OpenConnections,
    served: &prometheus::IntCounter,
) {
    served.inc();
    // Tokens are small writes; never let Nagle hold one back.
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let gw2 = gw.clone();
    let activity2 = activity.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // Counted from here until the response body is dropped, so that a long stream
        // keeps its connection from counting as idle.
        let progress = activity2.start();
        let gw = gw2.clone();
        async move {
            let resp = handle(gw, req.map(RequestBody::Hyper), peer).await;
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, progress)))
        }
    });
    // Built per connection from the config in force, so a reload's limits apply to
    // new connections.
    let cfg = gw.config();
    let builder = connection_builder(&cfg);
    let send_timeout = cfg.send_timeout;
    let limits = http1::Limits {
        max_head: cfg.max_header_bytes,
        header_read_timeout: cfg.header_read_timeout,
    };
    drop(cfg);
    // Under TLS too: the record layer's writes are the socket's.
    let stream = SendDeadline::new(stream, send_timeout);
    let acceptor = gw.tls.as_ref().map(|t| t.acceptor());
    let conn = Conn {
        gw: gw.clone(),
        peer,
        svc,
        builder,
        activity,
        limits,
        drain: open.watch(),
    };
    tokio::spawn(async move {
        let served = match acceptor {
            None => conn.serve(stream).await,
            Some(acceptor) => {
                // The handshake runs here, not in the accept loop, and is bounded so a
                // silent client cannot hold a connection slot.
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => conn.serve(tls).await,
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
        drop(held);
    });
}

/// What serving one connection takes, over TCP or TLS.
struct Conn<S> {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    /// hyper's service, for HTTP/2.
    svc: S,
    builder: http2::Builder<TokioExecutor>,
    /// The requests in progress on an HTTP/2 connection, for its idle timeout.
    activity: Activity,
    limits: http1::Limits,
    drain: watch::Receiver<()>,
}

impl<S, B> Conn<S>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Serve `io`: HTTP/1.1 on the gateway's own server side, HTTP/2 on hyper's.
    async fn serve<IO>(self, mut io: IO) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            gw,
            peer,
            svc,
            builder,
            activity,
            limits,
            drain,
        } = self;
        // Counted from here, after any TLS handshake, as hyper counts its header timeout.
        let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
        match sniff(&mut io, deadline).await {
            Sniffed::Http1(buf) => {
                let handler = move |req| handle(gw.clone(), req, peer);
                // Boxed, as is hyper's below: the task's future is then a few words, not the
                // largest of the two, which spawning it would otherwise copy several times.
                Box::pin(http1::serve(io, buf, limits, deadline, drain, handler))
                    .await
                    .map_err(Into::into)
            }
            Sniffed::Http2(seen) => {
                let io = TokioIo::new(Rewind::new(seen, io));
                let conn = builder.serve_connection(io, svc);
                let idle_after = limits.header_read_timeout;
                Box::pin(until_closed(conn, activity, idle_after, drain, peer)).await
            }
            Sniffed::Nothing => Ok(()),
        }
    }
}

/// What a connection's first bytes say it speaks.
enum Sniffed {
    /// Anything but the HTTP/2 preface: HTTP/1, with the bytes read so far.
    Http1(BytesMut),
    /// HTTP/2 with prior knowledge: the preface, to be read again by hyper.
    Http2(Bytes),
    /// Closed, failed, or silent until `deadline`.
    Nothing,
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read until the connection's first bytes tell HTTP/1 from HTTP/2. Nearly always the first
/// read decides: only a client that stops inside a prefix of the preface is waited for,
/// until `deadline`.
async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO, deadline: tokio::time::Instant) -> Sniffed {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Sniffed::Http1(buf);
        }
        if n == H2_PREFACE.len() {
            return Sniffed::Http2(buf.freeze());
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return Sniffed::Nothing,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection whose first bytes, already read, are read again before the rest.
    struct Rewind<T> {
        seen: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    fn new(seen: Bytes, inner: T) -> Self {
        Rewind { seen, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if !this.seen.is_empty() {
            let n = this.seen.len().min(buf.remaining());
            buf.put_slice(&this.seen.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
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
    conn: http2::Connection<I, S, TokioExecutor>,
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
    // The idle timer and the drain signal are polled only when they woke the task, not each
    // time the connection did (once per relayed token).
    let idle = Gated::new(activity.clone().idle(idle_after));
    tokio::pin!(idle);
    let drained = Gated::new(drain.changed());
    tokio::pin!(drained);
    let mut closing = false;
    loop {
        tokio::select! {
            // In this order, without drawing a random one each poll: the other two are
            // ready once in a connection's life.
            biased;
            served = conn.as_mut() => return served.map_err(Into::into),
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
                idle.set(Gated::new(activity.clone().idle(idle_after)));
            }
            _ = &mut drained, if !closing => {
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

/// HTTP/2 settings for one client connection (HTTP/1.1 is [`http1`]'s, with its [`http1::Limits`]).
fn connection_builder(cfg: &crate::config::Config) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
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
    use super::bind;

    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_for_a_retransmission() {
        // Nothing accepts, so every connection must fit in the backlog. With the 128 that
        // tokio's own `bind` asks for, the kernel drops the SYNs of the rest, and their
        // connects take the client's one-second retransmission.
        let listener = bind("127.0.0.1:0".parse().unwrap()).expect("bound");
        let addr = listener.local_addr().unwrap();
        let late = testkit::backlog::connects_left_waiting(addr, 300).await;
        assert_eq!(late, 0, "{late} connects waited for a retransmission");
        drop(listener);
    }
}
