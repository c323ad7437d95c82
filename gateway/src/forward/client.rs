//! The HTTP/1.1 client for the backends: keep-alive connections, one idle list per origin,
//! and no task of its own.
//!
//! The request's task writes the request and reads the response head, and the response
//! body ([`UpstreamBody`]) reads the backend's socket itself whenever the relay polls it.
//! A streamed token therefore costs one read and one write in one poll of one task, as in
//! an event-driven proxy. A client built on a connection task costs three: the connection
//! task reads, hands the data over a channel to the task that writes it to the client, and
//! is woken again when the channel empties. [`h1`](super::h1) does the framing.
//!
//! A connection goes back to its origin's idle list when its body has been read to the end;
//! a body dropped before its end closes the connection instead, which is how a backend
//! learns that the client went away. An idle connection is checked before it is reused
//! (without waiting, and usually without a system call); one that still turns out closed
//! when the request is written is replaced by a new one and the request written again:
//! the backend closed it while it sat idle, so it never read the request.
//!
//! With several serving threads ([`set_shard`]), each keeps idle lists of its own: a
//! socket's readiness is reported to the runtime that registered it, so a connection used
//! on another thread would cost a cross-thread wake-up for every read.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::h1::{self, Decoder, FramingError, Step};
use crate::fasthash::FastHash;

/// Room made in a connection's read buffer before each read.
const READ_SIZE: usize = 16 * 1024;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL has no scheme or host.
    #[error("the backend URL {0} has no scheme or host")]
    InvalidUri(Uri),
    /// No connection could be opened (TCP or TLS).
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    /// The connection failed before a response head arrived.
    #[error("request failed")]
    Send(#[source] io::Error),
    /// The backend answered with something that is not an HTTP/1.1 response head.
    #[error("invalid response")]
    Response(#[source] FramingError),
}

/// Why a response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the connection failed.
    #[error("reading the backend's response failed")]
    Io(#[source] io::Error),
    /// The body's framing was broken, or the connection ended before it did.
    #[error(transparent)]
    Framing(#[from] FramingError),
}

/// One backend's scheme and authority, on one serving thread: connections are shared only
/// within it.
#[derive(Debug, Clone)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
    shard: usize,
}

// By the authority's exact text. `Authority`'s own comparison and hash ignore case byte by
// byte, about a third of the cost of finding a pool; a backend's URI is the same text on
// every request, and two spellings of one host only make two pools.
impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.shard == other.shard
            && self.authority.as_str() == other.authority.as_str()
            && self.scheme == other.scheme
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.authority.as_str().as_bytes());
        state.write_usize(self.shard);
    }
}

thread_local! {
    /// The serving thread this is, for [`Origin::shard`]; 0 unless [`set_shard`] said.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Mark the current thread as serving thread `n`, whose backend connections are its own.
pub fn set_shard(n: usize) {
    SHARD.with(|s| s.set(n));
}

/// A connection to a backend, in the clear or over TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection and the bytes read from it that nothing has consumed yet.
struct Conn {
    io: Stream,
    buf: BytesMut,
}

impl Conn {
    /// Whether an idle connection can carry a request: still open, and nothing arrived on
    /// it that no request asked for. Looks without waiting (and, unless the socket has
    /// reported something, without a system call).
    fn is_open_and_quiet(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Write the request: `head`, then `body` when it was not written into the head.
    async fn send(&mut self, head: &[u8], body: Option<&[u8]>) -> io::Result<()> {
        self.io.write_all(head).await?;
        if let Some(body) = body {
            self.io.write_all(body).await?;
        }
        self.io.flush().await
    }

    /// Read the final response head, skipping interim (1xx) ones.
    async fn read_head(&mut self, method: &Method) -> Result<h1::Head, Failure> {
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                received = true;
                let parsed = h1::parse_response(&self.buf, method).map_err(Failure::Response)?;
                if let Some((head, len)) = parsed {
                    self.buf.advance(len);
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Failure::Response(FramingError::Head(
                            "the backend switched protocols",
                        )));
                    }
                    if !head.status.is_informational() {
                        return Ok(head);
                    }
                    // An interim answer (100 Continue, 103 Early Hints): the final one follows.
                    continue;
                }
            }
            self.buf.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    let what = if received {
                        "the backend closed the connection in the middle of the response head"
                    } else {
                        "the backend closed the connection without answering"
                    };
                    return Err(Failure::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        what,
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }
}

