//! Runs a real Prometheus server for tests, serves fixed exposition text for it to scrape, and
//! lints exposition text with `promtool`.
//!
//! # Port selection
//! Prometheus accepts `--web.listen-address=127.0.0.1:0`: the kernel picks the port, and the
//! server logs the address it actually bound as `msg="Listening on" address=127.0.0.1:PORT`
//! (after an earlier `msg="Start listening for connections" address=127.0.0.1:0`, which names the
//! request, not the result). [`Prometheus::start`] pins `--log.format=logfmt` and reads the port
//! from that line, the same way the llama-server launcher does: no fixed ports, no probing, no
//! window between choosing a port and binding it.
//!
//! # Readiness
//! The listener can be up before the storage is open and the configuration loaded; `GET
//! /-/ready` answers 503 until then, so [`Prometheus::start`] polls it until it returns 200.
//!
//! # First scrape
//! Prometheus hands discovered targets, static ones included, to its scrape manager on a fixed
//! 5 s tick (no flag changes it in 2.42), so the first sample of a target arrives about 5 s
//! after start whatever the scrape interval. Tests that need scraped data take at least that
//! long; queries that need none (parsing, `vector(1)`) answer as soon as the server is ready.
//!
//! # Storage
//! Every server gets a fresh directory under the system temp dir holding its configuration and
//! its TSDB, removed when the [`Prometheus`] is dropped, after the process is killed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::child::{start_server, ChildGuard};
use crate::llama_server::Reply;

/// One element of an instant vector: the series' labels (including `__name__` when the
/// expression keeps it) and its value.
pub type Sample = (BTreeMap<String, String>, f64);

/// How long [`Prometheus::start`] waits for the port to be logged and `/-/ready` to answer 200.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between queries in [`Prometheus::wait_for`].
const QUERY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one blocking request to Prometheus may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`ExpositionServer`] waits for a scraper to send its request.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Locates a `prometheus` binary: `$PROMETHEUS` if set (used as given even if it does not exist,
/// so a wrong setting fails loudly), else `prometheus` on `PATH`.
pub fn find_binary() -> Option<PathBuf> {
    find_program("PROMETHEUS", "prometheus")
}

/// Locates `promtool`: `$PROMTOOL` if set (used as given), else `promtool` on `PATH`.
pub fn find_promtool() -> Option<PathBuf> {
    find_program("PROMTOOL", "promtool")
}

/// Returns the Prometheus binary, or decides what a test should do without one.
///
/// With no binary and `CI` set to `true`/`1` or `REQUIRE_PROMETHEUS=1`, this panics: CI must fail
/// when the real-Prometheus tests cannot run rather than pass by skipping them. Otherwise it
/// prints a `SKIPPED` line naming `test` to stderr and returns `None`, and the test should return
/// early.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    found_or_skip(test, "prometheus", find_binary())
}

/// [`binary_or_skip`] for `promtool`, under the same rules (`REQUIRE_PROMETHEUS` covers both,
/// since the Prometheus distribution ships them together).
pub fn promtool_or_skip(test: &str) -> Option<PathBuf> {
    found_or_skip(test, "promtool", find_promtool())
}

/// Runs `promtool check metrics` with `text` on its stdin and returns whether it passed together
/// with everything it printed.
///
/// `promtool` exits 1 when the text does not parse and 3 when it parses but breaks a naming
/// convention (e.g. `foo counter metrics should have "_total" suffix`); both count as failure.
/// Fails with `NotFound` when no `promtool` is installed (see [`promtool_or_skip`]).
pub fn promtool_check_metrics(text: &str) -> io::Result<(bool, String)> {
    let promtool = find_promtool()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no promtool found"))?;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", promtool.display())))?;
    // promtool reads all of stdin before printing anything, so writing everything first cannot
    // deadlock against full output pipes.
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let written = stdin.write_all(text.as_bytes());
    drop(stdin);
    let out = child.wait_with_output()?;
    written?;
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), report))
}

