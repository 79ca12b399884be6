//! The origin every server in the harness forwards to, run as its own process
//! (`load origin`) pinned to the load-generator core:
//! - HTTP/1.1 with keep-alive: `/small` (100 bytes), `/large` (1 MiB) and
//!   `/size/{n}` (n bytes, n <= 1 MiB);
//! - a bulk TCP source for CONNECT tunnels: every accepted connection gets an
//!   endless stream of bytes until it closes.
//!
//! It prints `origin http=<port> bulk=<port>` once both listeners are bound and
//! exits when its stdin closes, so it never outlives the harness.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdout, Command, Stdio};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::servers::Process;

/// Size of the small response body.
pub const SMALL_BYTES: usize = 100;
/// Size of the large response body.
pub const LARGE_BYTES: usize = 1 << 20;
/// Write size of the bulk source.
const BULK_CHUNK: usize = 256 * 1024;

/// Serve until stdin closes. Runs in the `origin` child process.
pub fn serve() -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let bulk = TcpListener::bind("127.0.0.1:0").await?;
        println!(
            "origin http={} bulk={}",
            http.local_addr()?.port(),
            bulk.local_addr()?.port()
        );
        std::io::stdout().flush()?;
        tokio::spawn(serve_bulk(bulk));
        serve_http(http).await
    })
}

async fn serve_http(listener: TcpListener) -> anyhow::Result<()> {
    let large = Bytes::from(vec![b'x'; LARGE_BYTES]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let large = large.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = body_for(req.uri().path(), &large);
                async move {
                    Ok::<_, Infallible>(match body {
                        Some(body) => Response::new(Full::new(body)),
                        None => {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn body_for(path: &str, large: &Bytes) -> Option<Bytes> {
    match path {
        "/small" => Some(large.slice(..SMALL_BYTES)),
        "/large" => Some(large.clone()),
        _ => {
            let n: usize = path.strip_prefix("/size/")?.parse().ok()?;
            (n <= LARGE_BYTES).then(|| large.slice(..n))
        }
    }
}

async fn serve_bulk(listener: TcpListener) {
    let chunk = vec![b'b'; BULK_CHUNK];
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let chunk = chunk.clone();
        tokio::spawn(async move { while stream.write_all(&chunk).await.is_ok() {} });
    }
}

/// The origin process and its ports.
pub struct Origin {
    pub http_port: u16,
    pub bulk_port: u16,
    pub process: Process,
    _stdout: ChildStdout,
}

impl Origin {
    /// Start `load origin` pinned to `cpu`.
    pub fn start(cpu: usize, log: &std::path::Path) -> anyhow::Result<Origin> {
        let exe = std::env::current_exe().context("locating the harness executable")?;
        let mut cmd = Command::new("taskset");
        cmd.arg("-c")
            .arg(cpu.to_string())
            .arg(exe)
            .arg("origin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = Process::spawn_with_stdout("origin", cmd, log)?;
        let mut stdout = process.child.stdout.take().context("origin stdout")?;
        let mut line = String::new();
        BufReader::new(&mut stdout)
            .read_line(&mut line)
            .context("reading the origin's ports")?;
        let port = |key: &str| -> anyhow::Result<u16> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("origin printed {line:?}"))
        };
        Ok(Origin {
            http_port: port("http=")?,
            bulk_port: port("bulk=")?,
            process,
            _stdout: stdout,
        })
    }
}
