//! Serving a listener, the same for egress and ingress: accepting under the
//! connection limit (503 beyond it), TLS with ALPN, HTTP/1.1 behind the
//! smuggling guard (head size limit -> 431, head read timeout), HTTP/2 where the
//! listener offers it (ALPN on TLS, the connection preface on cleartext), and
//! graceful shutdown (stop accepting, let in-flight exchanges finish, close idle
//! keep-alives).
//!
//! What differs between listeners is their [`Stages`]: the request path run for
//! each request. Every request passes through [`handle`], which checks its
//! framing, runs the stages, and turns the result into the response that ends
//! the request's [`Exchange`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::signal::Signal;
use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tollgate_core::config::TlsConfig;

use crate::agent_limits::Held;
use crate::body::{ProxyBody, RequestBody};
use crate::decision_log::DecisionLog;
use crate::exchange::{Busy, Exchange, ExchangeBody};
use crate::framing::{Framing, FramingGuard, Verdicts};
use crate::h1;
use crate::h1_server::{self, Served};
use crate::inbound::Inbound;
use crate::meter::{ConnTally, MeteredIo};
use crate::rescue::ProxyError;
use crate::splice::Prefixed;
use crate::telemetry::{self, GaugeGuard, Listener};
use crate::workers::{Load, Place};

/// Limits a listener applies to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// Time to send a request head (and to finish a TLS handshake); also how
    /// long a connection may sit idle between requests.
    pub header_read_timeout: Duration,
}

/// What sets one listener's connections apart from another's.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Which listener this is, for metrics, events and error responses.
    pub listener: Listener,
    /// Offer HTTP/2 (ALPN `h2`, or the preface on cleartext).
    pub http2: bool,
    /// Count the client socket's bytes to the VPS it binds to (egress: the
    /// agent's own socket faces the VPS).
    pub meter_client: bool,
}

/// A listener's request path: the stages one request goes through once the
/// connection machinery has read it.
pub trait Stages: Send + Sync + Sized + 'static {
    const SHAPE: Shape;

    /// Where this listener's exchanges record their decisions.
    fn decision_log(&self) -> &DecisionLog;

    /// Run the stages for `req`, arrived on `conn`. (On the heap as it was
    /// read: a future that takes it holds a pointer, not its 264 bytes.)
    fn proxy(
        &self,
        req: Box<Inbound>,
        conn: &Arc<ClientConn>,
        exchange: &mut Exchange,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send;
}

/// One client connection, as the request path sees it. Relays opened on it hold
/// it (and so its slot under the connection limit and its place in the
/// active-connections gauge) until they end.
pub struct ClientConn {
    pub peer: SocketAddr,
    limits: Limits,
    pub tls: bool,
    /// Counts the client socket's bytes (listeners that meter the client).
    pub tally: Option<Arc<ConnTally>>,
    /// The agent this connection is bound to (egress: the first that authenticates).
    pub agent: OnceLock<Uuid>,
    /// The connection's place under its agent's connection cap, once bound.
    pub held: OnceLock<Held>,
    framing: Arc<Verdicts>,
    /// Requests under way on this connection, until their response bodies end.
    in_flight: Arc<AtomicUsize>,
    /// Requests started on this connection.
    started: AtomicU64,
    /// The peer's address as text, once a request needed it.
    peer_text: OnceLock<HeaderValue>,
    _slot: OwnedSemaphorePermit,
    /// Its place among its serving thread's connections.
    _place: Place,
    _open: GaugeGuard,
}

impl ClientConn {
    /// The peer's IP address as text (`X-Forwarded-For`), made on first use and
    /// shared by the connection's requests.
    pub fn peer_text(&self) -> &HeaderValue {
        self.peer_text.get_or_init(|| {
            HeaderValue::from_maybe_shared(Bytes::from(self.peer.ip().to_string()))
                .expect("ip text is a header value")
        })
    }

