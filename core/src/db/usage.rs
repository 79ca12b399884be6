//! Usage: per-period aggregates for billing, and the exactly-once flush of the
//! proxy's byte counters.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::billing::{self, OnExhausted, Period, PlanLimits, Usage};

/// What a decision about one user is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserBilling {
    pub user_id: Uuid,
    pub email: String,
    pub plan_name: Option<String>,
    pub limits: Option<PlanLimits>,
    pub usage: Usage,
    pub budget_cents: i64,
    /// What the plan does once the user is exhausted.
    pub on_exhausted: OnExhausted,
    /// When these figures were read (database clock): what a decision made from
    /// them is published as of ([`decisions::publish_as_of`](crate::db::decisions::publish_as_of)).
    pub read_at: DateTime<Utc>,
}

impl UserBilling {
    pub fn decide(&self) -> billing::Decision {
        billing::decide(self.limits.as_ref(), &self.usage, self.budget_cents)
            .with(self.on_exhausted)
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct UserBillingRow {
    user_id: Uuid,
    email: String,
    plan_name: Option<String>,
    max_bandwidth_bytes: Option<i64>,
    max_cpu_ms: Option<i64>,
    max_memory_mb_seconds: Option<i64>,
    max_storage_bytes: Option<i64>,
    bandwidth_rate: Option<i64>,
    cpu_rate: Option<i64>,
    memory_rate: Option<i64>,
    on_exhausted: Option<String>,
    throttle_bytes_per_second: Option<i64>,
    budget_cents: i64,
    bandwidth_bytes: i64,
    cpu_ms: i64,
    memory_mb_seconds: i64,
    max_vps_storage_bytes: i64,
    read_at: DateTime<Utc>,
}

impl From<UserBillingRow> for UserBilling {
    fn from(r: UserBillingRow) -> Self {
        let limits = r.plan_name.as_ref().map(|_| PlanLimits {
            max_bandwidth_bytes: r.max_bandwidth_bytes.unwrap_or_default(),
            max_cpu_ms: r.max_cpu_ms.unwrap_or_default(),
            max_memory_mb_seconds: r.max_memory_mb_seconds.unwrap_or_default(),
            max_storage_bytes: r.max_storage_bytes.unwrap_or_default(),
            bandwidth_cents_per_gib: r.bandwidth_rate.unwrap_or_default(),
            cpu_cents_per_hour: r.cpu_rate.unwrap_or_default(),
            memory_cents_per_gib_hour: r.memory_rate.unwrap_or_default(),
        });
        UserBilling {
            user_id: r.user_id,
            email: r.email,
            plan_name: r.plan_name,
            limits,
            usage: Usage {
                bandwidth_bytes: r.bandwidth_bytes,
                cpu_ms: r.cpu_ms,
                memory_mb_seconds: r.memory_mb_seconds,
                max_vps_storage_bytes: r.max_vps_storage_bytes,
            },
            budget_cents: r.budget_cents,
            on_exhausted: OnExhausted::of_plan(
                r.on_exhausted.as_deref(),
                r.throttle_bytes_per_second,
            ),
            read_at: r.read_at,
        }
    }
}

/// Plan, budget and usage per user in `$2` (a period start) for the users in
/// `$1`: the one statement every decision is made from. Leases read it inside
/// their own statement so figures and leases come from one snapshot.
pub(crate) const USER_BILLING: &str = "SELECT u.id AS user_id, u.email, pl.name AS plan_name,
                pl.max_bandwidth_bytes, pl.max_cpu_ms, pl.max_memory_mb_seconds, pl.max_storage_bytes,
                pl.overage_bandwidth_cost_per_gb_cents AS bandwidth_rate,
                pl.overage_cpu_cost_per_hour_cents AS cpu_rate,
                pl.overage_memory_cost_per_gb_hour_cents AS memory_rate,
                pl.on_exhausted, pl.throttle_bytes_per_second,
                COALESCE(b.budget_cents, 0) AS budget_cents,
                COALESCE(us.bandwidth_bytes, 0) AS bandwidth_bytes,
                COALESCE(us.cpu_ms, 0) AS cpu_ms,
                COALESCE(us.memory_mb_seconds, 0) AS memory_mb_seconds,
                COALESCE(st.max_vps_storage_bytes, 0) AS max_vps_storage_bytes,
                statement_timestamp() AS read_at
         FROM users u
         LEFT JOIN plans pl ON pl.id = u.plan_id
         LEFT JOIN overage_budgets b ON b.user_id = u.id AND b.period_start = $2
         LEFT JOIN LATERAL (
             SELECT SUM(p.bandwidth_bytes)::BIGINT AS bandwidth_bytes,
                    SUM(p.cpu_used_ms)::BIGINT AS cpu_ms,
                    SUM(p.memory_used_mb_seconds)::BIGINT AS memory_mb_seconds
             FROM vpses v
             JOIN vps_usage_periods p ON p.vps_id = v.id AND p.period_start = $2
             WHERE v.user_id = u.id
         ) us ON true
         LEFT JOIN LATERAL (
             SELECT MAX(v.storage_used_bytes)::BIGINT AS max_vps_storage_bytes
             FROM vpses v
             WHERE v.user_id = u.id AND v.state <> 'destroyed'
         ) st ON true
         WHERE u.id = ANY($1)";

/// Plan, budget and usage in `period` for each of `user_ids` that exists, in one
/// statement. Usage sums every VPS of the user, destroyed ones included; storage
/// is the largest gauge among VPSes not destroyed. Sums are cast back to BIGINT.
/// Every row carries the instant of this read (`read_at`).
pub async fn user_billing(
    pool: &PgPool,
    user_ids: &[Uuid],
    period: Period,
) -> Result<Vec<UserBilling>, sqlx::Error> {
    let rows: Vec<UserBillingRow> = sqlx::query_as(&format!("{USER_BILLING} ORDER BY u.email"))
        .bind(user_ids)
        .bind(period.start())
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(UserBilling::from).collect())
}

/// Users that need a decision in `period`: those with usage in it, a running VPS,
/// or a decision already published for it.
pub async fn active_users(pool: &PgPool, period: Period) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT v.user_id FROM vps_usage_periods p JOIN vpses v ON v.id = p.vps_id
         WHERE p.period_start = $1
         UNION
         SELECT user_id FROM vpses WHERE state = 'running'
         UNION
         SELECT user_id FROM usage_decisions WHERE period_start = $1",
    )
    .bind(period.start())
    .fetch_all(pool)
    .await
}

