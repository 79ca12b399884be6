//! Peers and seams for tests that load the proxy the way a hostile tenant
//! would: a resolver that sends every `*.pool.test` name to loopback, an
//! origin that counts the connections it holds open, generated spellings of
//! the loopback address, raw uploads that record what they managed to write,
//! and reading the admin listener's metrics.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use tollgate_proxy::egress_policy::{BoxFuture, Resolve};
use tollgate_proxy::Seams;

use super::hostile::LoopbackOnlyDialer;

/// Names under this suffix resolve to 127.0.0.1; every other name fails.
pub const POOL_SUFFIX: &str = ".pool.test";

/// Resolves `*.pool.test` to 127.0.0.1 and nothing else.
pub struct PoolTestResolver;

impl Resolve for PoolTestResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let found = name
            .ends_with(POOL_SUFFIX)
            .then(|| vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)]);
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not a pool.test name"))
        })
    }
}

/// Seams that resolve `*.pool.test` to loopback and can only ever dial loopback.
pub fn loopback_seams() -> (Seams, Arc<LoopbackOnlyDialer>) {
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let seams = Seams {
        resolver: Arc::new(PoolTestResolver),
        dialer: dialer.clone(),
        ..Seams::default()
    };
    (seams, dialer)
}

/// An HTTP/1.1 origin on 127.0.0.1:0 that answers every request with a small
/// `200` (after reading the body) and counts the connections it holds open.
pub struct CountingOrigin {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicU64>,
    peak: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for CountingOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Decrements the open count when a connection's task ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CountingOrigin {
    pub async fn start() -> CountingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, accepted, peak) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let stop = CancellationToken::new();
        let (o, a, p, st) = (open.clone(), accepted.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(r) => r, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                a.fetch_add(1, Ordering::SeqCst);
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let guard = OpenGuard(o.clone());
                let st = st.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    let service =
                        service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        });
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = st.cancelled() => {}
                    }
                });
            }
        });
        CountingOrigin {
            addr,
            open,
            accepted,
            peak,
            stop,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Most connections open at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Forget the peak so far (start measuring a new phase from what is open now).
    pub fn reset_peak(&self) {
        self.peak.store(self.open(), Ordering::SeqCst);
    }
}

/// Spellings of one IPv4 octet (or trailing part) value: decimal, octal and
/// hex with leading zeros and either case of the `x` and the digits.
fn part_spellings(value: u32, count: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    push(value.to_string());
    for zeros in 0..count {
        let pad = "0".repeat(zeros);
        push(format!("0{pad}{value:o}"));
        push(format!("0x{pad}{value:x}"));
        push(format!("0X{pad}{value:X}"));
    }
    out.truncate(count);
    out
}

/// At least `n` distinct spellings of 127.0.0.1 (four-, three-, two- and
/// one-part forms, decimal/octal/hex, leading zeros, case), each of which
/// `inet_aton` reads as 127.0.0.1.
pub fn loopback_spellings(n: usize) -> Vec<String> {
    let mut out = vec![
        "127.0.0.1".to_owned(),
        "127.1".to_owned(),
        "127.0.1".to_owned(),
        "0x7f.1".to_owned(),
        "0177.0.0.1".to_owned(),
        "2130706433".to_owned(),
        "0x7f000001".to_owned(),
        "017700000001".to_owned(),
        "127.0.0.1.".to_owned(),
    ];
    let (a, b, c, d) = (
        part_spellings(127, 7),
        part_spellings(0, 7),
        part_spellings(0, 7),
        part_spellings(1, 7),
    );
    'full: for a in &a {
        for b in &b {
            for c in &c {
                for d in &d {
                    if out.len() >= n * 2 {
                        break 'full;
                    }
                    out.push(format!("{a}.{b}.{c}.{d}"));
                }
            }
        }
    }
    for a in part_spellings(127, 8) {
        for rest in part_spellings(1, 8) {
            out.push(format!("{a}.{rest}"));
            out.push(format!("{a}.0.{rest}"));
        }
    }
    for whole in part_spellings(0x7f00_0001, 8) {
        out.push(whole);
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|s| seen.insert(s.clone()));
    // Interleave the forms so any prefix mixes them.
    let step = 7;
    let mut mixed = Vec::with_capacity(out.len());
    for start in 0..step {
        mixed.extend(out.iter().skip(start).step_by(step).cloned());
    }
    mixed.truncate(n);
    assert_eq!(mixed.len(), n, "enough loopback spellings");
    mixed
}

