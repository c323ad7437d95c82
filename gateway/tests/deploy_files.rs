//! The files in `deploy/`: the systemd units pass `systemd-analyze verify` and keep a low
//! exposure score, the example configs pass the real binaries' `--check-config` and agree
//! with each other and with the units, the OpenClaw snippet points at the gateway, and
//! `quickstart.sh` brings the stack up and takes it down on Ctrl-C.
//!
//! Tests that need `systemd-analyze`, curl, or the `bitnet-runner` and `llama-sim` binaries
//! print a `SKIPPED` line when one is missing, except in CI (`CI=true`), where they fail
//! instead.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use testkit::child::ChildGuard;

const UNITS: [&str; 2] = ["bitnet-runner.service", "bitnet-gateway.service"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn toml_file(rel: &str) -> toml::Table {
    read(rel)
        .parse()
        .unwrap_or_else(|e| panic!("{rel} is not valid TOML: {e}"))
}

/// Whether a missing tool must fail the test rather than skip it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Panics in CI; elsewhere prints a `SKIPPED` line that the harness does not hide.
fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: {why}, and CI requires it");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_executable(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file system root for `systemd-analyze --root`: a copy of the system's unit directory
/// (the units depend on its targets), the two units installed as the guide installs them,
/// and, when `with_binaries`, stand-ins for the binaries at their ExecStart paths. Without a
/// root, `verify` would look for /usr/local/bin/bitnet-* on this machine.
fn systemd_root(test: &str, with_binaries: bool) -> Option<TempDir> {
    let has_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_analyze {
        skip(test, "systemd-analyze not found (apt-get install systemd)");
        return None;
    }
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").is_file());
    let Some(system_units) = system_units else {
        skip(test, "no system unit directory with multi-user.target");
        return None;
    };
    let root = TempDir::new("deploy-systemd-root");
    let lib = root.0.join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).unwrap();
    // `cp -a` keeps the directory's symlinks (aliases such as default.target) as links,
    // which systemd then resolves inside the root.
    let out = run(Command::new("cp").arg("-a").arg(system_units).arg(&lib));
    assert!(out.status.success(), "cp: {}", text(&out.stderr));
    let etc = root.0.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    for unit in UNITS {
        std::fs::copy(deploy().join("systemd").join(unit), etc.join(unit)).unwrap();
    }
    if with_binaries {
        for bin in ["bitnet-runner", "bitnet-gateway"] {
            write_executable(&root.0.join("usr/local/bin").join(bin));
        }
    }
    Some(root)
}

fn verify(root: &TempDir) -> Output {
    run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.0.display()))
        .args(UNITS))
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let test = "systemd_units_pass_systemd_analyze_verify";
    let Some(root) = systemd_root(test, true) else {
        return;
    };
    let out = verify(&root);
    // verify exits 0 on unknown keys and only warns, so any output is a failure too.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn systemd_verify_checks_the_installed_binary_paths() {
    // Without the binaries in the root the same units must fail: the check above is made
    // against the root, not against whatever this machine has in /usr/local/bin.
    let test = "systemd_verify_checks_the_installed_binary_paths";
    let Some(root) = systemd_root(test, false) else {
        return;
    };
    let out = verify(&root);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "verify passed without binaries");
    for bin in [
        "/usr/local/bin/bitnet-runner",
        "/usr/local/bin/bitnet-gateway",
    ] {
        assert!(stderr.contains(bin), "{bin} not reported:\n{stderr}");
    }
}

#[test]
fn systemd_units_keep_a_low_exposure_score() {
    let test = "systemd_units_keep_a_low_exposure_score";
    let Some(root) = systemd_root(test, true) else {
        return;
    };
    for unit in UNITS {
        // Scores run from 0 (locked down) to 100 (shown as 10.0, "UNSAFE"); both units
        // score 1.5 or less. 25 leaves room for scoring changes between systemd versions
        // while catching a dropped sandboxing directive.
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
            .arg(format!("--root={}", root.0.display()))
            .arg(unit));
        let report = text(&out.stdout);
        assert!(
            out.status.success(),
            "{unit} is exposed above 2.5:\n{}\n{}",
            report
                .lines()
                .filter(|l| l.contains('✗'))
                .collect::<Vec<_>>()
                .join("\n"),
            text(&out.stderr)
        );
        assert!(report.contains("Overall exposure level"), "{report}");
    }
}

/// `[Section] Key=value` lines of a unit file; repeated keys keep every value in order.
fn unit_keys(unit: &str) -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in read(&format!("systemd/{unit}")).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            keys.entry(format!("{section}.{k}"))
                .or_default()
                .push(v.to_string());
        }
    }
    keys
}

