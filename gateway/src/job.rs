//! A generation request as routing sees it: how much prompt it carries, which conversation
//! prefix it continues, how long an answer it may ask for, and whose it is.
//!
//! Everything here comes from one borrowing pass over the body the client sent (after
//! [`inspect`](crate::inspect) has checked it), without tokenizing: the prompt is measured
//! in bytes and turned into tokens with a ratio the gateway calibrates from the backends'
//! own counts.
//!
//! The prefix is a chain of hashes, one link per chat message (or per block of a plain
//! prompt), each hashing the previous link with the message's role and raw JSON content.
//! Two requests share a prefix of `k` links exactly when their first `k` messages are
//! identical, which is what a llama-server slot's prompt cache can reuse: an agent re-sending
//! its history shares every earlier message with its previous turn, and a new session shares
//! the system prompt with every session before it.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Template tokens per chat message (role markers, separators), in bytes at the default
/// ratio, so that many short messages are not counted as nearly free.
const PER_MESSAGE_BYTES: u32 = 24;

/// Bytes of a plain (non-chat) prompt per link of its chain.
const PROMPT_BLOCK: usize = 512;

/// Most links kept per request: a longer conversation is still routed, its later messages
/// folded into the last link.
const MAX_LINKS: usize = 512;

/// Highest and lowest priority a request can carry.
pub const MAX_PRIORITY: i32 = 10;

/// One link of a prefix chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Hash of this link and every one before it.
    pub hash: u64,
    /// Prompt bytes up to and including this link.
    pub bytes: u32,
    /// The link is an assistant message: it may be the reply a slot generated itself.
    pub assistant: bool,
}

/// What routing knows about one request.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// The prompt's prefix chain; empty when the prompt could not be read.
    pub links: Arc<[Link]>,
    /// Prompt size in bytes (text plus per-message template allowance).
    pub prompt_bytes: u32,
    /// The most tokens the request may generate, if it says.
    pub max_tokens: Option<u32>,
    /// Hash of the session key (`X-Session-Id`, else the body's `user`).
    pub session: Option<u64>,
    /// Queue priority: higher goes first, within [-10, 10].
    pub priority: i32,
    /// The body is a JSON object with no `id_slot` of its own, so the gateway may pin it to
    /// the slot that holds its prefix.
    pub can_pin: bool,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    n_predict: Option<i64>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id_slot: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

impl Job {
    /// Read a job from a request body. `session` is the `X-Session-Id` header if any.
    /// A body that cannot be read gives an empty job (routing then knows nothing of it),
    /// because refusing malformed bodies is [`inspect`](crate::inspect)'s business.
    pub fn from_body(body: &[u8], session: Option<&str>, priority: i32) -> Job {
        let mut job = Job {
            priority: priority.clamp(-MAX_PRIORITY, MAX_PRIORITY),
            ..Job::default()
        };
        let Ok(f) = serde_json::from_slice::<Fields<'_>>(body) else {
            return job;
        };
        job.can_pin = f.id_slot.is_none();
        job.max_tokens = [f.max_completion_tokens, f.max_tokens, f.n_predict]
            .into_iter()
            .flatten()
            .find(|&n| n >= 0)
            .map(|n| n.min(i64::from(u32::MAX)) as u32);
        job.session = session
            .filter(|s| !s.is_empty())
            .map(|s| hash_bytes(0, s.as_bytes()))
            .or_else(|| f.user.map(|u| hash_bytes(0, u.get().as_bytes())));
        let seed = f
            .tools
            .map_or(0x9e37_79b9, |t| hash_bytes(1, t.get().as_bytes()));
        let mut links = Vec::new();
        let mut bytes: u32 = 0;
        if let Some(messages) = f.messages {
            let mut h = seed;
            for m in &messages {
                let role = m.role.map_or("", |r| r.get());
                let content = m.content.map_or("", |c| c.get());
                h = hash_bytes(h, role.as_bytes());
                h = hash_bytes(h, content.as_bytes());
                bytes = bytes
                    .saturating_add(content.len().min(u32::MAX as usize) as u32)
                    .saturating_add(PER_MESSAGE_BYTES);
                let link = Link {
                    hash: h,
                    bytes,
                    assistant: role == "\"assistant\"",
                };
                if links.len() < MAX_LINKS {
                    links.push(link);
                } else if let Some(last) = links.last_mut() {
                    *last = Link {
                        assistant: false,
                        ..link
                    };
                }
            }
        } else if let Some(prompt) = f.prompt {
            let text = prompt.get().as_bytes();
            let mut h = seed;
            // Fixed block boundaries, so that a longer prompt with the same start shares
            // its blocks; only prompts beyond MAX_LINKS blocks get bigger ones.
            let per = PROMPT_BLOCK.max(
                text.len()
                    .div_ceil(MAX_LINKS)
                    .next_multiple_of(PROMPT_BLOCK),
            );
            for chunk in text.chunks(per) {
                h = hash_bytes(h, chunk);
                bytes = bytes.saturating_add(chunk.len() as u32);
                links.push(Link {
                    hash: h,
                    bytes,
                    assistant: false,
                });
            }
        }
        job.prompt_bytes = bytes;
        job.links = links.into();
        job
    }

    /// Prompt bytes that a cache holding `chain` (with `tail_reply` if it also holds the
    /// reply it generated after it) would not have to evaluate again.
    pub fn cached_bytes(&self, chain: &[Link], tail_reply: bool) -> u32 {
        self.reuse(chain, tail_reply).cached_bytes
    }

    /// What a cache holding `chain` offers this request, from one walk along the chain.
    pub fn reuse(&self, chain: &[Link], tail_reply: bool) -> Reuse {
        let n = self
            .links
            .iter()
            .zip(chain)
            .take_while(|(a, b)| a.hash == b.hash)
            .count();
        let mut n = n;
        // A slot that generated the reply now being re-sent holds it too: its next turn
        // continues right after it.
        if n == chain.len() && n > 0 && tail_reply && self.links.get(n).is_some_and(|l| l.assistant)
        {
            n += 1;
        }
        Reuse {
            cached_bytes: n.checked_sub(1).map_or(0, |i| self.links[i].bytes),
            // All of the chain, beyond its first message (which other conversations may
            // share too, like a common system prompt).
            continues: chain.len() >= 2 && n >= chain.len(),
        }
    }
}

