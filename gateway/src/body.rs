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
