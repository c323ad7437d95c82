//! `ChildGuard` against real processes: cleanup on drop and on panic, output capture, signals.

use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::child::{ChildGuard, Signal};

/// Whether `pid` is a live process. A zombie counts as dead: it has been killed, and whoever
/// reaps orphans here may take its time.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state letter follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
    }
}

/// Waits briefly for `pid` to die, since a SIGKILL is delivered asynchronously to processes
/// that are not reaped by the guard itself.
fn dies_soon(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn sh(script: &str) -> ChildGuard {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    ChildGuard::spawn(cmd).expect("spawn sh")
}

#[test]
fn panicking_scope_still_kills_the_child() {
    let mut pid = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let guard = ChildGuard::spawn(cmd).expect("spawn sleep");
        pid = Some(guard.pid());
        assert!(is_alive(guard.pid()));
        panic!("test failure while the child runs");
    }));
    assert!(result.is_err());
    let pid = pid.expect("child was spawned");
    // The guard reaps its child, so it must be gone at once, not merely dying.
    assert!(!is_alive(pid), "pid {pid} survived the panic");
}

#[test]
fn drop_kills_grandchildren_in_the_process_group() {
    let guard = sh("sleep 1000 & echo grandchild $!; wait");
    let line = guard
        .wait_for_line(|l| l.starts_with("grandchild "), Duration::from_secs(5))
        .expect("shell reports its background child");
    let grandchild: u32 = line["grandchild ".len()..].parse().unwrap();
    assert!(is_alive(grandchild));
    drop(guard);
    assert!(dies_soon(grandchild), "grandchild {grandchild} survived");
}

#[test]
fn wait_for_line_sees_stdout_and_stderr() {
    let guard = sh("echo to-stdout; echo to-stderr >&2; echo 'listening on port 4242'; sleep 1000");
    let line = guard.wait_for_line(|l| l.contains("listening"), Duration::from_secs(5));
    assert_eq!(line.as_deref(), Some("listening on port 4242"));
    let err = guard.wait_for_line(|l| l == "to-stderr", Duration::from_secs(5));
    assert_eq!(err.as_deref(), Some("to-stderr"));
    let all = guard.output_so_far();
    assert!(
        all.contains("to-stdout") && all.contains("to-stderr"),
        "{all}"
    );
}

#[test]
fn wait_for_line_gives_up_as_soon_as_the_child_exits() {
    let guard = sh("echo only-line");
    let started = Instant::now();
    let line = guard.wait_for_line(|l| l.contains("never printed"), Duration::from_secs(30));
    assert_eq!(line, None);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for the full timeout"
    );
    assert_eq!(guard.output_so_far(), "only-line");
}

#[test]
fn wait_for_line_times_out_while_the_child_is_silent() {
    let guard = sh("sleep 1000");
    let started = Instant::now();
    let line = guard.wait_for_line(|_| true, Duration::from_millis(200));
    assert_eq!(line, None);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn sigterm_ends_the_child_and_wait_timeout_reports_it() {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let mut guard = ChildGuard::spawn(cmd).unwrap();
    assert_eq!(guard.wait_timeout(Duration::from_millis(50)).unwrap(), None);
    assert_eq!(guard.try_wait().unwrap(), None);
    guard.signal(Signal::SIGTERM).unwrap();
    let status = guard
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("sleep exits on SIGTERM");
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
}

#[test]
fn signalling_an_exited_child_is_an_error() {
    let mut guard = sh("exit 3");
    let status = guard.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(guard.signal(Signal::SIGKILL).is_err());
}
