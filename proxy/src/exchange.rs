//! Where every request ends, whatever path it took (pingora's logging phase,
//! smokescreen's canonical decision line).
//!
//! An [`Exchange`] is opened when a request arrives and travels with it: in the
//! response body of a plain exchange (ending when the body has been handed to the
//! client, was cut, or the client went away), or into the relay task of a tunnel
//! or upgrade (ending when the relay ends). It ends exactly once, and its end is
//! recorded there and only there: `tollgate_requests_total{listener,outcome}`,
//! one structured event (target `tollgate::request`, level DEBUG) with the
//! agent, method, outcome, status, how it ended, bytes each way and duration,
//! and, when the decision log is on, one [`Decision`] with who, where and why
//! (`decision_log`). None of them carries a token, a header value or (unless
//! the decision log is configured to) a query string.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::agent_limits::Held;
use crate::body::{BoxError, KeptLines, ProxyBody};
use crate::decision_log::{AgentIds, Decision, DecisionLog, Denial};
use crate::directory::Agent;
use crate::egress_policy::Host;
use crate::h1::HeadLines;
use crate::inbound::Inbound;
use crate::meter::{ConnTally, OTHER_HOST};
use crate::rescue::{rescue, ProxyError};
use crate::telemetry::{self, Listener};

/// How an exchange ended, after its response head (or tunnel) was under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The response body, or both directions of a relay, finished.
    Complete,
    /// The user became blocked, or their credential was revoked, mid-stream.
    Cut,
    /// No traffic either way for the idle timeout (relays).
    Idle,
    /// The client went away, or an I/O error ended it.
    Aborted,
    /// The drain deadline of a shutdown passed.
    Shutdown,
    /// The agent's egress policy forbids the destination: it changed while
    /// the tunnel was open, or the TLS SNI named a host it refuses.
    Forbidden,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Complete => "complete",
            Ended::Cut => "cut",
            Ended::Idle => "idle",
            Ended::Aborted => "aborted",
            Ended::Shutdown => "shutdown",
            Ended::Forbidden => "forbidden",
        }
    }
}

/// Where an egress exchange goes: the host as the request named it (IP
/// literals in their canonical form, names lowercase), its port, and the
/// address the proxy connected to, once it has.
#[derive(Debug, Clone)]
pub struct Destination {
    pub host: Arc<str>,
    pub port: u16,
    pub addr: Option<SocketAddr>,
}

/// One request (or tunnel) from arrival to its end.
#[derive(Debug)]
pub struct Exchange {
    listener: Listener,
    method: Method,
    started: Instant,
    agent: Option<AgentIds>,
    destination: Option<Destination>,
    /// The path the decision log records (only taken when it is on).
    path: Option<Box<str>>,
    /// Why the destination was refused, or would have been (report mode).
    denial: Option<Box<Denial>>,
    log: DecisionLog,
    outcome: &'static str,
    status: u16,
    /// Request body bytes passed on, when the request has a body.
    upload: Option<Arc<AtomicU64>>,
    /// Close the client connection after the response.
    close: bool,
    /// Its place under its agent's cap, released when it ends.
    held: Option<Held>,
    /// The client connection's tally when the client is the VPS (egress): the
    /// exchange's bytes are attributed to the destination it names (`meter`).
    tally: Option<Arc<ConnTally>>,
    /// False once recorded, or handed to a relay.
    open: bool,
}

impl Exchange {
    /// Open the record of `req`, arrived on `listener`, whose end goes to `log`.
    /// (Inlined into its caller, which builds it in its box: called, it was
    /// built on the stack and its 232 bytes copied in.)
    #[inline(always)]
    pub fn begin(listener: Listener, req: &Inbound, log: &DecisionLog) -> Self {
        Self {
            listener,
            method: req.method.clone(),
            started: Instant::now(),
            agent: None,
            destination: None,
            path: log.path_of(req),
            denial: None,
            log: log.clone(),
            outcome: "ok",
            status: 0,
            upload: None,
            close: false,
            held: None,
            tally: None,
            open: true,
        }
    }

    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// When the request arrived: the clock reading the directory's freshness
    /// check shares.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Attribute the bytes of the client connection `tally` counts, the VPS's
    /// own socket, to the destination this exchange names.
    pub fn attribute_bytes_of(&mut self, tally: Arc<ConnTally>) {
        self.tally = Some(tally);
    }

