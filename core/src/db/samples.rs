//! The monitor's side of the database: which VPSes to sample, the last sample of
//! each, and writing a cycle's results.
//!
//! A sample's usage increments and the new sample state commit in one
//! transaction, so a restarted monitor neither loses nor repeats an interval.
//! The state update is conditional on the previous sample time the increment was
//! computed from: if another monitor (a split brain after a lost lock) wrote in
//! between, this write is skipped rather than counted twice.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::billing::Period;

/// A running VPS the monitor may sample.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SampleTarget {
    pub vps_id: Uuid,
    pub user_id: Uuid,
    pub provider: String,
    /// The provider's VM id (`provider_vm_id`).
    pub vm_id: Option<String>,
    pub address: Option<String>,
    /// CPU allocation of the VPS's size preset, in thousandths of a core.
    pub cpu_millicores: i32,
}

/// Running VPSes, with what source templates need.
pub async fn running_targets(pool: &PgPool) -> Result<Vec<SampleTarget>, sqlx::Error> {
    sqlx::query_as(
        "SELECT v.id AS vps_id, v.user_id, v.provider, v.provider_vm_id AS vm_id, v.address,
                c.cpu_millicores
         FROM vpses v JOIN vps_configs c ON c.id = v.vps_config_id
         WHERE v.state = 'running'
         ORDER BY v.id",
    )
    .fetch_all(pool)
    .await
}

/// The last sample of a VPS.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SampleState {
    pub vps_id: Uuid,
    pub source: String,
    pub sampled_at: DateTime<Utc>,
    /// Last cumulative CPU counter, microseconds.
    pub cpu_total_us: Option<i64>,
    /// CPU microseconds below a whole millisecond, not yet credited.
    pub cpu_residue_us: i64,
    /// Last memory reading, bytes.
    pub memory_bytes: Option<i64>,
    /// Byte-milliseconds below a whole MB-second, not yet credited.
    pub memory_residue: i64,
}

/// Sample states of `vps_ids` (absent for VPSes never sampled).
pub async fn states(pool: &PgPool, vps_ids: &[Uuid]) -> Result<Vec<SampleState>, sqlx::Error> {
    sqlx::query_as(
        "SELECT vps_id, source, sampled_at, cpu_total_us, cpu_residue_us, memory_bytes, memory_residue
         FROM vps_sample_state WHERE vps_id = ANY($1)",
    )
    .bind(vps_ids)
    .fetch_all(pool)
    .await
}

/// Usage a sample adds to one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Increment {
    pub period: Period,
    pub cpu_ms: i64,
    pub memory_mb_seconds: i64,
}

/// One sample's result, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleWrite {
    /// The state after this sample.
    pub state: SampleState,
    /// `sampled_at` of the state the increments were computed from (`None` for a
    /// first sample).
    pub previous_sampled_at: Option<DateTime<Utc>>,
    pub increments: Vec<Increment>,
    /// The storage gauge, when the source reports it.
    pub storage_bytes: Option<i64>,
}

/// What [`apply`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// VPSes whose samples were written.
    pub written: Vec<Uuid>,
    /// Each usage row written, with its bandwidth after the write (which only
    /// proxies change): `(vps, period, bandwidth_bytes)`.
    pub bandwidth: Vec<(Uuid, Period, i64)>,
    /// The transaction's id (full 64 bits), to tell its rows from others'
    /// ([`changes::users_with_new_usage`](crate::db::changes::users_with_new_usage)).
    pub xid: Option<i64>,
}

/// Write a cycle's samples in one transaction; returns the VPS ids written.
/// Samples whose previous state changed meanwhile are skipped (not counted).
pub async fn apply(pool: &PgPool, writes: &[SampleWrite]) -> Result<Vec<Uuid>, sqlx::Error> {
    apply_detailed(pool, writes).await.map(|a| a.written)
}

