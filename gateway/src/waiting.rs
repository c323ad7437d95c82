//! Streams that wait in the queue: answer at once, and say so while waiting.
//!
//! A streaming request that has to queue would otherwise see nothing at all for as long as
//! it waits, which on CPU backends can be minutes: long enough for a proxy or a client to
//! give up on an idle connection, and for a human to wonder whether anything is happening.
//! With `[queue] sse_comments_secs` set, such a request gets its `200 text/event-stream`
//! head as soon as it joins the queue, then an SSE comment every interval,
//!
//! ```text
//! : queued position=3 eta=41s
//! ```
//!
//! which SSE clients ignore, and then the backend's stream, untouched. The price is that
//! the status is sent before the outcome is known: a request that then fails (queue
//! timeout, backend error) gets its OpenAI error object as a `data:` event, which is how
//! OpenAI streams report errors. Requests that do not queue are not affected.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame};

use crate::body::{BoxError, GatewayBody};
use crate::error::GatewayError;
use crate::forward::{forward, Outbound};
use crate::metrics::Metrics;
use crate::pool::ModelPool;
use crate::state::Gateway;

/// The forwarding of one request, owned so that the response body can carry it.
type Forwarding = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, GatewayError>> + Send>>;

/// Most bytes of a non-streamed answer turned into a `data:` event.
const MAX_WRAPPED: usize = 64 * 1024;

/// Forward a streaming request; if it has to wait in the queue, answer at once with a
/// stream of `: queued` comments every `every`, followed by the backend's stream.
pub async fn forward_streaming(
    gw: Arc<Gateway>,
    pool: Arc<ModelPool>,
    mut out: Outbound,
    every: Duration,
) -> Result<Response<GatewayBody>, GatewayError> {
    let place = Arc::new(AtomicU64::new(0));
    out.place = Some(place.clone());
    let request_id = out.request_id.clone();
    let endpoint = out.endpoint;
    let metrics = gw.metrics.clone();
    let pool_for_body = pool.clone();
    let mut fut: Forwarding = Box::pin(async move { forward(&gw, &pool, out).await });
    // Drive the forwarding until it either answers or joins the queue (admission records
    // the queue id synchronously, before it starts waiting).
    let answered = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending if place.load(Ordering::Acquire) != 0 => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await;
    if let Some(r) = answered {
        return r;
    }
    let body = WaitingBody {
        fut: Some(fut),
        inner: None,
        wrap: None,
        tail: None,
        done: false,
        sent_first: false,
        tick: Box::pin(tokio::time::sleep(every)),
        every,
        place,
        pool: pool_for_body,
        metrics,
        request_id,
        endpoint,
    };
    let mut resp = Response::new(GatewayBody::Waiting {
        inner: Box::new(body),
    });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(resp)
}

/// The body of a stream that began while its request was queued.
pub struct WaitingBody {
    fut: Option<Forwarding>,
    /// The backend's stream, once it answered.
    inner: Option<GatewayBody>,
    /// A non-stream answer being read whole, to send as one `data:` event.
    wrap: Option<(GatewayBody, BytesMut)>,
    /// A last frame to send before ending.
    tail: Option<Bytes>,
    done: bool,
    sent_first: bool,
    tick: Pin<Box<tokio::time::Sleep>>,
    every: Duration,
    place: Arc<AtomicU64>,
    pool: Arc<ModelPool>,
    metrics: Arc<Metrics>,
    request_id: String,
    endpoint: &'static str,
}

impl std::fmt::Debug for WaitingBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingBody")
            .field("request_id", &self.request_id)
            .field("answered", &self.fut.is_none())
            .finish()
    }
}

impl WaitingBody {
    /// The comment for where the request stands now.
    fn comment(&self) -> Bytes {
        let id = self.place.load(Ordering::Acquire);
        let status = id.checked_sub(1).and_then(|id| self.pool.queue_status(id));
        Bytes::from(match status {
            Some((position, Some(eta))) => {
                format!(": queued position={position} eta={}s\n\n", eta.as_secs())
            }
            Some((position, None)) => format!(": queued position={position}\n\n"),
            // Out of the queue: the backend is evaluating the prompt.
            None => ": started\n\n".to_string(),
        })
    }

    fn refused(&mut self, err: GatewayError) {
        tracing::info!(target: "access", request_id = %self.request_id, endpoint = self.endpoint,
            status = err.status().as_u16(), code = err.code(), error = %err,
            "queued stream refused by the gateway");
        self.metrics
            .requests
            .requests
            .with_label_values(&["", "", self.endpoint, err.status().as_str()])
            .inc();
        self.tail = Some(data_event(&err.body()));
    }
}

impl Body for WaitingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(t) = this.tail.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::data(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(inner) = this.inner.as_mut() {
                return Pin::new(inner).poll_frame(cx);
            }
            if let Some((body, buf)) = this.wrap.as_mut() {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            let room = MAX_WRAPPED.saturating_sub(buf.len());
                            buf.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                        let (_, buf) = this.wrap.take().expect("matched above");
                        this.tail = Some(wrap_answer(&buf));
                        continue;
                    }
                }
            }
            let Some(fut) = this.fut.as_mut() else {
                return Poll::Ready(None);
            };
            match fut.as_mut().poll(cx) {
                Poll::Ready(Ok(resp)) => {
                    this.fut = None;
                    let streams = resp.status() == StatusCode::OK
                        && resp
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("text/event-stream"));
                    let body = resp.into_body();
                    if streams {
                        this.inner = Some(body);
                    } else {
                        this.wrap = Some((body, BytesMut::new()));
                    }
                    continue;
                }
                Poll::Ready(Err(err)) => {
                    this.fut = None;
                    this.refused(err);
                    continue;
                }
                Poll::Pending => {}
            }
            let due = !this.sent_first || this.tick.as_mut().poll(cx).is_ready();
            if !due {
                return Poll::Pending;
            }
            this.sent_first = true;
            let next = tokio::time::Instant::now() + this.every;
            this.tick.as_mut().reset(next);
            return Poll::Ready(Some(Ok(Frame::data(this.comment()))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.tail.is_none()
    }
}

/// `data: BYTES\n\n`.
fn data_event(json: &[u8]) -> Bytes {
    let mut ev = Vec::with_capacity(json.len() + 8);
    ev.extend_from_slice(b"data: ");
    ev.extend_from_slice(json);
    ev.extend_from_slice(b"\n\n");
    Bytes::from(ev)
}

/// A non-stream answer (an error, usually) as one `data:` event: JSON re-written on one
/// line, since an SSE data line cannot hold a newline.
fn wrap_answer(body: &[u8]) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => data_event(v.to_string().as_bytes()),
        Err(_) => data_event(&crate::error::error_body(
            "the backend answered with something other than a stream",
            "server_error",
            "upstream_not_a_stream",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_stream_answer_becomes_one_data_event_on_one_line() {
        let ev = wrap_answer(b"{\n  \"error\": {\"message\": \"bad\"}\n}");
        assert_eq!(&ev[..], b"data: {\"error\":{\"message\":\"bad\"}}\n\n");
        let ev = wrap_answer(b"<html>");
        assert!(ev.starts_with(b"data: {\"error\""));
        assert!(ev.ends_with(b"\n\n"));
    }
}
