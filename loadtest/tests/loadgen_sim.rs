//! The load generator end to end against the `llama-sim` binary: the CLI drives an agent
//! workload and its figures must agree with the simulator's timing model, and errors injected
//! by the simulator must be counted under the right kinds.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use loadtest::gen::{self, ErrorKind, Load, RunConfig, RunResult};
use testkit::child::ChildGuard;

const LISTENING: &str = "llama-sim listening on ";
/// Prefill rate at `--time-scale 0.01`: 60 tokens/s, a hundred times faster.
const SCALED_PREFILL_PER_S: f64 = 60.0 / 0.01;

/// A running simulator; killed when dropped.
struct Sim {
    url: String,
    _child: ChildGuard,
}

fn start_sim(extra: &[&str]) -> Sim {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama-sim"));
    cmd.args(["--port", "0", "--time-scale", "0.01"])
        .args(extra);
    let child = ChildGuard::spawn(cmd).expect("spawn llama-sim");
    let line = child
        .wait_for_line(|l| l.starts_with(LISTENING), Duration::from_secs(20))
        .unwrap_or_else(|| panic!("llama-sim did not start:\n{}", child.output_so_far()));
    Sim {
        url: line[LISTENING.len()..].trim().to_owned(),
        _child: child,
    }
}

fn temp_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("loadgen-sim-{}-{name}", std::process::id()))
}

#[test]
fn agent_run_through_the_cli_sees_the_simulators_prompt_cache_and_timing() {
    let sim = start_sim(&["--slots", "2", "--ctx", "16384"]);
    let json_path = temp_path("agent.json");
    let html_path = temp_path("agent.html");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet-loadtest"));
    cmd.args([
        "run",
        "--url",
        &sim.url,
        "--model",
        "falcon3-10b",
        "--workload",
        "agent",
        "--system-prompt-chars",
        "12000",
        "--turns",
        "3",
        "--think-time",
        "0.01",
        "--concurrency",
        "2",
        "--requests",
        "6",
        "--max-tokens",
        "16",
        "--stream",
        "--timeout",
        "30",
        "-q",
        "--json",
        json_path.to_str().unwrap(),
        "--report",
        html_path.to_str().unwrap(),
    ]);
    let mut run = ChildGuard::spawn(cmd).expect("spawn bitnet-loadtest");
    let status = run
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("bitnet-loadtest should finish");
    run.wait_for_line(|_| false, Duration::from_secs(2));
    let output = run.output_so_far();
    assert!(status.success(), "{output}");
    assert!(output.contains("6 ok, 0 failed"), "{output}");

    let result = RunResult::read_json(&json_path).unwrap();
    assert_eq!(result.records.len(), 6);
    for r in &result.records {
        assert!(r.ok(), "{r:?}");
        assert_eq!(
            r.completion_tokens, 16,
            "max_tokens is honoured and counted"
        );
        let prompt = r.prompt_tokens.expect("the simulator reports usage");
        let cached = r.cached_tokens.unwrap_or(0);
        // TTFT covers evaluating the uncached part of the prompt, as the simulator models it.
        let evaluation_us = (prompt - cached) as f64 / SCALED_PREFILL_PER_S * 1e6;
        let ttft = r.ttft_us.unwrap() as f64;
        assert!(
            ttft >= 0.9 * evaluation_us,
            "turn {} ttft {ttft} us < evaluation {evaluation_us} us",
            r.turn
        );
        if r.turn > 1 {
            // Later turns re-send the history the slot already holds.
            assert!(
                cached as f64 > 0.8 * prompt as f64,
                "turn {}: {cached} of {prompt} cached",
                r.turn
            );
            let first = result
                .records
                .iter()
                .find(|f| f.session == r.session && f.turn == 1)
                .unwrap();
            assert!(r.prompt_tokens.unwrap() > first.prompt_tokens.unwrap());
            assert!(
                r.ttft_us.unwrap() < first.ttft_us.unwrap(),
                "a cached turn starts sooner"
            );
        }
    }
    let s = &result.summary;
    assert!(s.itl_us.count >= 6 * 15 / 2, "{} gaps", s.itl_us.count);
    assert!(s.cache_hit_ratio().unwrap() > 0.4);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains("Time to first token (CDF)"));
    let _ = std::fs::remove_file(json_path);
    let _ = std::fs::remove_file(html_path);
}

#[test]
fn token_times_without_a_json_file_or_a_stream_are_refused() {
    for extra in [&["--stream"][..], &["--json", "unused.json"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitnet-loadtest"))
            .args([
                "--url",
                "http://127.0.0.1:9",
                "--model",
                "m",
                "--requests",
                "1",
            ])
            .args(["--token-times", "-q"])
            .args(extra)
            .output()
            .expect("bitnet-loadtest runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("give --stream and --json"), "{stderr}");
    }
}

#[tokio::test]
async fn errors_injected_by_the_simulator_are_counted_by_kind() {
    // The older fork reports mid-stream failures as `error:` events inside a 200 stream.
    let bitnet = start_sim(&[
        "--dialect",
        "bitnet",
        "--slots",
        "2",
        "--error-mid-stream-after",
        "2",
        "--fault-every",
        "2",
    ]);
    let mut cfg = RunConfig::new(&bitnet.url, "m");
    cfg.stream = true;
    cfg.max_tokens = Some(8);
    cfg.max_requests = Some(6);
    cfg.load = Load::Closed { concurrency: 2 };
    cfg.timeout = Duration::from_secs(30);
    let result = gen::run(cfg).await.unwrap();
    let s = result.summary();
    assert_eq!(s.succeeded, 3, "{:?}", s.errors);
    assert_eq!(s.errors.get(&ErrorKind::MidStream), Some(&3));
    assert_eq!(s.statuses.get(&200), Some(&6));
    // The fork says how many prompt tokens it took but nothing of its cache: no hit rate is
    // made up for it.
    assert!(s.prompt_tokens > 0);
    assert_eq!(s.cache_hit_ratio(), None);
    let table = gen::report::table(&result);
    assert!(table.contains("did not report cache hits"), "{table}");

    let unavailable = start_sim(&["--fail-503", "--fault-every", "3"]);
    let mut cfg = RunConfig::new(&unavailable.url, "m");
    cfg.max_tokens = Some(4);
    cfg.max_requests = Some(6);
    cfg.timeout = Duration::from_secs(30);
    let result = gen::run(cfg).await.unwrap();
    assert_eq!(
        result.summary().errors.get(&ErrorKind::Unavailable),
        Some(&2)
    );
    assert_eq!(result.summary().succeeded, 4);
}
