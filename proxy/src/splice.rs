//! Zero-copy CONNECT tunnels (Linux): between two plain TCP sockets a tunnel's
//! bytes go socket -> pipe -> socket with splice(2) and never pass through user
//! space, which keeps a bulk tunnel close to the speed of a direct connection.
//! Counting, the per-chunk headroom check, half-close, the idle timeout, cuts
//! and the drain deadline behave exactly as in [`crate::relay`], which serves
//! every other tunnel (a TLS listener, WebSockets).
//!
//! A pipe is only held while a chunk is in flight: a pump takes one from a
//! small process-wide pool when it reads and gives it back once the chunk is
//! written, so an idle tunnel holds two sockets and nothing else.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rustix::net::Shutdown;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::enforcement::StreamGuard;
use crate::meter::Tap;
use crate::relay::{supervise, RelayEnd, Stop};

/// Bytes one pipe holds, and so the most one splice moves. Four times the
/// kernel default: a bulk transfer then takes a quarter of the system calls.
const PIPE_BYTES: usize = 256 * 1024;
/// Empty pipes kept for reuse; more are closed when given back.
const POOL_KEEP: usize = 64;

/// A pipe: its read end and write end.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    /// An empty pipe from the pool, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(pipe);
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // The size may be refused (per-user pipe limits): the default still works.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_BYTES)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Give an empty pipe back for reuse.
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_KEEP {
            pool.push(self);
        }
    }
}

/// Whether splicing works here (pipes can be made); checked once per tunnel, so
/// a process out of file descriptors falls back to copying instead of failing.
pub fn available() -> bool {
    Pipe::take().map(Pipe::give_back).is_ok()
}

/// Relay a CONNECT tunnel between the agent's `client` socket (counted on `tap`)
/// and `upstream` until one of the ends in [`RelayEnd`]. `early` holds bytes
/// the client sent behind its CONNECT head, already read (and counted) with it.
pub async fn relay(
    client: TcpStream,
    mut tap: Tap,
    early: Bytes,
    mut upstream: TcpStream,
    idle: Duration,
    guard: &StreamGuard,
    hard_stop: &CancellationToken,
) -> RelayEnd {
    let progress = AtomicU64::new(0);
    let copy = async {
        let (mut up, mut down) = (Pump::new(Agent::Reads), Pump::new(Agent::Writes));
        if !early.is_empty() {
            if guard.tripped_now() {
                return Err(Stop::Cut);
            }
            upstream.write_all(&early).await?;
            up.total = early.len() as u64;
            progress.fetch_add(1, Ordering::Relaxed);
        }
        let moved = || {
            progress.fetch_add(1, Ordering::Relaxed);
        };
        std::future::poll_fn(|cx| {
            // Bytes read from the agent are bytes its VPS sent; bytes written to it, received.
            let to_upstream = up.poll_pump(cx, &client, &upstream, guard, &mut |n| {
                tap.sent(n);
                moved();
            });
            let to_client = down.poll_pump(cx, &upstream, &client, guard, &mut |n| {
                tap.received(n);
                moved();
            });
            match (to_upstream?, to_client?) {
                (Poll::Ready(up), Poll::Ready(down)) => Poll::Ready(Ok((up, down))),
                _ => Poll::Pending,
            }
        })
        .await
    };
    supervise(copy, &progress, idle, guard, hard_stop).await
}

/// Which side of a pump is the agent's socket, where bytes are counted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Agent {
    /// The pump reads from the agent (agent -> upstream).
    Reads,
    /// The pump writes to the agent (upstream -> agent).
    Writes,
}

/// One direction of a tunnel.
struct Pump {
    agent: Agent,
    /// The pipe holding the chunk in flight, if any.
    pipe: Option<Pipe>,
    in_pipe: usize,
    read_done: bool,
    shut_down: bool,
    total: u64,
}

impl Pump {
    fn new(agent: Agent) -> Self {
        Self {
            agent,
            pipe: None,
            in_pipe: 0,
            read_done: false,
            shut_down: false,
            total: 0,
        }
    }

