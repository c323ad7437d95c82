//! `loadtest/bench/token-times.py`, which fanout.sh uses to split the closed runs' inter-token
//! latency into the gaps near a crowd of stream starts and the steady relay between them, on a
//! results file whose answer is known.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/token-times.py")
}

/// A successful streamed request whose tokens arrived at `token_us`.
fn record(token_us: &[u64]) -> Value {
    json!({ "error": null, "token_us": token_us })
}

fn run(records: Vec<Value>) -> (bool, String, String) {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "token-times-{}-{}.json",
        std::process::id(),
        records.len()
    ));
    std::fs::write(&path, json!({ "records": records }).to_string()).unwrap();
    let out = Command::new("python3")
        .arg(script())
        .arg(&path)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gaps_after_a_crowd_of_starts_are_told_from_the_steady_relay() {
    // 100 streams start together, 20 tokens 50 ms apart. The first gap of every stream is
    // 70 ms: within 300 ms of the crowd, with the next four. Twenty streams have one 60 ms
    // gap later on, in the steady relay.
    let mut records = Vec::new();
    for stream in 0..100 {
        let mut at = 10_000;
        let mut times = vec![at];
        for k in 1..20 {
            at += match k {
                1 => 70_000,
                10 if stream < 20 => 60_000,
                _ => 50_000,
            };
            times.push(at);
        }
        records.push(record(&times));
    }
    // Neither a failed request nor one without token times counts.
    records.push(json!({ "error": "timeout", "token_us": [0, 900_000] }));
    records.push(json!({ "error": null }));
    let (ok, out, err) = run(records);
    assert!(ok, "{err}");
    // p99 of all 1,900 gaps, of the 500 near the starts (100 of them 70 ms), of the 1,400
    // others (20 of them 60 ms); 5 of each stream's 19 gaps are near; 100 streams.
    assert_eq!(out, "70000\t70000\t60000\t0.263\t100");
}

#[test]
fn a_file_without_token_times_is_refused_with_the_reason() {
    let (ok, _, err) = run(vec![json!({ "error": null })]);
    assert!(!ok);
    assert!(err.contains("--token-times"), "{err}");
}
