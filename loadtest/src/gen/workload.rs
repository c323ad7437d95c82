//! What the generator asks: workload kinds, mixes of them, and the sessions that turn a kind into
//! a sequence of chat requests.
//!
//! A *session* is the unit of work for both loops. Single-shot kinds are one-request sessions; an
//! `agent` session is several turns that re-send the whole growing history, assistant replies
//! included, behind a long system prompt shared by every session, because that is how agent
//! clients such as OpenClaw drive a server and it is what prompt caching has to cope with.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// One kind of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// A short question and a short answer.
    ShortChat,
    /// A document of a few thousand tokens followed by a question.
    LongPrompt,
    /// Multi-turn sessions behind a long shared system prompt, re-sending their history.
    Agent,
}

impl WorkloadKind {
    /// Every kind, in the order used for reports.
    pub const ALL: [WorkloadKind; 3] = [Self::ShortChat, Self::LongPrompt, Self::Agent];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::ShortChat => "short-chat",
            Self::LongPrompt => "long-prompt",
            Self::Agent => "agent",
        }
    }

    /// `max_tokens` sent when the run does not override it.
    pub fn default_max_tokens(self) -> u32 {
        match self {
            Self::ShortChat => 64,
            Self::LongPrompt => 128,
            Self::Agent => 192,
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment, which the summary table uses.
        f.pad(self.name())
    }
}

impl FromStr for WorkloadKind {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| WorkloadError::UnknownKind(s.to_owned()))
    }
}

/// A workload specification could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Not one of `short-chat`, `long-prompt`, `agent`.
    #[error(
        "unknown workload {0:?} (expected short-chat, long-prompt, agent or mix:KIND=WEIGHT,...)"
    )]
    UnknownKind(String),
    /// A mix entry is not `KIND=WEIGHT` with an integer weight.
    #[error("bad mix entry {0:?} (expected KIND=WEIGHT with an integer weight)")]
    BadEntry(String),
    /// The same kind appears twice in a mix.
    #[error("workload {0} appears twice in the mix")]
    Duplicate(WorkloadKind),
    /// All weights are zero, or the mix is empty.
    #[error("a mix needs at least one positive weight")]
    NoWeight,
}

/// Which kinds a run sends and in what proportions. Parsed from `short-chat`, `long-prompt`,
/// `agent` or `mix:short-chat=70,agent=30`; weights are relative, per session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct WorkloadSpec {
    /// `(kind, weight)` pairs; a single kind is a mix of one.
    entries: Vec<(WorkloadKind, u32)>,
    total: u64,
}

impl WorkloadSpec {
    /// Only sessions of `kind`.
    pub fn single(kind: WorkloadKind) -> Self {
        Self {
            entries: vec![(kind, 1)],
            total: 1,
        }
    }

    /// A weighted mix of kinds.
    pub fn mix(entries: Vec<(WorkloadKind, u32)>) -> Result<Self, WorkloadError> {
        for (i, (kind, _)) in entries.iter().enumerate() {
            if entries[..i].iter().any(|(k, _)| k == kind) {
                return Err(WorkloadError::Duplicate(*kind));
            }
        }
        let total = entries.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(WorkloadError::NoWeight);
        }
        Ok(Self { entries, total })
    }

    /// The kinds and weights.
    pub fn entries(&self) -> &[(WorkloadKind, u32)] {
        &self.entries
    }

    /// Whether any session may be an agent session (which needs the shared system prompt).
    pub fn includes(&self, kind: WorkloadKind) -> bool {
        self.entries.iter().any(|(k, w)| *k == kind && *w > 0)
    }

    /// Draws a kind according to the weights.
    pub fn pick(&self, rng: &mut Rng) -> WorkloadKind {
        let mut ticket = rng.below(self.total);
        for (kind, weight) in &self.entries {
            let weight = u64::from(*weight);
            if ticket < weight {
                return *kind;
            }
            ticket -= weight;
        }
        unreachable!("ticket is below the sum of the weights")
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [(kind, _)] = self.entries.as_slice() {
            return f.write_str(kind.name());
        }
        f.write_str("mix:")?;
        for (i, (kind, weight)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{kind}={weight}")?;
        }
        Ok(())
    }
}

