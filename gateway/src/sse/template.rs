//! The last token event read in full, to read the next ones by comparison.
//!
//! llama-server writes every token event of a stream as the same JSON object: only the
//! generated text differs, and `created` once a second. Searching each event for the keys
//! the scanner reads was a third of the gateway's instructions per stream (about 560 for a
//! 220-byte event). An event that is the remembered one with another text in the same place
//! holds the same keys, so two memory comparisons and a scan of the text answer instead,
//! for about a third of the search's cost.
//!
//! Why the answer is the same as a search's ([`super::Keys::find`]) would give:
//! - The remembered event had exactly one `"content":"`/`"text":"` and none of `error`,
//!   `timings` or `usage` as a key. The bytes before its text and from its closing quote on
//!   are the new event's too. A match that starts before the text ends before it, since no
//!   pattern is longer than `"content":"`, the match that ends where the text starts.
//! - Inside a JSON string every quote is escaped, while every pattern has a quote that
//!   follows a letter. So no pattern lies inside the text, and one that ends at its closing
//!   quote is not a key: the byte after that quote is `,`, `}` or `]`, never a colon.
//!
//! The new event's search would therefore find the same matches around the text and none in
//! it: the keys of the remembered event, with content set when the text is not empty.
//! A test compares both ways on random events.

/// Events longer than this are not remembered: the copy is kept for the whole stream, and
/// llama-server's token events are a few hundred bytes.
const MAX_TEMPLATE: usize = 4096;

/// One remembered token event, or none yet.
#[derive(Debug, Default)]
pub(super) struct Template {
    bytes: Vec<u8>,
    /// Where the text starts in `bytes`: just after the opening quote.
    text: usize,
    /// Where the text's closing quote is in `bytes`.
    end: usize,
}

impl Template {
    /// Remember `data`, an event whose only `"content":"` or `"text":"` ends at `text` and
    /// which has none of the other keys the scanner reads. Anything that does not fit the
    /// reasoning above (no closing quote, something other than `,`/`}`/`]` after it, too
    /// long) leaves nothing remembered.
    pub(super) fn learn(&mut self, data: &[u8], text: usize) {
        self.bytes.clear();
        let Some(end) = string_end(data, text) else {
            return;
        };
        // Without line breaks, the remembered bytes are one line wherever they recur, which
        // is what lets [`Template::event`] skip the search for the line's end.
        if data.len() > MAX_TEMPLATE
            || !matches!(data.get(end + 1), Some(b',' | b'}' | b']'))
            || memchr::memchr2(b'\n', b'\r', data).is_some()
        {
            return;
        }
        self.bytes.extend_from_slice(data);
        self.text = text;
        self.end = end;
    }

    /// For an event that is the remembered one with another text: whether that text is
    /// non-empty. `None` for any other event.
    pub(super) fn content(&self, data: &[u8]) -> Option<bool> {
        if self.bytes.is_empty() {
            return None;
        }
        let (before, after) = (&self.bytes[..self.text], &self.bytes[self.end..]);
        let end = data.len().checked_sub(after.len())?;
        if end < before.len() || !data.starts_with(before) || !data.ends_with(after) {
            return None;
        }
        (string_end(data, before.len())? == end).then_some(end > before.len())
    }

    /// For bytes that start with one whole event that is the remembered one with another
    /// text (`data: `, the payload, a blank line, all in the usual form): the bytes the event
    /// takes and whether its text is non-empty. Reading it line by line would give the same,
    /// since neither the remembered bytes nor the text hold a line break. `None` for
    /// anything else, or a payload longer than `max`.
    pub(super) fn event(&self, chunk: &[u8], max: usize) -> Option<(usize, bool)> {
        const FIELD: &[u8] = b"data: ";
        if self.bytes.is_empty() {
            return None;
        }
        let (before, after) = (&self.bytes[..self.text], &self.bytes[self.end..]);
        let payload = chunk.strip_prefix(FIELD)?;
        if !payload.starts_with(before) {
            return None;
        }
        let end = string_end(payload, before.len())?;
        let blank = match payload.get(end..)?.strip_prefix(after)? {
            [b'\n', b'\n', ..] => 2,
            [b'\r', b'\n', b'\r', b'\n', ..] => 4,
            _ => return None,
        };
        let len = end + after.len();
        (len <= max).then_some((FIELD.len() + len + blank, end > before.len()))
    }
}

/// Where the quote that closes the JSON string whose text starts at `from` is. `None` if a
/// line break comes first: no JSON string holds one, and the caller treats bytes with one
/// the general way.
fn string_end(data: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let rest = data.get(from..)?;
        let i = from + memchr::memchr3(b'"', b'\\', b'\n', rest)?;
        match data[i] {
            b'"' => return Some(i),
            b'\n' => return None,
            _ if data.get(i + 1) == Some(&b'\n') => return None,
            _ => from = i + 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[u8] = br#"{"choices":[{"delta":{"content":"Hel"},"index":0}],"id":"x"}"#;

    fn learned(event: &[u8]) -> Template {
        let mut t = Template::default();
        let text = event
            .windows(11)
            .position(|w| w == br#""content":""#)
            .unwrap()
            + 11;
        t.learn(event, text);
        t
    }

    #[test]
    fn the_same_event_with_other_text_is_recognised() {
        let t = learned(EVENT);
        assert_eq!(t.content(EVENT), Some(true));
        let other = br#"{"choices":[{"delta":{"content":"lo \"q\" \\"},"index":0}],"id":"x"}"#;
        assert_eq!(t.content(other), Some(true));
        let empty = br#"{"choices":[{"delta":{"content":""},"index":0}],"id":"x"}"#;
        assert_eq!(t.content(empty), Some(false));
    }

    #[test]
    fn anything_else_is_not() {
        let t = learned(EVENT);
        for other in [
            &br#"{"choices":[{"delta":{"content":"Hel"},"index":0}],"id":"y"}"#[..],
            br#"{"choices":[{"delta":{"content":"Hel"},"index":1}],"id":"x"}"#,
            // The text's end is not where the remembered part starts.
            br#"{"choices":[{"delta":{"content":"a"},"index":0}],"id":"x"},"index":0}],"id":"x"}"#,
            br#"{"choices":[{"delta":{"content":"a\"},"index":0}],"id":"x"}"#,
            br#"{"choices":[{"delta":{"content":"#,
            b"",
        ] {
            assert_eq!(t.content(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn events_the_reasoning_does_not_cover_are_not_remembered() {
        // Something other than `,`, `}` or `]` after the closing quote.
        let t = learned(br#"{"content":"a" ,"x":1}"#);
        assert_eq!(t.content(br#"{"content":"a" ,"x":1}"#), None);
        // No closing quote.
        let t = learned(br#"{"content":"a\"}"#);
        assert_eq!(t.content(br#"{"content":"a\"}"#), None);
        // Too long.
        let long = [
            &br#"{"content":"a","pad":""#[..],
            &[b'p'; MAX_TEMPLATE],
            b"\"}",
        ]
        .concat();
        assert_eq!(learned(&long).content(&long), None);
    }
}
