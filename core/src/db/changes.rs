//! Change notifications: what PostgreSQL's NOTIFY triggers announce (migration
//! 017 and later), parsed once into typed events for the proxy and the monitor.
//!
//! | channel | payload | event |
//! |---|---|---|
//! | `tollgate_agent` | agent id | [`Change::Agent`]: token rotated, VPS re-assigned or changed, agent deleted |
//! | `tollgate_billing` | `user:<id>` or `plan:<id>` | [`Change::Billing`]: limits, rates or budget changed |
//! | `tollgate_decision` | `<user id>:<period start>` | [`Change::Decision`]: a decision was published |
//! | `tollgate_egress_policy` | table name | [`Change::EgressPolicy`]: a policy, rule or assignment changed |
//!
//! Usage has no notification (proxies write it every second): the monitor
//! polls for it with [`users_with_new_usage`], from a [`Watermark`].

use sqlx::PgPool;
use uuid::Uuid;

use super::{usage, AGENT_CHANNEL, BILLING_CHANNEL, DECISION_CHANNEL};
use crate::billing::Period;

/// A change someone else made that may matter to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An agent's token, VPS or VPS details changed, or the agent was deleted.
    Agent(Uuid),
    /// Limits, rates or budget changed.
    Billing(BillingChange),
    /// A decision was published for `user` in `period`.
    Decision { user: Uuid, period: Period },
    /// An egress policy, one of its rules, or which policy applies to whom.
    EgressPolicy,
}

/// Whose limits, rates or budget changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingChange {
    User(Uuid),
    /// Every user on the plan.
    Plan(Uuid),
}

impl BillingChange {
    /// The users the change affects.
    pub async fn users(self, pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
        match self {
            BillingChange::User(user) => Ok(vec![user]),
            BillingChange::Plan(plan) => usage::users_on_plan(pool, plan).await,
        }
    }
}

/// A notification that does not parse: its channel and payload, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed notification on {channel}: {payload:?}")]
pub struct Malformed {
    pub channel: String,
    pub payload: String,
}

impl Change {
    /// Every channel that carries changes.
    pub const CHANNELS: [&'static str; 4] = [
        AGENT_CHANNEL,
        BILLING_CHANNEL,
        DECISION_CHANNEL,
        super::policies::CHANNEL,
    ];

    /// Parse one notification.
    pub fn parse(channel: &str, payload: &str) -> Result<Change, Malformed> {
        let parsed = match channel {
            AGENT_CHANNEL => payload.parse().ok().map(Change::Agent),
            BILLING_CHANNEL => match payload.split_once(':') {
                Some(("user", id)) => id.parse().ok().map(BillingChange::User),
                Some(("plan", id)) => id.parse().ok().map(BillingChange::Plan),
                _ => None,
            }
            .map(Change::Billing),
            DECISION_CHANNEL => payload.split_once(':').and_then(|(user, period)| {
                Some(Change::Decision {
                    user: user.parse().ok()?,
                    period: period.parse().ok()?,
                })
            }),
            super::policies::CHANNEL => Some(Change::EgressPolicy),
            _ => None,
        };
        parsed.ok_or_else(|| Malformed {
            channel: channel.to_owned(),
            payload: payload.chars().take(200).collect(),
        })
    }
}

/// Where a poll for new usage stopped: the oldest transaction still running
/// when it read (its snapshot's `xmin`, a full 64-bit transaction id). Every
/// row written by a transaction that began at or after it is at or above it,
/// however long that transaction took to commit, so the next poll misses no
/// write that was invisible to this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Watermark(i64);

