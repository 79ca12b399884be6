//! Seams and peers for tests that play a hostile tenant: a dialer that can only
//! ever reach loopback (so a broken refusal still sends no packet anywhere), a
//! resolver answering from a fixed table, a database relay that holds back the
//! answers carrying a given value until released, and raw HTTP/1 reading on a
//! kept-alive connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use tollgate_proxy::egress_policy::{BoxFuture, Dial, Resolve};
use tollgate_proxy::Seams;

/// Resolves names from a fixed table only.
pub struct TableResolver(pub HashMap<&'static str, Vec<IpAddr>>);

impl Resolve for TableResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let found = self
            .0
            .get(name)
            .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in table"))
        })
    }
}

/// Can only ever dial loopback, and records every attempt.
#[derive(Default)]
pub struct LoopbackOnlyDialer(pub Mutex<Vec<SocketAddr>>);

impl LoopbackOnlyDialer {
    pub fn attempts(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap().clone()
    }
}

impl Dial for LoopbackOnlyDialer {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        self.0.lock().unwrap().push(addr);
        Box::pin(async move {
            if !addr.ip().to_canonical().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "test dialer only reaches loopback",
                ));
            }
            TcpStream::connect(addr).await
        })
    }
}

/// Seams that resolve from `table` and dial only loopback through `dialer`.
pub fn loopback_seams(
    table: HashMap<&'static str, Vec<IpAddr>>,
    dialer: Arc<LoopbackOnlyDialer>,
) -> Seams {
    Seams {
        resolver: Arc::new(TableResolver(table)),
        dialer,
        ..Seams::default()
    }
}

#[derive(Debug, Default, Clone)]
struct Holding {
    /// Answers from the server containing this are held back.
    pattern: Option<Vec<u8>>,
    /// Answers held back so far.
    held: usize,
    /// Patterns to watch for in answers, and whether each went by.
    watched: Vec<(Vec<u8>, bool)>,
}

/// A TCP relay in front of PostgreSQL that can hold back the server's answers
/// that contain a given value (a token in a row) until released, and tell when
/// an answer carrying another value (a notification payload) went by. Only the
/// answers that match are delayed, so the rest of the traffic (the proxy's
/// LISTEN connection, other queries) flows as usual.
pub struct HoldingRelay {
    pub addr: SocketAddr,
    state: watch::Sender<Holding>,
    stop: CancellationToken,
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Longest pattern looked for across a read boundary.
const MAX_PATTERN: usize = 256;

impl HoldingRelay {
    /// Relay `127.0.0.1:0` to `target`.
    pub async fn start(target: SocketAddr) -> HoldingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(Holding::default());
        let stop = CancellationToken::new();
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = stop2.cancelled() => return,
                };
                let (st, stop) = (st.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_r, client_w) = client.into_split();
                    let (upstream_r, mut upstream_w) = upstream.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut client_r, &mut upstream_w).await;
                        let _ = upstream_w.shutdown().await;
                    };
                    let down = answers(upstream_r, client_w, &st);
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        HoldingRelay { addr, state, stop }
    }

    /// Hold back every answer containing `pattern` until [`HoldingRelay::release`].
    pub fn hold_answers_containing(&self, pattern: &[u8]) {
        assert!(pattern.len() <= MAX_PATTERN);
        self.state
            .send_modify(|s| s.pattern = Some(pattern.to_vec()));
    }

    /// Let held answers (and later ones) through.
    pub fn release(&self) {
        self.state.send_modify(|s| s.pattern = None);
    }

    /// Wait (up to `within`) until an answer is being held back.
    pub async fn wait_held(&self, within: Duration) {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| s.held > 0))
            .await
            .expect("an answer to hold back within the deadline")
            .unwrap();
    }

    /// Note whether an answer containing `pattern` goes by from now on.
    pub fn watch(&self, pattern: &[u8]) {
        assert!(pattern.len() <= MAX_PATTERN);
        self.state
            .send_modify(|s| s.watched.push((pattern.to_vec(), false)));
    }

    /// Wait (up to `within`) until an answer containing the watched `pattern`
    /// has been passed on.
    pub async fn wait_seen(&self, pattern: &[u8], within: Duration) {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(
            within,
            rx.wait_for(|s| s.watched.iter().any(|(p, seen)| p == pattern && *seen)),
        )
        .await
        .expect("the watched answer within the deadline")
        .unwrap();
    }

    /// `url` with its host and port replaced by the relay's.
    pub fn url_for(&self, url: &str) -> String {
        super::pg_relay::with_address(url, self.addr)
    }
}

/// Pass the server's answers on, holding back those that match.
async fn answers(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &watch::Sender<Holding>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&buf[..n]);
        let contains = |p: &[u8]| window.windows(p.len()).any(|w| w == p);
        let holding = state.borrow().clone();
        if holding.pattern.as_deref().is_some_and(contains) {
            state.send_modify(|s| s.held += 1);
            let mut rx = state.subscribe();
            let _ = rx.wait_for(|s| s.pattern.is_none()).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let seen: Vec<usize> = (holding.watched.iter().enumerate())
            .filter(|(_, (p, seen))| !seen && contains(p))
            .map(|(i, _)| i)
            .collect();
        if !seen.is_empty() {
            state.send_modify(|s| {
                for i in seen {
                    s.watched[i].1 = true;
                }
            });
        }
        tail = window[window.len().saturating_sub(MAX_PATTERN)..].to_vec();
    }
    let _ = to.shutdown().await;
}

/// One response read off a kept-alive connection: its status, head and body
/// (bodies framed by `content-length` only, as the proxy's own answers are).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// A response from its head, with room for the body its `Content-Length`
    /// announces (zeros until read).
    pub fn from_head(head: &[u8]) -> RawResponse {
        let head = String::from_utf8_lossy(head).into_owned();
        let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut response = RawResponse {
            status,
            head,
            body: Vec::new(),
        };
        let len: usize = response
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        response.body = vec![0u8; len];
        response
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Read one response (head, then `content-length` bytes of body), within 10 s.
pub async fn read_response(s: &mut TcpStream) -> RawResponse {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut response = RawResponse::from_head(&super::client::read_head(s).await);
        s.read_exact(&mut response.body).await.unwrap();
        response
    })
    .await
    .expect("a response within 10 s")
}

/// Whether the peer closes `s` within 10 s (reading and dropping what comes).
pub async fn closes(s: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .is_ok()
}
