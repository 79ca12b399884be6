//! Enforcement latency and overshoot, through the egress proxy with default
//! settings: an agent whose plan allows `limit` bytes (overage rate 0) fetches
//! responses back to back on one keep-alive connection. The time from the read
//! that carried its socket past the limit to the first `403` is the latency; the
//! bytes PostgreSQL holds beyond the limit once the last flush landed are the
//! overshoot.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::database::{BenchDb, SeededAgent};
use crate::exchange::{self, Connection};

#[derive(Debug, Clone, Copy)]
pub struct Trial {
    /// From crossing the limit to the 403.
    pub latency: Duration,
    /// Bytes on the client socket when the 403 had arrived.
    pub client_bytes: u64,
    /// Bytes recorded in `vps_usage_periods` after settling.
    pub recorded_bytes: u64,
    pub limit: u64,
    /// Client throughput before the block, bytes/s.
    pub rate: f64,
}

impl Trial {
    pub fn overshoot(&self) -> u64 {
        self.recorded_bytes.saturating_sub(self.limit)
    }
}

/// One trial with a fresh agent whose plan allows `limit` bytes.
pub async fn trial(
    db: &BenchDb,
    agent: &SeededAgent,
    egress: SocketAddr,
    origin_port: u16,
    response_bytes: usize,
    limit: u64,
) -> anyhow::Result<Trial> {
    let auth = crate::basic_auth(agent.agent_id, &agent.token);
    let request = exchange::get(
        &format!("http://127.0.0.1:{origin_port}/size/{response_bytes}"),
        &[
            ("host".into(), format!("127.0.0.1:{origin_port}")),
            ("proxy-authorization".into(), auth),
        ],
    );
    let mut conn = Connection::open(egress).await?;
    let start = Instant::now();
    let mut crossed: Option<Instant> = None;
    let deadline = start + Duration::from_secs(30);
    loop {
        // Crossing is dated at the start of the exchange that crossed (conservative).
        let sent = Instant::now();
        let response = conn.exchange(&request, false).await?;
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
    let rate = client_bytes as f64 / (blocked_at - start).as_secs_f64();
    drop(conn);
    // Let the last flush land (default flush interval 1 s), then read the ledger's result.
    let mut recorded = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        recorded = db.bandwidth(agent.vps_id).await? as u64;
        if recorded >= client_bytes {
            break;
        }
    }
    Ok(Trial {
        latency: blocked_at - crossed,
        client_bytes,
        recorded_bytes: recorded,
        limit,
        rate,
    })
}
