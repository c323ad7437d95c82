//! Backend dialects: what each kind of llama-server accepts and how it answers.
//!
//! Upstream llama.cpp speaks the OpenAI dialect well enough to pass through untouched. The
//! older server that bitnet.cpp builds (a 2024 llama.cpp fork) does not: it refuses `tools`,
//! chokes on `content: null`, ignores `max_completion_tokens`, leaves `cache_prompt` off, and
//! reports errors in streams as a non-standard `error:` field. [`bitnet`] fixes exactly those
//! things and nothing else, so clients such as OpenClaw work without client-side flags.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::Deserialize;

pub mod bitnet;

/// A backend's dialect as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum DialectSetting {
    /// Detect from `/props` when the backend comes up.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Current upstream llama-server.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// The older fork BitNet builds.
    #[serde(rename = "bitnet")]
    Bitnet,
}

impl std::str::FromStr for DialectSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DialectSetting::Auto),
            "llama.cpp" | "llamacpp" => Ok(DialectSetting::LlamaCpp),
            "bitnet" => Ok(DialectSetting::Bitnet),
            other => Err(format!(
                "unknown dialect '{other}' (expected auto, llama.cpp or bitnet)"
            )),
        }
    }
}

/// The dialect a backend speaks, once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Dialect {
    /// Not known yet (auto, not probed): treated as upstream.
    Unknown = 0,
    /// Upstream llama-server.
    LlamaCpp = 1,
    /// The older BitNet fork.
    Bitnet = 2,
}

impl Dialect {
    /// Name for logs and `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Unknown => "unknown",
            Dialect::LlamaCpp => "llama.cpp",
            Dialect::Bitnet => "bitnet",
        }
    }
}

/// A dialect cell, written by the prober and read by the request path.
#[derive(Debug)]
pub struct DialectCell(AtomicU8);

impl DialectCell {
    /// A cell fixed by `setting`, or `Unknown` for auto.
    pub fn new(setting: DialectSetting) -> DialectCell {
        DialectCell(AtomicU8::new(match setting {
            DialectSetting::Auto => Dialect::Unknown as u8,
            DialectSetting::LlamaCpp => Dialect::LlamaCpp as u8,
            DialectSetting::Bitnet => Dialect::Bitnet as u8,
        }))
    }

    /// The dialect now.
    pub fn get(&self) -> Dialect {
        match self.0.load(Ordering::Acquire) {
            1 => Dialect::LlamaCpp,
            2 => Dialect::Bitnet,
            _ => Dialect::Unknown,
        }
    }

    /// Record a detected dialect.
    pub fn set(&self, d: Dialect) {
        self.0.store(d as u8, Ordering::Release);
    }
}

/// What to do with `tools`/`tool_choice` for a backend that has no tool calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ToolsMode {
    /// Remove them and say so in `X-Gateway-Warning` (OpenClaw sends tools on every request).
    #[default]
    Drop,
    /// Refuse the request with a 400 that says the backend has no tool calling.
    Reject,
}

/// Tell the dialect from a `/props` answer: upstream servers report `build_info` (and
/// `modalities`); the 2024 fork reports neither.
pub fn detect(props: &serde_json::Value) -> Dialect {
    if props.get("build_info").is_some() || props.get("modalities").is_some() {
        Dialect::LlamaCpp
    } else {
        Dialect::Bitnet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn detects_upstream_by_build_info_and_the_fork_by_its_absence() {
        assert_eq!(
            detect(&json!({"total_slots": 1, "build_info": "b1"})),
            Dialect::LlamaCpp
        );
        assert_eq!(
            detect(&json!({"total_slots": 1, "modalities": {}})),
            Dialect::LlamaCpp
        );
        assert_eq!(
            detect(&json!({"total_slots": 1, "chat_template": ""})),
            Dialect::Bitnet
        );
    }

    #[test]
    fn settings_parse_from_flags() {
        assert_eq!(
            "bitnet".parse::<DialectSetting>().unwrap(),
            DialectSetting::Bitnet
        );
        assert_eq!(
            "llama.cpp".parse::<DialectSetting>().unwrap(),
            DialectSetting::LlamaCpp
        );
        assert!("gpt".parse::<DialectSetting>().is_err());
    }
}
