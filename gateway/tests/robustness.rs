//! Limits against bad clients, backpressure, bad backends, and a flood of malformed input.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use testkit::fake_backend::{FakeBackend, Reply, StreamHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_some(sock: &mut TcpStream, within: Duration) -> String {
    let mut buf = vec![0u8; 8192];
    match tokio::time::timeout(within, sock.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Ok(Err(_)) => String::new(),
        Err(_) => panic!("no answer within {within:?}"),
    }
}

/// What the gateway sends before it closes or answers, checking it took at least 250 ms
/// (the tests' timeouts are 0.3 s).
async fn answer_after_the_timeout(sock: &mut TcpStream) -> String {
    let t = Instant::now();
    let answer = read_some(sock, Duration::from_secs(3)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        t.elapsed()
    );
    answer
}

/// A streamed chat request as raw HTTP/1.1, for tests that hold the client's socket.
fn streamed_chat_request() -> String {
    let body = chat(0, true);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn ok(_: &testkit::fake_backend::Seen) -> Reply {
    Reply::Json(200, completion_json("fine"))
}

#[tokio::test]
async fn connections_over_the_limit_get_a_503_and_the_limit_frees_up() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nmax_connections = 2").await;
    let a = TcpStream::connect(gw.addr).await.unwrap();
    let _b = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    let answer = read_some(&mut c, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = get(&gw.url("/health")).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nmax_header_bytes = 8192").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let big = "x".repeat(20_000);
    let req = format!("GET /health HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let answer = read_some(&mut s, Duration::from_secs(2)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert!(!answer.starts_with("HTTP/1.1 200"));
    // A normal head still works.
    assert_eq!(get(&gw.url("/health")).await.status, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nheader_read_timeout_secs = 0.3").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let answer = answer_after_the_timeout(&mut s).await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nheader_read_timeout_secs = 0.3").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_some(&mut s, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let t = Instant::now();
    let after = read_some(&mut s, Duration::from_secs(3)).await;
    assert!(
        after.is_empty(),
        "expected the server to close the idle connection: {after}"
    );
    assert!(t.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_slow_reader_slows_the_backend_instead_of_filling_memory() {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(streamed_chat_request().as_bytes())
        .await
        .unwrap();
    let stream = be.next_stream().await;
    // The backend pushes 64 KiB chunks as fast as it is allowed to.
    let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024 - 8)));
    let pusher = tokio::spawn(async move {
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), stream.send(chunk.clone())).await
            {
                Ok(true) => sent += chunk.len(),
                Ok(false) => break,
                Err(_) => {} // blocked: flow control is holding the backend back
            }
        }
        sent
    });
    // The client reads one byte every 100 ms.
    let mut read = 0;
    let mut byte = [0u8; 1];
    for _ in 0..30 {
        read += s.read(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = pusher.await.unwrap();
    // Loopback moves gigabytes in 3 s; only socket buffers may sit between the two ends.
    assert!(read > 0);
    assert!(
        sent < 32 * 1024 * 1024,
        "the backend pushed {sent} bytes to a client that read {read}"
    );
    eprintln!(
        "backend sent {} KiB while the client read {read} bytes",
        sent / 1024
    );
}

#[tokio::test]
async fn a_backend_that_hangs_before_the_first_byte_times_out_and_fails_over() {
    let hung = FakeBackend::start("hung", 4, |_| {
        Reply::Held(Box::new(Reply::Json(200, "{}".into())))
    })
    .await;
    let good = FakeBackend::start("good", 1, ok).await;
    let gw = TestGateway::over(
        &[hung.url(), good.url()],
        "[upstream]\nfirst_byte_timeout_secs = 0.3\n[health]\ninterval_secs = 60",
    )
    .await;
    let t = Instant::now();
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.headers["x-fake-backend"], "good");
    assert!(t.elapsed() >= Duration::from_millis(300));
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(
        metrics.contains("kind=\"first_byte_timeout\"} 1"),
        "{metrics}"
    );
    hung.release(100);
}

#[tokio::test]
async fn the_last_attempt_timing_out_is_an_openai_504() {
    let hung = FakeBackend::start("hung", 1, |_| {
        Reply::Held(Box::new(Reply::Json(200, "{}".into())))
    })
    .await;
    let gw = TestGateway::over(
        &[hung.url()],
        "[upstream]\nfirst_byte_timeout_secs = 0.2\nmax_attempts = 1",
    )
    .await;
    post_json(&gw.url("/v1/chat/completions"), &chat(0, false))
        .await
        .assert_openai_error(504, "upstream_timeout");
    hung.release(100);
}

