//! The monitor under fleet-sized trouble, and decisions from concurrent writers:
//!
//! - a provider with no source configured is one log line per cycle, not one
//!   per VPS, and every failure is counted in a metric with bounded labels;
//! - a decision is only ever replaced by one computed from a later read of its
//!   inputs, so a slow evaluation published last cannot undo a newer one.

mod support;

use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use tracing::Level;
use uuid::Uuid;

use support::counter;
use support::logs::LogCapture;
use support::monitor::{monitor_config, TestMonitor};
use support::TestDb;
use tollgate_core::billing::{BlockReason, Period};
use tollgate_core::db::{self, decisions, usage};
use tollgate_monitor::cycle::{self, Sources, Tracker};

/// `count` running VPSes of `user` on `provider`.
async fn fleet(db: &TestDb, user: Uuid, provider: &str, count: i32) {
    sqlx::query(
        "WITH cfg AS (
             INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
             VALUES ('cfg-' || gen_random_uuid(), $2, 'img', 1000, 1024, 10) RETURNING id)
         INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
         SELECT $1, cfg.id, 'vps-' || g, $2, 'vm-' || gen_random_uuid(), '127.0.0.1', 'running'
         FROM cfg, generate_series(1, $3) AS g",
    )
    .bind(user)
    .bind(provider)
    .bind(count)
    .execute(&db.pool)
    .await
    .unwrap();
}

const FAILURES: &str = "tollgate_monitor_sample_failures_total";

#[tokio::test]
async fn a_provider_without_a_source_logs_one_line_per_cycle_and_counts_every_vps() {
    const VPSES: i32 = 200;
    let db = TestDb::new().await;
    let plan = db.plan("fleet", 1 << 40, 0).await;
    let user = db.user("fleet@example.com", Some(plan)).await;
    // k8s bills CPU and memory, and this monitor has no source for it.
    fleet(&db, user, "k8s", VPSES).await;

    let (logs, _guard) = LogCapture::install(Level::INFO);
    tollgate_core::telemetry::metrics_handle();
    let labels = [
        ("provider", "k8s"),
        ("source", "none"),
        ("reason", "no_source"),
    ];
    let before = counter(FAILURES, &labels);
    // One cycle: the first runs at once, the next would be an hour later.
    let monitor = TestMonitor::start(monitor_config(&db.url, Duration::from_secs(3600))).await;
    monitor.wait_cycles(1, Duration::from_secs(30)).await;
    monitor.stop().await;

    let lines: Vec<String> = logs
        .from("tollgate")
        .iter()
        .map(ToString::to_string)
        .collect();
    // Start, lead, the failures, the cycle summary, stop: a handful, whatever the fleet size.
    assert!(
        lines.len() <= 10,
        "{} lines at INFO or above for one cycle; the first 20:\n{}",
        lines.len(),
        lines[..lines.len().min(20)].join("\n")
    );
    let failure_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("samples failed"))
        .collect();
    assert_eq!(
        failure_lines.len(),
        1,
        "one line for the {VPSES} failures of one kind:\n{}",
        lines.join("\n")
    );
    assert!(
        failure_lines[0].contains(&format!("count={VPSES}"))
            && failure_lines[0].contains("provider=k8s")
            && failure_lines[0].contains("reason=\"no_source\""),
        "{}",
        failure_lines[0]
    );
    assert_eq!(counter(FAILURES, &labels) - before, VPSES as u64);
}

