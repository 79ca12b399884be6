//! The one body type both listeners send: empty, a small buffer (error JSON), or
//! a streamed body relayed from the other side, optionally cut when its user
//! becomes blocked. Streamed bodies pass frames through as they arrive, so memory
//! stays bounded and server-sent events are not held back.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::enforcement::StreamGuard;
use crate::telemetry::{self, Listener};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a guarded stream ended early.
#[derive(Debug, thiserror::Error)]
#[error("stream closed: the user's traffic is blocked")]
pub struct StreamCut;

pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Stream(Incoming),
    /// A stream that ends with an error (aborting the exchange) when its user is
    /// cut off: a block decision, or unflushed bytes past the headroom (checked
    /// before each frame).
    Guarded {
        inner: Incoming,
        cut: Pin<Box<WaitForCancellationFutureOwned>>,
        guard: StreamGuard,
        listener: Listener,
    },
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    pub fn guarded(inner: Incoming, guard: StreamGuard, listener: Listener) -> Self {
        let cut = Box::pin(guard.cut().clone().cancelled_owned());
        ProxyBody::Guarded {
            inner,
            cut,
            guard,
            listener,
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ProxyBody::Empty => "Empty",
            ProxyBody::Full(_) => "Full",
            ProxyBody::Stream(_) => "Stream",
            ProxyBody::Guarded { .. } => "Guarded",
        };
        f.write_str(kind)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            ProxyBody::Guarded {
                inner,
                cut,
                guard,
                listener,
            } => {
                if cut.as_mut().poll(cx).is_ready() || guard.check().is_err() {
                    telemetry::cut_stream(*listener);
                    return Poll::Ready(Some(Err(StreamCut.into())));
                }
                Pin::new(inner).poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Stream(inner) | ProxyBody::Guarded { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(inner) | ProxyBody::Guarded { inner, .. } => inner.size_hint(),
        }
    }
}
