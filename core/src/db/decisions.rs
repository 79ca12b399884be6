//! Published enforcement decisions (`usage_decisions`): written by the monitor
//! and by proxies, read by every proxy.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::billing::{BlockReason, Decision, Period};

/// A decision as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedDecision {
    pub user_id: Uuid,
    pub period: Period,
    pub blocked: Option<BlockReason>,
    pub figures: serde_json::Value,
    pub decided_by: String,
    pub decided_at: DateTime<Utc>,
    pub changed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DecisionRow {
    user_id: Uuid,
    period_start: chrono::NaiveDate,
    reason: Option<String>,
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
            figures: r.figures,
            decided_by: r.decided_by,
            decided_at: r.decided_at,
            changed_at: r.changed_at,
        })
    }
}

/// Upsert decisions for `period`, one statement. Sorted by user so concurrent
/// writers take row locks in the same order. `changed_at` moves only when the
/// outcome flips, and only then does the NOTIFY trigger fire.
pub async fn publish(
    pool: &PgPool,
    period: Period,
    decisions: &[(Uuid, Decision)],
    decided_by: &str,
) -> Result<(), sqlx::Error> {
    if decisions.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&(Uuid, Decision)> = decisions.iter().collect();
    sorted.sort_unstable_by_key(|(user, _)| *user);
    sorted.dedup_by_key(|(user, _)| *user);
    let users: Vec<Uuid> = sorted.iter().map(|(u, _)| *u).collect();
    let reasons: Vec<Option<&str>> = sorted
        .iter()
        .map(|(_, d)| d.blocked.map(BlockReason::as_str))
        .collect();
    let figures: Vec<serde_json::Value> = sorted
        .iter()
        .map(|(_, d)| serde_json::to_value(&d.figures).expect("figures serialize"))
        .collect();
    sqlx::query(
        "INSERT INTO usage_decisions (user_id, period_start, blocked, reason, figures, decided_by)
         SELECT d.user_id, $4, d.reason IS NOT NULL, d.reason, d.figures, $5
         FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) AS d(user_id, reason, figures)
         WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = d.user_id)
         ORDER BY d.user_id
         ON CONFLICT (user_id, period_start) DO UPDATE SET
             blocked    = EXCLUDED.blocked,
             reason     = EXCLUDED.reason,
             figures    = EXCLUDED.figures,
             decided_by = EXCLUDED.decided_by,
             decided_at = now(),
             changed_at = CASE WHEN usage_decisions.reason IS DISTINCT FROM EXCLUDED.reason
                               THEN now() ELSE usage_decisions.changed_at END",
    )
    .bind(&users)
    .bind(&reasons)
    .bind(&figures)
    .bind(period.start())
    .bind(decided_by)
    .execute(pool)
    .await?;
    Ok(())
}

/// Decisions for `period`, for `users` or all users when `None`.
pub async fn load(
    pool: &PgPool,
    period: Period,
    users: Option<&[Uuid]>,
) -> Result<Vec<PublishedDecision>, sqlx::Error> {
    let rows: Vec<DecisionRow> = sqlx::query_as(
        "SELECT user_id, period_start, reason, figures, decided_by, decided_at, changed_at
         FROM usage_decisions
         WHERE period_start = $1 AND ($2::uuid[] IS NULL OR user_id = ANY($2))",
    )
    .bind(period.start())
    .bind(users)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(PublishedDecision::try_from).collect()
}
