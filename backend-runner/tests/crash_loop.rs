//! Crash loops, giving up, and instances that cannot start, with small shell scripts standing
//! in for a llama-server that crashes: these need no model and no real server.

mod common;

use std::time::Duration;

use common::{Runner, TempDir};

/// Starts the runner over `script` with restart delays of 0.1 s doubling to 0.4 s.
fn start(dir: &TempDir, script_body: &str, extra_config: &str) -> Runner {
    let script = dir.script("llama-server", script_body);
    let model = dir.write("model.gguf", "");
    let config = dir.write(
        "runner.toml",
        &format!(
            "[restart]\ndelay_secs = 0.1\nmax_delay_secs = 0.4\n{extra_config}\n\
             [stop]\ntimeout_secs = 1\n"
        ),
    );
    Runner::start(&[
        "--config",
        config.to_str().unwrap(),
        "--llama-server",
        script.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--base-port",
        "0",
        "--log-format",
        "json",
    ])
}

/// Waits for a runner that must stop on its own; its exit code and everything it wrote.
fn wait_exit(runner: &mut Runner) -> (Option<i32>, String) {
    let status = runner
        .child
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap_or_else(|| panic!("runner still running:\n{}", runner.child.output_so_far()));
    // Output threads may still be draining the pipes right after exit.
    std::thread::sleep(Duration::from_millis(50));
    (status.code(), runner.child.output_so_far())
}

/// The `delay_secs` of every "restarting" log event, in order.
fn restart_delays(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["delay_secs"].as_f64())
        .collect()
}

