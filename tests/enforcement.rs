//! Enforcement end to end: plan limits and budgets in PostgreSQL, traffic through
//! the egress proxy, CPU from a real cgroup through the monitor, and blocks and
//! unblocks taking effect. Prints the measured latency and overshoot; the load
//! harness (benches/load) holds them to the SPEC's figures.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::client::{exchange, get_request, read_head};
use support::monitor::{monitor_config, Cgroup, TestMonitor};
use support::origin::{EchoServer, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};

const MIB: u64 = 1 << 20;

/// Status of a small request, and the reason of a 403.
async fn probe(proxy: std::net::SocketAddr, origin: &Origin, f: &Fixture) -> (u16, String) {
    let ex = exchange(proxy, &get_request(&origin.url("/status/204"), &f.basic())).await;
    let reason = serde_json::from_slice::<serde_json::Value>(&ex.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (ex.status, reason)
}

/// Poll until a probe answers `status`; returns how long it took, and the reason.
async fn until_status(
    proxy: std::net::SocketAddr,
    origin: &Origin,
    f: &Fixture,
    status: u16,
    within: Duration,
) -> (Duration, String) {
    let started = Instant::now();
    let (_, reason) = eventually(within, format!("a probe answers {status}"), || async {
        let answer = probe(proxy, origin, f).await;
        holds(answer.0 == status, answer)
    })
    .await;
    (started.elapsed(), reason)
}

/// Download `bytes` through the proxy; returns the instant the client's
/// cumulative traffic (`already` + this exchange) crossed `threshold`, if it did.
async fn download_crossing(
    proxy: std::net::SocketAddr,
    origin: &Origin,
    f: &Fixture,
    bytes: u64,
    already: u64,
    threshold: u64,
) -> (u64, Option<Instant>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let request = get_request(&origin.url(&format!("/bytes/{bytes}")), &f.basic());
    s.write_all(&request).await.unwrap();
    let mut total = already + request.len() as u64;
    let mut crossed = (total > threshold).then(Instant::now);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                if crossed.is_none() && total > threshold {
                    crossed = Some(Instant::now());
                }
            }
        }
    }
    (total - already, crossed)
}

/// Wait until the user's published decision blocks with `reason`; its figures.
async fn wait_published(db: &TestDb, user: uuid::Uuid, reason: &str) -> serde_json::Value {
    eventually(
        PROMPTLY,
        format!("a {reason} decision published"),
        || async {
            let row: Option<(Option<String>, serde_json::Value)> =
                sqlx::query_as("SELECT reason, figures FROM usage_decisions WHERE user_id = $1")
                    .bind(user)
                    .fetch_optional(&db.pool)
                    .await
                    .unwrap();
            match row {
                Some((Some(r), figures)) if r == reason => Ok(figures),
                other => Err(other),
            }
        },
    )
    .await
}