/// All users (for reports).
pub async fn all_users(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM users")
        .fetch_all(pool)
        .await
}

/// Users on `plan_id`.
pub async fn users_on_plan(pool: &PgPool, plan_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM users WHERE plan_id = $1")
        .bind(plan_id)
        .fetch_all(pool)
        .await
}

/// Bytes one VPS moved, as seen from the VPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthDelta {
    pub vps_id: Uuid,
    /// Bytes the VPS received.
    pub rx: u64,
    /// Bytes the VPS sent.
    pub tx: u64,
}

/// One flush of a proxy's counters: its identity in the ledger and the bytes per
/// VPS per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushBatch {
    /// The proxy process that produced the batch (random per start).
    pub instance_id: Uuid,
    /// Increasing per instance; `(instance_id, seq)` is the ledger key.
    pub seq: i64,
    pub periods: Vec<PeriodDeltas>,
    /// Bytes of this batch that were let through against the instance's
    /// headroom leases: taken off those leases in the same transaction. Not
    /// kept in spill files: a lease left too large only holds headroom back
    /// until it lapses.
    #[serde(skip)]
    pub leases: Option<crate::db::leases::Settlement>,
    /// Egress bytes per VPS per destination host, added to
    /// `vps_destination_usage` in the same transaction. Absent from spill files
    /// written before destinations were counted.
    #[serde(default)]
    pub destinations: DestinationDeltas,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodDeltas {
    pub period: Period,
    pub deltas: Vec<BandwidthDelta>,
}

/// Bytes one VPS exchanged with one destination host, as seen from the VPS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationDelta {
    pub vps_id: Uuid,
    /// The host as the requests named it (names lowercase, IP literals
    /// canonical, IPv6 in brackets), or [`OTHER_HOST`].
    pub host: String,
    /// Bytes the VPS received from it.
    pub rx: u64,
    /// Bytes the VPS sent to it.
    pub tx: u64,
}

/// The destination rows of one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodDestinations {
    pub period: Period,
    pub rows: Vec<DestinationDelta>,
}

