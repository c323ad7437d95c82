//! SIGHUP re-reads the config: backends and models come and go, keys and limits change,
//! and streams in flight are not dropped. An invalid file is refused and the old config
//! stays in force.

mod common;

use std::process::Command;

use common::spawn_gateway;
use std::time::Duration;

use testkit::child::Signal;
use testkit::fake_backend::{FakeBackend, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bitnet-gateway");

async fn request(addr: &str, body: &str, key: Option<&str>) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| format!("x-api-key: {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("x-fake-backend: "))
        .unwrap_or("")
        .trim()
        .to_string();
    (status, backend, text)
}

fn config(models: &[(&str, &[&str])], keys: &[(&str, &str)]) -> String {
    let mut s = String::from("listen = \"127.0.0.1:0\"\n[health]\ninterval_secs = 0.05\n");
    for (name, key) in keys {
        s.push_str(&format!(
            "[[api_keys]]\nname = \"{name}\"\nkey = \"{key}\"\n"
        ));
    }
    for (id, urls) in models {
        let list: Vec<String> = urls
            .iter()
            .map(|u| format!("{{ url = \"{u}\" }}"))
            .collect();
        s.push_str(&format!(
            "[[models]]\nid = \"{id}\"\nbackends = [{}]\n",
            list.join(", ")
        ));
    }
    s
}

fn body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

async fn eventually(
    addr: &str,
    body: &str,
    key: Option<&str>,
    want: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..100 {
        let (status, backend, _) = request(addr, body, key).await;
        if want(status, &backend) {
            return (status, backend);
        }
        last = (status, backend);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never got the expected answer; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_config_without_dropping_streams_and_refuses_a_bad_one() {
    let a = FakeBackend::start("a", 1, |s| {
        if s.json()["stream"] == true {
            Reply::Controlled
        } else {
            Reply::Json(200, "{}".into())
        }
    })
    .await;
    let b = FakeBackend::start("b", 2, |_| Reply::Json(200, "{}".into())).await;
    let c = FakeBackend::start("c", 2, |_| Reply::Json(200, "{}".into())).await;
    let dir = std::env::temp_dir().join(format!("gw-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config(&[("m", &[&a.url()])], &[])).unwrap();

    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&file);
    let (mut child, base) = spawn_gateway(cmd);
    let addr = base.trim_start_matches("http://").to_string();
    eventually(&addr, &body("m", false), None, |s, be| {
        s == 200 && be == "a"
    })
    .await;

    // A stream in flight on backend a.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let sb = body("m", true);
    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{sb}", sb.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let stream = a.next_stream().await;
    assert!(stream.send("data: before\n\n").await);

    // New config: a is removed from m (b replaces it), model m2 on c appears, a key is needed.
    std::fs::write(
        &file,
        config(
            &[("m", &[&b.url()]), ("m2", &[&c.url()])],
            &[("ops", "k-1")],
        ),
    )
    .unwrap();
    child.signal(Signal::SIGHUP).unwrap();
    assert!(
        child
            .wait_for_line(|l| l.contains("config reloaded"), Duration::from_secs(5))
            .is_some(),
        "{}",
        child.output_so_far()
    );
    let (status, _, text) = request(&addr, &body("m", false), None).await;
    assert_eq!(status, 401, "keys apply at once: {text}");
    eventually(&addr, &body("m", false), Some("k-1"), |s, be| {
        s == 200 && be == "b"
    })
    .await;
    eventually(&addr, &body("m2", false), Some("k-1"), |s, be| {
        s == 200 && be == "c"
    })
    .await;

    // The stream on the removed backend still completes.
    assert!(stream.send("data: after\n\n").await);
    assert!(stream.send("data: [DONE]\n\n").await);
    drop(stream);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("data: before") && out.contains("data: after") && out.contains("[DONE]"),
        "{out}"
    );

    // An invalid file is refused with a line that names the problem; the old config stays.
    std::fs::write(&file, "[[models]]\nid = \"m\"\nbakends = []\n").unwrap();
    child.signal(Signal::SIGHUP).unwrap();
    let refused = child
        .wait_for_line(
            |l| l.contains("config not reloaded"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("{}", child.output_so_far()));
    assert!(refused.contains("bakends"), "{refused}");
    let (status, backend, _) = request(&addr, &body("m2", false), Some("k-1")).await;
    assert_eq!((status, backend.as_str()), (200, "c"));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = std::fs::remove_dir_all(dir);
}
