//! The egress listener: the forward proxy agents use as `HTTP_PROXY` and
//! `HTTPS_PROXY` (SPEC §4.1). Bytes are counted on the agent's client socket.
//!
//! Its stages, in order (the connection machinery, framing check and the end
//! of every request are shared with ingress, in `server` and `exchange`):
//! 1. target: absolute-form `http://` or CONNECT `host:port` -> 400;
//! 2. authentication (`Proxy-Authorization: Basic`), binding the connection to
//!    its first agent -> 407 / 503;
//! 3. enforcement (the user's decision, in memory) -> 403 `usage_blocked`;
//! 4. egress policy: the configured ports; the agent's policy on the name;
//!    resolve once; every address against the built-in and configured lists,
//!    then the agent's policy -> 403 `egress_denied` (see `agent_policy`);
//! 5. relay: CONNECT tunnels byte for byte; plain HTTP over pooled origin
//!    connections with hop-by-hop headers dropped; `ws://` upgrades relayed.

use std::future::Future;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Response, StatusCode, Uri};
use tokio::time::Instant;

use tollgate_core::config::EgressConfig;

use crate::agent_limits::AgentLimits;
use crate::agent_policy::{self, Applied, Denial, Mode, Policy};
use crate::auth;
use crate::body::ProxyBody;
use crate::decision_log::DecisionLog;
use crate::directory::{Agent, Directory};
use crate::egress_policy::{parse_host, DenyReason, EgressPolicy, Host};
use crate::exchange::Exchange;
use crate::fields::Named;
use crate::gate::StreamGuard;
use crate::headers::{Outbound, OutboundTarget};
use crate::inbound::Inbound;
use crate::relay::{Relay, Relays};
use crate::rescue::ProxyError;
use crate::server::{ClientConn, Shape, Stages};
use crate::telemetry::{self, Listener, TunnelKind};
use crate::upstream::{Connector, Pool};

/// Pool key: an origin's host, as parsed from whatever spelling the request
/// used (`0x7f.1` and `127.0.0.1` are one origin; names lowercase), its port,
/// and the compiled policy that judged its address ([`Policy::generation`];
/// 0 when no address rule applies), so a reused connection's address has
/// been judged by the policy now in force.
type OriginKey = (Host, u16, u64);

/// Shared state of the egress listener.
pub struct Egress {
    pub directory: Arc<Directory>,
    pub policy: EgressPolicy,
    /// The agents' own policies, live.
    pub policies: Arc<agent_policy::Policies>,
    pub connector: Connector,
    pub pool: Arc<Pool<OriginKey, tokio::net::TcpStream>>,
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
    /// To a destination the agent's plan keeps open whatever the decision.
    open: bool,
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

