//! Logging: the global subscriber, a plain field formatter, the access line, and a writer
//! thread.
//!
//! The access log writes a line per request, so its cost is part of every request's: its
//! line is formatted here directly, in the same text or JSON the subscriber would write
//! (the subscriber's generic machinery cost about a tenth of all the gateway's work per
//! proxied request); other events go through a formatter that skips the styling layers;
//! timestamps are worked out once a second; and lines are written by a thread of their own
//! so that a slow stderr does not stall the serving threads.

use std::cell::Cell;
use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Install the global subscriber writing to stderr in `format`. Keep the returned writer
/// alive until the end: dropping it writes out what is still buffered.
pub fn init(format: LogFormat) -> LogWriter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours are for a person at a terminal. In a file or a journal they are noise, and
    // styling every field name was a quarter of the gateway's work per proxied request.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let writer = LogWriter::start(std::io::stderr());
    if !ansi || format == LogFormat::Json {
        let _ = DIRECT.set(Direct {
            json: format == LogFormat::Json,
            shared: writer.shared.clone(),
        });
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_timer(Clock)
        .with_writer(writer.handle());
    match format {
        LogFormat::Text if !ansi => builder.fmt_fields(PlainFields).init(),
        LogFormat::Text => builder.fmt_fields(TerminalFields).init(),
        LogFormat::Json => builder.json().init(),
    }
    writer
}

/// Where access lines go without the subscriber: set by [`init`] for the plain-text and
/// JSON formats. Unset (coloured text, or no [`init`] at all, as in tests), they go through
/// `tracing` like any other event.
static DIRECT: OnceLock<Direct> = OnceLock::new();

struct Direct {
    json: bool,
    shared: Arc<LogShared>,
}

/// One exchange's access-log line: the event `tracing::info!(target: "access", ...,
/// "request")` would be, with these fields in this order.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// The request's id (the client's `x-request-id`, or one made up).
    pub request_id: &'a str,
    /// The model id.
    pub model: &'a str,
    /// The backend's name.
    pub backend: &'a str,
    /// The endpoint, as in the metrics.
    pub endpoint: &'a str,
    /// The status the client got.
    pub status: u16,
    /// How the body ended: `Complete`, `UpstreamBroken` or `ClientGone`.
    pub ending: &'static str,
    /// Time spent waiting for a slot.
    pub queue_wait_ms: u64,
    /// Time to the first token, when there was one.
    pub ttft_ms: Option<u64>,
    /// Prompt tokens, when the backend reported them.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, reported or counted.
    pub completion_tokens: u64,
    /// Time from arrival to the end of the body.
    pub duration_ms: u64,
    /// Body bytes relayed.
    pub bytes: u64,
}

