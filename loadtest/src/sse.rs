//! Incremental client-side parser for `text/event-stream` bodies.
//!
//! Bytes arrive in whatever pieces the transport delivers: an event, a line, even a CRLF pair can be
//! split across body frames. [`SseParser`] buffers only the unfinished line and the fields of the
//! event being assembled, and hands out each completed event as a borrowed [`SseEvent`], so reading
//! a stream costs no allocation per event once the buffers have grown.
//!
//! It follows the WHATWG event-stream rules (LF, CR and CRLF line ends, `:` comments, multi-line
//! `data:` joined with `\n`, one optional space after the colon, a leading BOM) with one deliberate
//! extension: fields outside the standard set are kept in [`SseEvent::extra`] and an event made only
//! of such fields is still dispatched. The llama.cpp fork that BitNet builds reports mid-stream
//! failures as `error: {...}` lines, which a strict parser would silently drop.

use std::ops::Range;

/// Longest unfinished line the parser buffers before giving up on the stream.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

/// The stream broke the parser's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A single line grew past the configured limit without a line end.
    #[error("event-stream line longer than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// One dispatched event. Borrowed from the parser; valid until the next call to
/// [`SseParser::next_event`] or [`SseParser::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, if the event named its type.
    pub event: Option<&'a str>,
    /// The joined `data:` lines, without the final line feed. Raw bytes: servers have been seen
    /// splitting multi-byte characters, and JSON decoders take bytes anyway.
    pub data: &'a [u8],
    /// The last `id:` seen on the stream so far (it persists across events, as the standard says).
    pub id: Option<&'a str>,
    /// A valid `retry:` value given in this event.
    pub retry: Option<u64>,
    /// Non-standard fields of this event, as `(name, value)` pairs in arrival order.
    pub extra: &'a [(String, String)],
}

impl SseEvent<'_> {
    /// Whether this is the OpenAI end-of-stream sentinel `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data == b"[DONE]"
    }

    /// The data as text, replacing invalid UTF-8.
    pub fn data_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.data)
    }

    /// The value of a non-standard field, if this event carried one.
    pub fn extra_field(&self, name: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Incremental event-stream parser. Feed it with [`push`](Self::push), then drain completed events
/// with [`next_event`](Self::next_event) until it returns `None`.
#[derive(Debug)]
pub struct SseParser {
    /// Received bytes not yet split into lines; `pos` is where unread bytes start.
    buf: Vec<u8>,
    pos: usize,
    /// The previous chunk ended in CR, so an LF at the start of the next one belongs to it.
    skip_lf: bool,
    /// Still looking for a byte-order mark at the very start of the stream.
    at_start: bool,
    data: Vec<u8>,
    has_data: bool,
    event_type: String,
    has_event_type: bool,
    last_id: String,
    has_id: bool,
    retry: Option<u64>,
    extra: Vec<(String, String)>,
    /// The event fields still hold the event handed out last time; clear them before reuse.
    dispatched: bool,
    max_line: usize,
    comments: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default line limit ([`DEFAULT_MAX_LINE`]).
    pub fn new() -> Self {
        Self::with_max_line(DEFAULT_MAX_LINE)
    }

    /// A parser that fails once an unfinished line exceeds `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            skip_lf: false,
            at_start: true,
            data: Vec::new(),
            has_data: false,
            event_type: String::new(),
            has_event_type: false,
            last_id: String::new(),
            has_id: false,
            retry: None,
            extra: Vec::new(),
            dispatched: false,
            max_line,
            comments: 0,
        }
    }

    /// Appends received bytes. Call [`next_event`](Self::next_event) afterwards until it returns
    /// `None`; events left undrained stay queued in the buffer.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        // Compact only when the consumed prefix dominates, so a frame carrying many events is
        // not shifted once per event.
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
        let pending = self.buf.len() - self.pos;
        if pending > self.max_line && !self.buf[self.pos..].iter().any(is_line_end) {
            return Err(SseError::LineTooLong {
                limit: self.max_line,
            });
        }
        Ok(())
    }

    /// The next complete event, if the buffered bytes hold one.
    pub fn next_event(&mut self) -> Option<SseEvent<'_>> {
        if self.dispatched {
            self.reset_event();
        }
        loop {
            let line = self.next_line()?;
            if line.is_empty() {
                if self.has_data || !self.extra.is_empty() {
                    break;
                }
                // A blank line after no data: the standard drops the event, event type included.
                self.reset_event();
                continue;
            }
            self.process_line(line);
        }
        self.dispatched = true;
        if self.data.last() == Some(&b'\n') {
            self.data.pop();
        }
        Some(SseEvent {
            event: self.has_event_type.then_some(self.event_type.as_str()),
            data: &self.data,
            id: self.has_id.then_some(self.last_id.as_str()),
            retry: self.retry,
            extra: &self.extra,
        })
    }

    /// How many comment lines (`:` keep-alive pings among them) the stream has carried.
    pub fn comments(&self) -> u64 {
        self.comments
    }

    /// Whether bytes of an unfinished line or event are buffered: a stream that ends in this
    /// state was cut off mid-event.
    pub fn has_partial(&self) -> bool {
        self.pos < self.buf.len() || self.has_data || !self.extra.is_empty()
    }

    fn reset_event(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.event_type.clear();
        self.has_event_type = false;
        self.retry = None;
        self.extra.clear();
        self.dispatched = false;
    }

    /// The byte range of the next complete line in `buf`, advancing past its terminator.
    fn next_line(&mut self) -> Option<Range<usize>> {
        if self.skip_lf && self.pos < self.buf.len() {
            self.skip_lf = false;
            if self.buf[self.pos] == b'\n' {
                self.pos += 1;
            }
        }
        if self.at_start {
            let rest = &self.buf[self.pos..];
            if rest.len() < 3 && b"\xEF\xBB\xBF".starts_with(rest) {
                return None;
            }
            self.at_start = false;
            if rest.starts_with(b"\xEF\xBB\xBF") {
                self.pos += 3;
            }
        }
        let start = self.pos;
        let offset = self.buf[start..].iter().position(is_line_end)?;
        let end = start + offset;
        self.pos = end + 1;
        if self.buf[end] == b'\r' {
            match self.buf.get(end + 1) {
                Some(b'\n') => self.pos += 1,
                Some(_) => {}
                None => self.skip_lf = true,
            }
        }
        Some(start..end)
    }

    fn process_line(&mut self, line: Range<usize>) {
        let bytes = &self.buf[line];
        if bytes[0] == b':' {
            self.comments += 1;
            return;
        }
        let (name, value) = match bytes.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &bytes[colon + 1..];
                (&bytes[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (bytes, &b""[..]),
        };
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event_type.clear();
                self.event_type.push_str(&String::from_utf8_lossy(value));
                self.has_event_type = true;
            }
            b"id" => {
                // The standard ignores ids containing NUL so they cannot truncate C strings.
                if !value.contains(&0) {
                    self.last_id.clear();
                    self.last_id.push_str(&String::from_utf8_lossy(value));
                    self.has_id = true;
                }
            }
            b"retry" => {
                if !value.is_empty() && value.iter().all(u8::is_ascii_digit) {
                    self.retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                }
            }
            _ => self.extra.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            )),
        }
    }
}

