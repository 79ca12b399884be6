//! Quota notifications (SPEC §11) against real PostgreSQL, real monitors and a
//! real HTTP receiver on loopback that records every request: each threshold
//! crossing, block and unblock is delivered once, signed, whoever published
//! the decision, and survives a receiver that is down for a while.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::hmac;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

use support::client::{exchange, get_request};
use support::monitor::{monitor_config, TestMonitor};
use support::origin::{tls_files, tls_server_config_from, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};
use tollgate_core::billing::Period;
use tollgate_core::config::Config;
use tollgate_monitor::cycle;

const SECRET: &str = "quota-webhook-secret-0123456789abcdef";
const LIMIT: i64 = 1000;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    received_at: DateTime<Utc>,
    status: u16,
    signature: String,
    event_id: String,
    key: String,
    body: Bytes,
}

impl Hit {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on loopback: answers 200, or 500 while `failing`.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    failing: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// Its connections, closed with it: a receiver dropped is down.
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Receiver {
    async fn start(addr: SocketAddr) -> Receiver {
        Receiver::start_with(addr, None).await
    }

    /// A receiver on `addr`, speaking TLS with `tls` when given.
    async fn start_with(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let failing = Arc::new(AtomicBool::new(false));
        let (h, f) = (hits.clone(), failing.clone());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let open = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, f, tls) = (h.clone(), f.clone(), tls.clone());
                let connection = tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, f) = (h.clone(), f.clone());
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            let (signature, event_id, key) = (
                                header("x-tollgate-signature"),
                                header("x-tollgate-event-id"),
                                header("idempotency-key"),
                            );
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
                            h.lock().unwrap().push(Hit {
                                received_at: Utc::now(),
                                status,
                                signature,
                                event_id,
                                key,
                                body,
                            });
                            let mut response = hyper::Response::new(Full::new(Bytes::from_static(
                                if status == 200 {
                                    b"ok"
                                } else {
                                    b"receiver down"
                                },
                            )));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
                open.lock().unwrap().push(connection.abort_handle());
            }
        });
        Receiver {
            addr,
            hits,
            failing,
            task,
            connections,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Requests answered 2xx.
    fn delivered(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.status == 200)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

fn verifies(secret: &str, hit: &Hit) -> bool {
    let Some(hex) = hit.signature.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, &hit.body, &tag).is_ok()
}

fn webhook_config(db: &TestDb, url: String, max_backoff: Duration) -> Config {
    let mut c = monitor_config(&db.url, Duration::from_millis(200));
    c.monitor.webhooks.url = Some(url);
    c.monitor.webhooks.secret = Some(SECRET.into());
    c.monitor.webhooks.timeout = Duration::from_secs(2);
    c.monitor.webhooks.max_backoff = max_backoff;
    c.monitor.webhooks.poll_interval = Duration::from_secs(1);
    c.validate().unwrap();
    c
}

/// A user on a plan of `LIMIT` bandwidth bytes (overage not on sale) with one
/// running VPS on a provider that meters bandwidth only.
async fn user_with_vps(db: &TestDb) -> (Uuid, Uuid, Uuid) {
    let plan = db.plan("small", LIMIT, 0).await;
    let user = db
        .user(&format!("{}@example.com", Uuid::new_v4()), Some(plan))
        .await;
    let vps = db.vps(user, "fly", "10.0.0.2", "running").await;
    (plan, user, vps)
}

/// The VPS's bandwidth this period is `bytes`, as a flush leaves it.
async fn set_bandwidth(db: &TestDb, vps: Uuid, bytes: i64) {
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes)
         VALUES ($1, $2, $3, $3)
         ON CONFLICT (vps_id, period_start) DO UPDATE
         SET bandwidth_bytes = EXCLUDED.bandwidth_bytes, bandwidth_rx_bytes = EXCLUDED.bandwidth_rx_bytes",
    )
    .bind(vps)
    .bind(Period::current().start())
    .bind(bytes)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Two writers decide `user` at once through the monitor's evaluation path
/// (each publishes its decision as of its own read).
async fn publish_from_two_writers(db: &TestDb, user: Uuid) {
    let users = [user];
    let (a, b) = tokio::join!(
        cycle::evaluate(&db.pool, &users, "writer-a"),
        cycle::evaluate(&db.pool, &users, "writer-b"),
    );
    a.unwrap();
    b.unwrap();
}

/// (kind, axis, threshold) of a delivered body.
fn describe(hit: &Hit) -> (String, Option<String>, Option<i64>) {
    let v = hit.json();
    (
        v["kind"].as_str().unwrap().to_owned(),
        v["axis"].as_str().map(str::to_owned),
        v["threshold_percent"].as_i64(),
    )
}

