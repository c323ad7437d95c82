//! The simulated vocabulary: how text becomes tokens and what the "model" says.
//!
//! Tokenisation is a deterministic split rather than a real tokenizer, because the simulator only
//! needs stable counts and a prefix property: if text `a` ends where a token ends and `b` starts
//! with `a`, then `tokens(b)` starts with `tokens(a)`. That is what makes re-sent conversation
//! history hit a slot's cache.
//!
//! The rules:
//! - whitespace separates tokens and is not itself a token;
//! - a run of letters, digits and `_` is one token per 12 characters;
//! - a special marker `<|name|>` (name made of word characters, at most 32) is one token;
//! - every other character is a token of its own.
//!
//! Token ids are a hash of the token text, so equal text always gives equal ids.

/// Size of the simulated vocabulary (Falcon3's).
pub(crate) const N_VOCAB: u32 = 131_072;

/// Longest run of word characters that still counts as one token.
const MAX_WORD_CHARS: usize = 12;

/// Longest name inside a `<|name|>` marker.
const MAX_MARKER_NAME: usize = 32;

/// Appends the ids of `text`'s tokens to `out`.
pub(crate) fn tokenize_into(text: &str, out: &mut Vec<u32>) {
    out.extend(Pieces { rest: text }.map(token_id));
}

/// The tokens of `text`, as the text each one covers (whitespace dropped).
pub(crate) fn pieces(text: &str) -> impl Iterator<Item = &str> {
    Pieces { rest: text }
}

/// The id of one token's text: FNV-1a folded into the vocabulary.
pub(crate) fn token_id(piece: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in piece.trim_start().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % N_VOCAB
}

/// A seed that depends on every token of `tokens`, so the same prompt always gets the same
/// answer and different prompts usually get different ones.
pub(crate) fn seed_of(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xcbf2_9ce4_8422_2325, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

struct Pieces<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start();
        let first = s.chars().next()?;
        let end = if is_word(first) {
            s.char_indices()
                .take(MAX_WORD_CHARS + 1)
                .find(|&(_, c)| !is_word(c))
                .map_or_else(
                    || {
                        s.char_indices()
                            .nth(MAX_WORD_CHARS)
                            .map_or(s.len(), |(i, _)| i)
                    },
                    |(i, _)| i,
                )
        } else {
            marker_len(s).unwrap_or(first.len_utf8())
        };
        let (piece, rest) = s.split_at(end);
        self.rest = rest;
        Some(piece)
    }
}

/// Length of a `<|name|>` marker at the start of `s`, if there is one.
fn marker_len(s: &str) -> Option<usize> {
    let inner = s.strip_prefix("<|")?;
    let close = inner.find("|>")?;
    let name = &inner[..close];
    (!name.is_empty() && name.len() <= MAX_MARKER_NAME && name.chars().all(is_word))
        .then_some(2 + close + 2)
}

// === Chat template ===

/// Opens a message in the ChatML-like template the simulator renders chats with.
pub(crate) const MSG_START: &str = "<|im_start|>";
/// Closes a message.
pub(crate) const MSG_END: &str = "<|im_end|>\n";
/// The template as `/props` reports it.
pub(crate) const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";

// === Generated text ===

/// Words the simulated model says, each with the space that precedes it mid-sentence. Plain
/// ASCII word characters only, so a word is exactly one token and never needs JSON escaping.
const WORDS: [&str; 48] = [
    " the", " model", " answer", " token", " slot", " cache", " prompt", " server", " request",
    " result", " value", " system", " data", " time", " rate", " queue", " batch", " layer",
    " weight", " ternary", " matrix", " vector", " kernel", " thread", " memory", " context",
    " window", " stream", " chunk", " reply", " is", " was", " can", " will", " runs", " holds",
    " keeps", " sends", " reads", " and", " of", " to", " in", " on", " with", " for", " fast",
    " slow",
];

/// Deterministic pseudo-words: a sentence of a few words, a comma or full stop, and on.
pub(crate) struct Babble {
    state: u64,
    /// Words until the next punctuation mark.
    until_punct: u32,
    /// Whether the next word is the first of the text, which has no leading space.
    first: bool,
}

impl Babble {
    pub(crate) fn new(seed: u64) -> Babble {
        let mut b = Babble {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            until_punct: 0,
            first: true,
        };
        b.until_punct = b.sentence_len();
        b
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64: tiny, fast and good enough to look varied.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn sentence_len(&mut self) -> u32 {
        4 + (self.next_u64() % 10) as u32
    }

    /// The next token's text, as it appears in the generated content.
    pub(crate) fn next_piece(&mut self) -> &'static str {
        if self.until_punct == 0 {
            self.until_punct = self.sentence_len();
            return if self.next_u64().is_multiple_of(3) {
                ","
            } else {
                "."
            };
        }
        self.until_punct -= 1;
        let word = WORDS[(self.next_u64() % WORDS.len() as u64) as usize];
        if std::mem::take(&mut self.first) {
            &word[1..]
        } else {
            word
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<u32> {
        let mut v = Vec::new();
        tokenize_into(s, &mut v);
        v
    }

    #[test]
    fn split_counts_words_punctuation_and_markers() {
        let p: Vec<&str> = pieces("<|im_start|>user\nHello, wörld_1!  <|x y|>").collect();
        assert_eq!(
            p,
            [
                "<|im_start|>",
                "user",
                "Hello",
                ",",
                "wörld_1",
                "!",
                "<",
                "|",
                "x",
                "y",
                "|",
                ">"
            ]
        );
    }

    #[test]
    fn long_words_are_cut_every_twelve_characters() {
        let p: Vec<&str> = pieces("abcdefghijklmnopqrstuvwxyz").collect();
        assert_eq!(p, ["abcdefghijkl", "mnopqrstuvwx", "yz"]);
    }

    #[test]
    fn text_extended_at_a_token_boundary_keeps_its_tokens_as_prefix() {
        let a = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n";
        let b = format!("{a}Sure, here it is.<|im_end|>\n");
        let (ta, tb) = (toks(a), toks(&b));
        assert!(tb.len() > ta.len());
        assert_eq!(&tb[..ta.len()], &ta[..]);
    }

    #[test]
    fn generated_text_retokenizes_to_the_generated_tokens() {
        let mut babble = Babble::new(42);
        let mut text = String::new();
        let mut ids = Vec::new();
        for _ in 0..200 {
            let p = babble.next_piece();
            text.push_str(p);
            ids.push(token_id(p));
        }
        assert_eq!(toks(&text), ids);
        assert!(text.contains('.') && text.contains(' '));
    }

    #[test]
    fn babble_is_deterministic_per_seed() {
        let run = |seed| {
            let mut b = Babble::new(seed);
            (0..50).map(|_| b.next_piece()).collect::<String>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
