//! An open-loop load generator for latency at a fixed rate.
//!
//! `wrk` is closed-loop: each connection sends its next request when the last
//! response arrives. Run flat out, its percentiles measure the queue the run
//! builds, and on this 2-core machine they measure the load core as much as
//! the server (the load generator and the origin share one core, and in the
//! one-worker runs both cores end up saturated). Here requests are due at a
//! fixed rate, spread round-robin over the connections, whatever the server's
//! pace; each one's latency counts from when it was due, not from when it left.
//! A server that stalls therefore shows the stall in every request that waited
//! behind it (no coordinated omission), and at a rate below every server's
//! capacity the percentiles compare the servers, not the queues.
//!
//! One thread, `epoll(7)` over the connections and a `timerfd` that wakes it
//! when the next request is due (no timer slack: the timer is absolute and
//! nanosecond-grained). A connection whose response has not arrived when its
//! next request is due owes that request and sends it the moment the response
//! arrives; its latency still counts from the due time.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::traffic::{Run, Target};

/// How hard and how long to drive the server.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Requests due per second, over all connections.
    pub rate: u32,
    pub connections: usize,
}

/// How long requests due before the end may take to answer before they count
/// as timeouts.
const DRAIN: Duration = Duration::from_secs(5);

/// The epoll token of the timer (connections use their index).
const TIMER: u64 = u64::MAX;

/// Drive `target` at `pace` for `duration`; the run's requests per second is
/// the rate of the responses (over the run, or until the last response if
/// that came later), its percentiles their latency from their due time.
pub fn run(target: &Target, pace: &Pace, duration: Duration) -> anyhow::Result<Run> {
    anyhow::ensure!(
        pace.rate > 0 && pace.connections > 0,
        "a paced run needs a rate and connections"
    );
    let request = request_bytes(target);
    let poll = Epoll::new()?;
    let timer = Timer::new()?;
    poll.add(timer.fd.as_raw_fd(), TIMER)?;
    let mut conns = Vec::with_capacity(pace.connections);
    for i in 0..pace.connections {
        let conn = Conn::open(target)?;
        poll.add(conn.stream.as_raw_fd(), i as u64)?;
        conns.push(conn);
    }

    let start = monotonic_ns() + 10_000_000;
    let end = start + duration.as_nanos() as u64;
    let due = |n: u64| start + (n as u128 * 1_000_000_000 / pace.rate as u128) as u64;
    let mut tally = Tally::new(pace.rate as usize * duration.as_secs().max(1) as usize);
    let mut next = 0u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; pace.connections + 1];
    let mut armed = 0;
    loop {
        let now = monotonic_ns();
        while due(next) < end && due(next) <= now {
            let i = (next % conns.len() as u64) as usize;
            conns[i].dispatch(due(next), &request)?;
            next += 1;
        }
        let sending = due(next) < end;
        let waiting = conns.iter().any(Conn::busy);
        if !sending && !waiting {
            break;
        }
        if !sending && now > end + DRAIN.as_nanos() as u64 {
            tally.timeouts += conns.iter().map(Conn::outstanding).sum::<u64>();
            break;
        }
        let wake = if sending {
            due(next)
        } else {
            end + DRAIN.as_nanos() as u64
        };
        if wake != armed {
            timer.arm_at(wake)?;
            armed = wake;
        }
        for event in poll.wait(&mut events)? {
            let token = event.u64;
            if token == TIMER {
                timer.clear();
                continue;
            }
            let i = token as usize;
            let conn = &mut conns[i];
            match conn.receive(&request, &mut tally) {
                Ok(()) => {}
                Err(e) => {
                    // The server closed the connection or sent what this cannot read:
                    // what it owed fails, and a fresh connection takes its place.
                    tally.errors += conn.outstanding();
                    tally.last_error = Some(format!("{e:#}"));
                    poll.remove(conn.stream.as_raw_fd());
                    *conn = Conn::open(target)?;
                    poll.add(conn.stream.as_raw_fd(), token)?;
                }
            }
        }
    }
    // Responses that came after the last request fell due stretch the
    // window, so a server that fell behind shows a lower rate.
    let window = tally.last_response.max(end).saturating_sub(start);
    Ok(tally.into_run(window as f64 / 1e9))
}