    /// Requests under way on this connection, until their response bodies end.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A rustls server config from PEM files, offering `alpn` protocols.
pub fn tls_acceptor(tls: &TlsConfig, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading TLS certificates from {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificates in {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading the TLS private key from {}", tls.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The ALPN protocols a listener offers.
pub fn alpn<S: Stages>() -> &'static [&'static [u8]] {
    match S::SHAPE.http2 {
        true => &[b"h2", b"http/1.1"],
        false => &[b"http/1.1"],
    }
}

const OVER_LIMIT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 46\r\n\r\n{\"error\":\"unavailable\",\"reason\":\"connections\"}";

/// A connection one serving thread accepted for another to serve: the
/// socket (off the accepting thread's reactor), its slot under the
/// connection limit and its place on the other thread.
pub struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    place: Place,
}

/// How one listener's accept loop on one serving thread shares its
/// connections with the same listener's loops on the others (`workers`).
pub struct Sharing {
    /// This serving thread.
    pub here: usize,
    pub load: Load,
    /// Every serving thread's inbox for this listener, by thread. Unbounded:
    /// each connection in one holds a slot under the connection limit.
    pub inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
    /// This thread's.
    pub inbox: mpsc::UnboundedReceiver<Handoff>,
}

/// Serve `listener` with `stages` until `shutdown`: each connection (with its
/// slot under the connection limit, one of `slots`) runs as a task on
/// `tracker`, on the serving thread `sharing` places it on: this one, or
/// another that is serving fewer connections.
#[allow(clippy::too_many_arguments)]
pub async fn run<S: Stages>(
    stages: Arc<S>,
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut sharing: Sharing,
    shutdown: Arc<Signal>,
    tracker: TaskTracker,
) {
    let name = S::SHAPE.listener.as_str();
    let serve_here = |stream: TcpStream, peer, slot, place| {
        let accepted = Accepted {
            peer,
            slot,
            place,
            limits,
            tls: tls.clone(),
        };
        tracker.spawn(serve(stages.clone(), stream, accepted, shutdown.clone()));
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(handoff) = sharing.inbox.recv() => {
                // From here on, this thread's reactor watches the socket.
                match TcpStream::from_std(handoff.stream) {
                    Ok(stream) => serve_here(stream, handoff.peer, handoff.slot, handoff.place),
                    Err(e) => tracing::warn!(listener = name, error = %e, "cannot take over a connection from another serving thread"),
                }
                continue;
            }
            _ = shutdown.raised() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            telemetry::rejected_connection(S::SHAPE.listener);
            tracker.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVER_LIMIT))
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let place = sharing.load.place(sharing.here);
        let there = place.thread();
        if there == sharing.here {
            serve_here(stream, peer, slot, place);
            continue;
        }
        match stream.into_std() {
            Ok(stream) => {
                let handoff = Handoff {
                    stream,
                    peer,
                    slot,
                    place,
                };
                // A thread that no longer takes connections is shutting
                // down: the connection closes, as one still in the backlog
                // would.
                let _ = sharing.inboxes[there].send(handoff);
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot hand a connection to another serving thread")
            }
        }
    }
}

enum Protocol {
    Http1,
    Http2,
}

/// A connection just accepted, with its slot and what it is served with.
struct Accepted {
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    place: Place,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serve one client connection until it closes or `shutdown` drains it. TLS and
/// HTTP/2 run in their own boxed futures, so a plain HTTP/1.1 connection (the
/// common case) holds only what it needs while it waits between requests.
async fn serve<S: Stages>(
    stages: Arc<S>,
    stream: TcpStream,
    accepted: Accepted,
    shutdown: Arc<Signal>,
) {
    let Accepted {
        peer,
        slot,
        place,
        limits,
        tls,
    } = accepted;
    let shape = S::SHAPE;
    let protocol = match (&tls, shape.http2) {
        (None, true) => match sniff_preface(&stream, limits.header_read_timeout).await {
            Some(protocol) => protocol,
            None => return,
        },
        _ => Protocol::Http1,
    };
    let tally = shape.meter_client.then(|| Arc::new(ConnTally::unbound()));
    let conn = ClientConn {
        peer,
        limits,
        tls: tls.is_some(),
        tally: tally.clone(),
        agent: OnceLock::new(),
        held: OnceLock::new(),
        framing: Arc::new(Verdicts::default()),
        in_flight: Arc::default(),
        started: AtomicU64::new(0),
        peer_text: OnceLock::new(),
        _slot: slot,
        _place: place,
        _open: GaugeGuard::connection(shape.listener),
    };
    match tally {
        Some(tally) => {
            let io = MeteredIo::new(stream, tally, shape.listener);
            serve_io(stages, io, conn, protocol, tls, shutdown).await
        }
        None => serve_io(stages, stream, conn, protocol, tls, shutdown).await,
    }
}

async fn serve_io<S, I>(
    stages: Arc<S>,
    io: I,
    conn: ClientConn,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: Arc<Signal>,
) where
    S: Stages,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match (tls, protocol) {
        (None, Protocol::Http1) => serve_http1(stages, io, conn, shutdown).await,
        (None, Protocol::Http2) => Box::pin(serve_http2(stages, io, conn, shutdown)).await,
        (Some(acceptor), _) => Box::pin(serve_tls(stages, io, conn, acceptor, shutdown)).await,
    }
}

async fn serve_tls<S, I>(
    stages: Arc<S>,
    io: I,
    conn: ClientConn,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: Arc<Signal>,
) where
    S: Stages,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (timeout, listener) = (conn.limits.header_read_timeout, S::SHAPE.listener.as_str());
    let tls = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(listener, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(listener, "TLS handshake timed out"),
    };
    if S::SHAPE.http2 && tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_http2(stages, tls, conn, shutdown).await
    } else {
        serve_http1(stages, tls, conn, shutdown).await
    }
}

