//! Client credentials and backends: a gateway that checks API keys keeps them (they are
//! its own secrets) out of the requests it sends on; an open gateway passes a client's
//! `Authorization` and `x-api-key` through, for backends that check keys of their own.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::TestGateway;
use http::{HeaderMap, Request};
use http_body_util::Full;
use testkit::fake_backend::{FakeBackend, Reply};

const KEY: &str = "sk-gateway-secret-123";

/// A backend that answers every completion and records what it was sent.
async fn recording_backend() -> FakeBackend {
    FakeBackend::start("a", 4, |_| Reply::Json(200, common::completion_json("ok"))).await
}

/// POST a chat body to `base` with these headers; returns the status.
async fn chat(base: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-test-marker", "kept");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let got = common::read(common::send(req).await).await;
    assert!(
        got.status != 200 || got.json()["choices"].is_array(),
        "{got:?}"
    );
    got.status.as_u16()
}

/// The headers of the one request the backend saw since the last call.
fn last_seen(be: &FakeBackend, before: usize) -> HeaderMap {
    let seen = be.seen();
    assert_eq!(seen.len(), before + 1, "the backend saw {seen:?}");
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/v1/chat/completions");
    // Other headers still go through.
    assert_eq!(last.headers["x-test-marker"], "kept", "{:?}", last.headers);
    last.headers.clone()
}

/// With keys configured, neither header that can carry one reaches the backend, however
/// the client sent its key.
async fn keys_stay_at_the_gateway(base: &str, be: &FakeBackend) {
    let bearer = format!("Bearer {KEY}");
    for headers in [
        vec![("authorization", bearer.as_str())],
        vec![("x-api-key", KEY)],
        vec![("authorization", bearer.as_str()), ("x-api-key", KEY)],
        // Either may carry the key; the other is dropped too, whatever it holds.
        vec![
            ("authorization", "Bearer something-else"),
            ("x-api-key", KEY),
        ],
    ] {
        let before = be.seen().len();
        assert_eq!(chat(base, &headers).await, 200, "{headers:?}");
        let got = last_seen(be, before);
        assert!(
            got.get("authorization").is_none() && got.get("x-api-key").is_none(),
            "sent {headers:?}, the backend saw {got:?}"
        );
        let all = format!("{got:?}");
        assert!(!all.contains(KEY), "the key reached the backend: {all}");
    }
    // And a request without a key is refused before any backend sees it.
    let before = be.seen().len();
    assert_eq!(chat(base, &[]).await, 401);
    assert_eq!(be.seen().len(), before);
}

#[tokio::test]
async fn a_gateway_that_checks_keys_sends_none_to_its_backends() {
    let be = recording_backend().await;
    let extra = format!("[[api_keys]]\nname = \"ci\"\nkey = \"{KEY}\"\n");
    let gw = TestGateway::over(&[be.url()], &extra).await;
    keys_stay_at_the_gateway(&format!("http://{}", gw.addr), &be).await;
}

#[tokio::test]
async fn the_binary_with_api_key_sends_none_to_its_backends() {
    let be = recording_backend().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet-gateway"));
    cmd.args(["--listen", "127.0.0.1:0", "--health-interval", "0.05"])
        .args(["--model", "m", "--backend", &be.url(), "--api-key", KEY])
        .env_remove("BITNET_GATEWAY_API_KEYS");
    // Killed on drop, panics included.
    let (_child, base) = common::spawn_gateway(cmd);
    // /health answers without a key from loopback.
    let mut healthy = false;
    for _ in 0..200 {
        if common::get(&format!("{base}/health")).await.status == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(healthy, "the gateway never became healthy");
    keys_stay_at_the_gateway(&base, &be).await;
}

#[tokio::test]
async fn an_open_gateway_passes_client_credentials_through_unchanged() {
    let be = recording_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let base = format!("http://{}", gw.addr);
    for headers in [
        vec![("authorization", "Bearer backend-own-key")],
        vec![("x-api-key", "backend-own-key")],
        vec![
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", "backend-own-key"),
        ],
    ] {
        let before = be.seen().len();
        assert_eq!(chat(&base, &headers).await, 200, "{headers:?}");
        let got = last_seen(&be, before);
        for (name, value) in &headers {
            let seen: Vec<_> = got.get_all(*name).iter().collect();
            assert_eq!(seen, [*value], "{name}: the backend saw {got:?}");
        }
        for name in ["authorization", "x-api-key"] {
            if !headers.iter().any(|(n, _)| *n == name) {
                assert!(got.get(name).is_none(), "{got:?}");
            }
        }
    }
}