/// A streamed chat through a gateway with a 0.3 s idle timeout, to a backend whose stream
/// the test writes: the backend and gateway (kept alive), the client's pending answer, and
/// the backend's side of the stream.
async fn stream_under_an_idle_timeout() -> (
    FakeBackend,
    TestGateway,
    tokio::task::JoinHandle<Got>,
    StreamHandle,
) {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "[upstream]\nidle_timeout_secs = 0.3").await;
    let url = gw.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { post_json(&url, &chat(0, true)).await });
    let stream = be.next_stream().await;
    (be, gw, waiting, stream)
}

#[tokio::test]
async fn a_backend_that_hangs_mid_stream_is_cut_by_the_idle_timeout() {
    let (_be, gw, waiting, stream) = stream_under_an_idle_timeout().await;
    assert!(stream.send("data: {\"n\":1}\n\n").await);
    // ...and then silence, with the connection open.
    let got = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("cut within 3 s")
        .unwrap();
    let text = got.text();
    assert!(text.starts_with("data: {\"n\":1}\n\n"), "{text}");
    assert!(text.contains("upstream_stream_broken"), "{text}");
    gw.wait_until(|g| g.pools()[0].backends()[0].inflight() == 0)
        .await;
    drop(stream);
}

#[tokio::test]
async fn a_stream_longer_than_the_idle_timeout_but_never_that_silent_is_not_cut() {
    let (_be, _gw, waiting, stream) = stream_under_an_idle_timeout().await;
    // Eight pieces 0.15 s apart: 1.2 s in all, four idle timeouts' worth, but never 0.3 s of
    // silence. The idle timer fires and is re-armed from the last data several times.
    for n in 0..8 {
        assert!(
            stream.send(format!("data: {{\"n\":{n}}}\n\n")).await,
            "piece {n} was not taken"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(stream.send("data: [DONE]\n\n").await);
    drop(stream);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("done within 5 s")
        .unwrap();
    let text = got.text();
    for n in 0..8 {
        assert!(text.contains(&format!("data: {{\"n\":{n}}}\n\n")), "{text}");
    }
    assert!(!text.contains("upstream_stream_broken"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn a_backend_that_answers_garbage_gets_an_openai_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let garbage = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let answer: &[u8] =
                    if req.starts_with("GET /health") || req.starts_with("GET /props") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"
                    } else {
                        b"\x00\x01 this is not HTTP at all\r\n\r\n"
                    };
                let _ = s.write_all(answer).await;
            });
        }
    });
    let gw = TestGateway::over(&[format!("http://{addr}")], "[health]\ninterval_secs = 60").await;
    post_json(&gw.url("/v1/chat/completions"), &chat(0, false))
        .await
        .assert_openai_error(502, "upstream_error");
    garbage.abort();
}

