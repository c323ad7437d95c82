//! The official OpenAI SDKs against the gateway, in front of two real llama-server processes:
//! the Python SDK makes a non-streamed call, a streamed call and lists the models
//! (`tests/sdk/openai_python.py`); the npm SDK makes a streamed call the way OpenClaw does
//! (`tests/sdk/openai_stream.mjs`). The scripts check the answers and exit non-zero on a
//! failure.
//!
//! Without llama-server, the `openai` Python package or the npm SDK in `tests/sdk/node_modules`
//! (`npm ci --prefix gateway/tests/sdk`), each test prints a `SKIPPED` line; in CI
//! (`CI=true`) it fails instead.

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::TestGateway;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};

/// Longest a script may run; each makes a handful of 8-token calls to a tiny model.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

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

fn python_sdk_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn node_sdk_available() -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    node && sdk_dir().join("node_modules/openai/package.json").is_file()
}

/// Two llama-servers and a gateway serving them as `falcon3-10b` (alias `bitnet`), or `None`
/// when the test should skip. The servers live as long as the returned value.
async fn stack(test: &str) -> Option<(Vec<LlamaServer>, TestGateway)> {
    let bin = binary_or_skip(test)?;
    let servers: Vec<LlamaServer> = (0..2)
        .map(|_| {
            LlamaServer::start(&bin, &LlamaServerOpts::default()).expect("llama-server starts")
        })
        .collect();
    let backends: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ url = \"{}\" }}", s.url()))
        .collect();
    let toml = format!(
        "[health]\ninterval_secs = 0.05\ntimeout_secs = 1\n\n\
         [[models]]\nid = \"falcon3-10b\"\naliases = [\"bitnet\"]\nbackends = [{}]\n",
        backends.join(", ")
    );
    let gw = TestGateway::start(&toml).await;
    Some((servers, gw))
}

/// Runs `program script BASE_URL` to completion and fails the test with its output unless it
/// exits 0. The child is killed if the test ends first, even on panic.
async fn run_script(program: &str, script: &str, base_url: &str) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(sdk_dir().join(script))
        .arg(base_url)
        .current_dir(sdk_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {SCRIPT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(": ok"),
        "{script} printed no ok line:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_chats_streams_and_lists_models_through_the_gateway() {
    let test = "official_python_sdk_chats_streams_and_lists_models_through_the_gateway";
    if !python_sdk_available() {
        return skip(
            test,
            "the openai Python package is not installed (pip install openai)",
        );
    }
    let Some((_servers, gw)) = stack(test).await else {
        return;
    };
    run_script("python3", "openai_python.py", &gw.url("/v1")).await;
    // Listed by the gateway under its alias too, which no backend knows about.
    let models = common::get(&gw.url("/v1/models")).await.json();
    assert!(
        models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "bitnet")),
        "{models}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_sdk_streams_through_the_gateway() {
    let test = "official_node_sdk_streams_through_the_gateway";
    if !node_sdk_available() {
        return skip(
            test,
            "node or the openai npm package is missing (npm ci --prefix gateway/tests/sdk)",
        );
    }
    let Some((_servers, gw)) = stack(test).await else {
        return;
    };
    run_script("node", "openai_stream.mjs", &gw.url("/v1")).await;
    // The call reached a backend through the gateway, and its slot was given back.
    gw.wait_until(|g| g.pools()[0].backends().iter().all(|b| b.inflight() == 0))
        .await;
}
