//! The context guard against a backend whose context it learned from `/props`.

mod common;

use common::*;
use testkit::fake_backend::{FakeBackend, Reply};

/// A chat body whose rough estimate (characters / 4) is near the fake backend's 4,096-token
/// context, so that the guard asks the backend to count it.
fn near_the_limit() -> String {
    let text = "word ".repeat(2500);
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#)
}

fn tokenizes(be: &FakeBackend) -> usize {
    be.seen().iter().filter(|s| s.path == "/tokenize").count()
}

#[tokio::test]
async fn a_prompt_near_the_limit_is_counted_by_the_backend_unless_the_queue_is_full() {
    // Counts 5,000 tokens for a prompt over 14,000 characters, 100 for anything else;
    // completions are held until the test lets them go.
    let be = FakeBackend::start("a", 1, |s| {
        if s.path == "/tokenize" {
            let n = if s.body.len() > 14_000 { 5000 } else { 100 };
            Reply::Json(200, format!(r#"{{"tokens":[{}]}}"#, vec!["1"; n].join(",")))
        } else {
            Reply::Held(Box::new(Reply::Json(200, completion_json("ok"))))
        }
    })
    .await;
    let gw = TestGateway::over(&[be.url()], "[queue]\nmax = 1").await;
    gw.wait_until(|g| g.pools()[0].backends()[0].n_ctx() == Some(4096))
        .await;
    let url = gw.url("/v1/chat/completions");

    // The backend's count, not the estimate (about 3,100), decides.
    let over = near_the_limit().replace("word ", "words ");
    let refused = post_json(&url, &over).await;
    refused.assert_openai_error(400, "context_length_exceeded");
    assert_eq!(tokenizes(&be), 1);

    // One request takes the only slot, one waits: the queue is full.
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post_json(&url, &near_the_limit()).await })
    };
    gw.wait_until(|_| gw.inflight(0) == 1).await;
    assert_eq!(tokenizes(&be), 2, "a prompt near the limit was not counted");
    let second = {
        let url = url.clone();
        tokio::spawn(async move { post_json(&url, &chat(1, false)).await })
    };
    gw.wait_until(|_| gw.queue_len() == 1).await;

    // Refused for the full queue without asking the backend to count.
    let refused = post_json(&url, &near_the_limit()).await;
    refused.assert_openai_error(429, "queue_full");
    assert_eq!(
        tokenizes(&be),
        2,
        "the backend counted a request refused anyway"
    );

    be.release(2);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
}
