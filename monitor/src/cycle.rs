//! One monitor cycle: sample every running VPS whose provider bills CPU or
//! memory, one request per provider where the source allows it (a fleet
//! Prometheus query, one cgroup directory walk) and a bounded number at once
//! where it does not (the in-VM agent), so one slow or failing VPS never
//! stalls the rest; write the samples that are due ([`Pending`]); then decide
//! the users whose inputs changed, and a share of everyone (the slow sweep).
//!
//! ```text
//!  running VPSes ─▶ group by source ─▶ sample_all ─▶ Pending (accounted, held)
//!                                                      │ due: new, stopped, watched users, this cycle's share
//!                                                      ▼
//!                          samples::apply (state + usage + gauges, one transaction)
//!  decide: users written ∪ users with new usage (xmin watermark) ∪ sweep share
//!          (everyone after taking the lead, a new month, or missed notifications)
//!          ─▶ publish the ones whose outcome changed, near a limit, or swept
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use metrics::counter;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_core::billing::{
    self, metered_resources_for, Decision, MeteredResources, Period, PlanLimits, Usage,
};
use tollgate_core::config::MonitorConfig;
use tollgate_core::db::changes::{self, BillingChange, Watermark};
use tollgate_core::db::samples::{self, SampleTarget};
use tollgate_core::db::{decisions, usage};

use crate::accounting::Policy;
use crate::pending::{Due, DueWrite, Pending};
use crate::sources::{FailureReason, Prefetched, SampleError, Source, SourceKind};
use crate::telemetry;

/// Users evaluated per statement.
const DECISION_BATCH: usize = 10_000;
/// Statements (each on its own connection) a cycle's sample writes and
/// decisions are spread over, so PostgreSQL can use more than one core.
const WRITE_PARTS: usize = 2;
/// Fewer writes than this go in one transaction.
const MIN_WRITE_PART: usize = 5_000;
/// VPS ids named in one log line about failed samples; the rest are counted.
const LOGGED_EXAMPLES: usize = 3;
/// Kinds of failure (provider, source, reason) logged per cycle, each in one
/// line; more are summed up in one more line.
const LOGGED_KINDS: usize = 10;

/// What a cycle did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CycleReport {
    /// VPSes read successfully.
    pub sampled: usize,
    pub failed: usize,
    /// Requests made to sources (HTTP queries, cgroup directory listings).
    pub queries: usize,
    /// VPSes whose samples were written (each: sample state, usage, gauges).
    pub written: usize,
    /// Users decided, and how.
    pub allowed: usize,
    pub blocked: usize,
    /// Users decided from a fresh read of their figures.
    pub read: usize,
    /// Users decided from known figures plus the usage written for them (far
    /// from every limit: nothing to read or store).
    pub kept: usize,
    /// Decisions stored (changed outcome, near a limit, swept, or new).
    pub published: usize,
    /// Whether every active user was decided (after taking the lead, at a new
    /// month, after missed notifications).
    pub decided_all: bool,
    /// Time spent asking the sources (while the fleet is read and the VPSes
    /// whose turn it is are written) and accounting the readings; writing the
    /// samples due at once; finding and deciding users.
    pub sampling: Duration,
    pub writing: Duration,
    pub deciding: Duration,
}

/// The sources per provider, from config.
pub struct Sources {
    sources: Vec<Source>,
    by_provider: HashMap<String, usize>,
    default: Option<usize>,
}

impl Sources {
    pub fn from_config(config: &MonitorConfig) -> Self {
        let mut sources = Vec::new();
        let mut by_provider = HashMap::new();
        for (name, s) in &config.providers {
            by_provider.insert(name.clone(), sources.len());
            sources.push(Source::new(s.clone()));
        }
        let default = config.default_source.clone().map(|s| {
            sources.push(Source::new(s));
            sources.len() - 1
        });
        Self {
            sources,
            by_provider,
            default,
        }
    }

