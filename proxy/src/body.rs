//! The one body type both listeners send, each way: empty, a small buffer
//! (error JSON), or a streamed body relayed from the other side. Streamed bodies
//! pass frames through as they arrive, so memory stays bounded and server-sent
//! events are not held back; request and response bodies alike are guarded, so
//! an upload or a download stops within one frame of its user's headroom, a
//! block, or the revocation of its agent's credential.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::gate::{Pass, StreamGuard};
use crate::h1::HeadLines;
use crate::pacing::Way;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a guarded stream ended early.
#[derive(Debug, thiserror::Error)]
#[error("stream closed: the user's traffic is blocked or the credential was revoked")]
pub struct StreamCut;

/// Which way a guarded body goes.
#[derive(Debug)]
pub enum Flow {
    /// A request body, its data bytes added to the counter.
    FromClient(Arc<AtomicU64>),
    /// A response body.
    ToClient,
}

/// A body relayed from the other side: hyper's, a response read straight
/// from its upstream connection (`h1`, with its head's lines when they were
/// kept), or none.
pub enum Source {
    Empty,
    Hyper(Incoming),
    Read(Box<dyn ReadBody>),
}

/// A response body read straight from its upstream connection, which may
/// carry its head's lines.
pub trait ReadBody: Body<Data = Bytes, Error = BoxError> + KeptLines + Send + Unpin {}

impl<T> ReadBody for T where T: Body<Data = Bytes, Error = BoxError> + KeptLines + Send + Unpin {}

/// A response body that may carry its head's header lines as the gateway
/// sent them ([`HeadLines`]), for the server that writes the head.
pub trait KeptLines {
    /// The lines, once; none for a body that never has them.
    fn take_lines(&mut self) -> Option<HeadLines> {
        None
    }
}

impl KeptLines for Source {
    fn take_lines(&mut self) -> Option<HeadLines> {
        match self {
            Source::Read(body) => body.take_lines(),
            _ => None,
        }
    }
}

/// A request's body as its client sends it: hyper's, or none (a request whose
/// head the connection's task read itself, which announced no body:
/// `h1_server`).
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    Hyper(Incoming),
}

impl From<RequestBody> for Source {
    fn from(body: RequestBody) -> Self {
        match body {
            RequestBody::Empty => Source::Empty,
            RequestBody::Hyper(body) => Source::Hyper(body),
        }
    }
}

impl RequestBody {
    /// Whether no body byte can follow.
    pub fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Hyper(body) => body.is_end_stream(),
        }
    }
}

impl From<Incoming> for Source {
    fn from(body: Incoming) -> Self {
        Source::Hyper(body)
    }
}

impl Body for Source {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Source::Empty => Poll::Ready(None),
            Source::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Source::Read(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Empty => true,
            Source::Hyper(body) => body.is_end_stream(),
            Source::Read(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Empty => SizeHint::with_exact(0),
            Source::Hyper(body) => body.size_hint(),
            Source::Read(body) => body.size_hint(),
        }
    }
}

/// A paced data frame's bytes, and when they are paid for.
type Paced = (Bytes, Pin<Box<Sleep>>);

pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    /// A stream that ends with an error (aborting the exchange) when its user is
    /// cut off: a block decision or revocation, or unflushed bytes past the
    /// headroom (checked before each frame). A throttled user's frames, and
    /// those of an agent with a bandwidth limit, are held until paid for.
    Guarded {
        inner: Source,
        /// Wakes the body when the guard stops it: armed the first time the
        /// body waits (a response already in hand never registers).
        stopped: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        guard: StreamGuard,
        way: Way,
        /// Bytes passed on, when someone counts them.
        counted: Option<Arc<AtomicU64>>,
        /// Set while the user's lease is spent and a grant is on its way.
        waiting: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        /// A data frame's bytes in hand, until they are paid for (the bytes
        /// alone, on the heap: only a paced body holds any, and every
        /// response moves this one).
        paced: Option<Box<Paced>>,
    },
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// `inner`, going `flow`, stopped when `guard` trips.
    pub fn guarded(inner: impl Into<Source>, guard: StreamGuard, flow: Flow) -> Self {
        let (way, counted) = match flow {
            Flow::FromClient(counted) => (guard.way(true), Some(counted)),
            Flow::ToClient => (guard.way(false), None),
        };
        ProxyBody::Guarded {
            inner: inner.into(),
            stopped: None,
            guard,
            way,
            counted,
            waiting: None,
            paced: None,
        }
    }
}

impl KeptLines for ProxyBody {
    fn take_lines(&mut self) -> Option<HeadLines> {
        match self {
            ProxyBody::Guarded { inner, .. } => inner.take_lines(),
            _ => None,
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ProxyBody::Empty => "Empty",
            ProxyBody::Full(_) => "Full",
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
            ProxyBody::Guarded {
                inner,
                stopped,
                guard,
                way,
                counted,
                waiting,
                paced,
            } => {
                let poll = poll_guarded(inner, guard, *way, counted, waiting, paced, cx);
                if poll.is_pending() {
                    // Whatever it waits for, a block or a revocation ends the
                    // wait. A cut before this registration is seen here too:
                    // the guard counts its user's cuts from when it was taken,
                    // and `stopped` resolves at once for one since.
                    let stopped = stopped.get_or_insert_with(|| Box::pin(guard.stopped()));
                    if stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(StreamCut.into())));
                    }
                }
                poll
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Guarded { inner, paced, .. } => paced.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Guarded { inner, .. } => inner.size_hint(),
        }
    }
}

/// One step of a guarded body: stop if the guard says so, wait for a grant or
/// for the pace, or pass on the inner body's next frame.
fn poll_guarded(
    inner: &mut Source,
    guard: &StreamGuard,
    way: Way,
    counted: &Option<Arc<AtomicU64>>,
    waiting: &mut Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    paced: &mut Option<Box<Paced>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if guard.stopped_now() {
        return Poll::Ready(Some(Err(StreamCut.into())));
    }
    if let Some(held) = paced {
        std::task::ready!(held.1.as_mut().poll(cx));
        let (data, _) = *paced.take().expect("in hand");
        return Poll::Ready(Some(Ok(Frame::data(data))));
    }
    let slow = loop {
        if let Some(wait) = waiting {
            std::task::ready!(wait.as_mut().poll(cx));
            *waiting = None;
        }
        match guard.pass() {
            Pass::Go => break false,
            Pass::Slow => break true,
            Pass::Wait(news) => *waiting = Some(Box::pin(news.cancelled_owned())),
            Pass::Stop => return Poll::Ready(Some(Err(StreamCut.into()))),
        }
    };
    let poll = Pin::new(inner).poll_frame(cx);
    let Poll::Ready(Some(Ok(frame))) = poll else {
        return poll;
    };
    let Some(data) = frame.data_ref() else {
        return Poll::Ready(Some(Ok(frame)));
    };
    if let Some(counted) = counted {
        counted.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    if let Some(at) = guard.pace(way, data.len(), slow) {
        let mut until = Box::pin(tokio::time::sleep_until(at));
        if until.as_mut().poll(cx).is_pending() {
            let data = frame.into_data().expect("a data frame");
            *paced = Some(Box::new((data, until)));
            return Poll::Pending;
        }
    }
    Poll::Ready(Some(Ok(frame)))
}
