//! The ingress listener: users reach each agent's gateway through it (SPEC §4.2).
//! HTTP/1.1 and HTTP/2 (ALPN on TLS, prior knowledge on plaintext) from clients;
//! HTTP/1.1 to gateways. Bytes are counted on the upstream socket to the VPS.
//!
//! Its stages, in order (the connection machinery, framing check and the end
//! of every request are shared with egress, in `server` and `exchange`):
//! 1. route: `/agents/{agent_id}/gateway/{path}?{query}` -> 404 otherwise;
//! 2. authentication (`Authorization: Bearer`, the agent's gateway token) -> 401 / 503;
//! 3. enforcement (the user's decision, in memory) -> 403 `usage_blocked`;
//! 4. the agent's VPS must be running with an address -> 503;
//! 5. relay to `http://{vps.address}:{gateway_port}/{path}?{query}` over a pooled,
//!    metered connection (WebSocket upgrades on a dedicated one), streaming both
//!    ways; connect failure 502, timeout 504.

use std::future::Future;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Response, Uri};
use uuid::Uuid;

use tollgate_core::config::IngressConfig;
use tollgate_core::db::agents::{VpsRecord, VpsState};

use crate::agent_limits::AgentLimits;
use crate::auth;
use crate::body::ProxyBody;
use crate::decision_log::DecisionLog;
use crate::directory::Directory;
use crate::egress_policy::{parse_host, Host};
use crate::exchange::Exchange;
use crate::fields::Named;
use crate::headers::{Forwarding, Outbound, OutboundTarget};
use crate::inbound::{Inbound, Target};
use crate::meter::{ConnTally, MeteredIo};
use crate::relay::{Relay, Relays};
use crate::rescue::ProxyError;
use crate::server::{ClientConn, Shape, Stages};
use crate::telemetry::{Listener, TunnelKind};
use crate::upstream::{Connector, Pool};

/// Pool key: the VPS and the gateway address its connections go to, as the
/// `host:port` its requests name (shared bytes: a clone allocates nothing).
type GatewayKey = (Uuid, HeaderValue);

/// Shared state of the ingress listener.
pub struct Ingress {
    pub directory: Arc<Directory>,
    pub connector: Connector,
    pub pool: Arc<Pool<GatewayKey, MeteredIo<tokio::net::TcpStream>>>,
    pub relays: Relays,
    pub agent_limits: Arc<AgentLimits>,
    pub config: IngressConfig,
    pub decision_log: DecisionLog,
}

/// Where a request goes.
struct Route {
    agent_id: Uuid,
    /// Path and query for the gateway, as received.
    target: String,
}

impl Route {
    /// `/agents/{agent_id}/gateway/{path}?{query}`; `None` for anything else.
    fn of(target: &Target) -> Option<Route> {
        let rest = target.path().strip_prefix("/agents/")?;
        // The id ends at the first `/`. A hyphenated UUID, the form every
        // link carries, is 36 bytes and holds none: looked at there first,
        // without a search.
        let (id, rest) = match (rest.get(..36), rest.as_bytes().get(36)) {
            (Some(id), Some(b'/')) => (id, &rest[37..]),
            (Some(id), None) => (id, ""),
            _ => rest.split_once('/').unwrap_or((rest, "")),
        };
        let agent_id = Uuid::try_parse(id).ok()?;
        let path = match rest.strip_prefix("gateway")? {
            "" => "/",
            p if p.starts_with('/') => p,
            _ => return None,
        };
        let query = target.query();
        // Built in place, sized once: this runs for every request.
        let mut target = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        Some(Route { agent_id, target })
    }
}

