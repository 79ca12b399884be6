//! The egress listener: the forward proxy agents use as `HTTP_PROXY` and
//! `HTTPS_PROXY` (SPEC §4.1). Bytes are counted on the agent's client socket.
//!
//! Its stages, in order (the connection machinery, framing check and the end
//! of every request are shared with ingress, in `server` and `exchange`):
//! 1. target: absolute-form `http://` or CONNECT `host:port` -> 400;
//! 2. authentication (`Proxy-Authorization: Basic`), binding the connection to
//!    its first agent -> 407 / 503;
//! 3. enforcement (the user's decision, in memory) -> 403 `usage_blocked`;
//! 4. egress policy (ports; resolve once, check every address) -> 403 `egress_denied`;
//! 5. relay: CONNECT tunnels byte for byte; plain HTTP over pooled origin
//!    connections with hop-by-hop headers dropped; `ws://` upgrades relayed.

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use tollgate_core::config::EgressConfig;

use crate::agent_limits::AgentLimits;
use crate::auth;
use crate::body::ProxyBody;
use crate::decision_log::DecisionLog;
use crate::directory::{Agent, Directory};
use crate::egress_policy::{parse_host, EgressPolicy, Host};
use crate::exchange::Exchange;
use crate::gate::StreamGuard;
use crate::headers::Outbound;
use crate::relay::{Relay, Relays};
use crate::rescue::ProxyError;
use crate::server::{ClientConn, Shape, Stages};
use crate::telemetry::{Listener, TunnelKind};
use crate::upstream::{Connector, Pool};

/// Pool key: an origin's host, as parsed from whatever spelling the request
/// used (`0x7f.1` and `127.0.0.1` are one origin; names lowercase), and port.
type OriginKey = (Box<str>, u16);

/// Shared state of the egress listener.
pub struct Egress {
    pub directory: Arc<Directory>,
    pub policy: EgressPolicy,
    pub connector: Connector,
    pub pool: Arc<Pool<OriginKey>>,
    pub relays: Relays,
    pub agent_limits: Arc<AgentLimits>,
    pub config: EgressConfig,
    pub decision_log: DecisionLog,
}

/// A request that passed authentication and enforcement: whose it is, what its
/// streams watch, and the connection it came on.
struct Admitted<'a> {
    agent: Arc<Agent>,
    guard: StreamGuard,
    conn: &'a Arc<ClientConn>,
}

impl Stages for Egress {
    const SHAPE: Shape = Shape {
        listener: Listener::Egress,
        http2: false,
        meter_client: true,
    };

    fn decision_log(&self) -> &DecisionLog {
        &self.decision_log
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &Arc<ClientConn>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let target = Target::of(&req)?;
        let (host, port) = target.host_port();
        exchange.set_destination(host, port);
        let agent = match self.authenticate(&req, conn).await {
            Ok(agent) => agent,
            Err(e) => {
                // A connection no agent has bound is not counted under any
                // agent's cap: it does not get to linger after a refusal.
                if conn.agent.get().is_none() {
                    exchange.close_connection();
                }
                return Err(e);
            }
        };
        exchange.set_agent(&agent);
        let guard = auth::guard(&agent);
        guard.admit(Listener::Egress).await?;
        let admitted = Admitted { agent, guard, conn };
        match target {
            // Boxed (once per tunnel): the request future, which hyper keeps per
            // connection, stays the size the plain HTTP path needs.
            Target::Tunnel { host, port } => {
                Box::pin(self.tunnel(req, host, port, admitted, exchange)).await
            }
            Target::Http {
                authority,
                host,
                port,
            } => {
                self.forward(req, (authority, host, port), admitted, exchange)
                    .await
            }
        }
    }
}

