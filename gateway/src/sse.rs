//! Token accounting from the bytes the relay forwards, without changing them.
//!
//! [`Scanner`] is fed each frame as it passes. For SSE it splits lines incrementally
//! (events may be split anywhere across frames, lines may end in CRLF, `data:` may span
//! several lines, `:` comments are skipped) and keeps only the current partial line, the
//! current event's data and a copy of one earlier event. Events that carry `usage` or
//! llama-server `timings` are parsed; other events are only checked for non-empty content,
//! which is the fallback count when a server reports no usage. An event that is that copy
//! with another text is read by comparison (`sse/template.rs`). A non-streaming body is kept
//! (up to a cap) and read at the end.

mod members;
mod template;

use std::sync::LazyLock;

use aho_corasick::{packed, AhoCorasick, MatchKind};
use serde::Deserialize;

/// Largest non-streaming body or single SSE event the scanner keeps for accounting.
/// Bigger ones are relayed all the same but not counted: accounting must never cost
/// unbounded memory.
const MAX_KEPT: usize = 1 << 20;

/// What the scanner learned about one response.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    /// Prompt tokens, from `usage` or `timings` (evaluated plus cached).
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens served from the backend's cache.
    pub cached_tokens: Option<u64>,
    /// Completion tokens, from `usage` or `timings`.
    pub completion_tokens: Option<u64>,
    /// Events (or bodies) that carried non-empty generated content.
    pub content_events: u64,
    /// Decode rate llama-server reported.
    pub predicted_per_second: Option<f64>,
    /// Prompt tokens llama-server evaluated (`timings.prompt_n`, cached ones excluded).
    pub evaluated_tokens: Option<u64>,
    /// Prompt evaluation rate llama-server reported.
    pub prompt_per_second: Option<f64>,
    /// An `error` object arrived in the body.
    pub saw_error: bool,
}

impl Tally {
    /// Completion tokens: reported, or else the count of content-bearing events.
    pub fn completion(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.content_events)
    }
}

/// Incremental scanner for one response body.
#[derive(Debug)]
pub struct Scanner {
    sse: bool,
    line: Vec<u8>,
    data: Vec<u8>,
    overflow: bool,
    tally: Tally,
    /// The last token event read in full, for reading the next ones by comparison.
    template: template::Template,
}

#[derive(Default, Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Default, Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Timings {
    #[serde(default)]
    prompt_n: Option<u64>,
    #[serde(default)]
    cache_n: Option<u64>,
    #[serde(default)]
    predicted_n: Option<u64>,
    #[serde(default)]
    predicted_per_second: Option<f64>,
    #[serde(default)]
    prompt_per_second: Option<f64>,
}

impl Usage {
    /// `usage` at the start of `value`.
    fn read(value: &[u8]) -> Option<Usage> {
        walk_or_parse(value, |u: &mut Usage, parent, key, raw| {
            match (parent, key) {
                (b"", b"prompt_tokens") => u.prompt_tokens = members::int(raw),
                (b"", b"completion_tokens") => u.completion_tokens = members::int(raw),
                (b"prompt_tokens_details", b"cached_tokens") => {
                    u.prompt_tokens_details = Some(PromptDetails {
                        cached_tokens: members::int(raw),
                    })
                }
                _ => {}
            }
        })
    }
}

impl Timings {
    /// `timings` at the start of `value`.
    fn read(value: &[u8]) -> Option<Timings> {
        walk_or_parse(value, |t: &mut Timings, parent, key, raw| {
            if !parent.is_empty() {
                return;
            }
            match key {
                b"prompt_n" => t.prompt_n = members::int(raw),
                b"cache_n" => t.cache_n = members::int(raw),
                b"predicted_n" => t.predicted_n = members::int(raw),
                b"predicted_per_second" => t.predicted_per_second = members::float(raw),
                b"prompt_per_second" => t.prompt_per_second = members::float(raw),
                _ => {}
            }
        })
    }
}

