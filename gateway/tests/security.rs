//! API keys, admin endpoints and TLS, through the real binary and in process.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use testkit::child::Signal;
use testkit::fake_backend::{FakeBackend, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_bitnet-gateway");

fn ok(_: &testkit::fake_backend::Seen) -> Reply {
    Reply::Json(200, completion_json("fine"))
}

fn with_headers(url: &str, body: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut r = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

#[tokio::test]
async fn api_keys_are_required_by_either_header_and_named_in_metrics() {
    let be = FakeBackend::start("a", 2, ok).await;
    let extra = "[[api_keys]]\nname = \"ci\"\nkey = \"sk-test-123\"\n";
    let gw = TestGateway::over(&[be.url()], extra).await;
    let url = gw.url("/v1/chat/completions");
    let body = chat(0, false);

    let none = read(send(with_headers(&url, &body, &[])).await).await;
    none.assert_openai_error(401, "invalid_api_key");
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    read(
        send(with_headers(
            &url,
            &body,
            &[("authorization", "Bearer wrong")],
        ))
        .await,
    )
    .await
    .assert_openai_error(401, "invalid_api_key");
    let bearer = read(
        send(with_headers(
            &url,
            &body,
            &[("authorization", "Bearer sk-test-123")],
        ))
        .await,
    )
    .await;
    assert_eq!(bearer.status, 200);
    let x = read(send(with_headers(&url, &body, &[("x-api-key", "sk-test-123")])).await).await;
    assert_eq!(x.status, 200);
    assert_eq!(be.count(), 2, "refused requests never reached the backend");
    // /v1/models needs a key too; /health and /metrics are public on loopback by default.
    let models = read(
        send(
            Request::get(gw.url("/v1/models"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await,
    )
    .await;
    models.assert_openai_error(401, "invalid_api_key");
    assert_eq!(get(&gw.url("/health")).await.status, 200);
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(
        metrics.contains("bitnet_gateway_requests_by_key_total{key=\"ci\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bitnet_gateway_auth_failures_total{reason=\"missing\"} 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("sk-test-123"),
        "the key itself must never appear"
    );
}

#[tokio::test]
async fn health_and_metrics_can_require_a_key() {
    let be = FakeBackend::start("a", 2, ok).await;
    let extra = "public_health_metrics = \"never\"\n[[api_keys]]\nname = \"ci\"\nkey = \"k1\"\n";
    let gw = TestGateway::over(&[be.url()], extra).await;
    get(&gw.url("/metrics"))
        .await
        .assert_openai_error(401, "invalid_api_key");
    let req = Request::get(gw.url("/health"))
        .header("authorization", "Bearer k1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(read(send(req).await).await.status, 200);
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_key_and_drain_a_backend() {
    let a = FakeBackend::start("a", 4, ok).await;
    let b = FakeBackend::start("b", 1, ok).await;
    let open = TestGateway::over(&[a.url(), b.url()], "").await;
    get(&open.url("/admin/backends"))
        .await
        .assert_openai_error(403, "admin_disabled");

    let extra = "[[api_keys]]\nname = \"client\"\nkey = \"c\"\n[[admin_keys]]\nname = \"ops\"\nkey = \"adm\"\n";
    let gw = TestGateway::over(&[a.url(), b.url()], extra).await;
    let admin = |method: &str, path: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri(gw.url(path))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // A client key is not an admin key.
    read(send(admin("GET", "/admin/backends", "c")).await)
        .await
        .assert_openai_error(401, "invalid_api_key");
    let list = read(send(admin("GET", "/admin/backends", "adm")).await).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["backends"].as_array().unwrap().len(), 2);
    let a_name = a.url().trim_start_matches("http://").to_string();
    let drained = read(
        send(admin(
            "POST",
            &format!("/admin/backends/{a_name}/drain"),
            "adm",
        ))
        .await,
    )
    .await;
    assert_eq!(drained.status, 200, "{}", drained.text());
    for i in 0..4 {
        let got = read(
            send(with_headers(
                &gw.url("/v1/chat/completions"),
                &chat(i, false),
                &[("x-api-key", "c")],
            ))
            .await,
        )
        .await;
        assert_eq!(
            got.headers["x-fake-backend"], "b",
            "a drained backend takes no new work"
        );
    }
    let resumed = read(
        send(admin(
            "POST",
            &format!("/admin/backends/{a_name}/resume"),
            "adm",
        ))
        .await,
    )
    .await;
    assert_eq!(resumed.status, 200);
    let got = read(
        send(with_headers(
            &gw.url("/v1/chat/completions"),
            &chat(9, false),
            &[("x-api-key", "c")],
        ))
        .await,
    )
    .await;
    assert_eq!(got.headers["x-fake-backend"], "a");
    let got = read(send(admin("POST", "/admin/backends/nope/drain", "adm")).await).await;
    got.assert_openai_error(404, "backend_not_found");
    let message = got.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("'nope'"), "{message}");
}

#[test]
fn keys_from_a_file_and_the_environment_work_with_the_binary() {
    let dir = std::env::temp_dir().join(format!("gw-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "# clients\nopenclaw:file-key-1\n\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let be = rt.block_on(FakeBackend::start("a", 1, ok));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--model",
        "m",
        "--backend",
        &be.url(),
        "--api-key-file",
    ])
    .arg(&file)
    .env("BITNET_GATEWAY_API_KEYS", "env-key-1,env-key-2");
    let (_child, base) = spawn_gateway(cmd);
    rt.block_on(async {
        for (key, want) in [("file-key-1", 200), ("env-key-2", 200), ("nope", 401)] {
            let mut got = 0;
            for _ in 0..100 {
                let r = read(
                    send(with_headers(
                        &format!("{base}/v1/chat/completions"),
                        &chat(0, false),
                        &[("x-api-key", key)],
                    ))
                    .await,
                )
                .await;
                got = r.status.as_u16();
                if got != 503 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(got, want, "key {key}");
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

// === TLS ===

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("gw-sec-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "bitnet test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Issue a certificate for localhost/127.0.0.1 named `cn` into `name.crt`/`name.key`.
    fn issue(&self, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn https_get(ca: &Path, url: &str) -> Result<(u16, String), String> {
    let tls = gateway::tls::upstream_tls(Some(ca)).map_err(|e| e.to_string())?;
    let client =
        gateway::forward::UpstreamClient::new(tls, Duration::from_secs(5), Duration::from_secs(4));
    let resp = client
        .request(Request::get(url).body(Bytes::new()).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The subject CN the server at `addr` presents.
async fn served_cn(ca: &Path, addr: &str) -> String {
    use rustls::pki_types::ServerName;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    // The CN is plain text inside the DER; find which of our names it is.
    let text = String::from_utf8_lossy(&der);
    ["first-cert", "second-cert"]
        .iter()
        .find(|n| text.contains(**n))
        .unwrap_or(&"?")
        .to_string()
}

use rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_https_and_reloads_its_certificate_on_sighup() {
    let pki = Pki::new("https");
    let (cert, key) = pki.issue("server", "first-cert");
    let be = FakeBackend::start("a", 1, ok).await;
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--health-interval",
        "0.05",
        "--backend",
        &be.url(),
        "--tls-cert",
    ])
    .arg(&cert)
    .arg("--tls-key")
    .arg(&key);
    let (mut child, base) = spawn_gateway(cmd);
    assert!(base.starts_with("https://"), "{base}");
    let addr = base.trim_start_matches("https://").to_string();
    let mut health = Err(String::new());
    for _ in 0..100 {
        health = https_get(
            &pki.ca_path(),
            &format!(
                "https://localhost:{}/health",
                addr.rsplit(':').next().unwrap()
            ),
        )
        .await;
        if matches!(health, Ok((200, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health.as_ref().map(|h| h.0), Ok(200), "{health:?}");
    // Plain HTTP to the TLS port gets nothing useful.
    assert!(https_get(&pki.ca_path(), &format!("http://{addr}/health"))
        .await
        .is_err());
    assert_eq!(served_cn(&pki.ca_path(), &addr).await, "first-cert");

    // A broken replacement is refused and the old certificate stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    child.signal(Signal::SIGHUP).unwrap();
    assert!(
        child
            .wait_for_line(
                |l| l.contains("certificate not reloaded"),
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        child.output_so_far()
    );
    assert_eq!(served_cn(&pki.ca_path(), &addr).await, "first-cert");
    // A good replacement is served to new connections.
    let (c2, k2) = pki.issue("server2", "second-cert");
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    child.signal(Signal::SIGHUP).unwrap();
    assert!(child
        .wait_for_line(|l| l.contains("config reloaded"), Duration::from_secs(5))
        .is_some());
    assert_eq!(served_cn(&pki.ca_path(), &addr).await, "second-cert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_is_verified_against_the_configured_ca() {
    let pki = Pki::new("upstream");
    let (cert, key) = pki.issue("backend", "first-cert");
    let be = FakeBackend::start("a", 2, ok).await;
    // The "https backend" is a TLS gateway in front of the fake backend.
    let inner = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let tls_gw = TestGateway::start(&format!("{inner}{}", config_for(&[be.url()], ""))).await;
    let https_url = format!("https://localhost:{}", tls_gw.addr.port());
    let outer = format!("[upstream]\nca_file = \"{}\"\n", pki.ca_path().display());
    let gw = TestGateway::over(std::slice::from_ref(&https_url), &outer).await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(be.count(), 1);
    // Without the CA, the backend's certificate is refused.
    let other = Pki::new("other");
    let wrong = format!(
        "[upstream]\nca_file = \"{}\"\n[health]\ninterval_secs = 60\n",
        other.ca_path().display()
    );
    let config = gateway::config::RawConfig::from_toml(&config_for(&[https_url], &wrong))
        .unwrap()
        .validate()
        .unwrap();
    let gw2 = gateway::Gateway::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(gateway::serve(
        listener,
        gw2.clone(),
        std::future::pending(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = post_json(
        &format!("http://{addr}/v1/chat/completions"),
        &chat(1, false),
    )
    .await;
    assert!(got.status.as_u16() >= 500, "{}", got.status);
    assert_eq!(
        be.count(),
        1,
        "nothing reached the backend through an unverified connection"
    );
    task.abort();
}

#[tokio::test]
async fn a_body_nested_too_deep_is_refused_before_any_backend_sees_it() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    // A tool schema nested 200 levels deep, the shape that makes a backend recurse.
    let deep = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{}{{}}{}}}}}]}}"#,
        r#"{"type":"object","properties":{"x":"#.repeat(100),
        "}}".repeat(100)
    );
    let refused = post_json(&url, &deep).await;
    refused.assert_openai_error(400, "invalid_request");
    assert!(refused.text().contains("levels deep"), "{}", refused.text());
    assert_eq!(be.count(), 0, "the backend saw the request");
    // The same schema twenty levels deep goes through.
    let shallow = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{}{{}}{}}}}}]}}"#,
        r#"{"type":"object","properties":{"x":"#.repeat(10),
        "}}".repeat(10)
    );
    assert_eq!(post_json(&url, &shallow).await.status, 200);
    assert_eq!(be.count(), 1);
}
