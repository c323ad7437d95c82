//! Shared support for the runner's integration tests: starting the real `bitnet-runner`
//! binary on an OS-assigned control port, talking to its control API, and checking processes.

#![allow(dead_code)] // each test file uses a different part

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::child::ChildGuard;

/// The runner binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bitnet-runner");

/// Timing that keeps tests fast: quick probes, restarts and drains.
pub const FAST_TIMING: &str = r#"
[health]
startup_timeout_secs = 60
interval_secs = 0.2
timeout_secs = 2
failure_threshold = 3

[restart]
delay_secs = 0.2
max_delay_secs = 1

[stop]
drain_timeout_secs = 30
drain_grace_secs = 0.1
shutdown_drain_secs = 20
timeout_secs = 5
"#;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory named after `tag`, unique within this test process.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            // The trailing letter keeps one name from being a prefix of another.
            "bitnet-runner-test-{tag}-{}-{}d",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    /// Writes an executable shell script.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.write(name, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod script");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `bitnet-runner`, killed (SIGKILL to its group) when dropped.
pub struct Runner {
    /// The process.
    pub child: ChildGuard,
    /// Control API address.
    pub control: SocketAddr,
}

impl Runner {
    /// Starts the runner with `args` and `--control 127.0.0.1:0`, and waits for its control
    /// API address.
    pub fn start(args: &[&str]) -> Runner {
        let mut cmd = Command::new(BIN);
        cmd.args(["--control", "127.0.0.1:0"]).args(args);
        let child = ChildGuard::spawn(cmd).expect("spawn bitnet-runner");
        let line = child
            .wait_for_line(
                |l| l.starts_with("bitnet-runner control API listening on "),
                Duration::from_secs(20),
            )
            .unwrap_or_else(|| panic!("runner did not start:\n{}", child.output_so_far()));
        let control = line
            .trim_start_matches("bitnet-runner control API listening on http://")
            .trim()
            .parse()
            .expect("control address");
        Runner { child, control }
    }

    /// `GET path` on the control API.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.control, "GET", path)
    }

    /// `POST path` on the control API.
    pub fn post(&self, path: &str) -> (u16, String) {
        http(self.control, "POST", path)
    }

    /// The `instances` array of `GET /instances`.
    pub fn instances(&self) -> Vec<Value> {
        let (status, body) = self.get("/instances");
        assert_eq!(status, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).expect("instances JSON");
        doc["instances"]
            .as_array()
            .expect("instances array")
            .clone()
    }

    /// One instance by name.
    pub fn instance(&self, name: &str) -> Value {
        self.instances()
            .into_iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no instance {name}"))
    }

    /// Polls `GET /instances` until `pred` holds, and returns that list. Panics with the
    /// runner's output after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.instances();
            if pred(&list) {
                return list;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}; last instances: {list:#?}\n----- runner output -----\n{}",
                    self.child.output_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every instance is ready.
    pub fn wait_all_ready(&self, timeout: Duration) -> Vec<Value> {
        self.wait_for("every instance ready", timeout, |list| {
            !list.is_empty() && list.iter().all(|i| i["state"] == "ready")
        })
    }

    /// The value of one metric series line (exact labels), from `GET /metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

/// One HTTP/1.1 exchange with `Connection: close`, read to the end: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text:?}"));
    (status, body.to_owned())
}

/// A pid from an instance's JSON.
pub fn pid_of(instance: &Value) -> u32 {
    instance["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {instance}")) as u32
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Waits until none of `pids` is alive; false on timeout.
pub fn wait_dead(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pids.iter().all(|&p| !is_alive(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .filter(|&pid| is_alive(pid))
        .collect()
}

/// The `Cpus_allowed_list` of a process, expanded.
pub fn cpus_of(pid: u32) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    backend_runner::placement::parse_cpu_list(list).expect("cpu list")
}

/// The command line of a process, one argument per element.
pub fn cmdline_of(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}
