//! Two-way byte relay for CONNECT tunnels and upgrades (WebSockets), the same
//! on both listeners: moves both directions with half-close (EOF one way shuts
//! down the write side of the other and the rest keeps flowing), copied
//! through a buffer or, for bulk between two plain sockets, spliced through a
//! kernel pipe ([`crate::splice`]); ends on an idle timeout, when the user is
//! cut off (a block decision or a revoked credential
//! at once; bytes past the headroom before the next chunk is passed on, and
//! within [`HEADROOM_CHECK`] while nothing moves), or at the end of the shutdown
//! drain. [`Relays::spawn`] runs one as a tracked task that holds its client
//! connection (and so its slot) and ends its exchange; [`Relays::upgrade`]
//! sends an upgrade request and relays what the upstream switches to.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::agent_limits::Held;
use crate::agent_policy::{self, Denial, Mode};
use crate::body::ProxyBody;
use crate::exchange::{Ended, Exchange};
use crate::gate::{Pass, StreamGuard};
use crate::meter;
use crate::pacing::Way;
use crate::rescue::ProxyError;
use crate::server::ClientConn;
use crate::sni::{self, FirstFlight};
use crate::splice::{Conduit, Pipe};
use crate::telemetry::{GaugeGuard, TunnelKind};
use crate::upstream::{handshake, passed_on};

/// Buffer per direction: it starts small, doubles while reads fill it (a bulk
/// transfer then moves in large reads, with few system calls and wake-ups), and
/// drops back to the small size when the traffic is light again, so an idle
/// tunnel holds little memory. A read that fills the largest buffer moves
/// the direction to a pipe of the same size when both sides are sockets.
const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;
/// Largest read while bytes are paced: one slice's wait stays short at any rate
/// a plan would set.
const PACED_READ: usize = 16 * 1024;
/// How often a relay compares its user's unflushed bytes with the headroom.
pub const HEADROOM_CHECK: Duration = Duration::from_millis(100);

/// Where a listener's relays run: tracked, so the shutdown drain waits for
/// them, and stopped when its deadline passes.
#[derive(Clone)]
pub struct Relays {
    pub tracker: TaskTracker,
    pub hard_stop: CancellationToken,
}

/// A relay about to start: what it is and what it watches.
pub struct Relay {
    pub kind: TunnelKind,
    /// No traffic either way for this long ends it.
    pub idle: Duration,
    pub guard: StreamGuard,
    /// The client connection, held until the relay ends: its slot under the
    /// connection limits and its place in the active-connections gauge.
    pub conn: Arc<ClientConn>,
    /// Its place under the agent's tunnel cap.
    pub held: Held,
    /// Its destination under the agent's egress policy (egress): judged again
    /// on every policy change, and for CONNECT, on the ClientHello's SNI.
    pub watch: Option<agent_policy::Watch>,
}

