//! Headroom leases (`migrations/019_bandwidth_leases.sql`): how many proxy
//! replicas share one user's bandwidth headroom without spending it more than
//! once.
//!
//! The invariant, for each user and period: usage written to
//! `vps_usage_periods` plus the live (unexpired) leases of every instance never
//! exceeds the headroom the billing module allows. It holds because
//! - a grant happens under a per-user advisory lock and gives out only what one
//!   snapshot of usage and leases leaves ([`grant`]);
//! - a flush moves the bytes it writes from the instance's lease to usage in the
//!   same transaction ([`settle`]), so no snapshot sees them twice or not at all;
//! - every other change to a lease is a release (it shrinks), or its holder's
//!   lapse (`lease_holders`: one row per proxy, renewed in one statement), after
//!   which none of its leases count.
//!
//! A proxy lets a user's bytes through only up to its lease, so what all
//! replicas let through together stays within the headroom, plus what each
//! stream moves between two checks (`docs/operations.md`, "Headroom leases").

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::billing::{self, BlockReason, Period};
use crate::db::usage::{UserBilling, UserBillingRow, USER_BILLING};

/// The advisory lock class of lease grants (the second key is the user).
const LOCK_CLASS: i32 = 0x7467_6c73; // "tgls"

/// One run of an instance's leases. A proxy starts a new epoch when it stops
/// trusting what it holds; writes against an older epoch no longer apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub instance: Uuid,
    pub epoch: i64,
}

/// What a grant found and gave.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Bytes added to the instance's lease (0 when nothing is left).
    pub granted: u64,
    /// Bytes of headroom no instance holds after this grant.
    pub unleased: u64,
    /// What the user will be blocked for once the headroom is spent; `None` if
    /// they are blocked already (then nothing is granted).
    pub reason: Option<BlockReason>,
    /// The figures the grant was computed from.
    pub billing: UserBilling,
    /// Whether the holder was live; if not, nothing was granted and the
    /// holder must start a new epoch.
    pub holder_live: bool,
}

/// Bytes let through against leases, per user, taken off the instance's
/// leases when the flush that writes them commits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub epoch: i64,
    pub period: Option<Period>,
    pub users: Vec<(Uuid, u64)>,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    #[sqlx(flatten)]
    billing: UserBillingRow,
    /// Live leases of every other holder.
    others: i64,
    /// This holder's live lease.
    own: i64,
    holder_live: bool,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Grant `holder` a slice of `user`'s headroom in `period`: `slice(unleased)`
/// bytes, at most what is unleased (headroom less every live lease, this
/// holder's included). With `fresh`, the holder's lease becomes the slice
/// instead of growing by it (the holder lost track of what it held). Nothing
/// if the holder has lapsed. `None` if the user does not exist.
pub async fn grant(
    pool: &PgPool,
    user: Uuid,
    period: Period,
    holder: Holder,
    fresh: bool,
    slice: impl FnOnce(u64) -> u64,
) -> Result<Option<Grant>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text))")
        .bind(LOCK_CLASS)
        .bind(user)
        .execute(&mut *tx)
        .await?;
    // One statement, so usage and leases come from one snapshot: a flush moving
    // bytes from a lease to usage is seen whole or not at all.
    let sql = format!(
        "WITH b AS ({USER_BILLING}),
         live AS (
             SELECT l.instance_id, l.epoch, l.bytes FROM bandwidth_leases l
             JOIN lease_holders h ON h.instance_id = l.instance_id AND h.epoch = l.epoch
             WHERE l.user_id = $1[1] AND l.period_start = $2 AND h.expires_at > now()
         )
         SELECT b.*,
                COALESCE((SELECT SUM(bytes) FROM live
                          WHERE NOT (instance_id = $3 AND epoch = $4)), 0)::BIGINT AS others,
                COALESCE((SELECT SUM(bytes) FROM live
                          WHERE instance_id = $3 AND epoch = $4), 0)::BIGINT AS own,
                EXISTS (SELECT 1 FROM lease_holders
                        WHERE instance_id = $3 AND epoch = $4 AND expires_at > now()) AS holder_live
         FROM b"
    );
    let row: Option<GrantRow> = sqlx::query_as(&sql)
        .bind([user].as_slice())
        .bind(period.start())
        .bind(holder.instance)
        .bind(holder.epoch)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (others, own, holder_live) = (
        row.others.max(0) as u64,
        row.own.max(0) as u64,
        row.holder_live,
    );
    let billing = UserBilling::from(row.billing);
    let headroom = billing::bandwidth_headroom(
        billing.limits.as_ref(),
        &billing.usage,
        billing.budget_cents,
    );
    let (room, reason) = match headroom {
        Some((bytes, reason)) => (bytes, Some(reason)),
        None => (0, None),
    };
    let own = if fresh { 0 } else { own };
    let before = room.saturating_sub(others).saturating_sub(own);
    let granted = match holder_live {
        true => slice(before).min(before),
        false => 0,
    };
    if granted > 0 || fresh {
        sqlx::query(
            "INSERT INTO bandwidth_leases (user_id, period_start, instance_id, epoch, bytes)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, period_start, instance_id) DO UPDATE SET
                 bytes = CASE WHEN bandwidth_leases.epoch = EXCLUDED.epoch AND NOT $6
                              THEN bandwidth_leases.bytes + EXCLUDED.bytes
                              ELSE EXCLUDED.bytes END,
                 epoch = EXCLUDED.epoch,
                 granted_at = now()",
        )
        .bind(user)
        .bind(period.start())
        .bind(holder.instance)
        .bind(holder.epoch)
        .bind(to_i64(granted))
        .bind(fresh)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Some(Grant {
        granted,
        unleased: before - granted,
        reason,
        billing,
        holder_live,
    }))
}