    // Not an `async fn`: its future keeps `req` where it was given rather
    // than copying it into the body's own variable.
    #[allow(clippy::manual_async_fn)]
    fn proxy(
        &self,
        req: Box<Inbound>,
        conn: &Arc<ClientConn>,
        exchange: &mut Exchange,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send {
        async move {
            let target = Target::of(&req)?;
            let (host, port) = target.host_port();
            exchange.set_destination(host, port);
            let agent = match self.authenticate(&req, conn, exchange.started()).await {
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
            let mut guard = auth::guard(&agent, Listener::Egress);
            // A destination the plan keeps open: reachable whatever the user's
            // decision, its bytes counted as any others.
            let open = host
                .name()
                .is_some_and(|name| self.policies.current().is_open(&agent, name, port));
            match open {
                true => guard = guard.open(),
                false => guard.admit(Listener::Egress).await?,
            }
            let admitted = Admitted {
                agent,
                guard,
                conn,
                open,
            };
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
}

impl Egress {
    /// Stage 2: the agent these credentials name, bound to this connection.
    async fn authenticate(
        &self,
        req: &Inbound,
        conn: &ClientConn,
        started: Instant,
    ) -> Result<Arc<Agent>, ProxyError> {
        let creds =
            auth::basic(req.fields.get(Named::ProxyAuthorization)).map_err(ProxyError::Auth)?;
        auth::check_binding(conn, creds.agent_id)?;
        let agent =
            auth::authenticate(&self.directory, creds.agent_id, creds.token(), started).await?;
        auth::bind(conn, &agent, &self.agent_limits, Listener::Egress)?;
        Ok(agent)
    }

    fn denied(&self, reason: DenyReason, host: &Host, port: u16) -> ProxyError {
        ProxyError::Denied {
            reason,
            host: host.to_string(),
            port,
            policy: None,
        }
    }

    /// Stage 4a: the agent's policy, and its verdict on the name alone when no
    /// address could change it (a refused name is never resolved).
    async fn screen(
        &self,
        agent: &Agent,
        host: &Host,
        port: u16,
        exchange: &mut Exchange,
    ) -> Result<Option<Arc<Policy>>, ProxyError> {
        let mut applied = self.policies.current().for_agent(agent);
        if let Applied::Unavailable = applied {
            // Just started: the first read of the policies is under way.
            // Boxed: rare, and kept out of every request's future.
            let read = Box::pin(self.policies.first_read(self.config.connect_timeout));
            if read.await {
                applied = self.policies.current().for_agent(agent);
            }
        }
        let policy = match applied {
            Applied::None => return Ok(None),
            Applied::Unavailable => {
                return Err(self.denied(DenyReason::PolicyUnavailable, host, port))
            }
            Applied::Policy(policy) => policy,
        };
        if let Host::Name(name) = host {
            judged(policy.judge_name(name, port), host, port, exchange)?;
        }
        Ok(Some(policy))
    }

    /// Stage 4b: resolve once, check every address against the built-in and
    /// configured lists and then the agent's policy, and connect.
    async fn connect(
        &self,
        host: &Host,
        port: u16,
        policy: Option<&Policy>,
        exchange: &mut Exchange,
    ) -> Result<(tokio::net::TcpStream, std::net::SocketAddr), ProxyError> {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        let addrs = self
            .connector
            .resolve(host, port, Some(&self.policy), deadline)
            .await?;
        if let Some(policy) = policy {
            let verdict = policy.judge_addresses(host.name(), &addrs, port);
            judged(verdict, host, port, exchange)?;
        }
        let (stream, addr) = self.connector.dial(host, port, addrs, deadline).await?;
        exchange.set_address(addr);
        Ok((stream, addr))
    }

    /// CONNECT: open the tunnel, answer 200, relay both ways.
    async fn tunnel(
        &self,
        mut req: Box<Inbound>,
        host: Host,
        port: u16,
        admitted: Admitted<'_>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.policy
            .check_connect_port(port)
            .map_err(|reason| self.denied(reason, &host, port))?;
        let policy = self.screen(&admitted.agent, &host, port, exchange).await?;
        let held = self
            .agent_limits
            .tunnel(admitted.agent.agent_id, Listener::Egress)?;
        let (upstream, addr) = self
            .connect(&host, port, policy.as_deref(), exchange)
            .await?;
        let relay = Relay {
            kind: TunnelKind::Connect,
            idle: self.config.tunnel_idle_timeout,
            guard: admitted.guard,
            conn: admitted.conn.clone(),
            held,
            watch: Some(match admitted.open {
                true => self.policies.watch(admitted.agent, &host, addr).keep_open(),
                false => self.policies.watch(admitted.agent, &host, addr),
            }),
        };
        let exchange = exchange.hand_off("tunnel", StatusCode::OK);
        let upgrade = req.on_upgrade();
        self.relays.spawn(relay, exchange, async move {
            let client = upgrade.await?;
            Ok::<_, hyper::Error>((crate::server::upgraded_client(client), upstream))
        });
        Ok(Response::new(ProxyBody::Empty))
    }

    /// Plain HTTP (absolute-form), including `ws://` upgrades. (Not an
    /// `async fn`, as `proxy`.)
    #[allow(clippy::manual_async_fn)]
    fn forward<'a>(
        &'a self,
        req: Box<Inbound>,
        (authority, host, port): (Authority, Host, u16),
        admitted: Admitted<'a>,
        exchange: &'a mut Exchange,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
        async move {
            let Admitted {
                agent, guard, conn, ..
            } = admitted;
            self.policy
                .check_http_port(port)
                .map_err(|reason| self.denied(reason, &host, port))?;
            let policy = self.screen(&agent, &host, port, exchange).await?;
            let target =
                OutboundTarget::Parsed(match req.target.uri().and_then(Uri::path_and_query) {
                    Some(path) => path.clone(),
                    None => PathAndQuery::from_static("/"),
                });
            let host_header = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
            let mut outbound = Outbound::of(req, target, host_header, &guard, exchange);
            let timeout = self.config.response_timeout;
            if let Some(client) = outbound.client_upgrade.take() {
                // Boxed, like the tunnel: rare, and large.
                return Box::pin(async {
                    let held = self.agent_limits.tunnel(agent.agent_id, Listener::Egress)?;
                    let (io, addr) = self
                        .connect(&host, port, policy.as_deref(), exchange)
                        .await?;
                    let relay = Relay {
                        kind: TunnelKind::WebSocket,
                        idle: self.config.tunnel_idle_timeout,
                        guard,
                        conn: conn.clone(),
                        held,
                        watch: Some(self.policies.watch(agent.clone(), &host, addr)),
                    };
                    let request = outbound.into_request()?;
                    self.relays
                        .upgrade(io, request, client, timeout, relay, exchange)
                        .await
                })
                .await;
            }
            let judged_by = policy
                .as_ref()
                .filter(|p| p.judges_addresses)
                .map_or(0, |p| p.generation);
            let key: OriginKey = (host.clone(), port, judged_by);
            let record = &mut *exchange;
            let open =
                move || async move { self.connect(&host, port, policy.as_deref(), record).await };
            let (response, addr) = self
                .pool
                .exchange(key, agent.agent_id, outbound, timeout, guard, open)
                .await?;
            // A pooled connection was opened by an earlier exchange.
            exchange.set_address(addr);
            Ok(response)
        }
    }
}

/// Enforce a policy's verdict; in report mode, record the would-be refusal and
/// pass.
fn judged(
    verdict: Result<(), Denial>,
    host: &Host,
    port: u16,
    exchange: &mut Exchange,
) -> Result<(), ProxyError> {
    let Err(denial) = verdict else {
        return Ok(());
    };
    match denial.mode {
        Mode::Report => {
            telemetry::policy_reported(denial.reason());
            exchange.set_denial(denial.reason(), Some(denial.rule_text()), "report");
            Ok(())
        }
        Mode::Enforce => Err(ProxyError::Denied {
            reason: match denial.rule {
                Some(_) => DenyReason::PolicyRule,
                None => DenyReason::PolicyDefault,
            },
            host: host.to_string(),
            port,
            policy: Some(Box::new(denial)),
        }),
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

    fn of(req: &Inbound) -> Result<Target, ProxyError> {
        // A target the fast path kept unparsed is origin-form: it names no
        // scheme, and is refused as a parsed target without one is, below.
        let Some(uri) = req.target.uri() else {
            return Err(ProxyError::BadRequest(
                "absolute-form request target required (this is a proxy)",
            ));
        };
        if req.method == Method::CONNECT {
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
        let Some(authority) = uri.authority() else {
            return Err(ProxyError::BadRequest(
                "absolute-form request target required",
            ));
        };
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
    match parse_host(authority.host()) {
        Some(host) => Ok(host),
        None => Err(ProxyError::BadRequest("invalid host")),
    }
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
