//! Memory per idle keep-alive connection: open N connections, complete one
//! request on each, leave them open, and divide the server's RSS growth by N.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::task::JoinSet;

use crate::exchange::Connection;

/// Connections opened at once while filling up.
const OPENING_CONCURRENCY: usize = 200;

#[derive(Debug, Clone, Copy)]
pub struct IdleMemory {
    pub connections: usize,
    pub before_kib: u64,
    pub after_kib: u64,
}

impl IdleMemory {
    pub fn per_connection_kib(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 / self.connections as f64
    }
}

/// Open `n` connections to `addr`, each completing `request` once, and read the
/// server's RSS (`rss_kib`) before and after.
pub async fn measure(
    addr: SocketAddr,
    request: &[u8],
    n: usize,
    rss_kib: impl Fn() -> u64,
) -> anyhow::Result<IdleMemory> {
    // Warm up (caches, pools, lazily built state), then take the baseline.
    let mut warm = Connection::open(addr).await?;
    for i in 0..100 {
        if let Err(e) = warm.exchange(request, false).await {
            if i > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof {
                bail!("closes the connection after each response (no client keep-alive)");
            }
            return Err(e.into());
        }
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kib = rss_kib();
    let mut open: Vec<Connection> = Vec::with_capacity(n);
    while open.len() < n {
        let batch = OPENING_CONCURRENCY.min(n - open.len());
        let mut tasks = JoinSet::new();
        for _ in 0..batch {
            let request = request.to_vec();
            tasks.spawn(async move {
                let mut conn = Connection::open(addr).await?;
                let response = conn.exchange(&request, false).await?;
                anyhow::Ok((conn, response.status))
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (conn, status) = done?.with_context(|| format!("connection {}", open.len()))?;
            if status != 200 {
                bail!("idle connection setup answered {status}");
            }
            open.push(conn);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kib = rss_kib();
    // Every connection must still be open (none closed by the server meanwhile).
    let mut probe = [0u8; 1];
    for conn in &open {
        match conn.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => bail!("the server closed an idle keep-alive connection during the measurement"),
        }
    }
    drop(open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(IdleMemory {
        connections: n,
        before_kib,
        after_kib,
    })
}
