//! The decision log: one JSON line per request and per tunnel, saying who
//! (agent, user, VPS), where (host, port, the address reached, the path), what
//! was decided (status, outcome, why a destination was refused and under which
//! policy mode) and what it moved (bytes each way, duration). SPEC §10.
//!
//! Every exchange ends in one place, [`crate::exchange::Exchange`], and that is
//! where its [`Decision`] is made and handed to [`DecisionLog::emit`]. The
//! request path never waits for the log and never does I/O for it: `emit` puts
//! the event on a bounded queue with `try_send`, and one [`Writer`] task turns
//! events into JSON lines, writes them through a buffer, and flushes whenever
//! the queue is momentarily empty (a line is out within milliseconds of its
//! exchange's end). When the queue is full, because a tenant floods the proxy
//! with requests or the sink is slow, new events are dropped and counted in
//! `tollgate_decision_log_dropped_total`: the log costs bounded memory
//! (`queue_events` events of at most about 1 KiB: paths are cut to
//! [`MAX_PATH_BYTES`]) and never slows traffic down.
//!
//! ```text
//!  Exchange::record ──try_send──▶ [bounded queue] ──▶ Writer ──▶ buffer ──▶ stdout | file
//!        └─ full: dropped, counted                      ▲
//!                                                SIGHUP: reopen the file (rotation)
//! ```
//!
//! A line never holds a token, a header value or (unless `include_query`) a
//! query string. The writer is owned by [`crate::run`]: it stops after the
//! shutdown drain, once every exchange has ended, and writes what was queued.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use http::Method;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::{DecisionLogConfig, DecisionLogSink};

use crate::exchange::{Destination, Ended};
use crate::inbound::Inbound;
use crate::telemetry::{self, Listener};

/// Longest `path` kept in an event, bytes; longer ones are cut (at a character
/// boundary), so a queued event stays small whatever the request line was.
pub const MAX_PATH_BYTES: usize = 512;
/// The writer's buffer, bytes: a full one is written at once.
const BUFFER_BYTES: usize = 64 * 1024;
/// Events written between flushes while the queue stays busy, so a rotation
/// signal or a shutdown is noticed during a flood.
const BATCH_EVENTS: usize = 1024;

/// The authenticated party of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentIds {
    pub agent_id: Uuid,
    pub user_id: Uuid,
    /// The agent's VPS, when it has one.
    pub vps_id: Option<Uuid>,
}

/// Why a destination was refused (`mode = "enforce"`), or would have been
/// (`mode = "report"`: the policy only reports, the request went on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    /// The policy rule that decided, when one did (the built-in list has none).
    pub rule: Option<Arc<str>>,
    pub mode: &'static str,
}

/// One exchange's end, as the decision log records it.
#[derive(Debug, Clone)]
pub struct Decision {
    /// When the exchange ended.
    pub ts: DateTime<Utc>,
    pub listener: Listener,
    pub agent: Option<AgentIds>,
    pub method: Method,
    /// Egress: the destination the request named; ingress: the VPS gateway.
    pub destination: Option<Destination>,
    /// The request path (query string only if configured); none for CONNECT.
    pub path: Option<Box<str>>,
    /// The response status; 0 if the client went away before one.
    pub status: u16,
    pub outcome: &'static str,
    pub ended: Ended,
    /// Bytes from the client onwards: the request body, or the client's side
    /// of a tunnel.
    pub bytes_up: u64,
    /// Bytes back to the client: the response body, or the upstream's side of
    /// a tunnel.
    pub bytes_down: u64,
    pub duration: Duration,
    pub denial: Option<Box<Denial>>,
}

impl Decision {
    /// Append the event as one JSON line. Absent fields are left out.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            "{{\"ts\":\"{}\"",
            self.ts.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        );
        string(out, "listener", self.listener.as_str());
        if let Some(agent) = &self.agent {
            plain(out, "agent_id", agent.agent_id);
            plain(out, "user_id", agent.user_id);
            if let Some(vps) = agent.vps_id {
                plain(out, "vps_id", vps);
            }
        }
        string(out, "method", self.method.as_str());
        if let Some(d) = &self.destination {
            string(out, "host", &d.host);
            number(out, "port", d.port);
            if let Some(addr) = d.addr {
                plain(out, "addr", addr);
            }
        }
        if let Some(path) = &self.path {
            string(out, "path", path);
        }
        if self.status != 0 {
            number(out, "status", self.status);
        }
        string(out, "outcome", self.outcome);
        string(out, "ended", self.ended.as_str());
        number(out, "bytes_up", self.bytes_up);
        number(out, "bytes_down", self.bytes_down);
        let micros = self.duration.as_micros();
        let _ = write!(
            out,
            ",\"duration_ms\":{}.{:03}",
            micros / 1000,
            micros % 1000
        );
        if let Some(denial) = &self.denial {
            string(out, "deny_reason", denial.reason);
            if let Some(rule) = &denial.rule {
                string(out, "deny_rule", rule);
            }
            string(out, "policy_mode", denial.mode);
        }
        out.extend_from_slice(b"}\n");
    }
}

