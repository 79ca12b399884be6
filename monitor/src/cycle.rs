//! One monitor cycle: sample every running VPS whose provider bills CPU or
//! memory (bounded concurrency, a timeout per sample, so one slow or failing VPS
//! never stalls the rest), write the samples, then decide every active user.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use futures_util::StreamExt;
use metrics::counter;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_core::billing::{metered_resources_for, Decision, Period};
use tollgate_core::config::MonitorConfig;
use tollgate_core::db::changes::BillingChange;
use tollgate_core::db::samples::{self, SampleTarget, SampleWrite};
use tollgate_core::db::{decisions, usage};

use crate::accounting::{self, Policy};
use crate::sources::{FailureReason, SampleError, Source};
use crate::telemetry;

/// Users evaluated per statement.
const DECISION_BATCH: usize = 10_000;
/// VPS ids named in one log line about failed samples; the rest are counted.
const LOGGED_EXAMPLES: usize = 3;
/// Kinds of failure (provider, source, reason) logged per cycle, each in one
/// line; more are summed up in one more line.
const LOGGED_KINDS: usize = 10;

/// What a cycle did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub sampled: usize,
    pub failed: usize,
    pub written: usize,
    pub allowed: usize,
    pub blocked: usize,
}

/// The sources per provider, from config.
pub struct Sources {
    by_provider: HashMap<String, Source>,
    default: Option<Source>,
}

impl Sources {
    pub fn from_config(config: &MonitorConfig) -> Self {
        Self {
            by_provider: config
                .providers
                .iter()
                .map(|(name, s)| (name.clone(), Source::new(s.clone())))
                .collect(),
            default: config.default_source.clone().map(Source::new),
        }
    }

    fn for_provider(&self, provider: &str) -> Option<&Source> {
        self.by_provider
            .get(&provider.trim().to_ascii_lowercase())
            .or(self.default.as_ref())
    }
}

