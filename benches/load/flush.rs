//! The flush of a large fleet, on the real code path: `Meter` counters for N
//! VPSes, all dirty, drained and built into one batch (`flusher::build_batch`),
//! written by
//! `tollgate_core::db::usage::apply_flush` against PostgreSQL: once while the
//! month's rows do not exist yet (inserts) and once more (updates, the steady
//! state).

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::Utc;
use uuid::Uuid;

use tollgate_core::db::usage::{apply_flush, FlushOutcome};
use tollgate_proxy::flusher::build_batch;
use tollgate_proxy::meter::Meter;

use crate::database::BenchDb;

#[derive(Debug, Clone, Copy)]
pub struct FleetFlush {
    pub vpses: usize,
    pub build: Duration,
    /// First flush of the month: every row inserted.
    pub insert: Duration,
    /// Next flush: every row updated.
    pub update: Duration,
}

pub async fn measure(db: &BenchDb, vpses: usize) -> anyhow::Result<FleetFlush> {
    let (user, ids) = db.fleet(vpses).await?;
    let meter = Meter::new();

    let instance = Uuid::new_v4();
    let mut timings = Vec::new();
    for seq in 0..2 {
        for id in &ids {
            let counter = meter.counter(*id, user);
            counter.add_rx(1_234);
            counter.add_tx(56);
        }
        let started = Instant::now();
        let now = Utc::now();
        let batch = build_batch(
            instance,
            seq,
            &meter.drain(),
            now - chrono::Duration::seconds(1),
            now,
        );
        let built = started.elapsed();
        let written = Instant::now();
        let outcome = apply_flush(&db.pool, &batch).await?;
        let write = written.elapsed();
        match outcome {
            FlushOutcome::Applied { rows, .. } if rows == vpses => {}
            other => bail!("flush of {vpses} VPSes: {other:?}"),
        }
        timings.push((built, write));
    }
    Ok(FleetFlush {
        vpses,
        build: timings[1].0.max(timings[0].0),
        insert: timings[0].1,
        update: timings[1].1,
    })
}
