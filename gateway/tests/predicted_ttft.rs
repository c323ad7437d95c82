//! Predicted-TTFT routing through the gateway, against fake backends: follow-up turns
//! pinned to the slot holding their history, the honest queue (refusal on arrival,
//! `: queued` comments), and the routing metrics.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use testkit::fake_backend::{FakeBackend, Reply, Seen};

const POLICY: &str = "policy = \"predicted-ttft\"\n";

/// A chat body: a long system prompt `sys` (repeated to ~8,000 characters) and `turns`
/// alternating user and assistant messages.
fn conversation(sys: &str, turns: &[&str], stream: bool) -> String {
    let mut messages =
        vec![serde_json::json!({"role": "system", "content": sys.repeat(8000 / sys.len())})];
    for (i, t) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({"role": role, "content": t}));
    }
    serde_json::json!({"model": "m", "stream": stream, "max_tokens": 16, "messages": messages})
        .to_string()
}

fn ok() -> impl Fn(&Seen) -> Reply + Send + Sync {
    |_| Reply::Json(200, completion_json("ok"))
}

/// The backend that served a response, from its `X-Backend` header.
fn served_by(got: &Got) -> String {
    got.headers["x-backend"].to_str().unwrap().to_string()
}

/// Start a gateway over `backends` and wait until it has read their slot counts.
async fn gateway_over(backends: &[&FakeBackend], extra: &str) -> TestGateway {
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    TestGateway::over(&urls, &format!("{POLICY}{extra}")).await
}

