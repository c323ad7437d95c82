//! Small scriptable HTTP backends for testing gateway logic.
//!
//! A [`FakeBackend`] answers `/health` (status settable at run time), `/props`
//! (`total_slots`) and `/metrics` (requests in progress) like llama-server, records every other request it receives, and
//! answers it with whatever [`Reply`] the test's handler returns: a JSON body, timed SSE
//! chunks, a stream the test drives chunk by chunk, a held request released on demand, a
//! stream cut mid-way, or a connection reset before any answer.
//!
//! These stand in for llama-server only in tests of the gateway's own logic (routing,
//! queueing, failover, relaying); end-to-end tests use a real llama-server.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// A request the fake backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Seen {
    /// The body parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The content of the first chat message, which tests use to tell requests apart
    /// (empty if there is none).
    pub fn first_message(&self) -> String {
        self.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// How the fake backend answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with this status and JSON body.
    Json(u16, String),
    /// An SSE response: each chunk is sent after its delay.
    Sse(Vec<(Duration, Bytes)>),
    /// An SSE response whose chunks the test sends through a [`StreamHandle`] taken with
    /// [`FakeBackend::next_stream`]. The stream ends when the handle is dropped.
    Controlled,
    /// Send these SSE chunks, then cut the connection without ending the body.
    SseThenBreak(Vec<Bytes>),
    /// Hold the request (no response head) until [`FakeBackend::release`] lets it go,
    /// then answer with the inner reply.
    Held(Box<Reply>),
    /// Close the connection without answering.
    Reset,
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

struct Shared {
    name: String,
    slots: u32,
    health: AtomicU16,
    health_delay_ms: AtomicU64,
    active: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    handler: Box<Handler>,
    held: Semaphore,
    streams_tx: mpsc::UnboundedSender<StreamHandle>,
}

/// A running fake backend on 127.0.0.1. Stops when dropped.
pub struct FakeBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    streams_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<StreamHandle>>,
    task: Option<JoinHandle<()>>,
}

/// Drives one [`Reply::Controlled`] stream.
#[derive(Debug)]
pub struct StreamHandle {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl StreamHandle {
    /// Send one chunk to the client. Returns `false` once the receiving side is gone
    /// (the gateway closed the upstream connection).
    pub async fn send(&self, chunk: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(chunk.into())).await.is_ok()
    }

    /// Cut the connection mid-stream.
    pub async fn break_connection(self) {
        let _ = self
            .tx
            .send(Err(std::io::Error::other("cut by the test")))
            .await;
    }