    /// Attribute the connection's bytes so far to this exchange's destination
    /// (a long response under way).
    fn attribute_now(&self) {
        if let Some(tally) = &self.tally {
            tally.attribute();
        }
    }

    /// The authenticated agent, its user and its VPS, for the events.
    pub fn set_agent(&mut self, agent: &Agent) {
        self.agent = Some(AgentIds {
            agent_id: agent.agent_id,
            user_id: agent.user_id,
            vps_id: agent.vps.as_ref().map(|vps| vps.id),
        });
    }

    /// The destination the request names (egress), once its target is parsed.
    pub fn set_destination(&mut self, host: &Host, port: u16) {
        let text: Arc<str> = match host {
            Host::Name(name) => Arc::from(name.as_str()),
            Host::Ip(_) => Arc::from(host.to_string()),
        };
        self.set_destination_text(text, port);
    }

    /// The destination as text already made: the VPS gateway an ingress
    /// request goes to (its text shared by every request to it).
    pub fn set_destination_text(&mut self, host: Arc<str>, port: u16) {
        if let Some(tally) = &self.tally {
            tally.destination(&host);
        }
        self.destination = Some(Destination {
            host,
            port,
            addr: None,
        });
    }

    /// The address the proxy connected to for this exchange.
    pub fn set_address(&mut self, addr: SocketAddr) {
        if let Some(destination) = &mut self.destination {
            destination.addr = Some(addr);
        }
    }

    pub fn destination(&self) -> Option<&Destination> {
        self.destination.as_ref()
    }

    /// Why the egress policy refused the destination (`mode` `"enforce"`), or
    /// would have refused it (`"report"`: the request went on), and the rule
    /// that decided, if one did. For the decision log.
    pub fn set_denial(
        &mut self,
        reason: &'static str,
        rule: Option<std::sync::Arc<str>>,
        mode: &'static str,
    ) {
        self.denial = Some(Box::new(Denial { reason, rule, mode }));
    }

    /// Close the client connection once the response is sent.
    pub fn close_connection(&mut self) {
        self.close = true;
    }

    /// Count this exchange against its agent's cap until it ends.
    pub fn hold(&mut self, held: Held) {
        self.held = Some(held);
    }

    /// A counter of request body bytes passed on, for the request body to bump.
    pub fn upload_counter(&mut self) -> Arc<AtomicU64> {
        self.upload.get_or_insert_with(Default::default).clone()
    }

    /// Move the record into a relay that will end it; this handle goes inert.
    pub fn hand_off(&mut self, outcome: &'static str, status: StatusCode) -> Exchange {
        let relay = Exchange {
            listener: self.listener,
            method: self.method.clone(),
            started: self.started,
            agent: self.agent,
            destination: self.destination.clone(),
            path: self.path.take(),
            denial: self.denial.take(),
            log: std::mem::take(&mut self.log),
            outcome,
            status: status.as_u16(),
            upload: self.upload.take(),
            close: self.close,
            held: self.held.take(),
            tally: self.tally.take(),
            open: true,
        };
        self.open = false;
        relay
    }

