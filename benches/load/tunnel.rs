//! CONNECT bulk throughput: one tunnel (or one direct connection) to the
//! origin's bulk source, read as fast as possible for a fixed time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;

use crate::exchange::{self, Connection};

/// A forward proxy to tunnel through, with the headers its CONNECT needs.
pub struct Via {
    pub proxy: SocketAddr,
    pub headers: Vec<(String, String)>,
}

/// Bytes per second received from `bulk`, directly or through `via`.
pub async fn throughput(
    via: Option<&Via>,
    bulk: SocketAddr,
    duration: Duration,
) -> anyhow::Result<f64> {
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
    let start = Instant::now();
    while start.elapsed() < duration {
        let n = conn.stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the tunnel closed after {total} bytes");
        }
        total += n as u64;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