    /// Index of the source for `provider` in `sources`.
    fn for_provider(&self, provider: &str) -> Option<usize> {
        self.by_provider
            .get(&provider.trim().to_ascii_lowercase())
            .copied()
            .or(self.default)
    }
}

/// What the leading monitor carries from one cycle to the next; a new leader
/// starts from [`Tracker::new`], which decides everyone in its first cycle.
#[derive(Debug)]
pub struct Tracker {
    pending: Pending,
    /// Users near a limit or blocked: their VPSes are written every cycle.
    watched: HashSet<Uuid>,
    /// Each user's figures as last read from the database, plus the sampled
    /// usage written for them since: enough to decide a user far from every
    /// limit after a write without reading the database again.
    known: HashMap<Uuid, Known>,
    watermark: Option<Watermark>,
    period: Option<Period>,
    cycles: u64,
    decide_all: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self {
            pending: Pending::default(),
            watched: HashSet::new(),
            known: HashMap::new(),
            watermark: None,
            period: None,
            cycles: 0,
            decide_all: true,
        }
    }

    /// Change notifications may have been missed: decide everyone next cycle.
    pub fn decide_everyone_next(&mut self) {
        self.decide_all = true;
    }

    /// VPSes whose sampled usage is held, not yet written.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Take in what a decision read from the database.
    fn learn(&mut self, decided: Vec<(Uuid, Known)>) {
        for (user, k) in decided {
            if k.near {
                self.watched.insert(user);
            } else {
                self.watched.remove(&user);
            }
            self.known.insert(user, k);
        }
    }

    /// `write` (of a VPS of `user`) was stored: whether the user is still far
    /// from every limit, decided from what is known of them plus the write. Users
    /// not known, with a storage reading (the largest VPS's gauge cannot be
    /// updated from one VPS) or usage outside `period` must be read again.
    fn still_far(&mut self, user: Uuid, write: &samples::SampleWrite, period: Period) -> bool {
        let Some(k) = self.known.get_mut(&user) else {
            return false;
        };
        if write.storage_bytes.is_some() || write.increments.iter().any(|i| i.period != period) {
            self.known.remove(&user);
            return false;
        }
        for i in &write.increments {
            k.usage.cpu_ms = k.usage.cpu_ms.saturating_add(i.cpu_ms);
            k.usage.memory_mb_seconds = k
                .usage
                .memory_mb_seconds
                .saturating_add(i.memory_mb_seconds);
        }
        let decision = billing::decide(k.limits.as_ref(), &k.usage, k.budget_cents);
        !decision.is_blocked() && !near_a_limit(&decision)
    }
}

/// What the monitor knows of a user's figures (see [`Tracker`]).
#[derive(Debug, Clone, Copy)]
struct Known {
    limits: Option<PlanLimits>,
    usage: Usage,
    budget_cents: i64,
    /// Near a limit or blocked as last decided.
    near: bool,
}

/// How many shares `every` divides into at one cycle per `interval`.
fn shares(every: std::time::Duration, interval: std::time::Duration) -> u64 {
    let n = every.as_secs_f64() / interval.as_secs_f64().max(1e-3);
    (n.ceil() as u64).max(1)
}

