//! What the relays of this package share: the command line, one thread, and a listener that
//! gives each accepted connection a task of its own.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Reads `UPSTREAM_HOST:PORT` from the command line, listens on 127.0.0.1 port 0 (printing
/// the address, which the benchmark scripts read back) and runs `serve(connection, upstream)`
/// as a task of its own for every connection, all on one thread.
pub fn run<F, Fut>(name: &str, serve: F) -> Result<(), Box<dyn Error>>
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let upstream: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(addr)) => addr,
        _ => {
            eprintln!("usage: {name} UPSTREAM_HOST:PORT   (listens on 127.0.0.1, port 0)");
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
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::task::spawn_local(serve(stream, upstream));
        }
    })
}
