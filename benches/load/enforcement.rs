//! Enforcement latency and overshoot, through the egress proxy with default
//! settings, each trial with a fresh agent whose plan allows `limit` bytes
//! (overage rate 0):
//! - requests: responses fetched back to back on one keep-alive connection; the
//!   time from the exchange that carried the socket past the limit to the first
//!   `403` is the latency;
//! - download: one response larger than the limit; the time from crossing the
//!   limit to the proxy cutting the stream;
//! - tunnel: a CONNECT tunnel to the bulk source; the time from crossing the
//!   limit to the proxy closing the tunnel.
//!
//! The overshoot is what PostgreSQL records beyond the limit once the last
//! flush has landed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::database::{BenchDb, SeededAgent};
use crate::exchange::{self, Connection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Download,
    Tunnel,
}

#[derive(Debug, Clone, Copy)]
pub struct Trial {
    pub kind: Kind,
    /// From crossing the limit to the 403 (requests) or the cut (streams).
    pub latency: Duration,
    /// Bytes on the client socket by then.
    pub client_bytes: u64,
    /// Bytes recorded in `vps_usage_periods` after settling.
    pub recorded_bytes: u64,
    pub limit: u64,
    /// Requests: the block landed while a response was under way, which was
    /// cut (the connection closed mid-body) instead of a later request
    /// getting the 403.
    pub cut_mid_response: bool,
}

impl Trial {
    pub fn overshoot(&self) -> u64 {
        self.recorded_bytes.saturating_sub(self.limit)
    }
}

fn proxy_auth(agent: &SeededAgent) -> (String, String) {
    (
        "proxy-authorization".into(),
        crate::basic_auth(agent.agent_id, &agent.token),
    )
}

/// Back-to-back requests for `response_bytes` each until the 403.
pub async fn requests(
    db: &BenchDb,
    agent: &SeededAgent,
    egress: SocketAddr,
    origin_port: u16,
    response_bytes: usize,
    limit: u64,
) -> anyhow::Result<Trial> {
    let request = exchange::get(
        &format!("http://127.0.0.1:{origin_port}/size/{response_bytes}"),
        &[
            ("host".into(), format!("127.0.0.1:{origin_port}")),
            proxy_auth(agent),
        ],
    );
    let mut conn = Connection::open(egress).await?;
    let start = Instant::now();
    let mut crossed: Option<Instant> = None;
    let mut cut_mid_response = false;
    let deadline = start + Duration::from_secs(30);
    loop {
        // Crossing is dated at the start of the exchange that crossed (conservative).
        let sent = Instant::now();
        let response = match conn.exchange(&request, false).await {
            Ok(response) => response,
            // A block past the headroom stops the response under way.
            Err(e) if is_cut(&e) && conn.written + conn.read >= limit => {
                crossed.get_or_insert(sent);
                cut_mid_response = true;
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let total = conn.written + conn.read;
        match response.status {
            200 => {}
            403 => break,
            s => bail!("enforcement trial: unexpected status {s}"),
        }
        if crossed.is_none() && total >= limit {
            crossed = Some(sent);
        }
        if Instant::now() > deadline {
            bail!("no 403 within 30 s ({total} bytes moved, limit {limit})");
        }
    }
    let blocked_at = Instant::now();
    let crossed = crossed.context("blocked before the limit was reached")?;
    let client_bytes = conn.written + conn.read;
    drop(conn);
    let trial = finish(
        db,
        agent,
        Kind::Requests,
        crossed,
        blocked_at,
        client_bytes,
        limit,
    )
    .await?;
    Ok(Trial {
        cut_mid_response,
        ..trial
    })
}

/// The proxy closed the connection under a response (a cut).
fn is_cut(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset)
}

/// One download of `size` bytes (more than `limit`), read until the proxy cuts it.
pub async fn download(
    db: &BenchDb,
    agent: &SeededAgent,
    egress: SocketAddr,
    origin_port: u16,
    size: u64,
    limit: u64,
) -> anyhow::Result<Trial> {
    let request = exchange::get(
        &format!("http://127.0.0.1:{origin_port}/size/{size}"),
        &[
            ("host".into(), format!("127.0.0.1:{origin_port}")),
            proxy_auth(agent),
        ],
    );
    let mut conn = Connection::open(egress).await?;
    let start = Instant::now();
    conn.stream
        .write_all(&request)
        .await
        .context("sending the download request")?;
    conn.written += request.len() as u64;
    stream_until_cut(db, agent, conn, Kind::Download, start, limit, Some(size)).await
}

/// A CONNECT tunnel to the bulk source, read until the proxy closes it.
pub async fn tunnel(
    db: &BenchDb,
    agent: &SeededAgent,
    egress: SocketAddr,
    bulk: SocketAddr,
    limit: u64,
) -> anyhow::Result<Trial> {
    let mut conn = Connection::open(egress).await?;
    let start = Instant::now();
    let answer = conn
        .exchange(
            &exchange::connect(&bulk.to_string(), &[proxy_auth(agent)]),
            true,
        )
        .await?;
    if answer.status != 200 {
        bail!("CONNECT answered {}", answer.status);
    }
    stream_until_cut(db, agent, conn, Kind::Tunnel, start, limit, None).await
}

async fn stream_until_cut(
    db: &BenchDb,
    agent: &SeededAgent,
    mut conn: Connection,
    kind: Kind,
    start: Instant,
    limit: u64,
    expected: Option<u64>,
) -> anyhow::Result<Trial> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut crossed = None;
    let mut body = conn.leftover.len() as u64;
    let deadline = start + Duration::from_secs(30);
    loop {
        // A reset (Err) is the proxy cutting the stream, like an EOF.
        let n: usize = conn.stream.read(&mut buf).await.unwrap_or_default();
        if n == 0 {
            break;
        }
        conn.read += n as u64;
        body += n as u64;
        if crossed.is_none() && conn.written + conn.read >= limit {
            crossed = Some(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{kind:?} not cut within 30 s ({body} bytes)");
        }
    }
    let cut_at = Instant::now();
    if expected.is_some_and(|size| body >= size) {
        bail!("{kind:?}: the whole response arrived; nothing was cut");
    }
    let crossed = crossed.context("cut before the limit was reached")?;
    let client_bytes = conn.written + conn.read;
    drop(conn);
    finish(db, agent, kind, crossed, cut_at, client_bytes, limit).await
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    db: &BenchDb,
    agent: &SeededAgent,
    kind: Kind,
    crossed: Instant,
    ended: Instant,
    client_bytes: u64,
    limit: u64,
) -> anyhow::Result<Trial> {
    // Let the last flush land (default flush interval 1 s): wait until the
    // recorded figure has not moved for two seconds.
    let mut recorded = db.bandwidth(agent.vps_id).await?;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while still_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = db.bandwidth(agent.vps_id).await?;
        if now != recorded {
            recorded = now;
            still_since = Instant::now();
        }
    }
    Ok(Trial {
        kind,
        latency: ended - crossed,
        client_bytes,
        recorded_bytes: recorded as u64,
        limit,
        cut_mid_response: false,
    })
}