/// The object at the start of `value` as a `T`: walked for its numbers, each handed to
/// `take`, or parsed by serde when it holds something the walk does not read (or is
/// `null`, or not an object at all).
fn walk_or_parse<'a, T: Default + Deserialize<'a>>(
    value: &'a [u8],
    mut take: impl FnMut(&mut T, &[u8], &[u8], &[u8]),
) -> Option<T> {
    let mut found = T::default();
    match members::walk(value, &mut |parent, key, raw| {
        take(&mut found, parent, key, raw)
    }) {
        Some(_) => Some(found),
        None => parse::<Option<T>>(value).flatten(),
    }
}

impl Scanner {
    /// A scanner for an SSE stream (`sse = true`) or a single JSON body.
    pub fn new(sse: bool) -> Scanner {
        Scanner {
            sse,
            line: Vec::new(),
            data: Vec::new(),
            overflow: false,
            tally: Tally::default(),
            template: template::Template::default(),
        }
    }

    /// Feed the next frame. Returns `true` if this frame completed an event with content
    /// (for streams) — the moment time-to-first-token is measured.
    // Out of line, so that a profile of the whole-program-optimised release build names
    // it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
    #[inline(never)]
    pub fn feed(&mut self, mut chunk: &[u8]) -> bool {
        if !self.sse {
            if self.data.len() + chunk.len() <= MAX_KEPT {
                self.data.extend_from_slice(chunk);
            } else {
                self.overflow = true;
            }
            return false;
        }
        let before = self.tally.content_events;
        loop {
            if self.line.is_empty() && self.data.is_empty() && !self.overflow {
                if let Some((taken, content)) = self.template.event(chunk, MAX_KEPT) {
                    self.tally.content_events += u64::from(content);
                    chunk = &chunk[taken..];
                    continue;
                }
            }
            let Some(nl) = memchr::memchr(b'\n', chunk) else {
                break;
            };
            let (head, rest) = chunk.split_at(nl);
            chunk = &rest[1..];
            if self.line.is_empty() {
                if let Some(after) = self.whole_event(head, chunk) {
                    chunk = after;
                    continue;
                }
                self.on_line(head);
            } else {
                self.push_line(head);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
                self.line = line;
                self.line.clear();
            }
        }
        self.push_line(chunk);
        self.tally.content_events > before
    }

