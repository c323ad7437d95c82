//! API keys: who may call the gateway, and who may administer it.
//!
//! Keys come from four places, all gathered by [`KeySet::build`]:
//!
//! ```toml
//! public_health_metrics = "loopback"      # or "always", "never"
//!
//! [[api_keys]]
//! name = "openclaw"                       # appears in logs and metrics; the key never does
//! key = "sk-…"
//!
//! [[api_keys]]
//! name = "ci"
//! key_env = "GATEWAY_CI_KEY"              # read from the environment at start-up and reload
//!
//! [[admin_keys]]
//! name = "ops"
//! key_env = "GATEWAY_ADMIN_KEY"
//! ```
//!
//! plus `--api-key KEY` (repeatable, named `cli-1`, `cli-2`, …) and `--api-key-file FILE`
//! (one key per line, see [`KeySet::build`]). Admin keys are a second [`KeySet`] built the
//! same way by [`KeySet::build_admin`].
//!
//! Only a SHA-256 digest of each key is kept. Comparing digests instead of the keys themselves
//! makes every comparison the same length, so [`subtle::ConstantTimeEq`] runs in time that
//! depends neither on the presented key's content nor on its length, and the plaintext never
//! stays in memory where a `Debug` print or a core dump could show it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use serde::Deserialize;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The `x-api-key` header, the alternative to `Authorization: Bearer`.
pub(crate) static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Longest accepted key name: names become log fields and metric labels.
const MAX_NAME_LEN: usize = 64;

// === raw (as written) ===

/// One `[[api_keys]]` or `[[admin_keys]]` entry as written in the config file.
///
/// Exactly one of `key` and `key_env` must be set.
#[derive(Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a key table such as { name = \"openclaw\", key_env = \"OPENCLAW_KEY\" }"
)]
pub struct RawApiKey {
    /// The name logs and metrics show for requests made with this key.
    pub name: String,
    /// The key itself.
    pub key: Option<String>,
    /// The environment variable that holds the key.
    pub key_env: Option<String>,
}

impl fmt::Debug for RawApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawApiKey")
            .field("name", &self.name)
            .field("key", &self.key.as_ref().map(|_| Redacted))
            .field("key_env", &self.key_env)
            .finish()
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Whether `/health` and `/metrics` answer without a key (`public_health_metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublicEndpoints {
    /// Public to clients connecting from a loopback address, so local probes and a local
    /// Prometheus need no key while the mesh does.
    #[default]
    Loopback,
    /// Public to everyone.
    Always,
    /// A key is needed from everywhere.
    Never,
}

impl PublicEndpoints {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PublicEndpoints::Loopback => "loopback",
            PublicEndpoints::Always => "always",
            PublicEndpoints::Never => "never",
        }
    }
}

impl fmt::Display for PublicEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PublicEndpoints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loopback" => Ok(PublicEndpoints::Loopback),
            "always" => Ok(PublicEndpoints::Always),
            "never" => Ok(PublicEndpoints::Never),
            other => Err(format!(
                "unknown public_health_metrics value '{other}' (expected loopback, always or never)"
            )),
        }
    }
}

/// Whether `/health` and `/metrics` may be served to `peer` without a key.
///
/// Behind a reverse proxy on the same host every peer is loopback: use `never` (or `always`)
/// there rather than `loopback`.
pub fn endpoint_is_public(policy: PublicEndpoints, peer: SocketAddr) -> bool {
    match policy {
        PublicEndpoints::Always => true,
        PublicEndpoints::Never => false,
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; canonicalise so that
        // ::ffff:127.0.0.1 counts as loopback too.
        PublicEndpoints::Loopback => peer.ip().to_canonical().is_loopback(),
    }
}

// === errors ===

/// A key configuration problem, naming where the key came from.
///
/// `origin` reads like `api_keys[2]`, `--api-key #1` or `/etc/gateway/keys:4`.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Neither or both of `key` and `key_env` are set.
    #[error("{origin}: set exactly one of `key` and `key_env`")]
    KeySource { origin: String },
    /// `key_env` names a variable that is not set.
    #[error("{origin}: environment variable {var} is not set")]
    MissingEnv { origin: String, var: String },
    /// `key_env` names a variable that is not UTF-8.
    #[error("{origin}: environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { origin: String, var: String },
    /// The key is empty or only whitespace.
    #[error("{origin}: the key is empty")]
    EmptyKey { origin: String },
    /// The key could never be sent in a header, so it could never match.
    #[error(
        "{origin}: the key contains whitespace or characters that cannot be sent in an HTTP header"
    )]
    UnusableKey { origin: String },
    /// The name is not fit for logs and metric labels.
    #[error("{origin}: '{name}' is not a valid key name (1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.')")]
    BadName { origin: String, name: String },
    /// A key file could not be read.
    #[error("cannot read API key file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    /// Two keys of one set share a name, so logs could not tell them apart.
    #[error("{origin}: the key name '{name}' is already used by {first}")]
    DuplicateName {
        origin: String,
        name: String,
        first: String,
    },
    /// Two entries of one set hold the same key, so a request could not be attributed.
    #[error("{origin}: this key is the same as the key named '{first}'")]
    DuplicateKey { origin: String, first: String },
}

