//! The flusher writes the meter's counters to `vps_usage_periods`, exactly once
//! (SPEC §4.3).
//!
//! Every `flush_interval` it swaps all counters to zero and turns what it took
//! into a batch `(instance_id, seq)`, split at month boundaries by the time span
//! the bytes were counted in. A batch is written in one transaction together with
//! its ledger row, so a batch retried after an unknown outcome (timeout, broken
//! connection mid-commit) is skipped by the database instead of counted twice.
//!
//! A row the database refuses for what it holds (a constraint, a trigger, an
//! out-of-range sum) is left out of its batch and the rest commits
//! ([`usage::apply_flush_detailed`]); it is counted in
//! `tollgate_flush_dropped_rows_total{reason="rejected"}` and logged once per VPS.
//!
//! While a batch fails otherwise it stays queued and is retried with doubling backoff; new
//! traffic keeps accumulating in the counters meanwhile (nothing is drained until
//! the queue is empty, so memory stays bounded). At shutdown, what cannot be
//! written goes to a spill file, replayed exactly once at the next start through
//! the same ledger. After each successful flush the users it touched are
//! re-evaluated, so bandwidth blocks do not wait for the monitor.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{split_at_month_boundaries, Period};
use tollgate_core::clock::Clock;
use tollgate_core::config::MeterConfig;
use tollgate_core::db::usage::{
    self, BandwidthDelta, DestinationDelta, DestinationDeltas, FlushBatch, FlushOutcome,
    PeriodDeltas, PeriodDestinations, RejectedDelta,
};

use crate::enforcement::{Enforcer, Event, Flushed};
use crate::health::Health;
use crate::leases::Settled;
use crate::meter::{Drained, DrainedHosts, InTransit, Meter};
use crate::telemetry;

/// Time the final flush at shutdown may take before the rest is spilled.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Ledger rows are kept this long (spill files older than this would be replayed twice).
const LEDGER_KEEP_DAYS: i32 = 35;
/// VPS ids named in one log line about dropped rows; the rest are counted.
const LOGGED_EXAMPLES: usize = 3;
/// VPSes whose refused rows were logged; later refusals of the same VPS are
/// only counted (and logged at debug), so a VPS refused on every flush cannot
/// flood the log. Bounded: once full, new ones are only counted too.
const MAX_REMEMBERED_REJECTS: usize = 1024;

/// A batch waiting to be written, and the spill file it came from, if any.
#[derive(Debug)]
struct Queued {
    batch: FlushBatch,
    users: Vec<Uuid>,
    spill_file: Option<PathBuf>,
    /// The batch's bytes, still counted against their users until it is
    /// written and decided on.
    in_transit: InTransit,
    /// The batch's bytes let through against this proxy's leases.
    leases: Settled,
}

pub struct Flusher {
    meter: Arc<Meter>,
    pool: PgPool,
    enforcer: Arc<Enforcer>,
    health: Arc<Health>,
    config: MeterConfig,
    instance_id: Uuid,
    next_seq: i64,
    queue: VecDeque<Queued>,
    counted_since: DateTime<Utc>,
    last_success: Instant,
    ticks: u64,
    clock: Arc<dyn Clock>,
    /// VPSes whose refused rows were already logged.
    rejects_logged: HashSet<Uuid>,
}

