//! Inspect a request body for what routing needs, without re-serialising it.
//!
//! The body is forwarded as the client sent it; this only reads `model` and `stream`.
//! serde skips every other field, but still checks that the whole body is valid JSON, so
//! a malformed request is refused here with a clear message instead of reaching a backend
//! (the older BitNet server answers malformed JSON with a 500). It also refuses a body
//! nested deeper than [`MAX_NESTING`]: the gateway reads bodies without recursion, but the
//! backends behind it may not (llama-server turns a JSON schema into a grammar by walking
//! it recursively).

use std::borrow::Cow;

use serde::Deserialize;

/// The fields of a request body that routing looks at, borrowed from it where they can
/// be (a model name with no escapes in it, which is every real one).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspected<'a> {
    /// The requested model id or alias.
    pub model: Option<Cow<'a, str>>,
    /// Whether the client asked for a stream.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed")]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// A string borrowed from the body unless it has escapes. serde's own `Option<Cow<str>>`
/// always copies, `borrow` or not: a `Cow` inside an `Option` is read by `Cow`'s general
/// impl, which owns.
fn borrowed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(Text)
        }
    }
    d.deserialize_option(Text)
}

/// The deepest nesting of arrays and objects a request body may have. serde_json's own
/// recursion limit, so a body the gateway accepts is one any serde reader takes too; real
/// requests, tool schemas included, stay far below it.
pub const MAX_NESTING: usize = 128;

/// Read `model` and `stream` from a JSON object body.
// Out of line, so that a profile of the whole-program-optimised release build names
// it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
#[inline(never)]
pub fn inspect(body: &[u8]) -> Result<Inspected<'_>, String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err("the request body is empty; expected a JSON object".into()),
        Some(b'{') => {}
        // serde reads a struct from an array too, by position: `["m", true]` would be
        // model "m", streamed. Only an object is a request.
        Some(_) => return Err("the request body must be a JSON object ({...})".into()),
    }
    let peek: Peek<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not valid JSON for this endpoint: {e}"))?;
    if nests_deeper_than(body, MAX_NESTING) {
        return Err(format!(
            "the request body nests arrays and objects more than {MAX_NESTING} levels deep"
        ));
    }
    Ok(Inspected {
        model: peek.model,
        stream: peek.stream.unwrap_or(false),
    })
}

/// Whether arrays and objects in `body`, valid JSON, nest more than `limit` deep.
fn nests_deeper_than(body: &[u8], limit: usize) -> bool {
    // A body with no more opening brackets than the limit, in strings or not, cannot nest
    // past it. memchr finds them many bytes at a time; the walk below, a search per
    // string, is only needed for the rare body with more.
    if memchr::memchr2_iter(b'[', b'{', body).nth(limit).is_none() {
        return false;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                // To the closing quote, over escapes (`\"` among them).
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or_default()) {
                        Some(k) if body[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k;
                            break;
                        }
                        None => return false,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_and_ignores_the_rest() {
        let i = inspect(br#"{"messages":[{"role":"user","content":"hi \"x\""}],"model":"falcon3-10b","stream":true,"tools":[]}"#).unwrap();
        assert_eq!(
            i,
            Inspected {
                model: Some("falcon3-10b".into()),
                stream: true
            }
        );
        assert!(matches!(i.model, Some(Cow::Borrowed(_))));
        let i = inspect(br#"{"model":"esc\u00e9aped"}"#).unwrap();
        assert_eq!(i.model.as_deref(), Some("esc\u{e9}aped"));
        assert_eq!(inspect(br#"{"model":null}"#).unwrap().model, None);
        assert_eq!(inspect(b"{}").unwrap(), Inspected::default());
    }

    #[test]
    fn malformed_or_mistyped_bodies_are_refused_with_a_reason() {
        for bad in [
            &b""[..],
            b"  ",
            b"{",
            b"[1,2]",
            b"[]",
            br#"["falcon3-10b", true]"#,
            br#""hi""#,
            b"null",
            b"5",
            b"{\"model\":5}",
            b"{\"stream\":\"yes\"}",
            b"\xff\xfe",
            b"{} trailing",
        ] {
            let err = inspect(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
        assert!(inspect(br#"{"model":5}"#)
            .unwrap_err()
            .contains("invalid type"));
        for not_object in [&br#" ["m", true]"#[..], b"null", b"\"hi\""] {
            assert_eq!(
                inspect(not_object).unwrap_err(),
                "the request body must be a JSON object ({...})"
            );
        }
    }

    #[test]
    fn a_body_nested_past_the_limit_is_refused_and_strings_do_not_count() {
        let nested = |depth: usize| {
            let inner = format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
            format!(r#"{{"model":"m","x":{inner}}}"#)
        };
        assert!(inspect(nested(MAX_NESTING).as_bytes()).is_ok());
        let err = inspect(nested(MAX_NESTING + 1).as_bytes()).unwrap_err();
        assert!(err.contains("128 levels"), "{err}");
        // Deep objects too, reached through a key.
        let objects = |depth: usize| {
            format!(
                r#"{{"model":"m","a":{}1{}}}"#,
                r#"{"a":"#.repeat(depth - 1),
                "}".repeat(depth - 1)
            )
        };
        assert!(inspect(objects(MAX_NESTING).as_bytes()).is_ok());
        assert!(inspect(objects(MAX_NESTING + 1).as_bytes())
            .unwrap_err()
            .contains("levels deep"));
        // Brackets inside strings, escaped quotes among them, are text.
        let text = format!(r#"{{"model":"m","content":"\"{}\\\\"}}"#, "[{".repeat(500));
        assert!(inspect(text.as_bytes()).is_ok(), "{text}");
        // Siblings do not add up: a thousand shallow arrays are fine.
        let wide = format!(r#"{{"model":"m","x":[{}]}}"#, vec!["[[]]"; 1000].join(","));
        assert!(inspect(wide.as_bytes()).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic fuzz over inputs biased towards JSON syntax.
        let alphabet = br#"{}[]":,model stream true false null 0123456789.eE+-\u00"#;
        let mut rng = crate::fuzz::XorShift::new(0x2545_f491_4f6c_dd1d);
        for len in 0..4000usize {
            let body = rng.bytes(alphabet, len % 200, Some(17));
            let _ = inspect(&body);
            let _ = nests_deeper_than(&body, 3);
            let _ = crate::dialect::bitnet::rewrite_request(
                &body,
                "m",
                crate::dialect::ToolsMode::Drop,
            );
            let mut fixer = crate::dialect::bitnet::SseFixer::default();
            let _ = fixer.feed(&body);
            let _ = fixer.finish();
            let _ = crate::dialect::bitnet::normalise_error(500, &body);
        }
    }
}
