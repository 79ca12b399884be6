//! Throttle instead of block, an agent's own bandwidth limit, and the
//! destinations a plan keeps open while its users are blocked, end to end:
//! plans and agents in PostgreSQL, traffic through the egress proxy over plain
//! HTTP and CONNECT, rates measured at the client. Names resolve from a fixed
//! table to loopback and the dialer can only reach loopback.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::client::{exchange, get_request, read_head};
use support::hostile::{loopback_seams, LoopbackOnlyDialer};
use support::origin::{EchoServer, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};

const KIB: u64 = 1024;

/// Download `path` through the proxy on one connection: status, body bytes,
/// and how long the body took from the request on.
async fn download(proxy: SocketAddr, url: &str, f: &Fixture) -> (u16, u64, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&get_request(url, &f.basic())).await.unwrap();
    let head = read_head(&mut s).await;
    let status: u16 = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body += n as u64,
        }
    }
    (status, body, started.elapsed())
}

/// Open a CONNECT tunnel to `target`; the stream after the 200.
async fn open_tunnel(proxy: SocketAddr, target: SocketAddr, f: &Fixture) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
        f.basic()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "tunnel refused: {}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Send `bytes` through an echo tunnel while reading them back: how long
/// until all came back.
async fn echo_through(mut s: TcpStream, bytes: usize) -> Duration {
    let started = Instant::now();
    let (mut r, mut w) = s.split();
    let send = async {
        let chunk = vec![7u8; 16 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            w.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
    };
    let receive = async {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < bytes {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "tunnel closed after {got} of {bytes} bytes");
            got += n;
        }
    };
    tokio::join!(send, receive);
    started.elapsed()
}