/// Sample, write what is due, decide what changed. `decided_by` names this
/// monitor in published decisions.
pub async fn run_cycle(
    pool: &PgPool,
    config: &MonitorConfig,
    sources: &Sources,
    decided_by: &str,
    tracker: &mut Tracker,
) -> Result<CycleReport, sqlx::Error> {
    let mut report = CycleReport::default();
    let mut phase = Instant::now();
    let period = Period::current();
    if tracker.period != Some(period) {
        tracker.period = Some(period);
        tracker.decide_all = true;
    }
    // Fleet sources' queries run while the fleet is read from the database
    // and the VPSes whose turn it is are written with what was held for them.
    let mut metered: HashMap<String, MeteredResources> = HashMap::new();
    let prefetches: Vec<_> = sources
        .sources
        .iter()
        .map(|s| s.prefetch(config.sample_timeout))
        .collect();
    let turn = Due::InTurn {
        share: tracker.cycles % shares(config.write_interval, config.interval),
        shares: shares(config.write_interval, config.interval),
    };
    let (pending, watched) = (&mut tracker.pending, &tracker.watched);
    let early = async {
        let (targets, running) = read_fleet(pool, pending, &mut metered).await?;
        let due = pending.due(&running, watched, turn);
        let written = write(pool, &due).await?;
        Ok::<_, sqlx::Error>((targets, running, due, written))
    };
    let (early, prefetched) = tokio::join!(early, futures_util::future::join_all(prefetches));
    let (targets, running, early_due, early_written) = early?;
    tracker
        .pending
        .settle(&early_due, &early_written.vpses, &running);
    let mut prefetched: Vec<Option<Prefetched>> = prefetched;
    report.queries += 2 * prefetched.iter().filter(|p| p.is_some()).count();

    // Each source gets its whole share of the fleet at once.
    let mut groups: BTreeMap<Option<usize>, Vec<SampleTarget>> = BTreeMap::new();
    for t in targets {
        groups
            .entry(sources.for_provider(&t.provider))
            .or_default()
            .push(t);
    }
    let mut failures = Failures::default();
    let mut outcomes: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    for (index, targets) in groups {
        let (kind, results, queries) = match index.map(|i| (&sources.sources[i], i)) {
            Some((source, i)) => {
                let (results, queries) = source
                    .sample_all(
                        &targets,
                        config.concurrency,
                        config.sample_timeout,
                        prefetched[i].take(),
                    )
                    .await;
                (Some(source.kind()), results, queries)
            }
            None => (None, targets.iter().map(|t| Err(no_source(t))).collect(), 0),
        };
        report.queries += queries;
        let label = kind.map_or("none", SourceKind::as_str);
        for (target, result) in targets.iter().zip(results) {
            match result {
                Ok(reading) => {
                    report.sampled += 1;
                    *outcomes.entry((label, "ok")).or_default() += 1;
                    let m = metered_for(&mut metered, &target.provider);
                    let policy = Policy {
                        cpu: m.cpu,
                        memory: m.memory,
                        max_gap: config.max_gap,
                        cpu_millicores: target.cpu_millicores,
                    };
                    tracker
                        .pending
                        .record(target.vps_id, label, &reading, &policy);
                }
                Err(e) => {
                    report.failed += 1;
                    let outcome = match (e.reason, e.retryable) {
                        (FailureReason::Timeout, _) => "timeout",
                        (_, true) => "retryable_error",
                        (_, false) => "permanent_error",
                    };
                    *outcomes.entry((label, outcome)).or_default() += 1;
                    failures.add(&target.provider, e);
                }
            }
        }
    }
    for ((source, outcome), n) in outcomes {
        counter!(telemetry::SAMPLES, "source" => source, "outcome" => outcome).increment(n);
    }
    failures.report();
    report.sampling = phase.elapsed();
    phase = Instant::now();

    // New VPSes, stopped ones and those of watched users are written with
    // this cycle's readings.
    let late_due = tracker.pending.due(&running, &tracker.watched, Due::Now);
    let late_written = write(pool, &late_due).await?;
    tracker
        .pending
        .settle(&late_due, &late_written.vpses, &running);
    report.written = early_written.vpses.len() + late_written.vpses.len();
    // Users whose written usage leaves them far from every limit are decided
    // from what is known of them; the others, and those whose VPS's bandwidth
    // moved since the last write (a proxy flushed), are read again below.
    let written: Vec<&DueWrite> = early_due
        .iter()
        .filter(|d| early_written.vpses.contains(&d.write.state.vps_id))
        .chain(
            late_due
                .iter()
                .filter(|d| late_written.vpses.contains(&d.write.state.vps_id)),
        )
        .collect();
    let user_of: HashMap<Uuid, Uuid> = written
        .iter()
        .map(|d| (d.write.state.vps_id, d.user_id))
        .collect();
    let mut to_decide: HashSet<Uuid> = HashSet::new();
    for (vps, p, bandwidth) in early_written
        .bandwidth
        .iter()
        .chain(&late_written.bandwidth)
    {
        if !tracker.pending.bandwidth_unchanged(*vps, *p, *bandwidth) {
            to_decide.extend(user_of.get(vps));
        }
    }
    let mut far: HashSet<Uuid> = HashSet::new();
    for d in written {
        if d.write.increments.is_empty() || to_decide.contains(&d.user_id) {
            continue;
        }
        if tracker.still_far(d.user_id, &d.write, period) {
            far.insert(d.user_id);
        } else {
            to_decide.insert(d.user_id);
        }
    }
    far.retain(|u| !to_decide.contains(u));
    let own_xids: Vec<i64> = early_written
        .xids
        .iter()
        .chain(&late_written.xids)
        .copied()
        .collect();
    report.writing = phase.elapsed();
    phase = Instant::now();

    // Everyone else whose usage changed (proxies' flushes), and the sweep's share.
    let (flushed, watermark) =
        changes::users_with_new_usage(pool, period, tracker.watermark, &own_xids).await?;
    tracker.watermark = Some(watermark);
    to_decide.extend(flushed);
    let sweep_shares = shares(config.full_sweep_interval, config.interval);
    let (from, to) = sweep_range(tracker.cycles % sweep_shares, sweep_shares);
    let swept: HashSet<Uuid> = changes::active_users_between(pool, period, from, to)
        .await?
        .into_iter()
        .collect();
    report.decided_all = tracker.decide_all;
    if tracker.decide_all {
        to_decide.extend(usage::active_users(pool, period).await?);
    }
    to_decide.extend(swept.iter().copied());
    let mut users: Vec<Uuid> = to_decide.into_iter().collect();
    users.sort_unstable();
    let outcome = decide(
        pool,
        &users,
        Publish::Changed { refresh: &swept },
        decided_by,
    )
    .await?;
    report.allowed = outcome.allowed;
    report.blocked = outcome.blocked;
    report.published = outcome.published;
    report.read = users.len();
    report.kept = far
        .iter()
        .filter(|u| users.binary_search(u).is_err())
        .count();
    report.allowed += report.kept;
    tracker.learn(outcome.known);
    if tracker.known.len() > running.len() {
        // Bounded: forget users with no running VPS to write for.
        let with_vpses = tracker.pending.users();
        tracker.watched.retain(|u| with_vpses.contains(u));
        tracker.known.retain(|u, _| with_vpses.contains(u));
    }
    metrics::gauge!(telemetry::USERS_BLOCKED)
        .set(decisions::blocked_count(pool, period).await? as f64);
    metrics::gauge!(telemetry::HELD).set(tracker.pending.len() as f64);
    tracker.decide_all = false;
    tracker.cycles += 1;
    report.deciding = phase.elapsed();
    Ok(report)
}

