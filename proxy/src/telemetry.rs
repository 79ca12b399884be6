//! The proxy's Prometheus metrics (SPEC §6): names, bounded labels, and small
//! helpers so call sites read as what happened. No label is per VPS or per user.

use std::sync::{Once, OnceLock};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Unit,
};

/// Which listener a metric is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    Egress,
    Ingress,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Egress => "egress",
            Listener::Ingress => "ingress",
        }
    }
}

pub const REQUESTS: &str = "tollgate_requests_total";
pub const BYTES: &str = "tollgate_bytes_total";
pub const ACTIVE_CONNECTIONS: &str = "tollgate_active_connections";
pub const ACTIVE_TUNNELS: &str = "tollgate_active_tunnels";
pub const SERVING_CONNECTIONS: &str = "tollgate_serving_thread_connections";
pub const SPLICED_BYTES: &str = "tollgate_spliced_bytes_total";
pub const REJECTED_CONNECTIONS: &str = "tollgate_rejected_connections_total";
pub const AGENT_LIMIT_REFUSALS: &str = "tollgate_agent_limit_refusals_total";
pub const AUTH_FAILURES: &str = "tollgate_auth_failures_total";
pub const BLOCKED_REQUESTS: &str = "tollgate_blocked_requests_total";
pub const EGRESS_DENIALS: &str = "tollgate_egress_denials_total";
pub const CUT_STREAMS: &str = "tollgate_cut_streams_total";
pub const EGRESS_POLICY_REPORTED: &str = "tollgate_egress_policy_reported_total";
pub const EGRESS_POLICY_CUTS: &str = "tollgate_egress_policy_cuts_total";
pub const EGRESS_POLICY_LOADS: &str = "tollgate_egress_policy_loads_total";
pub const EGRESS_POLICIES: &str = "tollgate_egress_policies";
pub const FLUSH_DURATION: &str = "tollgate_flush_duration_seconds";
pub const FLUSH_ROWS: &str = "tollgate_flush_rows_total";
pub const FLUSH_FAILURES: &str = "tollgate_flush_failures_total";
pub const FLUSH_DROPPED: &str = "tollgate_flush_dropped_rows_total";
pub const FLUSH_LAG: &str = "tollgate_flush_lag_seconds";
pub const PENDING_BYTES: &str = "tollgate_pending_unflushed_bytes";
pub const SPILLED_BATCHES: &str = "tollgate_spilled_batches";
pub const USERS_BLOCKED: &str = "tollgate_users_blocked";
pub const DECISION_LATENCY: &str = "tollgate_decision_latency_seconds";
pub const DECISIONS_PUBLISHED: &str = "tollgate_decisions_published_total";
pub const LEASE_GRANTS: &str = "tollgate_lease_grants_total";
pub const LEASED_BYTES: &str = "tollgate_leased_bytes_total";
pub const LEASE_FAILURES: &str = "tollgate_lease_failures_total";
pub const OVERSHOOT: &str = "tollgate_overshoot_bytes";
pub const DIRECTORY_LOOKUPS: &str = "tollgate_directory_lookups_total";
pub const DIRECTORY_ENTRIES: &str = "tollgate_directory_entries";
pub const DIRECTORY_BYTES: &str = "tollgate_directory_bytes";
pub const DATABASE_UP: &str = "tollgate_database_up";
pub const NOTIFY_RECONNECTS: &str = "tollgate_notify_reconnects_total";
pub const DECISION_LOG_DROPPED: &str = "tollgate_decision_log_dropped_total";
pub const DECISION_LOG_WRITE_FAILURES: &str = "tollgate_decision_log_write_failures_total";

