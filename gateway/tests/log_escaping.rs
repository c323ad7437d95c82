//! Client text in log lines: the real binary's plain-text log escapes line breaks and
//! control characters, so that a request cannot forge log lines or drive the terminal
//! that shows the log.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use testkit::child::ChildGuard;
use testkit::fake_backend::{FakeBackend, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_bitnet-gateway");

/// The gateway over `backend`, logging in `format`, killed on drop (panics included).
fn start(backend: &str, format: &str) -> (ChildGuard, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--health-interval", "0.05"])
        .args(["--model", "m", "--backend", backend, "--log-format", format])
        .env("RUST_LOG", "info");
    common::spawn_gateway(cmd)
}

/// Wait until the gateway's backend takes work.
async fn wait_healthy(base: &str) {
    for _ in 0..200 {
        if common::get(&format!("{base}/health")).await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway never became healthy");
}

/// POST a chat body with this request id; returns the status.
async fn chat(base: &str, id: &str, body: &'static str) -> u16 {
    let req = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    common::read(common::send(req).await).await.status.as_u16()
}

/// A model name with a line break that, written raw, starts a line of its own.
const INJECTION: &str = r#"{"model":"m\nINJECTED status=200","messages":[]}"#;
/// A model name with the escape code for red text.
const ESCAPE_CODE: &str = r#"{"model":"red \u001b[31m text \u009b2J","messages":[]}"#;

/// Wait for the log line that names `id`.
fn line_with(child: &ChildGuard, id: &str) -> String {
    child
        .wait_for_line(|l| l.contains(id), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line for {id}:\n{}", child.output_so_far()))
}

#[tokio::test]
async fn client_text_cannot_forge_plain_log_lines_or_write_escape_codes() {
    let be = FakeBackend::start("a", 1, |_| Reply::Json(200, common::completion_json("ok"))).await;
    let (child, base) = start(&be.url(), "text");
    wait_healthy(&base).await;

    assert_eq!(chat(&base, "inject-1", INJECTION).await, 404);
    assert_eq!(chat(&base, "escape-2", ESCAPE_CODE).await, 404);
    assert_eq!(
        chat(&base, "plain-3", r#"{"model":"m","messages":[]}"#).await,
        200
    );

    // Wait for every request's line: lines reach stderr a moment after the response.
    let refused = line_with(&child, "inject-1");
    let escaped = line_with(&child, "escape-2");
    let ok = line_with(&child, "plain-3");

    let log = child.output_so_far();
    assert!(
        !log.lines().any(|l| l.starts_with("INJECTED")),
        "a forged line:\n{log}"
    );
    // The captured lines are joined with line breaks; within them there is none.
    assert!(
        !log.split('\n').any(|l| l.chars().any(char::is_control)),
        "a raw control character:\n{log:?}"
    );
    // The client's text is all there, escaped.
    assert!(
        refused.contains(r"error=the model 'm\nINJECTED status=200' does not exist"),
        "{refused}"
    );
    assert!(
        escaped.contains(r"the model 'red \u{1b}[31m text \u{9b}2J' does not exist"),
        "{escaped}"
    );
    // A request that succeeded reads as it always did.
    assert!(
        ok.contains(" INFO access: request request_id=plain-3 model=\"m\" backend=")
            && ok.contains(" status=200 ending=Complete "),
        "{ok}"
    );
}

#[tokio::test]
async fn json_logs_keep_client_text_inside_one_line() {
    let be = FakeBackend::start("a", 1, |_| Reply::Json(200, common::completion_json("ok"))).await;
    let (child, base) = start(&be.url(), "json");
    wait_healthy(&base).await;

    assert_eq!(chat(&base, "inject-1", INJECTION).await, 404);
    assert_eq!(chat(&base, "escape-2", ESCAPE_CODE).await, 404);

    for (id, model) in [
        ("inject-1", "m\nINJECTED status=200"),
        ("escape-2", "red \u{1b}[31m text \u{9b}2J"),
    ] {
        let line = line_with(&child, id);
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
        assert_eq!(v["fields"]["request_id"], id, "{line}");
        let error = v["fields"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("'{model}'")), "{line}");
    }
    let log = child.output_so_far();
    assert!(
        !log.lines().any(|l| l.starts_with("INJECTED")),
        "a forged line:\n{log}"
    );
    // JSON escapes C0 controls (DEL and C1 need no escaping there, and serde_json writes
    // them as they are, inside the string).
    assert!(
        !log.split('\n')
            .any(|l| l.chars().any(|c| c.is_ascii_control())),
        "a raw control character:\n{log:?}"
    );
}
