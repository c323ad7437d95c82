//! Deadlines on a client connection that hyper's own timers leave open.
//!
//! hyper bounds the time to send a request head between requests, but not two other ways a
//! client can hold a connection, and with it a permit of `limits.max_connections` or a
//! backend slot, for as long as it likes:
//!
//! - **Before its first request.** The server first reads up to 24 bytes to tell HTTP/1
//!   from HTTP/2, with no timer; a client that connects and sends nothing, or a prefix of
//!   the HTTP/2 preface, waits there for ever. [`FirstRequest`] closes a connection that has
//!   not started a request within `limits.header_read_timeout_secs`.
//! - **While it does not read.** A response is written only as fast as the client reads it;
//!   when its socket buffer is full, hyper stops polling the response body, so the relay's
//!   own idle timer is never looked at and the backend slot stays taken. [`SendDeadline`]
//!   fails a write that has made no progress for `limits.send_timeout_secs`, which ends the
//!   connection, drops the response body and frees the slot.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Set by the connection's service when its first request arrives.
#[derive(Debug, Clone, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    /// Note that a request has arrived.
    pub fn arrived(&self) {
        // Relaxed: only ever read by the same connection's task, after a wake-up.
        self.0.store(true, Ordering::Relaxed);
    }

    /// Resolves when `within` has passed and no request arrived; never otherwise.
    pub async fn missed(self, within: Duration) {
        tokio::time::sleep(within).await;
        if self.0.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }
}

/// A client stream whose writes fail once one has made no progress for `limit`.
pub struct SendDeadline<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is blocked; `None` while writes go through.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> SendDeadline<T> {
    /// `inner`, with writes bounded by `limit`.
    pub fn new(inner: T, limit: Duration) -> Self {
        SendDeadline {
            inner,
            limit,
            timer: None,
        }
    }

    /// The outcome of a write (or flush) that returned `result`: a blocked one arms the
    /// timer on its first refusal and fails when it fires; one that went through disarms
    /// it. The timer starts at the first refusal, not at each retry, so a client that
    /// reads nothing cannot keep it from firing by being polled often.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.timer = None;
            return result;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {} s", self.limit.as_secs_f64()),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_limit() {
        // A duplex pipe with a small buffer stands in for a socket whose peer reads nothing.
        let (near, _far) = tokio::io::duplex(16);
        let mut s = SendDeadline::new(near, Duration::from_secs(5));
        s.write_all(&[0; 16]).await.unwrap();
        let started = Instant::now();
        let err = s.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut s = SendDeadline::new(near, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            // Reads every 4 s, inside the 5 s limit, for 40 s in all.
            while total < 160 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                total += far.read(&mut buf).await.unwrap();
            }
            total
        });
        s.write_all(&[0; 160]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 160);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_a_request_is_not_closed_as_silent() {
        let first = FirstRequest::default();
        let missed = tokio::spawn(first.clone().missed(Duration::from_secs(3)));
        first.arrived();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!missed.is_finished());
        let silent = FirstRequest::default().missed(Duration::from_secs(3));
        tokio::time::timeout(Duration::from_secs(4), silent)
            .await
            .expect("a silent connection is closed after 3 s");
    }
}