/// The destination rows of a flush batch, and how many hosts each VPS keeps
/// apart per period: after adding the rows, the smallest hosts beyond `top_n`
/// are folded into [`OTHER_HOST`] (0: no folding).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationDeltas {
    pub top_n: u32,
    pub periods: Vec<PeriodDestinations>,
}

impl DestinationDeltas {
    pub fn is_empty(&self) -> bool {
        self.periods.iter().all(|p| p.rows.is_empty())
    }
}

/// The row of `vps_destination_usage` that holds the bytes of every host
/// beyond a VPS's top N, and of requests that named no host.
pub const OTHER_HOST: &str = "other";

impl FlushBatch {
    pub fn total_rx(&self) -> u64 {
        self.periods
            .iter()
            .flat_map(|p| &p.deltas)
            .map(|d| d.rx)
            .sum()
    }

    pub fn total_tx(&self) -> u64 {
        self.periods
            .iter()
            .flat_map(|p| &p.deltas)
            .map(|d| d.tx)
            .sum()
    }

    pub fn vps_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.periods
            .iter()
            .flat_map(|p| &p.deltas)
            .map(|d| d.vps_id)
    }

    pub fn is_empty(&self) -> bool {
        self.periods.iter().all(|p| p.deltas.is_empty()) && self.destinations.is_empty()
    }
}

/// What happened to a flush batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Written now. `dropped` lists VPSes that no longer exist; their bytes are discarded.
    Applied { rows: usize, dropped: Vec<Uuid> },
    /// The ledger already holds this batch: it was written before (a retry after a
    /// lost commit acknowledgement, or a spill replayed twice). Nothing was written.
    AlreadyApplied,
}

/// A row of a flush batch the database refused for what it holds (a constraint,
/// a trigger, an out-of-range sum), left out so the rest of the batch commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedDelta {
    pub period: Period,
    pub delta: BandwidthDelta,
    /// SQLSTATE of the refusal, e.g. `23514` for a CHECK constraint.
    pub code: Option<String>,
    /// The database's message (names the constraint; holds no credentials).
    pub message: String,
}

/// Write `batch` exactly once: see [`apply_flush_detailed`]. Rows the database
/// refuses are left out and not reported here.
pub async fn apply_flush(pool: &PgPool, batch: &FlushBatch) -> Result<FlushOutcome, sqlx::Error> {
    apply_flush_detailed(pool, batch)
        .await
        .map(|(outcome, _)| outcome)
}

/// Write `batch` exactly once: the ledger row and every upsert commit together or
/// not at all, and a batch already in the ledger is skipped. One statement per
/// period. Rows are sorted by VPS id so concurrent proxies lock in the same order.
///
/// One bad row never wedges the batch: if the database refuses a statement for
/// what a row holds (SQLSTATE classes 21, 22, 23, 44 and P0: data, constraint
/// and trigger errors), the batch is written again with each period's statement
/// under a savepoint, halving the failing part until the refused rows stand
/// alone. They are returned and the rest commits, still with the one ledger row.
/// Any other error (connectivity, locks, permissions, a full disk) fails the
/// whole batch so the caller retries it later.
pub async fn apply_flush_detailed(
    pool: &PgPool,
    batch: &FlushBatch,
) -> Result<(FlushOutcome, Vec<RejectedDelta>), sqlx::Error> {
    match write_batch(pool, batch, false).await {
        Err(e) if is_row_error(&e) => write_batch(pool, batch, true).await,
        other => other,
    }
}

/// Whether `e` is the database refusing the data it was given, which a row on
/// its own can cause, rather than a failure of the connection or the server.
pub fn is_row_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["21", "22", "23", "44", "P0"]
                .iter()
                .any(|c| code.starts_with(c))
        }),
        _ => false,
    }
}