/// [`apply`], also returning the usage rows' bandwidth and the transaction id.
pub async fn apply_detailed(pool: &PgPool, writes: &[SampleWrite]) -> Result<Applied, sqlx::Error> {
    if writes.is_empty() {
        return Ok(Applied::default());
    }
    let mut tx = pool.begin().await?;
    let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *tx)
        .await?;
    let mut bandwidth = Vec::new();
    let mut sorted: Vec<&SampleWrite> = writes.iter().collect();
    sorted.sort_unstable_by_key(|w| w.state.vps_id);
    let col =
        |f: &dyn Fn(&SampleWrite) -> Option<i64>| sorted.iter().map(|w| f(w)).collect::<Vec<_>>();
    let ids: Vec<Uuid> = sorted.iter().map(|w| w.state.vps_id).collect();
    let sources: Vec<&str> = sorted.iter().map(|w| w.state.source.as_str()).collect();
    let at: Vec<DateTime<Utc>> = sorted.iter().map(|w| w.state.sampled_at).collect();
    let previous: Vec<Option<DateTime<Utc>>> =
        sorted.iter().map(|w| w.previous_sampled_at).collect();
    let cpu_total = col(&|w| w.state.cpu_total_us);
    let cpu_residue = col(&|w| Some(w.state.cpu_residue_us));
    let memory = col(&|w| w.state.memory_bytes);
    let memory_residue = col(&|w| Some(w.state.memory_residue));

    // Continue from the state we read, or create it if there was none; either way
    // only rows whose predecessor is unchanged come back.
    let mut written: Vec<Uuid> = sqlx::query_scalar(
        "WITH d AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                                  $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
                 AS d(vps_id, source, sampled_at, previous, cpu_total_us, cpu_residue_us,
                      memory_bytes, memory_residue)
         ), continued AS (
             UPDATE vps_sample_state s SET
                 source = d.source, sampled_at = d.sampled_at, cpu_total_us = d.cpu_total_us,
                 cpu_residue_us = d.cpu_residue_us, memory_bytes = d.memory_bytes,
                 memory_residue = d.memory_residue
             FROM d
             WHERE s.vps_id = d.vps_id AND d.previous IS NOT NULL AND s.sampled_at = d.previous
             RETURNING s.vps_id
         ), started AS (
             INSERT INTO vps_sample_state
                 (vps_id, source, sampled_at, cpu_total_us, cpu_residue_us, memory_bytes, memory_residue)
             SELECT d.vps_id, d.source, d.sampled_at, d.cpu_total_us, d.cpu_residue_us,
                    d.memory_bytes, d.memory_residue
             FROM d
             WHERE d.previous IS NULL AND EXISTS (SELECT 1 FROM vpses v WHERE v.id = d.vps_id)
             ORDER BY d.vps_id
             ON CONFLICT (vps_id) DO NOTHING
             RETURNING vps_id
         )
         SELECT vps_id FROM continued UNION ALL SELECT vps_id FROM started",
    )
    .bind(&ids)
    .bind(&sources)
    .bind(&at)
    .bind(&previous)
    .bind(&cpu_total)
    .bind(&cpu_residue)
    .bind(&memory)
    .bind(&memory_residue)
    .fetch_all(&mut *tx)
    .await?;
    written.sort_unstable();
    let applied: Vec<&SampleWrite> = sorted
        .into_iter()
        .filter(|w| written.binary_search(&w.state.vps_id).is_ok())
        .collect();

    // Usage per period, one statement per period.
    let mut periods: Vec<Period> = applied
        .iter()
        .flat_map(|w| w.increments.iter().map(|i| i.period))
        .collect();
    periods.sort_unstable();
    periods.dedup();
    for period in periods {
        let rows: Vec<(Uuid, i64, i64)> = applied
            .iter()
            .flat_map(|w| {
                w.increments
                    .iter()
                    .filter(move |i| i.period == period)
                    .map(move |i| (w.state.vps_id, i))
            })
            .filter(|(_, i)| i.cpu_ms != 0 || i.memory_mb_seconds != 0)
            .map(|(id, i)| (id, i.cpu_ms, i.memory_mb_seconds))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
        let cpu: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let mem: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "INSERT INTO vps_usage_periods (vps_id, period_start, cpu_used_ms, memory_used_mb_seconds)
             SELECT d.vps_id, $4, d.cpu, d.mem FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS d(vps_id, cpu, mem)
             ORDER BY d.vps_id
             ON CONFLICT (vps_id, period_start) DO UPDATE SET
                 cpu_used_ms = vps_usage_periods.cpu_used_ms + EXCLUDED.cpu_used_ms,
                 memory_used_mb_seconds = vps_usage_periods.memory_used_mb_seconds + EXCLUDED.memory_used_mb_seconds
             RETURNING vps_id, bandwidth_bytes",
        )
        .bind(&ids)
        .bind(&cpu)
        .bind(&mem)
        .bind(period.start())
        .fetch_all(&mut *tx)
        .await?;
        bandwidth.extend(rows.into_iter().map(|(vps, b)| (vps, period, b)));
    }

    // The VPS's own gauges: cumulative CPU and memory, current storage.
    let ids: Vec<Uuid> = applied.iter().map(|w| w.state.vps_id).collect();
    let cpu: Vec<i64> = applied
        .iter()
        .map(|w| w.increments.iter().map(|i| i.cpu_ms).sum())
        .collect();
    let mem: Vec<i64> = applied
        .iter()
        .map(|w| w.increments.iter().map(|i| i.memory_mb_seconds).sum())
        .collect();
    let storage: Vec<Option<i64>> = applied.iter().map(|w| w.storage_bytes).collect();
    sqlx::query(
        "UPDATE vpses v SET
             cpu_used_ms = COALESCE(v.cpu_used_ms, 0) + d.cpu,
             memory_used_mb_seconds = COALESCE(v.memory_used_mb_seconds, 0) + d.mem,
             storage_used_bytes = COALESCE(d.storage, v.storage_used_bytes)
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[]) AS d(vps_id, cpu, mem, storage)
         WHERE v.id = d.vps_id",
    )
    .bind(&ids)
    .bind(&cpu)
    .bind(&mem)
    .bind(&storage)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Applied {
        written: ids,
        bandwidth,
        xid: Some(xid),
    })
}
