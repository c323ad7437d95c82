//! `GET /metrics`: per-backend series with the values the traffic implies, request ids.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use testkit::fake_backend::{FakeBackend, Reply};

/// Value of the series whose line starts with `prefix` (name plus exact labels).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {prefix} in\n{text}"))
}

fn stream_with_usage() -> Vec<(Duration, Bytes)> {
    [
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"timings\":{\"prompt_n\":4,\"cache_n\":6,\"predicted_n\":7,\"predicted_per_second\":18.0}}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":6}}}\n\n",
        "data: [DONE]\n\n",
    ]
    .iter()
    .map(|c| (Duration::from_millis(5), Bytes::from_static(c.as_bytes())))
    .collect()
}

#[tokio::test]
async fn per_backend_series_carry_the_tokens_and_statuses_of_the_traffic() {
    let be = FakeBackend::start("a", 2, |s| {
        if s.json()["stream"] == true {
            Reply::Sse(stream_with_usage())
        } else {
            Reply::Json(200, completion_json("x"))
        }
    })
    .await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    for i in 0..3 {
        assert_eq!(post_json(&url, &chat(i, true)).await.status, 200);
    }
    assert_eq!(post_json(&url, &chat(9, false)).await.status, 200);
    post_json(&url, r#"{"model":"nope"}"#)
        .await
        .assert_openai_error(404, "model_not_found");

    let got = get(&gw.url("/metrics")).await;
    assert_eq!(got.status, 200);
    assert!(got.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = got.text();
    let b = be.url().trim_start_matches("http://").to_string();
    let bm = format!("{{backend=\"{b}\",model=\"m\"}}");
    // 3 streams × 7 (from usage) + 1 non-stream × 2 (from usage).
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_completion_tokens_total{bm}")
        ),
        23.0
    );
    assert_eq!(
        value(&text, &format!("bitnet_gateway_prompt_tokens_total{bm}")),
        33.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_prompt_tokens_cached_total{bm}")
        ),
        18.0
    );
    assert_eq!(
        value(&text, &format!("bitnet_gateway_requests_total{{backend=\"{b}\",endpoint=\"/v1/chat/completions\",model=\"m\",status=\"200\"}}")),
        4.0
    );
    assert_eq!(
        value(&text, "bitnet_gateway_requests_total{backend=\"\",endpoint=\"/v1/chat/completions\",model=\"\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_time_to_first_token_seconds_count{bm}")
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_generation_tokens_per_second_count{bm}")
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_generation_tokens_per_second_sum{bm}")
        ),
        54.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_backend_slots{{backend=\"{b}\"}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_backend_up{{backend=\"{b}\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_backend_inflight{{backend=\"{b}\"}}")
        ),
        0.0
    );
    assert_eq!(value(&text, "bitnet_gateway_queue_depth{model=\"m\"}"), 0.0);
    assert_eq!(
        value(
            &text,
            "bitnet_gateway_queue_wait_seconds_count{model=\"m\"}"
        ),
        4.0
    );
    assert!(value(&text, "process_resident_memory_bytes") > 0.0);
    // Every answer was read to its end: none may count as abandoned, including the
    // non-streamed one, whose body hyper may drop right after its last byte.
    assert!(
        !text.contains("bitnet_gateway_client_disconnects_total{"),
        "{text}"
    );
    assert!(value(&text, "process_open_fds") > 0.0);
}

#[tokio::test]
async fn disconnects_rejections_and_retries_are_counted() {
    let flaky = FakeBackend::start("flaky", 4, |_| Reply::Reset).await;
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(
        &[flaky.url(), be.url()],
        "[queue]\nmax = 0\n[health]\ninterval_secs = 60",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    // The first request resets on `flaky`, is retried on `a`, and then abandoned.
    let resp = send(post(&url, chat(0, true))).await;
    let stream = be.next_stream().await;
    assert!(
        stream
            .send("data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n")
            .await
    );
    // The only slot is taken and the queue holds nobody: the next one is refused.
    post_json(&url, &chat(1, false))
        .await
        .assert_openai_error(429, "queue_full");
    drop(resp);
    tokio::time::timeout(Duration::from_secs(2), stream.closed())
        .await
        .unwrap();
    gw.wait_until(|g| g.pools()[0].backends()[1].inflight() == 0)
        .await;

    let text = get(&gw.url("/metrics")).await.text();
    let f = flaky.url().trim_start_matches("http://").to_string();
    let a = be.url().trim_start_matches("http://").to_string();
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_upstream_errors_total{{backend=\"{f}\",kind=\"connect\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_retries_total{{backend=\"{f}\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_client_disconnects_total{{backend=\"{a}\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "bitnet_gateway_queue_rejected_total{model=\"m\",reason=\"full\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!("bitnet_gateway_backend_up{{backend=\"{f}\"}}")
        ),
        0.0
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_and_reach_the_backend() {
    let be = FakeBackend::start("a", 1, |_| Reply::Json(200, "{}".into())).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "trace-42")
        .body(http_body_util::Full::new(Bytes::from(chat(0, false))))
        .unwrap();
    let got = read(send(req).await).await;
    assert_eq!(got.headers["x-request-id"], "trace-42");
    assert_eq!(be.seen()[0].headers["x-request-id"], "trace-42");
    let a = post_json(&gw.url("/v1/chat/completions"), &chat(1, false)).await;
    let b = post_json(&gw.url("/v2/none"), "{}").await;
    let (a, b) = (
        a.headers["x-request-id"].clone(),
        b.headers["x-request-id"].clone(),
    );
    assert!(
        !a.is_empty() && a != b,
        "generated ids are unique: {a:?} {b:?}"
    );
}