async fn bandwidth(db: &TestDb, vps: uuid::Uuid) -> i64 {
    db.usage(vps).await.2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_blocks_promptly_unblocks_on_budget_and_blocks_again_when_spent() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    db.update_plan(
        f.plan,
        &format!("max_bandwidth_bytes = {MIB}, overage_bandwidth_cost_per_gb_cents = 0"),
    )
    .await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    // Production defaults for what decides the latency.
    config.proxy.meter.flush_interval = Duration::from_secs(1);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let proxy = TestProxy::start(config).await;
    let _monitor = TestMonitor::start(monitor_config(&db.url, Duration::from_secs(15))).await;

    // A tunnel opened while allowed.
    let mut tunnel = TcpStream::connect(proxy.egress).await.unwrap();
    let connect = format!(
        "CONNECT {} HTTP/1.1\r\nproxy-authorization: {}\r\n\r\n",
        echo.addr,
        f.basic()
    );
    tunnel.write_all(connect.as_bytes()).await.unwrap();
    let head = read_head(&mut tunnel).await;
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let mut used = (connect.len() + head.len()) as u64;

    // 2 MiB against a 1 MiB limit with no overage on sale.
    let (moved, crossed) = download_crossing(proxy.egress, &origin, &f, 2 * MIB, used, MIB).await;
    used += moved;
    let crossed = crossed.expect("the download crossed the limit");
    let (_, reason) = until_status(proxy.egress, &origin, &f, 403, PROMPTLY).await;
    let latency = crossed.elapsed();
    assert_eq!(reason, "bandwidth");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PROMPTLY, tunnel.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the open tunnel was closed by the block");
    // Once the block is published, everything counted has been written.
    wait_published(&db, f.user, "bandwidth").await;
    let recorded = bandwidth(&db, f.vps).await;
    println!(
        "bandwidth block: {latency:?} from the byte over the limit to 403; overshoot {} bytes past the {MIB}-byte limit \
         (recorded {recorded}, client moved {used})",
        recorded - MIB as i64
    );
    assert!(latency <= PROMPTLY, "block took {latency:?}");
    // The download in flight is cut close to the limit, not allowed to finish.
    assert!(
        recorded - (MIB as i64) < 256 * 1024,
        "overshoot {} bytes",
        recorded - MIB as i64
    );

    // Overage on sale at 100 cents/GiB with a 1-cent budget: allowed again.
    let changed = Instant::now();
    db.update_plan(f.plan, "overage_bandwidth_cost_per_gb_cents = 100")
        .await;
    db.set_budget(f.user, 1).await;
    until_status(proxy.egress, &origin, &f, 204, PROMPTLY).await;
    println!(
        "unblocked {:?} after the rate and budget changed",
        changed.elapsed()
    );

    // 1 cent buys 2^30/100 bytes of overage; go past it.
    let budget_end = MIB + (1u64 << 30) / 100;
    let already = bandwidth(&db, f.vps).await as u64;
    let (_, crossed) = download_crossing(
        proxy.egress,
        &origin,
        &f,
        budget_end - already + 2 * MIB,
        already,
        budget_end,
    )
    .await;
    let crossed = crossed.expect("crossed the budget");
    let (_, reason) = until_status(proxy.egress, &origin, &f, 403, PROMPTLY).await;
    let latency = crossed.elapsed();
    println!("budget block: {latency:?} from the byte that exhausted the budget to 403");
    assert_eq!(reason, "budget_exhausted");
    assert!(latency <= PROMPTLY, "block took {latency:?}");
    // The decision itself is published after the next flush.
    let figures = wait_published(&db, f.user, "budget_exhausted").await;
    assert_eq!(figures["budget_cents"], 1);
    assert!(
        figures["overage_cost_cents"].as_i64().unwrap() > 1,
        "{figures}"
    );
    let overshoot = figures["usage"]["bandwidth_bytes"].as_i64().unwrap() - budget_end as i64;
    println!("budget overshoot: {overshoot} bytes past the last byte the budget paid for");
    assert!(overshoot < 256 * 1024, "overshoot {overshoot} bytes");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_from_a_cgroup_sample_blocks_through_the_proxy() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    db.update_plan(f.plan, "max_cpu_ms = 300").await;
    let mut cgroup = Cgroup::create(f.vps);
    let origin = Origin::start().await;
    let proxy = TestProxy::start(test_config(&db.url)).await;
    let mut config = monitor_config(&db.url, Duration::from_millis(500));
    config
        .monitor
        .providers
        .insert("k8s".into(), Cgroup::source());
    let monitor = TestMonitor::start(config).await;
    monitor.wait_cycles(1, Duration::from_secs(10)).await;
    assert_eq!(probe(proxy.egress, &origin, &f).await.0, 204);

    let started = Instant::now();
    cgroup.spawn("while :; do :; done");
    let (_, reason) = until_status(proxy.egress, &origin, &f, 403, Duration::from_secs(30)).await;
    let blocked_after = started.elapsed();
    cgroup.kill_all();
    assert_eq!(reason, "cpu");
    // The monitor decides the CPU block. (A proxy re-deciding after a flush of
    // the probes' bytes may have published the same outcome last; the monitor
    // publishes every decision again each cycle.)
    let changed_at = eventually(PROMPTLY, "the monitor's CPU block published", || async {
        let row: (chrono::DateTime<chrono::Utc>, String, Option<String>) = sqlx::query_as(
            "SELECT changed_at, decided_by, reason FROM usage_decisions WHERE user_id = $1",
        )
        .bind(f.user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        holds(
            row.1.starts_with("monitor:") && row.2.as_deref() == Some("cpu"),
            row,
        )
    })
    .await
    .0;
    let cpu_ms: i64 =
        sqlx::query_scalar("SELECT cpu_used_ms FROM vps_usage_periods WHERE vps_id = $1")
            .bind(f.vps)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    println!(
        "cpu block: 403 {blocked_after:?} after the busy loop started (limit 300 ms, recorded {cpu_ms} ms, \
         decision published at {changed_at})"
    );
    assert!(cpu_ms > 300);
    // Raising the plan's CPU limit lifts the block.
    let raised = Instant::now();
    db.update_plan(f.plan, "max_cpu_ms = 360000000").await;
    until_status(proxy.egress, &origin, &f, 204, PROMPTLY).await;
    println!("cpu unblock {:?} after the plan changed", raised.elapsed());
    monitor.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_month_lifts_a_block_promptly_and_counts_afresh() {
    use tollgate_core::clock::ShiftedClock;
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    db.update_plan(f.plan, &format!("max_bandwidth_bytes = {MIB}"))
        .await;
    let origin = Origin::start().await;
    let clock = std::sync::Arc::new(ShiftedClock::starting_at(at("2026-11-30T23:59:50Z")));
    let seams = tollgate_proxy::Seams {
        clock: clock.clone(),
        ..Default::default()
    };
    let proxy = TestProxy::start_with(test_config(&db.url), seams).await;

    download_crossing(proxy.egress, &origin, &f, 2 * MIB, 0, MIB).await;
    let (_, reason) = until_status(proxy.egress, &origin, &f, 403, PROMPTLY).await;
    assert_eq!(reason, "bandwidth");
    wait_published(&db, f.user, "bandwidth").await;

    let month = |period: &'static str| {
        let (pool, vps) = (db.pool.clone(), f.vps);
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT bandwidth_bytes FROM vps_usage_periods WHERE vps_id = $1 AND period_start = $2::date",
            )
            .bind(vps)
            .bind(period)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .unwrap_or(0)
        }
    };
    let november = month("2026-11-01").await;
    assert!(
        november > MIB as i64,
        "November holds the traffic: {november}"
    );

    clock.set(at("2026-12-01T00:00:00.200Z"));
    let (took, _) = until_status(proxy.egress, &origin, &f, 204, PROMPTLY).await;
    println!("new month: unblocked {took:?} after midnight UTC");
    // December's traffic lands in December. (The one flush whose span straddles
    // midnight splits its bytes between the months in proportion to time.)
    eventually(PROMPTLY, "December usage recorded", || async {
        let december = month("2026-12-01").await;
        holds(december > 0, december)
    })
    .await;
    let november_after = month("2026-11-01").await;
    assert!(
        november_after >= november && november_after < november + 64 * 1024,
        "{november} -> {november_after}"
    );
    // December's decision follows the flush that wrote its first bytes.
    let blocked = eventually(PROMPTLY, "December's decision published", || async {
        let december: Option<bool> = sqlx::query_scalar(
            "SELECT blocked FROM usage_decisions WHERE user_id = $1 AND period_start = '2026-12-01'",
        )
        .bind(f.user)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        december.ok_or("no row")
    })
    .await;
    assert!(!blocked, "December's decision allows");
    proxy.stop().await;
}