impl Relays {
    /// Run `relay` as a task once `sides` yields the client and upstream
    /// streams (both upgrades complete); it ends `exchange` when it ends.
    pub fn spawn<S, C, U, E>(&self, started: Relay, exchange: Exchange, sides: S)
    where
        S: Future<Output = Result<(C, U), E>> + Send + 'static,
        C: Conduit + Send + 'static,
        U: Conduit + Send + 'static,
        E: std::fmt::Display + Send,
    {
        let hard_stop = self.hard_stop.clone();
        self.tracker.spawn(async move {
            let Relay {
                kind,
                idle,
                guard,
                conn,
                held,
                mut watch,
            } = started;
            let mut exchange = exchange;
            // An upgrade that never completes holds nothing past the idle
            // limit, a cut or the drain.
            let sides = tokio::select! {
                sides = sides => sides,
                _ = guard.stopped() => return exchange.finish_relay(Ended::Cut, 0, 0),
                _ = hard_stop.cancelled() => return exchange.finish_relay(Ended::Shutdown, 0, 0),
                _ = tokio::time::sleep(idle) => return exchange.finish_relay(Ended::Idle, 0, 0),
            };
            let (mut client, mut upstream) = match sides {
                Ok(sides) => sides,
                Err(e) => {
                    tracing::debug!(error = %e, "the upgrade did not complete");
                    return exchange.finish_relay(Ended::Aborted, 0, 0);
                }
            };
            let _open = GaugeGuard::tunnel(exchange.listener(), kind);
            let mut first = (0, 0);
            if let (Some(watch), TunnelKind::Connect) = (&mut watch, kind) {
                let screened = tokio::select! {
                    screened = screen_first_flight(&mut client, &mut upstream, idle, watch, &guard) => screened,
                    _ = guard.stopped() => return exchange.finish_relay(Ended::Cut, 0, 0),
                    _ = hard_stop.cancelled() => return exchange.finish_relay(Ended::Shutdown, 0, 0),
                };
                match screened {
                    Ok((up, down, reported)) => {
                        first = (up, down);
                        if let Some(denial) = reported {
                            crate::telemetry::policy_reported(denial.reason());
                            exchange.set_denial("sni_denied", Some(denial.rule_text()), Mode::Report.as_str());
                        }
                    }
                    Err(Screened::Silent) => return exchange.finish_relay(Ended::Idle, 0, 0),
                    Err(Screened::Cut) => return exchange.finish_relay(Ended::Cut, 0, 0),
                    Err(Screened::Forbidden(denial)) => {
                        forbid(&mut exchange, &denial, "sni");
                        return exchange.finish_relay(Ended::Forbidden, 0, 0);
                    }
                    Err(Screened::Io(e)) => {
                        tracing::debug!(error = %e, "tunnel ended before its first bytes were passed on");
                        return exchange.finish_relay(Ended::Aborted, 0, 0);
                    }
                }
            }
            let forbidden = async {
                match &mut watch {
                    Some(watch) => watch.forbidden().await,
                    None => std::future::pending().await,
                }
            };
            // A tunnel's bytes go to its destination as they move, not only at its end.
            let relayed = meter::attributing(
                conn.tally.as_deref(),
                relay(client, upstream, idle, &guard, &hard_stop, forbidden),
            )
            .await;
            let ended = match &relayed.end {
                RelayEnd::Error(e) => {
                    tracing::debug!(error = %e, "relay ended with an I/O error");
                    Ended::Aborted
                }
                RelayEnd::Forbidden(denial) => {
                    forbid(&mut exchange, denial, "policy_changed");
                    Ended::Forbidden
                }
                end => end.ended(),
            };
            crate::telemetry::spliced(exchange.listener(), relayed.spliced);
            exchange.finish_relay(ended, first.0 + relayed.up, first.1 + relayed.down);
            drop((conn, held));
        });
    }

    /// Send an upgrade request (a WebSocket, say) on its own upstream connection
    /// `io`, waiting up to `timeout` for the answer. If the upstream switches
    /// protocols, both sides are relayed as `relay` says and the `101` is
    /// passed on; any other answer is passed on as a plain response.
    pub async fn upgrade<I>(
        &self,
        io: I,
        request: Request<ProxyBody>,
        client: OnUpgrade,
        timeout: Duration,
        relay: Relay,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut sender = handshake(io, true).await.map_err(ProxyError::Upstream)?;
        let mut response = tokio::time::timeout(timeout, sender.send_request(request))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)?
            .map_err(|e| ProxyError::from_upstream(e, &relay.guard))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(passed_on(response, relay.guard));
        }
        let upstream = hyper::upgrade::on(&mut response);
        let exchange = exchange.hand_off("upgraded", StatusCode::SWITCHING_PROTOCOLS);
        self.spawn(relay, exchange, async move {
            let (client, upstream) = tokio::try_join!(client, upstream)?;
            Ok::<_, hyper::Error>((TokioIo::new(client), TokioIo::new(upstream)))
        });
        Ok(response.map(|_| ProxyBody::Empty))
    }
}

/// Why a tunnel's first flight stopped it.
enum Screened {
    /// Neither side spoke for the idle limit.
    Silent,
    /// The user's headroom is spent: the first bytes are not passed on.
    Cut,
    Forbidden(Denial),
    Io(io::Error),
}