/// How one attempt at a request failed.
enum Failure {
    /// Writing the request failed: the backend closed the connection before reading it.
    /// On a reused connection that means it closed it while idle, so sending the request
    /// again on another connection cannot run it twice. (A request written in full and
    /// then left unanswered is not sent again: the backend may have started on it.)
    Unsent(io::Error),
    Io(io::Error),
    Response(FramingError),
}

/// An origin's idle connections, newest last, and its `Host` header value.
struct OriginPool {
    host: HeaderValue,
    idle: Vec<Idle>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Every origin's idle list, and when they were last swept.
struct Pools {
    by_origin: HashMap<Origin, OriginPool, FastHash>,
    swept: Instant,
}

impl Pools {
    /// `origin`'s idle list, made empty if it has none.
    fn of(&mut self, origin: &Origin) -> &mut OriginPool {
        self.by_origin
            .entry(origin.clone())
            .or_insert_with(|| OriginPool {
                host: host_header(origin),
                idle: Vec::new(),
            })
    }

    /// Close the connections idle for `idle_timeout` or longer, in every origin, once per
    /// `idle_timeout`. Without it a backend that went away (restarted on another port,
    /// removed from the configuration) would keep its last idle connections, and their
    /// descriptors, for as long as the gateway runs: nothing else looks at its list again.
    fn sweep(&mut self, now: Instant, idle_timeout: Duration) {
        if now.duration_since(self.swept) < idle_timeout {
            return;
        }
        self.swept = now;
        self.by_origin.retain(|_, pool| {
            pool.idle
                .retain(|i| now.duration_since(i.since) < idle_timeout);
            !pool.idle.is_empty()
        });
    }
}

struct Shared {
    tls: TlsConnector,
    connect_timeout: Duration,
    pools: Mutex<Pools>,
    idle_timeout: Duration,
}

impl Shared {
    /// The idle lists, swept first if a sweep is due.
    fn pools(&self, now: Instant) -> std::sync::MutexGuard<'_, Pools> {
        // The lists hold no invariant a panicking holder could break halfway.
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.sweep(now, self.idle_timeout);
        pools
    }

    /// The newest idle connection to `origin` that is still usable, and the `Host` value.
    fn checkout(&self, origin: &Origin) -> (Option<Conn>, HeaderValue) {
        let now = Instant::now();
        let mut pools = self.pools(now);
        let pool = pools.of(origin);
        while let Some(mut idle) = pool.idle.pop() {
            if now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_open_and_quiet() {
                return (Some(idle.conn), pool.host.clone());
            }
        }
        (None, pool.host.clone())
    }

    fn check_in(&self, origin: &Origin, conn: Conn) {
        let now = Instant::now();
        let mut pools = self.pools(now);
        let pool = pools.of(origin);
        // The oldest come first: drop the ones the backend is about to close anyway.
        let stale = pool
            .idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
            .count();
        pool.idle.drain(..stale);
        pool.idle.push(Idle { conn, since: now });
    }

    /// Open a connection to `origin`, TLS included, within the connect timeout.
    async fn connect(&self, origin: &Origin) -> io::Result<Conn> {
        let https = origin.scheme == Scheme::HTTPS;
        let host = origin.authority.host();
        // An IPv6 literal is bracketed in a URL, not in an address.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = origin
            .authority
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let open = async {
            let tcp = TcpStream::connect((host, port)).await?;
            // Tokens are small writes; Nagle would hold each one back waiting for an ACK.
            tcp.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
            socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
            if !https {
                return Ok::<_, io::Error>(Stream::Plain(tcp));
            }
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = self.tls.connect(name, tcp).await?;
            Ok(Stream::Tls(Box::new(tls)))
        };
        let io = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )
            })??;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }
}

