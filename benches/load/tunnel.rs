//! CONNECT bulk throughput: one tunnel (or one direct connection) to the
//! origin's bulk source, read as fast as possible for a fixed time; and a bare
//! relay (`load relay`, tokio's two-way copy with 256 KiB buffers and nothing
//! else) to show what any relay process gets on this machine.

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

/// Relay every connection on a loopback port to `upstream`, byte for byte, until
/// stdin closes. Runs in the `relay` child process.
pub fn serve_bare_relay(upstream: u16) -> anyhow::Result<()> {
    std::thread::spawn(|| {
        use std::io::Read;
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("relay port={}", listener.local_addr()?.port());
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let size = 256 * 1024;
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, size, size)
                        .await;
            });
        }
    })
}