/// A CONNECT tunnel's first bytes: whoever speaks first is passed on; if the
/// client opens TLS, the host its ClientHello names must pass the agent's
/// policy. Returns the bytes passed each way, and the refusal a report-mode
/// policy would have made.
async fn screen_first_flight<C, U>(
    client: &mut C,
    upstream: &mut U,
    wait: Duration,
    watch: &mut agent_policy::Watch,
    guard: &StreamGuard,
) -> Result<(u64, u64, Option<Denial>), Screened>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let first = sni::first_flight(client, upstream, wait)
        .await
        .map_err(Screened::Io)?;
    // Like every chunk a relay passes on, the first one waits for the user's
    // headroom, and to be paid for.
    let slow = loop {
        match guard.pass() {
            Pass::Go => break false,
            Pass::Slow => break true,
            Pass::Wait(news) => news.cancelled().await,
            Pass::Stop => return Err(Screened::Cut),
        }
    };
    let paced = match &first {
        FirstFlight::Client { bytes, .. } => guard.pace(guard.way(true), bytes.len(), slow),
        FirstFlight::Upstream(bytes) => guard.pace(guard.way(false), bytes.len(), slow),
        FirstFlight::Nothing | FirstFlight::Silent => None,
    };
    if let Some(at) = paced {
        tokio::time::sleep_until(at).await;
    }
    match first {
        FirstFlight::Client { bytes, hello } => {
            let reported = match watch.judge_hello(&hello) {
                Ok(()) => None,
                Err(denial) if denial.mode == Mode::Enforce => {
                    return Err(Screened::Forbidden(denial))
                }
                Err(denial) => Some(denial),
            };
            upstream.write_all(&bytes).await.map_err(Screened::Io)?;
            Ok((bytes.len() as u64, 0, reported))
        }
        FirstFlight::Upstream(bytes) => {
            client.write_all(&bytes).await.map_err(Screened::Io)?;
            Ok((0, bytes.len() as u64, None))
        }
        FirstFlight::Nothing => Ok((0, 0, None)),
        FirstFlight::Silent => Err(Screened::Silent),
    }
}

/// Record a tunnel closed by the agent's policy: `why` is `sni` or `policy_changed`.
fn forbid(exchange: &mut Exchange, denial: &Denial, why: &'static str) {
    crate::telemetry::policy_cut(why);
    let reason = match why {
        "sni" => "sni_denied",
        _ => denial.reason(),
    };
    exchange.set_denial(reason, Some(denial.rule_text()), Mode::Enforce.as_str());
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides finished.
    Done,
    Error(io::Error),
    Idle,
    /// The user became blocked, or the credential was revoked.
    Cut,
    /// The proxy is shutting down and the drain deadline passed.
    Shutdown,
    /// The agent's egress policy came to forbid the destination.
    Forbidden(Denial),
}

impl RelayEnd {
    pub fn ended(&self) -> Ended {
        match self {
            RelayEnd::Done => Ended::Complete,
            RelayEnd::Error(_) => Ended::Aborted,
            RelayEnd::Idle => Ended::Idle,
            RelayEnd::Cut => Ended::Cut,
            RelayEnd::Shutdown => Ended::Shutdown,
            RelayEnd::Forbidden(_) => Ended::Forbidden,
        }
    }
}

/// A finished relay: how it ended, and the bytes it passed each way
/// (client->upstream, upstream->client).
#[derive(Debug)]
pub struct Relayed {
    pub end: RelayEnd,
    pub up: u64,
    pub down: u64,
    /// Of those, the bytes spliced both ways.
    pub spliced: u64,
}

/// Relay between `client` and `upstream` until one of the ends in
/// [`RelayEnd`]; `forbidden` resolves if the egress policy comes to refuse it.
/// Where both sides are plain sockets, a direction that moves bulk does so
/// with `splice(2)` (see [`Pump`]).
pub async fn relay<C, U, F>(
    mut client: C,
    mut upstream: U,
    idle: Duration,
    guard: &StreamGuard,
    hard_stop: &CancellationToken,
    forbidden: F,
) -> Relayed
where
    C: Conduit,
    U: Conduit,
    F: Future<Output = Denial>,
{
    let progress = AtomicU64::new(0);
    let (mut up, mut down) = (Pump::new(guard.way(true)), Pump::new(guard.way(false)));
    let copied = std::future::poll_fn(|cx| {
        let up = up.poll_copy(
            cx,
            Pin::new(&mut client),
            Pin::new(&mut upstream),
            guard,
            &progress,
        )?;
        let down = down.poll_copy(
            cx,
            Pin::new(&mut upstream),
            Pin::new(&mut client),
            guard,
            &progress,
        )?;
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok::<_, Stop>(())),
            _ => Poll::Pending,
        }
    });
    let end = tokio::select! {
        r = copied => match r {
            Ok(()) => RelayEnd::Done,
            Err(Stop::Cut) => RelayEnd::Cut,
            Err(Stop::Io(e)) => RelayEnd::Error(e),
        },
        _ = idle_watch(&progress, idle) => RelayEnd::Idle,
        _ = guard.tripped(HEADROOM_CHECK) => RelayEnd::Cut,
        _ = hard_stop.cancelled() => RelayEnd::Shutdown,
        denial = forbidden => RelayEnd::Forbidden(denial),
    };
    Relayed {
        end,
        up: up.total,
        down: down.total,
        spliced: up.spliced + down.spliced,
    }
}