    /// Move bytes from `from` to `to` until `from` ends; `Ready` with the bytes
    /// moved once the write side of `to` has been shut down. `counted` hears of
    /// every chunk that crosses the agent's socket.
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        guard: &StreamGuard,
        counted: &mut dyn FnMut(usize),
    ) -> Poll<Result<u64, Stop>> {
        loop {
            if self.in_pipe == 0 && !self.read_done {
                ready!(from.poll_read_ready(cx))?;
                let pipe = match self.pipe.take() {
                    Some(pipe) => pipe,
                    None => Pipe::take()?,
                };
                let read = from.try_io(Interest::READABLE, || {
                    splice(from, &pipe.write, pipe.capacity)
                });
                match read {
                    Ok(0) => {
                        pipe.give_back();
                        self.read_done = true;
                    }
                    Ok(n) => {
                        self.pipe = Some(pipe);
                        self.in_pipe = n;
                        if self.agent == Agent::Reads {
                            counted(n);
                        }
                        if guard.tripped_now() {
                            return Poll::Ready(Err(Stop::Cut));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pipe.give_back();
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            while self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                let pipe = self.pipe.as_ref().expect("a chunk in flight has its pipe");
                match to.try_io(Interest::WRITABLE, || splice(&pipe.read, to, self.in_pipe)) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.total += n as u64;
                        if self.agent == Agent::Writes {
                            counted(n);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            if let Some(pipe) = self.pipe.take() {
                pipe.give_back();
            }
            if self.read_done {
                if !self.shut_down {
                    // The peer may be gone already; the tunnel still ends cleanly.
                    let _ = rustix::net::shutdown(to, Shutdown::Write);
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

/// One splice(2) between a socket and a pipe, non-blocking.
fn splice(
    from: impl std::os::fd::AsFd,
    to: impl std::os::fd::AsFd,
    len: usize,
) -> io::Result<usize> {
    rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use uuid::Uuid;

    use super::*;
    use crate::meter::{ConnTally, Meter};
    use crate::telemetry::Listener;

    /// Two connected loopback sockets.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    struct Tunnel {
        /// The agent's end, and the origin's end.
        agent: TcpStream,
        origin: TcpStream,
        meter: Meter,
        relay: tokio::task::JoinHandle<RelayEnd>,
    }

    async fn tunnel(early: &'static [u8], guard: StreamGuard, idle: Duration) -> Tunnel {
        let (agent, client) = socket_pair().await;
        let (upstream, origin) = socket_pair().await;
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tap = Tap::new(Arc::new(ConnTally::bound_to(counter)), Listener::Egress);
        let relay = tokio::spawn(async move {
            let stop = CancellationToken::new();
            let early = Bytes::from_static(early);
            relay(client, tap, early, upstream, idle, &guard, &stop).await
        });
        Tunnel {
            agent,
            origin,
            meter,
            relay,
        }
    }

    fn open_guard() -> StreamGuard {
        StreamGuard::from_token(CancellationToken::new())
    }

    #[tokio::test]
    async fn bulk_both_ways_arrives_intact_with_half_close_and_exact_counts() {
        let Tunnel {
            agent,
            origin,
            meter,
            relay,
        } = tunnel(b"hello", open_guard(), Duration::from_secs(5)).await;
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let (mut agent_read, mut agent_write) = agent.into_split();
        let (mut origin_read, mut origin_write) = origin.into_split();
        let sent_up = up.clone();
        let agent_writer = tokio::spawn(async move {
            agent_write.write_all(&sent_up).await.unwrap();
            agent_write.shutdown().await.unwrap(); // the agent is done sending
            agent_write
        });
        let mut at_origin = Vec::new();
        origin_read.read_to_end(&mut at_origin).await.unwrap();
        assert!(
            at_origin == [&b"hello"[..], &up].concat(),
            "upstream bytes differ"
        );
        // The other direction still flows after the half-close.
        origin_write.write_all(&down).await.unwrap();
        origin_write.shutdown().await.unwrap();
        let mut at_agent = Vec::new();
        agent_read.read_to_end(&mut at_agent).await.unwrap();
        assert!(at_agent == down, "downstream bytes differ");
        drop(agent_writer.await.unwrap());
        match relay.await.unwrap() {
            RelayEnd::Done(u, d) => assert_eq!((u, d), (3_000_005, 2_000_000)),
            other => panic!("relay ended with {other:?}"),
        }
        // The early bytes were counted when they were read with the CONNECT head.
        let drained = meter.drain();
        assert_eq!((drained[0].rx, drained[0].tx), (2_000_000, 3_000_000));
    }

    #[tokio::test]
    async fn a_tripped_guard_passes_nothing_more_on() {
        let token = CancellationToken::new();
        let Tunnel {
            mut agent,
            mut origin,
            relay,
            ..
        } = tunnel(
            b"",
            StreamGuard::from_token(token.clone()),
            Duration::from_secs(5),
        )
        .await;
        agent.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        origin.read_exact(&mut buf).await.unwrap();
        token.cancel();
        assert!(matches!(relay.await.unwrap(), RelayEnd::Cut));
        let _ = agent.write_all(b"after").await;
        let mut rest = Vec::new();
        origin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "bytes passed after the cut: {rest:?}");
    }

    #[tokio::test]
    async fn a_quiet_tunnel_ends_on_its_idle_timeout() {
        let t = tunnel(b"", open_guard(), Duration::from_millis(100)).await;
        // Both ends stay open, and silent.
        let end = tokio::time::timeout(Duration::from_secs(5), t.relay).await;
        assert!(matches!(end, Ok(Ok(RelayEnd::Idle))));
    }

    #[test]
    fn pipes_are_reused_and_the_pool_is_bounded() {
        let pipes: Vec<Pipe> = (0..POOL_KEEP + 8).map(|_| Pipe::take().unwrap()).collect();
        assert!(pipes.iter().all(|p| p.capacity >= 4096));
        pipes.into_iter().for_each(Pipe::give_back);
        assert!(POOL.lock().unwrap().len() <= POOL_KEEP);
    }
}
