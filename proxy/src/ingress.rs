//! The ingress listener: users reach each agent's gateway through it (SPEC §4.2).
//! HTTP/1.1 and HTTP/2 (ALPN on TLS, prior knowledge on plaintext) from clients;
//! HTTP/1.1 to gateways. Bytes are counted on the upstream socket to the VPS.
//!
//! Per request, in order:
//! 1. framing check (HTTP/1 smuggling) -> 400;
//! 2. route: `/agents/{agent_id}/gateway/{path}?{query}` -> 404 otherwise;
//! 3. authentication (`Authorization: Bearer`, the agent's gateway token) -> 401 / 503;
//! 4. enforcement (the user's decision, in memory) -> 403 `usage_blocked`;
//! 5. the agent's VPS must be running with an address -> 503;
//! 6. relay to `http://{vps.address}:{gateway_port}/{path}?{query}` over a pooled,
//!    metered connection (WebSocket upgrades on a dedicated one), streaming both
//!    ways; connect failure 502, timeout 504.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tollgate_core::config::IngressConfig;
use tollgate_core::db::agents::VpsState;

use crate::auth;
use crate::body::ProxyBody;
use crate::directory::{Directory, Lookup};
use crate::egress_policy::{parse_host, Dial, Host, Resolve};
use crate::enforcement::StreamGuard;
use crate::framing::{Framing, FramingGuard, Verdicts};
use crate::headers::{strip_hop_by_hop, wants_upgrade};
use crate::meter::{ConnTally, MeteredIo, VpsCounter};
use crate::relay::relay;
use crate::rescue::{rescue, AuthFailure, ProxyError};
use crate::server::{self, serve_until, Limits};
use crate::telemetry::{self, GaugeGuard, Listener, TunnelKind};
use crate::upstream::{handshake, Pool, Sender};

/// Pool key: the VPS and the gateway address its connections go to.
type GatewayKey = (Uuid, Box<str>, u16);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Shared state of the ingress listener.
pub struct Ingress {
    pub directory: Arc<Directory>,
    pub resolver: Arc<dyn Resolve>,
    pub dialer: Arc<dyn Dial>,
    pub pool: Arc<Pool<GatewayKey>>,
    pub config: IngressConfig,
    /// WebSocket relays run here, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes.
    pub hard_stop: CancellationToken,
}

/// One client connection.
struct ClientConn {
    peer: SocketAddr,
    tls: bool,
    framing: Arc<Verdicts>,
}

/// Where a request goes.
struct Route {
    agent_id: Uuid,
    /// Path and query for the gateway, as received.
    target: String,
}

impl Route {
    /// `/agents/{agent_id}/gateway/{path}?{query}`; `None` for anything else.
    fn of(uri: &Uri) -> Option<Route> {
        let rest = uri.path().strip_prefix("/agents/")?;
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let agent_id = Uuid::try_parse(id).ok()?;
        let path = match rest.strip_prefix("gateway")? {
            "" => "/",
            p if p.starts_with('/') => p,
            _ => return None,
        };
        let target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        Some(Route { agent_id, target })
    }
}