fn one<'a>(keys: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}: expected exactly one value, got {other:?}"),
    }
}

fn words(keys: &HashMap<String, Vec<String>>, key: &str) -> Vec<String> {
    keys.get(key)
        .into_iter()
        .flatten()
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

fn secs(table: &toml::Table, path: &[&str]) -> f64 {
    let mut v = table.get(path[0]);
    for p in &path[1..] {
        v = v.and_then(|t| t.get(p));
    }
    v.and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
        .unwrap_or_else(|| panic!("{} missing or not a number", path.join(".")))
}

#[test]
fn units_run_the_binaries_on_etc_bitnet_as_the_bitnet_user_with_the_gateway_after_the_runner() {
    let runner = unit_keys("bitnet-runner.service");
    let gateway = unit_keys("bitnet-gateway.service");
    assert_eq!(
        one(&runner, "Service.ExecStart"),
        "/usr/local/bin/bitnet-runner --config /etc/bitnet/runner.toml"
    );
    assert_eq!(
        one(&gateway, "Service.ExecStart"),
        "/usr/local/bin/bitnet-gateway --config /etc/bitnet/gateway.toml"
    );
    for (name, unit) in [("runner", &runner), ("gateway", &gateway)] {
        for (key, want) in [
            ("Service.User", "bitnet"),
            ("Service.Restart", "on-failure"),
            ("Service.NoNewPrivileges", "yes"),
            ("Service.ProtectSystem", "strict"),
            ("Service.ProtectHome", "yes"),
            ("Service.PrivateTmp", "yes"),
            ("Install.WantedBy", "multi-user.target"),
        ] {
            assert_eq!(one(unit, key), want, "{name}: {key}");
        }
    }
    // Only the runner gets SIGTERM; it drains its instances before stopping them.
    assert_eq!(one(&runner, "Service.KillMode"), "mixed");
    let runner_unit = "bitnet-runner.service".to_string();
    assert!(words(&gateway, "Unit.After").contains(&runner_unit));
    assert!(words(&gateway, "Unit.Wants").contains(&runner_unit));
    // Never the other way round, which would make a runner restart wait for the gateway.
    assert!(!words(&runner, "Unit.After").contains(&"bitnet-gateway.service".to_string()));
    // The gateway writes nothing; the runner writes only its log directory.
    assert!(words(&gateway, "Service.ReadWritePaths").is_empty());
    let runner_toml = toml_file("config/runner.toml");
    let log_dir = runner_toml["logs"]["dir"].as_str().expect("logs.dir");
    assert_eq!(words(&runner, "Service.ReadWritePaths"), [log_dir]);
    assert_eq!(
        format!("/var/log/{}", one(&runner, "Service.LogsDirectory")),
        log_dir
    );
}

#[test]
fn stop_timeouts_of_the_units_outlast_the_drains_of_the_configs() {
    let stop = |unit: &str| -> f64 {
        one(&unit_keys(unit), "Service.TimeoutStopSec")
            .parse()
            .expect("TimeoutStopSec in seconds")
    };
    let runner = toml_file("config/runner.toml");
    let runner_needs =
        secs(&runner, &["stop", "shutdown_drain_secs"]) + secs(&runner, &["stop", "timeout_secs"]);
    assert!(
        stop("bitnet-runner.service") > runner_needs,
        "systemd would SIGKILL the instances before the runner's drain and stop ({runner_needs} s) end"
    );
    let gateway_needs = secs(&toml_file("config/gateway.toml"), &["drain_timeout_secs"]);
    assert!(
        stop("bitnet-gateway.service") > gateway_needs,
        "systemd would SIGKILL the gateway before its drain ({gateway_needs} s) ends"
    );
}

#[test]
fn example_gateway_config_passes_check_config_and_follows_the_runner() {
    let path = deploy().join("config/gateway.toml");
    let out = run(Command::new(env!("CARGO_BIN_EXE_bitnet-gateway"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config"));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "--check-config failed:\n{stdout}{}",
        text(&out.stderr)
    );
    // The summary's settings are `label   value` lines; a model's are indented under it.
    let setting = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(label).filter(|rest| rest.starts_with(' ')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
    };
    assert_eq!(setting("listen"), "http://127.0.0.1:8090");
    assert!(
        stdout.contains("\nmodel falcon3-10b (the default model)\n"),
        "{stdout}"
    );
    assert_eq!(setting("  aliases"), "bitnet");
    assert!(
        setting("  runner").starts_with("http://127.0.0.1:8099/,"),
        "{stdout}"
    );
    assert!(setting("tools").starts_with("dropped "), "{stdout}");

    let gateway = toml_file("config/gateway.toml");
    let runner = toml_file("config/runner.toml");
    let model = &gateway["models"].as_array().expect("[[models]]")[0];
    assert_eq!(model["id"].as_str(), Some("falcon3-10b"));
    assert_eq!(
        model["aliases"].as_array().unwrap()[0].as_str(),
        Some("bitnet")
    );
    let control = runner["control"].as_str().expect("runner control");
    assert_eq!(
        model["runner"].as_str(),
        Some(format!("http://{control}").as_str()),
        "the gateway must follow the runner's control API"
    );
}

/// The `bitnet-runner` binary of this build: a sibling of the directory holding this test.
fn runner_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("bitnet-runner");
    bin.is_file().then_some(bin)
}

#[test]
fn example_runner_config_passes_check_config_with_seven_instances_of_eight_threads() {
    let test = "example_runner_config_passes_check_config_with_seven_instances_of_eight_threads";
    let runner = toml_file("config/runner.toml");
    assert_eq!(runner["instances"].as_integer(), Some(7));
    assert_eq!(runner["threads"].as_integer(), Some(8));
    assert_eq!(runner["ctx"].as_integer(), Some(4096));
    assert_eq!(runner["base_port"].as_integer(), Some(8101));
    assert_eq!(runner["pin"].as_bool(), Some(true));
    let model = runner["model"].as_str().expect("model");
    assert!(
        model.contains("Falcon3-10B-Instruct-1.58bit") && model.ends_with("i2_s.gguf"),
        "{model}"
    );

    let Some(bin) = runner_binary() else {
        skip(
            test,
            "no bitnet-runner next to the test binaries (cargo build -p backend-runner)",
        );
        return;
    };
    // The file names a box's paths and 56 cores: point the machine-specific parts at stand-ins
    // and let the runner check everything else.
    let tmp = TempDir::new("deploy-runner-check");
    let llama_server = tmp.0.join("llama-server");
    write_executable(&llama_server);
    let model_file = tmp.0.join("model.gguf");
    std::fs::write(&model_file, b"GGUF").unwrap();
    let out = run(Command::new(bin)
        .arg("--config")
        .arg(deploy().join("config/runner.toml"))
        .arg("--llama-server")
        .arg(&llama_server)
        .arg("--model")
        .arg(&model_file)
        .arg("--log-dir")
        .arg(tmp.0.join("logs"))
        .args(["--no-pin", "--base-port", "0", "--check-config"]));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "--check-config failed:\n{stdout}{}",
        text(&out.stderr)
    );
    // One command line per instance, as the unit would run it.
    let commands: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(llama_server.to_str().unwrap()))
        .collect();
    assert_eq!(commands.len(), 7, "{stdout}");
    for command in commands {
        assert!(command.contains(" -t 8 -c 4096 -ngl 0 "), "{command}");
    }
}