impl Flusher {
    pub fn new(
        meter: Arc<Meter>,
        pool: PgPool,
        enforcer: Arc<Enforcer>,
        health: Arc<Health>,
        config: MeterConfig,
        instance_id: Uuid,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            meter,
            pool,
            enforcer,
            health,
            config,
            instance_id,
            next_seq: 0,
            queue: VecDeque::new(),
            counted_since: clock.now(),
            clock,
            last_success: Instant::now(),
            ticks: 0,
            rejects_logged: HashSet::new(),
        }
    }

    /// Make sure the spill directory exists and is writable, and queue the spill
    /// files a previous run left there. Call before serving.
    pub fn load_spills(&mut self) -> anyhow::Result<usize> {
        use anyhow::Context;
        let dir = &self.config.spill_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating proxy.meter.spill_dir {}", dir.display()))?;
        let probe = dir.join(format!(".probe-{}", self.instance_id));
        std::fs::write(&probe, b"")
            .with_context(|| format!("proxy.meter.spill_dir {} is not writable", dir.display()))?;
        let _ = std::fs::remove_file(&probe);

        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "spill"))
            .collect();
        files.sort();
        for path in files {
            match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|bytes| {
                    serde_json::from_slice::<FlushBatch>(&bytes).map_err(anyhow::Error::from)
                }) {
                Ok(batch) => {
                    tracing::info!(file = %path.display(), seq = batch.seq, "replaying spilled batch");
                    self.queue.push_back(Queued {
                        in_transit: InTransit::default(),
                        leases: Settled::default(),
                        batch,
                        users: Vec::new(),
                        spill_file: Some(path),
                    });
                }
                Err(e) => {
                    let aside = path.with_extension("spill.unreadable");
                    tracing::error!(
                        file = %path.display(), error = %e, moved_to = %aside.display(),
                        "spill file unreadable; moved aside for an operator to inspect"
                    );
                    let _ = std::fs::rename(&path, &aside);
                }
            }
        }
        self.report_queue();
        Ok(self.queue.len())
    }

    /// Flush every `flush_interval` until `stop`, then flush what is left and spill
    /// what cannot be written.
    pub async fn run(mut self, stop: CancellationToken) {
        let interval = self.config.flush_interval;
        let mut wait = interval;
        let mut backoff = interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
            match self.flush_once().await {
                Ok(()) => {
                    wait = interval;
                    backoff = interval;
                }
                Err(()) => {
                    wait = backoff;
                    backoff = (backoff * 2).min(self.config.max_retry_backoff);
                }
            }
            self.housekeeping().await;
        }
        self.finish().await;
    }

    /// One round: write queued batches in order, then drain and write new counts.
    /// `Err` if a write failed (the batch stays queued).
    pub async fn flush_once(&mut self) -> Result<(), ()> {
        let started = Instant::now();
        self.write_queue(started).await?;
        self.enqueue_drained();
        self.write_queue(started).await
    }

    fn enqueue_drained(&mut self) {
        let now = self.clock.now();
        let (drained, in_transit) = self.meter.drain_in_transit();
        // Bytes per destination go in the same batch, and so under the same
        // ledger row: written once with the counters, or not at all.
        let hosts = self.meter.drain_destinations();
        let from = std::mem::replace(&mut self.counted_since, now);
        if drained.is_empty() && hosts.is_empty() {
            return;
        }
        let mut batch = build_batch(self.instance_id, self.next_seq, &drained, from, now);
        batch.destinations = destination_deltas(&hosts, from, now, self.meter.destination_top_n());
        let (settlement, leases) = self
            .enforcer
            .leases()
            .settlement(&drained, |user| self.enforcer.known_gate(user));
        batch.leases = settlement;
        self.next_seq += 1;
        let users: Vec<Uuid> = drained
            .iter()
            .map(|d| d.user_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.queue.push_back(Queued {
            in_transit,
            leases,
            batch,
            users,
            spill_file: None,
        });
    }

    async fn write_queue(&mut self, started: Instant) -> Result<(), ()> {
        while let Some(queued) = self.queue.front() {
            let t = Instant::now();
            let written = self.health.observe(
                "flushing usage",
                usage::apply_flush_detailed(&self.pool, &queued.batch),
            );
            match written.await {
                Ok((outcome, rejected)) => {
                    let (rows, dropped) = match &outcome {
                        FlushOutcome::Applied { rows, dropped } => (*rows, dropped.clone()),
                        FlushOutcome::AlreadyApplied => (0, Vec::new()),
                    };
                    telemetry::flush_done(
                        t.elapsed().as_secs_f64(),
                        rows,
                        dropped.len(),
                        rejected.len(),
                    );
                    if !dropped.is_empty() {
                        tracing::warn!(
                            count = dropped.len(),
                            examples = ?&dropped[..dropped.len().min(LOGGED_EXAMPLES)],
                            "discarded counts of VPSes deleted before their bytes were written"
                        );
                    }
                    if !rejected.is_empty() {
                        report_rejected(&mut self.rejects_logged, queued.batch.seq, &rejected);
                    }
                    if outcome == FlushOutcome::AlreadyApplied {
                        tracing::info!(seq = queued.batch.seq, instance = %queued.batch.instance_id, "batch was already written; skipped");
                    }
                    let queued = self.queue.pop_front().expect("front exists");
                    if let Some(file) = &queued.spill_file {
                        if let Err(e) = std::fs::remove_file(file) {
                            tracing::warn!(file = %file.display(), error = %e, "replayed spill file could not be removed; the ledger will skip it next time");
                        }
                    }
                    self.last_success = Instant::now();
                    self.report_queue();
                    if !queued.users.is_empty() {
                        self.enforcer.send(Event::Flushed(Flushed {
                            users: queued.users,
                            started,
                            in_transit: queued.in_transit,
                            leases: queued.leases,
                        }));
                    }
                }
                Err(e) => {
                    metrics::counter!(telemetry::FLUSH_FAILURES).increment(1);
                    tracing::debug!(error = %e, seq = queued.batch.seq, "flush failed; will retry the same batch");
                    self.report_queue();
                    return Err(());
                }
            }
        }
        Ok(())
    }

    async fn housekeeping(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(60) {
            self.meter.evict_idle();
        }
        if self.ticks % 3600 == 1 {
            match usage::prune_flush_ledger(&self.pool, LEDGER_KEEP_DAYS).await {
                Ok(n) if n > 0 => tracing::debug!(rows = n, "pruned flush ledger"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "pruning the flush ledger failed"),
            }
        }
        let pending = self.meter.pending_bytes()
            + self
                .queue
                .iter()
                .map(|q| q.batch.total_rx() + q.batch.total_tx())
                .sum::<u64>();
        metrics::gauge!(telemetry::PENDING_BYTES).set(pending as f64);
        let lag = if pending > 0 {
            self.last_success.elapsed().as_secs_f64()
        } else {
            0.0
        };
        metrics::gauge!(telemetry::FLUSH_LAG).set(lag);
    }

    /// Final flush at shutdown: try to write everything once; spill the rest.
    async fn finish(mut self) {
        let attempt = async {
            let started = Instant::now();
            let _ = self.write_queue(started).await;
            if self.queue.is_empty() {
                self.enqueue_drained();
                let _ = self.write_queue(started).await;
            }
        };
        let timed_out = tokio::time::timeout(FINAL_FLUSH_TIMEOUT, attempt)
            .await
            .is_err();
        // Bytes counted after the last drain (or not drained because the queue was stuck).
        self.enqueue_drained();
        if self.queue.is_empty() {
            tracing::info!("final flush complete");
            return;
        }
        if timed_out {
            tracing::warn!("final flush timed out");
        }
        self.spill_queue();
    }

    fn spill_queue(&mut self) {
        for queued in self.queue.drain(..) {
            if let Some(file) = &queued.spill_file {
                tracing::warn!(file = %file.display(), "spilled batch still not written; kept for the next start");
                continue;
            }
            match write_spill(&self.config.spill_dir, &queued.batch) {
                Ok(path) => tracing::warn!(
                    file = %path.display(), bytes = queued.batch.total_rx() + queued.batch.total_tx(),
                    "database unreachable at shutdown: batch spilled, replayed at next start"
                ),
                Err(e) => tracing::error!(
                    error = %e, seq = queued.batch.seq,
                    bytes = queued.batch.total_rx() + queued.batch.total_tx(),
                    "could not write spill file: these counts are lost"
                ),
            }
        }
    }

    fn report_queue(&self) {
        let spilled = self.queue.iter().filter(|q| q.spill_file.is_some()).count();
        metrics::gauge!(telemetry::SPILLED_BATCHES).set(spilled as f64);
    }
}

