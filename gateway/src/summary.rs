//! What `--check-config` prints: the configuration in force, one setting per phrase, in the
//! README's terms and with units.
//!
//! A setting that can change nothing under this configuration is left out (the
//! predicted-TTFT starting points under another policy, priority aging when every request
//! has the same priority, discovery without a runner or DNS name), so that every phrase
//! printed is one the gateway acts on. Keys appear by name only: this output ends up in
//! terminals, tickets and CI logs.

use std::time::Duration;

use crate::auth::{KeySet, PublicEndpoints};
use crate::balance::PolicyKind;
use crate::config::{BackendConfig, Config, ModelConfig};
use crate::dialect::{DialectSetting, ToolsMode};

/// The configuration as a user reads it, ending with a newline.
pub fn render(c: &Config) -> String {
    let open = "none: every client is served";
    let admin_off = "off: no admin keys, so /admin/... answers 403";
    let drain = secs(c.drain_timeout);
    let settings = [
        ("listen", vec![listen(c)]),
        ("serving threads", vec![c.workers.to_string()]),
        ("policy", policy(c)),
        ("default model", vec![default_model(c)]),
        ("API keys", vec![keys(&c.keys, "", open)]),
        ("admin API", vec![keys(&c.admin_keys, "on, ", admin_off)]),
        ("/health /metrics", vec![public_endpoints(c).into()]),
        ("queue", queue(c)),
        ("limits", limits(c)),
        ("backends", upstream(c)),
        ("health", health(c)),
        ("tools", vec![tools(c.tools).into()]),
        ("context guard", vec![context_guard(c.context_guard).into()]),
        (
            "shutdown",
            vec![format!("in-flight responses may run {drain} after SIGTERM")],
        ),
    ];
    let mut out = String::from("bitnet-gateway: the configuration is valid.\n\n");
    for (label, values) in settings {
        lines(&mut out, label, &values);
    }
    for m in &c.models {
        model(&mut out, c, m);
    }
    out
}

/// `values` under a label column, the label on the first line only.
fn lines(out: &mut String, label: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        let label = if i == 0 { label } else { "" };
        out.push_str(&format!("{label:<17} {v}\n"));
    }
}

fn listen(c: &Config) -> String {
    let addr = c.listen;
    match &c.tls {
        None => format!("http://{addr}"),
        Some((cert, key)) => {
            let (cert, key) = (cert.display(), key.display());
            format!("https://{addr} (certificate {cert}, key {key})")
        }
    }
}

fn policy(c: &Config) -> Vec<String> {
    let what = match c.policy {
        PolicyKind::LeastLoaded => "the backend with the most free slots; ties rotate",
        PolicyKind::RoundRobin => "each backend in turn, ignoring load",
        PolicyKind::PredictedTtft => "the backend and slot with the lowest predicted time to first token, with prompt-cache affinity",
    };
    let mut lines = vec![format!("{}: {what}", c.policy.as_str())];
    if c.policy == PolicyKind::PredictedTtft {
        let r = &c.routing;
        let (prefill, decode) = (r.prefill_rate, r.decode_rate);
        let (bytes, answer) = (r.bytes_per_token, r.answer_tokens);
        let depth = count(r.max_depth, "request", "requests");
        lines.extend([
            format!("until measured: prompts at {prefill} tokens/s per backend, generation at {decode} tokens/s per request,"),
            format!("{bytes} bytes of request per prompt token, answers of {answer} tokens without max_tokens;"),
            format!("at most {depth} assigned to one slot at once, the running one included"),
        ]);
    }
    lines
}

fn default_model(c: &Config) -> String {
    match (&c.default_model, c.models.as_slice()) {
        (Some(d), _) => {
            let alias_of = c
                .models
                .iter()
                .find(|m| &m.id != d && names(m).any(|n| n == d));
            let shown = match alias_of {
                Some(m) => format!("{d} (model {})", m.id),
                None => d.clone(),
            };
            format!("{shown}: requests naming an unknown model, or none, go to it")
        }
        (None, [only]) => format!(
            "none: requests naming no model go to {}, the only one; an unknown model gets 404",
            only.id
        ),
        (None, _) => "none: requests must name a model; an unknown one gets 404".to_string(),
    }
}

