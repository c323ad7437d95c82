//! What `--check-config` prints: the configuration as the runner would act on it.
//!
//! An operator checks a file to learn what will run, so the summary leads with each
//! instance's exact command line and cores, then says in words what the timing settings
//! will do. Every setting appears, with its unit.

use std::fmt::Write as _;
use std::time::Duration;

use crate::command::llama_server_args;
use crate::config::{Config, Timing};
use crate::preflight::Plan;

/// The summary of a checked configuration and the core plan made for it.
pub fn render(config: &Config, plan: &Plan) -> String {
    let mut out = String::from("bitnet-runner: the configuration is valid.\n\n");
    let t = &config.timing;
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{label:<17}{text}");
    };
    line("llama-server", plan.llama_server.display().to_string());
    line("control API", format!("http://{}", config.control));
    // An instance with its own `cpus` list is pinned whatever `pin` says: count the plan.
    let pinned = plan.cpus.iter().filter(|c| c.is_some()).count();
    let n = config.instances.len();
    line(
        "instances",
        match pinned {
            0 => format!("{n}, not pinned to cores"),
            p if p == n => format!("{n}, each on cores of its own"),
            p => format!("{n}, {p} of them on cores of their own, the others on any core"),
        },
    );
    line(
        "readiness",
        format!(
            "once GET /health answers 200; a start not ready within {} has failed",
            secs(t.startup_timeout)
        ),
    );
    line(
        "liveness",
        format!(
            "a probe every {}, each allowed {}; {} failed in a row restart an instance that shows no sign of work",
            secs(t.health_interval),
            secs(t.health_timeout),
            t.failure_threshold
        ),
    );
    line("restarts", restarts(t));
    line(
        "draining",
        format!(
            "up to {} before a planned restart, up to {} at shutdown; slots are watched from {} in, once the gateway has stopped sending",
            secs(t.drain_timeout),
            secs(t.shutdown_drain),
            secs(t.drain_grace)
        ),
    );
    line(
        "stopping",
        format!(
            "SIGTERM once drained, SIGKILL {} later",
            secs(t.stop_timeout)
        ),
    );
    line(
        "logs",
        match &config.log_files {
            Some(files) => format!(
                "stderr, and {}/NAME.log per instance, rotated at {}, {} kept",
                files.dir.display(),
                bytes(files.max_bytes),
                files.keep
            ),
            None => "stderr only".to_owned(),
        },
    );
    for (i, inst) in config.instances.iter().enumerate() {
        let port = if inst.port == 0 {
            "a port chosen at start".to_owned()
        } else {
            format!("port {}", inst.port)
        };
        let place = match plan.cpus.get(i).and_then(Option::as_deref) {
            Some(cpus) => format!("cores {}", cores(cpus)),
            None => "any core".to_owned(),
        };
        let _ = write!(out, "\n{}: {} on {port}, {place}\n  ", inst.name, inst.host);
        out.push_str(&shell_words(
            std::iter::once(plan.llama_server.display().to_string()).chain(
                llama_server_args(inst)
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned()),
            ),
        ));
        out.push('\n');
    }
    out
}

fn restarts(t: &Timing) -> String {
    let give_up = match t.max_failures {
        Some(n) => format!("given up after {n} failures in a row"),
        None => "never given up".to_owned(),
    };
    format!(
        "after {}, doubling in a crash loop up to {}, back to {} once ready for {}; {give_up}",
        secs(t.restart_delay),
        secs(t.max_restart_delay),
        secs(t.restart_delay),
        secs(t.stable)
    )
}

/// `300 s`, `0.5 s`: seconds, as the config file gives them.
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// A size in MiB or KiB when it is a whole number of them.
fn bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// Cores as ranges: `0-7`, `0-3,8,10-11`.
fn cores(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = match j - i {
            0 => write!(out, "{}", cpus[i]),
            _ => write!(out, "{}-{}", cpus[i], cpus[j]),
        };
        i = j + 1;
    }
    out
}

/// Words joined so that a shell reads them back as they are: the printed command line can
/// be pasted to try an instance by hand.
fn shell_words(words: impl Iterator<Item = String>) -> String {
    let plain = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-./:=,+@%".contains(&b))
    };
    words
        .map(|w| {
            if plain(&w) {
                w
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RawConfig};

    fn config(toml: &str) -> Config {
        RawConfig::from_toml(toml).unwrap().validate().unwrap()
    }

    #[test]
    fn each_instance_shows_its_command_line_and_cores() {
        let c = config(
            r#"
            llama_server = "/opt/llama-server"
            model = "/models/falcon 10b.gguf"
            instances = 2
            threads = 4
            base_port = 8101
            extra_args = ["--temp", "0.7", "it's"]
            "#,
        );
        let plan = Plan {
            llama_server: "/opt/llama-server".into(),
            cpus: vec![Some(vec![0, 1, 2, 3]), Some(vec![4, 6, 7, 9])],
        };
        let s = render(&c, &plan);
        assert!(
            s.contains(
                "\ni0: 127.0.0.1 on port 8101, cores 0-3\n  /opt/llama-server -m '/models/falcon 10b.gguf' \
                 --host 127.0.0.1 --port 8101 -t 4 -c 4096 -ngl 0 --no-perf --metrics --slots \
                 --temp 0.7 'it'\\''s'\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("\ni1: 127.0.0.1 on port 8102, cores 4,6-7,9\n"),
            "{s}"
        );
    }

    #[test]
    fn timing_is_said_in_words_with_units() {
        let c = config(
            r#"
            llama_server = "llama-server"
            model = "/m.gguf"
            instances = 1
            base_port = 0
            pin = false
            [health]
            interval_secs = 0.5
            [restart]
            max_failures = 4
            [logs]
            dir = "/var/log/r"
            max_bytes = 1048576
            keep = 2
            "#,
        );
        let plan = Plan {
            llama_server: "/usr/bin/llama-server".into(),
            cpus: vec![None],
        };
        let s = render(&c, &plan);
        for expected in [
            "llama-server     /usr/bin/llama-server\n",
            "instances        1, not pinned to cores\n",
            "a probe every 0.5 s",
            "given up after 4 failures in a row",
            "/var/log/r/NAME.log per instance, rotated at 1 MiB, 2 kept",
            "\ni0: 127.0.0.1 on a port chosen at start, any core\n",
        ] {
            assert!(s.contains(expected), "{expected:?} in\n{s}");
        }
    }

    #[test]
    fn an_instance_with_its_own_cores_is_pinned_without_pin() {
        let c = config(
            r#"
            llama_server = "llama-server"
            model = "/m.gguf"
            instances = 2
            pin = false
            [[instance]]
            cpus = [1]
            "#,
        );
        let plan = Plan {
            llama_server: "/usr/bin/llama-server".into(),
            cpus: vec![Some(vec![1]), None],
        };
        let s = render(&c, &plan);
        assert!(
            s.contains(
                "instances        2, 1 of them on cores of their own, the others on any core\n"
            ),
            "{s}"
        );
    }

    #[test]
    fn helpers_format_exactly() {
        assert_eq!(cores(&[0]), "0");
        assert_eq!(cores(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(bytes(67_108_864), "64 MiB");
        assert_eq!(bytes(1536), "1536 bytes");
        assert_eq!(bytes(2048), "2 KiB");
        assert_eq!(secs(Duration::from_secs(300)), "300 s");
        assert_eq!(
            shell_words(["a b", "", "c", "$x"].map(String::from).into_iter()),
            "'a b' '' c '$x'"
        );
    }
}