/// `,"key":"value"` with the value escaped as JSON.
fn string(out: &mut Vec<u8>, key: &str, value: &str) {
    let _ = write!(out, ",\"{key}\":");
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `,"key":"value"` for values whose text needs no escaping (ids, addresses).
fn plain(out: &mut Vec<u8>, key: &str, value: impl std::fmt::Display) {
    let _ = write!(out, ",\"{key}\":\"{value}\"");
}

fn number(out: &mut Vec<u8>, key: &str, value: impl Into<u64>) {
    let _ = write!(out, ",\"{key}\":{}", value.into());
}

/// Where a listener's exchanges send their decisions: a cheap handle to the
/// queue, or nothing when the log is off.
#[derive(Debug, Clone, Default)]
pub struct DecisionLog(Option<Arc<Queue>>);

#[derive(Debug)]
struct Queue {
    events: mpsc::Sender<Decision>,
    include_query: bool,
}

impl DecisionLog {
    /// A log that records nothing.
    pub fn off() -> DecisionLog {
        DecisionLog(None)
    }

    /// The log `config` asks for, and its writer task (none when off). A file
    /// sink's file is opened here, so a path that cannot be written fails the
    /// start.
    pub async fn start(
        config: &DecisionLogConfig,
    ) -> anyhow::Result<(DecisionLog, Option<Writer>)> {
        let (sink, hangup) = match config.sink {
            DecisionLogSink::Off => return Ok((DecisionLog::off(), None)),
            DecisionLogSink::Stdout => (Sink::Stdout, None),
            DecisionLogSink::File => {
                let path = config
                    .path
                    .clone()
                    .context("proxy.decision_log.path is required with sink = \"file\"")?;
                let hangup = signal(SignalKind::hangup())
                    .context("listening for SIGHUP (decision log rotation)")?;
                (Sink::File(path), Some(hangup))
            }
        };
        let sink = Arc::new(sink);
        let opening = sink.clone();
        let output = tokio::task::spawn_blocking(move || opening.open()).await??;
        let (log, events) = DecisionLog::with_queue(config.queue_events, config.include_query);
        let stop = CancellationToken::new();
        let writing = Writing {
            events,
            sink,
            output: Some(output),
            buffer: Vec::with_capacity(BUFFER_BYTES),
            failing: false,
        };
        let task = tokio::spawn(writing.run(stop.clone(), hangup));
        Ok((log, Some(Writer { stop, task })))
    }

    /// A log whose events wait on a queue of `capacity`, for `events` to take.
    fn with_queue(capacity: usize, include_query: bool) -> (DecisionLog, mpsc::Receiver<Decision>) {
        let (tx, rx) = mpsc::channel(capacity);
        let queue = Queue {
            events: tx,
            include_query,
        };
        (DecisionLog(Some(Arc::new(queue))), rx)
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The `path` to record for `req`, when the log is on: the request target's
    /// path as received (with its query string only if configured), cut to
    /// [`MAX_PATH_BYTES`]; none for CONNECT, which names no path.
    pub fn path_of(&self, req: &Inbound) -> Option<Box<str>> {
        let queue = self.0.as_ref()?;
        if req.method == Method::CONNECT {
            return None;
        }
        let target = &req.target;
        let text = match (queue.include_query, target.path_and_query()) {
            (true, Some(pq)) => pq,
            _ => target.path(),
        };
        let mut end = text.len().min(MAX_PATH_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Some(text[..end].into())
    }

    /// Queue `decision` for the writer, or drop it (and count it) if the queue
    /// is full. Never waits.
    pub fn emit(&self, decision: Decision) {
        let Some(queue) = &self.0 else {
            return;
        };
        match queue.events.try_send(decision) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => telemetry::decision_log_dropped("queue_full"),
            Err(TrySendError::Closed(_)) => telemetry::decision_log_dropped("stopped"),
        }
    }
}

/// The task writing the decision log, owned by whoever started it.
pub struct Writer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Writer {
    /// Write what is queued, flush, and stop. Call once every exchange has
    /// ended (after the shutdown drain): later events are dropped.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the decision log writer failed");
        }
    }
}

