//! One row the database refuses never wedges flushing (SPEC §4.3): the refused
//! row is left out, logged and counted, the rest of its batch commits exactly
//! once through the ledger, and later flushes go on.
//!
//! The refusal is a CHECK constraint the test adds to its own database, naming
//! one VPS: a stand-in for any per-row refusal (a trigger, an out-of-range sum).

mod support;

use std::sync::Arc;
use std::time::Duration;

use tracing::Level;
use uuid::Uuid;

use support::counter;
use support::logs::LogCapture;
use support::proxy::temp_dir;
use support::{Fixture, TestDb};
use tollgate_core::billing::Period;
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::config::{LeaseConfig, MeterConfig};
use tollgate_core::db::usage::{self, BandwidthDelta, FlushBatch, FlushOutcome, PeriodDeltas};
use tollgate_proxy::enforcement::Enforcer;
use tollgate_proxy::flusher::Flusher;
use tollgate_proxy::health::Health;
use tollgate_proxy::leases::Leases;
use tollgate_proxy::meter::Meter;

/// Refuse every `vps_usage_periods` row of `vps` in this test's database.
async fn refuse_rows_of(db: &TestDb, vps: Uuid) {
    sqlx::query(&format!(
        "ALTER TABLE vps_usage_periods ADD CONSTRAINT test_refuses_one_vps CHECK (vps_id <> '{vps}')"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

const DROPPED: &str = "tollgate_flush_dropped_rows_total";

/// A flusher as the proxy builds it, over `meter`.
fn flusher(db: &TestDb, meter: Arc<Meter>, instance: Uuid) -> Flusher {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let health = Arc::new(Health::new());
    let (leases, _asks) = Leases::new(
        db.pool.clone(),
        health.clone(),
        LeaseConfig::default(),
        instance,
        clock.clone(),
    );
    let (enforcer, _events) = Enforcer::new(
        db.pool.clone(),
        health.clone(),
        "proxy-test".into(),
        Duration::from_secs(30),
        clock.clone(),
        leases,
    );
    let config = MeterConfig {
        spill_dir: temp_dir("spill"),
        ..MeterConfig::default()
    };
    Flusher::new(
        meter,
        db.pool.clone(),
        Arc::new(enforcer),
        health,
        config,
        instance,
        clock,
    )
}

async fn ledger(db: &TestDb, instance: Uuid) -> Vec<(i64, i32, i32)> {
    sqlx::query_as(
        "SELECT seq, vps_count, dropped_vps_count FROM flush_ledger
         WHERE instance_id = $1 ORDER BY seq",
    )
    .bind(instance)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_refused_row_is_left_out_and_the_rest_of_the_batch_and_later_ones_commit() {
    const GOOD: usize = 20;
    let db = TestDb::new().await;
    tollgate_core::telemetry::metrics_handle();
    let mut good: Vec<Fixture> = Vec::new();
    for _ in 0..GOOD {
        good.push(db.fixture("fly").await);
    }
    let bad = db.fixture("fly").await;
    refuse_rows_of(&db, bad.vps).await;
    let rejected = [("reason", "rejected")];
    let before = counter(DROPPED, &rejected);
    let (logs, _guard) = LogCapture::install(Level::WARN);

    let meter = Arc::new(Meter::new());
    let instance = Uuid::new_v4();
    let mut flusher = flusher(&db, meter.clone(), instance);
    // Traffic of every VPS, the refused one among them, in one batch.
    let count = |i: usize, round: u64| (1000 * round + i as u64, 7 * round + i as u64);
    let record = |round: u64| {
        for (i, f) in good.iter().enumerate() {
            let c = meter.counter(f.vps, f.user);
            let (rx, tx) = count(i, round);
            c.add_rx(rx);
            c.add_tx(tx);
        }
        let c = meter.counter(bad.vps, bad.user);
        c.add_rx(555);
        c.add_tx(44);
    };
    record(1);
    assert_eq!(
        flusher.flush_once().await,
        Ok(()),
        "the batch commits without the refused row"
    );
    for (i, f) in good.iter().enumerate() {
        let (rx, tx) = count(i, 1);
        assert_eq!(
            db.usage(f.vps).await,
            (rx as i64, tx as i64, (rx + tx) as i64),
            "VPS {i}"
        );
    }
    assert_eq!(db.usage(bad.vps).await, (0, 0, 0));
    assert_eq!(counter(DROPPED, &rejected) - before, 1);

    // Later traffic flushes too, exactly once, and the refused VPS keeps being
    // left out (and counted) without holding anything up.
    record(2);
    assert_eq!(flusher.flush_once().await, Ok(()));
    for (i, f) in good.iter().enumerate() {
        let ((rx1, tx1), (rx2, tx2)) = (count(i, 1), count(i, 2));
        let (rx, tx) = (rx1 + rx2, tx1 + tx2);
        assert_eq!(
            db.usage(f.vps).await,
            (rx as i64, tx as i64, (rx + tx) as i64),
            "VPS {i}"
        );
    }
    assert_eq!(counter(DROPPED, &rejected) - before, 2);
    // Logged once, naming the VPS and the constraint; the second refusal is only counted.
    let warnings: Vec<String> = logs
        .from("tollgate_proxy::flusher")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains(&bad.vps.to_string())
            && warnings[0].contains("test_refuses_one_vps")
            && !warnings[0].contains(&bad.token),
        "{}",
        warnings[0]
    );
    assert_eq!(
        ledger(&db, instance).await,
        [(0, GOOD as i32 + 1, 1), (1, GOOD as i32 + 1, 1)],
        "one ledger row per batch, each noting the row left out"
    );
}

fn batch(instance: Uuid, seq: i64, deltas: &[(Uuid, u64, u64)]) -> FlushBatch {
    FlushBatch {
        instance_id: instance,
        seq,
        leases: None,
        destinations: Default::default(),
        periods: vec![PeriodDeltas {
            period: Period::current(),
            deltas: deltas
                .iter()
                .map(|&(vps_id, rx, tx)| BandwidthDelta { vps_id, rx, tx })
                .collect(),
        }],
    }
}

#[tokio::test]
async fn a_batch_with_a_refused_row_retried_after_a_lost_acknowledgement_counts_once() {
    let db = TestDb::new().await;
    let (a, b, bad) = (
        db.fixture("fly").await,
        db.fixture("fly").await,
        db.fixture("fly").await,
    );
    refuse_rows_of(&db, bad.vps).await;
    let instance = Uuid::new_v4();
    let first = batch(
        instance,
        0,
        &[(a.vps, 100, 1), (bad.vps, 5, 5), (b.vps, 200, 2)],
    );
    let (outcome, refused) = usage::apply_flush_detailed(&db.pool, &first).await.unwrap();
    assert_eq!(
        outcome,
        FlushOutcome::Applied {
            rows: 2,
            dropped: vec![]
        }
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].delta.vps_id, bad.vps);
    assert_eq!(refused[0].code.as_deref(), Some("23514"));
    assert!(
        refused[0].message.contains("test_refuses_one_vps"),
        "{}",
        refused[0].message
    );
    // The same batch again, as after a commit whose acknowledgement was lost.
    let (again, refused) = usage::apply_flush_detailed(&db.pool, &first).await.unwrap();
    assert_eq!((again, refused.len()), (FlushOutcome::AlreadyApplied, 0));
    assert_eq!(db.usage(a.vps).await, (100, 1, 101));
    assert_eq!(db.usage(b.vps).await, (200, 2, 202));
    assert_eq!(db.usage(bad.vps).await, (0, 0, 0));

    // A row of a VPS deleted meanwhile and a refused row in one batch: each is
    // reported for what it is, and the ledger notes both left out.
    let gone = db.fixture("fly").await;
    sqlx::query("DELETE FROM agents WHERE vps_id = $1")
        .bind(gone.vps)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM vpses WHERE id = $1")
        .bind(gone.vps)
        .execute(&db.pool)
        .await
        .unwrap();
    let second = batch(
        instance,
        1,
        &[(gone.vps, 9, 9), (bad.vps, 1, 1), (a.vps, 1, 0)],
    );
    let (outcome, refused) = usage::apply_flush_detailed(&db.pool, &second)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        FlushOutcome::Applied {
            rows: 1,
            dropped: vec![gone.vps]
        }
    );
    assert_eq!(
        refused.iter().map(|r| r.delta.vps_id).collect::<Vec<_>>(),
        [bad.vps]
    );
    assert_eq!(db.usage(a.vps).await, (101, 1, 102));
    assert_eq!(ledger(&db, instance).await, [(0, 3, 1), (1, 3, 2)]);
}

/// Several refused rows in a batch spanning two months, one refused by a
/// constraint and one by a sum beyond BIGINT (no constraint needed): each is
/// isolated, every other row of both months lands exactly.
#[tokio::test]
async fn several_refused_rows_across_two_months_are_each_isolated() {
    const VPSES: usize = 40;
    let db = TestDb::new().await;
    let mut vpses = Vec::new();
    for _ in 0..VPSES {
        vpses.push(db.fixture("fly").await.vps);
    }
    // Rows received 666 bytes are refused; VPS 7 is one byte short of BIGINT's end.
    sqlx::query(
        "ALTER TABLE vps_usage_periods ADD CONSTRAINT test_refuses_666 CHECK (bandwidth_rx_bytes <> 666)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let this = Period::current();
    let last = Period::containing(this.start_instant() - chrono::Duration::days(1));
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_tx_bytes)
         VALUES ($1, $2, $3, $3)",
    )
    .bind(vpses[7])
    .bind(this.start())
    .bind(i64::MAX - 1)
    .execute(&db.pool)
    .await
    .unwrap();

    let deltas = |period_rx: fn(usize) -> u64| -> Vec<BandwidthDelta> {
        vpses
            .iter()
            .enumerate()
            .map(|(i, &vps_id)| BandwidthDelta {
                vps_id,
                rx: period_rx(i),
                tx: 1,
            })
            .collect()
    };
    let batch = FlushBatch {
        instance_id: Uuid::new_v4(),
        seq: 0,
        leases: None,
        destinations: Default::default(),
        periods: vec![
            PeriodDeltas {
                period: last,
                deltas: deltas(|i| if i == 3 { 666 } else { 10 + i as u64 }),
            },
            PeriodDeltas {
                period: this,
                deltas: deltas(|i| if i == 30 { 666 } else { 100 + i as u64 }),
            },
        ],
    };
    let (outcome, refused) = usage::apply_flush_detailed(&db.pool, &batch).await.unwrap();
    let mut refused: Vec<(Period, Uuid, Option<String>)> = refused
        .into_iter()
        .map(|r| (r.period, r.delta.vps_id, r.code))
        .collect();
    refused.sort();
    let mut expected = vec![
        (last, vpses[3], Some("23514".to_owned())),
        (this, vpses[7], Some("22003".to_owned())),
        (this, vpses[30], Some("23514".to_owned())),
    ];
    expected.sort();
    assert_eq!(refused, expected);
    assert_eq!(
        outcome,
        FlushOutcome::Applied {
            rows: 2 * VPSES - 3,
            dropped: vec![]
        }
    );
    for (i, &vps) in vpses.iter().enumerate() {
        let rows: Vec<(chrono::NaiveDate, i64, i64)> = sqlx::query_as(
            "SELECT period_start, bandwidth_rx_bytes, bandwidth_tx_bytes FROM vps_usage_periods
             WHERE vps_id = $1 ORDER BY period_start",
        )
        .bind(vps)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let mut want = Vec::new();
        if i != 3 {
            want.push((last.start(), 10 + i as i64, 1));
        }
        match i {
            7 => want.push((this.start(), 0, i64::MAX - 1)),
            30 => {}
            _ => want.push((this.start(), 100 + i as i64, 1)),
        }
        assert_eq!(rows, want, "VPS {i}");
    }
}

