//! Whether a listening socket's backlog holds a burst of connections.
//!
//! A connection the kernel cannot queue has its SYN dropped and connects a second later, on
//! the client's retransmission: a burst of clients that overflows a listener shows up as a
//! one-second step in their latency, far from where it was caused.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;

/// Opens `burst` connections to `addr` at once (capped at `net.core.somaxconn`, the kernel's
/// limit on any backlog) while nothing accepts them, and returns how many did not connect
/// within 700 ms, i.e. waited for a retransmission. The listener must not be accepting.
pub async fn connects_left_waiting(addr: SocketAddr, burst: usize) -> usize {
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(4096);
    let burst = burst.min(cap);
    let mut connects = JoinSet::new();
    for _ in 0..burst {
        connects.spawn(tokio::time::timeout(
            Duration::from_millis(700),
            tokio::net::TcpStream::connect(addr),
        ));
    }
    // Held until every connect is done, so that none is refused for another's close.
    let mut open = Vec::new();
    let mut late = 0;
    while let Some(done) = connects.join_next().await {
        match done.expect("the connect task ran") {
            Ok(stream) => open.push(stream.expect("connected")),
            Err(_) => late += 1,
        }
    }
    late
}
