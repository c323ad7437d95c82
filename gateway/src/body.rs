//! The response body type the gateway hands to hyper.
//!
//! An enum rather than a boxed trait object: every response is either a small body the
//! gateway wrote itself or a relayed backend body, and the enum keeps the relay path free
//! of a per-request allocation and dynamic dispatch per frame.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::relay::RelayBody;
use crate::waiting::WaitingBody;

/// Errors that abort a response mid-body (the client sees a truncated message).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body: the gateway's own, or a backend's relayed untouched.
    #[project = GatewayBodyProj]
    pub enum GatewayBody {
        /// A complete body produced by the gateway (errors, /v1/models, /health).
        Full { #[pin] inner: Full<Bytes> },
        /// A backend's body, relayed frame by frame.
        Relay { #[pin] inner: RelayBody },
        /// A stream that waits in the queue, sending `: queued` comments until its backend
        /// answers.
        Waiting { inner: Box<WaitingBody> },
    }
}

impl GatewayBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
        GatewayBody::Full {
            inner: Full::new(bytes.into()),
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            GatewayBodyProj::Full { inner } => inner
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            GatewayBodyProj::Relay { inner } => inner.poll_frame(cx),
            GatewayBodyProj::Waiting { inner } => Pin::new(&mut **inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full { inner } => inner.is_end_stream(),
            GatewayBody::Relay { inner } => inner.is_end_stream(),
            GatewayBody::Waiting { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full { inner } => inner.size_hint(),
            GatewayBody::Relay { inner } => inner.size_hint(),
            GatewayBody::Waiting { .. } => SizeHint::default(),
        }
    }
}

/// A request body: hyper's, on connections hyper serves (HTTP/2, TLS), or one the
/// gateway's own HTTP/1 server side ([`crate::http1`]) reads off the socket and hands over
/// piece by piece.
pub enum RequestBody {
    /// From hyper.
    Hyper(hyper::body::Incoming),
    /// From the gateway's HTTP/1 server side, whole: it arrived with the head, as nearly
    /// every request's does. Taken when read.
    Whole(Option<Bytes>),
    /// From the gateway's HTTP/1 server side: pieces sent by the connection's task as the
    /// handler asks for them (the channel holds one), ending when the sender is dropped.
    Read(tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>),
    /// No body at all.
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Hyper(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            RequestBody::Whole(whole) => Poll::Ready(whole.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Read(rx) => rx.poll_recv(cx).map(|p| p.map(|r| r.map(Frame::data))),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(inner) => inner.is_end_stream(),
            RequestBody::Whole(whole) => whole.is_none(),
            RequestBody::Read(_) => false,
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(inner) => inner.size_hint(),
            RequestBody::Whole(whole) => {
                SizeHint::with_exact(whole.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Read(_) => SizeHint::default(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