/// A VPS deleted while its bytes were pending is dropped and reported, whether
/// the batch meets rows of the month already there or new ones, and also when
/// the same batch holds a row the database refuses.
#[tokio::test]
async fn a_deleted_vps_is_dropped_beside_updated_inserted_and_refused_rows() {
    let db = TestDb::new().await;
    let (kept, fresh, gone, bad) = (
        db.fixture("fly").await,
        db.fixture("fly").await,
        db.fixture("fly").await,
        db.fixture("fly").await,
    );
    let instance = Uuid::new_v4();
    let first = batch(instance, 0, &[(kept.vps, 1, 1), (gone.vps, 1, 1)]);
    usage::apply_flush(&db.pool, &first).await.unwrap();
    sqlx::query("DELETE FROM vpses WHERE id = $1")
        .bind(gone.vps)
        .execute(&db.pool)
        .await
        .unwrap();

    let second = batch(
        instance,
        1,
        &[(kept.vps, 10, 0), (fresh.vps, 5, 5), (gone.vps, 7, 7)],
    );
    assert_eq!(
        usage::apply_flush(&db.pool, &second).await.unwrap(),
        FlushOutcome::Applied {
            rows: 2,
            dropped: vec![gone.vps]
        }
    );
    assert_eq!(db.usage(kept.vps).await, (11, 1, 12));
    assert_eq!(db.usage(fresh.vps).await, (5, 5, 10));

    refuse_rows_of(&db, bad.vps).await;
    let third = batch(
        instance,
        2,
        &[
            (kept.vps, 1, 0),
            (fresh.vps, 1, 0),
            (gone.vps, 1, 0),
            (bad.vps, 3, 3),
        ],
    );
    let (outcome, refused) = usage::apply_flush_detailed(&db.pool, &third).await.unwrap();
    assert_eq!(
        outcome,
        FlushOutcome::Applied {
            rows: 2,
            dropped: vec![gone.vps]
        }
    );
    assert_eq!(
        refused.iter().map(|r| r.delta.vps_id).collect::<Vec<_>>(),
        [bad.vps]
    );
    assert_eq!(db.usage(kept.vps).await, (12, 1, 13));
    assert_eq!(db.usage(fresh.vps).await, (6, 5, 11));
    assert_eq!(db.usage(bad.vps).await, (0, 0, 0));
    assert_eq!(
        ledger(&db, instance).await,
        [(0, 2, 0), (1, 3, 1), (2, 4, 2)]
    );
}