/// Where lines go.
enum Sink {
    Stdout,
    File(PathBuf),
}

/// The open sink. Writes are blocking calls, made off the runtime's threads.
type Output = Box<dyn std::io::Write + Send>;

impl Sink {
    /// Open the sink (a blocking call for files).
    fn open(&self) -> anyhow::Result<Output> {
        Ok(match self {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => Box::new(
                open_file(path)
                    .with_context(|| format!("opening the decision log file {}", path.display()))?,
            ),
        })
    }
}

/// Open `path` for appending, creating it (owner read-write, group read) if missing.
fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// The writer task's state.
struct Writing {
    events: mpsc::Receiver<Decision>,
    sink: Arc<Sink>,
    /// The open sink; away while a write is under way.
    output: Option<Output>,
    /// Lines not written yet: the buffer every write goes through.
    buffer: Vec<u8>,
    /// The last write failed (warn once per run of failures).
    failing: bool,
}

impl Writing {
    async fn run(mut self, stop: CancellationToken, mut hangup: Option<Signal>) {
        let mut stopping = false;
        loop {
            // Rotation and shutdown come first, so a flood cannot hold them off.
            let first = tokio::select! {
                biased;
                _ = rotated(&mut hangup) => {
                    self.reopen().await;
                    continue;
                }
                _ = stop.cancelled(), if !stopping => {
                    // What is queued is still written; nothing more is queued.
                    stopping = true;
                    self.events.close();
                    continue;
                }
                event = self.events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            first.write_json(&mut self.buffer);
            // Whatever else is queued goes in the same write, up to a batch.
            for _ in 1..BATCH_EVENTS {
                match self.events.try_recv() {
                    Ok(event) => event.write_json(&mut self.buffer),
                    Err(_) => break,
                }
                if self.buffer.len() >= BUFFER_BYTES {
                    self.flush().await;
                }
            }
            // The queue is momentarily empty (or a batch is done): out it goes.
            self.flush().await;
        }
        self.flush().await;
    }

    /// Write the buffer to the sink, off the runtime's threads.
    async fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let Some(mut output) = self.output.take() else {
            self.buffer.clear();
            return;
        };
        let mut buffer = std::mem::take(&mut self.buffer);
        let written = tokio::task::spawn_blocking(move || {
            let result = output.write_all(&buffer).and_then(|()| output.flush());
            buffer.clear();
            (output, buffer, result)
        })
        .await;
        let result = match written {
            Ok((output, buffer, result)) => {
                self.output = Some(output);
                self.buffer = buffer;
                result
            }
            // The blocking pool is shutting down: the output went with it.
            Err(e) => Err(std::io::Error::other(e)),
        };
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                telemetry::decision_log_write_failed();
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, "writing the decision log failed; lines are lost until it works again");
                }
            }
        }
    }

    /// Reopen the file (log rotation moved it away): what is buffered goes to
    /// the old file, what follows to the new one. If it cannot be reopened,
    /// lines keep going to the old one.
    async fn reopen(&mut self) {
        self.flush().await;
        let sink = self.sink.clone();
        match tokio::task::spawn_blocking(move || sink.open()).await {
            Ok(Ok(output)) => {
                self.output = Some(output);
                tracing::info!("decision log reopened");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "reopening the decision log failed; still writing to the old file")
            }
            Err(e) => tracing::warn!(error = %e, "reopening the decision log failed"),
        }
    }
}