async fn write_batch(
    pool: &PgPool,
    batch: &FlushBatch,
    isolate: bool,
) -> Result<(FlushOutcome, Vec<RejectedDelta>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let vps_count = batch.periods.iter().map(|p| p.deltas.len()).sum::<usize>();
    let inserted = sqlx::query(
        "INSERT INTO flush_ledger (instance_id, seq, vps_count, rx_bytes, tx_bytes)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (instance_id, seq) DO NOTHING",
    )
    .bind(batch.instance_id)
    .bind(batch.seq)
    .bind(i32::try_from(vps_count).unwrap_or(i32::MAX))
    .bind(to_i64(batch.total_rx()))
    .bind(to_i64(batch.total_tx()))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok((FlushOutcome::AlreadyApplied, Vec::new()));
    }

    let mut rows = 0;
    let mut dropped = Vec::new();
    let mut rejected = Vec::new();
    for part in &batch.periods {
        let mut deltas = part.deltas.clone();
        deltas.sort_unstable_by_key(|d| d.vps_id);
        if isolate {
            // Ranges still to write, lowest VPS ids on top so locks stay in order.
            let mut todo = vec![(0, deltas.len())];
            while let Some((lo, hi)) = todo.pop() {
                sqlx::query("SAVEPOINT flush_part")
                    .execute(&mut *tx)
                    .await?;
                match upsert_deltas(&mut tx, part.period, &deltas[lo..hi]).await {
                    Ok(gone) => {
                        sqlx::query("RELEASE SAVEPOINT flush_part")
                            .execute(&mut *tx)
                            .await?;
                        rows += hi - lo - gone.len();
                        dropped.extend(gone);
                    }
                    Err(e) if is_row_error(&e) => {
                        sqlx::query("ROLLBACK TO SAVEPOINT flush_part")
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("RELEASE SAVEPOINT flush_part")
                            .execute(&mut *tx)
                            .await?;
                        if hi - lo == 1 {
                            let db = e.as_database_error();
                            rejected.push(RejectedDelta {
                                period: part.period,
                                delta: deltas[lo],
                                code: db.and_then(|d| d.code()).map(|c| c.into_owned()),
                                message: db
                                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                            });
                        } else {
                            let mid = lo + (hi - lo) / 2;
                            todo.push((mid, hi));
                            todo.push((lo, mid));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            let gone = upsert_deltas(&mut tx, part.period, &deltas).await?;
            rows += deltas.len() - gone.len();
            dropped.extend(gone);
        }
    }
    // Destination rows of VPSes whose counts were left out are left out too:
    // the hosts of a VPS add up to its egress bytes.
    let left_out: HashSet<(Period, Uuid)> = rejected
        .iter()
        .map(|r| (r.period, r.delta.vps_id))
        .collect();
    let gone: HashSet<Uuid> = dropped.iter().copied().collect();
    for part in &batch.destinations.periods {
        let rows: Vec<&DestinationDelta> = part
            .rows
            .iter()
            .filter(|d| !gone.contains(&d.vps_id) && !left_out.contains(&(part.period, d.vps_id)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let top_n = batch.destinations.top_n;
        if !isolate {
            add_destinations(&mut tx, part.period, &rows, top_n).await?;
            continue;
        }
        // Nothing in these rows can be refused for what it holds (sums
        // saturate, hosts are parsed); if the database still does, the
        // period's destination rows are left out rather than wedging the batch.
        sqlx::query("SAVEPOINT flush_destinations")
            .execute(&mut *tx)
            .await?;
        match add_destinations(&mut tx, part.period, &rows, top_n).await {
            Ok(()) => {}
            Err(e) if is_row_error(&e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT flush_destinations")
                    .execute(&mut *tx)
                    .await?;
                tracing::warn!(
                    seq = batch.seq, period = %part.period, rows = rows.len(), error = %e,
                    "the database refused a batch's bytes per destination; they were discarded"
                );
            }
            Err(e) => return Err(e),
        }
        sqlx::query("RELEASE SAVEPOINT flush_destinations")
            .execute(&mut *tx)
            .await?;
    }
    if let Some(settlement) = &batch.leases {
        crate::db::leases::settle(&mut tx, batch.instance_id, settlement).await?;
    }
    if !dropped.is_empty() || !rejected.is_empty() {
        // The ledger keeps how many rows of the batch were left out, for whatever reason.
        sqlx::query(
            "UPDATE flush_ledger SET dropped_vps_count = $3 WHERE instance_id = $1 AND seq = $2",
        )
        .bind(batch.instance_id)
        .bind(batch.seq)
        .bind(i32::try_from(dropped.len() + rejected.len()).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((FlushOutcome::Applied { rows, dropped }, rejected))
}

/// Add `deltas` (sorted by VPS id, at most one per VPS) to their VPSes' rows
/// for `period`, in VPS id order; VPSes that no longer exist are skipped.
/// Returns the ids of the skipped VPSes.
///
/// The usual batch is written by one statement that neither looks each VPS up
/// nor returns the ids it wrote: the foreign key already refuses a row of a VPS
/// that is gone, and without such a row every delta is written. Only when the
/// foreign key refuses one (a VPS deleted while its bytes were pending) is the
/// statement undone, back to a savepoint, and the batch written again by one
/// that skips the missing VPSes and names the VPSes it wrote.
async fn upsert_deltas(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    period: Period,
    deltas: &[BandwidthDelta],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = deltas.iter().map(|d| d.vps_id).collect();
    let rx: Vec<i64> = deltas.iter().map(|d| to_i64(d.rx)).collect();
    let tx_bytes: Vec<i64> = deltas.iter().map(|d| to_i64(d.tx)).collect();
    sqlx::query("SAVEPOINT flush_rows")
        .execute(&mut **tx)
        .await?;
    let every = sqlx::query(&format!(
        "INSERT INTO vps_usage_periods ({USAGE_COLUMNS})
         SELECT d.vps_id, $4, d.rx + d.tx, d.rx, d.tx
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS d(vps_id, rx, tx)
         ORDER BY d.vps_id
         {ADD_TO_USAGE}"
    ))
    .bind(&ids)
    .bind(&rx)
    .bind(&tx_bytes)
    .bind(period.start())
    .execute(&mut **tx)
    .await;
    match every {
        Ok(_) => {
            sqlx::query("RELEASE SAVEPOINT flush_rows")
                .execute(&mut **tx)
                .await?;
            return Ok(Vec::new());
        }
        Err(e) if is_missing_vps(&e) => {
            for step in [
                "ROLLBACK TO SAVEPOINT flush_rows",
                "RELEASE SAVEPOINT flush_rows",
            ] {
                sqlx::query(step).execute(&mut **tx).await?;
            }
        }
        // The caller undoes the statement (the whole transaction, or its own
        // savepoint around this call, which holds this one).
        Err(e) => return Err(e),
    }
    let written: Vec<Uuid> = sqlx::query_scalar(&format!(
        "INSERT INTO vps_usage_periods ({USAGE_COLUMNS})
         SELECT d.vps_id, $4, d.rx + d.tx, d.rx, d.tx
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS d(vps_id, rx, tx)
         WHERE EXISTS (SELECT 1 FROM vpses v WHERE v.id = d.vps_id)
         ORDER BY d.vps_id
         {ADD_TO_USAGE}
         RETURNING vps_id"
    ))
    .bind(&ids)
    .bind(&rx)
    .bind(&tx_bytes)
    .bind(period.start())
    .fetch_all(&mut **tx)
    .await?;
    let written: HashSet<Uuid> = written.into_iter().collect();
    Ok(ids.into_iter().filter(|id| !written.contains(id)).collect())
}

/// Add destination `rows` (at most one per VPS and host) to their VPSes' rows
/// for `period`, in (VPS, host) order; rows of VPSes that no longer exist are
/// skipped. Then, for each VPS that gained a host row, fold its smallest hosts
/// beyond `top_n` into [`OTHER_HOST`], keeping the sum.
///
/// Like [`upsert_deltas`], the usual batch is one statement without a lookup
/// per VPS; only if the foreign key refuses a row is it undone and written
/// again skipping the missing VPSes.
async fn add_destinations(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    period: Period,
    rows: &[&DestinationDelta],
    top_n: u32,
) -> Result<(), sqlx::Error> {
    let mut rows = rows.to_vec();
    rows.sort_unstable_by(|a, b| (a.vps_id, &a.host).cmp(&(b.vps_id, &b.host)));
    let ids: Vec<Uuid> = rows.iter().map(|d| d.vps_id).collect();
    let hosts: Vec<&str> = rows.iter().map(|d| d.host.as_str()).collect();
    let rx: Vec<i64> = rows.iter().map(|d| to_i64(d.rx)).collect();
    let tx_bytes: Vec<i64> = rows.iter().map(|d| to_i64(d.tx)).collect();
    let statement = |filter: &str| {
        format!(
            "WITH added AS (
                 INSERT INTO vps_destination_usage (vps_id, period_start, host, rx_bytes, tx_bytes)
                 SELECT d.vps_id, $5, d.host, d.rx, d.tx
                 FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[]) AS d(vps_id, host, rx, tx)
                 {filter}
                 ORDER BY d.vps_id, d.host
                 {ADD_TO_DESTINATION}
                 RETURNING vps_id, host, xmax = 0 AS inserted
             )
             SELECT DISTINCT vps_id FROM added WHERE inserted AND host <> '{OTHER_HOST}'"
        )
    };
    sqlx::query("SAVEPOINT flush_destination_rows")
        .execute(&mut **tx)
        .await?;
    let plain = sqlx::query_scalar(&statement(""))
        .bind(&ids)
        .bind(&hosts)
        .bind(&rx)
        .bind(&tx_bytes)
        .bind(period.start())
        .fetch_all(&mut **tx)
        .await;
    let grown: Vec<Uuid> = match plain {
        Ok(grown) => grown,
        Err(e) if is_missing_vps_of(&e, "vps_destination_usage_vps_id_fkey") => {
            sqlx::query("ROLLBACK TO SAVEPOINT flush_destination_rows")
                .execute(&mut **tx)
                .await?;
            sqlx::query_scalar(&statement(
                "WHERE EXISTS (SELECT 1 FROM vpses v WHERE v.id = d.vps_id)",
            ))
            .bind(&ids)
            .bind(&hosts)
            .bind(&rx)
            .bind(&tx_bytes)
            .bind(period.start())
            .fetch_all(&mut **tx)
            .await?
        }
        Err(e) => return Err(e),
    };
    sqlx::query("RELEASE SAVEPOINT flush_destination_rows")
        .execute(&mut **tx)
        .await?;
    if top_n > 0 && !grown.is_empty() {
        fold_destinations(tx, period, &grown, top_n).await?;
    }
    Ok(())
}

/// For each of `vps_ids`, fold its hosts in `period` beyond the `top_n` largest
/// (by bytes both ways; ties by name) into its [`OTHER_HOST`] row: at most
/// `top_n + 1` rows remain, and their sum is unchanged.
async fn fold_destinations(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    period: Period,
    vps_ids: &[Uuid],
    top_n: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "WITH ranked AS (
             SELECT vps_id, host,
                    row_number() OVER (PARTITION BY vps_id
                                       ORDER BY rx_bytes::numeric + tx_bytes DESC, host) AS place
             FROM vps_destination_usage
             WHERE vps_id = ANY($1) AND period_start = $2 AND host <> '{OTHER_HOST}'
         ), folded AS (
             DELETE FROM vps_destination_usage u
             USING ranked r
             WHERE r.place > $3 AND u.vps_id = r.vps_id AND u.period_start = $2 AND u.host = r.host
             RETURNING u.vps_id, u.rx_bytes, u.tx_bytes
         )
         INSERT INTO vps_destination_usage (vps_id, period_start, host, rx_bytes, tx_bytes)
         SELECT vps_id, $2, '{OTHER_HOST}',
                LEAST(SUM(rx_bytes), 9223372036854775807)::bigint,
                LEAST(SUM(tx_bytes), 9223372036854775807)::bigint
         FROM folded
         GROUP BY vps_id
         ORDER BY vps_id
         {ADD_TO_DESTINATION}"
    ))
    .bind(vps_ids)
    .bind(period.start())
    .bind(i64::from(top_n))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How destination bytes meet the row already there: they add up, saturating
/// (a sum past `BIGINT` is not a reason to refuse a batch).
const ADD_TO_DESTINATION: &str = "ON CONFLICT (vps_id, period_start, host) DO UPDATE SET
             rx_bytes = LEAST(vps_destination_usage.rx_bytes::numeric + EXCLUDED.rx_bytes, 9223372036854775807)::bigint,
             tx_bytes = LEAST(vps_destination_usage.tx_bytes::numeric + EXCLUDED.tx_bytes, 9223372036854775807)::bigint";

/// The columns a flush writes in `vps_usage_periods`.
const USAGE_COLUMNS: &str =
    "vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes, bandwidth_tx_bytes";

/// How a flushed row meets the period's row already there: the counts add up.
const ADD_TO_USAGE: &str = "ON CONFLICT (vps_id, period_start) DO UPDATE SET
             bandwidth_bytes    = vps_usage_periods.bandwidth_bytes + EXCLUDED.bandwidth_bytes,
             bandwidth_rx_bytes = vps_usage_periods.bandwidth_rx_bytes + EXCLUDED.bandwidth_rx_bytes,
             bandwidth_tx_bytes = vps_usage_periods.bandwidth_tx_bytes + EXCLUDED.bandwidth_tx_bytes";

/// Whether `e` is the foreign key of `vps_usage_periods` refusing a row: its
/// VPS no longer exists.
fn is_missing_vps(e: &sqlx::Error) -> bool {
    is_missing_vps_of(e, "vps_usage_periods_vps_id_fkey")
}

/// Whether `e` is the foreign key `constraint` to `vpses` refusing a row.
fn is_missing_vps_of(e: &sqlx::Error, constraint: &str) -> bool {
    e.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some("23503") && db.constraint() == Some(constraint)
    })
}

/// Delete ledger rows older than `keep_days`; returns how many went.
pub async fn prune_flush_ledger(pool: &PgPool, keep_days: i32) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query(
            "DELETE FROM flush_ledger WHERE applied_at < now() - make_interval(days => $1)",
        )
        .bind(keep_days)
        .execute(pool)
        .await?
        .rows_affected(),
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One VPS's counters in one period, as `vps_usage_periods` holds them (zeros
/// when the VPS has no row for the period), with the VPS's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VpsUsage {
    pub vps_id: Uuid,
    pub user_id: Uuid,
    pub provider: String,
    /// `provisioning`, `running`, `stopped` or `destroyed`.
    pub state: String,
    pub period: Period,
    /// Bytes both ways: what plans limit (`bandwidth_rx_bytes + bandwidth_tx_bytes`
    /// for every byte Tollgate counted).
    pub bandwidth_bytes: i64,
    /// Bytes the VPS received.
    pub bandwidth_rx_bytes: i64,
    /// Bytes the VPS sent.
    pub bandwidth_tx_bytes: i64,
    pub cpu_used_ms: i64,
    pub memory_used_mb_seconds: i64,
}