impl FromStr for WorkloadSpec {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(list) = s.strip_prefix("mix:") else {
            return s.parse().map(Self::single);
        };
        let entries = list
            .split(',')
            .map(|entry| {
                let (kind, weight) = entry
                    .split_once('=')
                    .ok_or_else(|| WorkloadError::BadEntry(entry.to_owned()))?;
                let weight = weight
                    .trim()
                    .parse()
                    .map_err(|_| WorkloadError::BadEntry(entry.to_owned()))?;
                Ok((kind.trim().parse()?, weight))
            })
            .collect::<Result<Vec<_>, WorkloadError>>()?;
        Self::mix(entries)
    }
}

impl From<WorkloadSpec> for String {
    fn from(spec: WorkloadSpec) -> Self {
        spec.to_string()
    }
}

impl TryFrom<String> for WorkloadSpec {
    type Error = WorkloadError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A chat message role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt.
    System,
    /// What the simulated user typed.
    User,
    /// A reply the server gave earlier in the session.
    Assistant,
}

/// One message of a conversation. Contents are shared so every session can hold the same
/// system prompt without copying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    #[serde(serialize_with = "serialize_shared_str")]
    pub content: Arc<str>,
}

// Going through `&str` spares the whole workspace serde's `rc` feature for this one field.
fn serialize_shared_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

/// Shape of the generated prompts.
#[derive(Debug, Clone)]
pub struct PromptShape {
    /// The agent system prompt, identical for every session of every run.
    pub system_prompt: Arc<str>,
    /// Turns per agent session.
    pub turns: u32,
}

impl PromptShape {
    /// Builds the shared system prompt of about `system_prompt_chars` characters.
    pub fn new(system_prompt_chars: usize, turns: u32) -> Self {
        Self {
            system_prompt: system_prompt(system_prompt_chars).into(),
            turns: turns.max(1),
        }
    }
}

/// One session: a kind, its own random stream and the conversation so far.
#[derive(Debug)]
pub struct Session {
    /// Index of the session in the run; its content depends only on this and the run's seed.
    pub index: u64,
    /// What kind of traffic this session is.
    pub kind: WorkloadKind,
    rng: Rng,
    messages: Vec<Message>,
    turns: u32,
    turn: u32,
}

impl Session {
    /// Session number `index` of a run seeded with `seed`.
    pub fn new(seed: u64, index: u64, spec: &WorkloadSpec, shape: &PromptShape) -> Self {
        let mut rng = Rng::derive(seed, index);
        let kind = spec.pick(&mut rng);
        let (messages, turns) = match kind {
            WorkloadKind::Agent => (
                vec![Message {
                    role: Role::System,
                    content: shape.system_prompt.clone(),
                }],
                shape.turns,
            ),
            _ => (Vec::new(), 1),
        };
        Self {
            index,
            kind,
            rng,
            messages,
            turns,
            turn: 0,
        }
    }

    /// The number of the turn `next_turn` last started (0 before the first).
    pub fn turn(&self) -> u32 {
        self.turn
    }

    /// Whether another turn remains.
    pub fn has_next(&self) -> bool {
        self.turn < self.turns
    }

    /// Appends the next user message and returns the whole conversation to send, or `None` when
    /// the session is over.
    pub fn next_turn(&mut self) -> Option<&[Message]> {
        if !self.has_next() {
            return None;
        }
        self.turn += 1;
        let text = match self.kind {
            WorkloadKind::ShortChat => short_question(&mut self.rng),
            WorkloadKind::LongPrompt => long_document(&mut self.rng),
            WorkloadKind::Agent => agent_request(&mut self.rng, self.index, self.turn),
        };
        self.messages.push(Message {
            role: Role::User,
            content: text.into(),
        });
        Some(&self.messages)
    }

    /// Records the reply to the last turn so the next turn re-sends it.
    pub fn push_reply(&mut self, reply: &str) {
        self.messages.push(Message {
            role: Role::Assistant,
            content: reply.into(),
        });
    }

    /// Ends the session early: a turn without a reply cannot be continued faithfully.
    pub fn abandon(&mut self) {
        self.turn = self.turns;
    }