#[tokio::test]
async fn a_follow_up_turn_is_pinned_to_the_slot_that_holds_its_history() {
    let a = FakeBackend::start("a", 2, ok()).await;
    let b = FakeBackend::start("b", 2, ok()).await;
    let gw = gateway_over(&[&a, &b], "").await;
    gw.wait_until(|g| g.pools()[0].backends().iter().all(|b| b.has_slot(1)))
        .await;
    let url = gw.url("/v1/chat/completions");

    // Two conversations with different system prompts, one turn each.
    let x1 = post_json(&url, &conversation("X", &["hello"], false)).await;
    assert_eq!(x1.status, 200, "{}", x1.text());
    let y1 = post_json(&url, &conversation("Y", &["hi"], false)).await;
    assert_eq!(y1.status, 200);
    let home = served_by(&x1);

    // X's second turn goes back to the backend, and the slot, that holds its history.
    let x2 = post_json(&url, &conversation("X", &["hello", "ok", "more"], false)).await;
    assert_eq!(x2.status, 200);
    assert_eq!(served_by(&x2), home, "follow-up turn returns home");
    let bodies: Vec<serde_json::Value> = [a.seen(), b.seen()]
        .concat()
        .iter()
        .filter(|s| s.path == "/v1/chat/completions")
        .map(Seen::json)
        .collect();
    let slot_of = |first_turn: &str, n: usize| {
        bodies
            .iter()
            .find(|v| {
                v["messages"].as_array().is_some_and(|m| m.len() == n)
                    && v["messages"][1]["content"] == first_turn
            })
            .map(|v| (v["id_slot"].clone(), v["cache_prompt"].clone()))
    };
    let (slot1, cache1) = slot_of("hello", 2).expect("turn 1 reached the home backend");
    let (slot2, cache2) = slot_of("hello", 4).expect("turn 2 reached the home backend");
    assert!(
        slot1.is_u64(),
        "a slot id is sent to a backend with 2 slots: {slot1}"
    );
    assert_eq!(slot1, slot2, "the same slot both times");
    assert_eq!(
        (cache1, cache2),
        (serde_json::json!(true), serde_json::json!(true))
    );

    // The routing metrics saw an affinity decision and predictions to compare.
    let metrics = get(&gw.url("/metrics")).await.text();
    let taken = metrics
        .lines()
        .find(|l| l.starts_with("bitnet_gateway_affinity_decisions_total") && l.contains("taken"))
        .unwrap_or_else(|| panic!("no affinity decision in:\n{metrics}"));
    assert_eq!(
        taken.rsplit(' ').next(),
        Some("1"),
        "X's second turn: {taken}"
    );
    let predicted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("bitnet_gateway_ttft_prediction_error_seconds_count"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(predicted, 3, "every request's prediction is checked");
}

#[tokio::test]
async fn a_slot_the_client_chose_is_left_alone_and_one_slot_backends_get_no_slot_id() {
    let two = FakeBackend::start("two", 2, ok()).await;
    let gw = gateway_over(&[&two], "").await;
    gw.wait_until(|g| g.pools()[0].backends()[0].has_slot(1))
        .await;
    let body = conversation("Z", &["q"], false).replacen('{', r#"{"id_slot":1,"#, 1);
    assert_eq!(
        post_json(&gw.url("/v1/chat/completions"), &body)
            .await
            .status,
        200
    );
    let sent = two.seen().pop().unwrap();
    let text = String::from_utf8_lossy(&sent.body).to_string();
    assert_eq!(text.matches("\"id_slot\"").count(), 1, "{text}");
    assert_eq!(sent.json()["id_slot"], 1);

    let one = FakeBackend::start("one", 1, ok()).await;
    let gw = gateway_over(&[&one], "").await;
    assert_eq!(
        post_json(
            &gw.url("/v1/chat/completions"),
            &conversation("Z", &["q"], false)
        )
        .await
        .status,
        200
    );
    assert!(
        one.seen().pop().unwrap().json().get("id_slot").is_none(),
        "with one slot there is nothing to choose"
    );
}

#[tokio::test]
async fn a_request_that_cannot_start_within_the_queue_timeout_is_refused_at_once() {
    let be = FakeBackend::start("a", 1, held()).await;
    // Defaults predict a 1,000-token answer at 18 tokens/s: about a minute of work.
    let gw = gateway_over(&[&be], "[queue]\ntimeout_secs = 5\n").await;
    let url = gw.url("/v1/chat/completions");
    let long =
        r#"{"model":"m","max_tokens":1000,"messages":[{"role":"user","content":"write a lot"}]}"#;
    let busy = tokio::spawn({
        let url = url.clone();
        async move { post_json(&url, long).await }
    });
    wait_for(|| be.active() == 1).await;

    let started = Instant::now();
    let got = post_json(&url, &chat(1, false)).await;
    let took = started.elapsed();
    got.assert_openai_error(429, "queue_wait_too_long");
    assert!(
        took < Duration::from_secs(2),
        "refused on arrival, not after the timeout: {took:?}"
    );
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After from the estimate: {retry}");
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("predicted"));
    assert_eq!(gw.queue_len(), 0, "nothing was queued");

    be.release(1);
    assert_eq!(busy.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_waiting_stream_gets_queued_comments_then_the_backends_stream() {
    let be = FakeBackend::start("a", 1, |seen: &Seen| {
        if seen.json()["stream"] == true {
            Reply::Sse(vec![
                (
                    Duration::ZERO,
                    bytes::Bytes::from_static(
                        b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
                    ),
                ),
                (
                    Duration::ZERO,
                    bytes::Bytes::from_static(b"data: [DONE]\n\n"),
                ),
            ])
        } else {
            Reply::Held(Box::new(Reply::Json(200, completion_json("ok"))))
        }
    })
    .await;
    let gw = gateway_over(
        &[&be],
        "[queue]\ntimeout_secs = 600\nsse_comments_secs = 0.05\n",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let busy = tokio::spawn({
        let url = url.clone();
        async move { post_json(&url, &chat(0, false)).await }
    });
    wait_for(|| be.active() == 1).await;

    // The head arrives while the request waits in the queue.
    let resp = tokio::time::timeout(Duration::from_secs(2), send(post(&url, chat(1, true))))
        .await
        .expect("the head is sent while queued");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut text = String::new();
    while text.matches(": queued").count() < 2 {
        let frame = body.frame().await.expect("more comments").unwrap();
        text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap()));
    }
    assert!(text.contains(": queued position=1 eta="), "{text}");
    assert_eq!(gw.queue_len(), 1);

    be.release(1);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(
        text.ends_with(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n"
        ),
        "{text}"
    );
    assert_eq!(busy.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_queued_stream_that_times_out_ends_with_an_error_event() {
    let be = FakeBackend::start("a", 1, held()).await;
    // least-loaded does not predict, so the request waits out the timeout.
    let gw = TestGateway::over(
        &[be.url()],
        "[queue]\ntimeout_secs = 0.3\nsse_comments_secs = 0.05\n",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let busy = tokio::spawn({
        let url = url.clone();
        async move { post_json(&url, &chat(0, false)).await }
    });
    wait_for(|| be.active() == 1).await;
    let got = post_json(&url, &chat(1, true)).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(text.starts_with(": queued position=1\n\n"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "queue_timeout");
    be.release(1);
    assert_eq!(busy.await.unwrap().status, 200);
}

#[tokio::test]
async fn waiters_are_served_by_priority_from_their_key_or_a_trusted_header() {
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(
        &[be.url()],
        concat!(
            "[[api_keys]]\nname = \"batch\"\nkey = \"key-batch\"\n",
            "[[api_keys]]\nname = \"live\"\nkey = \"key-live\"\n",
            "[queue]\npriority_header = \"x-priority\"\nkey_priority = { live = 5 }\n",
        ),
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let request = |id: usize, key: &str, priority: Option<&str>| {
        let mut req = post(&url, chat(id, false));
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        if let Some(p) = priority {
            req.headers_mut().insert("x-priority", p.parse().unwrap());
        }
        tokio::spawn(async move { read(send(req).await).await })
    };
    let mut tasks = vec![request(0, "key-batch", None)];
    wait_for(|| be.active() == 1).await;
    // Queued in this order: plain, by key priority 5, by header priority 8.
    for (i, (key, p)) in [
        ("key-batch", None),
        ("key-live", None),
        ("key-batch", Some("8")),
    ]
    .into_iter()
    .enumerate()
    {
        tasks.push(request(i + 1, key, p));
        wait_for(|| gw.queue_len() == i + 1).await;
    }
    for n in 2..=4 {
        be.release(1);
        wait_for(|| be.count() == n).await;
    }
    be.release(1);
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let order: Vec<String> = be.seen().iter().map(|s| s.first_message()).collect();
    assert_eq!(order, ["request 0", "request 3", "request 2", "request 1"]);
}
