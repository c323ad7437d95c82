//! The HTTP/1.1 client for the backends: keep-alive connections, one idle list per origin.
//!
//! A connection is taken from its origin's idle list for one request and goes back when
//! that response's body has been read to the end, by the body itself ([`UpstreamBody`]),
//! so no task per request watches for it. A body dropped before its end closes the
//! connection instead, which is how a backend learns that the client went away.
//!
//! A request that a reused connection turns out unable to carry (the backend closed it
//! while it sat idle) is returned unsent by hyper and tried once more on a new connection.
//!
//! With several serving threads ([`set_shard`]), each thread keeps idle lists of its own:
//! a connection's task runs on the thread that opened it, so a request never hands its
//! bytes to another thread and back.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::fasthash::FastHash;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL has no scheme or host.
    #[error("the backend URL {0} has no scheme or host")]
    InvalidUri(Uri),
    /// No connection could be opened.
    #[error("cannot connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before a response head arrived.
    #[error("request failed")]
    Send(#[source] hyper::Error),
}

/// One backend's scheme and authority, on one serving thread: connections are shared only
/// within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
    shard: usize,
}

thread_local! {
    /// The serving thread this is, for [`Origin::shard`]; 0 unless [`set_shard`] said.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Mark the current thread as serving thread `n`, whose backend connections are its own.
pub fn set_shard(n: usize) {
    SHARD.with(|s| s.set(n));
}

/// An origin's idle connections, newest last, and its `Host` header value.
struct OriginPool {
    host: HeaderValue,
    idle: Vec<Idle>,
}

struct Idle {
    conn: SendRequest<Full<Bytes>>,
    since: Instant,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    origins: Mutex<HashMap<Origin, OriginPool, FastHash>>,
    idle_timeout: Duration,
}

impl Shared {
    fn origins(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, OriginPool, FastHash>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest idle connection to `origin` that is still open, and the `Host` value.
    fn checkout(&self, origin: &Origin) -> (Option<SendRequest<Full<Bytes>>>, HeaderValue) {
        let mut origins = self.origins();
        let pool = origins.entry(origin.clone()).or_insert_with(|| OriginPool {
            host: host_header(origin),
            idle: Vec::new(),
        });
        let now = Instant::now();
        while let Some(idle) = pool.idle.pop() {
            if !idle.conn.is_closed() && now.duration_since(idle.since) < self.idle_timeout {
                return (Some(idle.conn), pool.host.clone());
            }
        }
        (None, pool.host.clone())
    }

    fn check_in(&self, origin: &Origin, conn: SendRequest<Full<Bytes>>) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut origins = self.origins();
        if let Some(pool) = origins.get_mut(origin) {
            // The oldest come first: drop the ones the backend is about to close anyway.
            let stale = pool
                .idle
                .iter()
                .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
                .count();
            pool.idle.drain(..stale);
            pool.idle.push(Idle { conn, since: now });
        }
    }

    async fn connect(&self, uri: Uri) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let io = self
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(UpstreamError::Connect)?;
        let (conn, driver) = http1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(err) = driver.await {
                tracing::debug!(error = %err, "backend connection ended with an error");
            }
        });
        Ok(conn)
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
    /// A client that connects with `connector` and closes connections idle for
    /// `idle_timeout`.
    pub fn new(connector: HttpsConnector<HttpConnector>, idle_timeout: Duration) -> Self {
        UpstreamClient {
            shared: Arc::new(Shared {
                connector,
                origins: Mutex::new(HashMap::default()),
                idle_timeout,
            }),
        }
    }

    /// Send `req` to the absolute URI it carries; resolves with the response head.
    pub async fn request(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(UpstreamError::InvalidUri(uri));
        };
        let origin = Origin {
            scheme: scheme.clone(),
            authority: authority.clone(),
            shard: SHARD.with(std::cell::Cell::get),
        };
        let (idle, host) = self.shared.checkout(&origin);
        req.headers_mut().entry(header::HOST).or_insert(host);
        // The request line carries the path only: the connection already names the host.
        *req.uri_mut() = Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let mut reused = idle;
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(mut conn) => {
                    // A reused connection is ready once it has finished reading its
                    // previous response, which is at most a moment away; one that was
                    // closed meanwhile says so here.
                    if let Err(err) = conn.ready().await {
                        tracing::debug!(error = %err, "idle backend connection closed; reconnecting");
                        reused = self.shared.checkout(&origin).0;
                        continue;
                    }
                    conn
                }
                // A new connection takes its first request before its task has run. Boxed:
                // connecting is rare, and its future is most of this one's size, which every
                // request's future would otherwise carry and move.
                None => Box::pin(self.shared.connect(uri.clone())).await?,
            };
            let sent = conn.try_send_request(req).await;
            match sent {
                Ok(resp) => {
                    let slot = Some((self.shared.clone(), origin, conn));
                    return Ok(resp.map(|inner| UpstreamBody {
                        inner,
                        conn: slot,
                        ended: false,
                    }));
                }
                Err(mut err) => match err.take_message() {
                    // Never written: safe to send again, on another connection.
                    Some(unsent) if was_reused => {
                        tracing::debug!(error = %err.error(), "idle backend connection failed before sending; reconnecting");
                        req = unsent;
                        reused = self.shared.checkout(&origin).0;
                    }
                    _ => return Err(UpstreamError::Send(err.into_error())),
                },
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

/// A backend's response body. Read to its end, it returns its connection to the idle list.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<(Arc<Shared>, Origin, SendRequest<Full<Bytes>>)>,
    ended: bool,
}

impl UpstreamBody {
    fn release_if_ended(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            if let Some((shared, origin, conn)) = self.conn.take() {
                shared.check_in(&origin, conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                self.ended = true;
                self.release_if_ended();
            }
            // A failed body leaves the connection unusable: dropping it closes it.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body of known length may be dropped right after its last byte, unpolled for
        // its end; anything short of the end closes the connection with the drop.
        self.release_if_ended();
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
        let connector =
            crate::tls::https_connector(HttpConnector::new(), None).expect("a plain connector");
        UpstreamClient::new(connector, Duration::from_secs(4))
    }

    fn get(uri: &Uri) -> Request<Full<Bytes>> {
        Request::get(uri.clone()).body(Full::default()).unwrap()
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
        let connect = c.shared.connect("http://127.0.0.1:1".parse().unwrap());
        let request = c.request(Request::new(Full::new(Bytes::new())));
        let (connect, request) = (size_of_val(&connect), size_of_val(&request));
        assert!(
            request < connect,
            "request future {request} bytes, connect {connect}"
        );
    }
}