#[tokio::test]
async fn free_text_provider_names_share_one_label_and_the_kinds_logged_are_capped() {
    const NAMES: i32 = 30;
    let db = TestDb::new().await;
    let plan = db.plan("many", 1 << 40, 0).await;
    let user = db.user("many@example.com", Some(plan)).await;
    // Unknown providers bill everything; each name is its own kind of failure.
    for i in 0..NAMES {
        fleet(
            &db,
            user,
            &format!("cloud-{i}-{}", Uuid::new_v4().simple()),
            2,
        )
        .await;
    }

    let (logs, _guard) = LogCapture::install(Level::INFO);
    tollgate_core::telemetry::metrics_handle();
    let mut config = monitor_config(&db.url, Duration::from_secs(3600));
    config.monitor.concurrency = 8;
    let sources = Sources::from_config(&config.monitor);
    let mut tracker = Tracker::new();
    let labels = [
        ("provider", "other"),
        ("source", "none"),
        ("reason", "no_source"),
    ];
    let before = counter(FAILURES, &labels);
    // The first cycle may also note each unknown provider name once (for the
    // life of the process); the second shows what every later cycle logs.
    cycle::timed_cycle(
        &db.pool,
        &config.monitor,
        &sources,
        "monitor-test",
        &mut tracker,
    )
    .await
    .unwrap();
    logs.clear();
    let report = cycle::timed_cycle(
        &db.pool,
        &config.monitor,
        &sources,
        "monitor-test",
        &mut tracker,
    )
    .await
    .unwrap();
    assert_eq!(report.failed, 2 * NAMES as usize);

    let lines: Vec<String> = logs
        .from("tollgate")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        lines.len() <= 11,
        "{} lines for one cycle with {NAMES} kinds of failure; the first 20:\n{}",
        lines.len(),
        lines[..lines.len().min(20)].join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("more ways than are logged")),
        "{}",
        lines.join("\n")
    );
    assert_eq!(counter(FAILURES, &labels) - before, 4 * NAMES as u64);
    let metrics = tollgate_core::telemetry::render_metrics();
    assert!(
        !metrics.contains("provider=\"cloud-"),
        "provider names from the database became labels"
    );
}

/// A plan allowing 1000 bytes with no overage on sale, a user on it and a VPS.
async fn small_plan_user(db: &TestDb, email: &str) -> (Uuid, Uuid, Uuid) {
    let plan = db.plan(&format!("small-{email}"), 1000, 0).await;
    let user = db.user(email, Some(plan)).await;
    let vps = db.vps(user, "fly", "127.0.0.1", "running").await;
    (plan, user, vps)
}

async fn add_bandwidth(db: &TestDb, vps: Uuid, bytes: i64) {
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes)
         VALUES ($1, $2, $3, $3)
         ON CONFLICT (vps_id, period_start) DO UPDATE SET
             bandwidth_bytes = vps_usage_periods.bandwidth_bytes + EXCLUDED.bandwidth_bytes,
             bandwidth_rx_bytes = vps_usage_periods.bandwidth_rx_bytes + EXCLUDED.bandwidth_rx_bytes",
    )
    .bind(vps)
    .bind(Period::current().start())
    .bind(bytes)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn stored(db: &TestDb, user: Uuid) -> decisions::PublishedDecision {
    decisions::load(&db.pool, Period::current(), Some(&[user]))
        .await
        .unwrap()
        .remove(0)
}