    /// Resolves when the response body has been dropped, i.e. the connection is closed.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl FakeBackend {
    /// Start a backend named `name` with `slots` slots, answering with `handler`.
    pub async fn start(
        name: &str,
        slots: u32,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake backend");
        let addr = listener.local_addr().expect("local addr");
        let (streams_tx, streams_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            slots,
            health: AtomicU16::new(200),
            health_delay_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            handler: Box::new(handler),
            held: Semaphore::new(0),
            streams_tx,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeBackend {
            addr,
            shared,
            streams_rx: tokio::sync::Mutex::new(streams_rx),
            task: Some(task),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The backend's name (it is also put in the `x-fake-backend` response header).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Set the status `/health` answers with (200 up, 503 loading, anything else).
    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// Make `/health` answer only after `delay`, like a CPU box deep in prompt evaluation.
    pub fn set_health_delay(&self, delay: Duration) {
        self.shared
            .health_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests being answered now (held ones included), excluding `/health`, `/props` and `/metrics`.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Every request received so far, excluding `/health`, `/props` and `/metrics`.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Number of requests received so far, excluding `/health`, `/props` and `/metrics`.
    pub fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// Let `n` held requests go, oldest first.
    pub fn release(&self, n: usize) {
        self.shared.held.add_permits(n);
    }

    /// The next [`Reply::Controlled`] stream, waiting up to 10 s for it to start.
    pub async fn next_stream(&self) -> StreamHandle {
        let mut rx = self.streams_rx.lock().await;
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a controlled stream should start within 10 s")
            .expect("backend alive")
    }

    /// Stop listening and drop every connection: later connects are refused.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set so that aborting the accept task also cuts them.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| answer(shared.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

fn json(status: u16, body: String, active: Option<ActiveGuard>) -> Response<FakeBody> {
    let mut r = Response::new(FakeBody::full(Bytes::from(body), active));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn answer(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, std::io::Error> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" => {
            let delay = shared.health_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let status = shared.health.load(Ordering::SeqCst);
            let body = if status == 200 {
                r#"{"status":"ok"}"#.to_string()
            } else {
                r#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#
                    .to_string()
            };
            return Ok(json(status, body, None));
        }
        "/props" => {
            return Ok(json(
                200,
                format!(
                    r#"{{"total_slots":{},"default_generation_settings":{{"n_ctx":4096}},"build_info":"fake"}}"#,
                    shared.slots
                ),
                None,
            ))
        }
        "/metrics" => {
            // Like llama-server with --metrics: its own count of requests in progress.
            let active = shared.active.load(Ordering::SeqCst);
            let text = format!(
                "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {active}\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 0\n"
            );
            let mut r = Response::new(FakeBody::full(Bytes::from(text), None));
            r.headers_mut()
                .insert("content-type", "text/plain; version=0.0.4".parse().unwrap());
            return Ok(r);
        }
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let seen = Seen {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or(path),
        headers: parts.headers,
        body,
    };
    shared.seen.lock().unwrap().push(seen.clone());
    let active = ActiveGuard::new(shared.clone());
    let mut reply = (shared.handler)(&seen);
    while let Reply::Held(inner) = reply {
        shared
            .held
            .acquire()
            .await
            .expect("semaphore never closed")
            .forget();
        reply = *inner;
    }
    let mut resp = match reply {
        Reply::Json(status, body) => json(status, body, Some(active)),
        Reply::Reset => return Err(std::io::Error::other("reset by the test")),
        Reply::Sse(chunks) => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                for (delay, chunk) in chunks {
                    tokio::time::sleep(delay).await;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            });
            sse(FakeBody::stream(rx, active))
        }
        Reply::SseThenBreak(chunks) => {
            let (tx, rx) = mpsc::channel(chunks.len() + 1);
            for c in chunks {
                let _ = tx.try_send(Ok(c));
            }
            tokio::spawn(async move {
                // Let the chunks reach the client before cutting the connection.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            });
            sse(FakeBody::stream(rx, active))
        }
        Reply::Controlled => {
            let (tx, rx) = mpsc::channel(1);
            let _ = shared.streams_tx.send(StreamHandle { tx });
            sse(FakeBody::stream(rx, active))
        }
        Reply::Held(_) => unreachable!("unwrapped above"),
    };
    resp.headers_mut()
        .insert("x-fake-backend", shared.name.parse().unwrap());
    Ok(resp)
}

fn sse(body: FakeBody) -> Response<FakeBody> {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: Arc<Shared>) -> ActiveGuard {
        shared.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fake's response body: a complete buffer or a channel of chunks. It holds the
/// "active request" guard until it is finished or dropped.
struct FakeBody {
    full: Option<Bytes>,
    rx: Option<mpsc::Receiver<Result<Bytes, std::io::Error>>>,
    _active: Option<ActiveGuard>,
}

impl FakeBody {
    fn full(b: Bytes, active: Option<ActiveGuard>) -> FakeBody {
        FakeBody {
            full: Some(b),
            rx: None,
            _active: active,
        }
    }

    fn stream(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>, active: ActiveGuard) -> FakeBody {
        FakeBody {
            full: None,
            rx: Some(rx),
            _active: Some(active),
        }
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(b) = self.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rx) = self.rx.as_mut() else {
            self._active = None;
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                self.rx = None;
                self._active = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none() && self.rx.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // A complete body has a length, so it goes out with Content-Length like
        // llama-server's JSON answers; streams are chunked.
        match (&self.full, &self.rx) {
            (Some(b), _) => hyper::body::SizeHint::with_exact(b.len() as u64),
            (None, None) => hyper::body::SizeHint::with_exact(0),
            (None, Some(_)) => hyper::body::SizeHint::default(),
        }
    }
}