/// The next rotation signal, if the sink has one.
async fn rotated(hangup: &mut Option<Signal>) {
    match hangup {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::inbound::Target;

    fn decision() -> Decision {
        Decision {
            ts: "2026-03-01T12:34:56.789123Z".parse().unwrap(),
            listener: Listener::Egress,
            agent: Some(AgentIds {
                agent_id: Uuid::from_u128(1),
                user_id: Uuid::from_u128(2),
                vps_id: Some(Uuid::from_u128(3)),
            }),
            method: Method::GET,
            destination: Some(Destination {
                host: "example.com".into(),
                port: 80,
                addr: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            }),
            path: Some("/a\"b\\c\u{1}".into()),
            status: 403,
            outcome: "denied",
            ended: Ended::Complete,
            bytes_up: 7,
            bytes_down: 1234,
            duration: Duration::from_micros(12_045),
            denial: Some(Box::new(Denial {
                reason: "private",
                rule: Some("deny *.corp".into()),
                mode: "enforce",
            })),
        }
    }

    fn dropped(reason: &str) -> u64 {
        let text = tollgate_core::telemetry::render_metrics();
        let prefix = format!(
            "{}{{reason=\"{reason}\"}} ",
            telemetry::DECISION_LOG_DROPPED
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    }

    #[test]
    fn an_event_is_one_json_line_with_every_field() {
        let mut out = Vec::new();
        decision().write_json(&mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let want = serde_json::json!({
            "ts": "2026-03-01T12:34:56.789Z",
            "listener": "egress",
            "agent_id": Uuid::from_u128(1).to_string(),
            "user_id": Uuid::from_u128(2).to_string(),
            "vps_id": Uuid::from_u128(3).to_string(),
            "method": "GET",
            "host": "example.com",
            "port": 80,
            "addr": "127.0.0.1:8080",
            "path": "/a\"b\\c\u{1}",
            "status": 403,
            "outcome": "denied",
            "ended": "complete",
            "bytes_up": 7,
            "bytes_down": 1234,
            "duration_ms": 12.045,
            "deny_reason": "private",
            "deny_rule": "deny *.corp",
            "policy_mode": "enforce",
        });
        assert_eq!(v, want);
    }

    #[test]
    fn absent_facts_are_left_out() {
        let mut d = decision();
        d.agent = None;
        d.destination = None;
        d.path = None;
        d.status = 0;
        d.denial = None;
        d.duration = Duration::from_micros(5);
        let mut out = Vec::new();
        d.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "bytes_down",
                "bytes_up",
                "duration_ms",
                "ended",
                "listener",
                "method",
                "outcome",
                "ts"
            ]
        );
        assert_eq!(v["duration_ms"], 0.005);
    }

    #[test]
    fn paths_keep_the_query_only_when_asked_and_are_cut_to_a_bound() {
        let (without, _rx) = DecisionLog::with_queue(1, false);
        let (with, _rx2) = DecisionLog::with_queue(1, true);
        let req = |method: Method, uri: &str| {
            let req = http::Request::builder().method(method).uri(uri);
            Inbound::from(req.body(crate::body::RequestBody::Empty).unwrap())
        };
        let get = req(Method::GET, "http://example.com/p/q?token=secret");
        assert_eq!(without.path_of(&get).as_deref(), Some("/p/q"));
        assert_eq!(with.path_of(&get).as_deref(), Some("/p/q?token=secret"));
        // A target the fast path kept as its bytes reads the same.
        let kept = Inbound {
            target: Target::origin("/p/q?token=secret".into()).unwrap(),
            ..req(Method::GET, "/")
        };
        assert_eq!(without.path_of(&kept).as_deref(), Some("/p/q"));
        assert_eq!(with.path_of(&kept).as_deref(), Some("/p/q?token=secret"));
        let connect = req(Method::CONNECT, "example.com:443");
        assert_eq!(with.path_of(&connect), None);
        assert_eq!(DecisionLog::off().path_of(&get), None);
        let long = format!("http://example.com/{}", "x".repeat(2 * MAX_PATH_BYTES));
        let path = without.path_of(&req(Method::GET, &long)).unwrap();
        assert_eq!(path.len(), MAX_PATH_BYTES);
    }

    #[test]
    fn a_full_queue_drops_new_events_and_counts_them_without_waiting() {
        telemetry::describe();
        let before = dropped("queue_full");
        let (log, mut events) = DecisionLog::with_queue(2, false);
        for _ in 0..5 {
            log.emit(decision());
        }
        assert_eq!(dropped("queue_full") - before, 3);
        // The queued ones are the first two, intact.
        for _ in 0..2 {
            assert_eq!(events.try_recv().unwrap().bytes_down, 1234);
        }
        assert!(events.try_recv().is_err());
        // Room again: the next one is queued.
        log.emit(decision());
        assert!(events.try_recv().is_ok());
        assert_eq!(dropped("queue_full") - before, 3);

        let before = dropped("stopped");
        events.close();
        log.emit(decision());
        assert_eq!(dropped("stopped") - before, 1);
    }

    #[tokio::test]
    async fn the_writer_writes_what_was_queued_before_it_finishes() {
        let dir = std::env::temp_dir().join(format!("tollgate-decision-log-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        let config = DecisionLogConfig {
            sink: DecisionLogSink::File,
            path: Some(path.clone()),
            include_query: false,
            queue_events: 1000,
        };
        let (log, writer) = DecisionLog::start(&config).await.unwrap();
        for i in 0..500 {
            let mut d = decision();
            d.bytes_up = i;
            log.emit(d);
        }
        writer.unwrap().finish().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let ups: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["bytes_up"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ups, (0..500).collect::<Vec<_>>());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "not readable by others: {mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
