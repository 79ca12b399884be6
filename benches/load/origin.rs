//! The origin every server in the harness forwards to, run as its own process
//! (`load origin`) pinned to the load-generator core:
//! - HTTP/1.1 with keep-alive: `/small` (100 bytes), `/large` (1 MiB) and
//!   `/size/{n}` (n bytes, in frames of at most 1 MiB);
//! - a bulk TCP source for CONNECT tunnels: every accepted connection gets an
//!   endless stream of bytes until it closes.
//!
//! It prints `origin http=<port> bulk=<port>` once both listeners are bound and
//! exits when its stdin closes, so it never outlives the harness.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::pin::Pin;
use std::process::{ChildStdout, Command, Stdio};
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
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
                        Some(body) => Response::new(body),
                        None => {
                            let mut r = Response::new(Sized::new(0, Bytes::new()));
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

fn body_for(path: &str, large: &Bytes) -> Option<Sized> {
    let n = match path {
        "/small" => SMALL_BYTES as u64,
        "/large" => LARGE_BYTES as u64,
        _ => path.strip_prefix("/size/")?.parse().ok()?,
    };
    Some(Sized::new(n, large.clone()))
}

/// A body of exactly `left` bytes, sent in frames of at most `chunk.len()`.
struct Sized {
    left: u64,
    chunk: Bytes,
}

impl Sized {
    fn new(left: u64, chunk: Bytes) -> Self {
        Sized { left, chunk }
    }
}

impl Body for Sized {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
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
        let (process, line, stdout) = start_internal("origin", cpu, &[], log)?;
        Ok(Origin {
            http_port: port_in(&line, "http=")?,
            bulk_port: port_in(&line, "bulk=")?,
            process,
            _stdout: stdout,
        })
    }
}

/// Start this harness's `command` pinned to `cpu`; returns its first output line.
pub fn start_internal(
    command: &str,
    cpu: usize,
    args: &[&str],
    log: &std::path::Path,
) -> anyhow::Result<(Process, String, ChildStdout)> {
    let exe = std::env::current_exe().context("locating the harness executable")?;
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu.to_string())
        .arg(exe)
        .arg(command)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut process = Process::spawn_with_stdout(command, cmd, log)?;
    let mut stdout = process.child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(&mut stdout)
        .read_line(&mut line)
        .with_context(|| format!("reading the {command}'s ports"))?;
    Ok((process, line, stdout))
}

pub fn port_in(line: &str, key: &str) -> anyhow::Result<u16> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("expected {key}<port> in {line:?}"))
}