#[tokio::test]
async fn a_backend_killed_mid_stream_leaves_other_streams_untouched() {
    let dying = FakeBackend::start("dying", 1, |_| Reply::Controlled).await;
    let steady = FakeBackend::start("steady", 1, |_| Reply::Controlled).await;
    let mut gw =
        TestGateway::over(&[dying.url(), steady.url()], "[health]\ninterval_secs = 60").await;
    let (u1, u2) = (
        gw.url("/v1/chat/completions"),
        gw.url("/v1/chat/completions"),
    );
    let first = tokio::spawn(async move { post_json(&u1, &chat(0, true)).await });
    let s1 = tokio::select! { s = dying.next_stream() => (s, true), s = steady.next_stream() => (s, false) };
    let second = tokio::spawn(async move { post_json(&u2, &chat(1, true)).await });
    let (s1, first_on_dying) = s1;
    let s2 = if first_on_dying {
        steady.next_stream().await
    } else {
        dying.next_stream().await
    };
    let (die, live) = if first_on_dying { (s1, s2) } else { (s2, s1) };
    assert!(live.send("data: {\"live\":1}\n\n").await);
    assert!(die.send("data: {\"die\":1}\n\n").await);
    die.break_connection().await;
    assert!(live.send("data: {\"live\":2}\n\n").await);
    assert!(live.send("data: [DONE]\n\n").await);
    drop(live);
    let (a, b) = (first.await.unwrap(), second.await.unwrap());
    let (dead_text, live_text) = if a.text().contains("die") {
        (a.text(), b.text())
    } else {
        (b.text(), a.text())
    };
    assert!(dead_text.contains("upstream_stream_broken"), "{dead_text}");
    assert_eq!(
        live_text,
        "data: {\"live\":1}\n\ndata: {\"live\":2}\n\ndata: [DONE]\n\n"
    );
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(metrics.contains("kind=\"broken_stream\"} 1"), "{metrics}");
    gw.shutdown().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Send one malformed request of kind `i % 8` on a fresh raw connection, or through the
/// keep-alive client; the gateway must answer (or close) and keep serving.
async fn malformed(gw: &TestGateway, client: &TestClient, i: usize) {
    let url = gw.url("/v1/chat/completions");
    let body: Vec<u8> = match i % 8 {
        0 => b"{\"model\":\"m\",".to_vec(),
        1 => br#"{"model":["m"],"stream":"yes"}"#.to_vec(),
        2 => format!(r#"{{"model":"{}"}}"#, "m".repeat(100_000)).into_bytes(),
        3 => b"{\"model\":\"\xff\xfe\xfd\"}".to_vec(),
        4 => b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
            .repeat(50)
            .to_vec(),
        5 => {
            // Bad chunked encoding, raw.
            let mut s = TcpStream::connect(gw.addr).await.unwrap();
            let _ = s
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nZZZ\r\nnot hex\r\n")
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut [0u8; 512])).await;
            return;
        }
        6 => {
            // A head that is not HTTP.
            let mut s = TcpStream::connect(gw.addr).await.unwrap();
            let _ = s.write_all(b"\x16\x03\x01\x02\x00 garbage\r\n\r\n").await;
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut [0u8; 512])).await;
            return;
        }
        _ => br#"{"model":"m","messages":"not a list","max_tokens":-1}"#.to_vec(),
    };
    let resp = client.request(post(&url, body)).await.unwrap();
    let status = resp.status().as_u16();
    let _ = read(resp).await;
    // 2 names an unknown (huge) model: 404; 7 is valid JSON for routing: it reaches the
    // backend, which answers 200.
    let expected = match i % 8 {
        2 => 404,
        7 => 200,
        _ => 400,
    };
    assert_eq!(status, expected, "kind {}", i % 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_requests_leave_the_gateway_serving_with_flat_memory() {
    let be = FakeBackend::start("a", 4, ok).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let client = client();
    for i in 0..1000 {
        malformed(&gw, &client, i).await;
    }
    let warm = rss_kib();
    for i in 1000..10_000 {
        malformed(&gw, &client, i).await;
    }
    let after = rss_kib();
    assert_eq!(get(&gw.url("/health")).await.status, 200);
    assert_eq!(
        post_json(&gw.url("/v1/chat/completions"), &chat(0, false))
            .await
            .status,
        200
    );
    eprintln!("RSS after 1,000 malformed requests: {warm} KiB; after 10,000: {after} KiB");
    assert!(
        after < warm + 32 * 1024,
        "memory grew from {warm} KiB to {after} KiB"
    );
    gw.wait_until(|g| g.pools()[0].backends()[0].inflight() == 0)
        .await;
}

#[tokio::test]
async fn a_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nheader_read_timeout_secs = 0.3").await;
    // Nothing at all, and the first byte of the HTTP/2 preface: both leave the server
    // waiting to tell HTTP/1 from HTTP/2, where hyper has no timer of its own.
    for sent in [&b""[..], b"P"] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let answer = answer_after_the_timeout(&mut s).await;
        assert!(answer.is_empty(), "{answer}");
    }
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_a_408() {
    let be = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nbody_read_timeout_secs = 0.3").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mo",
    )
    .await
    .unwrap();
    let answer = answer_after_the_timeout(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert_eq!(be.seen().len(), 0, "nothing reached the backend");
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_off_and_its_slot_freed() {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nsend_timeout_secs = 0.5").await;
    // A small receive buffer, so that the gateway's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    s.write_all(streamed_chat_request().as_bytes())
        .await
        .unwrap();
    let stream = be.next_stream().await;
    gw.wait_until(|_| gw.inflight(0) == 1).await;
    let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024 - 8)));
    let pusher = tokio::spawn(async move {
        // Until the gateway stops reading (its write to the client is blocked) and then
        // closes the backend connection (it gave up on the client).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let sent = tokio::time::timeout(Duration::from_millis(100), stream.send(chunk.clone()));
            if let Ok(false) = sent.await {
                return true;
            }
        }
        false
    });
    let t = Instant::now();
    gw.wait_until(|_| gw.inflight(0) == 0).await;
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert!(pusher.await.unwrap(), "the backend's stream was not closed");
    drop(s);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_not_while_a_stream_runs() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nheader_read_timeout_secs = 0.3").await;
    // HTTP/2 with prior knowledge, the way an h2c client talks to a plain-text gateway.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat(0, true))))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // A stream that runs for a second, three times the idle limit.
    let stream = be.next_stream().await;
    let reader = tokio::spawn(resp.into_body().collect());
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(stream.send(format!("data: {{\"n\":{i}}}\n\n")).await);
    }
    drop(stream);
    let body = reader.await.unwrap().expect("the whole stream").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("\"n\":4"), "the stream was cut: {body}");
    assert!(!conn.is_finished(), "closed while a stream was running");
    // Then nothing: the gateway closes the connection, pings answered or not.
    let t = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "an idle HTTP/2 connection stayed open: {closed:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