impl Access<'_> {
    /// Write the line, if the filter lets `access` events at INFO through.
    // Out of line, so that a profile of the whole-program-optimised release build names
    // it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
    #[inline(never)]
    pub fn log(&self) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        match DIRECT.get() {
            Some(direct) => {
                let line = if direct.json {
                    self.json_line()
                } else {
                    self.text_line()
                };
                let _ = std::io::Write::write_all(&mut LogLine(&direct.shared), &line);
            }
            None => self.via_tracing(),
        }
    }

    fn via_tracing(&self) {
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            model = self.model,
            backend = self.backend,
            endpoint = self.endpoint,
            status = self.status,
            ending = %self.ending,
            queue_wait_ms = self.queue_wait_ms,
            ttft_ms = self.ttft_ms,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            duration_ms = self.duration_ms,
            bytes = self.bytes,
            "request"
        );
    }

    /// The line as the subscriber's plain text format writes it.
    fn text_line(&self) -> Vec<u8> {
        // Room for a whole line: it is about 300 bytes, and growing it was a tenth of the
        // line's cost.
        let mut line = String::with_capacity(512);
        let _ = Clock.format_time(&mut Writer::new(&mut line));
        line.push_str("  INFO access: request request_id=");
        // Written as `%request_id` is: as it is, bar control characters.
        let _ = write_escaped(&mut line, self.request_id);
        for (name, value) in [
            (" model=", self.model),
            (" backend=", self.backend),
            (" endpoint=", self.endpoint),
        ] {
            line.push_str(name);
            debug_str(&mut line, value);
        }
        let number = |line: &mut String, name: &str, value: Option<u64>| {
            if let Some(v) = value {
                line.push(' ');
                line.push_str(name);
                line.push('=');
                line.push_str(itoa::Buffer::new().format(v));
            }
        };
        number(&mut line, "status", Some(self.status.into()));
        line.push_str(" ending=");
        line.push_str(self.ending);
        self.numbers(|name, value| number(&mut line, name, value));
        line.push('\n');
        line.into_bytes()
    }

    /// The line as the subscriber's JSON format writes it.
    fn json_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":\"");
        let mut time = String::with_capacity(32);
        let _ = Clock.format_time(&mut Writer::new(&mut time));
        line.extend_from_slice(time.as_bytes());
        line.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
        let string = |line: &mut Vec<u8>, name: &str, value: &str| {
            line.extend_from_slice(b",\"");
            line.extend_from_slice(name.as_bytes());
            line.extend_from_slice(b"\":");
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *line, value);
        };
        string(&mut line, "request_id", self.request_id);
        string(&mut line, "model", self.model);
        string(&mut line, "backend", self.backend);
        string(&mut line, "endpoint", self.endpoint);
        let number = |line: &mut Vec<u8>, name: &str, value: Option<u64>| {
            if let Some(v) = value {
                line.extend_from_slice(b",\"");
                line.extend_from_slice(name.as_bytes());
                line.extend_from_slice(b"\":");
                line.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            }
        };
        number(&mut line, "status", Some(self.status.into()));
        string(&mut line, "ending", self.ending);
        self.numbers(|name, value| number(&mut line, name, value));
        line.extend_from_slice(b"},\"target\":\"access\"}\n");
        line
    }

    /// The numeric fields after `ending`, in order; `None` ones are left out, as the
    /// subscriber leaves out a `None` field.
    fn numbers(&self, mut each: impl FnMut(&str, Option<u64>)) {
        each("queue_wait_ms", Some(self.queue_wait_ms));
        each("ttft_ms", self.ttft_ms);
        each("prompt_tokens", self.prompt_tokens);
        each("completion_tokens", Some(self.completion_tokens));
        each("duration_ms", Some(self.duration_ms));
        each("bytes", Some(self.bytes));
    }
}

/// `value` in its `Debug` form, as the subscriber writes string fields: quoted, escaped.
/// Names made of printable ASCII other than quotes and backslashes, which is what they
/// nearly always are, need no escaping, and skip the formatting machinery.
fn debug_str(line: &mut String, value: &str) {
    use std::fmt::Write as _;
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        let _ = write!(line, "{value:?}");
    }
}

/// Whether `s` may hold a control character: a C0 byte (`\n`, `\r`, `\t`, ESC…), DEL, or
/// 0xC2, the first byte of U+0080–U+00BF in UTF-8, which include the C1 controls
/// U+0080–U+009F. One pass over the bytes, so that text without any (nearly all of it)
/// costs no more than that.
fn may_hold_controls(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2)
}

/// Write `s` with its control characters (C0, DEL, C1: [`char::is_control`]) escaped as
/// [`char::escape_debug`] writes them (`\n`, `\r`, `\t`, `\0`, `\u{1b}`, `\u{85}`), and
/// everything else, non-ASCII letters included, as it is. Text from clients reaches log
/// lines (a model name in an error message, say): written raw, a newline in it would
/// start a forged line of its own, and an ESC would drive the terminal that shows the log.
fn write_escaped(out: &mut (impl std::fmt::Write + ?Sized), s: &str) -> std::fmt::Result {
    if !may_hold_controls(s) {
        return out.write_str(s);
    }
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        if c.is_control() {
            out.write_str(&s[plain..i])?;
            for e in c.escape_debug() {
                out.write_char(e)?;
            }
            plain = i + c.len_utf8();
        }
    }
    out.write_str(&s[plain..])
}

/// A writer that passes text on with its control characters escaped ([`write_escaped`]).
struct Escaping<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        write_escaped(&mut self.0, s)
    }
}

/// A value whose `Debug` form is the inner value's with control characters escaped.
struct Escaped<T>(T);

impl<T: std::fmt::Debug> std::fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        write!(Escaping(f), "{:?}", self.0)
    }
}