    /// Whether replies must be kept to build later turns.
    pub fn needs_replies(&self) -> bool {
        self.kind == WorkloadKind::Agent && self.turn < self.turns
    }
}

/// Common English words: real text tokenises at roughly one token per word, which keeps prompt
/// sizes in tokens predictable.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "make",
    "know",
    "take",
    "see",
    "come",
    "think",
    "look",
    "want",
    "give",
    "use",
    "find",
    "tell",
    "ask",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "keep",
    "let",
    "begin",
    "help",
    "show",
    "hear",
    "play",
    "run",
    "move",
    "live",
    "believe",
    "bring",
    "happen",
    "write",
    "provide",
    "sit",
    "stand",
    "lose",
    "pay",
    "meet",
    "include",
    "continue",
    "set",
    "learn",
    "lead",
    "understand",
    "watch",
    "follow",
    "stop",
    "create",
    "speak",
    "read",
    "allow",
    "add",
    "spend",
    "grow",
    "open",
    "walk",
    "win",
    "offer",
    "remember",
    "love",
    "consider",
    "appear",
    "buy",
    "wait",
    "serve",
    "die",
    "send",
    "expect",
    "build",
    "stay",
    "fall",
    "cut",
    "reach",
    "kill",
    "remain",
    "file",
    "server",
    "request",
    "cache",
    "token",
    "model",
    "prompt",
    "slot",
];

/// Appends `count` words as sentences of 6 to 16 words.
fn push_words(rng: &mut Rng, out: &mut String, count: usize, terminal: char) {
    let mut left_in_sentence = 0;
    for i in 0..count {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        if left_in_sentence == 0 {
            if i > 0 {
                out.push_str(". ");
            }
            left_in_sentence = rng.range(6, 16);
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(word);
        }
        left_in_sentence -= 1;
    }
    out.push(terminal);
}

fn short_question(rng: &mut Rng) -> String {
    let mut out = String::with_capacity(160);
    let words = rng.range(8, 30) as usize;
    push_words(rng, &mut out, words, '?');
    out
}

fn long_document(rng: &mut Rng) -> String {
    let words = rng.range(1500, 4000) as usize;
    let mut out = String::with_capacity(words * 6 + 200);
    out.push_str("Read the following report and answer the question after it.\n\n");
    push_words(rng, &mut out, words, '.');
    out.push_str("\n\nQuestion: ");
    let question = rng.range(8, 20) as usize;
    push_words(rng, &mut out, question, '?');
    out
}

fn agent_request(rng: &mut Rng, session: u64, turn: u32) -> String {
    let mut out = String::with_capacity(240);
    if turn == 1 {
        // The first message names the session so no two sessions share more than the system
        // prompt, as distinct users would.
        out.push_str(&format!("Task {session}: "));
    }
    let words = rng.range(10, 40) as usize;
    push_words(rng, &mut out, words, '.');
    out
}

