//! Bad input to the real binary: each case exits non-zero with a message naming the problem,
//! and leaves nothing running.
//!
//! Every command line carries a unique marker (`--alias MARKER` for llama-server) so a test
//! can look for any process, launcher or llama-server, that it might have left behind.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{processes_with, TempDir, BIN};
use testkit::child::ChildGuard;
use testkit::gguf::tiny_model;
use testkit::llama_server::binary_or_skip;

/// Runs the runner to its end and returns (exit code, everything it wrote).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["--control", "127.0.0.1:0"]).args(args);
    let mut child = ChildGuard::spawn(cmd).expect("spawn bitnet-runner");
    let status = child
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|| panic!("runner did not exit:\n{}", child.output_so_far()));
    // Output threads may still be draining the pipes right after exit.
    std::thread::sleep(Duration::from_millis(50));
    (status.code(), child.output_so_far())
}

/// Arguments for a runner over `binary` and `model`, marked with `dir`'s unique name.
fn args<'a>(binary: &'a Path, model: &'a Path, marker: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--llama-server",
        binary.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--ctx",
        "512",
    ];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--", "--alias", marker]);
    a
}

fn marker(dir: &TempDir) -> String {
    dir.path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn assert_nothing_left(marker: &str) {
    let left = processes_with(marker);
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn missing_model_file_is_named_and_nothing_starts() {
    let Some(binary) = binary_or_skip("missing_model_file_is_named_and_nothing_starts") else {
        return;
    };
    let dir = TempDir::new("no-model");
    let mark = marker(&dir);
    let model = dir.path().join("missing-model.gguf");
    let (code, out) = run_to_exit(&args(&binary, &model, &mark, &["--base-port", "0"]));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("model file") && out.contains("missing-model.gguf"),
        "{out}"
    );
    assert!(!out.contains("control API listening"), "{out}");
    assert_nothing_left(&mark);
}

#[test]
fn missing_binary_is_named_and_nothing_starts() {
    let dir = TempDir::new("no-binary");
    let mark = marker(&dir);
    let binary = dir.path().join("no-such-llama-server");
    let (code, out) = run_to_exit(&args(&binary, &tiny_model(), &mark, &["--base-port", "0"]));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no-such-llama-server") && out.contains("not found"),
        "{out}"
    );
    assert_nothing_left(&mark);
}

#[test]
fn port_in_use_is_named_and_nothing_starts() {
    let Some(binary) = binary_or_skip("port_in_use_is_named_and_nothing_starts") else {
        return;
    };
    let dir = TempDir::new("port-in-use");
    let mark = marker(&dir);
    // Held for the whole test, so nothing else can take or free it meanwhile.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = tiny_model();
    let (code, out) = run_to_exit(&args(&binary, &model, &mark, &["--base-port", &port]));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!("port {port}")) && out.contains("in use"),
        "{out}"
    );
    assert_nothing_left(&mark);
}

#[test]
fn control_port_in_use_is_named_and_nothing_starts() {
    let Some(binary) = binary_or_skip("control_port_in_use_is_named_and_nothing_starts") else {
        return;
    };
    let dir = TempDir::new("control-in-use");
    let mark = marker(&dir);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let model = tiny_model();
    // The later --control overrides the one run_to_exit puts first.
    let (code, out) = run_to_exit(&args(
        &binary,
        &model,
        &mark,
        &["--base-port", "0", "--control", &addr],
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("control address") && out.contains(&addr),
        "{out}"
    );
    assert_nothing_left(&mark);
}

#[test]
fn unknown_config_key_is_named_and_nothing_starts() {
    let Some(binary) = binary_or_skip("unknown_config_key_is_named_and_nothing_starts") else {
        return;
    };
    let dir = TempDir::new("unknown-key");
    let mark = marker(&dir);
    let config = dir.write("runner.toml", "instances = 1\n[restart]\ndelay_sec = 5\n");
    let model = tiny_model();
    let (code, out) = run_to_exit(&args(
        &binary,
        &model,
        &mark,
        &["--base-port", "0", "--config", config.to_str().unwrap()],
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("delay_sec") && out.contains("runner.toml"),
        "{out}"
    );
    assert_nothing_left(&mark);
}

#[test]
fn model_llama_server_cannot_load_stops_the_runner_with_its_output() {
    let Some(binary) =
        binary_or_skip("model_llama_server_cannot_load_stops_the_runner_with_its_output")
    else {
        return;
    };
    let dir = TempDir::new("bad-model");
    let mark = marker(&dir);
    let model = dir.write("not-a-model.gguf", "this is not a GGUF file\n");
    let config = dir.write("runner.toml", common::FAST_TIMING);
    let (code, out) = run_to_exit(&args(
        &binary,
        &model,
        &mark,
        &[
            "--base-port",
            "0",
            "--instances",
            "2",
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("could not start") && out.contains("exit 1"),
        "{out}"
    );
    // The message carries llama-server's own explanation.
    assert!(out.contains("not-a-model.gguf"), "{out}");
    assert_nothing_left(&mark);
}

#[test]
fn impossible_pinning_is_refused_at_start() {
    let dir = TempDir::new("pin-impossible");
    let mark = marker(&dir);
    // Nothing is executed, so any executable stands in for llama-server.
    let binary = dir.script("llama-server", "exit 0");
    let model = dir.write("model.gguf", "");
    let (code, out) = run_to_exit(&args(
        &binary,
        &model,
        &mark,
        &["--instances", "2", "--threads", "100000", "--pin"],
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("200000 cores") && out.contains("2 instances x 100000 threads"),
        "{out}"
    );
    assert_nothing_left(&mark);
}

#[test]
fn check_config_warns_of_a_port_in_use_that_a_start_refuses() {
    // An install checks its config while the old instances still hold their ports.
    let dir = TempDir::new("check-busy");
    let script = dir.script("llama-server", "sleep 30");
    let model = dir.write("model.gguf", "GGUF");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut base = vec![
        "--llama-server",
        script.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--no-pin",
        "--base-port",
        &port,
    ];
    let (start, start_out) = run_to_exit(&base);
    base.push("--check-config");
    let (check, check_out) = run_to_exit(&base);
    assert_eq!(start, Some(2), "{start_out}");
    assert_eq!(check, Some(0), "{check_out}");
    assert!(
        check_out.contains("warning") && check_out.contains(&format!("port {port}")),
        "{check_out}"
    );
    assert!(
        check_out.contains(&format!("--port {port} -t ")),
        "{check_out}"
    );
}

#[test]
fn help_explains_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--llama-server",
        "--model",
        "--instances",
        "--threads",
        "--ctx",
        "--parallel",
        "--host",
        "--base-port",
        "--control",
        "--pin",
        "--no-pin",
        "--startup-timeout",
        "--restart-delay",
        "--drain-timeout",
        "--stop-timeout",
        "--log-dir",
        "--log-format",
        "--check-config",
        "LLAMA_SERVER_ARGS",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(
        help.contains("127.0.0.1:8099") && help.contains("8101"),
        "{help}"
    );
}
