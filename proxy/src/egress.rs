//! The egress listener: the forward proxy agents use as `HTTP_PROXY` and
//! `HTTPS_PROXY` (SPEC §4.1). Bytes are counted on the agent's client socket.
//!
//! Per request, in order:
//! 1. framing and target checks (smuggling, userinfo, authority) -> 400;
//! 2. authentication (`Proxy-Authorization: Basic`), binding the connection to
//!    its first agent -> 407 / 503;
//! 3. enforcement (the user's decision, in memory) -> 403 `usage_blocked`;
//! 4. egress policy (ports; resolve once, check every address) -> 403 `egress_denied`;
//! 5. relay: CONNECT tunnels byte for byte; plain HTTP over pooled origin
//!    connections with hop-by-hop headers dropped; `ws://` upgrades relayed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tollgate_core::config::EgressConfig;

use crate::auth;
use crate::body::ProxyBody;
use crate::directory::{Agent, Directory, Lookup};
use crate::egress_policy::{parse_host, Dial, EgressPolicy, Host, Resolve};
use crate::enforcement::StreamGuard;
use crate::framing::{Framing, FramingGuard, Verdicts};
use crate::headers::{strip_hop_by_hop, wants_upgrade};
use crate::meter::{ConnTally, MeteredIo};
use crate::relay::{relay, RelayEnd};
use crate::rescue::{rescue, AuthFailure, ProxyError};
use crate::server::{self, serve_until, Limits};
use crate::telemetry::{self, GaugeGuard, Listener, TunnelKind};
use crate::upstream::{handshake, Pool};

/// Pool key: an origin's host and port as requested.
type OriginKey = (Box<str>, u16);

/// Shared state of the egress listener.
pub struct Egress {
    pub directory: Arc<Directory>,
    pub policy: EgressPolicy,
    pub resolver: Arc<dyn Resolve>,
    pub dialer: Arc<dyn Dial>,
    pub pool: Arc<Pool<OriginKey>>,
    pub config: EgressConfig,
    /// Tunnels and upgrades run as tasks here, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes: tunnels end.
    pub hard_stop: CancellationToken,
}

/// One client connection: its meter tally, the agent it is bound to, and the
/// framing verdicts of its requests.
struct ClientConn {
    tally: Arc<ConnTally>,
    agent: OnceLock<Uuid>,
    framing: Arc<Verdicts>,
}

