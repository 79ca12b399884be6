//! The flush of a large fleet, on the real code path: `Meter` counters for N
//! VPSes, all dirty, drained and built into one batch (`flusher::build_batch`),
//! written by `tollgate_core::db::usage::apply_flush` against PostgreSQL.
//!
//! Each round takes a month of its own, so its first flush meets no rows of
//! that month (every row inserted, as on the first of a month) and the flushes
//! after it update them (the steady state). Two updates follow each insert: the
//! second finds the versions the first left behind, as every flush after the
//! first of a month does. Rounds are on one connection pool, so the statements
//! are prepared once and later rounds run the plan PostgreSQL keeps for them.
//!
//! Run on its own: `cargo bench --bench load -- --only flush` (`--flush-rounds`,
//! `--flush-vpses`).

use std::time::{Duration, Instant};

use anyhow::bail;
use uuid::Uuid;

use tollgate_core::billing::Period;
use tollgate_core::db::usage::{apply_flush, FlushOutcome};
use tollgate_proxy::flusher::build_batch;
use tollgate_proxy::meter::Meter;

use crate::database::BenchDb;

/// Updates measured after each round's insert.
const UPDATES_PER_ROUND: usize = 2;

#[derive(Debug, Clone)]
pub struct FleetFlush {
    pub vpses: usize,
    /// Longest time to drain the counters and build a batch, over every flush.
    pub build: Duration,
    /// First flush of a month (every row inserted), one per round.
    pub insert: Spread,
    /// Flushes that update the month's rows, every one of every round.
    pub update: Spread,
}

/// Median and extremes of several timings.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub samples: usize,
    pub min: Duration,
    pub median: Duration,
    pub max: Duration,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Spread {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Spread {
            samples: sorted.len(),
            min: sorted[0],
            median: sorted[sorted.len() / 2],
            max: sorted[sorted.len() - 1],
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.2} s ({:.2}–{:.2} s, {} runs)",
            self.median.as_secs_f64(),
            self.min.as_secs_f64(),
            self.max.as_secs_f64(),
            self.samples
        )
    }
}

pub async fn measure(db: &BenchDb, vpses: usize, rounds: usize) -> anyhow::Result<FleetFlush> {
    if rounds == 0 {
        bail!("--flush-rounds must be at least 1");
    }
    let (user, ids) = db.fleet(vpses).await?;
    let meter = Meter::new();
    let instance = Uuid::new_v4();
    let mut seq = 0;
    let mut build = Duration::ZERO;
    let (mut inserts, mut updates) = (Vec::new(), Vec::new());
    // Months from January 2001 on: far from any month another section writes.
    let mut period = Period::starting(chrono::NaiveDate::from_ymd_opt(2001, 1, 1).unwrap())
        .expect("the first of a month");
    for round in 0..rounds {
        for flush in 0..=UPDATES_PER_ROUND {
            for id in &ids {
                let counter = meter.counter(*id, user);
                counter.add_rx(1_234);
                counter.add_tx(56);
            }
            let started = Instant::now();
            let at = period.start_instant() + chrono::Duration::days(1);
            let batch = build_batch(
                instance,
                seq,
                &meter.drain(),
                at - chrono::Duration::seconds(1),
                at,
            );
            build = build.max(started.elapsed());
            seq += 1;
            let written = Instant::now();
            let outcome = apply_flush(&db.pool, &batch).await?;
            let write = written.elapsed();
            match outcome {
                FlushOutcome::Applied { rows, .. } if rows == vpses => {}
                other => bail!("flush of {vpses} VPSes: {other:?}"),
            }
            let kind = if flush == 0 { "insert" } else { "update" };
            eprintln!(
                "   round {}: {kind} {:.3} s",
                round + 1,
                write.as_secs_f64()
            );
            if flush == 0 {
                inserts.push(write);
            } else {
                updates.push(write);
            }
        }
        period = period.next();
    }
    Ok(FleetFlush {
        vpses,
        build,
        insert: Spread::of(&inserts),
        update: Spread::of(&updates),
    })
}