#[test]
fn crash_loop_doubles_the_delay_and_shows_in_metrics() {
    let dir = TempDir::new("crash-loop");
    // Dies by SIGSEGV at once, like the older server's worst days.
    let runner = start(&dir, "kill -SEGV $$", "");
    let list = runner.wait_for("five restarts", Duration::from_secs(20), |l| {
        l[0]["restarts"].as_u64() >= Some(5)
    });
    assert_eq!(list[0]["last_exit"], "signal 11");
    assert!(
        ["starting", "restarting"].contains(&list[0]["state"].as_str().unwrap()),
        "{list:?}"
    );

    let delays = restart_delays(&runner.child.output_so_far());
    assert!(delays.len() >= 5, "{delays:?}");
    assert_eq!(delays[..5], [0.1, 0.2, 0.4, 0.4, 0.4]);
    assert!(runner.child.output_so_far().contains("crash loop"));

    let failures = runner
        .metric(r#"bitnet_runner_instance_consecutive_failures{instance="i0"}"#)
        .unwrap();
    assert!(failures >= 5.0, "{failures}");
    assert_eq!(
        runner.metric(r#"bitnet_runner_instance_restart_delay_seconds{instance="i0"}"#),
        Some(0.4)
    );
    assert!(runner.metric(r#"bitnet_runner_restarts_total{instance="i0"}"#) >= Some(5.0));
    assert!(
        runner.metric(r#"bitnet_runner_exits_total{instance="i0",reason="crash"}"#) >= Some(5.0)
    );
    assert_eq!(
        runner.metric(r#"bitnet_runner_instance_up{instance="i0"}"#),
        Some(0.0)
    );
}

#[test]
fn instance_is_left_failed_after_max_failures_until_restarted_by_hand() {
    let dir = TempDir::new("max-failures");
    let runner = start(&dir, "kill -SEGV $$", "max_failures = 2");
    let list = runner.wait_for("failed", Duration::from_secs(10), |l| {
        l[0]["state"] == "failed"
    });
    assert_eq!(list[0]["restarts"], 1);
    assert_eq!(list[0]["pid"], serde_json::Value::Null);
    // It stays failed: no further attempts.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runner.instance("i0")["restarts"], 1);

    let (status, body) = runner.post("/instances/i0/restart");
    assert_eq!(status, 202, "{body}");
    // Two more failures after the manual restart, then failed again.
    let list = runner.wait_for("failed again", Duration::from_secs(10), |l| {
        l[0]["state"] == "failed" && l[0]["restarts"] == 3
    });
    assert_eq!(list[0]["last_exit"], "signal 11");
}

#[test]
fn instance_that_exits_with_an_error_on_its_first_start_stops_the_runner() {
    let dir = TempDir::new("first-start");
    let mut runner = start(&dir, "echo \"error: cannot load model $2\" >&2\nexit 3", "");
    let (code, out) = wait_exit(&mut runner);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("instance i0 could not start"), "{out}");
    assert!(out.contains("exit 3"), "{out}");
    // The process's own last words are part of the message.
    assert!(out.contains("    error: cannot load model"), "{out}");
    assert!(out.contains("model.gguf"), "{out}");
}

/// Kills every process whose pid a test's scripts appended to `path`, when dropped: they
/// run in sessions of their own, out of the runner's reach.
struct KillPidFile(std::path::PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn a_health_answer_from_another_process_on_the_port_is_not_readiness() {
    // The instance announces a port that a stranger (another session, another process
    // group) serves, answering 200 to everything; then it fails to bind, as llama-server
    // does when its port was taken after the runner's check. The stranger's answers must
    // not make the instance ready: its first start fails, and the runner says why.
    let dir = TempDir::new("stranger");
    let d = dir.path().display();
    let _stranger = KillPidFile(dir.path().join("stranger.pid"));
    let server = r#"
import http.server, os, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), Ok)
open(sys.argv[1] + ".tmp", "w").write(str(s.server_address[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
s.serve_forever()
"#;
    let mut runner = start(
        &dir,
        &format!(
            "setsid python3 -c '{server}' {d}/stranger.port &\n\
             echo $! >> {d}/stranger.pid\n\
             while [ ! -s {d}/stranger.port ]; do sleep 0.05; done\n\
             echo \"listening on http://127.0.0.1:$(cat {d}/stranger.port)\" >&2\n\
             sleep 2\n\
             echo \"error: couldn't bind HTTP server socket\" >&2\n\
             exit 1"
        ),
        "",
    );
    let (code, out) = wait_exit(&mut runner);
    assert!(
        std::fs::read_to_string(dir.path().join("stranger.port")).is_ok(),
        "the stranger never served:\n{out}"
    );
    let messages: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .collect();
    assert!(!messages.iter().any(|m| m == "ready"), "{out}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("another process listens")),
        "{out}"
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("instance i0 could not start"), "{out}");
    assert!(out.contains("couldn't bind"), "{out}");
}

#[test]
fn instance_output_goes_to_a_rotated_file() {
    let dir = TempDir::new("log-file");
    let logs = dir.path().join("logs");
    let runner = start(
        &dir,
        "i=0; while [ $i -lt 50 ]; do echo \"line $i of a chatty server\"; i=$((i+1)); done\n\
         kill -SEGV $$",
        &format!(
            "[logs]\ndir = {:?}\nmax_bytes = 1024\nkeep = 2",
            logs.to_str().unwrap()
        ),
    );
    runner.wait_for("two restarts", Duration::from_secs(20), |l| {
        l[0]["restarts"].as_u64() >= Some(2)
    });
    let current = std::fs::read_to_string(logs.join("i0.log")).unwrap_or_default();
    let rotated = std::fs::read_to_string(logs.join("i0.log.1")).unwrap();
    assert!(
        rotated.len() <= 1024 && rotated.len() > 900,
        "{}",
        rotated.len()
    );
    assert!(rotated.lines().all(|l| l.contains("of a chatty server")));
    assert!(current.len() <= 1024);
    assert!(!logs.join("i0.log.3").exists());
    // The runner's own log has the same lines, prefixed with the instance name.
    assert!(runner
        .child
        .output_so_far()
        .contains("[i0] line 49 of a chatty server"));
}

#[test]
fn metrics_pass_promtool_lint() {
    let Some(_) = testkit::prometheus::promtool_or_skip("metrics_pass_promtool_lint") else {
        return;
    };
    let dir = TempDir::new("promtool");
    let runner = start(&dir, "kill -SEGV $$", "");
    runner.wait_for("a restart", Duration::from_secs(10), |l| {
        l[0]["restarts"].as_u64() >= Some(1)
    });
    let (status, text) = runner.get("/metrics");
    assert_eq!(status, 200);
    let (ok, report) = testkit::prometheus::promtool_check_metrics(&text).unwrap();
    assert!(ok, "{report}\n{text}");
}