impl Egress {
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.config.max_connections,
            max_header_bytes: self.config.max_header_bytes,
            header_read_timeout: self.config.header_read_timeout,
        }
    }

    /// Serve one client connection until it closes or `shutdown` drains it. TLS
    /// runs in its own boxed future, so a plain connection (the common case)
    /// holds only what it needs while it waits between requests.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        let _open = GaugeGuard::connection(Listener::Egress);
        let tally = Arc::new(ConnTally::unbound());
        let io = MeteredIo::new(stream, tally.clone(), Listener::Egress);
        match tls {
            None => self.serve_http1(io, tally, shutdown).await,
            Some(acceptor) => Box::pin(self.serve_tls(io, tally, acceptor, shutdown)).await,
        }
    }

    async fn serve_tls(
        self: Arc<Self>,
        io: MeteredIo<TcpStream>,
        tally: Arc<ConnTally>,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: CancellationToken,
    ) {
        let handshake =
            tokio::time::timeout(self.config.header_read_timeout, acceptor.accept(io)).await;
        match handshake {
            Ok(Ok(tls)) => self.serve_http1(tls, tally, shutdown).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "egress TLS handshake failed"),
            Err(_) => tracing::debug!("egress TLS handshake timed out"),
        }
    }

    async fn serve_http1<I>(
        self: Arc<Self>,
        io: I,
        tally: Arc<ConnTally>,
        shutdown: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let framing = Arc::new(Verdicts::default());
        let conn = Arc::new(ClientConn {
            tally,
            agent: OnceLock::new(),
            framing: framing.clone(),
        });
        let io = FramingGuard::new(io, self.config.max_header_bytes, framing);
        let builder = server::http1_builder(&self.limits());
        let this = self.clone();
        let service = service_fn(move |req| {
            let (this, conn) = (this.clone(), conn.clone());
            async move { Ok::<_, Infallible>(this.handle(req, &conn).await) }
        });
        serve_until(
            builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            &shutdown,
        )
        .await
    }

    async fn handle(&self, req: Request<Incoming>, conn: &ClientConn) -> Response<ProxyBody> {
        // hyper keeps room for one request future per open connection, busy or
        // idle; boxing the exchange keeps that room small (a few hundred bytes
        // instead of kilobytes) at one allocation per request.
        match Box::pin(self.proxy(req, conn)).await {
            Ok(response) => response,
            Err(e) => rescue(e, Listener::Egress),
        }
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if conn.framing.next() == Framing::Ambiguous {
            return Err(ProxyError::BadRequest(
                "content-length together with transfer-encoding",
            ));
        }
        let target = Target::of(&req)?;
        let agent = self.authenticate(&req, conn).await?;
        // Take the cut token before checking, so a block landing in between still cuts.
        let cut = StreamGuard::new(&agent.gate);
        cut.check()?;
        match target {
            // Boxed (once per tunnel): the request future, which hyper keeps per
            // connection, stays the size the plain HTTP path needs.
            Target::Tunnel { host, port } => Box::pin(self.tunnel(req, &host, port, cut)).await,
            Target::Http {
                authority,
                host,
                port,
            } => self.forward(req, authority, &host, port, cut).await,
        }
    }

    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        conn: &ClientConn,
    ) -> Result<Arc<Agent>, ProxyError> {
        let creds = auth::basic(req.headers().get(header::PROXY_AUTHORIZATION))
            .map_err(ProxyError::Auth)?;
        if conn
            .agent
            .get()
            .is_some_and(|bound| *bound != creds.agent_id)
        {
            return Err(ProxyError::Auth(AuthFailure::OtherAgent));
        }
        let agent = match self.directory.lookup(creds.agent_id).await {
            Lookup::Found(agent) => agent,
            Lookup::Unknown => return Err(ProxyError::Auth(AuthFailure::UnknownAgent)),
            Lookup::Unavailable => return Err(ProxyError::DirectoryUnavailable),
        };
        if !agent.token_matches(creds.token()) {
            return Err(ProxyError::Auth(AuthFailure::BadToken));
        }
        let counter = agent.counter.as_ref().ok_or(ProxyError::NoVps)?;
        // HTTP/1 serves one request at a time per connection, so this cannot race.
        let bound = *conn.agent.get_or_init(|| agent.agent_id);
        if bound != agent.agent_id || !conn.tally.bind(counter) {
            // Same agent, but its VPS changed under the open connection.
            return Err(ProxyError::Auth(AuthFailure::OtherAgent));
        }
        Ok(agent)
    }

    /// CONNECT: open the tunnel, answer 200, relay both ways.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        host: &str,
        port: u16,
        cut: StreamGuard,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.policy
            .check_connect_port(port)
            .map_err(|reason| ProxyError::Denied {
                reason,
                host: host.to_owned(),
                port,
            })?;
        let upstream = self.open(host, port).await?;
        let (idle, hard_stop) = (self.config.tunnel_idle_timeout, self.hard_stop.clone());
        self.tracker.spawn(async move {
            let client = match hyper::upgrade::on(req).await {
                Ok(upgraded) => upgraded,
                Err(e) => return tracing::debug!(error = %e, "CONNECT client went away before the tunnel opened"),
            };
            let _open = GaugeGuard::tunnel(Listener::Egress, TunnelKind::Connect);
            log_relay_end(relay(TokioIo::new(client), upstream, idle, &cut, &hard_stop).await, "tunnel");
        });
        telemetry::request(Listener::Egress, "tunnel");
        Ok(Response::new(ProxyBody::Empty))
    }

    /// Plain HTTP (absolute-form), including `ws://` upgrades.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        authority: Authority,
        host: &str,
        port: u16,
        cut: StreamGuard,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.policy
            .check_http_port(port)
            .map_err(|reason| ProxyError::Denied {
                reason,
                host: host.to_owned(),
                port,
            })?;
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        // We answered `Expect: 100-continue` on this hop already (hyper sends the
        // 100 when the body is first read); the origin gets the body directly.
        parts.headers.remove(header::EXPECT);
        let host_value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
        parts.headers.insert(header::HOST, host_value);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut upstream_req = Request::new(ProxyBody::Stream(body));
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() =
            Uri::try_from(path).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        *upstream_req.version_mut() = Version::HTTP_11;
        *upstream_req.headers_mut() = parts.headers;

        if let Some(client_upgrade) = client_upgrade {
            // Boxed, like the tunnel: rare, and large.
            return Box::pin(self.upgrade(upstream_req, client_upgrade, host, port, cut)).await;
        }

        let key: OriginKey = (host.into(), port);
        // A new origin connection is the exception; boxed so the pooled path's
        // future stays small.
        let connect = || {
            Box::pin(async {
                handshake(self.open(host, port).await?, false)
                    .await
                    .map_err(ProxyError::Upstream)
            })
        };
        let response = self.pool.send(key, upstream_req, connect).await?;
        Ok(self.respond(response, cut))
    }

    /// A `ws://` (or other) upgrade: its own origin connection, relayed both ways
    /// once the origin switches protocols.
    async fn upgrade(
        &self,
        upstream_req: Request<ProxyBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        host: &str,
        port: u16,
        cut: StreamGuard,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let io = self.open(host, port).await?;
        let mut sender = handshake(io, true).await.map_err(ProxyError::Upstream)?;
        let mut response = sender
            .send_request(upstream_req)
            .await
            .map_err(ProxyError::Upstream)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let (idle, hard_stop) = (self.config.tunnel_idle_timeout, self.hard_stop.clone());
            self.tracker.spawn(async move {
                let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(both) => both,
                    Err(e) => return tracing::debug!(error = %e, "upgrade did not complete"),
                };
                let _open = GaugeGuard::tunnel(Listener::Egress, TunnelKind::WebSocket);
                log_relay_end(
                    relay(
                        TokioIo::new(client),
                        TokioIo::new(upstream),
                        idle,
                        &cut,
                        &hard_stop,
                    )
                    .await,
                    "upgrade",
                );
            });
            telemetry::request(Listener::Egress, "upgraded");
            return Ok(response.map(|_| ProxyBody::Empty));
        }
        Ok(self.respond(response, cut))
    }

    fn respond(&self, response: Response<Incoming>, cut: StreamGuard) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        telemetry::request(Listener::Egress, "ok");
        Response::from_parts(parts, ProxyBody::guarded(body, cut, Listener::Egress))
    }

    /// Resolve `host` once, check every address against the policy, and connect to
    /// the first checked address that answers.
    async fn open(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let parsed = parse_host(host).ok_or(ProxyError::BadRequest("invalid host"))?;
        let addrs: Vec<SocketAddr> = match &parsed {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Host::Name(name) => {
                let resolved =
                    tokio::time::timeout_at(deadline.into(), self.resolver.resolve(name, port))
                        .await
                        .map_err(|_| ProxyError::UpstreamTimeout)?;
                resolved.map_err(|source| ProxyError::Resolve {
                    host: host.to_owned(),
                    source,
                })?
            }
        };
        if addrs.is_empty() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
            return Err(ProxyError::Resolve {
                host: host.to_owned(),
                source,
            });
        }
        for addr in &addrs {
            self.policy
                .check_ip(addr.ip())
                .map_err(|reason| ProxyError::Denied {
                    reason,
                    host: host.to_owned(),
                    port,
                })?;
        }
        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline.into(), self.dialer.dial(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => return Err(ProxyError::UpstreamTimeout),
            }
        }
        Err(ProxyError::Connect {
            target: format!("{host}:{port}"),
            source: last_error.unwrap_or_else(|| std::io::Error::other("no address answered")),
        })
    }
}