/// Why a copy stopped early.
#[derive(Debug)]
enum Stop {
    Io(io::Error),
    /// The user's bytes passed the headroom (or a block landed): nothing more is
    /// passed on.
    Cut,
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

/// Where a direction holds the bytes it has read and not yet written.
enum Hold {
    /// A buffer in user space: it starts at [`MIN_BUF`], doubles while reads
    /// fill it, and drops back when the traffic is light again. The bytes in
    /// hand start at `at`.
    Buffer { buf: Box<[u8]>, at: usize },
    /// A kernel pipe of [`MAX_BUF`], taken once a read fills the largest
    /// buffer and both sides are sockets, and given back with the buffer's
    /// large size: the bytes move socket → pipe → socket with `splice(2)`.
    Pipe(Pipe),
}

impl Hold {
    fn small() -> Hold {
        Hold::Buffer {
            buf: vec![0; MIN_BUF].into_boxed_slice(),
            at: 0,
        }
    }

    /// The most one read may take.
    fn room(&self) -> usize {
        match self {
            Hold::Buffer { buf, .. } => buf.len(),
            Hold::Pipe(pipe) => pipe.capacity(),
        }
    }
}

/// One direction of a relay. Every chunk read is checked against the guard
/// before it is written, so a user past their headroom gets at most the chunk
/// in hand, not a check interval's worth of traffic.
struct Pump {
    hold: Hold,
    /// Bytes read and not yet written.
    in_hand: usize,
    /// Bytes the last read returned.
    last_read: usize,
    /// The kernel refused a pipe once: this direction copies from then on.
    pipe_refused: bool,
    read_done: bool,
    shut_down: bool,
    need_flush: bool,
    /// The bytes in hand have not been passed by the guard yet.
    unchecked: bool,
    /// Set while the user's lease is spent and a grant is on its way.
    waiting: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Which way this direction goes, from the agent's side.
    way: Way,
    /// Set while the bytes in hand wait to be paid for (a throttled user, an
    /// agent's bandwidth limit).
    paced: Option<Pin<Box<Sleep>>>,
    /// The last chunk had to wait to be paid for: read in slices of
    /// [`PACED_READ`], so no single wait outlasts the idle limit.
    pacing: bool,
    total: u64,
    /// Of `total`, the bytes written from a pipe.
    spliced: u64,
}

impl Pump {
    fn new(way: Way) -> Self {
        Self {
            hold: Hold::small(),
            in_hand: 0,
            last_read: 0,
            pipe_refused: false,
            read_done: false,
            shut_down: false,
            need_flush: false,
            unchecked: false,
            waiting: None,
            way,
            paced: None,
            pacing: false,
            total: 0,
            spliced: 0,
        }
    }

