//! A guard that owns a spawned process and kills it, with everything it started, when dropped.
//!
//! Tests that start real processes (llama-server, the workspace's own binaries) must never leave
//! them behind, even when an assertion panics halfway through. [`ChildGuard`] starts the child as
//! the leader of a new process group and, on drop, sends `SIGKILL` to the whole group and reaps
//! the leader. Drop runs during panic unwinding too, so a failing test cleans up like a passing one.
//!
//! The guard also collects the child's stdout and stderr line by line in the background, so a test
//! can wait for a line such as "listening on http://127.0.0.1:PORT", and so the output can be shown
//! when a test fails: a guard dropped during a panic prints everything the child wrote.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

/// Re-exported so that callers of [`ChildGuard::signal`] need no direct dependency on `nix`.
pub use nix::sys::signal::Signal;

/// How often [`ChildGuard::wait_timeout`] checks whether the child has exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A spawned process that is killed, together with its process group, when this guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    /// Program name, used to label the output printed when a test panics.
    label: String,
    output: Arc<Output>,
}

/// Lines captured from the child, shared with the reader threads.
#[derive(Debug, Default)]
struct Output {
    state: Mutex<OutputState>,
    /// Signalled on every new line and whenever a stream closes.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct OutputState {
    /// stdout and stderr interleaved in the order the reader threads saw them.
    lines: Vec<String>,
    /// Streams not yet at end of file; at zero no further line can arrive.
    open_streams: usize,
}

// === impl ChildGuard ===

impl ChildGuard {
    /// Spawns `cmd` as the leader of a new process group and starts capturing its output.
    ///
    /// The command's stdout and stderr are replaced with pipes read by this guard, and stdin with
    /// `/dev/null` so the child can never block on the test's terminal.
    pub fn spawn(mut cmd: Command) -> io::Result<ChildGuard> {
        // A group of its own lets drop reach grandchildren (a shell wrapper's children, helpers
        // the program forks) with one signal. The price: a Ctrl-C at the terminal no longer
        // reaches the child, and a test process that dies without unwinding cannot run drop, so
        // its children outlive it. Tying the child's life to the parent would need
        // PR_SET_PDEATHSIG between fork and exec, which only an unsafe `pre_exec` can do.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let label = std::path::Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(cmd.get_program())
            .to_string_lossy()
            .into_owned();
        // Wrapped at once, so that if starting a reader thread fails below, dropping the guard
        // still kills the child.
        let mut guard = ChildGuard {
            child: cmd.spawn()?,
            label,
            output: Arc::new(Output::default()),
        };
        let stdout = guard
            .child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = guard
            .child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            guard.output.lock().open_streams += 1;
            let output = Arc::clone(&guard.output);
            // Detached on purpose: the thread ends at end of file, which the kill in drop
            // guarantees for the whole group, and joining could hang if something outside the
            // group inherited the pipe.
            thread::Builder::new()
                .name(format!("{}-output", guard.label))
                .spawn(move || output.collect(stream))?;
        }
        Ok(guard)
    }

    /// The child's process id, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the child itself (not its group), e.g. `SIGTERM` to test a graceful
    /// shutdown or `SIGKILL` to simulate a crash.
    ///
    /// Fails if the child has already exited and been reaped, rather than risk signalling an
    /// unrelated process that reused the pid.
    pub fn signal(&mut self, signal: Signal) -> io::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return Err(io::Error::other(format!(
                "{} (pid {}) already exited: {status}",
                self.label,
                self.pid()
            )));
        }
        // Not yet reaped, so even if it exits right now the pid stays ours (a zombie) until we
        // wait for it.
        kill(self.nix_pid(), signal).map_err(io::Error::from)
    }

    /// Returns the exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits up to `timeout` for the child to exit; `Ok(None)` means it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(EXIT_POLL_INTERVAL.min(deadline - now));
        }
    }

    /// Waits up to `timeout` for an output line (stdout or stderr) that satisfies `pred` and
    /// returns it. Lines already captured count, so calling this after the line was printed is
    /// fine.
    ///
    /// Returns `None` on timeout, or as soon as both streams are closed without a match (the
    /// child exited), so a crashed child fails a test at once instead of after the full timeout.
    pub fn wait_for_line(
        &self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.output.lock();
        let mut checked = 0;
        loop {
            if let Some(line) = state.lines[checked..].iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            checked = state.lines.len();
            let now = Instant::now();
            if state.open_streams == 0 || now >= deadline {
                return None;
            }
            state = self
                .output
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Everything the child has written so far, one captured line per line.
    pub fn output_so_far(&self) -> String {
        self.output.lock().lines.join("\n")
    }

    fn nix_pid(&self) -> Pid {
        // Linux pids are at most 2^22, far inside i32.
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Kill the group before reaping the leader: while the leader is unreaped its pid, and
        // so the group id, cannot be reused, so the signal cannot reach a stranger. ESRCH (the
        // group is already gone) is the expected outcome after a clean exit.
        let _ = killpg(self.nix_pid(), Signal::SIGKILL);
        let _ = self.child.wait();
        if thread::panicking() {
            // The test harness captures this and shows it with the failure.
            eprintln!(
                "----- output of {} (pid {}) -----\n{}\n----- end of output of {} -----",
                self.label,
                self.pid(),
                self.output_so_far(),
                self.label
            );
        }
    }
}

// === impl Output ===

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        // Only pushes happen under the lock; a poisoned buffer still holds valid lines.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `stream` to end of file, appending each line. Bytes that are not UTF-8 (a random
    /// model can print anything) are replaced rather than dropping the line.
    fn collect(&self, stream: Box<dyn Read + Send>) {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    self.lock().lines.push(line);
                    self.changed.notify_all();
                }
            }
        }
        self.lock().open_streams -= 1;
        self.changed.notify_all();
    }
}

/// Start a server process that binds an OS-assigned port and logs it, then poll it until
/// `ready(port)` holds. `name` and the program's path appear in every error, together with
/// everything the process logged, so a failing test says why.
pub fn start_server(
    cmd: Command,
    name: &str,
    deadline: Instant,
    parse_port: impl Fn(&str) -> Option<u16>,
    ready: impl Fn(u16) -> bool,
) -> io::Result<(ChildGuard, u16)> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = ChildGuard::spawn(cmd)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    let fail = |child: &ChildGuard, what: &str| {
        io::Error::other(format!(
            "{name} {program} {what}; its log:\n{}",
            child.output_so_far()
        ))
    };
    let port = child
        .wait_for_line(
            |line| parse_port(line).is_some(),
            deadline.saturating_duration_since(Instant::now()),
        )
        .and_then(|line| parse_port(&line))
        .ok_or_else(|| fail(&child, "never logged the port it listens on"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(fail(&child, &format!("exited during startup: {status}")));
        }
        // Connection errors are expected while the server's listener starts.
        if ready(port) {
            return Ok((child, port));
        }
        if Instant::now() >= deadline {
            return Err(fail(
                &child,
                &format!("was not ready in time on port {port}"),
            ));
        }
        thread::sleep(READY_POLL_INTERVAL);
    }
}

/// How often [`start_server`] polls for readiness.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(20);