/// Why a request is refused: both become 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key was presented.
    #[error("no API key provided; send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'")]
    Missing,
    /// A key was presented and matches none.
    #[error("the API key provided is not valid")]
    Invalid,
}

// === keys ===

/// A configured key: its name, and a digest of the secret (never the secret itself).
#[derive(Clone)]
pub struct ApiKey {
    /// The name logs and metrics show.
    pub name: String,
    digest: Digest,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("secret", &Redacted)
            .finish()
    }
}

type Digest = [u8; 32];

fn digest(secret: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A set of keys: the client keys, or the admin keys.
///
/// An empty set is *open*: see [`KeySet::is_open`].
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<ApiKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.keys).finish()
    }
}

/// Which set is being built: it decides default names and how origins are spelled in errors.
#[derive(Clone, Copy)]
enum Role {
    Client,
    Admin,
}

impl Role {
    fn table(self) -> &'static str {
        match self {
            Role::Client => "api_keys",
            Role::Admin => "admin_keys",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Role::Client => "--api-key",
            Role::Admin => "--admin-key",
        }
    }

    fn name_prefix(self) -> &'static str {
        match self {
            Role::Client => "",
            Role::Admin => "admin-",
        }
    }
}

impl KeySet {
    /// Gather the client keys from config entries, `--api-key` flags and `--api-key-file`
    /// files.
    ///
    /// Flag keys are named `cli-1`, `cli-2`, … in order. A key file holds one key per line;
    /// blank lines and lines starting with `#` are skipped; a line may be `name:key`, where
    /// `name` is a valid key name, otherwise the whole line is the key and it is named
    /// `file-1`, `file-2`, … counting keys across all files in order. (So a key that itself
    /// contains `:` after a name-like prefix must be written with a name.) Surrounding
    /// whitespace is trimmed everywhere, so a trailing newline in a variable does no harm.
    pub fn build(
        raw: &[RawApiKey],
        cli_keys: &[String],
        key_files: &[PathBuf],
    ) -> Result<KeySet, AuthConfigError> {
        Self::build_with(Role::Client, raw, cli_keys, key_files, env_var)
    }

    /// Gather the admin keys (`[[admin_keys]]`, `--admin-key`, admin key files) the same way
    /// as [`KeySet::build`]; default names are `admin-cli-N` and `admin-file-N`.
    pub fn build_admin(
        raw: &[RawApiKey],
        cli_keys: &[String],
        key_files: &[PathBuf],
    ) -> Result<KeySet, AuthConfigError> {
        Self::build_with(Role::Admin, raw, cli_keys, key_files, env_var)
    }

    fn build_with(
        role: Role,
        raw: &[RawApiKey],
        cli_keys: &[String],
        key_files: &[PathBuf],
        env: impl Fn(&str) -> Result<Option<String>, ()>,
    ) -> Result<KeySet, AuthConfigError> {
        let mut b = Builder::default();
        for (i, r) in raw.iter().enumerate() {
            let origin = format!("{}[{i}]", role.table());
            let secret = match (&r.key, &r.key_env) {
                (Some(key), None) => key.clone(),
                (None, Some(var)) => match env(var) {
                    Ok(Some(v)) => v,
                    Ok(None) => {
                        return Err(AuthConfigError::MissingEnv {
                            origin,
                            var: var.clone(),
                        })
                    }
                    Err(()) => {
                        return Err(AuthConfigError::EnvNotUnicode {
                            origin,
                            var: var.clone(),
                        })
                    }
                },
                _ => return Err(AuthConfigError::KeySource { origin }),
            };
            b.add(origin, r.name.clone(), &secret)?;
        }
        for (i, key) in cli_keys.iter().enumerate() {
            let n = i + 1;
            let name = format!("{}cli-{n}", role.name_prefix());
            b.add(format!("{} #{n}", role.flag()), name, key)?;
        }
        let mut file_keys = 0;
        for path in key_files {
            let text =
                std::fs::read_to_string(path).map_err(|source| AuthConfigError::ReadFile {
                    path: path.display().to_string(),
                    source,
                })?;
            for (lineno, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let origin = format!("{}:{}", path.display(), lineno + 1);
                let (name, secret) = match line.split_once(':') {
                    Some((n, k)) if valid_name(n.trim()) => (n.trim().to_string(), k),
                    _ => {
                        file_keys += 1;
                        (format!("{}file-{file_keys}", role.name_prefix()), line)
                    }
                };
                b.add(origin, name, secret)?;
            }
        }
        Ok(KeySet { keys: b.keys })
    }