async fn serve_http1<S, I>(stages: Arc<S>, io: I, conn: ClientConn, shutdown: Arc<Signal>)
where
    S: Stages,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits;
    let conn = Arc::new(conn);
    // The fast path serves only heads without `Content-Length` or
    // `Transfer-Encoding`: their framing is clear, and the guard has nothing
    // to judge.
    let served = h1_server::serve(
        io,
        limits.max_header_bytes,
        limits.header_read_timeout,
        &shutdown,
        |req| handle(&*stages, req, &conn, Framing::Clear),
    )
    .await;
    // A request the fast path does not serve: hyper serves the rest of the
    // connection, starting with the bytes read so far (the start of that
    // request's head), behind the smuggling guard.
    let Served::Unusual(io, early) = served else {
        return;
    };
    let io = FramingGuard::new(
        Prefixed::new(early, io),
        limits.max_header_bytes,
        conn.framing.clone(),
    );
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(64 * 1024))
        .keep_alive(true);
    let service = service(stages, conn);
    serve_until(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
        &shutdown,
        None,
    )
    .await
}

/// A plain HTTP/1.1 client connection with a metered socket, as [`serve`] and
/// `serve_http1` stack it for hyper.
type MeteredHttp1 = TokioIo<FramingGuard<Prefixed<MeteredIo<TcpStream>>>>;

/// The client side of an upgraded connection (a CONNECT tunnel): the metered
/// socket itself, with any bytes hyper read past the request, when the
/// connection is plain TCP, so the relay can splice it; hyper's stream
/// otherwise (TLS, HTTP/2).
pub fn upgraded_client(
    upgraded: Upgraded,
) -> Either<TokioIo<Upgraded>, Prefixed<MeteredIo<TcpStream>>> {
    match upgraded.downcast::<MeteredHttp1>() {
        Ok(parts) => {
            // What hyper read past the request, then what it had yet to read
            // of the bytes the fast path handed it.
            let (early, io) = parts.io.into_inner().into_inner().into_parts();
            let read = match (parts.read_buf.is_empty(), early.is_empty()) {
                (_, true) => parts.read_buf,
                (true, false) => early,
                (false, false) => [parts.read_buf, early].concat().into(),
            };
            Either::Right(Prefixed::new(read, io))
        }
        Err(upgraded) => Either::Left(TokioIo::new(upgraded)),
    }
}

