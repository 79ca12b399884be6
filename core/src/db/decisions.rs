//! Published enforcement decisions (`usage_decisions`): written by the monitor
//! and by proxies, read by every proxy.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::billing::{BlockReason, Decision, OnExhausted, Period};

/// A decision as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedDecision {
    pub user_id: Uuid,
    pub period: Period,
    pub blocked: Option<BlockReason>,
    /// What the user's plan does once exhausted: with `blocked`, whether the
    /// user is blocked or throttled.
    pub on_exhausted: OnExhausted,
    pub figures: serde_json::Value,
    pub decided_by: String,
    /// When the inputs of this decision were read (database clock); a stored
    /// decision is only ever replaced by one read later.
    pub decided_at: DateTime<Utc>,
    pub changed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DecisionRow {
    user_id: Uuid,
    period_start: chrono::NaiveDate,
    reason: Option<String>,
    throttle_bytes_per_second: Option<i64>,
    figures: serde_json::Value,
    decided_by: String,
    decided_at: DateTime<Utc>,
    changed_at: DateTime<Utc>,
}

impl TryFrom<DecisionRow> for PublishedDecision {
    type Error = sqlx::Error;

    fn try_from(r: DecisionRow) -> Result<Self, Self::Error> {
        let decode = |m: String| sqlx::Error::Decode(m.into());
        Ok(PublishedDecision {
            user_id: r.user_id,
            period: Period::starting(r.period_start).ok_or_else(|| {
                decode(format!(
                    "period_start {} is not a month start",
                    r.period_start
                ))
            })?,
            blocked: r
                .reason
                .map(|s| s.parse::<BlockReason>())
                .transpose()
                .map_err(decode)?,
            on_exhausted: OnExhausted::of_plan(
                r.throttle_bytes_per_second.map(|_| "throttle"),
                r.throttle_bytes_per_second,
            ),
            figures: r.figures,
            decided_by: r.decided_by,
            decided_at: r.decided_at,
            changed_at: r.changed_at,
        })
    }
}

/// Upsert decisions for `period` as of the moment of publishing (database
/// clock): for writers that did not read the inputs themselves, such as an
/// operator's manual block. Evaluations publish with [`publish_as_of`].
pub async fn publish(
    pool: &PgPool,
    period: Period,
    decisions: &[(Uuid, Decision)],
    decided_by: &str,
) -> Result<(), sqlx::Error> {
    upsert(pool, period, decisions, decided_by, None)
        .await
        .map(|_| ())
}

/// Upsert decisions for `period` that were computed from inputs read at
/// `inputs_read_at` (the database clock of that read, e.g.
/// [`UserBilling::read_at`](crate::db::usage::UserBilling::read_at)), one statement.
///
/// Proxies and the monitor publish concurrently, and an evaluation can be slow:
/// a stored decision is replaced only by one whose inputs were read later, so an
/// older evaluation that finishes last never undoes a newer one. Returns how
/// many rows were stored (inserted or replaced).
///
/// Sorted by user so concurrent writers take row locks in the same order.
/// `changed_at` moves only when the outcome flips, and only then does the
/// NOTIFY trigger fire (a row not replaced fires nothing).
pub async fn publish_as_of(
    pool: &PgPool,
    period: Period,
    decisions: &[(Uuid, Decision)],
    decided_by: &str,
    inputs_read_at: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    upsert(pool, period, decisions, decided_by, Some(inputs_read_at)).await
}