/// The client used for every backend (and its probes).
pub struct UpstreamClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// A client that reaches `https://` backends with `tls`, gives up connecting after
    /// `connect_timeout`, and closes connections idle for `idle_timeout`.
    pub fn new(tls: TlsConnector, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        UpstreamClient {
            shared: Arc::new(Shared {
                tls,
                connect_timeout,
                pools: Mutex::new(Pools {
                    by_origin: HashMap::default(),
                    swept: Instant::now(),
                }),
                idle_timeout,
            }),
        }
    }

    /// Send `req` to the absolute URI it carries; resolves with the response head.
    ///
    /// `Content-Length` comes from the body, and `Host` from the URI unless the request
    /// has one.
    pub async fn request(
        &self,
        req: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let (Some(scheme), Some(authority)) = (parts.uri.scheme(), parts.uri.authority()) else {
            return Err(UpstreamError::InvalidUri(parts.uri));
        };
        let origin = Origin {
            scheme: scheme.clone(),
            authority: authority.clone(),
            shard: SHARD.with(std::cell::Cell::get),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let (mut idle, host) = self.shared.checkout(&origin);
        let mut head = BytesMut::new();
        let inline =
            h1::encode_request(&parts.method, path, &parts.headers, &host, &body, &mut head);
        let rest = (!inline).then_some(&body[..]);
        loop {
            let reused = idle.is_some();
            let mut conn = match idle.take() {
                Some(conn) => conn,
                // Boxed: connecting is rare, and its future is most of this one's size,
                // which every request's future would otherwise carry and move.
                None => Box::pin(self.shared.connect(&origin))
                    .await
                    .map_err(UpstreamError::Connect)?,
            };
            let answered = match conn.send(&head, rest).await {
                Ok(()) => conn.read_head(&parts.method).await,
                Err(e) => Err(Failure::Unsent(e)),
            };
            match answered {
                Ok(head) => {
                    let mut body = UpstreamBody {
                        decoder: Decoder::new(head.framing),
                        keep_alive: head.keep_alive,
                        conn: Some(conn),
                        home: Some((self.shared.clone(), origin)),
                    };
                    body.release_if_done();
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                Err(Failure::Unsent(err)) if reused => {
                    tracing::debug!(error = %err, "idle backend connection closed; reconnecting");
                    idle = self.shared.checkout(&origin).0;
                }
                Err(Failure::Unsent(err) | Failure::Io(err)) => {
                    return Err(UpstreamError::Send(err))
                }
                Err(Failure::Response(err)) => return Err(UpstreamError::Response(err)),
            }
        }
    }
}

/// `Host` for an origin: the host, and the port unless it is the scheme's default.
fn host_header(origin: &Origin) -> HeaderValue {
    let default_port = if origin.scheme == Scheme::HTTPS {
        443
    } else {
        80
    };
    let host = origin.authority.host();
    let value = match origin.authority.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value).expect("a URI host is a valid header value")
}

