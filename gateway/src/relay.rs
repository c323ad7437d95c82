//! Relay: pass a backend's response body to the client frame by frame, untouched.
//!
//! The [`RelayBody`] owns the request's [`SlotGuard`]. The slot is released the moment the
//! last frame passes, when the upstream fails, or when hyper drops the body because the
//! client went away, and never twice, because the guard is an `Option` taken once and its
//! `Drop` does the release. Dropping the upstream body mid-stream closes the backend
//! connection, which is how llama-server learns to stop generating.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::backend::Health;
use crate::body::BoxError;
use crate::error::error_body;
use crate::pool::SlotGuard;

pin_project_lite::pin_project! {
    /// A backend's body on its way to the client, holding the slot it occupies.
    pub struct RelayBody {
        #[pin]
        upstream: Incoming,
        guard: Option<SlotGuard>,
        // The response is an SSE stream: a broken upstream ends it with an error event
        // rather than a truncated message, because SSE clients read events, not framing.
        sse: bool,
        done: bool,
    }
}

impl RelayBody {
    /// Relay `upstream`, releasing `guard` when it ends.
    pub fn new(upstream: Incoming, guard: SlotGuard, sse: bool) -> RelayBody {
        RelayBody {
            upstream,
            guard: Some(guard),
            sse,
            done: false,
        }
    }
}

/// The SSE event that ends a stream whose backend broke after bytes reached the client.
pub fn broken_stream_event(backend: &str) -> Bytes {
    let body = error_body(
        &format!("the backend {backend} failed in the middle of the response"),
        "server_error",
        "upstream_stream_broken",
    );
    let mut ev = Vec::with_capacity(body.len() + 8);
    ev.extend_from_slice(b"data: ");
    ev.extend_from_slice(&body);
    ev.extend_from_slice(b"\n\n");
    Bytes::from(ev)
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.upstream.poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(g) = this.guard.as_ref() {
                    g.backend().touch_progress();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                *this.done = true;
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                *this.done = true;
                let guard = this.guard.take();
                let name = guard
                    .as_ref()
                    .map(|g| g.backend().name.clone())
                    .unwrap_or_default();
                if let Some(g) = &guard {
                    // A body that breaks mid-way almost always means the process died or
                    // the connection was cut; the prober re-admits it if it is fine.
                    if g.backend().set_health(Health::Down) != Health::Down {
                        tracing::warn!(backend = %name, error = %err, "backend broke mid-response; marked down");
                    }
                }
                drop(guard);
                if *this.sse {
                    Poll::Ready(Some(Ok(Frame::data(broken_stream_event(&name)))))
                } else {
                    Poll::Ready(Some(Err(Box::new(err))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.upstream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.upstream.size_hint()
        }
    }
}