fn names(m: &ModelConfig) -> impl Iterator<Item = &String> {
    std::iter::once(&m.id).chain(&m.aliases)
}

fn keys(set: &KeySet, prefix: &str, open: &str) -> String {
    if set.is_open() {
        return open.to_string();
    }
    let names: Vec<&str> = set.names().collect();
    let n = count(names.len(), "key", "keys");
    format!("{prefix}{n}: {}", names.join(", "))
}

fn public_endpoints(c: &Config) -> &'static str {
    // Without client keys there is no key to ask for, whatever the setting says.
    match (c.keys.is_open(), c.public_health_metrics) {
        (_, PublicEndpoints::Always) => "open to every client",
        (false, PublicEndpoints::Loopback) => "open to loopback clients; others need an API key",
        (false, PublicEndpoints::Never) => "need an API key from every client",
        (true, PublicEndpoints::Loopback) => {
            "open to every client while there are no API keys, then to loopback clients only"
        }
        (true, PublicEndpoints::Never) => {
            "open to every client while there are no API keys, then to none without a key"
        }
    }
}

fn queue(c: &Config) -> Vec<String> {
    let waiting = |n| count(n, "waiting request", "waiting requests");
    let mut lines = vec![match c.queue_max {
        Some(n) => format!("up to {} per model (429 beyond)", waiting(n)),
        None => format!(
            "up to {} per slot of the model's backends (429 beyond)",
            waiting(c.queue_per_slot)
        ),
    }];
    let mut wait = format!(
        "a request waits at most {} for a slot, then gets 503",
        secs(c.queue_timeout)
    );
    if c.policy == PolicyKind::PredictedTtft {
        wait.push_str("; one predicted to wait longer gets 429 at once");
    }
    lines.push(wait);
    let mut by_key: Vec<_> = c.key_priority.iter().collect();
    by_key.sort();
    let by_key: Vec<String> = by_key.iter().map(|(k, p)| format!("{k} {p:+}")).collect();
    let mut sources = Vec::new();
    if let Some(h) = &c.priority_header {
        sources.push(format!("priority from header {h} (-10 to 10)"));
    }
    if !by_key.is_empty() {
        sources.push(format!("priority by key: {}", by_key.join(", ")));
    }
    lines.push(if sources.is_empty() {
        "every request has the same priority: first come, first served".to_string()
    } else {
        let aging = secs(c.queue_aging);
        format!(
            "{}; a wait of {aging} is worth one level",
            sources.join(", else ")
        )
    });
    lines.push(match c.queue_comments {
        None => "`: queued` comments to waiting streams: off".to_string(),
        Some(every) => format!(
            "`: queued` comments to waiting streams every {} (their 200 head is sent at once)",
            secs(every)
        ),
    });
    lines
}

fn limits(c: &Config) -> Vec<String> {
    let (body, head) = (bytes(c.max_body_bytes), bytes(c.max_header_bytes));
    let connections = count(c.max_connections, "client connection", "client connections");
    let headers = secs(c.header_read_timeout);
    let (body_within, send) = (secs(c.body_read_timeout), secs(c.send_timeout));
    vec![
        format!("request body at most {body} (413 beyond), request head at most {head} (431 beyond)"),
        format!("{connections} at once (503 beyond)"),
        format!("headers within {headers} of connecting or of the previous response; a connection with no request in progress for {headers} is closed (HTTP/1 and HTTP/2)"),
        format!("the body within {body_within} of the headers (408 beyond)"),
        format!("request bodies in memory at most {} in all (503 beyond)", bytes(c.max_buffered_body_bytes)),
        format!("a client that reads nothing for {send} is cut off, and its request's slot freed"),
    ]
}