/// Sample, write, decide. `decided_by` names this monitor in published decisions.
pub async fn run_cycle(
    pool: &PgPool,
    config: &MonitorConfig,
    sources: &Sources,
    decided_by: &str,
) -> Result<CycleReport, sqlx::Error> {
    let mut report = CycleReport::default();
    let targets: Vec<SampleTarget> = samples::running_targets(pool)
        .await?
        .into_iter()
        .filter(|t| metered_resources_for(&t.provider).needs_sampling())
        .collect();
    let ids: Vec<Uuid> = targets.iter().map(|t| t.vps_id).collect();
    let states: HashMap<Uuid, samples::SampleState> = samples::states(pool, &ids)
        .await?
        .into_iter()
        .map(|s| (s.vps_id, s))
        .collect();

    let results: Vec<(SampleTarget, Result<SampleWrite, SampleError>)> =
        futures_util::stream::iter(targets)
            .map(|target| {
                let previous = states.get(&target.vps_id);
                async move {
                    let result = sample_one(&target, previous, sources, config).await;
                    (target, result)
                }
            })
            .buffer_unordered(config.concurrency)
            .collect()
            .await;

    let mut writes = Vec::with_capacity(results.len());
    let mut failures = Failures::default();
    for (target, result) in results {
        match result {
            Ok(write) => {
                report.sampled += 1;
                writes.push(write);
            }
            Err(e) => {
                report.failed += 1;
                failures.add(&target.provider, e);
            }
        }
    }
    failures.report();
    report.written = samples::apply(pool, &writes).await?.len();
    let (allowed, blocked) = evaluate(
        pool,
        &usage::active_users(pool, Period::current()).await?,
        decided_by,
    )
    .await?;
    report.allowed = allowed;
    report.blocked = blocked;
    metrics::gauge!(telemetry::USERS_BLOCKED).set(blocked as f64);
    Ok(report)
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

async fn sample_one(
    target: &SampleTarget,
    previous: Option<&samples::SampleState>,
    sources: &Sources,
    config: &MonitorConfig,
) -> Result<SampleWrite, SampleError> {
    let Some(source) = sources.for_provider(&target.provider) else {
        counter!(telemetry::SAMPLES, "source" => "none", "outcome" => "permanent_error")
            .increment(1);
        return Err(SampleError {
            vps_id: target.vps_id,
            source_kind: crate::sources::SourceKind::Unconfigured,
            reason: FailureReason::NoSource,
            retryable: false,
            message: format!(
                "no source configured for provider `{}`: add [monitor.providers.{}] or [monitor.default_source]",
                target.provider,
                target.provider.to_ascii_lowercase()
            ),
        });
    };
    let kind = source.kind().as_str();
    let reading = match tokio::time::timeout(config.sample_timeout, source.sample(target)).await {
        Ok(Ok(reading)) => reading,
        Ok(Err(e)) => {
            let outcome = if e.retryable {
                "retryable_error"
            } else {
                "permanent_error"
            };
            counter!(telemetry::SAMPLES, "source" => kind, "outcome" => outcome).increment(1);
            return Err(e);
        }
        Err(_) => {
            counter!(telemetry::SAMPLES, "source" => kind, "outcome" => "timeout").increment(1);
            return Err(SampleError {
                vps_id: target.vps_id,
                source_kind: source.kind(),
                reason: FailureReason::Timeout,
                retryable: true,
                message: format!(
                    "no answer within {:?} (monitor.sample_timeout)",
                    config.sample_timeout
                ),
            });
        }
    };
    counter!(telemetry::SAMPLES, "source" => kind, "outcome" => "ok").increment(1);
    let metered = metered_resources_for(&target.provider);
    let policy = Policy {
        cpu: metered.cpu,
        memory: metered.memory,
        max_gap: config.max_gap,
        cpu_millicores: target.cpu_millicores,
    };
    Ok(accounting::account(
        target.vps_id,
        kind,
        previous,
        &reading,
        &policy,
    ))
}

/// Decide `users` for the current period and publish every decision as of the
/// instant its figures were read (the trigger notifies proxies only of the ones
/// that flipped). Returns (allowed, blocked).
pub async fn evaluate(
    pool: &PgPool,
    users: &[Uuid],
    decided_by: &str,
) -> Result<(usize, usize), sqlx::Error> {
    let period = Period::current();
    let (mut allowed, mut blocked) = (0, 0);
    for chunk in users.chunks(DECISION_BATCH) {
        let billing = usage::user_billing(pool, chunk, period).await?;
        // One statement read them all: one instant for the whole chunk.
        let Some(read_at) = billing.first().map(|b| b.read_at) else {
            continue;
        };
        let decided: Vec<(Uuid, Decision)> = billing
            .into_iter()
            .map(|b| (b.user_id, b.decide()))
            .collect();
        let now_blocked = decided.iter().filter(|(_, d)| d.is_blocked()).count();
        blocked += now_blocked;
        allowed += decided.len() - now_blocked;
        // A proxy may publish a decision from fresher figures while this one
        // was being computed: it is kept (`publish_as_of` replaces only older ones).
        decisions::publish_as_of(pool, period, &decided, decided_by, read_at).await?;
    }
    counter!(telemetry::DECISIONS, "outcome" => "allowed").increment(allowed as u64);
    counter!(telemetry::DECISIONS, "outcome" => "blocked").increment(blocked as u64);
    Ok((allowed, blocked))
}

/// A plan or budget changed: decide the affected users now.
pub async fn on_billing_change(
    pool: &PgPool,
    change: BillingChange,
    decided_by: &str,
) -> Result<(), sqlx::Error> {
    let users = change.users(pool).await?;
    evaluate(pool, &users, decided_by).await.map(|_| ())
}

/// Run a cycle and record its metrics.
pub async fn timed_cycle(
    pool: &PgPool,
    config: &MonitorConfig,
    sources: &Sources,
    decided_by: &str,
) -> Result<CycleReport, sqlx::Error> {
    let started = Instant::now();
    let report = run_cycle(pool, config, sources, decided_by).await?;
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
