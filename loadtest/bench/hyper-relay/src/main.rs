//! hyper-relay UPSTREAM: the least a hyper-based HTTP/1.1 reverse proxy can do.
//!
//! One thread, hyper's server in front and hyper's client behind, a stack of idle upstream
//! connections, and the body relayed frame by frame. No routing, admission, accounting,
//! metrics, logging, timeouts or error mapping. proxy-overhead.sh runs it beside the gateway
//! and nginx so that the gateway's figures can be split into what hyper costs and what the
//! gateway's own work costs.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Idle = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

async fn relay(
    mut req: Request<Incoming>,
    idle: Idle,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    // A connection that can carry a request now. One still reading an earlier response's
    // body stays on the stack for later: waiting for it would hold this request behind a
    // whole stream, seconds long when the backend generates tokens.
    let popped = {
        let mut idle = idle.borrow_mut();
        idle.retain(|c| !c.is_closed());
        idle.iter()
            .rposition(|c| c.is_ready())
            .map(|i| idle.swap_remove(i))
    };
    let mut conn = match popped {
        Some(conn) => conn,
        None => {
            let stream = tokio::net::TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (conn, driver) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(driver);
            conn
        }
    };
    conn.ready().await?;
    // The client sent origin-form (`/v1/...`); so does this to the upstream.
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    *req.uri_mut() = path;
    let response = conn.send_request(req).await;
    // Back on the stack as soon as the head is in; it is ready again once this response's
    // body has been read.
    idle.borrow_mut().push(conn);
    Ok(response?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upstream: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(addr)) => addr,
        _ => {
            eprintln!("usage: hyper-relay UPSTREAM_HOST:PORT   (listens on 127.0.0.1, port 0)");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        // The backlog the gateway and llama-sim ask for: a crowd of a thousand connects (the
        // fan-out's closed runs) must not overflow it and wait a second for a SYN retry.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(4096)?;
        println!("listening on http://{}", listener.local_addr()?);
        let idle: Idle = Rc::default();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let idle = idle.clone();
            tokio::task::spawn_local(async move {
                let service =
                    hyper::service::service_fn(move |req| relay(req, idle.clone(), upstream));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
