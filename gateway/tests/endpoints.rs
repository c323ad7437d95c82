//! The gateway's own endpoints and the errors it produces itself.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use testkit::fake_backend::{FakeBackend, Reply};

async fn echo_backend() -> FakeBackend {
    FakeBackend::start("a", 2, |s| {
        Reply::Json(200, format!(r#"{{"path":"{}"}}"#, s.path))
    })
    .await
}

#[tokio::test]
async fn models_lists_ids_and_aliases_in_openai_format() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let got = get(&gw.url("/v1/models")).await;
    assert_eq!(got.status, 200);
    let v = got.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["m", "alias-m"]);
    assert_eq!(v["data"][1]["object"], "model");
}

#[tokio::test]
async fn native_llama_server_endpoints_pass_through() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    for path in [
        "/completion",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/embedding",
        "/infill",
        "/rerank",
        "/v1/completions",
        "/v1/embeddings",
    ] {
        let got = post_json(&gw.url(path), r#"{"content":"hi"}"#).await;
        assert_eq!(got.status, 200, "{path}");
        assert_eq!(got.json()["path"], path);
    }
}

#[tokio::test]
async fn model_is_chosen_by_id_or_alias_and_unknown_models_get_404() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post_json(&url, r#"{"model":"m","messages":[]}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        post_json(&url, r#"{"model":"alias-m","messages":[]}"#)
            .await
            .status,
        200
    );
    post_json(&url, r#"{"model":"gpt-4","messages":[]}"#)
        .await
        .assert_openai_error(404, "model_not_found");
    assert_eq!(be.count(), 2);
}

#[tokio::test]
async fn with_a_default_model_unknown_and_missing_models_go_to_it() {
    let a = FakeBackend::start("a", 2, |_| Reply::Json(200, "{}".into())).await;
    let b = FakeBackend::start("b", 2, |_| Reply::Json(200, "{}".into())).await;
    let toml = format!(
        "default_model = \"second\"\n[health]\ninterval_secs = 0.05\n[[models]]\nid = \"first\"\nbackends = [{{ url = \"{}\" }}]\n[[models]]\nid = \"second\"\nbackends = [{{ url = \"{}\" }}]\n",
        a.url(),
        b.url()
    );
    let gw = TestGateway::start(&toml).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post_json(&url, r#"{"model":"first"}"#).await.headers["x-fake-backend"],
        "a"
    );
    assert_eq!(
        post_json(&url, r#"{"model":"nope"}"#).await.headers["x-fake-backend"],
        "b"
    );
    assert_eq!(
        post_json(&url, r#"{"messages":[]}"#).await.headers["x-fake-backend"],
        "b"
    );
}

#[tokio::test]
async fn without_a_default_a_request_naming_no_model_is_told_to_name_one() {
    let a = FakeBackend::start("a", 2, |_| Reply::Json(200, "{}".into())).await;
    let b = FakeBackend::start("b", 2, |_| Reply::Json(200, "{}".into())).await;
    let toml = format!(
        "[[models]]\nid = \"first\"\nbackends = [{{ url = \"{}\" }}]\n[[models]]\nid = \"second\"\nbackends = [{{ url = \"{}\" }}]\n",
        a.url(),
        b.url()
    );
    let gw = TestGateway::start(&toml).await;
    let got = post_json(&gw.url("/v1/chat/completions"), r#"{"messages":[]}"#).await;
    got.assert_openai_error(400, "invalid_request");
    let message = got.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("names no model"), "{message}");
    assert_eq!(a.count() + b.count(), 0);
}

#[tokio::test]
async fn malformed_json_is_400_and_never_reaches_a_backend() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    // Arrays too: serde would read `["m", true]` as a struct by position.
    for bad in [
        "{",
        "",
        "[1]",
        "[]",
        r#"["m", true]"#,
        "null",
        r#""hi""#,
        r#"{"model":7}"#,
        r#"{"stream":"yes"}"#,
    ] {
        post_json(&url, bad)
            .await
            .assert_openai_error(400, "invalid_request");
    }
    let got = read(send(post(&url, Bytes::from_static(b"\xff\xfe{"))).await).await;
    got.assert_openai_error(400, "invalid_request");
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    assert_eq!(be.count(), 0);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_whether_announced_or_chunked() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "max_body_bytes = 1000").await;
    let url = gw.url("/v1/chat/completions");
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(2000));
    post_json(&url, &big)
        .await
        .assert_openai_error(413, "request_too_large");
    // Without a content-length (chunked), the limit is enforced while reading.
    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let req = Request::post(&url).body(body).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let sender = tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send_data(Bytes::from(vec![b' '; 600])).await.is_err() {
                break;
            }
        }
    });
    let got = read(client.request(req).await.unwrap()).await;
    got.assert_openai_error(413, "request_too_large");
    let _ = sender.await;
    assert_eq!(be.count(), 0);
    // Just under the limit is fine.
    let ok = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(900));
    assert_eq!(post_json(&url, &ok).await.status, 200);
}

#[tokio::test]
async fn wrong_methods_get_405_and_unknown_paths_404_in_openai_shape() {
    let be = echo_backend().await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let got = get(&gw.url("/v1/chat/completions")).await;
    got.assert_openai_error(405, "method_not_allowed");
    assert_eq!(got.headers["allow"], "POST");
    let got = post_json(&gw.url("/v1/models"), "{}").await;
    got.assert_openai_error(405, "method_not_allowed");
    assert_eq!(got.headers["allow"], "GET");
    get(&gw.url("/v2/nothing"))
        .await
        .assert_openai_error(404, "not_found");
    let req = Request::delete(gw.url("/completion"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    read(send(req).await)
        .await
        .assert_openai_error(405, "method_not_allowed");
}

#[tokio::test]
async fn health_reports_each_backend_state() {
    let a = echo_backend().await;
    let gw = TestGateway::over(&[a.url()], "").await;
    let got = get(&gw.url("/health")).await;
    assert_eq!(got.status, 200);
    let v = got.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["backends"][0]["state"], "up");
    assert_eq!(v["backends"][0]["slots"], 2, "discovered from /props");
    assert_eq!(v["backends"][0]["model"], "m");
}