    /// True when no key is configured: the gateway is then open to anyone who can reach it.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Same as [`KeySet::is_open`], for symmetry with [`KeySet::len`].
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key names, in configuration order: what `--check-config` shows instead of keys.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name.as_str())
    }

    /// Authenticate a request by its headers and return the matching key's name.
    ///
    /// The key may come as `Authorization: Bearer KEY` (scheme in any case, any amount of
    /// surrounding whitespace) or as `x-api-key: KEY`; if both are sent, either may match,
    /// because some clients send a placeholder bearer token next to the real key.
    /// An `Authorization` header with another scheme (say `Basic`) presents no key.
    ///
    /// An open set matches nothing: callers decide with [`KeySet::is_open`] whether to ask at
    /// all, so forgetting to do so fails closed.
    pub fn check(&self, headers: &HeaderMap) -> Result<&str, AuthError> {
        let mut presented = 0;
        // 0 means "no match"; otherwise the index + 1 of the matching key.
        let mut found = 0u32;
        for candidate in [bearer_token(headers), api_key_header(headers)] {
            let token = match candidate {
                Candidate::Absent => continue,
                // Sent but unreadable: it cannot match, yet the client did try a key.
                Candidate::Unreadable => {
                    presented += 1;
                    continue;
                }
                Candidate::Token(t) => t,
            };
            presented += 1;
            let d = digest(token.as_bytes());
            // Every key is compared, with no early exit, and the match is recorded with a
            // constant-time select, so the time taken does not reveal which key (if any)
            // matched or how much of it did.
            for (i, key) in self.keys.iter().enumerate() {
                let idx = u32::try_from(i + 1).unwrap_or(u32::MAX);
                found.conditional_assign(&idx, key.digest.ct_eq(&d));
            }
        }
        match (presented, found) {
            (0, _) => Err(AuthError::Missing),
            (_, 0) => Err(AuthError::Invalid),
            (_, i) => Ok(self.keys[i as usize - 1].name.as_str()),
        }
    }
}

/// Collects keys while checking names and secrets for duplicates.
#[derive(Default)]
struct Builder {
    keys: Vec<ApiKey>,
    /// Name → origin of the entry that took it.
    names: HashMap<String, String>,
}

impl Builder {
    fn add(&mut self, origin: String, name: String, secret: &str) -> Result<(), AuthConfigError> {
        if !valid_name(&name) {
            return Err(AuthConfigError::BadName { origin, name });
        }
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(AuthConfigError::EmptyKey { origin });
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthConfigError::UnusableKey { origin });
        }
        if let Some(first) = self.names.get(&name) {
            return Err(AuthConfigError::DuplicateName {
                origin,
                name,
                first: first.clone(),
            });
        }
        let digest = digest(secret.as_bytes());
        // Start-up only, so an ordinary comparison is fine here.
        if let Some(first) = self.keys.iter().find(|k| k.digest == digest) {
            return Err(AuthConfigError::DuplicateKey {
                origin,
                first: first.name.clone(),
            });
        }
        self.names.insert(name.clone(), origin);
        self.keys.push(ApiKey { name, digest });
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn env_var(var: &str) -> Result<Option<String>, ()> {
    match std::env::var(var) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(()),
    }
}

/// What one header offers as a key.
enum Candidate<'a> {
    Absent,
    Unreadable,
    Token(&'a str),
}

fn bearer_token(headers: &HeaderMap) -> Candidate<'_> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Candidate::Absent;
    };
    let Ok(value) = value.to_str() else {
        return Candidate::Unreadable;
    };
    let value = value.trim();
    let (scheme, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Candidate::Absent;
    }
    match rest.trim() {
        "" => Candidate::Absent,
        token => Candidate::Token(token),
    }
}