/// What a raw upload managed to do: bytes the kernel accepted from the client,
/// what came back, and how long it took.
#[derive(Debug)]
pub struct Upload {
    pub written: u64,
    pub response: Vec<u8>,
    /// When the first byte of the response (or the close) arrived.
    pub answered: tokio::time::Instant,
    pub elapsed: Duration,
}

impl Upload {
    pub fn status(&self) -> u16 {
        String::from_utf8_lossy(self.response.get(9..12).unwrap_or_default())
            .parse()
            .unwrap_or(0)
    }

    /// The JSON body of the response, if it has one.
    pub fn json(&self) -> Option<serde_json::Value> {
        let at = self.response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        serde_json::from_slice(&self.response[at..]).ok()
    }
}

/// How a raw upload sends its body.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    /// `content-length` of the whole size, written as fast as the peer reads.
    Length,
    /// Chunked, one chunk of `chunk` bytes every `every`.
    PacedChunks { every: Duration },
}

/// Write `head` (ending with the blank line) and a body of `size` bytes in
/// pieces of `chunk` to `addr`, while reading the response to EOF. Stops
/// writing at the first write error; waits at most `within` in all.
pub async fn raw_upload(
    addr: SocketAddr,
    head: String,
    size: u64,
    chunk: usize,
    framing: Framing,
    within: Duration,
) -> Upload {
    let started = tokio::time::Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    let writer = tokio::spawn(async move {
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        count.fetch_add(head.len() as u64, Ordering::SeqCst);
        let piece = vec![b'u'; chunk];
        let mut sent = 0u64;
        while sent < size {
            let n = (size - sent).min(chunk as u64) as usize;
            let ok = match framing {
                Framing::Length => w.write_all(&piece[..n]).await.map(|_| n),
                Framing::PacedChunks { every } => {
                    tokio::time::sleep(every).await;
                    let mut frame = format!("{n:x}\r\n").into_bytes();
                    frame.extend_from_slice(&piece[..n]);
                    frame.extend_from_slice(b"\r\n");
                    w.write_all(&frame).await.map(|_| frame.len())
                }
            };
            match ok {
                Ok(bytes) => {
                    count.fetch_add(bytes as u64, Ordering::SeqCst);
                    sent += n as u64;
                }
                Err(_) => return,
            }
        }
        if matches!(framing, Framing::PacedChunks { .. }) && w.write_all(b"0\r\n\r\n").await.is_ok()
        {
            count.fetch_add(5, Ordering::SeqCst);
        }
        // Keep the write side open: the response decides when this ends.
        std::future::pending::<()>().await;
    });
    let mut response = vec![0u8; 64 * 1024];
    let deadline = started + within;
    let first = tokio::time::timeout_at(deadline, r.read(&mut response))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let answered = tokio::time::Instant::now();
    response.truncate(first);
    if first > 0 {
        let _ = tokio::time::timeout_at(deadline, r.read_to_end(&mut response)).await;
    }
    writer.abort();
    let _ = writer.await;
    Upload {
        written: written.load(Ordering::SeqCst),
        response,
        answered,
        elapsed: started.elapsed(),
    }
}

/// The admin listener's `/metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    let (status, text) = super::proxy::http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    text
}

/// The value of the series `name_and_labels` (exactly as rendered, labels in
/// order) in `text`; 0 if absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