fn find_program(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn found_or_skip(test: &str, name: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let flag =
        |var: &str| std::env::var(var).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if flag("CI") || flag("REQUIRE_PROMETHEUS") {
        panic!(
            "{test}: no {name} found, and CI or REQUIRE_PROMETHEUS demands one; \
             install Prometheus (Debian: apt-get install prometheus) or set PROMETHEUS/PROMTOOL"
        );
    }
    // Straight to the process's stderr: the harness would hide an `eprintln!` of a passing test,
    // and a skip must be seen.
    let _ = writeln!(
        io::stderr(),
        "SKIPPED {test}: no {name} found (apt-get install prometheus, or set PROMETHEUS/PROMTOOL)"
    );
    None
}

/// A running Prometheus on `127.0.0.1` at a port the OS chose, scraping a fixed set of targets.
/// Dropping it kills the server and deletes its data.
#[derive(Debug)]
pub struct Prometheus {
    // Declared before `dir` so that it drops first: the directory is removed only once nothing
    // writes to it any more.
    child: ChildGuard,
    dir: TempDir,
    port: u16,
}

// === impl Prometheus ===

impl Prometheus {
    /// Starts `binary` scraping `scrape_targets` (each `host:port`, scraped at `/metrics` as job
    /// `targets`) every `scrape_interval`, and waits until it is ready to answer queries.
    ///
    /// The scrape timeout equals the interval, which must be at least a millisecond (the
    /// resolution of Prometheus durations). On failure the error message includes everything
    /// the server logged.
    pub fn start(
        binary: &Path,
        scrape_targets: &[String],
        scrape_interval: Duration,
    ) -> io::Result<Prometheus> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let interval_ms = scrape_interval.as_millis();
        if interval_ms == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("scrape interval {scrape_interval:?} is below Prometheus' 1ms resolution"),
            ));
        }
        let dir = TempDir::new("testkit-prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(scrape_targets, interval_ms))?;

        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--log.format=logfmt")
            .arg("--log.level=info");
        let ready = |port| {
            http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/-/ready")
                .is_ok_and(|r| r.status == 200)
        };
        let (child, port) = start_server(cmd, "prometheus", deadline, parse_listen_port, ready)?;
        Ok(Prometheus { child, dir, port })
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port the server bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the configuration and the TSDB; gone once `self` is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process guard: for reading the server's log.
    pub fn child(&self) -> &ChildGuard {
        &self.child
    }

    /// Blocking `GET path` (e.g. `/api/v1/targets`) against this server.
    pub fn get(&self, path: &str) -> io::Result<Reply> {
        http_get(SocketAddr::from(([127, 0, 0, 1], self.port)), path)
    }

    /// Evaluates `promql` as an instant query at the current time (`/api/v1/query`).
    ///
    /// A vector result comes back as its samples and a scalar as one sample without labels.
    /// An expression Prometheus rejects (a parse error is `bad_data`) fails with `InvalidInput`
    /// and Prometheus' own message; a range vector or string result fails with `InvalidData`.
    pub fn query(&self, promql: &str) -> io::Result<Vec<Sample>> {
        let reply = self.get(&format!("/api/v1/query?query={}", percent_encode(promql)))?;
        parse_query_reply(promql, &reply)
    }

    /// Repeats [`query`](Self::query) until its result satisfies `pred`, and returns that result.
    /// Allow for the 5 s before the first scrape (see the module docs) in `timeout`.
    ///
    /// A query error ends the wait at once: a bad expression does not get better with time.
    /// After `timeout` it fails with `TimedOut`, showing the last result.
    pub fn wait_for(
        &self,
        promql: &str,
        mut pred: impl FnMut(&[Sample]) -> bool,
        timeout: Duration,
    ) -> io::Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if pred(&result) {
                return Ok(result);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{promql:?} did not reach the expected result within {timeout:?}; last result: {result:?}"),
                ));
            }
            thread::sleep(QUERY_POLL_INTERVAL.min(deadline - now));
        }
    }
}