#[test]
fn openclaw_snippet_points_at_the_gateway_without_client_side_compat_flags() {
    let snippet: serde_json::Value =
        serde_json::from_str(&read("openclaw.json")).expect("openclaw.json is valid JSON");
    let providers = snippet["models"]["providers"]
        .as_object()
        .expect("models.providers");
    assert_eq!(providers.len(), 1, "one provider");
    let (provider_id, provider) = providers.iter().next().unwrap();

    let gateway = toml_file("config/gateway.toml");
    let port = gateway["listen"]
        .as_str()
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, p)| p)
        .expect("listen");
    assert_eq!(
        provider["baseUrl"],
        format!("http://localhost:{port}/v1"),
        "baseUrl must reach the gateway's /v1"
    );
    assert!(provider["apiKey"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(provider["api"], "openai-completions");

    let models = provider["models"].as_array().expect("provider models");
    assert_eq!(models.len(), 1);
    let model = &models[0];
    let gateway_model = &gateway["models"].as_array().unwrap()[0];
    assert_eq!(model["id"].as_str(), gateway_model["id"].as_str());
    // One slot per instance: a request gets the whole context of its instance.
    let runner = toml_file("config/runner.toml");
    assert_eq!(model["contextWindow"].as_i64(), runner["ctx"].as_integer());
    assert!(
        model.get("compat").is_none(),
        "the gateway rewrites requests for the BitNet server; no client-side compat is needed"
    );

    let model_ref = format!("{provider_id}/{}", model["id"].as_str().unwrap());
    assert_eq!(snippet["agents"]["defaults"]["model"]["primary"], model_ref);
    assert_eq!(
        snippet["agents"]["defaults"]["models"][&model_ref]["alias"].as_str(),
        gateway_model["aliases"].as_array().unwrap()[0].as_str()
    );
}

/// Whether `pid` is gone: no such process, or a zombie nobody has reaped yet.
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

#[test]
fn quickstart_brings_up_the_stack_answers_its_curl_and_leaves_nothing_on_ctrl_c() {
    let test = "quickstart_brings_up_the_stack_answers_its_curl_and_leaves_nothing_on_ctrl_c";
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_bitnet-gateway"))
        .parent()
        .unwrap()
        .to_path_buf();
    if !["bitnet-runner", "llama-sim"]
        .iter()
        .all(|b| bin_dir.join(b).is_file())
    {
        return skip(
            test,
            "bitnet-runner or llama-sim not built (cargo build -p backend-runner -p loadtest)",
        );
    }
    if !Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return skip(test, "curl not found");
    }

    // Fast simulated backends and OS-assigned ports, so that the test neither waits on BitNet
    // speed nor takes the product's ports; logs in a directory of its own.
    let logs = TempDir::new("deploy-quickstart");
    let mut cmd = Command::new("bash");
    cmd.arg(deploy().join("quickstart.sh"))
        .env("BIN_DIR", &bin_dir)
        .env("LOG_DIR", &logs.0)
        .env("LISTEN", "127.0.0.1:0")
        .env("RUNNER_CONTROL", "127.0.0.1:0")
        .env("SIM_ARGS", "--time-scale 0.05")
        .env("INSTANCES", "2");
    for var in ["LLAMA_SERVER", "MODEL", "THREADS", "CTX", "PROFILE"] {
        cmd.env_remove(var);
    }
    let mut script = ChildGuard::spawn(cmd).expect("start quickstart.sh");
    let ready = script
        .wait_for_line(|l| l.starts_with("== ready"), Duration::from_secs(60))
        .unwrap_or_else(|| panic!("never ready:\n{}", script.output_so_far()));
    let control = ready
        .split("runner ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no runner URL in {ready:?}"))
        .to_string();
    let curl = script
        .wait_for_line(
            |l| l.trim_start().starts_with("curl ") && l.contains("/v1/chat/completions"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no curl line:\n{}", script.output_so_far()));

    // The curl the script prints, run as written.
    let out = run(Command::new("bash").arg("-c").arg(curl.trim()));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert_eq!(
        reply["usage"]["completion_tokens"], 64,
        "max_tokens of the curl"
    );

    // Everything that must be gone afterwards: the script's process group, its children (the
    // runner and the gateway, in sessions of their own) and the instances, which the runner
    // puts in groups of their own.
    let pids_of = |flag: &str| -> Vec<u32> {
        let out = run(Command::new("pgrep")
            .arg(flag)
            .arg(script.pid().to_string()));
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let children = pids_of("-P");
    assert_eq!(
        children.len(),
        2,
        "the runner and the gateway: {children:?}"
    );
    let mut pids = pids_of("-g");
    assert!(pids.contains(&script.pid()), "{pids:?}");
    assert!(
        children.iter().all(|c| !pids.contains(c)),
        "a Ctrl-C at the terminal must reach only the script, which stops the others in order"
    );
    pids.extend(children);
    let instances = run(Command::new("curl").args(["-fsS", &format!("{control}/instances")]));
    let instances: serde_json::Value =
        serde_json::from_slice(&instances.stdout).expect("runner /instances");
    let instance_pids: Vec<u32> = instances["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert_eq!(instance_pids.len(), 2, "{instances}");
    pids.extend(instance_pids);

    // Ctrl-C: SIGINT to the whole foreground process group, as a terminal sends it.
    let sent = run(Command::new("kill")
        .args(["-INT", "--"])
        .arg(format!("-{}", script.pid())));
    assert!(sent.status.success(), "kill: {}", text(&sent.stderr));
    let status = script
        .wait_timeout(Duration::from_secs(60))
        .expect("wait")
        .unwrap_or_else(|| panic!("still running after Ctrl-C:\n{}", script.output_so_far()));
    assert_eq!(status.code(), Some(130), "{}", script.output_so_far());
    // One signal each: the runner drained and stopped its instances rather than killing them.
    let runner_log = std::fs::read_to_string(logs.0.join("runner.log")).expect("runner.log");
    assert!(!runner_log.contains("second signal"), "{runner_log}");
    assert!(
        !script.output_so_far().contains("exited (status"),
        "{}",
        script.output_so_far()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| process_gone(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?}",
            pids.iter()
                .filter(|&&p| !process_gone(p))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