/// Write `due`: each VPS's rows commit together; the writes are split over
/// [`WRITE_PARTS`] transactions on their own connections, each committing on
/// its own (held usage is conditional on the stored state, so a part that
/// failed is neither lost nor counted twice when tried again).
async fn write(pool: &PgPool, due: &[DueWrite]) -> Result<Written, sqlx::Error> {
    let mut writes: Vec<samples::SampleWrite> = due.iter().map(|d| d.write.clone()).collect();
    writes.sort_unstable_by_key(|w| w.state.vps_id);
    let part = writes.len().div_ceil(WRITE_PARTS).max(MIN_WRITE_PART);
    let parts: Vec<_> = writes
        .chunks(part)
        .map(|chunk| samples::apply_detailed(pool, chunk))
        .collect();
    let mut out = Written::default();
    for applied in futures_util::future::try_join_all(parts).await? {
        out.vpses.extend(applied.written);
        out.bandwidth.extend(applied.bandwidth);
        out.xids.extend(applied.xid);
    }
    Ok(out)
}

/// What [`write`] wrote.
#[derive(Default)]
struct Written {
    vpses: HashSet<Uuid>,
    bandwidth: Vec<(Uuid, Period, i64)>,
    xids: Vec<i64>,
}

/// The running VPSes to sample (and their ids); VPSes not held yet (all of
/// them in a new leader's first cycle) start from the state the database has.
async fn read_fleet(
    pool: &PgPool,
    pending: &mut Pending,
    metered: &mut HashMap<String, MeteredResources>,
) -> Result<(Vec<SampleTarget>, HashSet<Uuid>), sqlx::Error> {
    let targets: Vec<SampleTarget> = samples::running_targets(pool)
        .await?
        .into_iter()
        .filter(|t| metered_for(metered, &t.provider).needs_sampling())
        .collect();
    let running: HashSet<Uuid> = targets.iter().map(|t| t.vps_id).collect();
    let unknown: Vec<&SampleTarget> = targets
        .iter()
        .filter(|t| !pending.knows(&t.vps_id))
        .collect();
    if !unknown.is_empty() {
        let ids: Vec<Uuid> = unknown.iter().map(|t| t.vps_id).collect();
        let mut stored: HashMap<Uuid, samples::SampleState> = samples::states(pool, &ids)
            .await?
            .into_iter()
            .map(|s| (s.vps_id, s))
            .collect();
        for t in unknown {
            pending.load(t.vps_id, t.user_id, stored.remove(&t.vps_id));
        }
    }
    Ok((targets, running))
}

