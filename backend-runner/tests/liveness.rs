//! Liveness, driven in-process: the runner supervises a stand-in process (a shell script)
//! while a fake backend on the instance's port answers `/health` and `/slots` as the test
//! says. A slow `/health` gets an idle instance restarted, but not a busy one.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_runner::config::RawConfig;
use backend_runner::launch::Launcher;
use backend_runner::preflight::Plan;
use backend_runner::runner::RunnerState;
use backend_runner::{InstanceView, RunError, Runner, State};
use common::{TempDir, BIN};
use testkit::fake_backend::{FakeBackend, Reply};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longer than the probe timeout below: a probe of a slow `/health` fails.
const SLOW: Duration = Duration::from_secs(2);

struct Setup {
    fake: FakeBackend,
    busy: Arc<AtomicBool>,
    state: Arc<RunnerState>,
    stop: mpsc::Sender<()>,
    task: JoinHandle<Result<(), RunError>>,
    _dir: TempDir,
}

impl Setup {
    /// A runner supervising `script_body` as its one instance, probing the fake backend.
    async fn start(tag: &str, script_body: &str) -> Setup {
        Setup::start_with(tag, script_body, "interval_secs = 0.1", "").await
    }

    /// The same, with `health` lines for the probe interval and more `[restart]` lines.
    async fn start_with(tag: &str, script_body: &str, health: &str, restart: &str) -> Setup {
        let busy = Arc::new(AtomicBool::new(false));
        let slots_busy = busy.clone();
        let fake = FakeBackend::start("instance", 1, move |seen| match seen.path.as_str() {
            "/slots" => Reply::Json(
                200,
                format!(
                    r#"[{{"id":0,"is_processing":{}}}]"#,
                    slots_busy.load(Ordering::SeqCst)
                ),
            ),
            _ => Reply::Json(501, r#"{"error":{"message":"not here"}}"#.into()),
        })
        .await;
        let port = fake.url().rsplit(':').next().unwrap().to_owned();

        let dir = TempDir::new(tag);
        let script_body = script_body.replace("{dir}", dir.path().to_str().unwrap());
        let script = dir.script("llama-server", &script_body);
        let model = dir.write("model.gguf", "");
        let config = RawConfig::from_toml(&format!(
            r#"
            model = {model:?}
            [[instance]]
            port = {port}
            [health]
            startup_timeout_secs = 30
            {health}
            timeout_secs = 0.2
            failure_threshold = 3
            [restart]
            delay_secs = 0.1
            {restart}
            [stop]
            timeout_secs = 1
            "#
        ))
        .unwrap()
        .validate()
        .unwrap();
        // The fake backend already holds the port, so the preflight port check is skipped:
        // the plan is what it would have found.
        let plan = Plan {
            llama_server: script,
            cpus: vec![None],
        };
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let runner = Runner::start(&config, plan, Launcher::at(BIN), control).unwrap();
        let state = runner.state().clone();
        let (stop, signals) = mpsc::channel(1);
        let task = tokio::spawn(runner.run(signals));
        Setup {
            fake,
            busy,
            state,
            stop,
            task,
            _dir: dir,
        }
    }

    fn view(&self) -> InstanceView {
        self.state.views().remove(0)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.state
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&InstanceView) -> bool,
    ) -> InstanceView {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.view();
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shut_down(self) {
        self.stop.send(()).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("runner stops")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        drop(self.fake);
    }

    fn liveness_exits(&self) -> f64 {
        self.metric(r#"bitnet_runner_exits_total{instance="i0",reason="liveness"}"#)
            .unwrap()
    }
}

#[tokio::test]
async fn idle_instance_that_stops_answering_is_restarted() {
    let s = Setup::start("liveness-idle", "exec sleep 600").await;
    let ready = s
        .wait_for("ready", Duration::from_secs(10), |v| {
            v.state == State::Ready
        })
        .await;
    let first_pid = ready.pid.unwrap();

    s.fake.set_health_delay(SLOW);
    let after = s
        .wait_for("a new process", Duration::from_secs(10), |v| {
            v.pid.is_some_and(|p| p != first_pid)
        })
        .await;
    assert_eq!(after.restarts, 1);
    // Stopped the polite way: `sleep` dies of the SIGTERM.
    assert_eq!(after.last_exit.as_deref(), Some("signal 15"));
    assert_eq!(s.liveness_exits(), 1.0);

    s.fake.set_health_delay(Duration::ZERO);
    s.wait_for("ready again", Duration::from_secs(10), |v| {
        v.state == State::Ready
    })
    .await;
    s.shut_down().await;
}

#[tokio::test]
async fn busy_instance_with_slow_health_is_not_restarted_until_it_goes_idle() {
    let s = Setup::start("liveness-busy", "exec sleep 600").await;
    let ready = s
        .wait_for("ready", Duration::from_secs(10), |v| {
            v.state == State::Ready
        })
        .await;
    let pid = ready.pid.unwrap();

    s.busy.store(true, Ordering::SeqCst);
    s.fake.set_health_delay(SLOW);
    // Many probe intervals, every one failing, all while a slot is processing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = s.view();
    assert_eq!((v.state, v.pid, v.restarts), (State::Ready, Some(pid), 0));
    assert_eq!(s.liveness_exits(), 0.0);

    // The same stall with nothing in progress is a hang.
    s.busy.store(false, Ordering::SeqCst);
    s.wait_for("restart once idle", Duration::from_secs(10), |v| {
        v.restarts == 1
    })
    .await;
    assert_eq!(s.liveness_exits(), 1.0);
    s.shut_down().await;
}

#[tokio::test]
async fn instance_burning_cpu_is_not_restarted_for_a_slow_health() {
    // Computes without pause, like a server deep in prompt evaluation whose endpoints all
    // stall; only its CPU time shows it is alive.
    let s = Setup::start("liveness-cpu", "while :; do :; done").await;
    let ready = s
        .wait_for("ready", Duration::from_secs(10), |v| {
            v.state == State::Ready
        })
        .await;
    let pid = ready.pid.unwrap();

    s.fake.set_health_delay(SLOW);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = s.view();
    assert_eq!((v.state, v.pid, v.restarts), (State::Ready, Some(pid), 0));
    assert_eq!(s.liveness_exits(), 0.0);
    s.shut_down().await;
}

#[tokio::test]
async fn the_failure_count_resets_when_stable_not_at_the_next_probe() {
    // The first process dies soon after it is ready; the second stays. With probes a minute
    // apart, the reset after stable_secs must not wait for one.
    let s = Setup::start_with(
        "liveness-stable",
        "if [ -e {dir}/started ]; then exec sleep 600; fi\ntouch {dir}/started\nsleep 0.5\nkill -KILL $$",
        "interval_secs = 60",
        "stable_secs = 0.5",
    )
    .await;
    let failures = || s.metric(r#"bitnet_runner_instance_consecutive_failures{instance="i0"}"#);
    s.wait_for("ready again", Duration::from_secs(10), |v| {
        v.state == State::Ready && v.restarts == 1
    })
    .await;
    assert_eq!(failures(), Some(1.0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures() != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "no reset within 5 s of stable_secs 0.5"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.view().state, State::Ready);
    s.shut_down().await;
}
