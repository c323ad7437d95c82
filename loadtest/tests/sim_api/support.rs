//! Starting an in-process llama-sim and talking to it with a plain hyper client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use loadtest::sim::{serve, ConfigError, Dialect, Exit, SimConfig};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A simulator serving on `127.0.0.1:<free port>` inside the test's runtime. Dereferences to
/// an [`Api`] client for it.
pub struct TestSim {
    api: Api,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Exit, ConfigError>>,
}

impl std::ops::Deref for TestSim {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

/// A client of one simulator; `Copy`, so spawned tasks can take one along.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub addr: SocketAddr,
}

impl TestSim {
    pub async fn start(cfg: SimConfig) -> TestSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, cfg, async move {
            let _ = stopped.await;
        }));
        TestSim {
            api: Api { addr },
            stop: Some(stop),
            task,
        }
    }

    pub fn api(&self) -> Api {
        self.api
    }

    /// Asks for a shutdown (as SIGTERM would) and returns how serving ended.
    pub async fn shutdown(mut self) -> Exit {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.ended().await
    }

    /// Waits for serving to end on its own (a crash).
    pub async fn ended(&mut self) -> Exit {
        (&mut self.task)
            .await
            .expect("serve task")
            .expect("valid config")
    }
}

impl Api {
    pub async fn get(&self, path: &str) -> Reply {
        send(self.addr, Method::GET, path, Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        send(self.addr, Method::POST, path, Bytes::from(body.to_string())).await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> Reply {
        send(
            self.addr,
            Method::POST,
            path,
            Bytes::from_static(body.as_bytes()),
        )
        .await
    }

    /// Like [`Api::post`], but a connection that breaks before the whole answer is an error.
    pub async fn try_post(&self, path: &str, body: &Value) -> Result<Reply, hyper::Error> {
        try_send(self.addr, Method::POST, path, Bytes::from(body.to_string())).await
    }

    /// Sends a request and returns as soon as the response head arrives.
    pub async fn open(&self, path: &str, body: &Value) -> Open {
        let started = Instant::now();
        let res = request(self.addr, Method::POST, path, Bytes::from(body.to_string()))
            .await
            .expect("response head");
        Open {
            started,
            head_at: Instant::now(),
            status: res.status(),
            headers: res.headers().clone(),
            body: res.into_body(),
            frames: Vec::new(),
        }
    }

    /// Reads one `llamacpp:<name>` value from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.text();
        metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// `/metrics`' requests_processing and requests_deferred.
    pub async fn occupancy(&self) -> (f64, f64) {
        (
            self.metric("requests_processing").await,
            self.metric("requests_deferred").await,
        )
    }
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let key = format!("llamacpp:{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("numeric metric"))
}

/// A fast configuration of `dialect`: time runs 100 times faster than real.
pub fn fast(dialect: Dialect) -> SimConfig {
    let mut cfg = SimConfig::new(dialect);
    cfg.time_scale = 0.01;
    cfg
}

/// A prompt of exactly `n` tokens under the simulator's split.
pub fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> hyper::Result<http::Response<Incoming>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    sender.send_request(req).await
}

async fn send(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> Reply {
    try_send(addr, method, path, body).await.expect("response")
}

async fn try_send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<Reply, hyper::Error> {
    let started = Instant::now();
    let res = request(addr, method, path, body).await?;
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    })
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// How a streamed body ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The body ended properly.
    Complete,
    /// The connection broke mid-body.
    Broken,
}

/// A response whose body is read frame by frame, each stamped with its arrival time.
pub struct Open {
    pub started: Instant,
    pub head_at: Instant,
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    pub frames: Vec<(Instant, Bytes)>,
}

impl Open {
    /// Reads the next data frame; `None` at the end of the body.
    pub async fn next_frame(&mut self) -> Option<Result<Bytes, hyper::Error>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.frames.push((Instant::now(), data.clone()));
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Reads the rest of the body.
    pub async fn finish(&mut self) -> End {
        loop {
            match self.next_frame().await {
                None => return End::Complete,
                Some(Err(_)) => return End::Broken,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Everything received so far.
    pub fn text(&self) -> String {
        self.frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b))
            .collect()
    }

    /// The SSE events received so far, as raw text without the blank line.
    pub fn events(&self) -> Vec<String> {
        let text = self.text();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The JSON of every `data:` event except `[DONE]`.
    pub fn data_json(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("data event is JSON"))
            .collect()
    }

    /// Arrival time of the frame holding the `n`th (from 0) generated token, counting tokens
    /// by the content events in each frame.
    pub fn token_arrivals(&self) -> Vec<Instant> {
        let mut out = Vec::new();
        for (at, bytes) in &self.frames {
            let text = String::from_utf8_lossy(bytes);
            for event in text.split("\n\n") {
                let Some(data) = event.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if token_text(&v).is_some_and(|t| !t.is_empty()) {
                    out.push(*at);
                }
            }
        }
        out
    }
}

/// The generated text in one streamed event of any endpoint, if it carries some.
pub fn token_text(v: &Value) -> Option<&str> {
    let choice = v.get("choices").and_then(|c| c.get(0));
    choice
        .and_then(|c| c.pointer("/delta/content"))
        .or_else(|| choice.and_then(|c| c.get("text")))
        .or_else(|| v.get("content"))
        .and_then(Value::as_str)
}

/// Asserts that `actual` is within `tol` of `expected`.
#[track_caller]
pub fn assert_near(actual: Duration, expected: Duration, tol: Duration) {
    let diff = actual.abs_diff(expected);
    assert!(
        diff <= tol,
        "expected {expected:?} ± {tol:?}, got {actual:?}"
    );
}

/// A one-message chat request.
pub fn chat(content: &str) -> Value {
    serde_json::json!({"messages": [{"role": "user", "content": content}]})
}