/// The metering policy of `provider`, looked up once per name per cycle.
fn metered_for(cache: &mut HashMap<String, MeteredResources>, provider: &str) -> MeteredResources {
    if let Some(m) = cache.get(provider) {
        return *m;
    }
    let m = metered_resources_for(provider);
    cache.insert(provider.to_owned(), m);
    m
}

/// The id range of sweep share `share` of `shares`: `from..to`, `to` `None` at the end.
fn sweep_range(share: u64, shares: u64) -> (Uuid, Option<Uuid>) {
    let step = u128::MAX / u128::from(shares.max(1));
    let from = Uuid::from_u128(step * u128::from(share));
    let to = (share + 1 < shares).then(|| Uuid::from_u128(step * u128::from(share + 1)));
    (from, to)
}

fn no_source(target: &SampleTarget) -> SampleError {
    SampleError {
        vps_id: target.vps_id,
        source_kind: SourceKind::Unconfigured,
        reason: FailureReason::NoSource,
        retryable: false,
        message: format!(
            "no source configured for provider `{}`: add [monitor.providers.{}] or [monitor.default_source]",
            target.provider,
            target.provider.to_ascii_lowercase()
        ),
    }
}

/// A cycle's failed samples, grouped so that a fleet-wide problem (a provider
/// with no source, a Prometheus that is down) is one log line per cycle, not
/// one per VPS: per-VPS detail goes to debug, counts go to the
/// `tollgate_monitor_sample_failures_total` metric.
#[derive(Default)]
struct Failures {
    kinds: BTreeMap<FailureKind, FailureGroup>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct FailureKind {
    /// Not retryable first: those need an operator.
    retryable: bool,
    provider: String,
    source: &'static str,
    reason: FailureReason,
}

struct FailureGroup {
    count: u64,
    examples: Vec<Uuid>,
    first: SampleError,
}

impl Failures {
    fn add(&mut self, provider: &str, e: SampleError) {
        tracing::debug!(error = %e, provider, "sample failed");
        let kind = FailureKind {
            retryable: e.retryable,
            provider: provider.trim().to_ascii_lowercase(),
            source: e.source_kind.as_str(),
            reason: e.reason,
        };
        let vps_id = e.vps_id;
        let group = self.kinds.entry(kind).or_insert_with(|| FailureGroup {
            count: 0,
            examples: Vec::new(),
            first: e,
        });
        group.count += 1;
        if group.examples.len() < LOGGED_EXAMPLES {
            group.examples.push(vps_id);
        }
    }