async fn serve_http2<S, I>(stages: Arc<S>, io: I, conn: ClientConn, shutdown: Arc<Signal>)
where
    S: Stages,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.limits;
    let idle = limits.header_read_timeout;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished; the idle watch below closes live ones
        // that have nothing to do.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = Arc::new(conn);
    let service = service(stages, conn.clone());
    serve_until(
        builder.serve_connection(TokioIo::new(io), service),
        &shutdown,
        Some((&conn, idle)),
    )
    .await
}

fn service<S: Stages>(
    stages: Arc<S>,
    conn: Arc<ClientConn>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ExchangeBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ExchangeBody>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |req: Request<Incoming>| {
        let (stages, conn) = (stages.clone(), conn.clone());
        // Every HTTP/1 head hyper parses crossed the guard first.
        let framing = match req.version() < Version::HTTP_2 {
            true => conn.framing.next(),
            false => Framing::Clear,
        };
        let req = Box::new(Inbound::from(req.map(RequestBody::Hyper)));
        async move {
            let mut response = handle(&*stages, req, &conn, framing).await;
            // hyper writes only the header map.
            h1::lines_into_headers(&mut response);
            Ok::<_, Infallible>(response)
        }
    })
}

/// Every request of every listener: framing check (`framing`, the smuggling
/// guard's verdict on its head), the listener's stages, and the response that
/// carries the exchange to its end.
// Not an `async fn`: its future keeps `req` where it was given rather than
// copying it into the body's own variable.
#[allow(clippy::manual_async_fn)]
fn handle<'a, S: Stages>(
    stages: &'a S,
    req: Box<Inbound>,
    conn: &'a Arc<ClientConn>,
    framing: Framing,
) -> impl Future<Output = Response<ExchangeBody>> + 'a {
    async move {
        // On the heap from the start: the response body carries it to the
        // exchange's end, and it is not copied there.
        let mut exchange =
            built_in(|| Exchange::begin(S::SHAPE.listener, &req, stages.decision_log()));
        if let Some(tally) = &conn.tally {
            // The client is the VPS (egress): its bytes go to the hosts it names.
            exchange.attribute_bytes_of(tally.clone());
        }
        // Under way until its response body has been sent (for the HTTP/2 idle watch).
        let busy = Busy::enter(&conn.in_flight);
        conn.started.fetch_add(1, Ordering::AcqRel);
        // A connection keeps room for one request future, busy or idle (hyper's
        // and the fast path's alike); boxing the exchange keeps that room small (a
        // few hundred bytes instead of kilobytes) at one allocation per request.
        let result = match framing {
            Framing::Ambiguous => Err(ProxyError::BadRequest(
                "ambiguous message framing (content-length with transfer-encoding, or unparseable)",
            )),
            Framing::Clear => built_in_box(|| stages.proxy(req, conn, &mut exchange)).await,
        };
        exchange.respond(result, busy)
    }
}

/// The future `make` returns, on the heap. The box is allocated before the
/// future is made, so the compiler builds the future in it; `Box::pin(make())`
/// builds it on the stack and then copies all of its kilobytes in, which
/// showed in profiles at once per request.
#[inline(always)]
fn built_in_box<F: Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(built_in(make))
}

/// What `make` returns, built in a box allocated first (see [`built_in_box`]).
#[inline(always)]
fn built_in<T>(make: impl FnOnce() -> T) -> Box<T> {
    Box::write(Box::new_uninit(), make())
}