#[derive(sqlx::FromRow)]
struct VpsUsageRow {
    vps_id: Uuid,
    user_id: Uuid,
    provider: String,
    state: String,
    bandwidth_bytes: i64,
    bandwidth_rx_bytes: i64,
    bandwidth_tx_bytes: i64,
    cpu_used_ms: i64,
    memory_used_mb_seconds: i64,
}

/// `vps_id`'s counters in `period`; `None` when there is no such VPS.
pub async fn vps_usage(
    pool: &PgPool,
    vps_id: Uuid,
    period: Period,
) -> Result<Option<VpsUsage>, sqlx::Error> {
    let row: Option<VpsUsageRow> = sqlx::query_as(
        "SELECT v.id AS vps_id, v.user_id, v.provider, v.state::text AS state,
                COALESCE(p.bandwidth_bytes, 0) AS bandwidth_bytes,
                COALESCE(p.bandwidth_rx_bytes, 0) AS bandwidth_rx_bytes,
                COALESCE(p.bandwidth_tx_bytes, 0) AS bandwidth_tx_bytes,
                COALESCE(p.cpu_used_ms, 0) AS cpu_used_ms,
                COALESCE(p.memory_used_mb_seconds, 0) AS memory_used_mb_seconds
         FROM vpses v
         LEFT JOIN vps_usage_periods p ON p.vps_id = v.id AND p.period_start = $2
         WHERE v.id = $1",
    )
    .bind(vps_id)
    .bind(period.start())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| VpsUsage {
        vps_id: r.vps_id,
        user_id: r.user_id,
        provider: r.provider,
        state: r.state,
        period,
        bandwidth_bytes: r.bandwidth_bytes,
        bandwidth_rx_bytes: r.bandwidth_rx_bytes,
        bandwidth_tx_bytes: r.bandwidth_tx_bytes,
        cpu_used_ms: r.cpu_used_ms,
        memory_used_mb_seconds: r.memory_used_mb_seconds,
    }))
}

/// Up to `limit` user ids in email order, after the user whose email is
/// `after` (from the start when `None`), only among `only` when given: one
/// page of a report that never holds every user at once.
pub async fn user_page(
    pool: &PgPool,
    after: Option<&str>,
    only: Option<&[Uuid]>,
    limit: i64,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, email FROM users
         WHERE ($1::text IS NULL OR email > $1) AND ($2::uuid[] IS NULL OR id = ANY($2))
         ORDER BY email
         LIMIT $3",
    )
    .bind(after)
    .bind(only)
    .bind(limit)
    .fetch_all(pool)
    .await
}
