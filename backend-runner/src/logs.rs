//! Instance output: every line of a llama-server's stdout and stderr goes to the runner's log
//! prefixed with `[NAME]`, at the level the line itself shows (`level_of`), optionally to a
//! size-rotated file per instance, and into a short in-memory tail that explains a failed
//! start. Lines announcing the listening port are also read back, for instances started on
//! port 0.
//!
//! - [`rotating`]: the rotated file.

pub mod rotating;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::Notify;

use crate::command::parse_listen_port;
use crate::config::LogFiles;
use crate::instance::Instance;
use rotating::RotatingFile;

/// Lines of a process's output kept for error messages.
const TAIL_LINES: usize = 30;

/// The last lines one process wrote.
#[derive(Debug, Default)]
pub struct Tail {
    lines: Mutex<VecDeque<String>>,
    /// Output streams still being read.
    open: AtomicUsize,
    closed: Notify,
}

impl Tail {
    fn push(&self, line: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Waits, at most `limit`, until every output stream of the process reached its end. A
    /// process's last words may still be in the pipe when its exit is noticed.
    pub async fn wait_closed(&self, limit: Duration) {
        let all_closed = async {
            loop {
                let notified = self.closed.notified();
                if self.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, all_closed).await;
    }

    fn stream_closed(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.closed.notify_waiters();
    }
}

/// Where one instance's output goes; lives as long as the instance, across restarts.
#[derive(Debug, Clone)]
pub struct InstanceLog {
    /// Feeds the file writer thread, if files are on.
    file: Option<std_mpsc::Sender<String>>,
}

impl InstanceLog {
    /// Output to the runner's log only, or also to `DIR/NAME.log` when `files` is set. The
    /// file is written by a thread of its own so that a slow disk never stalls the runtime.
    pub fn new(name: &str, files: Option<&LogFiles>) -> std::io::Result<InstanceLog> {
        let Some(files) = files else {
            return Ok(InstanceLog { file: None });
        };
        let path = files.dir.join(format!("{name}.log"));
        let mut file = RotatingFile::open(&path, files.max_bytes, files.keep)?;
        let (tx, rx) = std_mpsc::channel::<String>();
        let thread_name = format!("log-{name}");
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut failed = false;
                for line in rx {
                    if let Err(err) = file.write_line(&line) {
                        // Once per outage, not once per line.
                        if !failed {
                            tracing::error!(path = %path.display(), error = %err, "cannot write instance log file");
                        }
                        failed = true;
                    } else {
                        failed = false;
                    }
                }
            })?;
        Ok(InstanceLog { file: Some(tx) })
    }

    /// Starts forwarding `child`'s stdout and stderr (taken from it) for process number
    /// `generation` of `inst`, and returns the tail those lines fill.
    pub fn attach(&self, child: &mut Child, inst: &Arc<Instance>, generation: u64) -> Arc<Tail> {
        let tail = Arc::new(Tail::default());
        let streams: [Option<Box<dyn AsyncRead + Send + Unpin>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in streams.into_iter().flatten() {
            tail.open.fetch_add(1, Ordering::AcqRel);
            let (inst, tail, file) = (inst.clone(), tail.clone(), self.file.clone());
            tokio::spawn(async move {
                forward(stream, &inst, generation, &tail, file.as_ref()).await;
                tail.stream_closed();
            });
        }
        tail
    }
}

/// Reads `stream` line by line until end of file (the process exited, or closed it).
async fn forward(
    stream: impl AsyncRead + Unpin,
    inst: &Instance,
    generation: u64,
    tail: &Tail,
    file: Option<&std_mpsc::Sender<String>>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    let mut want_port = inst.config().port == 0;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // A model's output can be any bytes; keep the line rather than drop it.
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end_matches(['\n', '\r']);
        // One macro per level: tracing fixes an event's level where it is written.
        match level_of(line) {
            Level::Error => tracing::error!(target: "llama_server", "[{}] {line}", inst.name()),
            Level::Warn => tracing::warn!(target: "llama_server", "[{}] {line}", inst.name()),
            Level::Info => tracing::info!(target: "llama_server", "[{}] {line}", inst.name()),
        }
        tail.push(line);
        if let Some(file) = file {
            let _ = file.send(line.to_owned());
        }
        if want_port {
            if let Some(port) = parse_listen_port(line) {
                inst.port_announced(generation, port);
                want_port = false;
            }
        }
    }
}

/// How a line of llama-server's output is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Error,
    Warn,
    Info,
}

/// The level a line of llama-server's output shows, so that a filter such as
/// `llama_server=warn` keeps its errors and drops its chatter.
///
/// - Upstream writes `0.00.009.038 E gguf_init_from_file: ...`: a timestamp, then `E`, `W`,
///   `I` or `D`.
/// - The older BitNet server writes JSON lines with `"level":"ERR"` (or `WARN`, `INFO`,
///   `VERB`), and plain lines from the model loader such as `llama_model_load: error
///   loading model: ...`, which have no level: those mentioning an error or a failure are
///   taken as warnings.
fn level_of(line: &str) -> Level {
    let mut words = line.split_ascii_whitespace();
    if let (Some(stamp), Some(letter)) = (words.next(), words.next()) {
        if !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            match letter {
                "E" => return Level::Error,
                "W" => return Level::Warn,
                "I" | "D" => return Level::Info,
                _ => {}
            }
        }
    }
    if line.starts_with('{') {
        if line.contains(r#""level":"ERR""#) {
            return Level::Error;
        }
        if line.contains(r#""level":"WARN""#) {
            return Level::Warn;
        }
        if line.contains(r#""level":""#) {
            return Level::Info;
        }
    }
    let lower = line.to_ascii_lowercase();
    if lower.contains("error") || lower.contains("failed") {
        Level::Warn
    } else {
        Level::Info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_logged_at_the_level_they_show() {
        for (line, level) in [
            (
                "0.00.009.038 E gguf_init_from_file: failed to open GGUF file",
                Level::Error,
            ),
            (
                "0.00.006.567 W srv  llama_server: security: no API key is set",
                Level::Warn,
            ),
            (
                "0.00.025.148 I srv  llama_server: listening on http://127.0.0.1:1",
                Level::Info,
            ),
            // A debug line about an error is still a debug line.
            (
                "0.00.025.148 D srv  update_slots: error count 0",
                Level::Info,
            ),
            (
                r#"{"tid":"1","timestamp":1,"level":"ERR","function":"main","msg":"x"}"#,
                Level::Error,
            ),
            (
                r#"{"tid":"1","timestamp":1,"level":"WARN","function":"main","msg":"x"}"#,
                Level::Warn,
            ),
            (
                r#"{"tid":"1","timestamp":1,"level":"INFO","msg":"error count 0"}"#,
                Level::Info,
            ),
            (
                "llama_model_load: error loading model: bad magic",
                Level::Warn,
            ),
            ("main: failed to load model", Level::Warn),
            ("llm_load_print_meta: n_ctx_train = 4096", Level::Info),
            ("", Level::Info),
            ("12 E", Level::Error),
        ] {
            assert_eq!(level_of(line), level, "{line:?}");
        }
    }

    #[test]
    fn tail_keeps_only_the_last_lines() {
        let tail = Tail::default();
        for i in 0..TAIL_LINES + 5 {
            tail.push(&format!("line {i}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(
            lines.last().map(String::as_str),
            Some(&*format!("line {}", TAIL_LINES + 4))
        );
    }
}