/// Timestamps as tracing-subscriber's `SystemTime` writes them (RFC 3339, UTC, to the
/// microsecond), with the date and time of day worked out once a second per thread rather
/// than for every line.
struct Clock;

thread_local! {
    /// The last second formatted on this thread, and its text up to the seconds.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// The first second of year 10000: four digits of year no longer suffice from there.
const YEAR_10000: u64 = 253_402_300_800;

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now();
        let since = match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) if d.as_secs() < YEAR_10000 => d,
            _ => return tracing_subscriber::fmt::time::SystemTime.format_time(w),
        };
        let secs = since.as_secs();
        let text = SECOND.with(|cell| {
            let (cached, text) = cell.get();
            if cached == secs {
                return text;
            }
            let text = date_and_time(secs);
            cell.set((secs, text));
            text
        });
        let mut frac = *b".000000Z";
        let mut micros = since.subsec_micros();
        for digit in frac[1..7].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&text).expect("ASCII digits"))?;
        w.write_str(std::str::from_utf8(&frac).expect("ASCII digits"))
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for `secs` after the Unix epoch (before year 10000).
fn date_and_time(secs: u64) -> [u8; 19] {
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    // Count from 1 March 0000 so that the leap day ends each year, then split days into
    // 400-year eras, years within the era, and months from March.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for digit in out[at..at + width].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, in_day / 3_600);
    put(14, 2, in_day / 60 % 60);
    put(17, 2, in_day % 60);
    out
}

/// Writes log lines to stderr from a thread of its own, so that a request never waits for
/// the write of its access line, and the lines of up to 10 ms go out in one write.
/// Nothing is dropped: past `LogWriter::MAX_PENDING` unwritten
/// bytes, loggers wait for the writer, as they waited for stderr before. Dropping the
/// value `LogWriter::start` returns writes what is left and stops the thread.
pub struct LogWriter {
    shared: Arc<LogShared>,
    /// Only the handle made by `start` stops and joins the thread when dropped.
    thread: Option<std::thread::JoinHandle<()>>,
}

struct LogShared {
    state: Mutex<LogState>,
    /// The writer waits here for lines.
    lines: Condvar,
    /// Loggers wait here for room.
    room: Condvar,
}

#[derive(Default)]
struct LogState {
    pending: Vec<u8>,
    writer_asleep: bool,
    loggers_waiting: bool,
    stopping: bool,
}

impl LogWriter {
    const MAX_PENDING: usize = 1 << 20;
    /// How long the writer waits for more lines before a write, unless it already has
    /// `GATHER_BYTES`: a log line is never held back longer than this.
    ///
    /// 10 ms: at a thousand requests a second that is one write of ten lines instead of
    /// ten writes and ten wake-ups of this thread, and no reader of a log notices 10 ms.
    const GATHER_TIME: std::time::Duration = std::time::Duration::from_millis(10);
    const GATHER_BYTES: usize = 64 * 1024;

    fn start(sink: impl std::io::Write + Send + 'static) -> LogWriter {
        let shared = Arc::new(LogShared {
            state: Mutex::new(LogState::default()),
            lines: Condvar::new(),
            room: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || s.run(sink))
            .expect("start the log writer thread");
        LogWriter {
            shared,
            thread: Some(thread),
        }
    }

    /// A handle for the subscriber, which does not stop the thread.
    fn handle(&self) -> LogWriter {
        LogWriter {
            shared: self.shared.clone(),
            thread: None,
        }
    }
}

impl LogShared {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding the lock leaves at worst a partial line.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, mut sink: impl std::io::Write) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.lock();
            while state.pending.is_empty() && !state.stopping {
                state.writer_asleep = true;
                state = self.lines.wait(state).unwrap_or_else(|e| e.into_inner());
                state.writer_asleep = false;
            }
            if state.pending.is_empty() {
                return;
            }
            if !state.stopping && state.pending.len() < LogWriter::GATHER_BYTES {
                // Let the lines of the next moment join this one's: under load that makes
                // one write of many lines, and while lines keep coming the writer never
                // sleeps on the condition variable, so loggers never have to wake it.
                drop(state);
                std::thread::sleep(LogWriter::GATHER_TIME);
                state = self.lock();
            }
            std::mem::swap(&mut batch, &mut state.pending);
            if std::mem::take(&mut state.loggers_waiting) {
                self.room.notify_all();
            }
            drop(state);
            // Nowhere to report a failed log write; carry on, as eprintln would not.
            let _ = sink.write_all(&batch);
            batch.clear();
        }
    }
}