    /// Turn the request path's result into the response, carrying the record in
    /// its body unless a relay took it over.
    pub fn respond(
        mut self: Box<Self>,
        result: Result<Response<ProxyBody>, ProxyError>,
        busy: Busy,
    ) -> Response<ExchangeBody> {
        if self.destination.is_none() {
            // No destination named (an unparseable target, refused framing):
            // the request's bytes are attributed to `other`.
            if let Some(tally) = &self.tally {
                tally.destination(OTHER_HOST);
            }
        }
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                self.outcome = error.outcome();
                if let ProxyError::Denied { reason, policy, .. } = &error {
                    let rule = policy.as_ref().map(|denial| denial.rule_text());
                    self.set_denial(reason.as_str(), rule, "enforce");
                }
                rescue(error, self.listener)
            }
        };
        if self.close {
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        self.status = response.status().as_u16();
        // Boxed (by the caller): the response moves several times on its way
        // out, and the record is most of its size.
        let end = self.open.then_some(self);
        response.map(|body| ExchangeBody {
            body,
            end,
            sent: 0,
            _busy: busy,
        })
    }

    /// Record the end: the metric and the event, once. (In place: the record
    /// is most of a response body's size, and ends in its box.)
    pub fn finish(&mut self, ended: Ended, down: u64) {
        self.record(ended, None, down);
    }

    /// Record the end of a relay with its own byte counts.
    pub fn finish_relay(mut self, ended: Ended, up: u64, down: u64) {
        self.record(ended, Some(up), down);
    }

    fn record(&mut self, ended: Ended, up: Option<u64>, down: u64) {
        self.held = None;
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        self.attribute_now();
        let up = up.unwrap_or_else(|| {
            self.upload
                .as_ref()
                .map_or(0, |u| u.load(Ordering::Relaxed))
        });
        telemetry::request(self.listener, self.outcome);
        if ended == Ended::Cut {
            telemetry::cut_stream(self.listener);
        }
        let traced = tracing::enabled!(target: "tollgate::request", tracing::Level::DEBUG);
        if !traced && !self.log.is_on() {
            return;
        }
        let duration = self.started.elapsed();
        tracing::debug!(
            target: "tollgate::request",
            listener = self.listener.as_str(),
            agent_id = self.agent.map(|a| tracing::field::display(a.agent_id)),
            method = self.method.as_str(),
            outcome = self.outcome,
            status = self.status,
            ended = ended.as_str(),
            bytes_up = up,
            bytes_down = down,
            duration_ms = duration.as_secs_f64() * 1e3,
            "request ended"
        );
        if self.log.is_on() {
            self.log.emit(Decision {
                ts: chrono::Utc::now(),
                listener: self.listener,
                agent: self.agent,
                method: self.method.clone(),
                destination: self.destination.take(),
                path: self.path.take(),
                status: self.status,
                outcome: self.outcome,
                ended,
                bytes_up: up,
                bytes_down: down,
                duration,
                denial: self.denial.take(),
            });
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Dropped without an end: the client went away (before its response,
        // if no status was set), or a task ended early.
        if self.status == 0 {
            self.outcome = "aborted";
        }
        self.record(Ended::Aborted, None, 0);
    }
}

/// The body of every response a listener sends: the response itself, and the
/// exchange it ends.
#[derive(Debug)]
pub struct ExchangeBody {
    body: ProxyBody,
    end: Option<Box<Exchange>>,
    sent: u64,
    _busy: Busy,
}

/// One request under way on its connection, until dropped.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    pub fn enter(in_flight: &Arc<AtomicUsize>) -> Self {
        in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(in_flight.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ExchangeBody {
    fn end(&mut self, ended: Ended) {
        if let Some(mut exchange) = self.end.take() {
            exchange.finish(ended, self.sent);
        }
    }
}

impl KeptLines for ExchangeBody {
    fn take_lines(&mut self) -> Option<HeadLines> {
        self.body.take_lines()
    }
}

impl Body for ExchangeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let before = this.sent;
                    this.sent += data.len() as u64;
                    // A long response is attributed as it goes, every MiB.
                    if before >> 20 != this.sent >> 20 {
                        if let Some(end) = &this.end {
                            end.attribute_now();
                        }
                    }
                }
                if this.body.is_end_stream() {
                    this.end(Ended::Complete);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let ended = match e.is::<crate::body::StreamCut>() {
                    true => Ended::Cut,
                    false => Ended::Aborted,
                };
                this.end(ended);
            }
            Poll::Ready(None) => this.end(Ended::Complete),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ExchangeBody {
    fn drop(&mut self) {
        let ended = match self.body.is_end_stream() {
            true => Ended::Complete,
            false => Ended::Aborted,
        };
        self.end(ended);
    }
}