/// A backend's response body, read from the connection as it is polled. Read to its end,
/// it returns the connection to the idle list; dropped before, it closes it.
pub struct UpstreamBody {
    /// `None` once the connection went back to the idle list or was closed.
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    home: Option<(Arc<Shared>, Origin)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("decoder", &self.decoder)
            .field("keep_alive", &self.keep_alive)
            .field("open", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn release_if_done(&mut self) {
        if !self.decoder.is_done() {
            return;
        }
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes after the end of the body belong to no request: the connection is unusable.
        if self.keep_alive && conn.buf.is_empty() {
            if let Some((shared, origin)) = self.home.take() {
                shared.check_in(&origin, conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let step = match this.conn.as_mut() {
                Some(conn) => this.decoder.decode(&mut conn.buf),
                None => return Poll::Ready(None),
            };
            match step {
                Ok(Step::Data(data)) => {
                    this.release_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Done) => {
                    this.release_if_done();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(err) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(err.into())));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Pieces handed on were split off the buffer (`h1::take`). An empty buffer that
            // cannot take its memory back is still shared with one of them: its taker
            // keeps pieces past a read, so copy them from now on rather than allocate a
            // new buffer for every read. (A token stream's reads bring whole chunks, so
            // the buffer is empty between them; one that never empties keeps splitting,
            // and a taker that holds pieces then costs an allocation per read.)
            if conn.buf.is_empty()
                && conn.buf.capacity() > 0
                && this.decoder.splits_small_pieces()
                && !conn.buf.try_reclaim(READ_SIZE)
            {
                this.decoder.copy_small_pieces();
            }
            conn.buf.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    // Whatever the framing, a closed connection carries nothing more.
                    this.conn = None;
                    return match this.decoder.eof() {
                        Ok(_) => Poll::Ready(None),
                        Err(err) => Poll::Ready(Some(Err(err.into()))),
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Io(err))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body of known length may be dropped right after its last byte, unpolled for
        // its end; anything short of the end closes the connection with the drop.
        self.release_if_done();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// What the test backend does after answering a request.
    #[derive(Clone, Copy)]
    enum After {
        KeepOpen,
        /// Close the connection this long after the answer, as an idle timeout would.
        CloseAfter(Duration),
    }

    /// A backend that answers every request on a connection with `body`, counting the
    /// connections it accepts.
    async fn backend(body: &'static str, after: After) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = sock.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            if sock.write_all(head.as_bytes()).await.is_err()
                                || sock.write_all(body.as_bytes()).await.is_err()
                            {
                                return;
                            }
                            if let After::CloseAfter(pause) = after {
                                tokio::time::sleep(pause).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/v1/x").parse().unwrap(), accepted)
    }

    fn client() -> UpstreamClient {
        let tls = crate::tls::upstream_tls(None).expect("the system roots");
        UpstreamClient::new(tls, Duration::from_secs(2), Duration::from_secs(4))
    }

    fn get(uri: &Uri) -> Request<Bytes> {
        Request::get(uri.clone()).body(Bytes::new()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_carries_the_next_request() {
        let (uri, accepted) = backend("hello", After::KeepOpen).await;
        let client = client();
        for _ in 0..3 {
            let resp = client.request(get(&uri)).await.expect("answered");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (uri, accepted) = backend("hello", After::KeepOpen).await;
        let client = client();
        drop(client.request(get(&uri)).await.expect("answered"));
        let resp = client.request(get(&uri)).await.expect("answered");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_while_idle_is_replaced_unseen() {
        let pause = Duration::from_millis(20);
        let (uri, accepted) = backend("hello", After::CloseAfter(pause)).await;
        let client = client();
        for round in 1..=3 {
            let resp = client.request(get(&uri)).await.expect("answered");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello");
            assert_eq!(accepted.load(Ordering::SeqCst), round);
            // Back in the idle list while still open; closed by the backend meanwhile.
            tokio::time::sleep(pause * 3).await;
        }
    }

    /// A backend that answers the n-th request it reads (over all connections) with
    /// `replies[n]`, written in pieces of `piece` bytes with a pause between them, and
    /// keeps every request it read. Closes a connection after a reply that says so.
    async fn scripted(
        replies: Vec<&'static [u8]>,
        piece: usize,
    ) -> (Uri, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), seen.clone());
        let replies = Arc::new(replies);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (log, replies) = (log.clone(), replies.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: the head, then Content-Length bytes of body.
                        let end = loop {
                            if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break e + 4;
                            }
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + len {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let request: Vec<u8> = buf.drain(..end + len).collect();
                        let reply = {
                            let mut log = log.lock().unwrap();
                            log.push(request);
                            replies[(log.len() - 1) % replies.len()]
                        };
                        for part in reply.chunks(piece) {
                            if sock.write_all(part).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        let lower = String::from_utf8_lossy(reply).to_lowercase();
                        if lower.contains("connection: close") {
                            return;
                        }
                    }
                });
            }
        });
        (
            format!("http://{addr}/v1/x").parse().unwrap(),
            accepted,
            seen,
        )
    }

    /// The body's frames as they came, and their bytes joined.
    async fn frames(resp: Response<UpstreamBody>) -> (usize, Vec<u8>) {
        let mut body = resp.into_body();
        let (mut n, mut all) = (0, Vec::new());
        while let Some(frame) = body.frame().await {
            n += 1;
            all.extend_from_slice(&frame.expect("a good body").into_data().unwrap());
        }
        (n, all)
    }

    /// Reads a chunked stream of 24 chunks of 1,000 bytes, sent a chunk at a time as a token
    /// stream is, keeping every frame (as a queued writer does) or dropping each at once
    /// (as the gateway's own HTTP/1 server does). Returns whether the body still split
    /// pieces off at the end. 24 KB of pieces outgrow the room the read buffer has beyond
    /// the 16 KiB one read asks for, so it must take its memory back at least once.
    async fn read_keeping(keep: bool) -> bool {
        const CHUNK: usize = 1000;
        const FRAMED: usize = CHUNK + 7; // "3e8\r\n", the data, "\r\n"
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx: \r\n\r\n";
        // Padded to one framed chunk, so that every piece sent is a whole chunk.
        let mut stream = head[..head.len() - 4].to_vec();
        stream.resize(FRAMED - 4, b'p');
        stream.extend_from_slice(b"\r\n\r\n");
        let mut want = Vec::new();
        for i in 0..24u8 {
            let data = vec![b'a' + i; CHUNK];
            stream.extend_from_slice(format!("{CHUNK:x}\r\n").as_bytes());
            stream.extend_from_slice(&data);
            stream.extend_from_slice(b"\r\n");
            want.extend_from_slice(&data);
        }
        stream.extend_from_slice(b"0\r\n\r\n");
        let (uri, _, _) = scripted(vec![Box::leak(stream.into_boxed_slice())], FRAMED).await;
        let resp = client().request(get(&uri)).await.expect("answered");
        let mut body = resp.into_body();
        let (mut kept, mut all) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let data = frame.expect("a good body").into_data().unwrap();
            all.extend_from_slice(&data);
            if keep {
                kept.push(data);
            }
        }
        assert_eq!(all, want);
        body.decoder.splits_small_pieces()
    }

    #[tokio::test]
    async fn pieces_are_split_off_while_their_taker_lets_go_and_copied_once_it_keeps_them() {
        assert!(
            read_keeping(false).await,
            "pieces let go of: still split off"
        );
        assert!(
            !read_keeping(true).await,
            "pieces kept: copied from then on"
        );
    }

    #[tokio::test]
    async fn a_chunked_stream_arrives_as_it_is_sent_and_its_connection_is_reused() {
        const STREAM: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
            f\r\ndata: one\n\ndata\r\n7\r\n: two\n\n\r\n0\r\n\r\n";
        let (uri, accepted, seen) = scripted(vec![STREAM], 7).await;
        let client = client();
        for _ in 0..2 {
            let req = Request::post(uri.clone())
                .header("content-type", "application/json")
                .body(Bytes::from_static(b"{\"stream\":true}"))
                .unwrap();
            let resp = client.request(req).await.expect("answered");
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            let (n, body) = frames(resp).await;
            assert_eq!(body, b"data: one\n\ndata: two\n\n");
            // Sent in 7-byte pieces with pauses: more than one frame per chunk.
            assert!(n > 2, "{n} frames");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let first = String::from_utf8(seen.lock().unwrap()[0].clone()).unwrap();
        let host = uri.authority().unwrap().as_str();
        assert!(
            first.starts_with(&format!("POST /v1/x HTTP/1.1\r\nhost: {host}\r\n")),
            "{first}"
        );
        assert!(
            first.ends_with("content-length: 15\r\n\r\n{\"stream\":true}"),
            "{first}"
        );
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_connection_close_is_obeyed() {
        const REPLY: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
        let (uri, accepted, _) = scripted(vec![REPLY], 1000).await;
        let client = client();
        for round in 1..=2 {
            let resp = client.request(get(&uri)).await.expect("answered");
            assert_eq!(resp.status(), 200);
            assert_eq!(frames(resp).await.1, b"ok");
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_body_until_close_ends_with_the_connection() {
        const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it";
        let (uri, _, _) = scripted(vec![REPLY], 3).await;
        let resp = client().request(get(&uri)).await.expect("answered");
        assert_eq!(frames(resp).await.1, b"all of it");
    }

    #[tokio::test]
    async fn a_broken_answer_is_an_error_not_a_body() {
        const GARBAGE: &[u8] = b"SSH-2.0-OpenSSH_9.2\r\n\r\n";
        let (uri, _, _) = scripted(vec![GARBAGE], 1000).await;
        let err = client().request(get(&uri)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Response(_)), "{err:?}");

        const CUT: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel\r\nconnection: close";
        let (uri, accepted, _) = scripted(vec![CUT], 1000).await;
        let client = client();
        let resp = client.request(get(&uri)).await.expect("a head");
        let mut body = resp.into_body();
        let mut err = None;
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                err = Some(e);
                break;
            }
        }
        assert!(err.is_some(), "a chunk cut short must fail the body");
        drop(body);
        // The broken connection is not reused.
        let _ = client.request(get(&uri)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_of_a_backend_no_longer_used_are_closed() {
        let (a, _) = backend("a", After::KeepOpen).await;
        let (b, _) = backend("b", After::KeepOpen).await;
        let tls = crate::tls::upstream_tls(None).expect("the system roots");
        let idle_timeout = Duration::from_millis(50);
        let client = UpstreamClient::new(tls, Duration::from_secs(2), idle_timeout);
        let idle_to = |uri: &Uri| {
            let pools = client.shared.pools.lock().unwrap();
            pools
                .by_origin
                .iter()
                .filter(|(o, _)| Some(&o.authority) == uri.authority())
                .map(|(_, p)| p.idle.len())
                .sum::<usize>()
        };
        let resp = client.request(get(&a)).await.expect("answered");
        resp.into_body().collect().await.unwrap();
        assert_eq!(idle_to(&a), 1);
        // Only b is used from now on; a's connection goes with the first sweep due.
        tokio::time::sleep(idle_timeout * 2).await;
        let resp = client.request(get(&b)).await.expect("answered");
        resp.into_body().collect().await.unwrap();
        assert_eq!((idle_to(&a), idle_to(&b)), (0, 1));
    }

    #[test]
    fn host_header_names_the_port_only_when_it_is_not_the_default() {
        let of = |s: &str| {
            let uri: Uri = s.parse().unwrap();
            host_header(&Origin {
                scheme: uri.scheme().unwrap().clone(),
                authority: uri.authority().unwrap().clone(),
                shard: 0,
            })
        };
        assert_eq!(of("http://10.0.0.1:8080/x"), "10.0.0.1:8080");
        assert_eq!(of("http://backend:80/"), "backend");
        assert_eq!(of("https://backend:443/"), "backend");
        assert_eq!(of("https://backend:80/"), "backend:80");
        assert_eq!(of("http://[::1]:9000/"), "[::1]:9000");
    }

    #[test]
    fn a_request_future_does_not_carry_the_connect_future() {
        // Every request's future is moved as it is built; connecting (rare) is boxed so
        // that its few kilobytes are not part of it. Unboxed, this was 3,232 bytes.
        let c = client();
        let origin = Origin {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("127.0.0.1:1"),
            shard: 0,
        };
        let connect = c.shared.connect(&origin);
        let request = c.request(Request::new(Bytes::new()));
        let (connect, request) = (size_of_val(&connect), size_of_val(&request));
        assert!(
            request < connect,
            "request future {request} bytes, connect {connect}"
        );
    }
}
