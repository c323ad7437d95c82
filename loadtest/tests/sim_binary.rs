//! The real `llama-sim` binary: its listening line, crash exit status and signal handling.
//!
//! Every process is owned by a `ChildGuard`, which kills it when the test ends, even on panic.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use serde_json::json;
use testkit::child::{ChildGuard, Signal};

// Only the HTTP client half of the in-process tests' support is used here.
#[allow(dead_code)]
#[path = "sim_api/support.rs"]
mod support;

use support::{chat, Api, End};

const PREFIX: &str = "llama-sim listening on http://";
const STARTUP: Duration = Duration::from_secs(20);
const EXIT: Duration = Duration::from_secs(10);

/// Starts `llama-sim --port 0 ARGS` and reads the address it printed.
fn start(args: &[&str]) -> (ChildGuard, Api) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama-sim"));
    cmd.args(["--port", "0"]).args(args);
    let child = ChildGuard::spawn(cmd).expect("spawn llama-sim");
    let line = child
        .wait_for_line(|l| l.starts_with(PREFIX), STARTUP)
        .unwrap_or_else(|| panic!("no listening line; output:\n{}", child.output_so_far()));
    let addr: SocketAddr = line[PREFIX.len()..].trim().parse().expect("address");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    (child, Api { addr })
}

fn exited(child: &mut ChildGuard) -> ExitStatus {
    child
        .wait_timeout(EXIT)
        .expect("wait")
        .unwrap_or_else(|| panic!("still running; output:\n{}", child.output_so_far()))
}

#[tokio::test]
async fn binary_prints_its_address_and_serves_on_an_os_assigned_port() {
    let (_child, api) = start(&["--time-scale", "0.01"]);
    let health = api.get("/health").await;
    assert_eq!(health.status, 200);
    let mut body = chat("hello");
    body["max_tokens"] = json!(3);
    let reply = api.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn binary_exits_with_status_134_on_an_injected_crash() {
    let (mut child, api) = start(&["--time-scale", "0.01", "--crash-after", "2"]);
    let body = json!({"prompt": "hi", "n_predict": 2});
    assert_eq!(api.post("/completion", &body).await.status, 200);
    assert!(api.try_post("/completion", &body).await.is_err());
    assert_eq!(exited(&mut child).code(), Some(134));
}

/// Opens a stream of about 1 s, sends SIGTERM once it is under way, and returns how the stream
/// ended and how the process exited.
async fn sigterm_mid_stream(dialect: &str) -> (End, ExitStatus) {
    let (mut child, api) = start(&["--dialect", dialect, "--time-scale", "0.1"]);
    let body = json!({"prompt": "Tell me a story", "n_predict": 180, "stream": true});
    let mut open = api.open("/completion", &body).await;
    assert!(open.next_frame().await.is_some());
    child.signal(Signal::SIGTERM).expect("SIGTERM");
    let end = open.finish().await;
    (end, exited(&mut child))
}

#[tokio::test]
async fn upstream_binary_drains_in_flight_requests_on_sigterm() {
    let (end, status) = sigterm_mid_stream("llama.cpp").await;
    assert_eq!(end, End::Complete);
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn bitnet_binary_dies_at_once_on_sigterm() {
    let (end, status) = sigterm_mid_stream("bitnet").await;
    assert_eq!(end, End::Broken);
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
}
