//! The runner supervising real llama-server processes serving the tiny test model: start-up,
//! crash recovery, drained restarts, pinning, shutdown and orphans.
//!
//! Without a llama-server binary these tests print SKIPPED and pass, except in CI (or with
//! REQUIRE_LLAMA_SERVER=1), where they fail.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    cmdline_of, cpus_of, http, is_alive, pid_of, wait_dead, Runner, TempDir, FAST_TIMING,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use testkit::gguf::tiny_model;
use testkit::llama_server::binary_or_skip;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the runner over the real binary with fast timing; `args` come after the defaults
/// and so override them.
fn start(binary: &std::path::Path, dir: &TempDir, args: &[&str]) -> Runner {
    let config = dir.write("runner.toml", FAST_TIMING);
    let model = tiny_model();
    let mut all: Vec<&str> = vec![
        "--config",
        config.to_str().unwrap(),
        "--llama-server",
        binary.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--ctx",
        "512",
        "--base-port",
        "0",
    ];
    all.extend_from_slice(args);
    Runner::start(&all)
}

fn addr_of(instance: &Value) -> SocketAddr {
    instance["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no url in {instance}"))
}

#[test]
fn two_instances_come_up_ready_with_the_known_good_command_line() {
    let Some(binary) =
        binary_or_skip("two_instances_come_up_ready_with_the_known_good_command_line")
    else {
        return;
    };
    let dir = TempDir::new("two-ready");
    let runner = start(&binary, &dir, &["--instances", "2", "--parallel", "2"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);

    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "i0");
    assert_eq!(list[1]["name"], "i1");
    assert_ne!(list[0]["url"], list[1]["url"]);
    for inst in &list {
        assert_eq!(inst["restarts"], 0);
        assert_eq!(inst["last_exit"], Value::Null);
        assert!(inst["uptime_secs"].as_f64().is_some());
        let (status, _) = http(addr_of(inst), "GET", "/health");
        assert_eq!(status, 200, "{inst}");
        let pid = pid_of(inst);
        assert!(is_alive(pid));
        // The launcher has become llama-server itself: same pid, its command line.
        let args = cmdline_of(pid);
        assert!(args[0].ends_with("llama-server"), "{args:?}");
        let line = args[1..].join(" ");
        let model = tiny_model();
        let expected = format!(
            "-m {} --host 127.0.0.1 --port 0 -t 1 -c 512 -ngl 0 --no-perf --metrics --slots -np 2",
            model.display()
        );
        assert_eq!(line, expected);
    }
    let (status, body) = runner.get("/health");
    assert_eq!(status, 200);
    assert!(body.contains("\"ready\":2"), "{body}");
    assert_eq!(
        runner.metric(r#"bitnet_runner_instance_up{instance="i1"}"#),
        Some(1.0)
    );
    let rss = runner
        .metric(r#"bitnet_runner_instance_rss_bytes{instance="i0"}"#)
        .unwrap();
    assert!(rss > 1e6, "rss {rss}");
    // Each instance's output reaches the runner's log, prefixed with its name.
    assert!(runner
        .child
        .wait_for_line(
            |l| l.contains("[i1]") && l.contains("listening on"),
            Duration::from_secs(5)
        )
        .is_some());
}

#[test]
fn killed_instance_is_restarted_while_the_other_stays_ready() {
    let Some(binary) = binary_or_skip("killed_instance_is_restarted_while_the_other_stays_ready")
    else {
        return;
    };
    let dir = TempDir::new("kill-9");
    let runner = start(&binary, &dir, &["--instances", "2"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let (victim, survivor) = (pid_of(&list[0]), pid_of(&list[1]));
    let survivor_url = list[1]["url"].clone();

    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();

    let mut saw_down = false;
    let list = runner.wait_for("i0 back with a new process", READY_TIMEOUT, |list| {
        // The survivor is untouched throughout.
        assert_eq!(list[1]["state"], "ready", "{list:?}");
        assert_eq!(pid_of(&list[1]), survivor);
        assert_eq!(list[1]["url"], survivor_url);
        saw_down |= list[0]["state"] != "ready";
        list[0]["state"] == "ready" && list[0]["pid"].as_u64() != Some(u64::from(victim))
    });
    assert!(saw_down, "i0 never left ready");
    assert_eq!(list[0]["restarts"], 1);
    assert_eq!(list[0]["last_exit"], "signal 9");
    assert_eq!(list[1]["restarts"], 0);
    assert!(!is_alive(victim));
    let (status, _) = http(addr_of(&list[0]), "GET", "/health");
    assert_eq!(status, 200);

    assert_eq!(
        runner.metric(r#"bitnet_runner_restarts_total{instance="i0"}"#),
        Some(1.0)
    );
    assert_eq!(
        runner.metric(r#"bitnet_runner_exits_total{instance="i0",reason="crash"}"#),
        Some(1.0)
    );
    assert_eq!(
        runner.metric(r#"bitnet_runner_restarts_total{instance="i1"}"#),
        Some(0.0)
    );
}

/// Streams a long completion from `addr`, reporting on `first` when the first bytes of the
/// body arrive, and returns everything received.
fn long_stream(addr: SocketAddr, tokens: u32, first: mpsc::Sender<()>) -> String {
    let body = format!(
        r#"{{"prompt":"Once upon a time","n_predict":{tokens},"ignore_eos":true,"stream":true}}"#
    );
    let mut s = TcpStream::connect(addr).expect("connect to instance");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /completion HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut signalled = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if !signalled && String::from_utf8_lossy(&raw).contains("data: ") {
            let _ = first.send(());
            signalled = true;
        }
    }
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn drained_restart_loses_no_in_flight_stream() {
    let Some(binary) = binary_or_skip("drained_restart_loses_no_in_flight_stream") else {
        return;
    };
    let dir = TempDir::new("drain");
    // One slot with room for a stream of a couple of thousand tokens: seconds on one thread.
    let runner = start(&binary, &dir, &["--ctx", "4096", "--parallel", "1"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let old_pid = pid_of(&list[0]);
    let addr = addr_of(&list[0]);

    let (first_tx, first_rx) = mpsc::channel();
    let stream = std::thread::spawn(move || long_stream(addr, 2000, first_tx));
    first_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream should start");

    let (status, body) = runner.post("/instances/i0/restart");
    assert_eq!(status, 202, "{body}");
    // While the stream runs, the old process keeps serving it and is marked draining.
    let draining = runner.wait_for("i0 draining", Duration::from_secs(5), |list| {
        list[0]["state"] == "draining"
    });
    assert_eq!(pid_of(&draining[0]), old_pid);
    assert!(
        !stream.is_finished(),
        "the stream ended before the drain could be seen"
    );

    let raw = stream.join().unwrap();
    // Complete: the final event with the full token count, and the chunked body's end.
    assert!(
        raw.contains(r#""stop":true"#),
        "{}",
        &raw[raw.len().saturating_sub(500)..]
    );
    assert!(
        raw.contains(r#""predicted_n":2000"#),
        "{}",
        &raw[raw.len().saturating_sub(500)..]
    );
    assert!(
        raw.ends_with("0\r\n\r\n"),
        "stream cut: {:?}",
        &raw[raw.len().saturating_sub(200)..]
    );

    let list = runner.wait_for("i0 ready again", READY_TIMEOUT, |list| {
        list[0]["state"] == "ready" && list[0]["pid"].as_u64() != Some(u64::from(old_pid))
    });
    assert_eq!(list[0]["restarts"], 1);
    // Stopped by SIGTERM after the drain, not killed at the stop timeout.
    assert_ne!(list[0]["last_exit"], "signal 9", "{:?}", list[0]);
    assert!(!is_alive(old_pid));
    assert_eq!(
        runner.metric(r#"bitnet_runner_exits_total{instance="i0",reason="requested"}"#),
        Some(1.0)
    );
    assert_eq!(
        runner.metric(r#"bitnet_runner_exits_total{instance="i0",reason="crash"}"#),
        Some(0.0)
    );
}

#[test]
fn restart_of_an_unknown_instance_is_404() {
    let Some(binary) = binary_or_skip("restart_of_an_unknown_instance_is_404") else {
        return;
    };
    let dir = TempDir::new("404");
    let runner = start(&binary, &dir, &[]);
    runner.wait_all_ready(READY_TIMEOUT);
    let (status, body) = runner.post("/instances/nope/restart");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("nope"));
    let (status, _) = runner.get("/instances/i0/restart");
    assert_eq!(status, 405);
}

#[test]
fn sigkill_of_the_runner_leaves_no_llama_server_behind() {
    let Some(binary) = binary_or_skip("sigkill_of_the_runner_leaves_no_llama_server_behind") else {
        return;
    };
    let dir = TempDir::new("orphans");
    let mut runner = start(&binary, &dir, &["--instances", "2"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let pids: Vec<u32> = list.iter().map(pid_of).collect();
    assert!(pids.iter().all(|&p| is_alive(p)));

    // Only the runner: its instances are in process groups of their own, so nothing but the
    // parent-death signal can take them down.
    runner.child.signal(Signal::SIGKILL).unwrap();
    assert!(
        wait_dead(&pids, Duration::from_secs(5)),
        "llama-server processes {pids:?} outlived the runner"
    );
}

#[test]
fn sigterm_stops_every_instance_and_exits_zero() {
    let Some(binary) = binary_or_skip("sigterm_stops_every_instance_and_exits_zero") else {
        return;
    };
    let dir = TempDir::new("sigterm");
    let mut runner = start(&binary, &dir, &["--instances", "2"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let pids: Vec<u32> = list.iter().map(pid_of).collect();

    let started = Instant::now();
    runner.child.signal(Signal::SIGTERM).unwrap();
    let status = runner
        .child
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|| panic!("runner still running:\n{}", runner.child.output_so_far()));
    assert!(
        status.success(),
        "{status}\n{}",
        runner.child.output_so_far()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(pids.iter().all(|&p| !is_alive(p)));
    let out = runner.child.output_so_far();
    assert!(out.contains("all instances stopped"), "{out}");
}

#[test]
fn pinned_instances_run_on_disjoint_cores() {
    let Some(binary) = binary_or_skip("pinned_instances_run_on_disjoint_cores") else {
        return;
    };
    let allowed = backend_runner::placement::allowed_cpus().unwrap();
    if allowed.len() < 2 {
        eprintln!("SKIPPED pinned_instances_run_on_disjoint_cores: fewer than 2 cores");
        return;
    }
    let dir = TempDir::new("pin");
    let runner = start(&binary, &dir, &["--instances", "2", "--pin"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let a = cpus_of(pid_of(&list[0]));
    let b = cpus_of(pid_of(&list[1]));
    assert_eq!((a.len(), b.len()), (1, 1), "{a:?} {b:?}");
    assert_ne!(a, b);
    assert!(allowed.contains(&a[0]) && allowed.contains(&b[0]));
    // Every thread llama-server started inherited the mask.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid_of(&list[0]))).unwrap();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .unwrap();
        assert!(line.ends_with(&format!("\t{}", a[0])), "{line}");
    }
}

#[test]
fn sigint_lets_an_in_flight_stream_finish_before_stopping() {
    let Some(binary) = binary_or_skip("sigint_lets_an_in_flight_stream_finish_before_stopping")
    else {
        return;
    };
    let dir = TempDir::new("sigint-drain");
    let mut runner = start(&binary, &dir, &["--ctx", "4096", "--parallel", "1"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let pid = pid_of(&list[0]);
    let addr = addr_of(&list[0]);
    let (first_tx, first_rx) = mpsc::channel();
    let stream = std::thread::spawn(move || long_stream(addr, 2000, first_tx));
    first_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream should start");

    runner.child.signal(Signal::SIGINT).unwrap();
    let status = runner
        .child
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|| panic!("runner still running:\n{}", runner.child.output_so_far()));
    assert!(status.success(), "{status}");
    let raw = stream.join().unwrap();
    assert!(
        raw.contains(r#""predicted_n":2000"#),
        "{}",
        &raw[raw.len().saturating_sub(500)..]
    );
    assert!(raw.ends_with("0\r\n\r\n"), "stream cut");
    assert!(!is_alive(pid));
}

#[test]
fn second_signal_kills_at_once_without_waiting_for_streams() {
    let Some(binary) = binary_or_skip("second_signal_kills_at_once_without_waiting_for_streams")
    else {
        return;
    };
    let dir = TempDir::new("second-signal");
    let mut runner = start(&binary, &dir, &["--ctx", "8192", "--parallel", "1"]);
    let list = runner.wait_all_ready(READY_TIMEOUT);
    let pid = pid_of(&list[0]);
    let addr = addr_of(&list[0]);
    let (first_tx, first_rx) = mpsc::channel();
    // Far longer than the test waits.
    let stream = std::thread::spawn(move || long_stream(addr, 8000, first_tx));
    first_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream should start");

    runner.child.signal(Signal::SIGTERM).unwrap();
    assert!(runner
        .child
        .wait_for_line(|l| l.contains("draining"), Duration::from_secs(5))
        .is_some());
    let started = Instant::now();
    runner.child.signal(Signal::SIGTERM).unwrap();
    let status = runner
        .child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_or_else(|| panic!("runner still running:\n{}", runner.child.output_so_far()));
    assert!(status.success(), "{status}");
    assert!(!is_alive(pid));
    let raw = stream.join().unwrap();
    assert!(
        !raw.contains(r#""predicted_n":8000"#),
        "the stream was waited for"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