    /// The usual event, one `data:` line and the blank line after it, both in the frame
    /// and nothing of another event pending: read where it lies instead of being copied
    /// line by line (the same outcome as [`Scanner::on_line`] on both lines). `line` is
    /// the first line without its `\n`, `rest` what follows; returns what follows the
    /// blank line, or `None` to go the general way.
    fn whole_event<'c>(&mut self, line: &[u8], rest: &'c [u8]) -> Option<&'c [u8]> {
        if !self.data.is_empty() || self.overflow {
            return None;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (b"data", value) = field(line)? else {
            return None;
        };
        let after = match rest {
            [b'\n', after @ ..] | [b'\r', b'\n', after @ ..] => after,
            _ => return None,
        };
        if value.len() > MAX_KEPT {
            return None;
        }
        if !value.is_empty() && value != b"[DONE]" {
            self.read_payload(value);
        }
        Some(after)
    }

    fn push_line(&mut self, part: &[u8]) {
        if self.line.len() + part.len() <= MAX_KEPT {
            self.line.extend_from_slice(part);
        } else {
            self.overflow = true;
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.end_event();
            return;
        }
        let Some((field, value)) = field(line) else {
            return;
        };
        match field {
            b"data" => {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                if self.data.len() + value.len() <= MAX_KEPT {
                    self.data.extend_from_slice(value);
                } else {
                    self.overflow = true;
                }
            }
            // The older BitNet server sends errors as a non-standard `error:` field.
            b"error" => self.tally.saw_error = true,
            _ => {}
        }
    }

    fn end_event(&mut self) {
        if !self.data.is_empty() && !self.overflow && self.data.as_slice() != b"[DONE]" {
            let data = std::mem::take(&mut self.data);
            self.read_payload(&data);
            self.data = data;
        }
        self.data.clear();
        self.overflow = false;
    }

    /// Read one event's data, or a whole non-streamed body.
    fn read_payload(&mut self, data: &[u8]) {
        if let Some(content) = self.template.content(data) {
            self.tally.content_events += u64::from(content);
            return;
        }
        // Only the values that carry accounting are parsed, not the whole payload: in a
        // non-streamed answer the generated text is most of the bytes.
        let keys = Keys::find(data);
        if let (true, Some(text), None, None, None) =
            (self.sse, keys.text, keys.error, keys.timings, keys.usage)
        {
            self.template.learn(data, text);
        }
        if keys.content {
            self.tally.content_events += 1;
        }
        if keys
            .error
            .and_then(parse::<Option<serde::de::IgnoredAny>>)
            .is_some_and(|e| e.is_some())
        {
            self.tally.saw_error = true;
        }
        if let Some(t) = keys.timings.and_then(Timings::read) {
            if let (Some(n), c) = (t.prompt_n, t.cache_n) {
                self.tally.prompt_tokens.get_or_insert(n + c.unwrap_or(0));
                self.tally.evaluated_tokens = Some(n);
            }
            if t.prompt_per_second.is_some() {
                self.tally.prompt_per_second = t.prompt_per_second;
            }
            if let Some(c) = t.cache_n {
                self.tally.cached_tokens.get_or_insert(c);
            }
            if let Some(n) = t.predicted_n {
                self.tally.completion_tokens.get_or_insert(n);
            }
            if t.predicted_per_second.is_some() {
                self.tally.predicted_per_second = t.predicted_per_second;
            }
        }
        // `usage` is the OpenAI-standard figure: it wins over `timings` when both appear.
        if let Some(u) = keys.usage.and_then(Usage::read) {
            if u.prompt_tokens.is_some() {
                self.tally.prompt_tokens = u.prompt_tokens;
            }
            if u.completion_tokens.is_some() {
                self.tally.completion_tokens = u.completion_tokens;
            }
            if let Some(c) = u.prompt_tokens_details.and_then(|d| d.cached_tokens) {
                self.tally.cached_tokens = Some(c);
            }
        }
    }

    /// Finish: read a non-streaming body, and return the tally.
    // Out of line, so that a profile of the whole-program-optimised release build names
    // it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
    #[inline(never)]
    pub fn finish(&mut self) -> Tally {
        if !self.sse && !self.overflow && !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            self.read_payload(&data);
        }
        self.tally.clone()
    }
}

/// A non-empty SSE line (without its line ending) as its field name and value; `None`
/// for a comment.
fn field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    if line.first() == Some(&b':') {
        return None;
    }
    let (field, value) = match line.iter().position(|&b| b == b':') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    Some((field, value.strip_prefix(b" ").unwrap_or(value)))
}

/// What one payload holds of what the scanner reads.
#[derive(Debug, Default, PartialEq)]
struct Keys<'a> {
    /// A chat or completion chunk with non-empty generated text: a `"content":"x` or
    /// `"text":"x` with at least one character. Cheap, and exact enough for a fallback
    /// count.
    content: bool,
    /// Where the values of the keys `error`, `timings` and `usage` start.
    error: Option<&'a [u8]>,
    timings: Option<&'a [u8]>,
    usage: Option<&'a [u8]>,
    /// Where the text starts when there is exactly one `"content":"` or `"text":"`.
    text: Option<usize>,
}

/// The patterns [`Keys::find`] looks for, in the order of its match arms.
const PATTERNS: [&[u8]; 5] = [
    b"\"content\":\"",
    b"\"text\":\"",
    b"\"error\"",
    b"\"timings\"",
    b"\"usage\"",
];

/// A search for all of [`PATTERNS`] at once.
enum Search {
    /// SIMD ("Teddy"), where the CPU has it: one pass over a llama-server token event
    /// costs about two thirds of the four single-pattern searches it replaced.
    Packed(packed::Searcher),
    /// The general automaton, several times slower, for CPUs without it.
    Automaton(AhoCorasick),
}

/// Built once: building it costs more than running it over one short SSE event, and a
/// stream has one event per token.
static SEARCH: LazyLock<Search> =
    LazyLock::new(|| Search::packed().unwrap_or_else(Search::automaton));

