//! Errors become HTTP responses here and nowhere else (linkerd's "rescue"). The
//! request path returns typed [`ProxyError`]s saying which side failed; this
//! module picks the status, headers and JSON body, and the outcome label for
//! metrics. Database and upstream error text never reaches a client.

use std::io;

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::agent_limits::Limit;
use crate::agent_policy::Denial;
use crate::body::{ProxyBody, StreamCut};
use crate::egress_policy::DenyReason;
use crate::gate::{Blocked, StreamGuard};
use crate::telemetry::{self, Listener};

/// Header naming why an egress destination was refused.
pub const DENY_REASON_HEADER: &str = "x-tollgate-deny-reason";

/// What was wrong with the credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Scheme,
    Malformed,
    UnknownAgent,
    BadToken,
    /// The credential was revoked while its request was under way.
    Revoked,
    /// The connection already belongs to another agent.
    OtherAgent,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Scheme => "scheme",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnknownAgent => "unknown_agent",
            AuthFailure::BadToken => "bad_token",
            AuthFailure::Revoked => "revoked",
            AuthFailure::OtherAgent => "other_agent",
        }
    }

    /// The reason a client is told. Unknown agents, wrong tokens and revoked
    /// credentials get one answer, so a client cannot probe which agent ids
    /// exist; metrics and logs keep the precise reason.
    pub fn public_reason(self) -> &'static str {
        match self {
            AuthFailure::UnknownAgent | AuthFailure::BadToken | AuthFailure::Revoked => {
                "invalid_credentials"
            }
            other => other.as_str(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Client: credentials missing or wrong.
    #[error("authentication failed: {}", .0.as_str())]
    Auth(AuthFailure),
    /// Client: the agent directory cannot confirm the agent (database unreachable).
    #[error("cannot verify the agent: database unreachable")]
    DirectoryUnavailable,
    /// Client: the user's traffic is blocked by their plan and budget.
    #[error("usage blocked: {}", .0.reason)]
    Blocked(Blocked),
    /// Client: the egress policy refuses this destination.
    #[error("destination {host}:{port} refused: {}", .reason.as_str())]
    Denied {
        reason: DenyReason,
        host: String,
        port: u16,
        /// The agent's policy and rule, when it is what refused.
        policy: Option<Box<Denial>>,
    },
    /// Client: malformed or unacceptable request.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Client: the request body failed while it was being passed on (malformed
    /// chunked framing, a client that went away).
    #[error("the request body failed")]
    ClientBody(#[source] hyper::Error),
    /// Client: the agent reached one of its per-agent caps.
    #[error("per-agent limit reached: {}", .0.as_str())]
    TooMany(Limit),
    /// Client: no such route (ingress).
    #[error("not found")]
    NotFound,
    /// The agent has no VPS to meter against.
    #[error("the agent has no VPS")]
    NoVps,
    /// Ingress: the agent's VPS is not running or has no address.
    #[error("the agent's VPS is not reachable: {0}")]
    VpsUnavailable(&'static str),
    /// Upstream: the destination name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    /// Upstream: connecting failed.
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    /// Upstream: no connection or response in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// Upstream: the exchange failed.
    #[error("upstream failed")]
    Upstream(#[source] hyper::Error),
    /// Upstream: a bodiless exchange failed (`h1`), or its response was malformed.
    #[error("upstream exchange failed")]
    UpstreamExchange(#[source] io::Error),
}

impl From<Limit> for ProxyError {
    fn from(limit: Limit) -> Self {
        ProxyError::TooMany(limit)
    }
}

impl From<Blocked> for ProxyError {
    fn from(b: Blocked) -> Self {
        ProxyError::Blocked(b)
    }
}

impl ProxyError {
    /// Whose fault a failed upstream exchange was: the user's traffic stopped by
    /// `guard` (a block, or a revoked credential, cut the request body), the
    /// client's (its request body failed), or the upstream's.
    pub fn from_upstream(error: hyper::Error, guard: &StreamGuard) -> ProxyError {
        if let Err(blocked) = guard.check() {
            return ProxyError::Blocked(blocked);
        }
        if guard.revoked() {
            return ProxyError::Auth(AuthFailure::Revoked);
        }
        let mut source = std::error::Error::source(&error);
        while let Some(s) = source {
            if s.is::<StreamCut>() {
                return ProxyError::Auth(AuthFailure::Revoked);
            }
            source = s.source();
        }
        match error.is_user() {
            true => ProxyError::ClientBody(error),
            false => ProxyError::Upstream(error),
        }
    }

    /// `self`, with an upstream failure attributed as [`ProxyError::from_upstream`] does.
    pub fn attributed(self, guard: &StreamGuard) -> ProxyError {
        match self {
            ProxyError::Upstream(e) => ProxyError::from_upstream(e, guard),
            ProxyError::UpstreamExchange(e) => match guard.check() {
                Err(blocked) => ProxyError::Blocked(blocked),
                Ok(()) if guard.revoked() => ProxyError::Auth(AuthFailure::Revoked),
                Ok(()) => ProxyError::UpstreamExchange(e),
            },
            other => other,
        }
    }

    /// The `outcome` label of `tollgate_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::Auth(_) => "auth_failed",
            ProxyError::DirectoryUnavailable => "unavailable",
            ProxyError::Blocked(_) => "blocked",
            ProxyError::Denied { .. } => "denied",
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => "bad_request",
            ProxyError::TooMany(_) => "agent_limit",
            ProxyError::NotFound => "not_found",
            ProxyError::NoVps | ProxyError::VpsUnavailable(_) => "vps_unavailable",
            ProxyError::Resolve { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream(_)
            | ProxyError::UpstreamExchange(_) => "upstream_error",
            ProxyError::UpstreamTimeout => "upstream_timeout",
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The response for `error` on `listener`, with its reason counted. (The
/// request itself is recorded where it ends, in `exchange`.)
pub fn rescue(error: ProxyError, listener: Listener) -> Response<ProxyBody> {
    let mut response = match &error {
        ProxyError::Auth(failure) => {
            telemetry::auth_failure(listener, failure.as_str());
            let (status, challenge_header, challenge) = match listener {
                Listener::Egress => (
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    header::PROXY_AUTHENTICATE,
                    "Basic realm=\"tollgate\"",
                ),
                Listener::Ingress => (
                    StatusCode::UNAUTHORIZED,
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"tollgate\"",
                ),
            };
            let mut r = json_response(
                status,
                json!({"error": "unauthorized", "reason": failure.public_reason()}),
            );
            r.headers_mut()
                .insert(challenge_header, HeaderValue::from_static(challenge));
            if *failure == AuthFailure::OtherAgent {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
        ProxyError::DirectoryUnavailable => {
            let mut r = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "unavailable", "reason": "cannot verify credentials right now; retry shortly"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        ProxyError::Blocked(Blocked { reason, period }) => {
            telemetry::blocked_request(listener, reason.as_str());
            json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "usage_blocked", "reason": reason.as_str(), "period": period.start().to_string()}),
            )
        }
        ProxyError::Denied {
            reason,
            host,
            port,
            policy,
        } => {
            telemetry::egress_denied(reason.as_str());
            let mut body = json!({"error": "egress_denied", "reason": reason.as_str(), "host": host, "port": port});
            if let Some(denial) = policy {
                body["policy"] = json!(&*denial.policy);
                body["rule"] = match &denial.rule {
                    Some(rule) => json!({"id": rule.id, "rule": &*rule.text}),
                    None => json!({"id": null, "rule": "default deny"}),
                };
            }
            let mut r = json_response(StatusCode::FORBIDDEN, body);
            r.headers_mut().insert(
                DENY_REASON_HEADER,
                HeaderValue::from_static(reason.as_str()),
            );
            r
        }
        ProxyError::BadRequest(what) => {
            let mut r = json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "bad_request", "reason": what}),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        ProxyError::ClientBody(_) => {
            let mut r = json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "bad_request", "reason": "the request body is malformed or incomplete"}),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        ProxyError::TooMany(limit) => {
            let mut r = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "too_many_requests", "reason": limit.as_str()}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if *limit != Limit::Tunnels {
                // The connection is not bound to the agent: do not let it linger.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
        ProxyError::NotFound => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        ProxyError::NoVps => match listener {
            Listener::Egress => json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "no_vps", "reason": "the agent has no VPS"}),
            ),
            Listener::Ingress => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "vps_unavailable", "reason": "no_vps"}),
            ),
        },
        ProxyError::VpsUnavailable(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "vps_unavailable", "reason": reason}),
        ),
        ProxyError::Resolve { host, .. } => json_response(
            StatusCode::BAD_GATEWAY,
            json!({"error": "upstream_unresolvable", "host": host}),
        ),
        ProxyError::Connect { .. } | ProxyError::Upstream(_) | ProxyError::UpstreamExchange(_) => {
            json_response(
                StatusCode::BAD_GATEWAY,
                json!({"error": "upstream_unreachable"}),
            )
        }
        ProxyError::UpstreamTimeout => json_response(
            StatusCode::GATEWAY_TIMEOUT,
            json!({"error": "upstream_timeout"}),
        ),
    };
    if matches!(
        error,
        ProxyError::Resolve { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Upstream(_)
            | ProxyError::UpstreamExchange(_)
    ) {
        tracing::debug!(error = %error, source = ?std::error::Error::source(&error), "upstream failure");
    }
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}