impl Ingress {
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.config.max_connections,
            max_header_bytes: self.config.max_header_bytes,
            header_read_timeout: self.config.header_read_timeout,
        }
    }

    fn http2_builder(&self) -> http2::Builder<TokioExecutor> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.config.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)));
        builder
    }

    /// Serve one client connection until it closes or `shutdown` drains it.
    ///
    /// HTTP/2 is chosen by ALPN on TLS and by the connection preface on cleartext
    /// (h2c with prior knowledge); everything else is HTTP/1.1. Each protocol,
    /// and TLS, runs in its own future, so a plain HTTP/1.1 connection (the
    /// common case) holds only what it needs while it waits between requests.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        let _open = GaugeGuard::connection(Listener::Ingress);
        match tls {
            None => match sniff_preface(&stream, self.config.header_read_timeout).await {
                Some(Protocol::Http1) => self.serve_http1(stream, peer, false, shutdown).await,
                Some(Protocol::Http2) => {
                    Box::pin(self.serve_http2(stream, peer, false, shutdown)).await
                }
                None => {}
            },
            Some(acceptor) => Box::pin(self.serve_tls(stream, peer, acceptor, shutdown)).await,
        }
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: CancellationToken,
    ) {
        let handshake =
            tokio::time::timeout(self.config.header_read_timeout, acceptor.accept(stream)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!(error = %e, "ingress TLS handshake failed"),
            Err(_) => return tracing::debug!("ingress TLS handshake timed out"),
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            self.serve_http2(tls, peer, true, shutdown).await
        } else {
            self.serve_http1(tls, peer, true, shutdown).await
        }
    }

    async fn serve_http1<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        tls: bool,
        shutdown: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let framing = Arc::new(Verdicts::default());
        let io = FramingGuard::new(io, self.config.max_header_bytes, framing.clone());
        let builder = server::http1_builder(&self.limits());
        let service = self.service(peer, tls, framing);
        serve_until(
            builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            &shutdown,
        )
        .await
    }

    async fn serve_http2<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        tls: bool,
        shutdown: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let builder = self.http2_builder();
        // HTTP/2 frames its messages itself: no smuggling guard.
        let service = self.service(peer, tls, Arc::new(Verdicts::default()));
        serve_until(
            builder.serve_connection(TokioIo::new(io), service),
            &shutdown,
        )
        .await
    }

    fn service(
        self: &Arc<Self>,
        peer: SocketAddr,
        tls: bool,
        framing: Arc<Verdicts>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
    > + Clone
           + Send
           + 'static {
        let conn = Arc::new(ClientConn { peer, tls, framing });
        let this = self.clone();
        service_fn(move |req| {
            let (this, conn) = (this.clone(), conn.clone());
            async move { Ok::<_, Infallible>(this.handle(req, &conn).await) }
        })
    }

    async fn handle(&self, req: Request<Incoming>, conn: &ClientConn) -> Response<ProxyBody> {
        // hyper keeps room for one request future per open connection, busy or
        // idle; boxing the exchange keeps that room small (a few hundred bytes
        // instead of kilobytes) at one allocation per request.
        match Box::pin(self.proxy(req, conn)).await {
            Ok(response) => response,
            Err(e) => rescue(e, Listener::Ingress),
        }
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.version() < Version::HTTP_2 && conn.framing.next() == Framing::Ambiguous {
            return Err(ProxyError::BadRequest(
                "content-length together with transfer-encoding",
            ));
        }
        let route = Route::of(req.uri()).ok_or(ProxyError::NotFound)?;
        let token =
            auth::bearer(req.headers().get(header::AUTHORIZATION)).map_err(ProxyError::Auth)?;
        let agent = match self.directory.lookup(route.agent_id).await {
            Lookup::Found(agent) => agent,
            Lookup::Unknown => return Err(ProxyError::Auth(AuthFailure::UnknownAgent)),
            Lookup::Unavailable => return Err(ProxyError::DirectoryUnavailable),
        };
        if !agent.token_matches(token) {
            return Err(ProxyError::Auth(AuthFailure::BadToken));
        }
        // Take the cut token before checking, so a block landing in between still cuts.
        let cut = StreamGuard::new(&agent.gate);
        cut.check()?;
        let vps = agent.vps.as_ref().ok_or(ProxyError::NoVps)?;
        if vps.state != VpsState::Running {
            return Err(ProxyError::VpsUnavailable(match vps.state {
                VpsState::Provisioning => "vps_provisioning",
                VpsState::Stopped => "vps_stopped",
                _ => "vps_destroyed",
            }));
        }
        let address = vps
            .address
            .as_deref()
            .filter(|a| !a.is_empty())
            .ok_or(ProxyError::VpsUnavailable("vps_has_no_address"))?;
        let counter = agent.counter.clone().ok_or(ProxyError::NoVps)?;
        let port = self.config.gateway_port;

        let upgrade = req.version() < Version::HTTP_2 && wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let authority = match parse_host(address) {
            Some(Host::Ip(std::net::IpAddr::V6(ip))) => format!("[{ip}]:{port}"),
            _ => format!("{address}:{port}"),
        };
        let headers = &mut parts.headers;
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&authority)
                .map_err(|_| ProxyError::VpsUnavailable("vps_address_invalid"))?,
        );
        let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {}", conn.peer.ip()),
            None => conn.peer.ip().to_string(),
        };
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_str(&forwarded_for).expect("ip text is a header value"),
        );
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
        if let Some(host) = original_host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        let mut upstream_req = Request::new(ProxyBody::Stream(body));
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = Uri::try_from(route.target.as_str())
            .map_err(|_| ProxyError::BadRequest("invalid path"))?;
        *upstream_req.version_mut() = Version::HTTP_11;
        *upstream_req.headers_mut() = parts.headers;

        let timeout = self.config.response_timeout;
        if let Some(client_upgrade) = client_upgrade {
            // Boxed: rare, and large; the request future hyper keeps per
            // connection stays the size the plain path needs.
            return Box::pin(self.upgrade(
                upstream_req,
                client_upgrade,
                address,
                port,
                counter,
                cut,
            ))
            .await;
        }
        let key: GatewayKey = (vps.id, address.into(), port);
        // A new gateway connection is the exception; boxed for the same reason.
        let connect = || {
            Box::pin(async move {
                let io = self.open(address, port, counter).await?;
                handshake(io, false).await.map_err(ProxyError::Upstream)
            })
        };
        let response = tokio::time::timeout(timeout, self.pool.send(key, upstream_req, connect))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)??;
        Ok(respond(response, cut))
    }

    /// A WebSocket (or other) upgrade: its own gateway connection, relayed both
    /// ways once the gateway switches protocols.
    async fn upgrade(
        &self,
        upstream_req: Request<ProxyBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        address: &str,
        port: u16,
        counter: Arc<VpsCounter>,
        cut: StreamGuard,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let io = self.open(address, port, counter).await?;
        let mut sender: Sender = handshake(io, true).await.map_err(ProxyError::Upstream)?;
        let mut response = tokio::time::timeout(
            self.config.response_timeout,
            sender.send_request(upstream_req),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(ProxyError::Upstream)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let (idle, hard_stop) = (self.config.websocket_idle_timeout, self.hard_stop.clone());
            self.tracker.spawn(async move {
                let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(both) => both,
                    Err(e) => return tracing::debug!(error = %e, "upgrade did not complete"),
                };
                let _open = GaugeGuard::tunnel(Listener::Ingress, TunnelKind::WebSocket);
                let end = relay(
                    TokioIo::new(client),
                    TokioIo::new(upstream),
                    idle,
                    &cut,
                    &hard_stop,
                )
                .await;
                if matches!(end, crate::relay::RelayEnd::Cut) {
                    telemetry::cut_stream(Listener::Ingress);
                }
                tracing::debug!(?end, "websocket relay ended");
            });
            telemetry::request(Listener::Ingress, "upgraded");
            return Ok(response.map(|_| ProxyBody::Empty));
        }
        Ok(respond(response, cut))
    }

    /// Resolve (if needed) and connect to a gateway; the socket counts to the VPS.
    async fn open(
        &self,
        address: &str,
        port: u16,
        counter: Arc<VpsCounter>,
    ) -> Result<MeteredIo<TcpStream>, ProxyError> {
        let target = || format!("{address}:{port}");
        let connect = async {
            let addrs: Vec<SocketAddr> = match parse_host(address) {
                Some(Host::Ip(ip)) => vec![SocketAddr::new(ip, port)],
                Some(Host::Name(name)) => {
                    self.resolver.resolve(&name, port).await.map_err(|source| {
                        ProxyError::Resolve {
                            host: address.to_owned(),
                            source,
                        }
                    })?
                }
                None => return Err(ProxyError::VpsUnavailable("vps_address_invalid")),
            };
            let mut last = None;
            for addr in addrs {
                match self.dialer.dial(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(ProxyError::Connect {
                target: target(),
                source: last.unwrap_or_else(|| std::io::Error::other("no address")),
            })
        };
        let stream = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)??;
        Ok(MeteredIo::new(
            stream,
            Arc::new(ConnTally::bound_to(counter)),
            Listener::Ingress,
        ))
    }
}

