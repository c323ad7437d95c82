//! Shared support for the gateway's integration tests: an in-process gateway bound to
//! 127.0.0.1:0 in front of fake or real backends, and a small HTTP client.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway::config::RawConfig;
use gateway::{serve_threads, Gateway};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A gateway served in this process.
pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    pub gw: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
}

/// Config for one model `m` (alias `alias-m`) over `backends`, plus extra top-level TOML
/// placed before the model table. Health probes run fast so tests don't wait.
pub fn config_for(backends: &[String], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|u| format!("{{ url = \"{u}\" }}"))
        .collect();
    // Tests that set their own [health] table keep it; the rest probe fast.
    let health = if extra.contains("[health]") {
        ""
    } else {
        "[health]\ninterval_secs = 0.05\ntimeout_secs = 1\n"
    };
    format!(
        "{extra}\n{health}\n[[models]]\nid = \"m\"\naliases = [\"alias-m\"]\nbackends = [{}]\n",
        list.join(", ")
    )
}

impl TestGateway {
    /// Start a gateway from TOML (its `listen` is ignored: the listener is bound here).
    pub async fn start(toml: &str) -> TestGateway {
        let config = RawConfig::from_toml(toml)
            .expect("valid toml")
            .validate()
            .expect("valid config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let workers = config.workers;
        let gw = Gateway::new(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_threads(listener, gw.clone(), workers, async move {
            let _ = rx.await;
        }));
        let tg = TestGateway {
            addr,
            gw,
            shutdown: Some(tx),
            task: Some(task),
        };
        tg.wait_until(|gw| {
            gw.pools().iter().all(|p| {
                p.backends()
                    .iter()
                    .all(|b| b.health() == gateway::backend::Health::Up)
            })
        })
        .await;
        tg
    }

    /// Start in front of these backend URLs.
    pub async fn over(backends: &[String], extra: &str) -> TestGateway {
        Self::start(&config_for(backends, extra)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Wait (up to 5 s) until `cond` holds on the gateway's state.
    pub async fn wait_until(&self, cond: impl Fn(&Gateway) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond(&self.gw) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn queue_len(&self) -> usize {
        self.gw.pools()[0].queue_len()
    }

    pub fn inflight(&self, backend: usize) -> u32 {
        self.gw.pools()[0].backends()[backend].inflight()
    }

    /// Trigger graceful shutdown and wait for `serve` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A whole response.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Assert this is a gateway error in OpenAI shape with this status and code.
    pub fn assert_openai_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].as_str().is_some(), "{v}");
    }
}

pub async fn send(req: Request<Full<Bytes>>) -> Response {
    client()
        .request(req)
        .await
        .expect("request reaches the gateway")
}

pub type Response = http::Response<Incoming>;

pub async fn read(resp: Response) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn post(url: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

pub async fn post_json(url: &str, body: &str) -> Got {
    read(send(post(url, body.to_string())).await).await
}

pub async fn get(url: &str) -> Got {
    read(send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await).await
}

/// A chat request body for model `m` with an id the fake backends can see.
pub fn chat(id: usize, stream: bool) -> String {
    format!(
        r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"request {id}"}}]}}"#
    )
}

/// A non-streaming completion body as llama-server would send it.
pub fn completion_json(text: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    })
    .to_string()
}

/// A fake backend's reply that holds a completion until the test releases it, so that
/// requests stay in flight for as long as a test needs.
pub fn held() -> impl Fn(&testkit::fake_backend::Seen) -> testkit::fake_backend::Reply + Send + Sync
{
    |_| {
        testkit::fake_backend::Reply::Held(Box::new(testkit::fake_backend::Reply::Json(
            200,
            completion_json("ok"),
        )))
    }
}

/// Start the real `bitnet-gateway` from `cmd` (its arguments already set) and wait for its
/// "listening on" line. Returns the process, killed on drop, and its base URL
/// (`http://ADDR` or `https://ADDR`).
pub fn spawn_gateway(cmd: std::process::Command) -> (testkit::child::ChildGuard, String) {
    let child = testkit::child::ChildGuard::spawn(cmd).expect("spawn bitnet-gateway");
    let line = child
        .wait_for_line(
            |l| l.starts_with("bitnet-gateway listening on "),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the gateway did not start:\n{}", child.output_so_far()));
    let base = line
        .trim_start_matches("bitnet-gateway listening on ")
        .trim()
        .to_string();
    (child, base)
}

/// Wait (up to 5 s) until `cond` holds.
pub async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
