//! Deadlines on a client connection that the HTTP servers' own timers leave open.
//!
//! The gateway's HTTP/1 server side ([`crate::http1`]) bounds the time a client takes to
//! send a request head, between requests too, and [`crate::server`] bounds the read that
//! tells HTTP/1 from HTTP/2. That leaves two ways a client can hold a connection, and with
//! it a permit of `limits.max_connections` or a backend slot, for as long as it likes:
//!
//! - **Idle on HTTP/2.** hyper's HTTP/2 server has no idle timeout, and its keep-alive
//!   pings only find dead peers: a client that answers them keeps a connection with no
//!   streams open for ever.
//!
//!   [`Activity`] covers it: it counts a connection's requests until their response
//!   bodies end, and the connection's task closes it once none has been in progress for
//!   `limits.header_read_timeout_secs`, the same limit HTTP/1 keeps between requests.
//! - **While it does not read.** A response is written only as fast as the client reads it;
//!   when its socket buffer is full, the server stops polling the response body, so the
//!   relay's own idle timer is never looked at and the backend slot stays taken.
//!   [`SendDeadline`] fails a write that has made no progress for
//!   `limits.send_timeout_secs`, which ends the connection, drops the response body and
//!   frees the slot. It wraps the socket under both servers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What is in progress on one client connection: requests whose response has not ended.
///
/// Cloned into the connection's service, which calls [`Activity::start`] for each request;
/// the connection's task waits on [`Activity::idle`].
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityState>);

#[derive(Debug)]
struct ActivityState {
    /// When the connection was accepted: the origin of `last_end_ms`.
    born: Instant,
    /// Whether a request has ever started.
    started: AtomicBool,
    /// Requests started whose response body has not been dropped yet.
    open: AtomicUsize,
    /// Milliseconds from `born` to the end of the latest response.
    last_end_ms: AtomicU64,
}

/// Why a connection is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No request ever started.
    Silent,
    /// Requests came and all their responses have ended.
    Quiet,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Self {
        Activity(Arc::new(ActivityState {
            born: Instant::now(),
            started: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }))
    }

    /// A request has started; it is in progress until the returned guard is dropped, which
    /// the response body does when it ends or is abandoned.
    pub fn start(&self) -> InProgress {
        let state = &self.0;
        state.started.store(true, Ordering::Relaxed);
        state.open.fetch_add(1, Ordering::Relaxed);
        InProgress(self.clone())
    }

    /// Resolves once no request has been in progress for `within`: from the first poll
    /// when no request ever started (for TLS, the end of the handshake), else from the end
    /// of the latest response.
    ///
    /// A timer checked when it fires rather than reset by every request, so that requests
    /// cost two counter updates and a clock read; it is rearmed to the exact deadline, so
    /// the connection is never kept longer than `within` past its last response.
    pub async fn idle(self, within: Duration) -> Idle {
        let state = &self.0;
        let mut deadline = Instant::now() + within;
        loop {
            tokio::time::sleep_until(deadline).await;
            // Acquire pairs with the guard's release: an end seen as no longer open comes
            // with its time.
            if state.open.load(Ordering::Acquire) > 0 {
                deadline = Instant::now() + within;
                continue;
            }
            if !state.started.load(Ordering::Relaxed) {
                return Idle::Silent;
            }
            let last_end = Duration::from_millis(state.last_end_ms.load(Ordering::Relaxed));
            deadline = state.born + last_end + within;
            if deadline <= Instant::now() {
                return Idle::Quiet;
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// One request in progress on a connection; see [`Activity::start`].
#[derive(Debug)]
pub struct InProgress(Activity);

impl Drop for InProgress {
    fn drop(&mut self) {
        let state = &(self.0).0;
        let ended = u64::try_from(state.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        state.last_end_ms.fetch_max(ended, Ordering::Relaxed);
        state.open.fetch_sub(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in progress until it is dropped.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        progress: InProgress,
    }
}

impl<B> Tracked<B> {
    /// `body`, holding `progress`.
    pub fn new(body: B, progress: InProgress) -> Self {
        Tracked { body, progress }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
    async fn a_connection_with_no_request_is_silent_after_the_limit() {
        let started = Instant::now();
        let idle = Activity::new().idle(Duration::from_secs(3)).await;
        assert_eq!(idle, Idle::Silent);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_in_progress_keeps_the_connection_and_its_end_starts_the_count() {
        let activity = Activity::new();
        let t0 = Instant::now();
        let idle = tokio::spawn(activity.clone().idle(Duration::from_secs(3)));
        // A response that runs from 1 s to 10 s, far past the limit.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let progress = activity.start();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            !idle.is_finished(),
            "closed while a response was in progress"
        );
        drop(progress);
        assert_eq!(idle.await.unwrap(), Idle::Quiet);
        // Three seconds after the end, not at a later check.
        assert_eq!(t0.elapsed(), Duration::from_secs(13));
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_restarts_the_idle_count() {
        let activity = Activity::new();
        let t0 = Instant::now();
        let idle = tokio::spawn(activity.clone().idle(Duration::from_secs(3)));
        // Short requests every 2 s for 10 s: never 3 s without one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(activity.start());
        }
        assert!(!idle.is_finished());
        assert_eq!(idle.await.unwrap(), Idle::Quiet);
        assert_eq!(t0.elapsed(), Duration::from_secs(13));
    }
}