/// What the subscriber writes one event's line through.
pub struct LogLine<'a>(&'a LogShared);

impl std::io::Write for LogLine<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = self.0;
        let mut state = shared.lock();
        while state.pending.len() >= LogWriter::MAX_PENDING && !state.stopping {
            state.loggers_waiting = true;
            state = shared.room.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.pending.extend_from_slice(line);
        // A waking call costs a system call: make it only when the writer sleeps.
        let wake = std::mem::take(&mut state.writer_asleep);
        drop(state);
        if wake {
            shared.lines.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(&self.shared)
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let Some(handle) = self.thread.take() else {
            return;
        };
        self.shared.lock().stopping = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        let _ = handle.join();
    }
}

/// Formats an event's fields as tracing-subscriber's default does without colours, at a
/// fraction of the cost: the default styles every field name, even with styling off,
/// through several layers of formatting machinery, and the access log writes a dozen fields
/// per request. The message and error values, which the default sanitises, and anything
/// unusual are handed to the default formatter itself.
///
/// Unlike the default, no value writes a control character ([`write_escaped`]): the
/// default writes `%value` fields as they are, and the message and errors with their line
/// breaks, so a client's text in an error could forge log lines of its own.
struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// Writes `name=value` pairs separated by spaces, the value in its `Debug` form.
struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    /// Write one `name=value` pair, `value` writing itself.
    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> std::fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let w = &mut self.writer;
        let pad = if std::mem::take(&mut self.is_empty) {
            ""
        } else {
            " "
        };
        self.result = w
            .write_str(pad)
            .and_then(|()| w.write_str(name))
            .and_then(|()| w.write_char('='))
            .and_then(|()| value(w));
    }

    /// Let the default formatter write one field, for the cases that it sanitises, with
    /// the control characters it leaves (line breaks, tabs) escaped on the way out. Its
    /// writer has no colours, as this one has none: nothing it writes is an escape code.
    fn default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut escaping = Escaping(self.writer.by_ref());
        let mut v = DefaultVisitor::new(Writer::new(&mut escaping), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    /// Fields the default formatter treats specially: the message, and (with tracing-log)
    /// the metadata of bridged `log` records, which it skips.
    fn is_special(field: &Field) -> bool {
        field.name() == "message" || field.name().starts_with("log.")
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::is_special(field) {
            return self.default(|v| v.record_u64(field, value));
        }
        self.pair(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::is_special(field) {
            return self.default(|v| v.record_i64(field, value));
        }
        self.pair(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::is_special(field) {
            return self.default(|v| v.record_bool(field, value));
        }
        self.pair(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::is_special(field) {
            return self.default(|v| v.record_str(field, value));
        }
        // A string's `Debug` form escapes every control character already.
        self.pair(field, |w| write!(w, "{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.default(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if Self::is_special(field) {
            return self.default(|v| v.record_debug(field, value));
        }
        use std::fmt::Write as _;
        // `%value` fields arrive here, written by their `Display`: as they are.
        self.pair(field, |w| write!(Escaping(w), "{value:?}"));
    }
}

impl VisitOutput<std::fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// Formats an event's fields as tracing-subscriber's default does with colours, for a
/// person at a terminal, but with control characters in values escaped as [`PlainFields`]
/// escapes them: there, an ESC from a client would be obeyed by the terminal. The default
/// formatter writes everything, styles included, and sees each value already escaped.
struct TerminalFields;

impl<'a> MakeVisitor<Writer<'a>> for TerminalFields {
    type Visitor = TerminalVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> TerminalVisitor<'a> {
        TerminalVisitor(DefaultVisitor::new(writer, true))
    }
}

struct TerminalVisitor<'a>(DefaultVisitor<'a>);

impl Visit for TerminalVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            // What the default does with a message string, escaped.
            self.0
                .record_debug(field, &Escaped(format_args!("{value}")));
        } else {
            // A string's `Debug` form escapes every control character already.
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut chain = Some(value);
        while let Some(e) = chain {
            if e.to_string().chars().any(char::is_control) {
                // The default's words, unstyled but escaped: `E NAME.sources=[S1, S2]`.
                return self.0.record_debug(
                    field,
                    &Escaped(format_args!("{}", ErrorText(value, field.name()))),
                );
            }
            chain = e.source();
        }
        self.0.record_error(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }
}

impl VisitOutput<std::fmt::Result> for TerminalVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for TerminalVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        self.0.writer()
    }
}