/// Take `settlement`'s bytes off `instance`'s leases, inside the flush
/// transaction that writes them to usage.
pub async fn settle(
    tx: &mut Transaction<'_, Postgres>,
    instance: Uuid,
    settlement: &Settlement,
) -> Result<(), sqlx::Error> {
    let Some(period) = settlement.period else {
        return Ok(());
    };
    if settlement.is_empty() {
        return Ok(());
    }
    release_in(
        tx,
        Holder {
            instance,
            epoch: settlement.epoch,
        },
        period,
        &settlement.users,
    )
    .await
}

async fn release_in(
    tx: &mut Transaction<'_, Postgres>,
    holder: Holder,
    period: Period,
    users: &[(Uuid, u64)],
) -> Result<(), sqlx::Error> {
    let mut users = users.to_vec();
    // Rows locked in one order by every writer.
    users.sort_unstable_by_key(|(u, _)| *u);
    let (ids, bytes): (Vec<Uuid>, Vec<i64>) = users.iter().map(|(u, b)| (*u, to_i64(*b))).unzip();
    sqlx::query(
        "UPDATE bandwidth_leases l SET bytes = GREATEST(l.bytes - r.bytes, 0)
         FROM UNNEST($1::uuid[], $2::bigint[]) AS r(user_id, bytes)
         WHERE l.user_id = r.user_id AND l.period_start = $3
           AND l.instance_id = $4 AND l.epoch = $5",
    )
    .bind(&ids)
    .bind(&bytes)
    .bind(period.start())
    .bind(holder.instance)
    .bind(holder.epoch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Give back `returned` bytes of `holder`'s leases in `period` and keep the
/// holder live for `ttl` from now (registering it, or starting its new epoch:
/// leases of an older epoch are dead from then on). With `tidy`, also clear
/// away the holder's spent and dead rows and holders that lapsed an hour ago
/// (with their leases). Returns how many holders are live (at least 1): the
/// proxies a throttled user's rate is shared out among.
pub async fn renew(
    pool: &PgPool,
    holder: Holder,
    period: Period,
    returned: &[(Uuid, u64)],
    ttl: Duration,
    tidy: bool,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !returned.is_empty() {
        release_in(&mut tx, holder, period, returned).await?;
    }
    sqlx::query(
        "INSERT INTO lease_holders (instance_id, epoch, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (instance_id) DO UPDATE SET
             epoch = EXCLUDED.epoch, expires_at = EXCLUDED.expires_at",
    )
    .bind(holder.instance)
    .bind(holder.epoch)
    .bind(ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if tidy {
        sqlx::query(
            "DELETE FROM bandwidth_leases
             WHERE instance_id = $1 AND (bytes = 0 OR epoch <> $2 OR period_start < $3)",
        )
        .bind(holder.instance)
        .bind(holder.epoch)
        .bind(period.start())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM lease_holders WHERE expires_at < now() - interval '1 hour'")
            .execute(&mut *tx)
            .await?;
    }
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM lease_holders WHERE expires_at > now()")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(live.max(1) as u64)
}

/// Drop `instance` and every lease it holds (at shutdown, after the final flush).
pub async fn release_all(pool: &PgPool, instance: Uuid) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM lease_holders WHERE instance_id = $1")
            .bind(instance)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Live leases of `user` in `period`, in bytes, all holders together.
pub async fn leased(pool: &PgPool, user: Uuid, period: Period) -> Result<u64, sqlx::Error> {
    let total: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(l.bytes), 0)::BIGINT FROM bandwidth_leases l
         JOIN lease_holders h ON h.instance_id = l.instance_id AND h.epoch = l.epoch
         WHERE l.user_id = $1 AND l.period_start = $2 AND h.expires_at > now()",
    )
    .bind(user)
    .bind(period.start())
    .fetch_one(pool)
    .await?;
    Ok(total.max(0) as u64)
}
