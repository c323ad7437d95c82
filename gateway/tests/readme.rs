//! The README's curl examples, run as written (only the address is changed to the test
//! gateway's) against a gateway in front of a real llama-server, so the README cannot rot.

mod common;

use std::process::Command;

use common::*;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};

fn readme_curls() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    readme
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_curl_in_the_readme_works_as_written() {
    let curls = readme_curls();
    assert!(!curls.is_empty(), "the README shows curl examples");
    let Some(bin) = binary_or_skip("every_curl_in_the_readme_works_as_written") else {
        return;
    };
    let server = LlamaServer::start(&bin, &LlamaServerOpts::default()).unwrap();
    let toml = format!(
        "[health]\ninterval_secs = 0.05\n[[models]]\nid = \"falcon3-10b\"\naliases = [\"bitnet\"]\nbackends = [{{ url = \"{}\" }}]\n",
        server.url()
    );
    let gw = TestGateway::start(&toml).await;
    for line in curls {
        assert!(
            line.contains("http://localhost:8090"),
            "README curl should target the default address: {line}"
        );
        let cmd = line.replace("http://localhost:8090", &format!("http://{}", gw.addr));
        let out =
            tokio::task::spawn_blocking(move || Command::new("sh").arg("-c").arg(&cmd).output())
                .await
                .unwrap()
                .expect("curl runs");
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{line}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert!(v.get("error").is_none(), "{line}: {v}");
        assert!(
            v["choices"][0]["message"]["content"].is_string() || v["data"].is_array(),
            "{line}: {v}"
        );
    }
}