/// An error and its sources as the default formatter writes them, without the styles.
struct ErrorText<'a>(&'a (dyn std::error::Error + 'static), &'a str);

impl std::fmt::Display for ErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ErrorText(error, name) = *self;
        write!(f, "{error}")?;
        let Some(source) = error.source() else {
            return Ok(());
        };
        write!(f, " {name}.sources=[{source}")?;
        let mut next = source.source();
        while let Some(e) = next {
            write!(f, ", {e}")?;
            next = e.source();
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use std::io::Write as _;

    use tracing_subscriber::fmt::MakeWriter;

    use super::PlainFields;

    /// Collects everything a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer \x1b[31m failure")]
    struct Outer(#[source] std::io::Error);

    fn emit_everything() {
        let err = Outer(std::io::Error::other("inner cause"));
        let none: Option<u64> = None;
        tracing::info!(
            target: "access",
            request_id = %"abc-123",
            model = "bench \"quoted\" \n\x1b[2J\u{85}",
            status = 200u16,
            queue_wait_ms = 0u64,
            ttft_ms = Some(17u64),
            prompt_tokens = none,
            delta = -42i64,
            ratio = 0.5f64,
            ok = true,
            ending = ?Some("Complete"),
            r#type = "raw",
            error = &err as &(dyn std::error::Error + 'static),
            "request \x1b[31m red \u{9b} {}", 7
        );
        tracing::warn!(big = u64::MAX, small = i64::MIN, zero = 0u64, "édition");
        tracing::info!(only = 1u64);
    }

    fn render(plain: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(out.clone());
        if plain {
            tracing::subscriber::with_default(
                builder.fmt_fields(PlainFields).finish(),
                emit_everything,
            );
        } else {
            tracing::subscriber::with_default(builder.finish(), emit_everything);
        }
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A sink whose writes wait until the test opens it.
    struct Gated {
        out: Captured,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl std::io::Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.open;
            let _open = cv.wait_while(lock.lock().unwrap(), |open| !*open).unwrap();
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_log_writer_writes_every_line_whole_before_it_stops() {
        let out = Captured::default();
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let writer = super::LogWriter::start(Gated {
            out: out.clone(),
            open: open.clone(),
        });
        // The writer takes the first line and stays stuck writing it while the rest pile
        // up behind, and is told to stop before it can write them.
        writer.make_writer().write_all(b"first\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::thread::scope(|scope| {
            for t in 0..4 {
                let writer = &writer;
                scope.spawn(move || {
                    for i in 0..2000 {
                        let line = format!("thread {t} line {i} {}\n", "x".repeat(i % 100));
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            *open.0.lock().unwrap() = true;
            open.1.notify_all();
        });
        drop(writer);
        opener.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("first"));
        let mut next = [0usize; 4];
        for line in lines {
            let mut words = line.split(' ');
            let t: usize = words.nth(1).unwrap().parse().unwrap();
            let i: usize = words.nth(1).unwrap().parse().unwrap();
            assert_eq!(i, next[t], "lines of thread {t} out of order or missing");
            assert_eq!(words.next().unwrap().len(), i % 100, "a torn line");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }

    #[test]
    fn timestamps_are_the_utc_date_and_time_of_the_second() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (951_868_799, "2000-02-29T23:59:59"),
            (1_795_711_579, "2026-11-26T16:46:19"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (super::YEAR_10000 - 1, "9999-12-31T23:59:59"),
        ] {
            assert_eq!(
                std::str::from_utf8(&super::date_and_time(secs)).unwrap(),
                text
            );
        }
    }

    #[test]
    fn timestamps_read_as_tracing_subscriber_writes_them() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        // Both read the clock: compare to the second, retrying across a second boundary.
        for _ in 0..5 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            super::Clock
                .format_time(&mut Writer::new(&mut ours))
                .unwrap();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("the two clocks never agreed to the second");
    }

    /// Removes the timestamp (the first `…Z` of 27 characters) from every line.
    fn without_times(text: &str) -> String {
        text.lines()
            .map(|l| {
                let z = l.find('Z').expect("a timestamp");
                format!("{}{}\n", &l[..z - 26], &l[z + 1..])
            })
            .collect()
    }

    #[test]
    fn access_lines_are_what_the_subscriber_writes() {
        use super::{Access, Clock};
        let odd = Access {
            request_id: "abc\t-123\u{85}",
            model: "bench \"quoted\" \\ \n\x1b[2J\u{85}é",
            backend: "127.0.0.1:8090",
            endpoint: "chat",
            status: 200,
            ending: "Complete",
            queue_wait_ms: 0,
            ttft_ms: Some(17),
            prompt_tokens: None,
            completion_tokens: 64,
            duration_ms: 1234,
            bytes: u64::MAX,
        };
        let full = Access {
            status: 502,
            ending: "ClientGone",
            ttft_ms: None,
            prompt_tokens: Some(4096),
            model: "falcon3-10b",
            ..odd
        };
        for json in [false, true] {
            let out = Captured::default();
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_timer(Clock)
                .with_writer(out.clone());
            let dispatch = if json {
                tracing::Dispatch::new(builder.json().finish())
            } else {
                tracing::Dispatch::new(builder.fmt_fields(PlainFields).finish())
            };
            tracing::dispatcher::with_default(&dispatch, || {
                odd.via_tracing();
                full.via_tracing();
            });
            let theirs = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let ours: String = [odd, full]
                .iter()
                .map(|a| {
                    String::from_utf8(if json { a.json_line() } else { a.text_line() }).unwrap()
                })
                .collect();
            assert_eq!(theirs.lines().count(), 2, "{theirs}");
            assert_eq!(without_times(&ours), without_times(&theirs), "json: {json}");
            if !json {
                // Not even the request id's tab and C1 control are written raw.
                assert!(
                    !ours.lines().any(|l| l.chars().any(char::is_control)),
                    "{ours:?}"
                );
                assert!(ours.contains("request_id=abc\\t-123\\u{85} "), "{ours}");
            }
        }
    }

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        super::write_escaped(&mut out, s).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        for (raw, want) in [
            ("", ""),
            (
                "plain ascii, \"quotes\" and \\",
                "plain ascii, \"quotes\" and \\",
            ),
            ("édition 日本語 ©°", "édition 日本語 ©°"),
            ("m\nINJECTED status=200", "m\\nINJECTED status=200"),
            ("a\r\nb\tc", "a\\r\\nb\\tc"),
            ("\x1b[31mred\x1b[0m", "\\u{1b}[31mred\\u{1b}[0m"),
            (
                "\0\x07\x08\x0c\x1f\x7f",
                "\\0\\u{7}\\u{8}\\u{c}\\u{1f}\\u{7f}",
            ),
            (
                "next\u{85}line csi\u{9b}2J \u{80}\u{9f}",
                "next\\u{85}line csi\\u{9b}2J \\u{80}\\u{9f}",
            ),
            // U+00A0 and U+00BF share the first byte of C1 controls but are not ones.
            ("\u{a0}\u{bf}é\n", "\u{a0}\u{bf}é\\n"),
        ] {
            assert_eq!(escaped(raw), want, "{raw:?}");
            assert!(!escaped(raw).chars().any(char::is_control), "{raw:?}");
        }
        // The quick check lets nothing through that holds a control.
        for c in (0..0x110000).filter_map(char::from_u32) {
            let s = format!("x{c}y");
            if c.is_control() {
                assert!(super::may_hold_controls(&s), "{c:?}");
            }
        }
        assert!(!super::may_hold_controls(
            "request_id=abc-123 model=\"é日\""
        ));
    }

    /// Events carrying client text with line breaks and escape codes, as the gateway logs
    /// them: a `%err` field, a string field, a message, an error value.
    fn emit_hostile() {
        #[derive(Debug, thiserror::Error)]
        #[error("bad \r\nINJECTED level=ERROR \x1b[2J\u{9b}")]
        struct Hostile(#[source] std::io::Error);
        let err = "the model 'm\nINJECTED status=200' does not exist";
        let source = Hostile(std::io::Error::other("cause\nINJECTED too\x07"));
        tracing::info!(
            target: "access",
            request_id = %"id\tx\u{85}",
            status = 404u16,
            error = %err,
            model = "m\nINJECTED \x1b[31m",
            "refused \nINJECTED message \x1b]0;title\x07"
        );
        tracing::warn!(
            error = &source as &(dyn std::error::Error + 'static),
            "an error value"
        );
        tracing::info!(message = %"message as Display\nINJECTED", n = 1u64);
        tracing::info!(message = "message as str\r\nINJECTED", n = 2u64);
    }

    fn render_with(
        fields: impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
        ansi: bool,
        emit: fn(),
    ) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .without_time()
            .with_writer(out.clone())
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn plain_fields_write_no_control_characters_from_any_value() {
        let text = render_with(PlainFields, false, emit_hostile);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(!text.lines().any(|l| l.starts_with("INJECTED")), "{text}");
        // Nothing but the line ends is a control character.
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        for want in [
            "request_id=id\\tx\\u{85}",
            "error=the model 'm\\nINJECTED status=200' does not exist",
            "model=\"m\\nINJECTED \\u{1b}[31m\"",
            // The message's ESC and BEL as the default formatter already escapes them.
            "refused \\nINJECTED message \\x1b]0;title\\x07",
            "error=bad \\r\\nINJECTED level=ERROR \\x1b[2J\\u{9b} error.sources=[cause\\nINJECTED too\\x07]",
            "message as Display\\nINJECTED n=1",
            "message as str\\r\\nINJECTED n=2",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
    }

    #[test]
    fn terminal_fields_write_no_control_characters_but_their_colours() {
        let text = render_with(super::TerminalFields, true, emit_hostile);
        assert_eq!(text.lines().count(), 4, "{text}");
        // Take out the styles (`ESC [ digits;… m`): no control character is left.
        let mut unstyled = String::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find('\x1b') {
            unstyled.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let end = after
                .strip_prefix('[')
                .and_then(|a| {
                    a.find(|c: char| !c.is_ascii_digit() && c != ';')
                        .map(|n| (a, n))
                })
                .filter(|(a, n)| a[*n..].starts_with('m'))
                .map(|(_, n)| n + 2)
                .unwrap_or_else(|| panic!("a raw ESC that is no style: {:?}", &rest[i..]));
            rest = &after[end..];
        }
        unstyled.push_str(rest);
        assert!(
            !unstyled.lines().any(|l| l.starts_with("INJECTED")),
            "{unstyled}"
        );
        assert!(
            !unstyled.chars().any(|c| c.is_control() && c != '\n'),
            "{unstyled:?}"
        );
        for want in [
            "id\\tx\\u{85}",
            "the model 'm\\nINJECTED status=200' does not exist",
            "\"m\\nINJECTED \\u{1b}[31m\"",
            "refused \\nINJECTED message \\u{1b}]0;title\\u{7}",
            "bad \\r\\nINJECTED level=ERROR \\u{1b}[2J\\u{9b} error.sources=[cause\\nINJECTED too\\u{7}]",
            "message as Display\\nINJECTED",
            "message as str\\r\\nINJECTED",
        ] {
            assert!(unstyled.contains(want), "no {want:?} in:\n{unstyled}");
        }
    }

    #[test]
    fn terminal_fields_write_ordinary_events_as_the_default_formatter_does() {
        fn ordinary() {
            tracing::info!(
                target: "access",
                request_id = %"abc-123",
                model = "bench \"quoted\" é",
                status = 200u16,
                ttft_ms = Some(17u64),
                ok = true,
                ending = ?Some("Complete"),
                r#type = "raw",
                error = &std::io::Error::other("plain failure") as &(dyn std::error::Error + 'static),
                "request {} édition", 7
            );
            tracing::warn!(big = u64::MAX, small = i64::MIN, "warned");
            tracing::info!(only = 1u64);
        }
        let ours = render_with(super::TerminalFields, true, ordinary);
        let theirs = render_with(
            tracing_subscriber::fmt::format::DefaultFields::new(),
            true,
            ordinary,
        );
        assert!(ours.contains('\x1b'), "coloured: {ours:?}");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes_without_colours() {
        let default = render(false);
        assert_eq!(default.lines().count(), 3, "{default}");
        assert!(default.contains("ttft_ms=17"), "{default}");
        assert_eq!(render(true), default);
    }
}