fn is_line_end(b: &u8) -> bool {
    *b == b'\n' || *b == b'\r'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an event carried, owned so tests can compare lists of them.
    #[derive(Debug, PartialEq, Eq)]
    struct Owned {
        event: Option<String>,
        data: String,
        id: Option<String>,
        retry: Option<u64>,
        extra: Vec<(String, String)>,
    }

    fn data(d: &str) -> Owned {
        Owned {
            event: None,
            data: d.to_owned(),
            id: None,
            retry: None,
            extra: Vec::new(),
        }
    }

    fn drain(parser: &mut SseParser, out: &mut Vec<Owned>) {
        while let Some(ev) = parser.next_event() {
            out.push(Owned {
                event: ev.event.map(str::to_owned),
                data: ev.data_str().into_owned(),
                id: ev.id.map(str::to_owned),
                retry: ev.retry,
                extra: ev.extra.to_vec(),
            });
        }
    }

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<Owned> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            parser.push(chunk).unwrap();
            drain(&mut parser, &mut out);
        }
        out
    }

    /// Parses `input` whole and split at every possible size, and checks all agree with `expected`.
    fn assert_parses_at_every_split(input: &[u8], expected: &[Owned]) {
        for piece in 1..=input.len().max(1) {
            assert_eq!(
                parse_in_pieces(input, piece),
                expected,
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn openai_stream_split_at_every_byte_yields_the_same_events() {
        let input = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        assert_parses_at_every_split(
            input,
            &[data("{\"a\":1}"), data("{\"b\":2}"), data("[DONE]")],
        );
        let mut parser = SseParser::new();
        parser.push(b"data: [DONE]\n\n").unwrap();
        assert!(parser.next_event().unwrap().is_done());
    }

    #[test]
    fn multi_line_data_is_joined_with_line_feeds() {
        assert_parses_at_every_split(
            b"data: first\ndata:second\ndata:  third\n\n",
            &[data("first\nsecond\n third")],
        );
    }

    #[test]
    fn crlf_and_bare_cr_line_ends_split_anywhere_are_understood() {
        let input = b"data: a\r\n\r\ndata: b\r\rdata: c\r\ndata: d\n\r\n";
        assert_parses_at_every_split(input, &[data("a"), data("b"), data("c\nd")]);
    }

    #[test]
    fn cr_at_chunk_end_followed_by_lf_is_one_line_end() {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"data: x\r").unwrap();
        drain(&mut parser, &mut out);
        parser.push(b"\ndata: y\r").unwrap();
        drain(&mut parser, &mut out);
        parser.push(b"\n\r\n").unwrap();
        drain(&mut parser, &mut out);
        // Were the LF after a split CR taken for a blank line, "x" and "y" would be two events.
        assert_eq!(out, vec![data("x\ny")]);
        assert!(!parser.has_partial());
    }

    #[test]
    fn comments_are_skipped_and_counted() {
        let input = b":\n\n: ping\ndata: real\n: inside\n\n";
        assert_parses_at_every_split(input, &[data("real")]);
        let mut parser = SseParser::new();
        parser.push(input).unwrap();
        while parser.next_event().is_some() {}
        assert_eq!(parser.comments(), 3);
    }

    #[test]
    fn event_type_id_and_retry_are_reported_and_id_persists() {
        let input =
            b"event: delta\nid: 7\nretry: 1500\ndata: one\n\ndata: two\n\nid\ndata: three\n\n";
        let expected = vec![
            Owned {
                event: Some("delta".into()),
                id: Some("7".into()),
                retry: Some(1500),
                ..data("one")
            },
            Owned {
                id: Some("7".into()),
                ..data("two")
            },
            Owned {
                id: Some(String::new()),
                ..data("three")
            },
        ];
        assert_parses_at_every_split(input, &expected);
    }

    #[test]
    fn invalid_retry_is_ignored() {
        assert_parses_at_every_split(b"retry: 12a\ndata: x\n\n", &[data("x")]);
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing_and_forget_the_event_type() {
        assert_parses_at_every_split(b"event: stale\n\n\n\ndata: x\n\n", &[data("x")]);
    }

    #[test]
    fn empty_data_field_dispatches_an_empty_event() {
        assert_parses_at_every_split(b"data\n\ndata:\n\n", &[data(""), data("")]);
    }

    #[test]
    fn non_standard_error_field_is_dispatched_as_extra() {
        let input = b"data: {\"x\":1}\n\nerror: {\"message\":\"boom\"}\n\ndata: [DONE]\n\n";
        let expected = vec![
            data("{\"x\":1}"),
            Owned {
                extra: vec![("error".into(), "{\"message\":\"boom\"}".into())],
                ..data("")
            },
            data("[DONE]"),
        ];
        assert_parses_at_every_split(input, &expected);
        let mut parser = SseParser::new();
        parser.push(b"error: {}\n\n").unwrap();
        assert_eq!(
            parser.next_event().unwrap().extra_field("error"),
            Some("{}")
        );
    }

    #[test]
    fn leading_byte_order_mark_is_stripped_even_when_split() {
        assert_parses_at_every_split(b"\xEF\xBB\xBFdata: x\n\n", &[data("x")]);
        // Only at the very start: later it is part of the field name.
        let out = parse_in_pieces(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n", 64);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].extra.len(), 1);
    }

    #[test]
    fn unfinished_event_is_held_back_and_reported_as_partial() {
        let mut parser = SseParser::new();
        parser.push(b"data: {\"half\":").unwrap();
        assert!(parser.next_event().is_none());
        assert!(parser.has_partial());
        parser.push(b"true}\n").unwrap();
        assert!(parser.next_event().is_none());
        assert!(parser.has_partial());
        parser.push(b"\n").unwrap();
        assert_eq!(parser.next_event().unwrap().data, b"{\"half\":true}");
        assert!(parser.next_event().is_none());
        assert!(!parser.has_partial());
    }

    #[test]
    fn split_multi_byte_characters_are_reassembled() {
        let input = "data: caf\u{e9} \u{1F600}\n\n".as_bytes();
        assert_parses_at_every_split(input, &[data("caf\u{e9} \u{1F600}")]);
    }

    #[test]
    fn overlong_line_is_an_error() {
        let mut parser = SseParser::with_max_line(8);
        assert_eq!(
            parser.push(b"data: 0123456789"),
            Err(SseError::LineTooLong { limit: 8 })
        );
        let mut parser = SseParser::with_max_line(8);
        assert!(parser.push(b"data: 1\n\ndata: 2\n\n").is_ok());
    }

    #[test]
    fn events_left_in_the_buffer_survive_later_pushes() {
        let mut parser = SseParser::new();
        parser.push(b"data: a\n\ndata: b\n\n").unwrap();
        assert_eq!(parser.next_event().unwrap().data, b"a");
        parser.push(b"data: c\n\n").unwrap();
        let mut out = Vec::new();
        drain(&mut parser, &mut out);
        assert_eq!(out, vec![data("b"), data("c")]);
    }
}
