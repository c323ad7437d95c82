//! Several gateways in front of the same backends, and backends found through DNS.

mod common;

use std::time::Duration;

use common::*;
use loadtest::sim::{serve as sim_serve, Dialect, SimConfig};
use testkit::fake_backend::{FakeBackend, Reply};

async fn sim(slots: usize) -> (String, tokio::task::JoinHandle<()>) {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.slots = slots;
    cfg.time_scale = 0.05;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = sim_serve(listener, cfg, std::future::pending()).await;
    });
    (url, task)
}

fn chat_tokens(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hello there"}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_avoids_the_backend_the_first_one_keeps_busy() {
    let (x, tx) = sim(1).await;
    let (y, ty) = sim(1).await;
    let extra = "[health]\ninterval_secs = 0.05\nload_interval_secs = 0.05";
    let a = TestGateway::over(&[x.clone(), y.clone()], extra).await;
    let b = TestGateway::over(&[x.clone(), y.clone()], extra).await;

    // Gateway A starts a long generation (about 5 s at this time scale) on one backend.
    let url = a.url("/v1/chat/completions");
    let long = tokio::spawn(async move { post_json(&url, &chat_tokens(2000)).await });
    a.wait_until(|g| g.pools()[0].backends().iter().any(|b| b.inflight() == 1))
        .await;
    let busy = a.gw.pools()[0]
        .backends()
        .iter()
        .position(|b| b.inflight() == 1)
        .unwrap();
    let busy_name = a.gw.pools()[0].backends()[busy].name.clone();

    // Gateway B has no request of its own there, but reads the backend's own load.
    b.wait_until(|g| g.pools()[0].backends()[busy].busy() == 1)
        .await;
    for _ in 0..6 {
        let got = post_json(&b.url("/v1/chat/completions"), &chat_tokens(3)).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_ne!(
            got.headers["x-backend"],
            busy_name.as_str(),
            "B sent work to the backend A keeps busy"
        );
    }
    assert_eq!(long.await.unwrap().status, 200);
    tx.abort();
    ty.abort();
}

#[tokio::test]
async fn backends_are_discovered_from_every_address_a_name_resolves_to() {
    let be = FakeBackend::start("a", 2, |_| Reply::Json(200, completion_json("hi"))).await;
    let port = be.url().rsplit(':').next().unwrap().to_string();
    let toml = format!(
        "[health]\ninterval_secs = 0.05\n[discovery]\ninterval_secs = 0.05\n[[models]]\nid = \"m\"\ndns = \"localhost:{port}\"\n"
    );
    let config = gateway::config::RawConfig::from_toml(&toml)
        .unwrap()
        .validate()
        .unwrap();
    let gw = gateway::Gateway::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(gateway::serve(listener, gw.clone(), std::future::pending()));
    let want = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !gw.pools()[0]
        .backends()
        .iter()
        .any(|b| b.name == want && b.health() == gateway::backend::Health::Up)
    {
        assert!(tokio::time::Instant::now() < deadline, "not discovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = post_json(
        &format!("http://{addr}/v1/chat/completions"),
        &chat(0, false),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["x-backend"], want.as_str());
    let health = get(&format!("http://{addr}/health")).await.json();
    let names: Vec<&str> = health["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&want.as_str()), "{names:?}");
    server.abort();
}
