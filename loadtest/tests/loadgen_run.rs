//! The load generator against scriptable fake OpenAI servers: what it measures, what it sends,
//! how it paces and bounds runs, and the files it writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use loadtest::gen::{self, ErrorKind, Load, RunConfig, RunResult, WorkloadKind};
use serde_json::{json, Value};
use testkit::child::ChildGuard;
use testkit::fake_backend::{FakeBackend, Reply, Seen};

// === SSE building blocks ===

fn event(value: Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn role_chunk() -> Bytes {
    event(json!({"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}))
}

fn content_chunk(text: &str) -> Bytes {
    event(json!({"choices":[{"index":0,"delta":{"content":text}}]}))
}

fn finish_chunk() -> Bytes {
    event(json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}))
}

fn usage_chunk(prompt: u64, completion: u64, cached: u64) -> Bytes {
    event(json!({
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached}
        }
    }))
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A well-formed stream: the role chunk at once, the first token after `first`, the others
/// `gap` apart, then finish, usage and `[DONE]`.
fn stream_of(tokens: &[&str], first: Duration, gap: Duration) -> Reply {
    let mut chunks = vec![(Duration::ZERO, role_chunk())];
    for (i, token) in tokens.iter().enumerate() {
        let delay = if i == 0 { first } else { gap };
        chunks.push((delay, content_chunk(token)));
    }
    chunks.push((Duration::ZERO, finish_chunk()));
    chunks.push((Duration::ZERO, usage_chunk(40, tokens.len() as u64, 30)));
    chunks.push((Duration::ZERO, done()));
    Reply::Sse(chunks)
}

fn completion_json(text: &str) -> String {
    json!({
        "choices": [{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3}
    })
    .to_string()
}

fn ok_stream() -> Reply {
    stream_of(&["a", "b"], Duration::ZERO, Duration::ZERO)
}

fn config(server: &FakeBackend) -> RunConfig {
    let mut cfg = RunConfig::new(server.url(), "test-model");
    cfg.timeout = Duration::from_secs(10);
    cfg.system_prompt_chars = 3_000;
    cfg
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn temp_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("loadgen-{}-{name}", std::process::id()))
}

// === measurements ===

/// A backend streaming four tokens, the first after 300 ms and the others 60 ms apart, and
/// a run of two streamed requests to it.
async fn two_streams_of_four_tokens() -> (FakeBackend, RunConfig) {
    let server = FakeBackend::start("fake", 1, |_| {
        stream_of(
            &["Hel", "lo", " there", "!"],
            Duration::from_millis(300),
            Duration::from_millis(60),
        )
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.max_requests = Some(2);
    (server, cfg)
}

#[tokio::test]
async fn ttft_counts_to_the_first_content_chunk_and_itl_to_the_gaps_between_them() {
    let (_server, cfg) = two_streams_of_four_tokens().await;
    let result = gen::run(cfg).await.unwrap();

    assert_eq!(result.records.len(), 2);
    for r in &result.records {
        assert!(r.ok(), "{r:?}");
        let ttft = ms(r.ttft_us.unwrap());
        // The role chunk arrives at once; counting it would give a TTFT near zero.
        assert!((300.0..450.0).contains(&ttft), "ttft {ttft} ms");
        let itl = ms(r.itl_mean_us.unwrap());
        assert!((55.0..120.0).contains(&itl), "itl {itl} ms");
        let e2e = ms(r.e2e_us);
        assert!(e2e >= 300.0 + 3.0 * 60.0, "e2e {e2e} ms");
        assert_eq!(r.completion_tokens, 4);
        assert_eq!(r.prompt_tokens, Some(40));
        assert_eq!(r.cached_tokens, Some(30));
        assert_eq!(r.status, Some(200));
        let decode = r.decode_tokens_per_s.unwrap();
        assert!((5.0..20.0).contains(&decode), "decode {decode} tok/s");
    }
    let s = result.summary();
    assert_eq!(s.itl_us.count, 6, "three gaps per request");
    assert!((55.0..120.0).contains(&ms(s.itl_us.p50)));
    assert!((300.0..450.0).contains(&ms(s.ttft_us.p50)));
    assert_eq!(s.completion_tokens, 8);
    assert_eq!(s.cache_hit_ratio(), Some(0.75));
}

#[tokio::test]
async fn token_times_are_each_content_chunks_arrival_and_kept_only_when_asked() {
    let (_server, mut cfg) = two_streams_of_four_tokens().await;
    cfg.token_times = true;
    let result = gen::run(cfg.clone()).await.unwrap();
    for r in &result.records {
        let times = r.token_us.as_ref().expect("token times were asked for");
        assert_eq!(times.len(), 4, "one per content chunk: {times:?}");
        // The first is the moment the TTFT measured, on the run's clock.
        assert_eq!(times[0], r.start_us + r.ttft_us.unwrap());
        for pair in times.windows(2) {
            let gap = pair[1].checked_sub(pair[0]).expect("in order");
            assert!((55_000..120_000).contains(&gap), "gap {gap} us");
        }
        assert!(*times.last().unwrap() <= r.end_us());
    }
    // The inter-token histogram is built from the same arrivals: three gaps a request.
    assert_eq!(result.summary().itl_us.count, 6);
    let json = serde_json::to_string(&result).unwrap();
    let back: RunResult = serde_json::from_str(&json).unwrap();
    // Token times only: serde_json reads a float back to within its last digit, not exactly.
    let token_times = |r: &RunResult| {
        r.records
            .iter()
            .map(|r| r.token_us.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(token_times(&back), token_times(&result));

    cfg.token_times = false;
    let plain = gen::run(cfg).await.unwrap();
    assert!(plain.records.iter().all(|r| r.token_us.is_none()));
    let json = serde_json::to_string(&plain).unwrap();
    assert!(
        !json.contains("token_us"),
        "absent, not null, when not asked"
    );
}

#[tokio::test]
async fn without_usage_tokens_are_counted_from_content_chunks() {
    let server = FakeBackend::start("fake", 1, |_| {
        Reply::Sse(vec![
            (Duration::ZERO, content_chunk("x")),
            (Duration::ZERO, content_chunk("")),
            (Duration::ZERO, content_chunk("y")),
            (Duration::ZERO, content_chunk("z")),
            (Duration::ZERO, done()),
        ])
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.max_requests = Some(1);
    let result = gen::run(cfg).await.unwrap();
    let r = &result.records[0];
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.completion_tokens, 3, "the empty delta is not a token");
    assert_eq!(r.prompt_tokens, None);
}

#[tokio::test]
async fn non_streaming_requests_take_ttft_from_the_head_and_counts_from_usage() {
    let server = FakeBackend::start("fake", 1, |_| Reply::Json(200, completion_json("hi"))).await;
    let mut cfg = config(&server);
    cfg.max_requests = Some(3);
    cfg.api_key = Some("sekrit".into());
    let result = gen::run(cfg).await.unwrap();
    assert_eq!(result.summary().succeeded, 3);
    for r in &result.records {
        assert!(r.ttft_us.unwrap() <= r.e2e_us);
        assert_eq!(r.completion_tokens, 3);
        assert_eq!(r.prompt_tokens, Some(12));
        assert_eq!(r.itl_mean_us, None);
    }
    assert_eq!(result.summary().itl_us.count, 0);
    for seen in server.seen() {
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.headers["authorization"], "Bearer sekrit");
        let body = seen.json();
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["stream"], false);
        assert_eq!(body["max_tokens"], 64);
        assert!(body.get("stream_options").is_none());
    }
}

#[tokio::test]
async fn streaming_requests_ask_for_usage_and_honour_max_tokens() {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.max_tokens = Some(7);
    cfg.max_requests = Some(1);
    gen::run(cfg).await.unwrap();
    let body = server.seen()[0].json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 7);
    assert_eq!(server.seen()[0].headers["accept"], "text/event-stream");
}

// === errors ===

#[tokio::test]
async fn rate_limits_and_unavailability_are_counted_apart() {
    let n = Arc::new(AtomicUsize::new(0));
    let server = FakeBackend::start("fake", 1, move |_| {
        let error = |code: u16, kind: &str| {
            Reply::Json(
                code,
                json!({"error":{"code":code,"message":format!("{kind} says no"),"type":kind}})
                    .to_string(),
            )
        };
        match n.fetch_add(1, Ordering::SeqCst) % 6 {
            0..=2 => error(429, "rate_limit_error"),
            3 => error(503, "unavailable_error"),
            4 => error(400, "invalid_request_error"),
            _ => ok_stream(),
        }
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.max_requests = Some(12);
    let result = gen::run(cfg).await.unwrap();
    let s = result.summary();
    assert_eq!(s.requests, 12);
    assert_eq!(s.succeeded, 2);
    let expected: BTreeMap<ErrorKind, u64> = [
        (ErrorKind::RateLimited, 6),
        (ErrorKind::Unavailable, 2),
        (ErrorKind::ClientError, 2),
    ]
    .into();
    assert_eq!(s.errors, expected);
    assert_eq!(s.statuses[&429], 6);
    assert_eq!(s.statuses[&503], 2);
    let limited = result
        .records
        .iter()
        .find(|r| r.error == Some(ErrorKind::RateLimited))
        .unwrap();
    assert!(
        limited
            .error_message
            .as_deref()
            .unwrap()
            .contains("rate_limit_error says no"),
        "{limited:?}"
    );
    // The summary says why each kind failed, not only how often.
    assert!(
        s.error_examples[&ErrorKind::ClientError].contains("invalid_request_error says no"),
        "{:?}",
        s.error_examples
    );
    let table = gen::report::table(&result);
    assert!(
        table.contains("invalid_request_error says no")
            && table.contains("unavailable_error says no"),
        "{table}"
    );
    let html = gen::html::render(&result);
    assert!(html.contains("invalid_request_error says no"), "{html}");
    // Failed requests must not pollute the latency figures.
    assert_eq!(s.ttft_us.count, 2);
}

#[tokio::test]
async fn mid_stream_errors_and_cut_streams_are_counted_as_such() {
    let n = Arc::new(AtomicUsize::new(0));
    let server = FakeBackend::start("fake", 1, move |_| match n.fetch_add(1, Ordering::SeqCst) {
        // Upstream llama-server: an error event, then the connection ends without [DONE].
        0 => Reply::Sse(vec![
            (Duration::ZERO, content_chunk("partial")),
            (
                Duration::ZERO,
                event(
                    json!({"error":{"code":500,"message":"decode failed","type":"server_error"}}),
                ),
            ),
        ]),
        // The older BitNet fork: a non-standard `error:` field, status 200, then [DONE].
        1 => Reply::Sse(vec![
            (Duration::ZERO, content_chunk("partial")),
            (
                Duration::ZERO,
                Bytes::from_static(b"error: {\"message\":\"context shift failed\"}\n\n"),
            ),
            (Duration::ZERO, done()),
        ]),
        // The connection breaks after some tokens.
        2 => Reply::SseThenBreak(vec![role_chunk(), content_chunk("cut")]),
        // The body ends cleanly but without [DONE] or a finish reason.
        3 => Reply::Sse(vec![(Duration::ZERO, content_chunk("stops"))]),
        _ => ok_stream(),
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.max_requests = Some(5);
    let result = gen::run(cfg).await.unwrap();
    let kinds: Vec<Option<ErrorKind>> = result.records.iter().map(|r| r.error).collect();
    assert_eq!(
        kinds,
        vec![
            Some(ErrorKind::MidStream),
            Some(ErrorKind::MidStream),
            Some(ErrorKind::Truncated),
            Some(ErrorKind::Truncated),
            None
        ]
    );
    assert_eq!(
        result.records[0].error_message.as_deref(),
        Some("decode failed")
    );
    assert!(result.records[1]
        .error_message
        .as_deref()
        .unwrap()
        .contains("context shift failed"));
    assert_eq!(result.records[0].status, Some(200));
    assert_eq!(result.summary().errors[&ErrorKind::MidStream], 2);
    assert_eq!(result.summary().errors[&ErrorKind::Truncated], 2);
}

#[tokio::test]
async fn refused_connections_are_connect_errors() {
    let mut server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    server.stop();
    // Give the aborted accept task a moment to close the listening socket.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut cfg = config(&server);
    cfg.max_requests = Some(3);
    let result = gen::run(cfg).await.unwrap();
    assert_eq!(result.summary().errors[&ErrorKind::Connect], 3);
    assert!(result.records.iter().all(|r| r.status.is_none()));
}

#[tokio::test]
async fn a_stalled_server_times_out() {
    let server = FakeBackend::start("fake", 1, |_| Reply::Held(Box::new(ok_stream()))).await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.timeout = Duration::from_millis(300);
    cfg.max_requests = Some(2);
    cfg.load = Load::Closed { concurrency: 2 };
    let started = Instant::now();
    let result = gen::run(cfg).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(result.summary().errors[&ErrorKind::Timeout], 2);
    for r in &result.records {
        assert!((300.0..1500.0).contains(&ms(r.e2e_us)), "{r:?}");
    }
}

// === what is sent ===

/// The reply the agent test server gives to a conversation: derived from its content, so the
/// test can tell which reply belongs to which request.
fn agent_reply_text(body: &Value) -> String {
    let messages = body["messages"].as_array().unwrap();
    let last = messages.last().unwrap()["content"].as_str().unwrap();
    format!(
        "reply to [{}] after {} messages",
        &last[..12],
        messages.len()
    )
}

#[tokio::test]
async fn agent_sessions_resend_their_growing_history_with_the_replies_they_got() {
    let server = FakeBackend::start("fake", 1, |seen: &Seen| {
        let text = agent_reply_text(&seen.json());
        // Split the reply over chunks, as a server would, to check they are joined.
        let (a, b) = text.split_at(text.len() / 2);
        let (a, b) = (a.to_owned(), b.to_owned());
        stream_of(&[&a, &b], Duration::ZERO, Duration::from_millis(1))
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.workload = "agent".parse().unwrap();
    cfg.turns = 3;
    cfg.think_time = Duration::from_millis(100);
    cfg.system_prompt_chars = 5_000;
    cfg.load = Load::Closed { concurrency: 2 };
    cfg.max_requests = Some(6);
    let result = gen::run(cfg).await.unwrap();
    assert_eq!(result.summary().succeeded, 6);

    let bodies: Vec<Value> = server.seen().iter().map(Seen::json).collect();
    assert_eq!(bodies.len(), 6);
    let system = &bodies[0]["messages"][0];
    assert_eq!(system["role"], "system");
    assert_eq!(system["content"].as_str().unwrap().len(), 5_000);
    let mut by_length: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, body) in bodies.iter().enumerate() {
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(
            &messages[0], system,
            "every session shares the system prompt"
        );
        assert_eq!(messages.last().unwrap()["role"], "user");
        *by_length.entry(messages.len()).or_default() += 1;
        if messages.len() == 2 {
            continue;
        }
        // A later turn: its history must be an earlier request's messages plus the reply that
        // request got, then a new user message.
        let previous = &messages[..messages.len() - 2];
        let earlier = bodies[..i]
            .iter()
            .find(|b| b["messages"].as_array().unwrap().as_slice() == previous)
            .unwrap_or_else(|| panic!("request {i} continues no earlier request"));
        let assistant = &messages[messages.len() - 2];
        assert_eq!(assistant["role"], "assistant");
        assert_eq!(assistant["content"], agent_reply_text(earlier).as_str());
    }
    assert_eq!(by_length, [(2, 2), (4, 2), (6, 2)].into());

    // Turns of one session are spaced by at least the think time.
    for r in result.records.iter().filter(|r| r.turn > 1) {
        let before = result
            .records
            .iter()
            .find(|p| p.session == r.session && p.turn == r.turn - 1)
            .unwrap();
        assert!(
            r.start_us >= before.end_us() + 100_000,
            "turn {} of session {} started {} us after the previous reply",
            r.turn,
            r.session,
            r.start_us as i64 - before.end_us() as i64
        );
    }
}

#[tokio::test]
async fn long_prompt_sends_thousands_of_words() {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let mut cfg = config(&server);
    cfg.workload = "long-prompt".parse().unwrap();
    cfg.max_requests = Some(2);
    gen::run(cfg).await.unwrap();
    for seen in server.seen() {
        let body = seen.json();
        let words = body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count();
        assert!(words >= 1500, "{words} words");
        assert_eq!(body["max_tokens"], 128);
    }
}

// === pacing, bounds and repeatability ===

fn sorted_bodies(server: &FakeBackend) -> Vec<String> {
    let mut bodies: Vec<String> = server
        .seen()
        .iter()
        .map(|s| String::from_utf8(s.body.to_vec()).unwrap())
        .collect();
    bodies.sort();
    bodies
}

async fn seeded_run(seed: u64) -> (RunResult, Vec<String>) {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.seed = seed;
    cfg.workload = "mix:short-chat=2,long-prompt=1".parse().unwrap();
    cfg.load = Load::Open {
        rate: 200.0,
        max_in_flight: 1000,
    };
    cfg.max_requests = Some(25);
    let result = gen::run(cfg).await.unwrap();
    let bodies = sorted_bodies(&server);
    (result, bodies)
}

fn schedule(result: &RunResult) -> Vec<(u64, u64, WorkloadKind)> {
    let mut s: Vec<_> = result
        .records
        .iter()
        .map(|r| (r.scheduled_us.unwrap(), r.session, r.workload))
        .collect();
    s.sort();
    s
}

#[tokio::test]
async fn the_same_seed_repeats_prompts_and_arrival_schedule() {
    let (a, a_bodies) = seeded_run(7).await;
    let (b, b_bodies) = seeded_run(7).await;
    let (c, c_bodies) = seeded_run(8).await;
    assert_eq!(a_bodies.len(), 25);
    assert_eq!(a_bodies, b_bodies);
    assert_eq!(schedule(&a), schedule(&b));
    assert_ne!(a_bodies, c_bodies);
    assert_ne!(schedule(&a), schedule(&c));
    let kinds: Vec<_> = schedule(&a).iter().map(|s| s.2).collect();
    assert!(kinds.contains(&WorkloadKind::ShortChat) && kinds.contains(&WorkloadKind::LongPrompt));
}

#[tokio::test]
async fn a_run_to_its_duration_is_timed_over_all_of_it() {
    // At 4 arrivals a second over 1.5 s, the last one lands well before the end, and its
    // answer is instant: the rate is still over the whole 1.5 s, not up to that answer.
    let server = FakeBackend::start("fake", 1, |_| Reply::Json(200, completion_json("hi"))).await;
    let mut cfg = config(&server);
    cfg.load = Load::Open {
        rate: 4.0,
        max_in_flight: 100,
    };
    cfg.duration = Some(Duration::from_millis(1500));
    cfg.seed = 5;
    let result = gen::run(cfg).await.unwrap();
    assert!(!result.interrupted);
    let s = result.summary();
    assert!(s.wall_secs >= 1.5, "wall {} s", s.wall_secs);
    let expected = s.succeeded as f64 / s.wall_secs;
    assert!((s.requests_per_s - expected).abs() < 1e-9);
    // A request budget spent before the deadline ends the run, and its time, early.
    let mut cfg = config(&server);
    cfg.max_requests = Some(2);
    cfg.duration = Some(Duration::from_secs(30));
    let result = gen::run(cfg).await.unwrap();
    assert!(
        result.summary().wall_secs < 5.0,
        "{}",
        result.summary().wall_secs
    );
}

#[tokio::test]
async fn open_loop_arrivals_follow_a_poisson_process_at_the_requested_rate() {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.load = Load::Open {
        rate: 400.0,
        max_in_flight: 1000,
    };
    cfg.duration = Some(Duration::from_millis(1500));
    cfg.seed = 11;
    let result = gen::run(cfg).await.unwrap();
    let n = result.records.len() as f64;
    // 600 expected; a Poisson count has a standard deviation of about 24.5.
    assert!((500.0..700.0).contains(&n), "{n} arrivals");
    assert_eq!(server.count(), result.records.len());

    let mut times: Vec<u64> = result
        .records
        .iter()
        .map(|r| r.scheduled_us.unwrap())
        .collect();
    times.sort_unstable();
    assert!(*times.last().unwrap() < 1_500_000);
    let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
    // Exponential gaps: the standard deviation equals the mean. Evenly spaced arrivals would
    // give a ratio near 0.
    let cv = sd / mean;
    assert!((0.85..1.15).contains(&cv), "coefficient of variation {cv}");
    assert!((2000.0..3000.0).contains(&mean), "mean gap {mean} us");

    // Requests really leave on schedule: never early, and typically soon after their time
    // (generously bounded, as this box may be busy with other work).
    let mut lags: Vec<i64> = result
        .records
        .iter()
        .map(|r| r.start_us as i64 - r.scheduled_us.unwrap() as i64)
        .collect();
    lags.sort_unstable();
    assert!(lags[0] >= -1_000, "a request left {} us early", -lags[0]);
    let median_lag = lags[lags.len() / 2];
    assert!(median_lag < 100_000, "median lag {median_lag} us");
}

#[tokio::test]
async fn a_request_budget_is_met_exactly_in_both_loops() {
    for load in [
        Load::Closed { concurrency: 4 },
        Load::Open {
            rate: 1000.0,
            max_in_flight: 100,
        },
    ] {
        let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
        let mut cfg = config(&server);
        cfg.load = load;
        cfg.max_requests = Some(10);
        let result = gen::run(cfg).await.unwrap();
        assert_eq!(result.records.len(), 10, "{load:?}");
        assert_eq!(server.count(), 10, "{load:?}");
    }
}

#[tokio::test]
async fn open_loop_drops_arrivals_beyond_max_in_flight() {
    let server = FakeBackend::start("fake", 1, |_| Reply::Held(Box::new(ok_stream()))).await;
    let mut cfg = config(&server);
    cfg.load = Load::Open {
        rate: 200.0,
        max_in_flight: 3,
    };
    cfg.duration = Some(Duration::from_millis(400));
    cfg.drain = Duration::from_millis(100);
    let result = gen::run(cfg).await.unwrap();
    let s = result.summary();
    assert_eq!(s.requests, 3);
    assert_eq!(s.cancelled, 3);
    assert!(s.errors.is_empty(), "cut requests are not target failures");
    assert!(s.dropped_arrivals > 30, "{} dropped", s.dropped_arrivals);
}

#[tokio::test]
async fn duration_stops_new_requests_and_cancels_stragglers_after_the_drain() {
    let n = Arc::new(AtomicUsize::new(0));
    let server = FakeBackend::start("fake", 1, move |_| {
        if n.fetch_add(1, Ordering::SeqCst) < 4 {
            ok_stream()
        } else {
            Reply::Held(Box::new(ok_stream()))
        }
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.load = Load::Closed { concurrency: 2 };
    cfg.duration = Some(Duration::from_millis(300));
    cfg.drain = Duration::from_millis(200);
    let started = Instant::now();
    let result = gen::run(cfg).await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(480)..Duration::from_millis(1500)).contains(&elapsed),
        "{elapsed:?}"
    );
    let s = result.summary();
    assert_eq!(s.succeeded, 4);
    assert_eq!(s.cancelled, 2);
    assert_eq!(s.failed, 0);
    assert_eq!(server.count(), 6, "nothing starts after the duration");
}

#[tokio::test]
async fn an_interrupt_cancels_requests_in_flight_and_returns_the_results_so_far() {
    let n = Arc::new(AtomicUsize::new(0));
    let server = FakeBackend::start("fake", 1, move |_| {
        if n.fetch_add(1, Ordering::SeqCst) < 3 {
            ok_stream()
        } else {
            Reply::Held(Box::new(ok_stream()))
        }
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.workload = "agent".parse().unwrap();
    cfg.think_time = Duration::from_secs(60);
    cfg.load = Load::Closed { concurrency: 4 };
    cfg.max_requests = Some(1000);
    let started = Instant::now();
    let result = gen::run_until(cfg, tokio::time::sleep(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let s = result.summary();
    // Three sessions got a reply and are thinking; the fourth is held until the interrupt.
    assert_eq!(s.succeeded, 3);
    assert_eq!(s.cancelled, 1);
    assert_eq!(
        result
            .records
            .iter()
            .filter(|r| r.error == Some(ErrorKind::Cancelled))
            .count(),
        1
    );
    assert_eq!(server.count(), 4, "nothing starts after the interrupt");
    assert!(result.interrupted);
}

// === files and comparison ===

async fn run_with_first_token_after(delay: Duration) -> RunResult {
    let server = FakeBackend::start("fake", 1, move |_| {
        stream_of(&["one", "two", "three"], delay, Duration::from_millis(10))
    })
    .await;
    let mut cfg = config(&server);
    cfg.stream = true;
    cfg.load = Load::Closed { concurrency: 4 };
    cfg.max_requests = Some(12);
    gen::run(cfg).await.unwrap()
}

/// Equal JSON, except that floats may differ in their last bit: serde_json's default parser
/// does not promise to read back exactly the shortest representation it wrote.
fn assert_json_close(a: &Value, b: &Value) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-12 * x.abs().max(y.abs()), "{x} != {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).for_each(|(x, y)| assert_json_close(x, y));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            x.iter()
                .zip(y.values())
                .for_each(|((_, x), y)| assert_json_close(x, y));
        }
        _ => assert_eq!(a, b),
    }
}

#[tokio::test]
async fn results_are_written_as_json_and_a_self_contained_html_report() {
    let result = run_with_first_token_after(Duration::from_millis(20)).await;
    let json_path = temp_path("results.json");
    let html_path = temp_path("report.html");
    result.write_json(&json_path).unwrap();
    result.write_html(&html_path).unwrap();

    let raw: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(raw["format"], gen::RESULTS_FORMAT);
    assert_eq!(raw["config"]["url"], result.config.url.as_str());
    assert_eq!(raw["config"]["workload"], "short-chat");
    assert_eq!(raw["config"]["load"]["mode"], "closed");
    assert_eq!(raw["records"].as_array().unwrap().len(), 12);
    assert!(raw["records"][0]["ttft_us"].as_u64().unwrap() >= 20_000);
    assert_eq!(raw["summary"]["requests"], 12);
    assert!(raw["summary"]["ttft_us"]["p99"].as_u64().is_some());
    let back = RunResult::read_json(&json_path).unwrap();
    assert_json_close(
        &serde_json::to_value(&back).unwrap(),
        &serde_json::to_value(&result).unwrap(),
    );

    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "CDF, histogram, two throughput charts"
    );
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(html.contains("Time to first token (CDF)"));
    assert!(html.contains("End-to-end latency (histogram)"));
    assert!(html.contains("Throughput over time"));
    assert!(html.contains("<polyline"));
    assert!(html.contains("<rect"));
    assert!(!html.contains("<script"), "no scripts");
    // The only URLs are the SVG namespace and the target named in the text.
    let urls = html.matches("http").count();
    let expected = html.matches("http://www.w3.org/2000/svg").count() + 1;
    assert_eq!(urls, expected, "no external assets");
    for tag in ["<html", "<body", "<table", "<g "] {
        let close = format!("</{}", &tag[1..].split(' ').next().unwrap());
        assert_eq!(
            html.matches(tag).count(),
            html.matches(&close).count(),
            "{tag}"
        );
    }

    let missing = temp_path("missing.json");
    assert!(RunResult::read_json(&missing).is_err());
    std::fs::write(&missing, "{\"format\":\"other\"}").unwrap();
    assert!(RunResult::read_json(&missing).is_err());
    for p in [json_path, html_path, missing] {
        let _ = std::fs::remove_file(p);
    }
}

fn run_binary(args: &[&str]) -> (bool, String) {
    let (code, out) = run_binary_code(args);
    (code == Some(0), out)
}

/// The binary's exit code and everything it wrote.
fn run_binary_code(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet-loadtest"));
    cmd.args(args);
    let mut child = ChildGuard::spawn(cmd).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("bitnet-loadtest should exit");
    // Let the output readers drain the closed pipes.
    child.wait_for_line(|_| false, Duration::from_secs(2));
    (status.code(), child.output_so_far())
}

#[tokio::test]
async fn flags_that_would_be_ignored_and_unwritable_outputs_are_refused_before_any_load() {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let url = server.url();
    let base = [
        "--url",
        url.as_str(),
        "--model",
        "m",
        "--requests",
        "2",
        "-q",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (extra, needle) in [
        (
            &["--think-time", "1"][..],
            "--think-time applies to agent sessions",
        ),
        (
            &["--workload", "long-prompt", "--turns", "3"],
            "--turns applies",
        ),
        (&["--concurrency", "2", "--max-in-flight", "3"], "--rate"),
        (&["--drain", "5"], "--duration"),
        (&["--json", "/nonexistent-dir/x.json"], "does not exist"),
        (&["--report", "/nonexistent-dir/x.html"], "does not exist"),
    ] {
        let args = with(extra);
        let out = tokio::task::spawn_blocking(move || {
            run_binary_code(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        assert!(matches!(out.0, Some(1 | 2)), "{extra:?}: {out:?}");
        assert!(out.1.contains(needle), "{extra:?}: {}", out.1);
    }
    assert_eq!(server.count(), 0, "a refused command line sent requests");
}

#[tokio::test]
async fn a_run_where_nothing_succeeds_exits_3() {
    let server = FakeBackend::start("fake", 1, |_| {
        Reply::Json(503, r#"{"error":{"message":"busy"}}"#.into())
    })
    .await;
    let url = server.url();
    let (code, out) = tokio::task::spawn_blocking(move || {
        run_binary_code(&["--url", &url, "--model", "m", "--requests", "2", "-q"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("none of the 2 requests succeeded"), "{out}");
}

#[tokio::test]
async fn compare_shows_b_over_a_ratios_in_the_library_and_the_cli() {
    let a = run_with_first_token_after(Duration::from_millis(50)).await;
    let b = run_with_first_token_after(Duration::from_millis(150)).await;
    let cmp = gen::compare::compare(a.summary(), b.summary());
    let ttft = cmp.row("TTFT p50 ms").unwrap();
    let ratio = ttft.ratio().unwrap();
    assert!((1.8..3.2).contains(&ratio), "TTFT ratio {ratio}");
    assert!((ttft.b.unwrap() / ttft.a.unwrap() - ratio).abs() < 1e-12);
    assert_eq!(cmp.row("requests").unwrap().ratio(), Some(1.0));

    let a_path = temp_path("a.json");
    let b_path = temp_path("b.json");
    a.write_json(&a_path).unwrap();
    b.write_json(&b_path).unwrap();
    let (ok, out) = tokio::task::spawn_blocking({
        let (a, b) = (a_path.clone(), b_path.clone());
        move || run_binary(&["compare", a.to_str().unwrap(), b.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("TTFT p50 ms"))
        .unwrap_or_else(|| panic!("no TTFT row in:\n{out}"));
    let printed: f64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!((printed - ratio).abs() < 0.001, "{line}");
    assert!(line.ends_with("worse"), "{line}");
    assert!(out.contains("B/A"));
    let _ = std::fs::remove_file(a_path);
    let _ = std::fs::remove_file(b_path);
}

#[test]
fn the_cli_refuses_unbounded_and_non_loopback_runs() {
    let (ok, out) = run_binary(&["--url", "http://127.0.0.1:9", "--model", "m", "-q"]);
    assert!(!ok);
    assert!(out.contains("unbounded"), "{out}");
    let (ok, out) = run_binary(&[
        "run",
        "--url",
        "http://192.0.2.1:80",
        "--model",
        "m",
        "--requests",
        "1",
    ]);
    assert!(!ok);
    assert!(out.contains("--allow-remote"), "{out}");
    let (ok, out) = run_binary(&[
        "--url",
        "x",
        "--model",
        "m",
        "--requests",
        "1",
        "--concurrency",
        "2",
        "--rate",
        "3",
    ]);
    assert!(!ok);
    assert!(out.contains("cannot be used with"), "{out}");
}

#[tokio::test]
async fn the_cli_runs_load_and_writes_both_files() {
    let server = FakeBackend::start("fake", 1, |_| ok_stream()).await;
    let json_path = temp_path("cli.json");
    let html_path = temp_path("cli.html");
    let args: Vec<String> = [
        "--url",
        &server.url(),
        "--model",
        "cli-model",
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--stream",
        "--workload",
        "mix:short-chat=1,agent=1",
        "--turns",
        "2",
        "--think-time",
        "0",
        "--seed",
        "3",
        "--json",
        json_path.to_str().unwrap(),
        "--report",
        html_path.to_str().unwrap(),
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run_binary(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("5 ok, 0 failed"), "{out}");
    assert!(out.contains("TTFT"), "{out}");
    assert_eq!(server.count(), 5);
    assert_eq!(server.seen()[0].json()["model"], "cli-model");
    let result = RunResult::read_json(&json_path).unwrap();
    assert_eq!(result.summary.requests, 5);
    assert_eq!(result.config.seed, 3);
    assert_eq!(
        result.config.workload.to_string(),
        "mix:short-chat=1,agent=1"
    );
    assert!(std::fs::read_to_string(&html_path)
        .unwrap()
        .contains("<svg"));
    let _ = std::fs::remove_file(json_path);
    let _ = std::fs::remove_file(html_path);
}