fn upstream(c: &Config) -> Vec<String> {
    let (connect, head) = (secs(c.connect_timeout), secs(c.first_byte_timeout));
    let idle = secs(c.upstream_idle_timeout);
    vec![
        format!("connect within {connect} (TLS handshake included); response head within {head}"),
        "(for the BitNet server's streams, the first event too)".to_string(),
        format!("at most {idle} of silence between two chunks of a response"),
        match c.max_attempts {
            1 => "1 attempt per request: no failover".to_string(),
            n => format!("{n} attempts per request (failover only before the first byte)"),
        },
        match &c.upstream_ca_file {
            None => "https:// backends verified against the system roots".to_string(),
            Some(f) => format!(
                "https:// backends verified against the CA file {}",
                f.display()
            ),
        },
    ]
}

fn health(c: &Config) -> Vec<String> {
    let (every, timeout) = (secs(c.health_interval), secs(c.health_timeout));
    let down = match c.health_failure_threshold {
        1 => "1 failed probe marks a backend down".to_string(),
        n => format!("{n} failed probes in a row mark a backend down"),
    };
    let load = if c.remote_load {
        let every = secs(c.load_interval);
        format!("each backend's own load (/metrics, else /slots) read every {every}, other gateways' requests included")
    } else {
        "backends' own load not read: only this gateway's requests count".to_string()
    };
    vec![
        format!("GET /health every {every} (timeout {timeout}); {down}"),
        load,
    ]
}

fn tools(mode: ToolsMode) -> &'static str {
    match mode {
        ToolsMode::Drop => "dropped for BitNet backends, and the client told in X-Gateway-Warning",
        ToolsMode::Reject => "refused for BitNet backends with 400 tools_unsupported",
    }
}

fn context_guard(on: bool) -> &'static str {
    if on {
        "on: a prompt that cannot fit a backend's context per slot gets 400 context_length_exceeded"
    } else {
        "off: prompts reach the backend whatever their length"
    }
}

fn model(out: &mut String, c: &Config, m: &ModelConfig) {
    let is_default = c
        .default_model
        .as_ref()
        .is_some_and(|d| names(m).any(|n| n == d));
    let mark = if is_default {
        " (the default model)"
    } else {
        ""
    };
    out.push_str(&format!("\nmodel {}{mark}\n", m.id));
    if !m.aliases.is_empty() {
        lines(out, "  aliases", &[m.aliases.join(", ")]);
    }
    let every = secs(c.discovery_interval);
    if let Some(r) = &m.runner {
        lines(
            out,
            "  runner",
            &[format!(
                "{r}, read every {every}: its ready instances are backends"
            )],
        );
    }
    if let Some(d) = &m.dns {
        lines(
            out,
            "  dns",
            &[format!(
                "{d}, resolved every {every}: each address is a backend"
            )],
        );
    }
    for b in &m.backends {
        lines(out, "  backend", &[backend(b)]);
    }
}