fn respond(response: Response<Incoming>, cut: StreamGuard) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    telemetry::request(Listener::Ingress, "ok");
    Response::from_parts(parts, ProxyBody::guarded(body, cut, Listener::Ingress))
}

enum Protocol {
    Http1,
    Http2,
}

/// What a cleartext client speaks, from the first bytes it sent (peeked, not
/// consumed): HTTP/2 if they are the HTTP/2 connection preface, else HTTP/1.1.
/// `None` if the client closes, or sends nothing within `timeout`.
async fn sniff_preface(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if !PREFACE.starts_with(&buf[..n]) {
            return Some(Protocol::Http1);
        }
        if n == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // Part of the preface so far. Peeking does not consume, so the socket stays
        // readable: wait a moment for the rest instead of spinning.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
            .await
            .is_err()
        {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(s: &str) -> Option<(Uuid, String)> {
        Route::of(&s.parse::<Uri>().unwrap()).map(|r| (r.agent_id, r.target))
    }

    proptest::proptest! {
        #[test]
        fn any_gateway_path_is_passed_on_unchanged(path in "(/[A-Za-z0-9%._~-]{0,12}){0,5}", query in proptest::option::of("[A-Za-z0-9=&%]{0,20}")) {
            let id = Uuid::new_v4();
            let mut uri = format!("/agents/{id}/gateway{path}");
            let mut want = if path.is_empty() { "/".to_owned() } else { path.clone() };
            if let Some(q) = &query {
                uri.push('?');
                uri.push_str(q);
                want.push('?');
                want.push_str(q);
            }
            proptest::prop_assert_eq!(route(&uri), Some((id, want)));
        }
    }

    #[tokio::test]
    async fn cleartext_clients_are_told_apart_by_the_http2_preface() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sniff = |pieces: Vec<&'static [u8]>| {
            let listener = &listener;
            async move {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (server, _) = listener.accept().await.unwrap();
                let writer = tokio::spawn(async move {
                    for piece in pieces {
                        client.write_all(piece).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    client
                });
                let protocol = sniff_preface(&server, Duration::from_millis(500)).await;
                drop(writer.await.unwrap());
                protocol
            }
        };
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(matches!(
            sniff(vec![b"GET / HTTP/1.1\r\n"]).await,
            Some(Protocol::Http1)
        ));
        assert!(matches!(
            sniff(vec![b"POST /"]).await,
            Some(Protocol::Http1)
        ));
        assert!(matches!(sniff(vec![h2]).await, Some(Protocol::Http2)));
        assert!(matches!(
            sniff(vec![&h2[..5], &h2[5..]]).await,
            Some(Protocol::Http2)
        ));
        // Silence until the deadline, or a preface that never completes: no protocol.
        assert!(sniff(vec![]).await.is_none());
        assert!(sniff(vec![&h2[..3]]).await.is_none());
    }

    #[test]
    fn routes_keep_path_and_query_byte_for_byte() {
        let id = Uuid::new_v4();
        assert_eq!(
            route(&format!("/agents/{id}/gateway")),
            Some((id, "/".into()))
        );
        assert_eq!(
            route(&format!("/agents/{id}/gateway/")),
            Some((id, "/".into()))
        );
        assert_eq!(
            route(&format!("/agents/{id}/gateway/a/b%2Fc?x=1&y=%20")),
            Some((id, "/a/b%2Fc?x=1&y=%20".into()))
        );
        assert_eq!(
            route(&format!("/agents/{id}/gateway/?")),
            Some((id, "/?".into()))
        );
        assert_eq!(
            route(&format!("/agents/{id}/gateway//double")),
            Some((id, "//double".into()))
        );
        for bad in [
            "/",
            "/agents/",
            "/agents/nope/gateway/x",
            &format!("/agents/{id}/gatewayx"),
            &format!("/agents/{id}/other/x"),
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }
}