impl Search {
    fn packed() -> Option<Search> {
        packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(PATTERNS)
            .build()
            .map(Search::Packed)
    }

    fn automaton() -> Search {
        Search::Automaton(
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(PATTERNS)
                .expect("five short literal patterns"),
        )
    }
}

impl<'a> Keys<'a> {
    /// All of them in one pass over `data`, without parsing it. A search per pattern, one
    /// after the other, was about 60 % of the scanner's work per streamed event.
    ///
    /// A key name's quotes would be escaped inside a JSON string, so a match of a quoted
    /// name is either a key or a whole string value (`"type":"error"`): the first match
    /// followed by a colon is the key. Matches do not overlap; none is lost by that,
    /// since a key's opening quote follows `{` or `,`, never the end of another pattern.
    fn find(data: &'a [u8]) -> Keys<'a> {
        Keys::find_with(&SEARCH, data)
    }

    fn find_with(search: &Search, data: &'a [u8]) -> Keys<'a> {
        let mut keys = Keys::default();
        let mut texts = 0;
        let mut each = |pattern: usize, end: usize| {
            let after = &data[end..];
            let slot = match pattern {
                0 | 1 => {
                    keys.content |= after.first().is_some_and(|&b| b != b'"');
                    texts += 1;
                    keys.text = Some(end);
                    return;
                }
                2 => &mut keys.error,
                3 => &mut keys.timings,
                _ => &mut keys.usage,
            };
            if slot.is_none() {
                *slot = after.trim_ascii_start().strip_prefix(b":");
            }
        };
        match search {
            Search::Packed(s) => s
                .find_iter(data)
                .for_each(|m| each(m.pattern().as_usize(), m.end())),
            Search::Automaton(a) => a
                .find_iter(data)
                .for_each(|m| each(m.pattern().as_usize(), m.end())),
        }
        if texts != 1 {
            keys.text = None;
        }
        keys
    }
}

/// The value at the start of `value` as a `T`, read by serde; `None` if it is not one.
fn parse<'de, T: Deserialize<'de>>(value: &'de [u8]) -> Option<T> {
    T::deserialize(&mut serde_json::Deserializer::from_slice(value)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
        ": keep-alive\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"timings\":{\"prompt_n\":7,\"cache_n\":5,\"predicted_n\":2,\"predicted_per_second\":18.5}}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":5}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Tally {
        Tally {
            prompt_tokens: Some(12),
            cached_tokens: Some(5),
            completion_tokens: Some(2),
            content_events: 2,
            predicted_per_second: Some(18.5),
            evaluated_tokens: Some(7),
            prompt_per_second: None,
            saw_error: false,
        }
    }

    #[test]
    fn reads_usage_timings_and_content_from_a_stream() {
        let mut s = Scanner::new(true);
        s.feed(STREAM.as_bytes());
        assert_eq!(s.finish(), expected());
    }

    #[test]
    fn every_split_of_the_stream_gives_the_same_tally() {
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            let mut s = Scanner::new(true);
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert_eq!(s.finish(), expected(), "split at {cut}");
        }
        let mut s = Scanner::new(true);
        for b in bytes {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.finish(), expected(), "byte by byte");
    }

    #[test]
    fn first_content_is_signalled_by_the_frame_that_completes_it() {
        let mut s = Scanner::new(true);
        assert!(!s.feed(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"));
        assert!(!s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}"));
        assert!(s.feed(b"\n\n"));
    }

    #[test]
    fn multi_line_data_is_joined_before_parsing() {
        let mut s = Scanner::new(true);
        s.feed(b"data: {\"usage\":\ndata: {\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        let t = s.finish();
        assert_eq!((t.prompt_tokens, t.completion_tokens), (Some(3), Some(4)));
    }

    #[test]
    fn without_usage_content_events_are_counted() {
        let mut s = Scanner::new(true);
        for _ in 0..5 {
            s.feed(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n");
        }
        assert_eq!(s.finish().completion(), 5);
    }

    #[test]
    fn errors_in_either_dialect_are_noticed() {
        let mut s = Scanner::new(true);
        s.feed(b"error: {\"code\":500,\"message\":\"boom\"}\n\n");
        assert!(s.finish().saw_error);
        let mut s = Scanner::new(true);
        s.feed(b"data: {\"error\":{\"message\":\"x\"}}\n\n");
        assert!(s.finish().saw_error);
    }

    #[test]
    fn only_real_keys_count_and_null_values_are_absent() {
        // The names appear in the generated text (escaped there, as JSON requires) before
        // the real keys; an `error` of null is no error.
        let body = br#"{"choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99} or \"error\":1"}}],"error":null,"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        let mut s = Scanner::new(false);
        s.feed(body);
        let t = s.finish();
        assert_eq!(t.prompt_tokens, Some(4));
        assert_eq!(t.completion_tokens, Some(2));
        assert!(!t.saw_error);
        let mut s = Scanner::new(false);
        s.feed(br#"{"usage": null, "error" : {"message":"boom"}}"#);
        let t = s.finish();
        assert_eq!(t.prompt_tokens, None);
        assert!(t.saw_error);
        // The same names as string values before the keys.
        let mut s = Scanner::new(false);
        s.feed(br#"{"type":"error","object":"usage","error":{"message":"x"},"usage":{"prompt_tokens":3}}"#);
        let t = s.finish();
        assert!(t.saw_error);
        assert_eq!(t.prompt_tokens, Some(3));
    }

    #[test]
    fn the_quick_walk_reads_what_serde_reads() {
        let usages = [
            r#"{"completion_tokens":32,"prompt_tokens":19,"prompt_tokens_details":{"cached_tokens":7},"total_tokens":51}"#,
            r#" { "prompt_tokens" : 3 , "completion_tokens":4 } "#,
            r#"{"prompt_tokens":3,"extra":[1,2],"completion_tokens":4}"#,
            r#"{"prompt_tokens":3,"note":"a \"quoted\" word","completion_tokens":4}"#,
            r#"{"prompt_tokens_details":null,"completion_tokens":1}"#,
            "null",
        ];
        for json in usages {
            let want = parse::<Option<Usage>>(json.as_bytes()).flatten();
            assert!(want.is_some() || json == "null", "{json}");
            assert_eq!(Usage::read(json.as_bytes()), want, "{json}");
        }
        let timings = [
            r#"{"cache_n":0,"predicted_ms":1777.777778,"predicted_n":32,"predicted_per_second":17.999999997750002,"predicted_per_token_ms":55.5555555625,"prompt_ms":316.666667,"prompt_n":19,"prompt_per_second":59.9999999368421,"prompt_per_token_ms":16.666666684210526}"#,
            r#"{"prompt_n":5,"draft":{"n":[1]},"predicted_n":2}"#,
            "null",
        ];
        for json in timings {
            let want = parse::<Option<Timings>>(json.as_bytes()).flatten();
            assert_eq!(Timings::read(json.as_bytes()), want, "{json}");
        }
        // Numbers of another object inside `usage` are not taken for its own.
        let u = Usage::read(br#"{"x":{"prompt_tokens":9,"cached_tokens":9},"prompt_tokens":1}"#);
        assert_eq!(
            u.map(|u| (u.prompt_tokens, u.prompt_tokens_details)),
            Some((Some(1), None))
        );
    }

    #[test]
    fn a_non_streaming_body_is_read_at_the_end() {
        let body = br#"{"choices":[{"message":{"content":"4"}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
        let mut s = Scanner::new(false);
        s.feed(&body[..10]);
        s.feed(&body[10..]);
        let t = s.finish();
        assert_eq!(
            (t.prompt_tokens, t.completion_tokens, t.content_events),
            (Some(9), Some(1), 1)
        );
    }

    #[test]
    fn keys_are_found_in_one_pass_and_only_as_keys() {
        let k = Keys::find(
            br#"{"choices":[{"delta":{"content":"x"}}],"usage" : {"a":1},"timings":{"b":2}}"#,
        );
        assert!(k.content);
        assert_eq!(k.usage, Some(&br#" {"a":1},"timings":{"b":2}}"#[..]));
        assert_eq!(k.timings, Some(&br#"{"b":2}}"#[..]));
        assert_eq!(k.error, None);

        // A name as a string value is not the key; the first one followed by a colon is.
        let k = Keys::find(br#"{"type":"error","error":{"code":1}}"#);
        assert_eq!(k.error, Some(&br#"{"code":1}}"#[..]));
        assert!(!k.content);

        // Empty text is no content; escaped names inside text are not keys.
        let k =
            Keys::find(br#"{"content":"","text":"say \"usage\": 1, \"error\": 2,{\"timings\":3"}"#);
        assert!(k.content, "the text is not empty");
        assert_eq!((k.usage, k.error, k.timings), (None, None, None));
        let k = Keys::find(br#"{"content":"","text":""}"#);
        assert_eq!(k, Keys::default());
    }

    #[test]
    fn the_fallback_search_finds_what_the_simd_one_does() {
        let Some(packed) = Search::packed() else {
            // This CPU runs the fallback for real; the other tests cover it.
            return;
        };
        let automaton = Search::automaton();
        // The patterns, pieces of them, and the bytes around keys, in random order.
        let mut pieces: Vec<&[u8]> = PATTERNS.to_vec();
        pieces.extend(PATTERNS.iter().map(|p| &p[..p.len() / 2]));
        pieces.extend([&b":"[..], b" ", b"{", b",", b"\"", b"\\", b"x", b"1"]);
        let mut rng = crate::fuzz::XorShift::new(0x1f12_3bb5_4f6c_2e45);
        let mut inputs: Vec<Vec<u8>> = (0..5_000)
            .map(|_| {
                (0..rng.below(24))
                    .flat_map(|_| pieces[rng.below(pieces.len())].iter().copied())
                    .collect()
            })
            .collect();
        inputs.push(STREAM.as_bytes().to_vec());
        let mut found = 0;
        for input in &inputs {
            let a = Keys::find_with(&packed, input);
            assert_eq!(
                a,
                Keys::find_with(&automaton, input),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            found += usize::from(a != Keys::default());
        }
        assert!(
            found > 500,
            "the inputs must hold the patterns often: {found}"
        );
    }

    #[test]
    fn events_read_in_place_tally_as_events_read_line_by_line() {
        // Whole frames take the in-place way for every complete one-line event; byte by
        // byte, every line is built up first. Both must agree on any stream.
        let pieces: [&[u8]; 16] = [
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\\\"b\\\\\"}}]}",
            b"data:{\"text\":\"\"}",
            b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
            b"data: {\"timings\":{\"prompt_n\":2,\"predicted_n\":5}}",
            b"data: {\"error\":{\"message\":\"x\"}}",
            b"data: [DONE]",
            b"data:",
            b"data",
            b": comment",
            b"error: {}",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"\r",
        ];
        let mut rng = crate::fuzz::XorShift::new(0x5851_f42d_4c95_7f2d);
        for _ in 0..3_000 {
            let stream: Vec<u8> = (0..rng.below(12))
                .flat_map(|_| pieces[rng.below(pieces.len())].iter().copied())
                .collect();
            let mut whole = Scanner::new(true);
            whole.feed(&stream);
            let mut bytewise = Scanner::new(true);
            for b in &stream {
                bytewise.feed(std::slice::from_ref(b));
            }
            assert_eq!(
                whole.finish(),
                bytewise.finish(),
                "{:?}",
                String::from_utf8_lossy(&stream)
            );
        }
    }

    #[test]
    fn an_event_read_by_comparison_reads_as_the_search_reads_it() {
        // Events are built as before + `"content":"` + text + `"` + after, from pieces
        // that make every case of the reasoning in sse/template.rs: several texts, keys
        // before and after, quotes and escapes in the text, bytes that are not JSON.
        let around: [&[u8]; 13] = [
            br#"{"choices":[{"delta":{"#,
            br#""content":""#,
            br#""text":""#,
            br#""usage""#,
            br#""error""#,
            br#""timings""#,
            b":",
            b",",
            b"}",
            b"]",
            b" ",
            b"\"",
            b"x",
        ];
        let inside: [&[u8]; 10] = [
            b"x",
            b"\\\"",
            b"\\\\",
            b"\\",
            b"\"",
            br#"\"usage\":"#,
            b"usage",
            b":",
            b",",
            b"}",
        ];
        let mut rng = crate::fuzz::XorShift::new(0x2545_f491_4f6c_dd1d);
        let pick = |rng: &mut crate::fuzz::XorShift, pieces: &[&[u8]], most: usize| {
            (0..rng.below(most))
                .flat_map(|_| pieces[rng.below(pieces.len())].iter().copied())
                .collect::<Vec<u8>>()
        };
        let (mut learned, mut recognised) = (0, 0);
        for _ in 0..20_000 {
            let before = pick(&mut rng, &around, 5);
            let after = pick(&mut rng, &around, 5);
            let event =
                |text: &[u8]| [&before[..], br#""content":""#, text, b"\"", &after].concat();
            let first = event(&pick(&mut rng, &inside, 4));
            let keys = Keys::find(&first);
            let mut remembered = template::Template::default();
            if let (Some(text), None, None, None) =
                (keys.text, keys.error, keys.timings, keys.usage)
            {
                remembered.learn(&first, text);
                learned += 1;
            }
            let mut next = event(&pick(&mut rng, &inside, 4));
            if rng.below(4) == 0 {
                let at = rng.below(next.len());
                next[at] = around[rng.below(around.len())][0];
            }
            if let Some(content) = remembered.content(&next) {
                recognised += 1;
                let keys = Keys::find(&next);
                assert_eq!(
                    (
                        keys.content,
                        keys.error,
                        keys.timings,
                        keys.usage,
                        keys.text.is_some()
                    ),
                    (content, None, None, None, true),
                    "{:?} after {:?}",
                    String::from_utf8_lossy(&next),
                    String::from_utf8_lossy(&first)
                );
            }
        }
        assert!(
            learned > 3_000 && recognised > 500,
            "{learned} {recognised}"
        );
    }

    #[test]
    fn repeated_events_read_by_comparison_tally_as_events_read_in_full() {
        let event = |text: &str, end: &str| {
            format!(r#"data: {{"choices":[{{"delta":{{"content":"{text}"}}}}],"id":"1"}}{end}"#)
        };
        let stream = [
            event("a", "\n\n"),
            event("", "\n\n"),
            event(r#"b\"c\\"#, "\r\n\r\n"),
            event("", "\r\n\r\n"),
            event("d", "\r\n\n"),
            event("", "\n\r\n"),
            event("\nf", "\n\n"),
            event("", "\n\n"),
            event("g", "\n"),
            ": comment\n\n".into(),
            event("h", "\n\n"),
        ]
        .concat();
        let mut whole = Scanner::new(true);
        whole.feed(stream.as_bytes());
        let mut bytewise = Scanner::new(true);
        for b in stream.as_bytes() {
            bytewise.feed(std::slice::from_ref(b));
        }
        // "\nf" is two lines: the event's data is the first, which ends where the text
        // starts. "g" has no blank line after it until the comment's.
        let t = whole.finish();
        assert_eq!(t.content_events, 5, "a, b\"c, d, g, h");
        assert_eq!(t, bytewise.finish());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_memory_stays_bounded() {
        // A small deterministic fuzz: random bytes biased towards SSE syntax.
        let alphabet = b"data: {}\"usage\":timings\r\n:[DONE]error,0123456789\xff\xc3";
        let mut rng = crate::fuzz::XorShift::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut s = Scanner::new(rng.next().is_multiple_of(2));
            for _ in 0..20 {
                let len = rng.below(64);
                let chunk = rng.bytes(alphabet, len, None);
                s.feed(&chunk);
            }
            s.finish();
        }
        let mut s = Scanner::new(true);
        let big = vec![b'a'; 1 << 16];
        for _ in 0..40 {
            s.feed(&big); // one line, never ended: kept only up to the cap
        }
        assert!(s.line.len() <= MAX_KEPT);
    }
}