/// Speaks just enough HTTP/2 to open a connection and start no stream: the client preface
/// and empty SETTINGS, then only reads, answering the server's pings if `answer_pings`.
/// Returns the type of every frame the gateway sent before it closed, and how long that
/// took.
async fn a_silent_http2_client(
    addr: std::net::SocketAddr,
    answer_pings: bool,
) -> (Vec<u8>, Duration) {
    const PING: u8 = 0x6;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let t = Instant::now();
    let mut types = Vec::new();
    let mut header = [0u8; 9];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut header))
            .await
            .expect("the gateway closed the connection within 5 s");
        if read.is_err() {
            return (types, t.elapsed());
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("a whole frame");
        types.push(header[3]);
        let is_ack = header[4] & 0x1 != 0;
        if answer_pings && header[3] == PING && !is_ack {
            let mut ack = vec![0, 0, 8, PING, 0x1, 0, 0, 0, 0];
            ack.extend_from_slice(&payload);
            tcp.write_all(&ack).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_silent_http2_connection_is_told_goaway_before_it_is_closed() {
    const GOAWAY: u8 = 0x7;
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(&[be.url()], "[limits]\nheader_read_timeout_secs = 0.3").await;

    // A client that answers the GOAWAY's ping is closed as soon as it has.
    let (frames, took) = a_silent_http2_client(gw.addr, true).await;
    assert!(
        frames.contains(&GOAWAY),
        "closed without a GOAWAY; frames: {frames:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(550),
        "closed after {took:?}, not at the 0.3 s timeout"
    );

    // One that does not answer is told too, and cut after a further 0.3 s.
    let (frames, took) = a_silent_http2_client(gw.addr, false).await;
    assert!(
        frames.contains(&GOAWAY),
        "closed without a GOAWAY; frames: {frames:?}"
    );
    assert!(took >= Duration::from_millis(550), "cut after {took:?}");
    assert_eq!(be.count(), 0);
}

#[tokio::test]
async fn one_http2_connection_has_at_most_128_requests_in_progress() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    // Slots for all of them, so that nothing waits in the gateway's queue.
    let be = FakeBackend::start("a", 200, held()).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..150 {
        let mut send = send.clone();
        let req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(chat(i, false))))
            .unwrap();
        requests.spawn(async move {
            let resp = send.send_request(req).await.expect("an answer");
            let status = resp.status();
            resp.into_body().collect().await.expect("a body");
            status
        });
    }
    wait_for(|| be.active() == 128).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(be.active(), 128, "more streams than the limit got through");
    // The rest go through as streams end.
    be.release(150);
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(be.count(), 150);
}

#[tokio::test]
async fn request_bodies_held_in_memory_stay_within_their_budget() {
    let be = FakeBackend::start("a", 4, held()).await;
    let gw = TestGateway::over(
        &[be.url()],
        // No context guard: it would ask the held backend to count these long prompts.
        "max_body_bytes = 20000\n[limits]\nmax_buffered_body_bytes = 45000\n[compat]\ncontext_guard = false",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let big = |i: usize| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"request {i} {}"}}]}}"#,
            "x".repeat(19_000)
        )
    };
    // Two large bodies wait for their backend's answer, holding about 38 KB of 45.
    let mut held_requests = tokio::task::JoinSet::new();
    for i in 0..2 {
        let (url, body) = (url.clone(), big(i));
        held_requests.spawn(async move { post_json(&url, &body).await.status });
    }
    wait_for(|| be.active() == 2).await;
    // A third would go over: refused at once, before the backend sees it.
    let refused = tokio::time::timeout(Duration::from_secs(5), post_json(&url, &big(2)))
        .await
        .expect("refused at once, not held by the backend");
    refused.assert_openai_error(503, "request_bytes_limit");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(be.count(), 2);
    // A small one still fits.
    let small = {
        let url = url.clone();
        tokio::spawn(async move { post_json(&url, &chat(3, false)).await.status })
    };
    wait_for(|| be.active() == 3).await;
    // Once answered, their bytes are free again.
    be.release(3);
    while let Some(status) = held_requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(small.await.unwrap(), 200);
    be.release(1);
    assert_eq!(post_json(&url, &big(4)).await.status, 200);
}