fn backend(b: &BackendConfig) -> String {
    let slots = match b.slots {
        Some(n) => count(n as usize, "slot", "slots"),
        None => "slots read from /props".to_string(),
    };
    let dialect = match b.dialect {
        DialectSetting::Auto => "dialect read from /props",
        DialectSetting::LlamaCpp => "dialect llama.cpp",
        DialectSetting::Bitnet => "dialect bitnet",
    };
    format!("{} at {}, {slots}, {dialect}", b.name, b.url)
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Exact to the nanosecond: `30 s`, `0.5 s`.
fn secs(d: Duration) -> String {
    let frac = format!("{:09}", d.subsec_nanos());
    match frac.trim_end_matches('0') {
        "" => format!("{} s", d.as_secs()),
        digits => format!("{}.{digits} s", d.as_secs()),
    }
}

/// In KiB or MiB when that is exact, else in bytes.
fn bytes(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        count(n, "byte", "bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn render_toml(text: &str) -> String {
        render(&RawConfig::from_toml(text).unwrap().validate().unwrap())
    }

    /// The line whose label is `label`, with the label and padding taken off.
    fn value<'a>(out: &'a str, label: &str) -> &'a str {
        out.lines()
            .find_map(|l| {
                l.strip_prefix(label)
                    .filter(|rest| rest.starts_with(' '))
                    .map(str::trim_start)
            })
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
    }

    const FULL: &str = r#"
        listen = "0.0.0.0:9000"
        default_model = "bitnet"
        policy = "predicted-ttft"
        max_body_bytes = 1500
        drain_timeout_secs = 2.25
        tls_cert = "/etc/gw/cert.pem"
        tls_key = "/etc/gw/key.pem"
        [queue]
        max = 7
        priority_header = "X-Priority"
        key_priority = { zed = -2, alice = 3 }
        sse_comments_secs = 0.5
        [health]
        remote_load = false
        failure_threshold = 1
        [upstream]
        max_attempts = 1
        ca_file = "/etc/gw/ca.pem"
        [compat]
        tools = "reject"
        context_guard = false
        [[api_keys]]
        name = "alice"
        key = "sk-alice-secret"
        [[api_keys]]
        name = "zed"
        key = "sk-zed-secret"
        [[admin_keys]]
        name = "ops"
        key = "adm-ops-secret"
        [[models]]
        id = "falcon3-10b"
        aliases = ["bitnet", "falcon"]
        runner = "http://127.0.0.1:8099"
        backends = [
          { url = "http://127.0.0.1:8101", name = "i0", slots = 4, dialect = "bitnet" },
          { url = "http://127.0.0.1:8102" },
        ]
        [[models]]
        id = "other"
        dns = "backends.svc:8080"
    "#;

    #[test]
    fn every_setting_of_a_full_file_is_shown_in_its_unit() {
        let out = render_toml(FULL);
        assert!(out.starts_with("bitnet-gateway: the configuration is valid.\n\n"));
        assert_eq!(
            value(&out, "listen"),
            "https://0.0.0.0:9000 (certificate /etc/gw/cert.pem, key /etc/gw/key.pem)"
        );
        assert!(
            value(&out, "policy").starts_with("predicted-ttft: "),
            "{out}"
        );
        assert!(out.contains("prompts at 60 tokens/s per backend, generation at 18 tokens/s"));
        assert!(value(&out, "default model").starts_with("bitnet (model falcon3-10b): "));
        assert!(
            out.contains("\nmodel falcon3-10b (the default model)\n"),
            "{out}"
        );
        assert!(out.contains("\nmodel other\n"), "{out}");
        assert_eq!(value(&out, "API keys"), "2 keys: alice, zed");
        assert_eq!(value(&out, "admin API"), "on, 1 key: ops");
        assert_eq!(
            value(&out, "/health /metrics"),
            "open to loopback clients; others need an API key"
        );
        assert_eq!(
            value(&out, "queue"),
            "up to 7 waiting requests per model (429 beyond)"
        );
        assert!(out.contains(
            "priority from header x-priority (-10 to 10), else priority by key: alice +3, zed -2; \
             a wait of 30 s is worth one level"
        ));
        assert!(out.contains("waiting streams every 0.5 s"), "{out}");
        assert!(value(&out, "limits").starts_with("request body at most 1500 bytes"));
        assert!(out.contains("1 attempt per request: no failover"));
        assert!(out.contains("verified against the CA file /etc/gw/ca.pem"));
        assert!(
            out.contains("; 1 failed probe marks a backend down\n"),
            "{out}"
        );
        assert!(out.contains("own load not read"));
        assert!(value(&out, "tools").contains("400 tools_unsupported"));
        assert!(value(&out, "context guard").starts_with("off"));
        assert_eq!(
            value(&out, "shutdown"),
            "in-flight responses may run 2.25 s after SIGTERM"
        );
        assert_eq!(value(&out, "  aliases"), "bitnet, falcon");
        assert!(value(&out, "  runner").starts_with("http://127.0.0.1:8099/, read every 1 s"));
        assert!(value(&out, "  dns").starts_with("backends.svc:8080, resolved every 1 s"));
        let backends: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("  backend "))
            .collect();
        assert_eq!(backends.len(), 2, "{out}");
        assert!(backends[0].ends_with("i0 at http://127.0.0.1:8101/, 4 slots, dialect bitnet"));
        assert!(backends[1].ends_with(
            "127.0.0.1:8102 at http://127.0.0.1:8102/, slots read from /props, dialect read from /props"
        ));
        for secret in ["sk-alice-secret", "sk-zed-secret", "adm-ops-secret"] {
            assert!(!out.contains(secret), "{secret} printed:\n{out}");
        }
    }

    #[test]
    fn defaults_read_as_the_readme_states_them() {
        let out = render_toml("[[models]]\nid = 'm'\nbackends = [{ url = 'http://a:1' }]");
        assert_eq!(value(&out, "listen"), "http://127.0.0.1:8090");
        assert_eq!(value(&out, "serving threads"), "1");
        assert!(value(&out, "policy").starts_with("least-loaded: "));
        assert!(
            !out.contains("tokens/s"),
            "routing starting points shown: {out}"
        );
        assert!(value(&out, "default model").starts_with("none: requests naming no model go to m,"));
        assert_eq!(value(&out, "API keys"), "none: every client is served");
        assert!(value(&out, "admin API").starts_with("off"));
        assert_eq!(
            value(&out, "/health /metrics"),
            "open to every client while there are no API keys, then to loopback clients only"
        );
        assert_eq!(
            value(&out, "queue"),
            "up to 32 waiting requests per slot of the model's backends (429 beyond)"
        );
        assert!(out.contains("waits at most 180 s for a slot, then gets 503\n"));
        assert!(out.contains("first come, first served"));
        assert!(!out.contains("worth one level"));
        assert!(out.contains("`: queued` comments to waiting streams: off"));
        assert!(
            value(&out, "limits").contains("10 MiB") && value(&out, "limits").contains("64 KiB")
        );
        assert!(out.contains("4096 client connections at once"));
        assert!(out.contains("headers within 30 s of connecting"));
        assert!(value(&out, "backends").starts_with("connect within 5 s"));
        assert!(out.contains("response head within 600 s"));
        assert!(out.contains("at most 120 s of silence"));
        assert!(out.contains("2 attempts per request"));
        assert!(out.contains("the system roots"));
        assert!(value(&out, "health")
            .starts_with("GET /health every 5 s (timeout 3 s); 3 failed probes"));
        assert!(out.contains("read every 1 s, other gateways'"));
        assert!(value(&out, "tools").starts_with("dropped"));
        assert!(value(&out, "context guard").starts_with("on"));
        assert!(value(&out, "shutdown").contains(" 30 s "));
        assert!(out.contains("\nmodel m\n"));
        assert!(!out.contains("  runner") && !out.contains("  dns"));
    }

    #[test]
    fn units_are_exact() {
        assert_eq!(secs(Duration::from_secs(30)), "30 s");
        assert_eq!(secs(Duration::from_millis(500)), "0.5 s");
        assert_eq!(secs(Duration::from_nanos(1_000_000_001)), "1.000000001 s");
        assert_eq!(bytes(10 * 1024 * 1024), "10 MiB");
        assert_eq!(bytes(1536 * 1024), "1536 KiB");
        assert_eq!(bytes(8192), "8 KiB");
        assert_eq!(bytes(1025), "1025 bytes");
        assert_eq!(bytes(1), "1 byte");
    }

    #[test]
    fn several_models_without_a_default_must_be_named() {
        let out = render_toml(
            "[[models]]\nid='a'\nbackends=[{url='http://a:1'}]\n[[models]]\nid='b'\nbackends=[{url='http://b:1'}]",
        );
        assert!(value(&out, "default model").starts_with("none: requests must name a model"));
        assert!(!out.contains("(the default model)"));
    }
}