/// `GET <path> HTTP/1.1` with the target's headers.
fn request_bytes(target: &Target) -> Vec<u8> {
    let mut head = format!("GET {} HTTP/1.1\r\n", target.path);
    for (name, value) in &target.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// One keep-alive connection: the due time of the request on the wire, and of
/// those it owes.
struct Conn {
    stream: TcpStream,
    in_flight: Option<u64>,
    owed: VecDeque<u64>,
    /// Bytes received and not yet read as a whole response.
    received: Vec<u8>,
}

impl Conn {
    fn open(target: &Target) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(target.connect)
            .with_context(|| format!("connecting to {}", target.connect))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            in_flight: None,
            owed: VecDeque::new(),
            received: Vec::with_capacity(4096),
        })
    }

    fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    fn outstanding(&self) -> u64 {
        u64::from(self.in_flight.is_some()) + self.owed.len() as u64
    }

    /// Send the request due at `due` now, or owe it if one is on the wire.
    fn dispatch(&mut self, due: u64, request: &[u8]) -> anyhow::Result<()> {
        if self.in_flight.is_some() {
            self.owed.push_back(due);
            return Ok(());
        }
        self.send(due, request)
    }

    fn send(&mut self, due: u64, request: &[u8]) -> anyhow::Result<()> {
        // A request of a few hundred bytes on an idle connection fits in its
        // socket buffer: a short write means the server stopped reading.
        match self.stream.write(request) {
            Ok(n) if n == request.len() => {
                self.in_flight = Some(due);
                Ok(())
            }
            Ok(n) => bail!(
                "the server took {n} of the request's {} bytes",
                request.len()
            ),
            Err(e) => Err(e).context("sending a request"),
        }
    }

    /// Read what arrived; every whole response is tallied against its due
    /// time, and an owed request goes out in its place.
    fn receive(&mut self, request: &[u8], tally: &mut Tally) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => {
                    self.received.extend_from_slice(&chunk[..n]);
                    // Drained; epoll says when more arrives, without a read
                    // that would only find nothing.
                    if n < chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading a response"),
            }
        }
        let now = monotonic_ns();
        while let Some((length, ok)) = whole_response(&self.received)? {
            self.received.drain(..length);
            let due = self
                .in_flight
                .take()
                .context("a response arrived with no request on the wire")?;
            tally.record(due, now, ok);
            if let Some(owed) = self.owed.pop_front() {
                self.send(owed, request)?;
            }
        }
        Ok(())
    }
}

/// The length of the whole response at the start of `bytes` and whether it
/// was a 2xx, or `None` while it is incomplete. Bodies must be framed by
/// Content-Length, as every server's is here.
fn whole_response(bytes: &[u8]) -> anyhow::Result<Option<(usize, bool)>> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end]).context("a response head not in UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .context("a response without a status line")?;
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .with_context(|| format!("a response without Content-Length: {head}"))?;
    let total = head_end + 4 + length;
    Ok((bytes.len() >= total).then_some((total, status.starts_with('2'))))
}

/// Latencies of the responses, and what failed.
struct Tally {
    latencies_ns: Vec<u64>,
    errors: u64,
    timeouts: u64,
    last_error: Option<String>,
    /// When the last response arrived (`CLOCK_MONOTONIC`, ns).
    last_response: u64,
}

impl Tally {
    fn new(expected: usize) -> Tally {
        Tally {
            latencies_ns: Vec::with_capacity(expected + expected / 8),
            errors: 0,
            timeouts: 0,
            last_error: None,
            last_response: 0,
        }
    }

    fn record(&mut self, due: u64, now: u64, ok: bool) {
        self.last_response = now;
        if ok {
            self.latencies_ns.push(now.saturating_sub(due));
        } else {
            self.errors += 1;
        }
    }

    fn into_run(mut self, window_secs: f64) -> Run {
        if let Some(e) = &self.last_error {
            eprintln!("   paced run: {} failed, last: {e}", self.errors);
        }
        self.latencies_ns.sort_unstable();
        let at = |q: f64| -> f64 {
            let n = self.latencies_ns.len();
            if n == 0 {
                return 0.0;
            }
            let index = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            self.latencies_ns[index] as f64 / 1e3
        };
        let count = self.latencies_ns.len() as u64;
        let mean_us = if count == 0 {
            0.0
        } else {
            self.latencies_ns.iter().sum::<u64>() as f64 / count as f64 / 1e3
        };
        Run {
            requests_per_sec: count as f64 / window_secs,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            mean_us,
            errors: self.errors + self.timeouts,
            requests: count,
            ..Run::default()
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock the timer runs on.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `event` is valid for the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) })
            .map(drop)
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Block until something is ready; the ready events.
    fn wait<'e>(&self, events: &'e mut [libc::epoll_event]) -> io::Result<&'e [libc::epoll_event]> {
        loop {
            // SAFETY: `events` is valid for `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.fd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            match cvt(n) {
                Ok(n) => return Ok(&events[..n as usize]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A `timerfd` on `CLOCK_MONOTONIC`, armed at absolute times.
struct Timer {
    fd: OwnedFd,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; a non-negative result is a new fd we own.
        let fd = cvt(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn arm_at(&self, at_ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is valid for the call; the old value is not asked for.
        cvt(unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        })
        .map(drop)
    }

    /// Consume the expiry so the timer stops reading as ready.
    fn clear(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: the buffer is 8 bytes, what a timerfd read needs.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
    }
}

fn cvt(result: i32) -> io::Result<i32> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}