    /// Copy from `reader` to `writer` until `reader` ends; `Ready` once `writer`
    /// has been shut down. Bumps `progress` whenever bytes move.
    fn poll_copy<R: Conduit, W: Conduit>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        guard: &StreamGuard,
        progress: &AtomicU64,
    ) -> Poll<Result<(), Stop>> {
        loop {
            if self.in_hand == 0 && !self.read_done {
                let sockets = reader.socket().is_some() && writer.socket().is_some();
                self.fit(sockets);
                let n = match self.poll_read(cx, reader.as_mut()) {
                    Poll::Pending => {
                        // Waiting for the source: light traffic gives the large
                        // buffer, or the pipe, back.
                        if self.last_read < MIN_BUF && self.hold.room() > MIN_BUF {
                            self.hold = Hold::small();
                        }
                        if self.need_flush {
                            std::task::ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(read) => read?,
                };
                self.unchecked = n > 0;
                self.last_read = n;
                self.in_hand = n;
                self.read_done = n == 0;
                if n > 0 {
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
            while self.unchecked {
                if let Some(wait) = &mut self.waiting {
                    std::task::ready!(wait.as_mut().poll(cx));
                    self.waiting = None;
                }
                let slow = match guard.pass() {
                    Pass::Go => false,
                    Pass::Slow => true,
                    Pass::Wait(news) => {
                        self.waiting = Some(Box::pin(news.cancelled_owned()));
                        continue;
                    }
                    Pass::Stop => return Poll::Ready(Err(Stop::Cut)),
                };
                self.unchecked = false;
                let paced = guard.pace(self.way, self.in_hand, slow);
                self.pacing = paced.is_some();
                if let Some(at) = paced {
                    self.paced = Some(Box::pin(tokio::time::sleep_until(at)));
                }
            }
            if let Some(until) = &mut self.paced {
                std::task::ready!(until.as_mut().poll(cx));
                self.paced = None;
            }
            while self.in_hand > 0 {
                let n = std::task::ready!(self.poll_write(cx, writer.as_mut()))?;
                if n == 0 {
                    return Poll::Ready(Err(Stop::Io(io::ErrorKind::WriteZero.into())));
                }
                self.in_hand -= n;
                self.total += n as u64;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            if self.read_done {
                if !self.shut_down {
                    std::task::ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Size the hold, which is empty, for the next read: a read that filled
    /// the buffer means more is waiting, so the buffer doubles, and past the
    /// largest buffer the bytes move through a pipe if both sides are
    /// `sockets`.
    fn fit(&mut self, sockets: bool) {
        if self.last_read < self.hold.room() {
            return;
        }
        match &self.hold {
            Hold::Buffer { buf, .. } if buf.len() < MAX_BUF => {
                self.hold = Hold::Buffer {
                    buf: vec![0; (buf.len() * 2).min(MAX_BUF)].into_boxed_slice(),
                    at: 0,
                };
            }
            Hold::Buffer { .. } if sockets && !self.pipe_refused => match Pipe::new(MAX_BUF) {
                Ok(pipe) => self.hold = Hold::Pipe(pipe),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for a bulk relay: its bytes are copied");
                    self.pipe_refused = true;
                }
            },
            _ => {}
        }
    }

    /// Read into the empty hold: `Ready(Ok(0))` at the end of `reader`.
    fn poll_read<R: Conduit>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
    ) -> Poll<io::Result<usize>> {
        let room = match self.pacing {
            true => PACED_READ.min(self.hold.room()),
            false => self.hold.room(),
        };
        match &mut self.hold {
            Hold::Buffer { buf, at } => {
                *at = 0;
                let mut rb = ReadBuf::new(&mut buf[..room]);
                std::task::ready!(reader.as_mut().poll_read(cx, &mut rb))?;
                Poll::Ready(Ok(rb.filled().len()))
            }
            Hold::Pipe(pipe) => {
                let Some(socket) = reader.socket() else {
                    return Poll::Ready(Err(io::Error::other(
                        "a spliced relay side lost its socket",
                    )));
                };
                let n = std::task::ready!(pipe.poll_fill(cx, socket, room))?;
                reader.spliced_out(n);
                Poll::Ready(Ok(n))
            }
        }
    }

    /// Write some of the bytes in hand.
    fn poll_write<W: Conduit>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        match &mut self.hold {
            Hold::Buffer { buf, at } => {
                let n = std::task::ready!(writer
                    .as_mut()
                    .poll_write(cx, &buf[*at..*at + self.in_hand]))?;
                *at += n;
                self.need_flush = true;
                Poll::Ready(Ok(n))
            }
            Hold::Pipe(pipe) => {
                let Some(socket) = writer.socket() else {
                    return Poll::Ready(Err(io::Error::other(
                        "a spliced relay side lost its socket",
                    )));
                };
                let n = std::task::ready!(pipe.poll_drain(cx, socket, self.in_hand))?;
                writer.spliced_in(n);
                self.spliced += n as u64;
                Poll::Ready(Ok(n))
            }
        }
    }
}

/// Resolves once `progress` has not moved for `idle`.
async fn idle_watch(progress: &AtomicU64, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut last = progress.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = progress.load(Ordering::Relaxed);
        if now == last {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A relay that nothing cuts, stops or forbids, with a 5 s idle limit.
    fn spawn_relay<C, U>(client: C, upstream: U) -> tokio::task::JoinHandle<Relayed>
    where
        C: Conduit + Send + 'static,
        U: Conduit + Send + 'static,
    {
        let (cut, stop) = (
            StreamGuard::from_token(CancellationToken::new()),
            CancellationToken::new(),
        );
        tokio::spawn(async move {
            let forbidden = std::future::pending();
            relay(
                client,
                upstream,
                Duration::from_secs(5),
                &cut,
                &stop,
                forbidden,
            )
            .await
        })
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = spawn_relay(client, upstream);
        client_peer.write_all(b"ping").await.unwrap();
        client_peer.shutdown().await.unwrap(); // client done sending
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The other direction still works after the half-close.
        upstream_peer.write_all(b"pong").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let relayed = task.await.unwrap();
        assert!(matches!(relayed.end, RelayEnd::Done));
        assert_eq!((relayed.up, relayed.down), (4, 4));
    }

    #[tokio::test]
    async fn bulk_and_small_transfers_arrive_intact_in_order() {
        let (client, mut client_peer) = tokio::io::duplex(300 * 1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(300 * 1024);
        let task = spawn_relay(client, upstream);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // A bulk burst (buffers grow), a pause, then trickles (they shrink again).
            client_peer.write_all(&sent[..2_000_000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            for chunk in sent[2_000_000..].chunks(100_000) {
                client_peer.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client_peer.shutdown().await.unwrap();
            client_peer
        });
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "relayed bytes differ");
        drop(upstream_peer);
        drop(writer.await.unwrap());
        let relayed = task.await.unwrap();
        assert!(matches!(relayed.end, RelayEnd::Done));
        assert_eq!((relayed.up, relayed.down), (3_000_000, 0));
    }

    /// A client and its peer, an upstream and its peer.
    async fn two_socket_pairs() -> [tokio::net::TcpStream; 4] {
        let ((client_peer, client), (upstream, upstream_peer)) =
            (socket_pair().await, socket_pair().await);
        [client_peer, client, upstream, upstream_peer]
    }

    async fn socket_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (a.unwrap(), b.unwrap().0)
    }

    /// Write `data` into `to` (closing its write side after) while reading
    /// all of `from`: the bytes `from` saw.
    async fn send_and_receive<A, B>(mut to: A, data: Vec<u8>, mut from: B) -> (A, Vec<u8>)
    where
        A: AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + Unpin,
    {
        let writer = tokio::spawn(async move {
            to.write_all(&data).await.unwrap();
            to.shutdown().await.unwrap();
            to
        });
        let mut got = Vec::new();
        from.read_to_end(&mut got).await.unwrap();
        (writer.await.unwrap(), got)
    }

    /// A bulk transfer each way between two plain sockets, the client's
    /// metered and with bytes already read from it, through the relay: what
    /// it relayed, and how many bytes went each way (both checked intact).
    /// `sockets`: the client's peer and the client, the upstream and its peer.
    async fn bulk_both_ways(sockets: [tokio::net::TcpStream; 4]) -> (Relayed, u64, u64) {
        use crate::meter::{ConnTally, Meter, MeteredIo};
        use crate::splice::Prefixed;
        let meter = Meter::new();
        let counter = meter.counter(uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let tally = Arc::new(ConnTally::bound_to(counter));
        let [client_peer, client, upstream, upstream_peer] = sockets;
        let early = bytes::Bytes::from_static(b"read past the request head");
        let client = Prefixed::new(
            early.clone(),
            MeteredIo::new(client, tally.clone(), crate::telemetry::Listener::Egress),
        );
        let task = spawn_relay(client, upstream);
        let up: Vec<u8> = (0..12_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..5_000_000u32).map(|i| (i % 239) as u8).collect();
        let (client_read, client_write) = client_peer.into_split();
        let (upstream_read, upstream_write) = upstream_peer.into_split();
        let ((_, at_upstream), (_, at_client)) = tokio::join!(
            send_and_receive(client_write, up.clone(), upstream_read),
            send_and_receive(upstream_write, down.clone(), client_read),
        );
        assert!(
            at_upstream == [&early[..], &up].concat(),
            "upstream bytes differ"
        );
        assert!(at_client == down, "client bytes differ");
        let relayed = task.await.unwrap();
        assert!(matches!(relayed.end, RelayEnd::Done), "{:?}", relayed.end);
        let up_total = (early.len() + up.len()) as u64;
        assert_eq!((relayed.up, relayed.down), (up_total, down.len() as u64));
        // The early bytes were counted when hyper read them, not by the relay.
        let d = meter.drain();
        assert_eq!((d[0].rx, d[0].tx), (down.len() as u64, up.len() as u64));
        (relayed, up_total, down.len() as u64)
    }

    /// Between two plain sockets, the bulk is spliced, and the meter counts
    /// every byte once.
    #[tokio::test]
    async fn bulk_between_sockets_is_spliced_and_metered_exactly() {
        let (relayed, up, down) = bulk_both_ways(two_socket_pairs().await).await;
        assert!(
            relayed.spliced > (up + down) / 2,
            "most of the bulk is spliced: {} of {}",
            relayed.spliced,
            up + down
        );
    }

    /// Where the kernel refuses a pipe (the process is out of descriptors),
    /// the bulk is copied instead: nothing lost, nothing counted twice. Runs
    /// in a process of its own, whose descriptor limit it lowers.
    #[test]
    fn a_refused_pipe_leaves_the_bulk_copied() {
        const CHILD: &str = "TOLLGATE_RELAY_TEST_NO_DESCRIPTORS";
        if std::env::var_os(CHILD).is_none() {
            let name = "relay::tests::a_refused_pipe_leaves_the_bulk_copied";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1", "--nocapture"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "the test in its own process: {}\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let sockets = two_socket_pairs().await;
            exhaust_descriptors();
            assert!(
                crate::splice::Pipe::new(MAX_BUF).is_err(),
                "no descriptor is left for a pipe"
            );
            let (relayed, _, _) = bulk_both_ways(sockets).await;
            assert_eq!(relayed.spliced, 0, "nothing spliced without a pipe");
        });
    }

    /// Lower this process's descriptor limit to what it holds now, and fill
    /// any gaps below it, so the next descriptor asked for is refused.
    #[allow(unsafe_code)]
    fn exhaust_descriptors() {
        let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let highest = open.iter().copied().max().unwrap_or(2) as u64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit write and read a valid rlimit struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = limit.rlim_cur.min(highest + 1);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        // Fill the gaps: kept open (leaked) for the rest of this process.
        while let Ok(file) = std::fs::File::open("/dev/null") {
            std::mem::forget(file);
        }
    }

    /// A cut lands on a spliced bulk transfer as on a copied one: at most the
    /// chunk in hand passes after it.
    #[tokio::test]
    async fn a_cut_stops_a_spliced_transfer() {
        let (mut client_peer, client) = socket_pair().await;
        let (upstream, mut upstream_peer) = socket_pair().await;
        let cut = CancellationToken::new();
        let guard = StreamGuard::from_token(cut.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move {
            let forbidden = std::future::pending();
            relay(
                client,
                upstream,
                Duration::from_secs(5),
                &guard,
                &stop,
                forbidden,
            )
            .await
        });
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            while client_peer.write_all(&chunk).await.is_ok() && sent < 1 << 30 {
                sent += chunk.len() as u64;
            }
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0usize;
        while received < 32 << 20 {
            received += upstream_peer.read(&mut buf).await.unwrap();
        }
        cut.cancel();
        let relayed = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the cut ends the relay")
            .unwrap();
        assert!(matches!(relayed.end, RelayEnd::Cut), "{:?}", relayed.end);
        assert!(relayed.spliced > 0, "the bulk was spliced");
        let mut after = 0usize;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(5), upstream_peer.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            after += n;
        }
        assert_eq!(
            received as u64 + after as u64,
            relayed.up,
            "the relay's count is what arrived"
        );
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relays_end() {
        let (client, _c) = tokio::io::duplex(64);
        let (upstream, _u) = tokio::io::duplex(64);
        let (cut, stop) = (
            StreamGuard::from_token(CancellationToken::new()),
            CancellationToken::new(),
        );
        let relayed = relay(
            client,
            upstream,
            Duration::from_secs(60),
            &cut,
            &stop,
            std::future::pending(),
        )
        .await;
        assert!(matches!(relayed.end, RelayEnd::Idle));
    }

    #[tokio::test]
    async fn cut_ends_the_relay() {
        let (client, _c) = tokio::io::duplex(64);
        let (upstream, _u) = tokio::io::duplex(64);
        let (cut, stop) = (CancellationToken::new(), CancellationToken::new());
        cut.cancel();
        let guard = StreamGuard::from_token(cut);
        assert!(matches!(
            relay(
                client,
                upstream,
                Duration::from_secs(60),
                &guard,
                &stop,
                std::future::pending()
            )
            .await
            .end,
            RelayEnd::Cut
        ));
    }
}