async fn wait_delivered(receiver: &Receiver, n: usize, what: &str) -> Vec<Hit> {
    eventually(PROMPTLY, what, || async {
        let delivered = receiver.delivered();
        let kinds: Vec<_> = delivered.iter().map(describe).collect();
        holds(delivered.len() >= n, kinds).map(|_| delivered)
    })
    .await
}

/// Every event in the outbox is delivered (nothing is left to send).
async fn wait_outbox_drained(db: &TestDb, events: i64) {
    eventually(PROMPTLY, "every quota event delivered", || async {
        let (total, delivered): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(delivered_at) FROM quota_events")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        holds(total == events && delivered == events, (total, delivered))
    })
    .await;
}

fn kind(k: &str, axis: Option<&str>, t: Option<i64>) -> (String, Option<String>, Option<i64>) {
    (k.to_owned(), axis.map(str::to_owned), t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_crossing_block_and_unblock_is_delivered_once_with_two_monitors_and_two_writers() {
    let db = TestDb::new().await;
    let (plan, user, vps) = user_with_vps(&db).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap()).await;
    let url = format!("http://{}/hooks/tollgate", receiver.addr);
    let config = webhook_config(&db, url, Duration::from_secs(1));
    let first = TestMonitor::start(config.clone()).await;
    let second = TestMonitor::start(config).await;

    // 40 %, then across 50, 80 and 100, then over (blocked: overage not on sale).
    let mut want = Vec::new();
    for (bytes, expected) in [
        (400, vec![]),
        (550, vec![kind("threshold", Some("bandwidth"), Some(50))]),
        (850, vec![kind("threshold", Some("bandwidth"), Some(80))]),
        (1000, vec![kind("threshold", Some("bandwidth"), Some(100))]),
        (1001, vec![kind("blocked", None, None)]),
    ] {
        set_bandwidth(&db, vps, bytes).await;
        publish_from_two_writers(&db, user).await;
        want.extend(expected);
        wait_delivered(
            &receiver,
            want.len(),
            &format!("events up to {bytes} bytes"),
        )
        .await;
    }
    // A bigger plan: the monitor re-decides at once, and so do the writers.
    db.update_plan(plan, "max_bandwidth_bytes = 10000").await;
    publish_from_two_writers(&db, user).await;
    want.push(kind("unblocked", None, None));
    wait_delivered(&receiver, want.len(), "the unblock").await;
    wait_outbox_drained(&db, want.len() as i64).await;

    // Nothing is left to send, so nothing more arrives: each event came once.
    let hits = receiver.hits();
    let mut got: Vec<_> = hits.iter().map(describe).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "one request per crossing and transition");
    let mut keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), hits.len(), "distinct idempotency keys");
    for hit in &hits {
        assert!(verifies(SECRET, hit), "signature of {hit:?}");
        let body = hit.json();
        assert_eq!(body["id"].as_str().unwrap(), hit.event_id);
        assert_eq!(body["idempotency_key"].as_str().unwrap(), hit.key);
        assert_eq!(body["user_id"].as_str().unwrap(), user.to_string());
        assert_eq!(
            body["period_start"].as_str().unwrap(),
            Period::current().start().to_string()
        );
    }
    let blocked = hits
        .iter()
        .find(|h| describe(h).0 == "blocked")
        .unwrap()
        .json();
    assert_eq!(blocked["reason"], "bandwidth");
    assert_eq!(blocked["figures"]["usage"]["bandwidth_bytes"], 1001);
    let unblocked = hits
        .iter()
        .find(|h| describe(h).0 == "unblocked")
        .unwrap()
        .json();
    assert_eq!(unblocked["previous_reason"], "bandwidth");
    assert_eq!(unblocked["blocked"], false);
    let eighty = hits
        .iter()
        .find(|h| describe(h).2 == Some(80))
        .unwrap()
        .json();
    assert_eq!(
        (eighty["used"].as_i64(), eighty["limit"].as_i64()),
        (Some(850), Some(LIMIT))
    );
    assert_eq!(eighty["percent"].as_i64(), Some(85));
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM quota_events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(attempts.iter().all(|a| *a == 1), "{attempts:?}");

    // Delivery latency: decision's transaction (the event's created_at) to the
    // receiver holding the request.
    let mut lags_ms: Vec<f64> = Vec::new();
    for hit in &hits {
        let created: DateTime<Utc> =
            sqlx::query_scalar("SELECT created_at FROM quota_events WHERE id = $1::uuid")
                .bind(&hit.event_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        lags_ms.push((hit.received_at - created).num_microseconds().unwrap() as f64 / 1000.0);
    }
    lags_ms.sort_by(f64::total_cmp);
    println!(
        "quota webhook delivery latency over {} events (ms): min {:.1}, median {:.1}, max {:.1}",
        lags_ms.len(),
        lags_ms[0],
        lags_ms[lags_ms.len() / 2],
        lags_ms[lags_ms.len() - 1]
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_down_for_a_while_gets_every_event_once_when_it_is_back() {
    let db = TestDb::new().await;
    let (_, user, vps) = user_with_vps(&db).await;
    // A port nothing listens on yet: connections are refused.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = webhook_config(&db, format!("http://{addr}/"), Duration::from_millis(300));
    let monitor = TestMonitor::start(config.clone()).await;
    let standby = TestMonitor::start(config).await;
    for bytes in [600, 1000] {
        set_bandwidth(&db, vps, bytes).await;
        publish_from_two_writers(&db, user).await;
    }
    let failed_at_least = |n: i32, error: &'static str| {
        let pool = db.pool.clone();
        async move {
            let rows: Vec<(i32, Option<String>, bool)> = sqlx::query_as(
                "SELECT attempts, last_error, delivered_at IS NOT NULL FROM quota_events",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let ok = rows.len() == 3
                && rows.iter().all(|(a, e, delivered)| {
                    *a >= n && !delivered && e.as_deref().is_some_and(|e| e.contains(error))
                });
            holds(ok, rows)
        }
    };
    eventually(PROMPTLY, "each event refused three times", || {
        failed_at_least(3, "cannot connect")
    })
    .await;

    // Up, but failing.
    let receiver = Receiver::start(addr).await;
    receiver.failing.store(true, Ordering::SeqCst);
    eventually(PROMPTLY, "each event answered 500", || {
        failed_at_least(4, "500")
    })
    .await;
    let refused = receiver.hits().len();
    assert!(refused >= 3, "{refused}");

    // Back: every event arrives, once.
    receiver.failing.store(false, Ordering::SeqCst);
    let delivered = wait_delivered(&receiver, 3, "every event after the outage").await;
    wait_outbox_drained(&db, 3).await;
    let delivered_now = receiver.delivered();
    assert_eq!(
        delivered_now.len(),
        3,
        "{:?}",
        delivered_now.iter().map(describe).collect::<Vec<_>>()
    );
    let mut got: Vec<_> = delivered.iter().map(describe).collect();
    got.sort();
    assert_eq!(
        got,
        [50, 80, 100].map(|t| kind("threshold", Some("bandwidth"), Some(t)))
    );
    // Retries carry the same event id, idempotency key and signed body.
    for hit in &delivered_now {
        assert!(verifies(SECRET, hit));
        let earlier: Vec<Hit> = receiver
            .hits()
            .into_iter()
            .filter(|h| h.status == 500 && h.key == hit.key)
            .collect();
        assert!(!earlier.is_empty(), "a failed attempt of {}", hit.key);
        assert!(earlier.iter().all(|h| h.body == hit.body
            && h.event_id == hit.event_id
            && h.signature == hit.signature));
    }
    monitor.stop().await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_verifies_with_the_secret_and_fails_with_another() {
    let db = TestDb::new().await;
    let (_, user, vps) = user_with_vps(&db).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap()).await;
    let config = webhook_config(
        &db,
        format!("http://{}/", receiver.addr),
        Duration::from_secs(1),
    );
    let monitor = TestMonitor::start(config).await;
    set_bandwidth(&db, vps, 500).await;
    publish_from_two_writers(&db, user).await;
    let hit = wait_delivered(&receiver, 1, "the 50 % crossing")
        .await
        .remove(0);
    assert!(verifies(SECRET, &hit));
    assert!(!verifies("another-secret-of-the-same-length-000", &hit));
    let tampered = Hit {
        body: Bytes::from(
            String::from_utf8(hit.body.to_vec())
                .unwrap()
                .replace("50", "51"),
        ),
        ..hit.clone()
    };
    assert!(!verifies(SECRET, &tampered));
    assert_eq!(
        hit.signature,
        tollgate_monitor::webhooks::signature(SECRET.as_bytes(), &hit.body)
    );
    monitor.stop().await;
}

/// Download `bytes` through `proxy` for `f`'s agent.
async fn download(proxy: SocketAddr, origin: &Origin, f: &Fixture, bytes: u64) -> u16 {
    let ex = exchange(
        proxy,
        &get_request(&origin.url(&format!("/bytes/{bytes}")), &f.basic()),
    )
    .await;
    ex.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crossings_metered_by_two_proxies_arrive_once_after_a_ten_second_outage() {
    const MIB: i64 = 1 << 20;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    db.update_plan(
        f.plan,
        &format!("max_bandwidth_bytes = {MIB}, overage_bandwidth_cost_per_gb_cents = 0"),
    )
    .await;
    let origin = Origin::start().await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = receiver.addr;
    let config = webhook_config(&db, format!("http://{addr}/"), Duration::from_secs(1));
    let first = TestMonitor::start(config.clone()).await;
    let second = TestMonitor::start(config).await;
    // Two proxies meter the user's traffic, flush it and publish decisions.
    // Without headroom leases, so that neither holds the user's last headroom
    // while the other carries them past it (leases are tested in `fleet`).
    let proxy_config = || {
        let mut c = test_config(&db.url);
        c.proxy.leases.enabled = false;
        c
    };
    let a = TestProxy::start(proxy_config()).await;
    let b = TestProxy::start(proxy_config()).await;

    assert_eq!(download(a.egress, &origin, &f, 600 * 1024).await, 200);
    wait_delivered(&receiver, 1, "the 50 % crossing").await;

    // The receiver goes down for 10 s; meanwhile both proxies carry the user
    // over 80 %, 100 % and the limit.
    drop(receiver);
    let down_at = std::time::Instant::now();
    assert_eq!(download(b.egress, &origin, &f, 300 * 1024).await, 200);
    // Past the limit: cut short, or refused if the other proxy's bytes are
    // already known here.
    download(a.egress, &origin, &f, 200 * 1024).await;
    eventually(PROMPTLY, "three events waiting, refused", || async {
        let rows: Vec<(String, i32, bool, String)> = sqlx::query_as(
            "SELECT kind, attempts, delivered_at IS NOT NULL,
                    (SELECT string_agg(decided_by || ' ' || (figures #>> '{usage,bandwidth_bytes}'), ', ') FROM usage_decisions)
             FROM quota_events ORDER BY created_at",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let waiting = rows
            .iter()
            .filter(|(_, attempts, delivered, _)| !delivered && *attempts >= 1);
        holds(waiting.count() == 3, rows)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    let receiver = Receiver::start(addr).await;

    let delivered = wait_delivered(&receiver, 3, "the events held during the outage").await;
    wait_outbox_drained(&db, 4).await;
    // Nothing more comes: each crossing arrived once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = receiver.delivered();
    assert_eq!(after.len(), delivered.len());
    let mut got: Vec<_> = after.iter().map(describe).collect();
    got.sort();
    let mut want = vec![
        kind("threshold", Some("bandwidth"), Some(80)),
        kind("threshold", Some("bandwidth"), Some(100)),
        kind("blocked", None, None),
    ];
    want.sort();
    assert_eq!(got, want);
    a.stop().await;
    b.stop().await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_an_https_receiver_only_through_a_trusted_certificate() {
    let db = TestDb::new().await;
    let (_, user, vps) = user_with_vps(&db).await;
    let (tls, _) = tls_files("webhooks");
    let receiver = Receiver::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Some(tls_server_config_from(&tls, &[b"http/1.1"])),
    )
    .await;
    let url = format!("https://localhost:{}/hooks", receiver.addr.port());
    // With the built-in roots, the receiver's own certificate is refused.
    let untrusting =
        TestMonitor::start(webhook_config(&db, url.clone(), Duration::from_secs(1))).await;
    set_bandwidth(&db, vps, 500).await;
    publish_from_two_writers(&db, user).await;
    let error = eventually(PROMPTLY, "a refused TLS handshake", || async {
        let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM quota_events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        holds(error.as_deref().is_some_and(|e| e.contains("TLS")), error)
    })
    .await
    .unwrap();
    println!("untrusted receiver: {error}");
    assert!(
        receiver.hits().is_empty(),
        "nothing was sent in clear or to an untrusted peer"
    );
    untrusting.stop().await;

    // Trusting its CA, the event arrives, signed.
    let mut config = webhook_config(&db, url, Duration::from_secs(1));
    config.monitor.webhooks.ca_file = Some(tls.cert.clone());
    config.validate().unwrap();
    let trusting = TestMonitor::start(config).await;
    let hit = wait_delivered(&receiver, 1, "the 50 % crossing over TLS")
        .await
        .remove(0);
    assert!(verifies(SECRET, &hit));
    assert_eq!(
        describe(&hit),
        kind("threshold", Some("bandwidth"), Some(50))
    );
    trusting.stop().await;
}
