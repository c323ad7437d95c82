//! The llama-server command line of an instance, and reading back the port it bound.

use std::ffi::OsString;

use crate::config::InstanceConfig;

/// Arguments for one instance: the known-good BitNet command line
/// (`-m MODEL --host H --port P -t T -c C -ngl 0 --no-perf`), plus `--metrics` and `--slots`,
/// which the runner's liveness and drain checks read, `-np` when configured, and the extra
/// arguments last so that they can override anything before them.
pub fn llama_server_args(inst: &InstanceConfig) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-m".into(), inst.model.clone().into_os_string()];
    for (flag, value) in [
        ("--host", inst.host.to_string()),
        ("--port", inst.port.to_string()),
        ("-t", inst.threads.to_string()),
        ("-c", inst.ctx.to_string()),
        ("-ngl", "0".to_owned()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    // The older server exposes /slots only with --slots; upstream accepts it (on by default).
    for flag in ["--no-perf", "--metrics", "--slots"] {
        args.push(flag.into());
    }
    if let Some(np) = inst.parallel {
        args.push("-np".into());
        args.push(np.to_string().into());
    }
    args.extend(inst.extra_args.iter().map(OsString::from));
    args
}

/// Reads the port from a llama-server line announcing its listener, for instances started
/// with `--port 0`. Three forms exist: upstream's `listening on http://127.0.0.1:PORT`, the older
/// server's `HTTP server is listening, hostname: H, port: PORT, ...`, and mid-2024 JSON logs
/// with `"msg":"HTTP server listening", ..., "port":"PORT"`. Port 0 is never an answer.
pub fn parse_listen_port(line: &str) -> Option<u16> {
    if !line.contains("listening") {
        return None;
    }
    let port = if let Some((_, rest)) = line.split_once("http://") {
        // `127.0.0.1:PORT`, `[::1]:PORT`, maybe followed by a path or text.
        let authority = rest.split(|c: char| c == '/' || c.is_whitespace()).next()?;
        authority.rsplit_once(':')?.1.parse().ok()?
    } else {
        let (_, rest) = line.split_once("port")?;
        let digits: String = rest
            .trim_start_matches(['"', ':', ' ', '='])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()?
    };
    (port != 0).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn instance() -> InstanceConfig {
        InstanceConfig {
            name: "i0".into(),
            model: PathBuf::from("/models/falcon.gguf"),
            host: "127.0.0.1".parse().unwrap(),
            port: 8101,
            threads: 8,
            ctx: 4096,
            parallel: None,
            extra_args: Vec::new(),
            cpus: None,
        }
    }

    fn words(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn defaults_reproduce_the_known_good_command_line() {
        assert_eq!(
            words(&llama_server_args(&instance())),
            "-m /models/falcon.gguf --host 127.0.0.1 --port 8101 -t 8 -c 4096 -ngl 0 \
             --no-perf --metrics --slots"
        );
    }

    #[test]
    fn parallel_and_extra_args_come_last_in_order() {
        let mut inst = instance();
        inst.parallel = Some(2);
        inst.extra_args = vec!["--temp".into(), "0.7".into()];
        assert!(words(&llama_server_args(&inst)).ends_with("--slots -np 2 --temp 0.7"));
    }

    #[test]
    fn port_is_read_from_each_known_listening_line() {
        for (line, port) in [
            (
                "0.00.019.454 I srv  llama_server: listening on http://127.0.0.1:43813",
                43813,
            ),
            (
                "main: HTTP server is listening, hostname: 127.0.0.1, port: 39001, http threads: 3",
                39001,
            ),
            (
                r#"{"level":"INFO","msg":"HTTP server listening","hostname":"127.0.0.1","port":"40417"}"#,
                40417,
            ),
            ("llama-sim listening on http://[::1]:9001", 9001),
        ] {
            assert_eq!(parse_listen_port(line), Some(port), "{line}");
        }
    }

    #[test]
    fn lines_without_a_bound_port_give_nothing() {
        for line in [
            "main: binding port with default address family",
            "listening on http://127.0.0.1:0",
            "load_model: loading model 'x.gguf'",
            "srv  listening on http://127.0.0.1:notaport",
        ] {
            assert_eq!(parse_listen_port(line), None, "{line}");
        }
    }
}