impl Stages for Ingress {
    const SHAPE: Shape = Shape {
        listener: Listener::Ingress,
        http2: true,
        meter_client: false,
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
            // (`let ... else`, not `ok_or`: an error made eagerly is dropped on
            // every request that does not need it.)
            let Some(route) = Route::of(&req.target) else {
                return Err(ProxyError::NotFound);
            };
            let token =
                auth::bearer(req.fields.get(Named::Authorization)).map_err(ProxyError::Auth)?;
            let started = exchange.started();
            let agent = auth::authenticate(&self.directory, route.agent_id, token, started).await?;
            exchange.set_agent(&agent);
            let guard = auth::guard(&agent, Listener::Ingress);
            guard.admit(Listener::Ingress).await?;
            exchange.hold(
                self.agent_limits
                    .request(agent.agent_id, Listener::Ingress)?,
            );
            let Some(vps) = agent.vps.as_ref() else {
                return Err(ProxyError::NoVps);
            };
            let gateway = agent
                .gateway
                .get_or_init(|| Gateway::of(vps, self.config.gateway_port))
                .as_ref()
                .map_err(|&reason| ProxyError::VpsUnavailable(reason))?;
            exchange.set_destination_text(gateway.text.clone(), gateway.port);
            let Some(counter) = agent.counter.clone() else {
                return Err(ProxyError::NoVps);
            };

            // A cut of the client's target, which was parsed: written as it is.
            let target = OutboundTarget::Cut(route.target);
            // An HTTP/2 client names the host it asked for here, not in `Host`.
            let authority = req.target.uri().and_then(Uri::authority).cloned();
            let mut outbound =
                Outbound::of(req, target, gateway.authority.clone(), &guard, exchange);
            let client = Forwarding {
                peer: conn.peer_text().clone(),
                tls: conn.tls,
            };
            outbound.forward(client, authority.as_ref());

            // The socket to the VPS is the one that counts.
            let open = || async {
                let (io, addr) = self
                    .connector
                    .open(
                        &gateway.host,
                        gateway.port,
                        None,
                        self.config.connect_timeout,
                    )
                    .await
                    .map_err(|e| match e {
                        ProxyError::Resolve { .. }
                        | ProxyError::Connect { .. }
                        | ProxyError::UpstreamTimeout => e,
                        _ => ProxyError::VpsUnavailable("vps_address_invalid"),
                    })?;
                let io = MeteredIo::new(
                    io,
                    Arc::new(ConnTally::bound_to(counter.clone())),
                    Listener::Ingress,
                );
                Ok::<_, ProxyError>((io, addr))
            };
            let timeout = self.config.response_timeout;
            if let Some(client) = outbound.client_upgrade.take() {
                // Boxed: rare, and large; the request future hyper keeps per
                // connection stays the size the plain path needs.
                return Box::pin(async {
                    let held = self
                        .agent_limits
                        .tunnel(agent.agent_id, Listener::Ingress)?;
                    let (io, addr) = open().await?;
                    exchange.set_address(addr);
                    let relay = Relay {
                        kind: TunnelKind::WebSocket,
                        idle: self.config.websocket_idle_timeout,
                        guard,
                        conn: conn.clone(),
                        held,
                        watch: None,
                    };
                    let request = outbound.into_request()?;
                    self.relays
                        .upgrade(io, request, client, timeout, relay, exchange)
                        .await
                })
                .await;
            }
            let key: GatewayKey = (vps.id, gateway.authority.clone());
            let (response, addr) = self
                .pool
                .exchange(key, agent.agent_id, outbound, timeout, guard, open)
                .await?;
            exchange.set_address(addr);
            Ok(response)
        }
    }
}

/// The agent's gateway: its VPS must be running, with an address. Made once
/// per directory entry (`Agent::gateway`); the ingress gateway port is fixed
/// for the life of the proxy.
pub struct Gateway {
    host: Host,
    port: u16,
    /// The host as text, for the exchange's record.
    text: Arc<str>,
    /// `host:port`, as the `Host` header the gateway gets.
    authority: HeaderValue,
}

impl Gateway {
    /// The gateway of `vps` on `port`, or why there is none (the reason of a
    /// 503 `vps_unavailable`).
    fn of(vps: &VpsRecord, port: u16) -> Result<Gateway, &'static str> {
        if vps.state != VpsState::Running {
            return Err(match vps.state {
                VpsState::Provisioning => "vps_provisioning",
                VpsState::Stopped => "vps_stopped",
                _ => "vps_destroyed",
            });
        }
        let address = vps
            .address
            .as_deref()
            .filter(|a| !a.is_empty())
            .ok_or("vps_has_no_address")?;
        let host = parse_host(address).ok_or("vps_address_invalid")?;
        let text = host.to_string();
        let authority =
            HeaderValue::try_from(format!("{text}:{port}")).map_err(|_| "vps_address_invalid")?;
        Ok(Gateway {
            host,
            port,
            text: text.into(),
            authority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route of `s`, parsed, and kept as its bytes where it can be: the
    /// two must agree.
    fn route(s: &str) -> Option<(Uuid, String)> {
        let parsed = Target::Uri(s.parse::<Uri>().unwrap());
        let route = Route::of(&parsed).map(|r| (r.agent_id, r.target));
        if let Ok(kept) = Target::origin(bytes::Bytes::copy_from_slice(s.as_bytes())) {
            let kept = Route::of(&kept).map(|r| (r.agent_id, r.target));
            assert_eq!(kept, route, "{s}");
        }
        route
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

        /// The target cut from any target the client's side accepted is one
        /// itself: written unparsed, it is what hyper's client would send.
        #[test]
        fn a_cut_target_parses_as_itself(
            rest in "([/?][-A-Za-z0-9/?#%&=._~!$'()*+,;:@\"{}|^`\\[\\]<>]{0,30})?"
        ) {
            let id = Uuid::new_v4();
            let uri = format!("/agents/{id}/gateway{rest}");
            let Ok(uri) = uri.parse::<Uri>() else {
                return Ok(());
            };
            if let Some(route) = Route::of(&Target::Uri(uri.clone())) {
                let parsed = Uri::try_from(route.target.as_str());
                proptest::prop_assert!(parsed.is_ok(), "{:?} from {}", route.target, uri);
                let parsed = parsed.unwrap();
                proptest::prop_assert_eq!(
                    parsed.path_and_query().map(|p| p.as_str()),
                    Some(route.target.as_str())
                );
            }
        }
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
        // The id's other forms route too.
        for other in [id.simple().to_string(), id.braced().to_string()] {
            let path = format!("/agents/{other}/gateway/x");
            assert_eq!(route(&path), Some((id, "/x".into())), "{path}");
        }
        assert_eq!(route(&format!("/agents/{id}")), None);
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
