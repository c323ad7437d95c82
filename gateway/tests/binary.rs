//! The real `bitnet-gateway` binary: flags, bad config, and graceful shutdown on signals.

use std::process::Command;
use std::time::Duration;

use testkit::child::{ChildGuard, Signal};
use testkit::fake_backend::{FakeBackend, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bitnet-gateway");

fn start(args: &[&str]) -> (ChildGuard, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--health-interval", "0.05"])
        .args(args);
    let child = ChildGuard::spawn(cmd).expect("spawn gateway");
    let line = child
        .wait_for_line(
            |l| l.starts_with("bitnet-gateway listening on "),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("gateway did not start:\n{}", child.output_so_far()));
    let addr = line
        .trim_start_matches("bitnet-gateway listening on http://")
        .trim()
        .to_string();
    (child, addr)
}

async fn wait_healthy(addr: &str) {
    for _ in 0..200 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway never became healthy");
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--backend",
        "--model",
        "--alias",
        "--default-model",
        "--max-queue",
        "--queue-timeout",
        "--policy",
        "--max-attempts",
        "--drain-timeout",
        "--max-body-bytes",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert!(help.contains("127.0.0.1:8090"));
}

#[test]
fn an_invalid_config_exits_non_zero_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("gw-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nqueue_size = 3\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue_size"), "{err}");
    let out = Command::new(BIN)
        .args(["--backend", "ftp://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://"));
    let out = Command::new(BIN)
        .args(["--backend", "http://127.0.0.1:1", "--listen", "nonsense"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn check_config_reads_the_files_a_start_reads() {
    let dir = std::env::temp_dir().join(format!("gw-check-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such.pem");
    let missing = missing.to_str().unwrap();
    let with_ca = dir.join("ca.toml");
    std::fs::write(
        &with_ca,
        format!("[upstream]\nca_file = {missing:?}\n[[models]]\nid = \"m\"\nbackends = [{{ url = \"http://127.0.0.1:1\" }}]\n"),
    )
    .unwrap();
    for (args, file) in [
        (
            vec![
                "--backend",
                "http://127.0.0.1:1",
                "--tls-cert",
                missing,
                "--tls-key",
                missing,
            ],
            "certificate file",
        ),
        (vec!["--config", with_ca.to_str().unwrap()], "CA file"),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--check-config")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(file) && err.contains(missing), "{err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_the_stream_finish_and_exits_zero() {
    sigterm_drains(1, 1).await;
}

#[tokio::test]
async fn with_several_serving_threads_sigterm_drains_every_stream() {
    // Six connections over three threads: whichever thread took each, its stream must
    // finish before the process exits.
    sigterm_drains(3, 6).await;
}

/// Start the binary with `workers` serving threads, open `streams` streams (one
/// connection each), send SIGTERM, and check that new connections are refused, every
/// stream completes, and the process exits 0 afterwards.
async fn sigterm_drains(workers: usize, streams: usize) {
    let be = FakeBackend::start("a", streams as u32, |_| Reply::Controlled).await;
    let url = be.url();
    let workers = workers.to_string();
    let (mut child, addr) = start(&[
        "--backend",
        &url,
        "--drain-timeout",
        "10",
        "--workers",
        &workers,
    ]);
    wait_healthy(&addr).await;

    let mut open = Vec::new();
    for i in 0..streams {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let body = r#"{"stream":true,"messages":[]}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let stream = be.next_stream().await;
        assert!(stream.send(format!("data: one-{i}\n\n")).await);
        open.push((sock, stream));
    }

    child.signal(Signal::SIGTERM).unwrap();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still open after SIGTERM");
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited while a stream was in flight"
    );

    // The in-flight streams still complete.
    for (i, (mut sock, stream)) in open.into_iter().enumerate() {
        assert!(stream.send(format!("data: two-{i}\n\n")).await);
        assert!(stream.send("data: [DONE]\n\n").await);
        drop(stream);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.contains(&format!("data: one-{i}"))
                && out.contains(&format!("data: two-{i}"))
                && out.contains("[DONE]"),
            "{out}"
        );
    }

    let status = child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("exited after draining");
    assert_eq!(status.code(), Some(0), "{}", child.output_so_far());
}

#[tokio::test]
async fn sigint_with_nothing_in_flight_exits_zero_promptly() {
    let be = FakeBackend::start("a", 1, |_| Reply::Json(200, "{}".into())).await;
    let url = be.url();
    let (mut child, addr) = start(&["--backend", &url]);
    wait_healthy(&addr).await;
    child.signal(Signal::SIGINT).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("exited");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn json_logs_carry_one_access_line_per_request() {
    let be = FakeBackend::start("a", 1, |_| {
        Reply::Json(
            200,
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":5}}"#.into(),
        )
    })
    .await;
    let url = be.url();
    let (child, addr) = start(&["--backend", &url, "--log-format", "json"]);
    wait_healthy(&addr).await;
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"messages":[]}"#;
    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: abc-123\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let line = child
        .wait_for_line(|l| l.contains("abc-123"), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no access line:\n{}", child.output_so_far()));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let f = &v["fields"];
    assert_eq!(v["target"], "access");
    assert_eq!(f["request_id"], "abc-123");
    assert_eq!(f["status"], 200);
    assert_eq!(f["completion_tokens"], 5);
    assert_eq!(f["prompt_tokens"], 3);
    assert_eq!(f["backend"], url.trim_start_matches("http://"));
    assert!(f["duration_ms"].is_u64() && f["queue_wait_ms"].is_u64() && f["bytes"].is_u64());
}