fn api_key_header(headers: &HeaderMap) -> Candidate<'_> {
    match headers.get(&X_API_KEY).map(|v| v.to_str()) {
        None => Candidate::Absent,
        Some(Err(_)) => Candidate::Unreadable,
        Some(Ok(v)) => match v.trim() {
            "" => Candidate::Absent,
            token => Candidate::Token(token),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    fn raw(name: &str, key: &str) -> RawApiKey {
        RawApiKey {
            name: name.into(),
            key: Some(key.into()),
            key_env: None,
        }
    }

    fn two_keys() -> KeySet {
        KeySet::build(
            &[raw("openclaw", "sk-claw-0123456789")],
            &["sk-cli-abcdef".into()],
            &[],
        )
        .unwrap()
    }

    /// A file in a fresh directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> TempFile {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "gateway-auth-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("keys");
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn bearer_and_x_api_key_both_authenticate_and_name_the_key() {
        let keys = two_keys();
        let h = headers(&[("authorization", b"Bearer sk-claw-0123456789")]);
        assert_eq!(keys.check(&h), Ok("openclaw"));
        let h = headers(&[("x-api-key", b"sk-cli-abcdef")]);
        assert_eq!(keys.check(&h), Ok("cli-1"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_whitespace_is_ignored() {
        let keys = two_keys();
        for value in [
            "bearer sk-claw-0123456789",
            "BEARER sk-claw-0123456789",
            "  Bearer    sk-claw-0123456789  ",
            "Bearer\tsk-claw-0123456789",
        ] {
            let h = headers(&[("authorization", value.as_bytes())]);
            assert_eq!(keys.check(&h), Ok("openclaw"), "{value:?}");
        }
        let h = headers(&[("x-api-key", b"  sk-cli-abcdef ")]);
        assert_eq!(keys.check(&h), Ok("cli-1"));
    }

    #[test]
    fn wrong_keys_are_invalid() {
        let keys = two_keys();
        for (name, value) in [
            ("authorization", &b"Bearer sk-claw-012345678"[..]),
            ("authorization", b"Bearer sk-claw-0123456789x"),
            ("authorization", b"Bearer SK-CLAW-0123456789"),
            ("x-api-key", b"sk-claw"),
            ("x-api-key", b"Bearer sk-cli-abcdef"),
            // Non-ASCII bytes cannot match any key but are still a presented key.
            ("x-api-key", b"sk-\xffcli"),
        ] {
            let h = headers(&[(name, value)]);
            assert_eq!(keys.check(&h), Err(AuthError::Invalid), "{name}: {value:?}");
        }
    }

    #[test]
    fn absent_or_empty_or_non_bearer_credentials_are_missing() {
        let keys = two_keys();
        for h in [
            headers(&[]),
            headers(&[("authorization", b"Bearer")]),
            headers(&[("authorization", b"Bearer   ")]),
            headers(&[("authorization", b"Basic c2stY2xpLWFiY2RlZg==")]),
            headers(&[("authorization", b"sk-claw-0123456789")]),
            headers(&[("x-api-key", b"   ")]),
        ] {
            assert_eq!(keys.check(&h), Err(AuthError::Missing), "{h:?}");
        }
    }

    #[test]
    fn either_header_may_carry_the_key_when_both_are_sent() {
        let keys = two_keys();
        let h = headers(&[
            ("authorization", b"Bearer no-key-required"),
            ("x-api-key", b"sk-cli-abcdef"),
        ]);
        assert_eq!(keys.check(&h), Ok("cli-1"));
        let h = headers(&[
            ("authorization", b"Basic Zm9vOmJhcg=="),
            ("x-api-key", b"sk-claw-0123456789"),
        ]);
        assert_eq!(keys.check(&h), Ok("openclaw"));
        let h = headers(&[("authorization", b"Bearer a"), ("x-api-key", b"b")]);
        assert_eq!(keys.check(&h), Err(AuthError::Invalid));
    }

    #[test]
    fn an_open_set_matches_nothing_so_a_forgotten_is_open_check_fails_closed() {
        let keys = KeySet::build(&[], &[], &[]).unwrap();
        assert!(keys.is_open());
        assert!(!two_keys().is_open());
        let h = headers(&[("authorization", b"Bearer anything")]);
        assert_eq!(keys.check(&h), Err(AuthError::Invalid));
    }

    #[test]
    fn debug_output_never_contains_a_secret() {
        let secret = "sk-very-secret-value-42";
        let r = raw("openclaw", secret);
        let keys = KeySet::build(
            std::slice::from_ref(&r),
            &["sk-another-secret-43".into()],
            &[],
        )
        .unwrap();
        for text in [
            format!("{r:?}"),
            format!("{keys:?}"),
            format!("{:#?}", keys.keys[0]),
        ] {
            assert!(!text.contains(secret), "{text}");
            assert!(!text.contains("sk-another-secret-43"), "{text}");
            assert!(text.contains("openclaw"), "{text}");
        }
        assert!(format!("{r:?}").contains("<redacted>"));
        assert!(format!("{keys:?}").contains("cli-1"));
    }

    #[test]
    fn key_env_reads_the_environment_and_missing_variables_are_named() {
        let entry = RawApiKey {
            name: "ci".into(),
            key: None,
            key_env: Some("GATEWAY_TEST_KEY".into()),
        };
        let env = |var: &str| Ok((var == "GATEWAY_TEST_KEY").then(|| "sk-from-env\n".to_string()));
        let keys =
            KeySet::build_with(Role::Client, std::slice::from_ref(&entry), &[], &[], env).unwrap();
        let h = headers(&[("x-api-key", b"sk-from-env")]);
        assert_eq!(keys.check(&h), Ok("ci"));

        let unset = RawApiKey {
            key_env: Some("GATEWAY_TEST_KEY_THAT_IS_NEVER_SET_3f9a".into()),
            ..entry.clone()
        };
        let err = KeySet::build(&[unset], &[], &[]).unwrap_err().to_string();
        assert!(
            err.contains("api_keys[0]") && err.contains("GATEWAY_TEST_KEY_THAT_IS_NEVER_SET_3f9a"),
            "{err}"
        );

        let bad = |_: &str| Err(());
        let err = KeySet::build_with(Role::Admin, &[entry], &[], &[], bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin_keys[0]") && err.contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn config_entries_need_exactly_one_key_source() {
        for entry in [
            RawApiKey {
                name: "a".into(),
                ..RawApiKey::default()
            },
            RawApiKey {
                name: "a".into(),
                key: Some("k".into()),
                key_env: Some("V".into()),
            },
        ] {
            let err = KeySet::build(&[raw("x", "kx"), entry], &[], &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("api_keys[1]") && err.contains("exactly one"),
                "{err}"
            );
        }
    }

    #[test]
    fn empty_unusable_duplicate_and_badly_named_keys_are_refused_by_origin() {
        let refused = |raw_keys: &[RawApiKey], cli: &[&str]| {
            let cli: Vec<String> = cli.iter().map(|s| s.to_string()).collect();
            KeySet::build(raw_keys, &cli, &[]).unwrap_err().to_string()
        };
        let cases = [
            (
                refused(&[raw("a", "  ")], &[]),
                "api_keys[0]: the key is empty",
            ),
            (refused(&[], &[""]), "--api-key #1: the key is empty"),
            (
                refused(&[raw("a", "sk two")], &[]),
                "api_keys[0]: the key contains whitespace",
            ),
            (
                refused(&[raw("a", "sk-é")], &[]),
                "cannot be sent in an HTTP header",
            ),
            (
                refused(&[raw("bad name", "k")], &[]),
                "'bad name' is not a valid key name",
            ),
            (refused(&[raw("", "k")], &[]), "'' is not a valid key name"),
            (
                refused(&[raw("a", "k1"), raw("a", "k2")], &[]),
                "api_keys[1]: the key name 'a' is already used by api_keys[0]",
            ),
            (
                refused(&[raw("cli-1", "k1")], &["k2"]),
                "--api-key #1: the key name 'cli-1' is already used by api_keys[0]",
            ),
            (
                refused(&[raw("a", "same")], &["same"]),
                "--api-key #1: this key is the same as the key named 'a'",
            ),
        ];
        for (err, needle) in cases {
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    #[test]
    fn key_files_skip_comments_and_blanks_and_take_optional_names() {
        let f1 = TempFile::new(
            "# team keys\n\nsk-first\n  laptop : sk-second  \n   # indented comment\nsk-third\n",
        );
        let f2 = TempFile::new("sk-fourth\r\nsk/x:colon\nsk:colon\n");
        let keys = KeySet::build(&[], &["sk-cli".into()], &[f1.0.clone(), f2.0.clone()]).unwrap();
        let names: Vec<&str> = keys.names().collect();
        assert_eq!(
            names,
            ["cli-1", "file-1", "laptop", "file-2", "file-3", "file-4", "sk"]
        );
        for (key, name) in [
            ("sk-first", "file-1"),
            ("sk-second", "laptop"),
            ("sk-third", "file-2"),
            ("sk-fourth", "file-3"),
            // '/' cannot be in a name, so the whole line is the key...
            ("sk/x:colon", "file-4"),
            // ...but a name-like prefix before ':' is a name.
            ("colon", "sk"),
        ] {
            let h = headers(&[("x-api-key", key.as_bytes())]);
            assert_eq!(keys.check(&h), Ok(name), "{key}");
        }
        let h = headers(&[("x-api-key", b"# team keys")]);
        assert_eq!(keys.check(&h), Err(AuthError::Invalid));
    }

    #[test]
    fn key_file_errors_name_the_file_and_line() {
        let missing = std::env::temp_dir().join("gateway-auth-test-no-such-dir/keys");
        let err = KeySet::build(&[], &[], std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read API key file")
                && err.contains(&missing.display().to_string()),
            "{err}"
        );
        let f = TempFile::new("sk-ok\n\nname: \n");
        let err = KeySet::build(&[], &[], std::slice::from_ref(&f.0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{}:3: the key is empty", f.0.display())),
            "{err}"
        );
    }

    #[test]
    fn admin_keys_are_a_separate_set_with_their_own_names() {
        let f = TempFile::new("sk-admin-file\n");
        let admin = KeySet::build_admin(
            &[raw("ops", "sk-ops")],
            &["sk-admin-cli".into()],
            std::slice::from_ref(&f.0),
        )
        .unwrap();
        let names: Vec<&str> = admin.names().collect();
        assert_eq!(names, ["ops", "admin-cli-1", "admin-file-1"]);
        assert_eq!(admin.len(), 3);
        let clients = two_keys();
        let h = headers(&[("authorization", b"Bearer sk-ops")]);
        assert_eq!(admin.check(&h), Ok("ops"));
        assert_eq!(clients.check(&h), Err(AuthError::Invalid));
        let err = KeySet::build_admin(&[], &[" ".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--admin-key #1"), "{err}");
    }

    #[test]
    fn raw_keys_parse_from_toml_and_reject_unknown_fields() {
        #[derive(Deserialize)]
        struct Doc {
            api_keys: Vec<RawApiKey>,
            public_health_metrics: PublicEndpoints,
        }
        let doc: Doc = toml::from_str(
            "public_health_metrics = \"never\"\n[[api_keys]]\nname = \"a\"\nkey = \"k\"\n[[api_keys]]\nname = \"b\"\nkey_env = \"V\"\n",
        )
        .unwrap();
        assert_eq!(doc.api_keys.len(), 2);
        assert_eq!(doc.api_keys[1].key_env.as_deref(), Some("V"));
        assert_eq!(doc.public_health_metrics, PublicEndpoints::Never);
        let err = toml::from_str::<Doc>(
            "public_health_metrics = \"never\"\n[[api_keys]]\nname = \"a\"\nsecret = \"k\"\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("secret"), "{err}");
        assert!(
            toml::from_str::<Doc>("api_keys = []\npublic_health_metrics = \"sometimes\"").is_err()
        );
    }

    #[test]
    fn health_and_metrics_are_public_on_loopback_by_default() {
        let local4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 5000));
        let local6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 5000));
        let mapped = SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 5000));
        let mesh = SocketAddr::from((Ipv4Addr::new(100, 64, 0, 7), 5000));
        let mesh_mapped = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped(), 5000));
        let policy = PublicEndpoints::default();
        assert_eq!(policy, PublicEndpoints::Loopback);
        for peer in [local4, local6, mapped] {
            assert!(endpoint_is_public(policy, peer), "{peer}");
        }
        for peer in [mesh, mesh_mapped] {
            assert!(!endpoint_is_public(policy, peer), "{peer}");
        }
        assert!(endpoint_is_public(PublicEndpoints::Always, mesh));
        assert!(!endpoint_is_public(PublicEndpoints::Never, local4));
    }

    #[test]
    fn public_endpoint_policy_round_trips_through_its_spelling() {
        for p in [
            PublicEndpoints::Loopback,
            PublicEndpoints::Always,
            PublicEndpoints::Never,
        ] {
            assert_eq!(p.to_string().parse::<PublicEndpoints>(), Ok(p));
        }
        let err = "public".parse::<PublicEndpoints>().unwrap_err();
        assert!(err.contains("loopback, always or never"), "{err}");
    }
}