/// What a request asks the proxy to reach.
enum Target {
    Tunnel {
        host: String,
        port: u16,
    },
    Http {
        authority: Authority,
        host: String,
        port: u16,
    },
}

impl Target {
    fn of(req: &Request<Incoming>) -> Result<Target, ProxyError> {
        let uri = req.uri();
        if req.method() == Method::CONNECT {
            // authority-form: host:port, nothing else.
            let authority = uri
                .authority()
                .filter(|_| {
                    uri.scheme().is_none()
                        && uri.path_and_query().is_none_or(|p| p.as_str().is_empty())
                })
                .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
            if authority.as_str().contains('@') {
                return Err(ProxyError::BadRequest("userinfo in CONNECT authority"));
            }
            let port = authority
                .port_u16()
                .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
            if port == 0 {
                return Err(ProxyError::BadRequest("CONNECT port 0"));
            }
            return Ok(Target::Tunnel {
                host: authority.host().to_owned(),
                port,
            });
        }
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(ProxyError::BadRequest("https:// URLs go through CONNECT"));
            }
            Some(_) => return Err(ProxyError::BadRequest("only http:// URLs are proxied")),
            None => {
                return Err(ProxyError::BadRequest(
                    "absolute-form request target required (this is a proxy)",
                ))
            }
        }
        let authority = uri.authority().ok_or(ProxyError::BadRequest(
            "absolute-form request target required",
        ))?;
        if authority.as_str().contains('@') {
            return Err(ProxyError::BadRequest("userinfo in the request URI"));
        }
        let port = authority.port_u16().unwrap_or(80);
        if port == 0 {
            return Err(ProxyError::BadRequest("port 0"));
        }
        Ok(Target::Http {
            host: authority.host().to_owned(),
            authority: authority.clone(),
            port,
        })
    }
}

fn log_relay_end(end: RelayEnd, what: &'static str) {
    match end {
        RelayEnd::Done(up, down) => tracing::debug!(what, up, down, "relay finished"),
        RelayEnd::Error(e) => tracing::debug!(what, error = %e, "relay ended with an error"),
        RelayEnd::Idle => tracing::debug!(what, "relay closed: idle"),
        RelayEnd::Cut => {
            telemetry::cut_stream(Listener::Egress);
            tracing::info!(what, "relay closed: the user's traffic is blocked");
        }
        RelayEnd::Shutdown => tracing::debug!(what, "relay closed: shutdown drain deadline"),
    }
}