impl Egress {
    /// Stage 2: the agent these credentials name, bound to this connection.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        conn: &ClientConn,
    ) -> Result<Arc<Agent>, ProxyError> {
        let creds = auth::basic(req.headers().get(header::PROXY_AUTHORIZATION))
            .map_err(ProxyError::Auth)?;
        auth::check_binding(conn, creds.agent_id)?;
        let agent = auth::authenticate(&self.directory, creds.agent_id, creds.token()).await?;
        auth::bind(conn, &agent, &self.agent_limits, Listener::Egress)?;
        Ok(agent)
    }

    fn denied(
        &self,
        reason: crate::egress_policy::DenyReason,
        host: &Host,
        port: u16,
    ) -> ProxyError {
        ProxyError::Denied {
            reason,
            host: host.to_string(),
            port,
        }
    }

    /// CONNECT: open the tunnel, answer 200, relay both ways.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        host: Host,
        port: u16,
        admitted: Admitted<'_>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.policy
            .check_connect_port(port)
            .map_err(|reason| self.denied(reason, &host, port))?;
        let held = self
            .agent_limits
            .tunnel(admitted.agent.agent_id, Listener::Egress)?;
        let (upstream, addr) = self
            .connector
            .open(&host, port, Some(&self.policy), self.config.connect_timeout)
            .await?;
        exchange.set_address(addr);
        let relay = Relay {
            kind: TunnelKind::Connect,
            idle: self.config.tunnel_idle_timeout,
            guard: admitted.guard,
            conn: admitted.conn.clone(),
            held,
        };
        let exchange = exchange.hand_off("tunnel", StatusCode::OK);
        self.relays.spawn(relay, exchange, async move {
            let client = hyper::upgrade::on(req).await?;
            Ok::<_, hyper::Error>((client, upstream))
        });
        Ok(Response::new(ProxyBody::Empty))
    }

    /// Plain HTTP (absolute-form), including `ws://` upgrades.
    async fn forward(
        &self,
        req: Request<Incoming>,
        (authority, host, port): (Authority, Host, u16),
        admitted: Admitted<'_>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Admitted { agent, guard, conn } = admitted;
        self.policy
            .check_http_port(port)
            .map_err(|reason| self.denied(reason, &host, port))?;
        let target = match req.uri().path_and_query() {
            Some(path) => Uri::from(path.clone()),
            None => Uri::from_static("/"),
        };
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
        let outbound = Outbound::of(req, target, host_header, &guard, exchange);
        let timeout = self.config.response_timeout;
        if let Some(client) = outbound.client_upgrade {
            // Boxed, like the tunnel: rare, and large.
            return Box::pin(async {
                let held = self.agent_limits.tunnel(agent.agent_id, Listener::Egress)?;
                let (io, addr) = self
                    .connector
                    .open(&host, port, Some(&self.policy), self.config.connect_timeout)
                    .await?;
                exchange.set_address(addr);
                let relay = Relay {
                    kind: TunnelKind::WebSocket,
                    idle: self.config.tunnel_idle_timeout,
                    guard,
                    conn: conn.clone(),
                    held,
                };
                self.relays
                    .upgrade(io, outbound.request, client, timeout, relay, exchange)
                    .await
            })
            .await;
        }
        let key: OriginKey = (host.to_string().into(), port);
        let open = || async {
            let connect_timeout = self.config.connect_timeout;
            let opened = self
                .connector
                .open(&host, port, Some(&self.policy), connect_timeout);
            opened.await
        };
        let (response, addr) = self
            .pool
            .exchange(key, agent.agent_id, outbound.request, timeout, guard, open)
            .await?;
        // A pooled connection was opened by an earlier exchange.
        exchange.set_address(addr);
        Ok(response)
    }
}

/// What a request asks the proxy to reach.
enum Target {
    Tunnel {
        host: Host,
        port: u16,
    },
    Http {
        authority: Authority,
        host: Host,
        port: u16,
    },
}

impl Target {
    fn host_port(&self) -> (&Host, u16) {
        match self {
            Target::Tunnel { host, port } | Target::Http { host, port, .. } => (host, *port),
        }
    }

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
            let port =
                port_of(authority)?.ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
            return Ok(Target::Tunnel {
                host: host_of(authority)?,
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
        Ok(Target::Http {
            host: host_of(authority)?,
            port: port_of(authority)?.unwrap_or(80),
            authority: authority.clone(),
        })
    }
}

fn host_of(authority: &Authority) -> Result<Host, ProxyError> {
    parse_host(authority.host()).ok_or(ProxyError::BadRequest("invalid host"))
}

/// The authority's port (`None` if absent or empty); 400 for anything that is
/// not a port number (`99999`, `0`), never a silent fall back to a default.
/// Userinfo has been refused already, so the port follows the host directly.
fn port_of(authority: &Authority) -> Result<Option<u16>, ProxyError> {
    let rest = authority.as_str().get(authority.host().len()..);
    match rest {
        Some("" | ":") => Ok(None),
        // Digits only: `u16` parsing would take a sign (`+80`); anything else
        // after the host (`[::1]junk`) is no port either.
        Some(rest) => match rest.strip_prefix(':') {
            Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => match port.parse::<u16>() {
                Ok(port) if port != 0 => Ok(Some(port)),
                _ => Err(ProxyError::BadRequest("invalid port")),
            },
            _ => Err(ProxyError::BadRequest("invalid port")),
        },
        None => Err(ProxyError::BadRequest("invalid authority")),
    }
}
