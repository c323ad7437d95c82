//! The gateway following a real runner over real llama-servers: it routes only to ready
//! instances, survives `kill -9` of one without failing requests that had not started,
//! and a drained restart through the control API loses no in-flight stream.
//!
//! Without a llama-server binary these tests print SKIPPED and pass, except in CI.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{pid_of, Runner, TempDir, FAST_TIMING};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use testkit::gguf::tiny_model;
use testkit::llama_server::binary_or_skip;

/// A gateway served on its own runtime thread; stopped when dropped.
struct Gateway {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn following(runner: &Runner) -> Gateway {
        let toml = format!(
            "[health]\ninterval_secs = 0.1\nload_interval_secs = 0.1\n[discovery]\ninterval_secs = 0.1\n[[models]]\nid = \"m\"\nrunner = \"http://{}\"\n",
            runner.control
        );
        let config = gateway::config::RawConfig::from_toml(&toml)
            .unwrap()
            .validate()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let gw = gateway::Gateway::new(config).unwrap();
                let _ = gateway::serve(listener, gw, async move {
                    let _ = rx.await;
                })
                .await;
            });
        });
        Gateway {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn health(&self) -> Value {
        let (_, body) = common::http(self.addr, "GET", "/health");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// Wait until the gateway routes to exactly the backends at `urls`.
    fn wait_routable(&self, urls: &[String], timeout: Duration) {
        let want: Vec<String> = urls
            .iter()
            .map(|u| u.trim_start_matches("http://").to_string())
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.health();
            let mut up: Vec<String> = h["backends"]
                .as_array()
                .map(|bs| {
                    bs.iter()
                        .filter(|b| b["state"] == "up" && b["held"] == false)
                        .map(|b| b["name"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            up.sort();
            let mut w = want.clone();
            w.sort();
            if up == w {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never routed to exactly {want:?}; health: {h}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A whole response: status, `x-backend`, body.
fn chat(gw: SocketAddr, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let backend = head
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap_or("")
        .to_string();
    (status, backend, rest.to_string())
}

const SHORT: &str = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;

fn start_runner(bin: &std::path::Path, dir: &TempDir) -> Runner {
    let config = dir.write("runner.toml", FAST_TIMING);
    let model = tiny_model();
    Runner::start(&[
        "--config",
        config.to_str().unwrap(),
        "--llama-server",
        bin.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--instances",
        "2",
        "--threads",
        "1",
        "--ctx",
        "8192",
        "--parallel",
        "1",
        "--base-port",
        "0",
    ])
}

fn urls(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|i| i["url"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn after_kill_9_the_gateway_routes_to_the_survivor_and_no_unstarted_request_fails() {
    let Some(bin) = binary_or_skip(
        "after_kill_9_the_gateway_routes_to_the_survivor_and_no_unstarted_request_fails",
    ) else {
        return;
    };
    let dir = TempDir::new("gw-kill");
    let runner = start_runner(&bin, &dir);
    let list = runner.wait_all_ready(Duration::from_secs(60));
    let gw = Gateway::following(&runner);
    gw.wait_routable(&urls(&list), Duration::from_secs(10));

    let victim = list[0].clone();
    let survivor = list[1]["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    kill(Pid::from_raw(pid_of(&victim) as i32), Signal::SIGKILL).unwrap();

    // Requests keep coming while the victim is dead and being restarted: none may fail.
    let mut served_by_survivor = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, backend, body) = chat(gw.addr, SHORT);
        assert_eq!(status, 200, "a request failed after the kill: {body}");
        if backend == survivor {
            served_by_survivor += 1;
        }
        let now = runner.instance(victim["name"].as_str().unwrap());
        if now["state"] == "ready" && now["pid"] != victim["pid"] {
            break;
        }
        assert!(Instant::now() < deadline, "the victim never came back");
    }
    assert!(served_by_survivor > 0);
    // The restarted instance (a new process, possibly on a new port) takes work again.
    let list = runner.wait_all_ready(Duration::from_secs(60));
    gw.wait_routable(&urls(&list), Duration::from_secs(10));
    let back = list[0]["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let served_back = (0..20).any(|_| {
        let (status, backend, _) = chat(gw.addr, SHORT);
        assert_eq!(status, 200);
        backend == back
    });
    assert!(served_back, "the restarted instance never got work");
}

#[test]
fn a_drained_restart_through_the_runner_loses_no_stream_passing_through_the_gateway() {
    let Some(bin) = binary_or_skip(
        "a_drained_restart_through_the_runner_loses_no_stream_passing_through_the_gateway",
    ) else {
        return;
    };
    let dir = TempDir::new("gw-drain");
    let runner = start_runner(&bin, &dir);
    let list = runner.wait_all_ready(Duration::from_secs(60));
    let gw = Gateway::following(&runner);
    gw.wait_routable(&urls(&list), Duration::from_secs(10));

    // A long stream through the gateway.
    let body = r#"{"model":"m","stream":true,"max_tokens":3000,"ignore_eos":true,"messages":[{"role":"user","content":"count"}]}"#;
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = vec![0u8; 4096];
    let n = s.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let backend = head
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap()
        .to_string();
    let victim = list
        .iter()
        .find(|i| i["url"].as_str().unwrap().ends_with(&backend))
        .unwrap()
        .clone();
    let other = list.iter().find(|i| i["name"] != victim["name"]).unwrap()["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();

    let (status, resp) = runner.post(&format!(
        "/instances/{}/restart",
        victim["name"].as_str().unwrap()
    ));
    assert_eq!(status, 202, "{resp}");
    // While it drains, new requests go to the other instance.
    runner.wait_for("victim draining", Duration::from_secs(10), |l| {
        l.iter()
            .any(|i| i["name"] == victim["name"] && i["state"] == "draining")
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let (status, b, _) = chat(gw.addr, SHORT);
        assert_eq!(status, 200);
        assert_eq!(b, other, "a new request went to the draining instance");
    }
    // The stream completes normally.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let all = head + &String::from_utf8_lossy(&rest);
    assert!(
        all.contains("data: [DONE]"),
        "stream cut: ...{}",
        &all[all.len().saturating_sub(300)..]
    );
    assert!(!all.contains("upstream_stream_broken"));
    runner.wait_all_ready(Duration::from_secs(60));
}