/// The monitor reads a user's figures, then a proxy flushes more bytes and
/// publishes the block they cause while the monitor's own (older) decision is
/// still on its way: the monitor's decision lands last and must not undo it.
#[tokio::test]
async fn an_older_evaluation_published_last_does_not_overwrite_a_newer_one() {
    let db = TestDb::new().await;
    let (_, user, vps) = small_plan_user(&db, "race@example.com").await;
    // Within limits: allowed, as published earlier.
    cycle::evaluate(&db.pool, &[user], "monitor").await.unwrap();
    assert_eq!(stored(&db, user).await.blocked, None);

    // Hold the decision row so the monitor's next publish waits after its read.
    let mut proxy = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM usage_decisions WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *proxy)
        .await
        .unwrap();
    let monitor = {
        let pool = db.pool.clone();
        tokio::spawn(async move { cycle::evaluate(&pool, &[user], "monitor").await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'INSERT INTO usage_decisions%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the monitor's publish never waited on the row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The monitor has read its figures (0 bytes). Now the proxy's flush and its
    // re-evaluation: 5000 bytes over a 1000-byte plan, read after the monitor's.
    add_bandwidth(&db, vps, 5000).await;
    sqlx::query(
        "UPDATE usage_decisions
         SET blocked = true, reason = 'bandwidth', decided_by = 'proxy',
             decided_at = statement_timestamp(), changed_at = statement_timestamp()
         WHERE user_id = $1",
    )
    .bind(user)
    .execute(&mut *proxy)
    .await
    .unwrap();
    proxy.commit().await.unwrap();
    let (allowed, blocked) = monitor.await.unwrap().unwrap();
    assert_eq!(
        (allowed, blocked),
        (1, 0),
        "the monitor decided from its older read"
    );

    let now = stored(&db, user).await;
    assert_eq!(
        (now.blocked, now.decided_by.as_str()),
        (Some(BlockReason::Bandwidth), "proxy"),
        "the newer decision stands"
    );
    // The next evaluation reads the 5000 bytes and agrees.
    cycle::evaluate(&db.pool, &[user], "monitor").await.unwrap();
    let later = stored(&db, user).await;
    assert_eq!(
        (later.blocked, later.decided_by.as_str()),
        (Some(BlockReason::Bandwidth), "monitor")
    );
    assert!(later.decided_at > now.decided_at);
}

/// Two writers publish through the library: the order of arrival does not
/// matter, only the order of the reads; a decision that is not stored notifies
/// nobody, and one that is stored notifies only if the outcome flipped.
#[tokio::test]
async fn decisions_are_replaced_only_by_later_reads_and_notify_only_on_flips() {
    let db = TestDb::new().await;
    let (plan, user, vps) = small_plan_user(&db, "order@example.com").await;
    let (_, marker, _) = small_plan_user(&db, "marker@example.com").await;
    let period = Period::current();
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(db::DECISION_CHANNEL).await.unwrap();
    let read = |db: &TestDb, user: Uuid| {
        let pool = db.pool.clone();
        async move {
            let b = usage::user_billing(&pool, &[user], period)
                .await
                .unwrap()
                .remove(0);
            (b.read_at, b.decide())
        }
    };
    // Writer A reads: within limits.
    let (a_at, a) = read(&db, user).await;
    assert_eq!(a.blocked, None);
    // Bytes arrive; writer B reads after them: over the limit.
    add_bandwidth(&db, vps, 5000).await;
    let (b_at, b) = read(&db, user).await;
    assert_eq!(b.blocked, Some(BlockReason::Bandwidth));
    assert!(b_at > a_at);

    // B publishes first, A (older) last.
    let n = decisions::publish_as_of(&db.pool, period, &[(user, b.clone())], "proxy-b", b_at)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        notification(&mut listener).await,
        format!("{user}:{}", period.start())
    );
    let n = decisions::publish_as_of(&db.pool, period, &[(user, a.clone())], "monitor-a", a_at)
        .await
        .unwrap();
    assert_eq!(n, 0, "the older read was not stored");
    let now = stored(&db, user).await;
    assert_eq!(
        (now.blocked, now.decided_by.as_str(), now.decided_at),
        (Some(BlockReason::Bandwidth), "proxy-b", b_at)
    );
    // Nothing was notified for it: the next notification is the marker's.
    let (marker_at, first) = read(&db, marker).await;
    decisions::publish_as_of(&db.pool, period, &[(marker, first)], "test", marker_at)
        .await
        .unwrap();
    assert_eq!(
        notification(&mut listener).await,
        format!("{marker}:{}", period.start())
    );

    // A newer read with the same outcome is stored, silently; one that flips notifies.
    let (c_at, c) = read(&db, user).await;
    let n = decisions::publish_as_of(&db.pool, period, &[(user, c)], "monitor-c", c_at)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(stored(&db, user).await.changed_at, now.changed_at);
    db.update_plan(plan, "max_bandwidth_bytes = 1000000").await;
    let (d_at, d) = read(&db, user).await;
    assert_eq!(d.blocked, None);
    decisions::publish_as_of(&db.pool, period, &[(user, d)], "monitor-d", d_at)
        .await
        .unwrap();
    assert_eq!(
        notification(&mut listener).await,
        format!("{user}:{}", period.start())
    );
    assert_eq!(stored(&db, user).await.blocked, None);

    // A publish without a read of its own (an operator's block) counts as of now.
    db.publish_block(user, BlockReason::Storage).await;
    assert_eq!(stored(&db, user).await.blocked, Some(BlockReason::Storage));
}

/// The next payload on the decision channel (within 5 s).
async fn notification(listener: &mut PgListener) -> String {
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a decision notification within 5 s")
        .unwrap()
        .payload()
        .to_owned()
}