/// Drive `conn` until it ends or `shutdown` asks it to finish gracefully. With
/// `idle`, a connection with no request under way for that long is asked to
/// finish too (HTTP/2, where hyper has no idle timeout of its own).
async fn serve_until<C>(conn: C, shutdown: &Signal, idle: Option<(&Arc<ClientConn>, Duration)>)
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let idle_watch = async {
        match idle {
            Some((client, limit)) => idle_watch(client, limit).await,
            None => std::future::pending().await,
        }
    };
    let went_idle = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return;
        }
        _ = shutdown.raised() => false,
        _ = idle_watch => true,
    };
    conn.as_mut().graceful_shutdown();
    // An idle client that never acknowledges the close holds its slot no
    // longer than the idle limit again, unless a request it started just
    // before the close is still under way. (A shutdown waits for the drain.)
    let (closing, client) = match (went_idle, idle) {
        (true, Some((client, limit))) => (limit, Some(client)),
        _ => (Duration::MAX, None),
    };
    loop {
        match tokio::time::timeout(closing, conn.as_mut()).await {
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "client connection ended with an error while closing")
            }
            Ok(Ok(())) => {}
            Err(_) if client.is_some_and(|c| c.in_flight() > 0) => continue,
            Err(_) => tracing::debug!("client did not finish closing an idle connection; dropped"),
        }
        return;
    }
}

/// Resolves once `conn` has had no request under way (its response body
/// included), and has started none, for `limit`; the client opens a new
/// connection for its next one.
async fn idle_watch(conn: &ClientConn, limit: Duration) {
    let step = (limit / 4).max(Duration::from_millis(10));
    let mut quiet = Duration::ZERO;
    let mut seen = conn.started.load(Ordering::Acquire);
    loop {
        tokio::time::sleep(step).await;
        let started = conn.started.load(Ordering::Acquire);
        match conn.in_flight() == 0 && started == seen {
            true => quiet += step,
            false => quiet = Duration::ZERO,
        }
        seen = started;
        if quiet >= limit {
            return;
        }
    }
}

/// What a cleartext client speaks, from the first bytes it sent (peeked, not
/// consumed): HTTP/2 if they are the HTTP/2 connection preface, else HTTP/1.1.
/// `None` if the client closes, or sends nothing within `timeout`.
async fn sniff_preface(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if !PREFACE.starts_with(&buf[..n]) {
            return Some(Protocol::Http1);
        }
        if n == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // Part of the preface so far. Peeking does not consume, so the socket stays
        // readable: wait a moment for the rest instead of spinning.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
            .await
            .is_err()
        {
            return None;
        }
    }
}

/// A hyper connection future that can be asked to finish gracefully.
trait GracefulConnection: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, B, E> GracefulConnection for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cleartext_clients_are_told_apart_by_the_http2_preface() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sniff = |pieces: Vec<&'static [u8]>| {
            let listener = &listener;
            async move {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (server, _) = listener.accept().await.unwrap();
                let writer = tokio::spawn(async move {
                    for piece in pieces {
                        client.write_all(piece).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    client
                });
                let protocol = sniff_preface(&server, Duration::from_millis(500)).await;
                drop(writer.await.unwrap());
                protocol
            }
        };
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(matches!(
            sniff(vec![b"GET / HTTP/1.1\r\n"]).await,
            Some(Protocol::Http1)
        ));
        assert!(matches!(
            sniff(vec![b"POST /"]).await,
            Some(Protocol::Http1)
        ));
        assert!(matches!(sniff(vec![h2]).await, Some(Protocol::Http2)));
        assert!(matches!(
            sniff(vec![&h2[..5], &h2[5..]]).await,
            Some(Protocol::Http2)
        ));
        // Silence until the deadline, or a preface that never completes: no protocol.
        assert!(sniff(vec![]).await.is_none());
        assert!(sniff(vec![&h2[..3]]).await.is_none());
    }
}
