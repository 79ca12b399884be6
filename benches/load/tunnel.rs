//! CONNECT bulk throughput: one tunnel (or one direct connection) to the
//! origin's bulk source, read as fast as possible for a fixed time, with the CPU
//! time the relaying process spent meanwhile.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;

use crate::exchange::{self, Connection};
use crate::servers::Process;

/// A forward proxy to tunnel through, with the headers its CONNECT needs.
pub struct Via {
    pub proxy: SocketAddr,
    pub headers: Vec<(String, String)>,
}

/// One bulk transfer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tunnel {
    pub bytes: u64,
    pub secs: f64,
    /// CPU time of the relaying process (and its descendants) during the
    /// transfer, seconds; `None` for a direct connection.
    pub relay_cpu_secs: Option<f64>,
}

impl Tunnel {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs
    }

    /// CPU seconds the relay spent per GiB it relayed.
    pub fn cpu_secs_per_gib(&self) -> Option<f64> {
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        self.relay_cpu_secs.map(|cpu| cpu / gib)
    }
}

/// Read from `bulk`, directly or through `via`, for `duration`; `relay` is the
/// process in between whose CPU time is counted (the proxy, or a reference
/// relay listening at `bulk`).
pub async fn throughput(
    via: Option<&Via>,
    bulk: SocketAddr,
    duration: Duration,
    relay: Option<&Process>,
) -> anyhow::Result<Tunnel> {
    let mut conn = match via {
        None => Connection::open(bulk).await?,
        Some(via) => {
            let mut conn = Connection::open(via.proxy).await?;
            let answer = conn
                .exchange(&exchange::connect(&bulk.to_string(), &via.headers), true)
                .await
                .context("CONNECT")?;
            if answer.status != 200 {
                bail!("CONNECT answered {}", answer.status);
            }
            conn
        }
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = conn.leftover.len() as u64;
    let cpu_before = relay.map(Process::tree_cpu_secs);
    let start = Instant::now();
    while start.elapsed() < duration {
        let n = conn.stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the tunnel closed after {total} bytes");
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let relay_cpu_secs = relay
        .zip(cpu_before)
        .map(|(p, before)| p.tree_cpu_secs() - before);
    Ok(Tunnel {
        bytes: total,
        secs,
        relay_cpu_secs,
    })
}
