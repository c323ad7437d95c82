//! Response bodies: a whole answer at once, or a stream fed by a generation task.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use super::error::ApiError;

/// What a generation task hands to the connection.
#[derive(Debug)]
pub(crate) enum Msg {
    /// Bytes of the body, to be written as they are.
    Data(Bytes),
    /// Fail with an HTTP error instead; only meaningful before any byte was sent.
    Fail(ApiError),
}

/// The body of every answer the simulator gives.
#[derive(Debug)]
pub(crate) enum SimBody {
    /// The complete body, taken by the first poll.
    Full(Option<Bytes>),
    /// Bytes already received (the first chunk), then whatever the task sends until it ends.
    Stream {
        first: Option<Bytes>,
        rx: mpsc::Receiver<Msg>,
    },
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream { first, rx } => {
                if let Some(b) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                loop {
                    match ready!(rx.poll_recv(cx)) {
                        Some(Msg::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                        // Headers are out: an HTTP error can no longer be sent. Tasks write
                        // their in-band error events as data instead, so this does not happen.
                        Some(Msg::Fail(_)) => continue,
                        None => return Poll::Ready(None),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Stream { .. } => SizeHint::default(),
        }
    }
}

const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");

/// A complete JSON answer.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut res = Response::new(SimBody::Full(Some(body.into())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, JSON);
    res
}

/// A JSON value as a complete answer.
pub(crate) fn json_value(status: StatusCode, value: &serde_json::Value) -> Response<SimBody> {
    json(status, value.to_string())
}

/// An error answer.
pub(crate) fn error(err: &ApiError) -> Response<SimBody> {
    json_value(err.status(), &err.body())
}

/// A 200 event stream with the headers llama-server sends.
pub(crate) fn event_stream(body: SimBody) -> Response<SimBody> {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// A plain-text answer.
pub(crate) fn text(content_type: &'static str, body: String) -> Response<SimBody> {
    let mut res = Response::new(SimBody::Full(Some(body.into())));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}
