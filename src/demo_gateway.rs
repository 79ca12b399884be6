//! The demo agent gateway `tollgate dev` runs behind the demo VPS, also the
//! origin the test suite drives: echoes requests as JSON, streams bodies of any
//! size, serves server-sent events and a WebSocket echo, and counts the bytes
//! that cross its own sockets and the connections it accepted.
//!
//! Routes:
//! - `/echo...` (any method): `{"method","path","query","headers":{..},"body_len","body_sum"}`
//! - `/bytes/{n}`: n bytes with content-length; `/chunked/{n}`: n bytes, chunked
//! - `/hop-response`: a response carrying hop-by-hop headers the proxy must drop
//! - `/sse/{count}/{interval_ms}`: server-sent events, one per interval
//! - `/ws`: WebSocket echo (text, binary, ping/pong, close; the text `bye` makes
//!   the gateway close first)
//! - `/status/{code}`: an empty response with that status

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, io::Error>;

/// Byte and connection counts of an origin's sockets.
#[derive(Debug, Default)]
pub struct SocketStats {
    pub read: AtomicU64,
    pub written: AtomicU64,
    pub connections: AtomicU64,
}

pub struct DemoGateway {
    pub addr: SocketAddr,
    pub stats: Arc<SocketStats>,
    stop: CancellationToken,
}

impl Drop for DemoGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DemoGateway {
    /// Plain HTTP on a free loopback port.
    pub async fn start() -> DemoGateway {
        Self::start_with(None).await
    }

    /// HTTPS on a free loopback port with the given server config.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> DemoGateway {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    /// Serve on `listener` (e.g. bound to the configured gateway port).
    pub fn on(listener: TcpListener) -> DemoGateway {
        Self::serve(listener, None)
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> DemoGateway {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        Self::serve(listener, tls)
    }

    fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> DemoGateway {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(SocketStats::default());
        let stop = CancellationToken::new();
        let (s, st) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                s.connections.fetch_add(1, Ordering::Relaxed);
                let io = Counted {
                    inner: stream,
                    stats: s.clone(),
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_conn(io).await,
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(io).await {
                                serve_conn(tls).await
                            }
                        }
                    }
                });
            }
        });
        DemoGateway { addr, stats, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// (bytes read, bytes written) on this origin's sockets so far.
    pub fn socket_bytes(&self) -> (u64, u64) {
        (
            self.stats.read.load(Ordering::SeqCst),
            self.stats.written.load(Ordering::SeqCst),
        )
    }

    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }
}

async fn serve_conn<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: I) {
    let service = service_fn(|req| async move { Ok::<_, Infallible>(route(req).await) });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn route(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["bytes", n] => stream_bytes(n.parse().unwrap_or(0), true),
        ["chunked", n] => stream_bytes(n.parse().unwrap_or(0), false),
        ["sse", count, interval] => {
            sse(count.parse().unwrap_or(3), interval.parse().unwrap_or(100))
        }
        ["status", code] => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() =
                StatusCode::from_u16(code.parse().unwrap_or(200)).unwrap_or(StatusCode::OK);
            r
        }
        ["hop-response"] => Response::builder()
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=origin")
            .header("x-end-to-end", "1")
            .body(full("hop"))
            .unwrap(),
        ["ws"] => websocket(req),
        _ => echo(req).await,
    }
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let mut len: u64 = 0;
    let mut sum: u64 = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
            sum = data
                .iter()
                .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
        }
    }
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": len,
        "body_sum": sum,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(full(json.to_string()))
        .unwrap()
}

/// The checksum `echo` reports for `data`.
pub fn body_sum(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

/// The byte at offset `i` of a `/bytes/{n}` body.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn stream_bytes(n: u64, with_length: bool) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures_util::stream::unfold(0u64, move |offset| async move {
        if offset >= n {
            return None;
        }
        let len = CHUNK.min(n - offset);
        let data: Vec<u8> = (offset..offset + len).map(pattern).collect();
        Some((
            Ok::<_, io::Error>(Frame::data(Bytes::from(data))),
            offset + len,
        ))
    });
    let mut builder = Response::builder().header("content-type", "application/octet-stream");
    if with_length {
        builder = builder.header("content-length", n);
    }
    builder
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap()
}

fn sse(count: u32, interval_ms: u64) -> Response<Body> {
    let events = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= count {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        Some((
            Ok::<_, io::Error>(Frame::data(Bytes::from(format!(
                "id: {i}\ndata: tick {i}\n\n"
            )))),
            i + 1,
        ))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(events)))
        .unwrap()
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(400)
            .body(full("not a websocket request"))
            .unwrap();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Echo text and binary; "bye" makes the gateway close first. Reading on
        // after a close frame lets tungstenite answer it, so both directions of
        // the closing handshake complete.
        use tokio_tungstenite::tungstenite::Message;
        while let Some(Ok(msg)) = ws.next().await {
            let sent = match msg {
                Message::Text(ref t) if t.as_str() == "bye" => ws.close(None).await,
                Message::Text(_) | Message::Binary(_) => ws.send(msg).await,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap()
}

/// Counts bytes crossing a socket.
pub struct Counted<T> {
    pub inner: T,
    pub stats: Arc<SocketStats>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.stats
            .read
            .fetch_add((buf.filled().len() - before) as u64, Ordering::SeqCst);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.stats.written.fetch_add(n as u64, Ordering::SeqCst);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