async fn upsert(
    pool: &PgPool,
    period: Period,
    decisions: &[(Uuid, Decision)],
    decided_by: &str,
    inputs_read_at: Option<DateTime<Utc>>,
) -> Result<u64, sqlx::Error> {
    if decisions.is_empty() {
        return Ok(0);
    }
    let mut sorted: Vec<&(Uuid, Decision)> = decisions.iter().collect();
    sorted.sort_unstable_by_key(|(user, _)| *user);
    sorted.dedup_by_key(|(user, _)| *user);
    let users: Vec<Uuid> = sorted.iter().map(|(u, _)| *u).collect();
    let reasons: Vec<Option<&str>> = sorted
        .iter()
        .map(|(_, d)| d.blocked.map(BlockReason::as_str))
        .collect();
    let actions: Vec<Option<&str>> = sorted
        .iter()
        .map(|(_, d)| d.action().map(OnExhausted::as_str))
        .collect();
    let rates: Vec<Option<i64>> = sorted
        .iter()
        .map(|(_, d)| {
            d.on_exhausted
                .rate()
                .map(|r| i64::try_from(r).unwrap_or(i64::MAX))
        })
        .collect();
    let figures: Vec<serde_json::Value> = sorted
        .iter()
        .map(|(_, d)| serde_json::to_value(&d.figures).expect("figures serialize"))
        .collect();
    // `decided_at` is the instant the inputs were read, on the database's clock,
    // so it is comparable across writers.
    let stored = sqlx::query(
        "INSERT INTO usage_decisions (user_id, period_start, blocked, reason, action,
                                      throttle_bytes_per_second, figures, decided_by, decided_at)
         SELECT d.user_id, $4, d.reason IS NOT NULL, d.reason, d.action, d.rate, d.figures, $5,
                COALESCE($6, statement_timestamp())
         FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $7::text[], $8::bigint[])
              AS d(user_id, reason, figures, action, rate)
         WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = d.user_id)
         ORDER BY d.user_id
         ON CONFLICT (user_id, period_start) DO UPDATE SET
             blocked    = EXCLUDED.blocked,
             reason     = EXCLUDED.reason,
             action     = EXCLUDED.action,
             throttle_bytes_per_second = EXCLUDED.throttle_bytes_per_second,
             figures    = EXCLUDED.figures,
             decided_by = EXCLUDED.decided_by,
             decided_at = EXCLUDED.decided_at,
             changed_at = CASE WHEN usage_decisions.reason IS DISTINCT FROM EXCLUDED.reason
                                    OR COALESCE(usage_decisions.action, 'block')
                                       IS DISTINCT FROM COALESCE(EXCLUDED.action, 'block')
                               THEN now() ELSE usage_decisions.changed_at END
         WHERE EXCLUDED.decided_at > usage_decisions.decided_at",
    )
    .bind(&users)
    .bind(&reasons)
    .bind(&figures)
    .bind(period.start())
    .bind(decided_by)
    .bind(inputs_read_at)
    .bind(&actions)
    .bind(&rates)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(stored)
}

/// Decisions for `period`, for `users` or all users when `None`.
pub async fn load(
    pool: &PgPool,
    period: Period,
    users: Option<&[Uuid]>,
) -> Result<Vec<PublishedDecision>, sqlx::Error> {
    let rows: Vec<DecisionRow> = sqlx::query_as(
        "SELECT user_id, period_start, reason, throttle_bytes_per_second, figures, decided_by,
                decided_at, changed_at
         FROM usage_decisions
         WHERE period_start = $1 AND ($2::uuid[] IS NULL OR user_id = ANY($2))",
    )
    .bind(period.start())
    .bind(users)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(PublishedDecision::try_from).collect()
}

/// The stored outcome of each of `users` in `period` that has a decision:
/// `(user, reason if blocked)`. Lets an evaluator publish only what changed.
pub async fn outcomes(
    pool: &PgPool,
    period: Period,
    users: &[Uuid],
) -> Result<Vec<(Uuid, Option<BlockReason>)>, sqlx::Error> {
    let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT user_id, reason FROM usage_decisions WHERE period_start = $1 AND user_id = ANY($2)",
    )
    .bind(period.start())
    .bind(users)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(user, reason)| {
            let reason = reason
                .map(|r| r.parse::<BlockReason>())
                .transpose()
                .map_err(|e| sqlx::Error::Decode(e.into()))?;
            Ok((user, reason))
        })
        .collect()
}

/// Users blocked in `period`'s decisions (the partial index on blocked rows).
pub async fn blocked_count(pool: &PgPool, period: Period) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM usage_decisions WHERE period_start = $1 AND blocked")
        .bind(period.start())
        .fetch_one(pool)
        .await
}