/// Log rows the database refused (the rest of their batch was written): each
/// VPS once, in one line per batch; every refused row is in the metric.
fn report_rejected(logged: &mut HashSet<Uuid>, seq: i64, rejected: &[RejectedDelta]) {
    let mut first_seen = Vec::new();
    for r in rejected {
        tracing::debug!(
            vps_id = %r.delta.vps_id, period = %r.period, rx = r.delta.rx, tx = r.delta.tx,
            code = r.code.as_deref().unwrap_or(""), error = %r.message,
            "the database refused a VPS's counts; discarded"
        );
        if logged.len() < MAX_REMEMBERED_REJECTS && logged.insert(r.delta.vps_id) {
            first_seen.push(r);
        }
    }
    let Some(first) = first_seen.first() else {
        return;
    };
    let examples: Vec<Uuid> = first_seen
        .iter()
        .take(LOGGED_EXAMPLES)
        .map(|r| r.delta.vps_id)
        .collect();
    tracing::warn!(
        seq,
        count = rejected.len(),
        newly_refused = first_seen.len(),
        examples = ?examples,
        code = first.code.as_deref().unwrap_or(""),
        error = %first.message,
        "the database refused some VPSes' counts; they were discarded and the rest of the batch written"
    );
}

/// Turn drained counts into a batch, splitting each VPS's bytes between the
/// months the span `[from, to)` covers.
pub fn build_batch(
    instance_id: Uuid,
    seq: i64,
    drained: &[Drained],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> FlushBatch {
    let mut periods: BTreeMap<Period, Vec<BandwidthDelta>> = BTreeMap::new();
    for d in drained {
        for (period, (rx, tx)) in split_both_ways(from, to, d.rx, d.tx) {
            periods.entry(period).or_default().push(BandwidthDelta {
                vps_id: d.vps_id,
                rx,
                tx,
            });
        }
    }
    FlushBatch {
        instance_id,
        seq,
        periods: periods
            .into_iter()
            .map(|(period, deltas)| PeriodDeltas { period, deltas })
            .collect(),
        leases: None,
        destinations: DestinationDeltas::default(),
    }
}

/// Turn drained bytes per destination host into batch rows, split between the
/// months the span `[from, to)` covers as [`build_batch`] splits the counters;
/// each VPS keeps `top_n` hosts apart per month in the database.
pub fn destination_deltas(
    drained: &[DrainedHosts],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    top_n: u32,
) -> DestinationDeltas {
    let mut periods: BTreeMap<Period, Vec<DestinationDelta>> = BTreeMap::new();
    for d in drained {
        for h in &d.hosts {
            for (period, (rx, tx)) in split_both_ways(from, to, h.rx, h.tx) {
                periods.entry(period).or_default().push(DestinationDelta {
                    vps_id: d.vps_id,
                    host: h.host.to_string(),
                    rx,
                    tx,
                });
            }
        }
    }
    DestinationDeltas {
        top_n,
        periods: periods
            .into_iter()
            .map(|(period, rows)| PeriodDestinations { period, rows })
            .collect(),
    }
}

/// `rx` and `tx` counted over `[from, to)`, per month, months with neither left out.
fn split_both_ways(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    rx: u64,
    tx: u64,
) -> BTreeMap<Period, (u64, u64)> {
    let mut per_period: BTreeMap<Period, (u64, u64)> = BTreeMap::new();
    for (p, n) in split_at_month_boundaries(from, to, rx) {
        per_period.entry(p).or_default().0 += n;
    }
    for (p, n) in split_at_month_boundaries(from, to, tx) {
        per_period.entry(p).or_default().1 += n;
    }
    per_period.retain(|_, (rx, tx)| *rx != 0 || *tx != 0);
    per_period
}

/// Write `batch` to `<dir>/<instance>-<seq>.spill` atomically (temp file, fsync, rename).
pub fn write_spill(dir: &Path, batch: &FlushBatch) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!("{}-{:012}.spill", batch.instance_id, batch.seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(batch).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_batch_inside_one_month_has_one_period() {
        let vps = Uuid::new_v4();
        let d = [Drained {
            vps_id: vps,
            user_id: Uuid::nil(),
            rx: 10,
            tx: 20,
        }];
        let b = build_batch(
            Uuid::nil(),
            3,
            &d,
            at("2026-05-02T00:00:00Z"),
            at("2026-05-02T00:00:01Z"),
        );
        assert_eq!(b.seq, 3);
        assert_eq!(b.periods.len(), 1);
        assert_eq!(
            b.periods[0].deltas,
            vec![BandwidthDelta {
                vps_id: vps,
                rx: 10,
                tx: 20
            }]
        );
    }

    #[test]
    fn a_batch_straddling_a_month_splits_and_keeps_totals() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let d = [
            Drained {
                vps_id: a,
                user_id: Uuid::nil(),
                rx: 1000,
                tx: 4,
            },
            Drained {
                vps_id: b,
                user_id: Uuid::nil(),
                rx: 0,
                tx: 7,
            },
        ];
        let batch = build_batch(
            Uuid::nil(),
            0,
            &d,
            at("2026-05-31T23:59:59.5Z"),
            at("2026-06-01T00:00:00.5Z"),
        );
        assert_eq!(batch.periods.len(), 2);
        assert_eq!(batch.periods[0].period.to_string(), "2026-05");
        assert_eq!(batch.periods[1].period.to_string(), "2026-06");
        assert_eq!(batch.total_rx(), 1000);
        assert_eq!(batch.total_tx(), 11);
        let may_a = batch.periods[0]
            .deltas
            .iter()
            .find(|x| x.vps_id == a)
            .unwrap();
        assert_eq!(may_a.rx, 500);
    }

    #[test]
    fn destinations_split_at_a_month_like_their_counters() {
        let vps = Uuid::new_v4();
        let hosts = [DrainedHosts {
            vps_id: vps,
            hosts: vec![
                crate::meter::HostBytes {
                    host: "a.test".into(),
                    rx: 1000,
                    tx: 0,
                },
                crate::meter::HostBytes {
                    host: "other".into(),
                    rx: 3,
                    tx: 9,
                },
            ],
        }];
        let d = destination_deltas(
            &hosts,
            at("2026-05-31T23:59:59.5Z"),
            at("2026-06-01T00:00:00.5Z"),
            7,
        );
        assert_eq!(d.top_n, 7);
        assert_eq!(d.periods.len(), 2);
        let sum = |host: &str| {
            d.periods
                .iter()
                .flat_map(|p| &p.rows)
                .filter(|r| r.host == host && r.vps_id == vps)
                .fold((0, 0), |s, r| (s.0 + r.rx, s.1 + r.tx))
        };
        assert_eq!(sum("a.test"), (1000, 0));
        assert_eq!(sum("other"), (3, 9));
        assert_eq!(d.periods[0].rows[0].rx, 500);
    }

    #[test]
    fn spill_files_written_before_destinations_still_parse() {
        let batch = build_batch(
            Uuid::new_v4(),
            4,
            &[Drained {
                vps_id: Uuid::new_v4(),
                user_id: Uuid::nil(),
                rx: 1,
                tx: 2,
            }],
            Utc::now(),
            Utc::now(),
        );
        let mut old = serde_json::to_value(&batch).unwrap();
        old.as_object_mut().unwrap().remove("destinations").unwrap();
        let batch: FlushBatch = serde_json::from_value(old).unwrap();
        assert_eq!((batch.seq, batch.total_rx(), batch.total_tx()), (4, 1, 2));
        assert!(batch.destinations.is_empty());
    }

    #[test]
    fn spill_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("tollgate-spill-{}", Uuid::new_v4()));
        let batch = build_batch(
            Uuid::new_v4(),
            9,
            &[Drained {
                vps_id: Uuid::new_v4(),
                user_id: Uuid::nil(),
                rx: 1,
                tx: 2,
            }],
            Utc::now(),
            Utc::now(),
        );
        let mut batch = batch;
        batch.destinations = destination_deltas(
            &[DrainedHosts {
                vps_id: Uuid::new_v4(),
                hosts: vec![crate::meter::HostBytes {
                    host: "[::1]".into(),
                    rx: 5,
                    tx: 6,
                }],
            }],
            Utc::now(),
            Utc::now(),
            50,
        );
        let path = write_spill(&dir, &batch).unwrap();
        let back: FlushBatch = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, batch);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