/// Register help texts once per process (the recorder installed first).
pub fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for listener in [Listener::Egress, Listener::Ingress] {
            let ok = counter!(REQUESTS, "listener" => listener.as_str(), "outcome" => "ok");
            let _ = REQUESTS_OK[listener as usize].set(ok);
        }
        describe_counter!(
            REQUESTS,
            "Requests and tunnels handled, by listener and outcome."
        );
        describe_counter!(
            BYTES,
            Unit::Bytes,
            "Bytes on sockets facing VPSes; rx = received by the VPS, tx = sent by it."
        );
        describe_gauge!(ACTIVE_CONNECTIONS, "Open client connections, by listener.");
        describe_gauge!(
            SERVING_CONNECTIONS,
            "Open client connections, every listener's, by the serving thread that serves them."
        );
        describe_gauge!(
            ACTIVE_TUNNELS,
            "Open CONNECT tunnels and WebSockets, by listener and kind."
        );
        describe_counter!(
            SPLICED_BYTES,
            Unit::Bytes,
            "Tunnel bytes moved socket to socket inside the kernel (splice), by listener; \
             a share of the tunnels' bytes, already counted in tollgate_bytes_total."
        );
        describe_counter!(
            REJECTED_CONNECTIONS,
            "Connections refused with 503 over the connection limit."
        );
        describe_counter!(
            AGENT_LIMIT_REFUSALS,
            "Requests refused with 429 because an agent reached a per-agent cap, by listener and limit."
        );
        describe_counter!(
            AUTH_FAILURES,
            "Authentication failures, by listener and reason."
        );
        describe_counter!(
            BLOCKED_REQUESTS,
            "Requests refused because the user is blocked, by listener and reason."
        );
        describe_counter!(
            EGRESS_DENIALS,
            "Egress destinations refused by policy, by reason."
        );
        describe_counter!(
            EGRESS_POLICY_REPORTED,
            "Destinations a policy in report mode would have refused (passed on), by reason."
        );
        describe_counter!(
            EGRESS_POLICY_CUTS,
            "Tunnels and WebSockets closed because a policy came to forbid their destination, \
             or their TLS SNI named a host it forbids, by reason (policy_changed, sni)."
        );
        describe_counter!(
            EGRESS_POLICY_LOADS,
            "Reads of the egress policies from PostgreSQL, by outcome (ok, error)."
        );
        describe_gauge!(EGRESS_POLICIES, "Egress policies in force on this proxy.");
        describe_counter!(
            CUT_STREAMS,
            "Tunnels, WebSockets and streams closed because their user became blocked."
        );
        describe_histogram!(
            FLUSH_DURATION,
            Unit::Seconds,
            "Time to write one counter flush to PostgreSQL."
        );
        describe_counter!(FLUSH_ROWS, "Usage rows written by flushes.");
        describe_counter!(
            FLUSH_FAILURES,
            "Flush attempts that failed (retried, never dropped)."
        );
        describe_counter!(
            FLUSH_DROPPED,
            "Per-VPS counts left out of a committed flush, by reason: vps_deleted (the VPS no \
             longer exists), rejected (the database refused the row: a constraint, trigger or \
             out-of-range sum; the rest of the batch was written)."
        );
        describe_gauge!(
            FLUSH_LAG,
            Unit::Seconds,
            "Seconds since the last successful flush while bytes are pending."
        );
        describe_gauge!(
            PENDING_BYTES,
            Unit::Bytes,
            "Counted bytes not yet written to PostgreSQL."
        );
        describe_gauge!(
            SPILLED_BATCHES,
            "Batches waiting in spill files for the database."
        );
        describe_gauge!(
            USERS_BLOCKED,
            "Users currently blocked, as known to this proxy."
        );
        describe_histogram!(
            DECISION_LATENCY,
            Unit::Seconds,
            "From the start of a flush to its users' decisions being in force."
        );
        describe_counter!(
            DECISIONS_PUBLISHED,
            "Decisions written to usage_decisions by this proxy."
        );
        describe_counter!(
            LEASE_GRANTS,
            "Headroom lease grants asked of PostgreSQL, by outcome (granted, spent)."
        );
        describe_counter!(
            LEASED_BYTES,
            Unit::Bytes,
            "Bytes of headroom this proxy leased."
        );
        describe_counter!(
            LEASE_FAILURES,
            "Lease grants or renewals that failed (leases are suspended when they cannot be renewed in time)."
        );
        describe_histogram!(
            OVERSHOOT,
            Unit::Bytes,
            "Bandwidth bytes past the last allowed byte when a block lands, by the listeners that carried the user's traffic here (egress, ingress, both)."
        );
        describe_counter!(DIRECTORY_LOOKUPS, "Agent directory lookups, by result.");
        describe_gauge!(
            DIRECTORY_ENTRIES,
            "Agents held in the directory, by state: cached (serving), suspended (evicted by a \
             change, awaiting a re-read), unknown (ids the database does not know)."
        );
        describe_gauge!(
            DIRECTORY_BYTES,
            Unit::Bytes,
            "Estimated memory of the agent directory: its tables and entries, not the per-VPS \
             counters and per-user gates the entries share with the meter and the enforcer."
        );
        describe_gauge!(DATABASE_UP, "1 if the last database operation succeeded.");
        describe_counter!(
            NOTIFY_RECONNECTS,
            "Times the LISTEN connection was re-established."
        );
        describe_counter!(
            DECISION_LOG_DROPPED,
            "Decision events not written, by reason: queue_full (the writer fell behind: a flood \
             of requests or a slow sink), stopped (the log had already stopped)."
        );
        describe_counter!(
            DECISION_LOG_WRITE_FAILURES,
            "Writes to the decision log sink that failed (the lines in them are lost)."
        );
    });
}

pub fn bytes(listener: Listener, rx: u64, tx: u64) {
    if rx > 0 {
        counter!(BYTES, "listener" => listener.as_str(), "direction" => "rx").increment(rx);
    }
    if tx > 0 {
        counter!(BYTES, "listener" => listener.as_str(), "direction" => "tx").increment(tx);
    }
}