/// The configuration file for [`Prometheus::start`].
fn scrape_config(targets: &[String], interval_ms: u128) -> String {
    // A JSON array is a valid YAML flow sequence, and serde_json quotes whatever the targets
    // contain.
    let targets = serde_json::to_string(targets).expect("a list of strings serializes");
    format!(
        "global:\n  scrape_interval: {interval_ms}ms\n  scrape_timeout: {interval_ms}ms\n\
         scrape_configs:\n  - job_name: targets\n    static_configs:\n      - targets: {targets}\n"
    )
}

/// Extracts the bound port from Prometheus' `msg="Listening on" address=HOST:PORT` line. Port 0
/// is rejected: it would mean a line naming the requested address, not the bound one.
fn parse_listen_port(line: &str) -> Option<u16> {
    if !line.contains("msg=\"Listening on\"") {
        return None;
    }
    let address = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("address="))?;
    let port = address.trim_matches('"').rsplit_once(':')?.1.parse().ok()?;
    (port != 0).then_some(port)
}

/// Turns an `/api/v1/query` reply into samples, or into an error carrying Prometheus' reason.
fn parse_query_reply(promql: &str, reply: &Reply) -> io::Result<Vec<Sample>> {
    let body: Value = serde_json::from_str(&reply.body).map_err(|e| {
        invalid_data(format!(
            "query {promql:?}: HTTP {} with a body that is not JSON ({e}): {}",
            reply.status, reply.body
        ))
    })?;
    if body["status"] != "success" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "query {promql:?} failed with HTTP {}: {}: {}",
                reply.status,
                body["errorType"].as_str().unwrap_or("unknown error type"),
                body["error"].as_str().unwrap_or("no message")
            ),
        ));
    }
    let data = &body["data"];
    let result_type = data["resultType"].as_str().unwrap_or("");
    match result_type {
        "vector" => data["result"]
            .as_array()
            .ok_or_else(|| invalid_data(format!("query {promql:?}: vector without a result")))?
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Ok((labels, sample_value(promql, &series["value"])?))
            })
            .collect(),
        "scalar" => Ok(vec![(
            BTreeMap::new(),
            sample_value(promql, &data["result"])?,
        )]),
        other => Err(invalid_data(format!(
            "query {promql:?}: expected an instant vector or a scalar, got {other:?}"
        ))),
    }
}

/// Reads the value of a `[timestamp, "value"]` pair. Prometheus spells special values `NaN`,
/// `+Inf` and `-Inf`, all of which `f64::from_str` accepts.
fn sample_value(promql: &str, pair: &Value) -> io::Result<f64> {
    pair[1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid_data(format!("query {promql:?}: bad sample {pair}")))
}

/// Percent-encodes everything outside RFC 3986's unreserved set, which is always safe in a
/// query string whatever characters the expression uses.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Blocking `GET path` to a server on `addr`, read to the end.
///
/// It speaks HTTP/1.0 on purpose: a server must then neither keep the connection open nor use
/// chunked encoding, so the body is simply everything up to end of stream. Prometheus (Go's
/// `net/http`), hyper and llama-server's cpp-httplib all answer HTTP/1.0.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    stream.flush()?;

    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid_data(format!("bad status line {status_line:?}")))?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A tiny exporter: answers every HTTP request on its listener with the current exposition text