/// What a slot's cached prefix offers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// Prompt bytes the slot would not have to evaluate again.
    pub cached_bytes: u32,
    /// The request continues the conversation the slot was left by.
    pub continues: bool,
}

fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(msgs: &[(&str, &str)]) -> Vec<u8> {
        let messages: Vec<_> = msgs
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn a_follow_up_turn_shares_every_earlier_message_with_its_previous_turn() {
        let t1 = Job::from_body(&chat(&[("system", "S"), ("user", "hello")]), None, 0);
        let t2 = Job::from_body(
            &chat(&[
                ("system", "S"),
                ("user", "hello"),
                ("assistant", "hi there"),
                ("user", "next"),
            ]),
            None,
            0,
        );
        assert_eq!(t1.links.len(), 2);
        assert_eq!(t2.links.len(), 4);
        assert_eq!(t1.links[..], t2.links[..2]);
        // Without the reply, the cache covers the first two messages.
        assert_eq!(t2.cached_bytes(&t1.links, false), t1.prompt_bytes);
        // The slot that served turn 1 also holds its reply.
        assert_eq!(t2.cached_bytes(&t1.links, true), t2.links[2].bytes);
        assert!(t2.cached_bytes(&t1.links, true) < t2.prompt_bytes);
        assert!(t2.reuse(&t1.links, true).continues);
        assert!(
            !t1.reuse(&t2.links, true).continues,
            "a shorter prompt continues nothing"
        );
    }

    #[test]
    fn sessions_with_the_same_system_prompt_share_only_that_prefix() {
        let a = Job::from_body(&chat(&[("system", "SYS"), ("user", "task a")]), None, 0);
        let b = Job::from_body(&chat(&[("system", "SYS"), ("user", "task b")]), None, 0);
        assert_eq!(b.cached_bytes(&a.links, true), a.links[0].bytes);
        assert!(
            !b.reuse(&a.links, true).continues,
            "a shared system prompt is not a continuation"
        );
        let c = Job::from_body(&chat(&[("system", "OTHER"), ("user", "task a")]), None, 0);
        assert_eq!(
            c.cached_bytes(&a.links, true),
            0,
            "a different system prompt"
        );
    }

    #[test]
    fn a_changed_earlier_message_breaks_the_chain_from_there() {
        let a = Job::from_body(
            &chat(&[("system", "S"), ("user", "x"), ("user", "y")]),
            None,
            0,
        );
        let b = Job::from_body(
            &chat(&[("system", "S"), ("user", "X"), ("user", "y")]),
            None,
            0,
        );
        assert_eq!(a.links[0], b.links[0]);
        assert_ne!(
            a.links[2].hash, b.links[2].hash,
            "chained: later links differ too"
        );
    }

    #[test]
    fn plain_prompts_are_chained_in_blocks() {
        let long = "word ".repeat(400);
        let a = Job::from_body(
            serde_json::to_vec(&serde_json::json!({"prompt": long}))
                .unwrap()
                .as_slice(),
            None,
            0,
        );
        let b = Job::from_body(
            serde_json::to_vec(&serde_json::json!({"prompt": format!("{long}and more")}))
                .unwrap()
                .as_slice(),
            None,
            0,
        );
        assert!(a.links.len() >= 3);
        assert!(
            b.cached_bytes(&a.links, false) >= 1500,
            "all full blocks are shared"
        );
    }

    #[test]
    fn limits_session_and_slot_fields_are_read() {
        let j = Job::from_body(
            br#"{"messages":[],"max_tokens":5,"max_completion_tokens":7,"user":"u1","id_slot":1}"#,
            None,
            50,
        );
        assert_eq!(j.max_tokens, Some(7), "max_completion_tokens wins");
        assert!(!j.can_pin, "the client chose a slot itself");
        assert_eq!(j.priority, MAX_PRIORITY, "clamped");
        let k = Job::from_body(br#"{"messages":[],"user":"u1"}"#, None, 0);
        assert_eq!(j.session, k.session);
        assert!(k.can_pin);
        let h = Job::from_body(br#"{"messages":[],"user":"u1"}"#, Some("s9"), 0);
        assert_ne!(h.session, k.session, "the header wins over `user`");
        assert_eq!(
            Job::from_body(br#"{"n_predict":-1}"#, None, 0).max_tokens,
            None
        );
    }

    #[test]
    fn unreadable_bodies_give_an_empty_job() {
        for bad in [&b"{"[..], b"[]", b"\xff", b"{\"messages\":5}"] {
            let j = Job::from_body(bad, None, 0);
            assert!(j.links.is_empty());
            assert_eq!(j.prompt_bytes, 0);
        }
    }
}