    /// Count every failure in the metric and log one line per kind (at most
    /// [`LOGGED_KINDS`] of them, then one line for the rest).
    fn report(self) {
        let (mut more_kinds, mut more_samples) = (0usize, 0u64);
        for (i, (kind, group)) in self.kinds.into_iter().enumerate() {
            counter!(
                telemetry::SAMPLE_FAILURES,
                "provider" => telemetry::provider_label(&kind.provider),
                "source" => kind.source,
                "reason" => kind.reason.as_str()
            )
            .increment(group.count);
            if i >= LOGGED_KINDS {
                more_kinds += 1;
                more_samples += group.count;
                continue;
            }
            if kind.retryable {
                tracing::info!(
                    provider = %kind.provider, source = kind.source, reason = kind.reason.as_str(),
                    count = group.count, examples = ?group.examples, first_error = %group.first,
                    "samples failed this cycle; retried next cycle"
                );
            } else {
                tracing::warn!(
                    provider = %kind.provider, source = kind.source, reason = kind.reason.as_str(),
                    count = group.count, examples = ?group.examples, first_error = %group.first,
                    "samples failed this cycle; fix the source configuration"
                );
            }
        }
        if more_kinds > 0 {
            tracing::warn!(
                kinds = more_kinds,
                count = more_samples,
                "samples failed this cycle in more ways than are logged; see tollgate_monitor_sample_failures_total"
            );
        }
    }
}

/// Which decisions to store.
enum Publish<'a> {
    /// Every one (a plan or budget changed: figures and outcome are news).
    All,
    /// Those whose outcome differs from the stored one (or none is stored),
    /// those near a limit (their figures matter to proxies), and `refresh`.
    Changed { refresh: &'a HashSet<Uuid> },
}

/// What [`decide`] found.
#[derive(Debug, Default)]
struct Decided {
    allowed: usize,
    blocked: usize,
    published: usize,
    /// Each user decided, with the figures read.
    known: Vec<(Uuid, Known)>,
}

/// Whether `d` leaves a user within 20 % of a limit or of their budget, or
/// blocks them: then their usage is written and decided every cycle.
fn near_a_limit(d: &Decision) -> bool {
    let Some(limits) = d.figures.limits else {
        return true;
    };
    let u = &d.figures.usage;
    let near = |used: i64, limit: i64| used.saturating_mul(5) >= limit.saturating_mul(4);
    d.is_blocked()
        || near(u.bandwidth_bytes, limits.max_bandwidth_bytes)
        || near(u.cpu_ms, limits.max_cpu_ms)
        || near(u.memory_mb_seconds, limits.max_memory_mb_seconds)
        || near(u.max_vps_storage_bytes, limits.max_storage_bytes)
        || (d.figures.overage_cost_cents > 0
            && near(d.figures.overage_cost_cents, d.figures.budget_cents))
}

/// Decide `users` for the current period from one read of their figures per
/// chunk (two chunks at once), and store the decisions `publish` selects as of
/// that read.
async fn decide(
    pool: &PgPool,
    users: &[Uuid],
    publish: Publish<'_>,
    decided_by: &str,
) -> Result<Decided, sqlx::Error> {
    let period = Period::current();
    let chunks: Vec<_> = users
        .chunks(DECISION_BATCH)
        .map(|chunk| decide_chunk(pool, chunk, &publish, decided_by, period))
        .collect();
    let parts: Vec<Decided> = futures_util::stream::iter(chunks)
        .buffer_unordered(WRITE_PARTS)
        .try_collect()
        .await?;
    let mut out = Decided::default();
    for part in parts {
        out.allowed += part.allowed;
        out.blocked += part.blocked;
        out.published += part.published;
        out.known.extend(part.known);
    }
    counter!(telemetry::DECISIONS, "outcome" => "allowed").increment(out.allowed as u64);
    counter!(telemetry::DECISIONS, "outcome" => "blocked").increment(out.blocked as u64);
    Ok(out)
}

async fn decide_chunk(
    pool: &PgPool,
    chunk: &[Uuid],
    publish: &Publish<'_>,
    decided_by: &str,
    period: Period,
) -> Result<Decided, sqlx::Error> {
    let mut out = Decided::default();
    let billing = usage::user_billing(pool, chunk, period).await?;
    // One statement read them all: one instant for the whole chunk.
    let Some(read_at) = billing.first().map(|b| b.read_at) else {
        return Ok(out);
    };
    let stored: HashMap<Uuid, _> = match publish {
        Publish::All => HashMap::new(),
        Publish::Changed { .. } => decisions::outcomes(pool, period, chunk)
            .await?
            .into_iter()
            .collect(),
    };
    let mut to_publish: Vec<(Uuid, Decision)> = Vec::new();
    for b in billing {
        let decision = b.decide();
        let near = near_a_limit(&decision);
        if decision.is_blocked() {
            out.blocked += 1;
        } else {
            out.allowed += 1;
        }
        out.known.push((
            b.user_id,
            Known {
                limits: b.limits,
                usage: b.usage,
                budget_cents: b.budget_cents,
                near,
            },
        ));
        let wanted = match publish {
            Publish::All => true,
            Publish::Changed { refresh } => {
                near || refresh.contains(&b.user_id)
                    || stored.get(&b.user_id) != Some(&decision.blocked)
            }
        };
        if wanted {
            to_publish.push((b.user_id, decision));
        }
    }
    // A proxy may publish a decision from fresher figures while this one
    // was being computed: it is kept (`publish_as_of` replaces only older ones).
    out.published =
        decisions::publish_as_of(pool, period, &to_publish, decided_by, read_at).await? as usize;
    Ok(out)
}

/// Decide `users` for the current period and publish every decision as of the
/// instant its figures were read (the trigger notifies proxies only of the ones
/// that flipped). Returns (allowed, blocked).
pub async fn evaluate(
    pool: &PgPool,
    users: &[Uuid],
    decided_by: &str,
) -> Result<(usize, usize), sqlx::Error> {
    let d = decide(pool, users, Publish::All, decided_by).await?;
    Ok((d.allowed, d.blocked))
}

/// A plan or budget changed: decide the affected users now (and remember
/// their new figures in `tracker`).
pub async fn on_billing_change(
    pool: &PgPool,
    change: BillingChange,
    decided_by: &str,
    tracker: &mut Tracker,
) -> Result<(), sqlx::Error> {
    let users = change.users(pool).await?;
    for u in &users {
        tracker.known.remove(u);
    }
    let decided = decide(pool, &users, Publish::All, decided_by).await?;
    tracker.learn(decided.known);
    Ok(())
}

/// Run a cycle and record its metrics.
pub async fn timed_cycle(
    pool: &PgPool,
    config: &MonitorConfig,
    sources: &Sources,
    decided_by: &str,
    tracker: &mut Tracker,
) -> Result<CycleReport, sqlx::Error> {
    let started = Instant::now();
    let report = run_cycle(pool, config, sources, decided_by, tracker).await?;
    let took = started.elapsed();
    metrics::histogram!(telemetry::CYCLE_DURATION).record(took.as_secs_f64());
    counter!(telemetry::CYCLES).increment(1);
    if took > config.interval {
        counter!(telemetry::CYCLE_OVERRUNS).increment(1);
        tracing::warn!(took = ?took, interval = ?config.interval, "cycle took longer than monitor.interval");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(telemetry::LAST_CYCLE).set(now.as_secs_f64());
    tracing::debug!(?report, took = ?took, "cycle done");
    Ok(report)
}