pub fn spliced(listener: Listener, bytes: u64) {
    if bytes > 0 {
        counter!(SPLICED_BYTES, "listener" => listener.as_str()).increment(bytes);
    }
}

/// The counter of successful requests per listener (egress, ingress), taken
/// once the recorder is installed (`describe`): every successful request
/// counts there without a lookup, which would allocate its labels and handle.
static REQUESTS_OK: [OnceLock<Counter>; 2] = [OnceLock::new(), OnceLock::new()];

pub fn request(listener: Listener, outcome: &'static str) {
    if outcome == "ok" {
        if let Some(counter) = REQUESTS_OK[listener as usize].get() {
            return counter.increment(1);
        }
    }
    counter!(REQUESTS, "listener" => listener.as_str(), "outcome" => outcome).increment(1);
}

pub fn auth_failure(listener: Listener, reason: &'static str) {
    counter!(AUTH_FAILURES, "listener" => listener.as_str(), "reason" => reason).increment(1);
}

pub fn blocked_request(listener: Listener, reason: &'static str) {
    counter!(BLOCKED_REQUESTS, "listener" => listener.as_str(), "reason" => reason).increment(1);
}

/// A destination a report-mode policy would have refused.
pub fn policy_reported(reason: &'static str) {
    counter!(EGRESS_POLICY_REPORTED, "reason" => reason).increment(1);
}

/// A tunnel or WebSocket closed by an egress policy.
pub fn policy_cut(reason: &'static str) {
    counter!(EGRESS_POLICY_CUTS, "reason" => reason).increment(1);
}

pub fn egress_denied(reason: &'static str) {
    counter!(EGRESS_DENIALS, "reason" => reason).increment(1);
}

pub fn lease_granted(bytes: u64) {
    let outcome = if bytes > 0 { "granted" } else { "spent" };
    counter!(LEASE_GRANTS, "outcome" => outcome).increment(1);
    counter!(LEASED_BYTES).increment(bytes);
}

pub fn lease_failed() {
    counter!(LEASE_FAILURES).increment(1);
}

/// A block landed `bytes` past the last allowed byte.
pub fn overshoot(listeners: &'static str, bytes: u64) {
    histogram!(OVERSHOOT, "listener" => listeners).record(bytes as f64);
}

pub fn cut_stream(listener: Listener) {
    counter!(CUT_STREAMS, "listener" => listener.as_str()).increment(1);
}

pub fn agent_limit_refused(listener: Listener, limit: &'static str) {
    counter!(AGENT_LIMIT_REFUSALS, "listener" => listener.as_str(), "limit" => limit).increment(1);
}

/// A decision event was dropped instead of queued (`queue_full` or `stopped`).
pub fn decision_log_dropped(reason: &'static str) {
    counter!(DECISION_LOG_DROPPED, "reason" => reason).increment(1);
}

pub fn decision_log_write_failed() {
    counter!(DECISION_LOG_WRITE_FAILURES).increment(1);
}

pub fn rejected_connection(listener: Listener) {
    counter!(REJECTED_CONNECTIONS, "listener" => listener.as_str()).increment(1);
}

pub fn database_up(up: bool) {
    gauge!(DATABASE_UP).set(if up { 1.0 } else { 0.0 });
}

/// A flush committed: `rows` written, `deleted` rows of VPSes gone meanwhile and
/// `rejected` rows the database refused were left out.
pub fn flush_done(seconds: f64, rows: usize, deleted: usize, rejected: usize) {
    histogram!(FLUSH_DURATION).record(seconds);
    counter!(FLUSH_ROWS).increment(rows as u64);
    if deleted > 0 {
        counter!(FLUSH_DROPPED, "reason" => "vps_deleted").increment(deleted as u64);
    }
    if rejected > 0 {
        counter!(FLUSH_DROPPED, "reason" => "rejected").increment(rejected as u64);
    }
}

/// Kind of long-lived relay, for [`ACTIVE_TUNNELS`].
#[derive(Debug, Clone, Copy)]
pub enum TunnelKind {
    Connect,
    WebSocket,
}

/// Increments a gauge for its lifetime.
#[must_use]
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn connection(listener: Listener) -> Self {
        let g = gauge!(ACTIVE_CONNECTIONS, "listener" => listener.as_str());
        g.increment(1.0);
        GaugeGuard(g)
    }

    pub fn tunnel(listener: Listener, kind: TunnelKind) -> Self {
        let kind = match kind {
            TunnelKind::Connect => "connect",
            TunnelKind::WebSocket => "websocket",
        };
        let g = gauge!(ACTIVE_TUNNELS, "listener" => listener.as_str(), "kind" => kind);
        g.increment(1.0);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