/// The shared agent system prompt: markdown sections of tool rules, like an agent harness's. It
/// uses a fixed seed so it is identical across sessions and across runs with any `--seed`.
fn system_prompt(chars: usize) -> String {
    let mut rng = Rng::new(0x5157_E300_0000_0001);
    let mut out = String::with_capacity(chars + 256);
    out.push_str("You are a personal assistant running inside an agent harness.\n");
    let mut section = 0;
    while out.len() < chars {
        section += 1;
        out.push_str(&format!("## Section {section}\n"));
        for _ in 0..rng.range(3, 8) {
            out.push_str("- ");
            let words = rng.range(8, 24) as usize;
            push_words(&mut rng, &mut out, words, '.');
            out.push('\n');
        }
    }
    // Cut on a character boundary (the text is ASCII, but stay correct if the words change).
    let mut end = chars.min(out.len());
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_specs_parse_and_print_back() {
        for text in [
            "short-chat",
            "long-prompt",
            "agent",
            "mix:short-chat=70,agent=30",
        ] {
            let spec: WorkloadSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        let spec: WorkloadSpec = "mix:short-chat=70,agent=30".parse().unwrap();
        assert_eq!(
            spec.entries(),
            &[(WorkloadKind::ShortChat, 70), (WorkloadKind::Agent, 30)]
        );
    }

    #[test]
    fn bad_workload_specs_are_rejected_with_the_reason() {
        assert_eq!(
            "chat".parse::<WorkloadSpec>(),
            Err(WorkloadError::UnknownKind("chat".into()))
        );
        assert_eq!(
            "mix:agent".parse::<WorkloadSpec>(),
            Err(WorkloadError::BadEntry("agent".into()))
        );
        assert_eq!(
            "mix:agent=x".parse::<WorkloadSpec>(),
            Err(WorkloadError::BadEntry("agent=x".into()))
        );
        assert_eq!(
            "mix:agent=1,agent=2".parse::<WorkloadSpec>(),
            Err(WorkloadError::Duplicate(WorkloadKind::Agent))
        );
        assert_eq!(
            "mix:agent=0".parse::<WorkloadSpec>(),
            Err(WorkloadError::NoWeight)
        );
    }

    #[test]
    fn mix_weights_set_the_proportions() {
        let spec: WorkloadSpec = "mix:short-chat=70,agent=30".parse().unwrap();
        let mut rng = Rng::new(9);
        let n = 20_000;
        let agents = (0..n)
            .filter(|_| spec.pick(&mut rng) == WorkloadKind::Agent)
            .count();
        let share = agents as f64 / n as f64;
        assert!((share - 0.30).abs() < 0.02, "agent share {share}");
    }

    #[test]
    fn sessions_depend_only_on_seed_and_index() {
        let spec: WorkloadSpec = "mix:short-chat=1,long-prompt=1,agent=1".parse().unwrap();
        let shape = PromptShape::new(2000, 2);
        let first = |seed, index| {
            let mut s = Session::new(seed, index, &spec, &shape);
            s.next_turn().unwrap().to_vec()
        };
        assert_eq!(first(1, 5), first(1, 5));
        assert_ne!(first(1, 5), first(1, 6));
        assert_ne!(first(1, 5), first(2, 5));
    }

    #[test]
    fn agent_sessions_share_the_system_prompt_and_grow_their_history() {
        let spec = WorkloadSpec::single(WorkloadKind::Agent);
        let shape = PromptShape::new(38_000, 3);
        assert_eq!(shape.system_prompt.len(), 38_000);
        assert_eq!(
            PromptShape::new(38_000, 3).system_prompt,
            shape.system_prompt
        );

        let mut a = Session::new(1, 0, &spec, &shape);
        let mut b = Session::new(99, 1, &spec, &shape);
        let a1 = a.next_turn().unwrap().to_vec();
        let b1 = b.next_turn().unwrap().to_vec();
        assert_eq!(a1[0], b1[0]);
        assert_eq!(a1[0].role, Role::System);
        assert_ne!(a1[1], b1[1]);

        assert!(a.needs_replies());
        a.push_reply("first reply");
        let a2 = a.next_turn().unwrap().to_vec();
        assert_eq!(a2.len(), 4);
        assert_eq!(&a2[..2], &a1[..]);
        assert_eq!(a2[2].role, Role::Assistant);
        assert_eq!(&*a2[2].content, "first reply");
        a.push_reply("second reply");
        assert_eq!(a.next_turn().unwrap().len(), 6);
        assert!(!a.needs_replies());
        assert!(a.next_turn().is_none());
    }

    #[test]
    fn single_shot_prompts_have_their_intended_sizes() {
        let shape = PromptShape::new(100, 1);
        let mut short = Session::new(4, 0, &WorkloadSpec::single(WorkloadKind::ShortChat), &shape);
        let text = short.next_turn().unwrap()[0].content.clone();
        let words = text.split_whitespace().count();
        assert!((8..=30).contains(&words), "{words} words");
        assert!(short.next_turn().is_none());

        let mut long = Session::new(
            4,
            0,
            &WorkloadSpec::single(WorkloadKind::LongPrompt),
            &shape,
        );
        let words = long.next_turn().unwrap()[0]
            .content
            .split_whitespace()
            .count();
        assert!((1500..4100).contains(&words), "{words} words");
    }
}
