//! Prompt-cache affinity against real llama-server processes: with the predicted-ttft
//! policy, a conversation's follow-up turns land on the backend and slot that hold its
//! history, and the servers' own `timings.cache_n` shows the reuse. Skipped with a loud
//! line when no llama-server is installed, except in CI (`CI=true`).

mod common;

use common::*;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};

const SYSTEM: &str = "You are a careful assistant for a small team. Answer briefly, cite the \
    file you changed, never invent facts, and ask before deleting anything. ";

struct Turn {
    backend: String,
    prompt: u64,
    cached: u64,
}

/// Send one turn of `session` and keep its reply in `history`.
async fn turn(url: &str, session: usize, history: &mut Vec<serde_json::Value>, text: &str) -> Turn {
    history.push(serde_json::json!({"role": "user", "content": text}));
    let mut messages = vec![serde_json::json!({"role": "system", "content": SYSTEM.repeat(3)})];
    messages.extend(history.iter().cloned());
    let body = serde_json::json!({
        "model": "m", "max_tokens": 8, "temperature": 0, "messages": messages,
        "user": format!("session-{session}"),
    });
    let got = post_json(url, &body.to_string()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let v = got.json();
    let reply = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    history.push(serde_json::json!({"role": "assistant", "content": reply}));
    let t = &v["timings"];
    let (evaluated, cached) = (t["prompt_n"].as_u64(), t["cache_n"].as_u64());
    let (Some(evaluated), Some(cached)) = (evaluated, cached) else {
        panic!("llama-server reported no timings: {v}");
    };
    Turn {
        backend: got.headers["x-backend"].to_str().unwrap().to_string(),
        prompt: evaluated + cached,
        cached,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_turns_reuse_the_servers_prompt_cache() {
    let test = "follow_up_turns_reuse_the_servers_prompt_cache";
    let Some(bin) = binary_or_skip(test) else {
        return;
    };
    let servers: Vec<LlamaServer> = (0..2)
        .map(|_| {
            LlamaServer::start(&bin, &LlamaServerOpts::default()).expect("llama-server starts")
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let gw = TestGateway::over(&urls, "policy = \"predicted-ttft\"\n").await;
    gw.wait_until(|g| g.pools()[0].backends().iter().all(|b| b.has_slot(1)))
        .await;
    let url = gw.url("/v1/chat/completions");

    // Three conversations, interleaved, three turns each.
    let mut histories = vec![Vec::new(); 3];
    let mut turns: Vec<Vec<Turn>> = (0..3).map(|_| Vec::new()).collect();
    for n in 0..3 {
        for (s, history) in histories.iter_mut().enumerate() {
            let text = format!("Conversation {s}, question {n}: what should I check next?");
            turns[s].push(turn(&url, s, history, &text).await);
        }
    }
    println!("session | turn | backend | prompt tokens | cache_n (from llama-server)");
    for (s, ts) in turns.iter().enumerate() {
        for (n, t) in ts.iter().enumerate() {
            println!(
                "{s} | {} | {} | {} | {}",
                n + 1,
                t.backend,
                t.prompt,
                t.cached
            );
        }
    }
    for ts in &turns {
        for pair in ts.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            assert_eq!(
                after.backend, before.backend,
                "a follow-up turn returns home"
            );
            // The whole previous prompt is reused (the reply too, less the template's
            // end-of-turn tokens).
            assert!(
                after.cached >= before.prompt,
                "cache_n {} for a follow-up of a {}-token prompt",
                after.cached,
                before.prompt
            );
        }
    }
    let metrics = get(&gw.url("/metrics")).await.text();
    let cached: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("bitnet_gateway_prompt_tokens_cached_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let reported: u64 = turns.iter().flatten().map(|t| t.cached).sum();
    assert_eq!(
        cached as u64, reported,
        "the gateway counts the servers' cache hits"
    );
}