/// The published decision of `user`: (reason, action, throttle rate).
async fn decision(
    db: &TestDb,
    user: uuid::Uuid,
) -> Option<(Option<String>, Option<String>, Option<i64>)> {
    sqlx::query_as(
        "SELECT reason, action, throttle_bytes_per_second FROM usage_decisions WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// `bytes` moved in `took` ran at `target` bytes per second, within 10 %.
fn assert_rate(what: &str, bytes: u64, took: Duration, target: u64) {
    let measured = bytes as f64 / took.as_secs_f64();
    let off = measured / target as f64 - 1.0;
    println!(
        "{what}: {bytes} B in {:.2} s = {measured:.0} B/s against {target} B/s ({:+.1} %)",
        took.as_secs_f64(),
        off * 100.0
    );
    assert!(
        off.abs() <= 0.10,
        "{what} at {measured:.0} B/s, not within 10 % of {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_user_on_a_throttling_plan_is_slowed_to_the_rate_never_refused() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let limit = 64 * KIB;
    let throttle = 256 * KIB;
    db.update_plan(
        f.plan,
        &format!(
            "max_bandwidth_bytes = {limit}, overage_bandwidth_cost_per_gb_cents = 0, \
             on_exhausted = 'throttle', throttle_bytes_per_second = {throttle}"
        ),
    )
    .await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let proxy = TestProxy::start(config).await;

    // Past the limit: the first download runs into it and goes on, slowed.
    let (status, body, _) = download(
        proxy.egress,
        &origin.url(&format!("/bytes/{}", 128 * KIB)),
        &f,
    )
    .await;
    assert_eq!((status, body), (200, 128 * KIB));
    let (reason, action, published_rate) = eventually(PROMPTLY, "a throttle decision", || async {
        let d = decision(&db, f.user).await;
        match &d {
            Some((Some(_), Some(a), _)) if a == "throttle" => Ok(d.unwrap()),
            _ => Err(d),
        }
    })
    .await;
    assert_eq!(reason.as_deref(), Some("bandwidth"));
    assert_eq!(action.as_deref(), Some("throttle"));
    assert_eq!(published_rate, Some(throttle as i64));

    // Requests are answered, never refused.
    for _ in 0..5 {
        let ex = exchange(
            proxy.egress,
            &get_request(&origin.url("/status/204"), &f.basic()),
        )
        .await;
        assert_eq!(ex.status, 204, "{}", ex.body_text());
    }

    // A plain HTTP download: 1 MiB at 256 KiB/s is 4 s.
    let size = 1024 * KIB;
    let (status, body, took) =
        download(proxy.egress, &origin.url(&format!("/bytes/{size}")), &f).await;
    assert_eq!((status, body), (200, size));
    assert_rate("throttled plain HTTP download", body, took, throttle);

    // A tunnel: 512 KiB each way share the user's one rate, 4 s in all.
    let each_way = 512 * KIB as usize;
    let took = echo_through(open_tunnel(proxy.egress, echo.addr, &f).await, each_way).await;
    assert_rate(
        "throttled tunnel, both ways",
        2 * each_way as u64,
        took,
        throttle,
    );

    // The notification says what the block means.
    let payload: serde_json::Value = eventually(PROMPTLY, "a blocked event", || async {
        let p: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT payload FROM quota_events WHERE user_id = $1 AND kind = 'blocked'",
        )
        .bind(f.user)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        p.ok_or(())
    })
    .await;
    assert_eq!(payload["action"], "throttle");
    assert_eq!(payload["throttle_bytes_per_second"], throttle);

    // The plan turns to blocking: the user, still exhausted, is refused.
    db.update_plan(f.plan, "on_exhausted = 'block'").await;
    eventually(PROMPTLY, "a 403 once the plan blocks", || async {
        let ex = exchange(
            proxy.egress,
            &get_request(&origin.url("/status/204"), &f.basic()),
        )
        .await;
        holds(ex.status == 403, ex.status)
    })
    .await;
    let (_, action, _) = eventually(PROMPTLY, "a block decision", || async {
        let d = decision(&db, f.user).await;
        match &d {
            Some((_, Some(a), _)) if a == "block" => Ok(d.unwrap()),
            _ => Err(d),
        }
    })
    .await;
    assert_eq!(action.as_deref(), Some("block"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_bandwidth_limit_holds_each_way_on_its_own() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let limit = 256 * KIB;
    sqlx::query("UPDATE agents SET bandwidth_bytes_per_second = $2 WHERE id = $1")
        .bind(f.agent)
        .bind(limit as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let proxy = TestProxy::start(config).await;

    // Download: 768 KiB at 256 KiB/s to the agent is 3 s.
    let size = 768 * KIB;
    let (status, body, took) =
        download(proxy.egress, &origin.url(&format!("/bytes/{size}")), &f).await;
    assert_eq!((status, body), (200, size));
    assert_rate("agent limit, download", body, took, limit);

    // Both ways at once: each way has the whole rate, so 512 KiB each way take
    // 2 s, not the 4 s one shared rate would.
    let each_way = 512 * KIB as usize;
    let took = echo_through(open_tunnel(proxy.egress, echo.addr, &f).await, each_way).await;
    assert_rate(
        "agent limit, each way of a tunnel",
        each_way as u64,
        took,
        limit,
    );

    // Lifting the limit lets the next download run at full speed.
    sqlx::query("UPDATE agents SET bandwidth_bytes_per_second = NULL WHERE id = $1")
        .bind(f.agent)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(PROMPTLY, "an unlimited download", || async {
        let (_, body, took) =
            download(proxy.egress, &origin.url(&format!("/bytes/{size}")), &f).await;
        holds(took < Duration::from_millis(1500), (body, took))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_open_destinations_stay_reachable_while_blocked_and_are_counted() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let port = origin.addr.port();
    sqlx::query("INSERT INTO plan_open_destinations (plan_id, host, ports) VALUES ($1, 'topup.platform.test', $2), ($1, '*.api.platform.test', NULL)")
        .bind(f.plan)
        .bind(vec![port as i32])
        .execute(&db.pool)
        .await
        .unwrap();
    let table: HashMap<&'static str, Vec<IpAddr>> = [
        "topup.platform.test",
        "v1.api.platform.test",
        "elsewhere.test",
    ]
    .into_iter()
    .map(|n| (n, vec!["127.0.0.1".parse().unwrap()]))
    .collect();
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let config = test_config(&db.url);
    let proxy = TestProxy::start_with(config, loopback_seams(table, dialer)).await;

    db.publish_block(f.user, tollgate_core::billing::BlockReason::BudgetExhausted)
        .await;
    let refused = format!("http://elsewhere.test:{port}/status/204");
    eventually(PROMPTLY, "the block in force", || async {
        let ex = exchange(proxy.egress, &get_request(&refused, &f.basic())).await;
        holds(ex.status == 403, ex.status)
    })
    .await;

    let before = db.usage(f.vps).await.2;
    let mut expected = 0u64;
    for url in [
        format!("http://topup.platform.test:{port}/bytes/1000"),
        format!("http://v1.api.platform.test:{port}/bytes/2000"),
    ] {
        let request = get_request(&url, &f.basic());
        let ex = exchange(proxy.egress, &request).await;
        assert_eq!(ex.status, 200, "{url}: {}", ex.body_text());
        expected += ex.written + ex.read;
    }
    // The list names ports: another port of an open host is not open.
    let ex = exchange(
        proxy.egress,
        &get_request("http://topup.platform.test:1/status/204", &f.basic()),
    )
    .await;
    assert_eq!(ex.status, 403, "{}", ex.body_text());

    // Their bytes are counted like any others (refusals' bytes count too, so
    // at least these).
    eventually(
        PROMPTLY,
        "the open destinations' bytes in usage",
        || async {
            let now = db.usage(f.vps).await.2;
            holds(now - before >= expected as i64, (now - before, expected))
        },
    )
    .await;
}