/// (`text/plain; version=0.0.4`), for a [`Prometheus`] to scrape. Dropping it stops the server.
#[derive(Debug)]
pub struct ExpositionServer {
    addr: SocketAddr,
    text: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

// === impl ExpositionServer ===

impl ExpositionServer {
    /// Serves `text` on `listener` (bound by the caller, normally to `127.0.0.1:0`) from a
    /// background thread, one connection at a time.
    pub fn serve(listener: TcpListener, text: impl Into<String>) -> io::Result<ExpositionServer> {
        let addr = listener.local_addr()?;
        let text = Arc::new(Mutex::new(text.into()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("exposition-server".into())
            .spawn({
                let text = Arc::clone(&text);
                let stop = Arc::clone(&stop);
                move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        // A scraper that hangs up early costs it one sample; the server goes on.
                        if let Ok(stream) = stream {
                            let body = text.lock().unwrap_or_else(PoisonError::into_inner).clone();
                            let _ = answer_scrape(stream, &body);
                        }
                    }
                }
            })?;
        Ok(ExpositionServer {
            addr,
            text,
            stop,
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `host:port` to put in a scrape configuration.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Replaces the text served from the next request on, e.g. to make a counter grow.
    pub fn set_text(&self, text: impl Into<String>) {
        *self.text.lock().unwrap_or_else(PoisonError::into_inner) = text.into();
    }
}

impl Drop for ExpositionServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The thread sits in accept(); one connection wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request's head and answers it with `body`, closing the connection afterwards.
fn answer_scrape(stream: TcpStream, body: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_READ_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut stream = &stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// A directory that is deleted, with its contents, on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    /// Creates a new, empty directory named after `prefix`, this process and a counter.
    fn new(prefix: &str) -> io::Result<TempDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
            // create_dir, not create_dir_all: a leftover from a killed run with the same pid
            // must not be reused, so an existing name moves on to the next counter.
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_is_read_from_the_listening_on_line() {
        let v2 = r#"ts=2026-11-26T14:10:06.041Z caller=tls_config.go:232 level=info component=web msg="Listening on" address=127.0.0.1:33501"#;
        assert_eq!(parse_listen_port(v2), Some(33501));
        let v3 = r#"time=2026-11-26T14:10:06.041Z level=INFO source=tls_config.go:347 msg="Listening on" address=127.0.0.1:40999"#;
        assert_eq!(parse_listen_port(v3), Some(40999));
    }

    #[test]
    fn requested_address_line_is_not_taken_for_the_bound_port() {
        let line = r#"ts=2026-11-26T14:10:06.030Z caller=web.go:503 level=info component=web msg="Start listening for connections" address=127.0.0.1:0"#;
        assert_eq!(parse_listen_port(line), None);
        let zero = r#"level=info msg="Listening on" address=127.0.0.1:0"#;
        assert_eq!(parse_listen_port(zero), None);
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            percent_encode(r#"sum by (le) (rate(x{a=~"b.*"}[1m]))"#),
            "sum%20by%20%28le%29%20%28rate%28x%7Ba%3D~%22b.%2A%22%7D%5B1m%5D%29%29"
        );
        assert_eq!(percent_encode("a+b"), "a%2Bb");
    }

    #[test]
    fn vector_reply_becomes_labelled_samples() {
        let reply = Reply {
            status: 200,
            body: r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"__name__":"up","job":"targets"},"value":[1.5,"1"]},
                {"metric":{},"value":[1.5,"+Inf"]}]}}"#
                .into(),
        };
        let samples = parse_query_reply("up", &reply).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].0["job"], "targets");
        assert_eq!(samples[0].1, 1.0);
        assert_eq!(samples[1].1, f64::INFINITY);
    }

    #[test]
    fn scalar_reply_becomes_one_unlabelled_sample() {
        let reply = Reply {
            status: 200,
            body: r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"NaN"]}}"#
                .into(),
        };
        let samples = parse_query_reply("NaN", &reply).unwrap();
        assert_eq!(samples.len(), 1);
        assert!(samples[0].0.is_empty() && samples[0].1.is_nan());
    }

    #[test]
    fn error_reply_carries_prometheus_reason() {
        let reply = Reply {
            status: 400,
            body: r#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected end of input"}"#.into(),
        };
        let err = parse_query_reply("sum(", &reply).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains("bad_data: 1:5: parse error"),
            "{err}"
        );
    }

    #[test]
    fn scrape_config_quotes_targets_and_sets_interval() {
        let config = scrape_config(&["127.0.0.1:1234".to_owned()], 250);
        assert!(config.contains("scrape_interval: 250ms"), "{config}");
        assert!(
            config.contains(r#"targets: ["127.0.0.1:1234"]"#),
            "{config}"
        );
    }
}
