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
    let idle: Idle = Rc::default();
    hyper_relay::run("hyper-relay", move |stream, upstream| {
        let idle = idle.clone();
        async move {
            let service = hyper::service::service_fn(move |req| relay(req, idle.clone(), upstream));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
}