/// Users with usage rows in `period`, or VPS rows, written by transactions at
/// or after `since` (all such users, plus a few already seen when transactions
/// overlap), other than the transactions `own` (full ids: the caller's own
/// writes, whose users it knows), and the watermark to poll from next time.
/// `None` only reads the watermark. A row's last writer hides earlier ones: a
/// caller excluding its own writes checks what it overwrote itself (as the
/// monitor does with the bandwidth its usage writes return). One statement; it scans the period's usage rows and the VPSes
/// (no index: the row versions' `xmin` is what is compared), a few tens of
/// milliseconds at 100,000 VPSes.
pub async fn users_with_new_usage(
    pool: &PgPool,
    period: Period,
    since: Option<Watermark>,
    own: &[i64],
) -> Result<(Vec<Uuid>, Watermark), sqlx::Error> {
    let own: Vec<i64> = own.iter().map(|x| x.rem_euclid(1 << 32)).collect();
    // Transaction ids in rows are 32 bits: compare modulo 2^32, as PostgreSQL
    // does. A row version frozen long ago can look new after 2^31 transactions;
    // that costs one extra decision, never a missed one.
    let rows: Vec<(Option<Uuid>, i64)> = sqlx::query_as(
        "WITH mark AS (
             SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS now,
                    ($2::bigint % 4294967296) AS since
         ), changed AS (
             SELECT v.user_id FROM vps_usage_periods p JOIN vpses v ON v.id = p.vps_id, mark
             WHERE $2 IS NOT NULL AND p.period_start = $1
               AND (p.xmin::text::bigint - mark.since + 4294967296) % 4294967296 < 2147483648
               AND p.xmin::text::bigint <> ALL($3)
             UNION
             SELECT v.user_id FROM vpses v, mark
             WHERE $2 IS NOT NULL
               AND (v.xmin::text::bigint - mark.since + 4294967296) % 4294967296 < 2147483648
               AND v.xmin::text::bigint <> ALL($3)
         )
         SELECT changed.user_id, mark.now FROM mark LEFT JOIN changed ON true",
    )
    .bind(period.start())
    .bind(since.map(|w| w.0))
    .bind(&own)
    .fetch_all(pool)
    .await?;
    let mark = Watermark(rows.first().map_or(0, |r| r.1));
    Ok((rows.into_iter().filter_map(|r| r.0).collect(), mark))
}

/// Users with ids in `from..to` (`to` `None`: to the end) that need a
/// decision in `period` (as [`usage::active_users`]: usage in it, a running
/// VPS, or a decision already published for it): one share of the monitor's
/// slow sweep, read by the users' primary key range.
pub async fn active_users_between(
    pool: &PgPool,
    period: Period,
    from: Uuid,
    to: Option<Uuid>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT u.id FROM users u
         WHERE u.id >= $2 AND ($3::uuid IS NULL OR u.id < $3)
           AND (EXISTS (SELECT 1 FROM vpses v WHERE v.user_id = u.id AND v.state = 'running')
                OR EXISTS (SELECT 1 FROM vpses v JOIN vps_usage_periods p ON p.vps_id = v.id
                           WHERE v.user_id = u.id AND p.period_start = $1)
                OR EXISTS (SELECT 1 FROM usage_decisions d
                           WHERE d.user_id = u.id AND d.period_start = $1))",
    )
    .bind(period.start())
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_parses_into_its_event() {
        let id = Uuid::new_v4();
        assert_eq!(
            Change::parse(AGENT_CHANNEL, &id.to_string()),
            Ok(Change::Agent(id))
        );
        assert_eq!(
            Change::parse(BILLING_CHANNEL, &format!("user:{id}")),
            Ok(Change::Billing(BillingChange::User(id)))
        );
        assert_eq!(
            Change::parse(BILLING_CHANNEL, &format!("plan:{id}")),
            Ok(Change::Billing(BillingChange::Plan(id)))
        );
        let period: Period = "2026-12-01".parse().unwrap();
        assert_eq!(
            Change::parse(DECISION_CHANNEL, &format!("{id}:2026-12-01")),
            Ok(Change::Decision { user: id, period })
        );
    }

    #[test]
    fn malformed_payloads_are_refused_not_guessed() {
        for (channel, payload) in [
            (AGENT_CHANNEL, "not-a-uuid"),
            (BILLING_CHANNEL, "team:00000000-0000-0000-0000-000000000000"),
            (BILLING_CHANNEL, "user:nope"),
            (DECISION_CHANNEL, "00000000-0000-0000-0000-000000000000"),
            (
                DECISION_CHANNEL,
                "00000000-0000-0000-0000-000000000000:yesterday",
            ),
            ("other_channel", "x"),
        ] {
            assert!(
                Change::parse(channel, payload).is_err(),
                "{channel} {payload}"
            );
        }
    }
}
