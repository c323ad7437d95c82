//! Slot prompt caches: re-sent history is not evaluated again, unless caching is off.

use loadtest::sim::{Dialect, SimConfig};
use serde_json::{json, Value};

use crate::support::{words, TestSim};

const MAX_TOKENS: u64 = 20;

/// One conversation, kept as the messages a client re-sends every turn.
struct Conversation {
    messages: Vec<Value>,
}

impl Conversation {
    fn new(system: String) -> Conversation {
        Conversation {
            messages: vec![json!({"role": "system", "content": system})],
        }
    }

    /// Sends `user` with the whole history and records the answer; returns the response JSON
    /// and the time it took.
    async fn turn(
        &mut self,
        sim: &TestSim,
        user: &str,
        extra: Value,
    ) -> (Value, std::time::Duration) {
        self.messages.push(json!({"role": "user", "content": user}));
        let mut body = json!({"messages": self.messages, "max_tokens": MAX_TOKENS});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let reply = sim.post("/v1/chat/completions", &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let v = reply.json();
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned();
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        (v, reply.elapsed)
    }
}

fn n(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {pointer} in {v}"))
}

#[tokio::test(start_paused = true)]
async fn second_turn_reuses_the_history_its_slot_holds_and_is_faster() {
    let sim = TestSim::start(SimConfig::new(Dialect::LlamaCpp)).await;
    let mut conv = Conversation::new(words(300));

    let (first, first_took) = conv.turn(&sim, "Tell me about slots", json!({})).await;
    assert_eq!(n(&first, "/timings/cache_n"), 0);
    let held = n(&first, "/usage/prompt_tokens") + n(&first, "/usage/completion_tokens");

    let (second, second_took) = conv.turn(&sim, "And caches?", json!({})).await;
    // The slot holds turn one's prompt and answer; all of it is a prefix of turn two.
    assert_eq!(n(&second, "/timings/cache_n"), held);
    assert_eq!(
        n(&second, "/usage/prompt_tokens_details/cached_tokens"),
        held
    );
    let prompt_n = n(&second, "/timings/prompt_n");
    assert_eq!(prompt_n + held, n(&second, "/usage/prompt_tokens"));
    assert!(prompt_n < 12, "only the new turn is evaluated: {prompt_n}");
    // 300+ tokens at 60 tok/s is over 5 s; the new turn is a fraction of a second.
    assert!(
        second_took * 3 < first_took,
        "{second_took:?} vs {first_took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cache_prompt_false_evaluates_the_whole_prompt_again() {
    let sim = TestSim::start(SimConfig::new(Dialect::LlamaCpp)).await;
    let mut conv = Conversation::new(words(300));
    let (_, first_took) = conv.turn(&sim, "Tell me about slots", json!({})).await;
    let (second, second_took) = conv
        .turn(&sim, "And caches?", json!({"cache_prompt": false}))
        .await;
    assert_eq!(n(&second, "/timings/cache_n"), 0);
    assert_eq!(
        n(&second, "/timings/prompt_n"),
        n(&second, "/usage/prompt_tokens")
    );
    assert!(
        second_took > first_took,
        "{second_took:?} vs {first_took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bitnet_caches_only_when_asked() {
    let sim = TestSim::start(SimConfig::new(Dialect::Bitnet)).await;
    let mut conv = Conversation::new(words(100));
    conv.turn(&sim, "one", json!({})).await;
    let (uncached, _) = conv.turn(&sim, "two", json!({})).await;
    // The fork reports no cache_n; what it evaluated is the whole prompt.
    assert!(uncached["timings"].get("cache_n").is_none());
    assert_eq!(
        n(&uncached, "/timings/prompt_n"),
        n(&uncached, "/usage/prompt_tokens")
    );
    let (cached, _) = conv
        .turn(&sim, "three", json!({"cache_prompt": true}))
        .await;
    assert!(n(&cached, "/timings/prompt_n") < 12, "{cached}");
}

#[tokio::test(start_paused = true)]
async fn a_conversation_returns_to_the_slot_holding_it_even_when_another_is_older() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.slots = 2;
    let sim = TestSim::start(cfg).await;
    let mut a = Conversation::new(words(200));
    let mut b = Conversation::new(
        (0..200)
            .map(|i| format!("v{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    a.turn(&sim, "a1", json!({})).await;
    b.turn(&sim, "b1", json!({})).await;
    let (a2, _) = a.turn(&sim, "a2", json!({})).await;
    // B's slot is now the least recently used, but A's slot holds A's history.
    let (a3, _) = a.turn(&sim, "a3", json!({})).await;
    assert_eq!(
        n(&a3, "/timings/cache_n"),
        n(&a2, "/usage/prompt_tokens") + n(&a2, "/usage/completion_tokens")
    );
}
