//! Exactly-once metering under faults, and bounded memory under large transfers.
//! Database outages are simulated with a relay the test controls (the shared
//! PostgreSQL server is never stopped); signals go to a real `tollgate proxy`
//! child process.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::client::{exchange, get_request, post_request, read_head};
use support::origin::{EchoServer, Origin};
use support::pg_relay::PgRelay;
use support::proxy::{temp_dir, test_config, ProxyProcess, TestProxy};
use support::wait::{eventually, holds};
use support::{Fixture, TestDb};

/// Bytes moved by clients, measured on their own sockets.
#[derive(Default)]
struct Totals {
    written: AtomicU64,
    read: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Totals {
    fn moved(&self) -> (u64, u64) {
        (
            self.read.load(Ordering::SeqCst),
            self.written.load(Ordering::SeqCst),
        )
    }

    /// The database shows exactly what the clients moved.
    async fn expect_counted(&self, db: &TestDb, f: &Fixture) {
        let (read, written) = self.moved();
        db.expect_usage(f.vps, read, written, Duration::from_secs(20))
            .await;
    }

    /// Once the proxy has stopped (final flush written), still exactly that.
    async fn assert_counted(&self, db: &TestDb, f: &Fixture) {
        let (read, written) = self.moved();
        db.assert_usage(f.vps, read, written).await;
    }
}

/// Keep `workers` clients busy with exchanges of varied sizes until `stop`.
fn drive_load(
    proxy: std::net::SocketAddr,
    origin: &Origin,
    f: &Fixture,
    workers: u64,
    stop: Arc<AtomicBool>,
    totals: Arc<Totals>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (auth, base) = (f.basic(), origin.url(""));
            let (stop, totals) = (stop.clone(), totals.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let request = if (w + i).is_multiple_of(2) {
                        get_request(
                            &format!("{base}/bytes/{}", 500 + (w * 7 + i * 131) % 20_000),
                            &auth,
                        )
                    } else {
                        post_request(
                            &format!("{base}/echo/x"),
                            &auth,
                            &vec![b'p'; ((w + i * 977) % 30_000) as usize],
                        )
                    };
                    let ex = exchange(proxy, &request).await;
                    totals.written.fetch_add(ex.written, Ordering::SeqCst);
                    totals.read.fetch_add(ex.read, Ordering::SeqCst);
                    if ex.status == 200 {
                        totals.ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        totals.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

/// One exchange so the agent is cached (requests then no longer need the
/// database); its bytes count like any other.
async fn warm_up(proxy: std::net::SocketAddr, origin: &Origin, f: &Fixture, totals: &Totals) {
    let ex = exchange(proxy, &get_request(&origin.url("/status/204"), &f.basic())).await;
    assert_eq!(ex.status, 204);
    totals.written.fetch_add(ex.written, Ordering::SeqCst);
    totals.read.fetch_add(ex.read, Ordering::SeqCst);
}

async fn finish(workers: Vec<tokio::task::JoinHandle<()>>) {
    for w in workers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_flushers_connection_mid_flush_neither_loses_nor_doubles() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let proxy = TestProxy::start(test_config(&db.url)).await;
    let (stop, totals) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Totals::default()),
    );
    warm_up(proxy.egress, &origin, &f, &totals).await;
    let workers = drive_load(proxy.egress, &origin, &f, 6, stop.clone(), totals.clone());
    let killed = Arc::new(AtomicU64::new(0));
    let killer = {
        let (pool, name, stop) = (db.pool.clone(), db.name.clone(), stop.clone());
        let killed = killed.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // Kill the proxy's backends while they are in the middle of a statement
                // or transaction: that is where the flush lives.
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name = 'tollgate-proxy'
                       AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()",
                )
                .bind(&name)
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                killed.fetch_add(n as u64, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    // Load and kills for at least 4 s, and until the killer has caught a flush
    // (on a loaded machine that can take longer).
    let loaded_since = Instant::now();
    eventually(
        Duration::from_secs(60),
        "a proxy backend killed mid-statement",
        || async {
            let n = killed.load(Ordering::SeqCst);
            holds(n > 0 && loaded_since.elapsed() >= Duration::from_secs(4), n)
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    finish(workers).await;
    killer.await.unwrap();
    let killed = killed.load(Ordering::SeqCst);
    println!(
        "killed {killed} proxy backends mid-statement; {} exchanges",
        totals.ok.load(Ordering::SeqCst)
    );
    assert!(
        killed > 0,
        "no backend was caught mid-flush; the test proved nothing"
    );
    assert_eq!(totals.failed.load(Ordering::SeqCst), 0);
    totals.expect_counted(&db, &f).await;
    proxy.stop().await;
    totals.assert_counted(&db, &f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_database_outage_under_load_neither_loses_nor_doubles() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let relay = PgRelay::start(support::server_addr().await).await;
    let mut config = test_config(&relay.url_for(&db.url));
    config.database.connect_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(config).await;
    let (stop, totals) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Totals::default()),
    );
    warm_up(proxy.egress, &origin, &f, &totals).await;
    // An agent that exists but this proxy has never seen.
    let stranger = db.fixture("fly").await;
    let workers = drive_load(proxy.egress, &origin, &f, 4, stop.clone(), totals.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.cut();
    // It cannot be verified while the database is down: 503, not 407.
    let request = get_request(&origin.url("/status/204"), &stranger.basic());
    let unverifiable = exchange(proxy.egress, &request).await;
    assert_eq!(unverifiable.status, 503, "{}", unverifiable.head);
    assert_eq!(unverifiable.header("retry-after").as_deref(), Some("5"));
    let ok_before = totals.ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let served_during_outage = totals.ok.load(Ordering::SeqCst) - ok_before;
    relay.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    finish(workers).await;

    assert!(
        served_during_outage > 50,
        "known agents keep working from cache: {served_during_outage} served"
    );
    assert_eq!(totals.failed.load(Ordering::SeqCst), 0);
    totals.expect_counted(&db, &f).await;
    proxy.stop().await;
    totals.assert_counted(&db, &f).await;
}

/// A download read slowly, so it is in flight for a while; bumps `flowing`
/// once the first bytes have arrived.
async fn slow_download(
    proxy: std::net::SocketAddr,
    url: String,
    auth: String,
    flowing: Arc<AtomicUsize>,
) -> (u64, u64) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let request = get_request(&url, &auth);
    s.write_all(&request).await.unwrap();
    let mut read = 0u64;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if read == 0 {
                    flowing.fetch_add(1, Ordering::SeqCst);
                }
                read += n as u64;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (request.len() as u64, read)
}

/// A tunnel that sends `rounds` pieces over time and reads the echo; bumps
/// `flowing` once the first echo has come back.
async fn slow_tunnel(
    proxy: std::net::SocketAddr,
    target: String,
    auth: String,
    rounds: usize,
    flowing: Arc<AtomicUsize>,
) -> (u64, u64) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let request = format!("CONNECT {target} HTTP/1.1\r\nproxy-authorization: {auth}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (mut written, mut read) = (request.len() as u64, head.len() as u64);
    let piece = vec![b't'; 10_000];
    let mut back = vec![0u8; piece.len()];
    for round in 0..rounds {
        s.write_all(&piece).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        if round == 0 {
            flowing.fetch_add(1, Ordering::SeqCst);
        }
        written += piece.len() as u64;
        read += back.len() as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    (written, read + rest.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_loses_nothing() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let spill = temp_dir("sigterm");
    let ports = format!("[{}]", echo.addr.port());
    let proxy = ProxyProcess::start(
        &db.url,
        &spill,
        &[("TOLLGATE_PROXY__EGRESS__CONNECT_PORTS", &ports)],
        true,
    )
    .await;
    let mut inflight = Vec::new();
    let flowing = Arc::new(AtomicUsize::new(0));
    for i in 0..6u64 {
        let (url, auth) = (origin.url(&format!("/bytes/{}", 3_000_000 + i)), f.basic());
        let download = slow_download(proxy.egress, url, auth, flowing.clone());
        inflight.push(tokio::spawn(download));
    }
    for _ in 0..3 {
        inflight.push(tokio::spawn(slow_tunnel(
            proxy.egress,
            echo.addr.to_string(),
            f.basic(),
            15,
            flowing.clone(),
        )));
    }
    // SIGTERM once every transfer is under way.
    eventually(
        Duration::from_secs(20),
        "all 9 transfers flowing",
        || async {
            let n = flowing.load(Ordering::SeqCst);
            holds(n == 9, n)
        },
    )
    .await;
    let signalled = Instant::now();
    let status = proxy.terminate().await;
    assert!(status.success(), "proxy exited with {status}");
    let (mut written, mut read) = (0, 0);
    for t in inflight {
        let (w, r) = t.await.unwrap();
        written += w;
        read += r;
    }
    println!("drained and exited {:?} after SIGTERM", signalled.elapsed());
    assert!(
        read > 6 * 3_000_000,
        "in-flight downloads completed during the drain: read {read}"
    );
    assert_eq!(
        std::fs::read_dir(&spill).unwrap().count(),
        0,
        "nothing spilled with the database up"
    );
    // The proxy has exited: its final flush is in.
    db.assert_usage(f.vps, read, written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_at_exit_spills_and_the_next_start_replays_exactly_once() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let relay = PgRelay::start(support::server_addr().await).await;
    let spill = temp_dir("spill-replay");
    let via_relay = relay.url_for(&db.url);
    let first = ProxyProcess::start(&via_relay, &spill, &[], true).await;

    let run = |n: u64, proxy: std::net::SocketAddr| {
        let (auth, base) = (f.basic(), origin.url(""));
        async move {
            let (mut w, mut r) = (0, 0);
            for i in 0..n {
                let ex = exchange(
                    proxy,
                    &get_request(&format!("{base}/bytes/{}", 1000 + i * 333), &auth),
                )
                .await;
                assert_eq!(ex.status, 200, "{}", ex.head);
                w += ex.written;
                r += ex.read;
            }
            (w, r)
        }
    };
    let (w1, r1) = run(10, first.egress).await;
    db.expect_usage(f.vps, r1, w1, Duration::from_secs(10))
        .await;

    relay.cut();
    let (w2, r2) = run(10, first.egress).await; // served from the directory cache
    eventually(
        Duration::from_secs(10),
        "the outage shows in metrics",
        || async {
            let (_, metrics) = support::proxy::http_get(first.admin, "/metrics")
                .await
                .unwrap();
            holds(
                metrics.contains("tollgate_database_up 0")
                    && metrics.contains("tollgate_flush_failures_total"),
                metrics,
            )
        },
    )
    .await;
    let status = first.terminate().await;
    assert!(status.success(), "{status}");
    let spilled: Vec<_> = std::fs::read_dir(&spill)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!spilled.is_empty(), "the unflushed batch was spilled");
    assert_eq!(
        db.usage(f.vps).await.2,
        (r1 + w1) as i64,
        "nothing reached the database while it was down"
    );
    let copies = temp_dir("spill-copies");
    for p in &spilled {
        std::fs::copy(p, copies.join(p.file_name().unwrap())).unwrap();
    }

    // The next start replays the spill once.
    relay.restore();
    let second = ProxyProcess::start(&via_relay, &spill, &[], true).await;
    db.expect_usage(f.vps, r1 + r2, w1 + w2, Duration::from_secs(10))
        .await;
    // The file goes once its batch has committed, a moment after the rows show.
    eventually(
        Duration::from_secs(10),
        "replayed spill files are removed",
        || async {
            let left = std::fs::read_dir(&spill).unwrap().count();
            holds(left == 0, left)
        },
    )
    .await;
    assert!(second.terminate().await.success());
    db.assert_usage(f.vps, r1 + r2, w1 + w2).await;

    // Replaying the same batch again (a copy restored by hand) changes nothing.
    for p in std::fs::read_dir(&copies).unwrap() {
        let p = p.unwrap().path();
        std::fs::copy(&p, spill.join(p.file_name().unwrap())).unwrap();
    }
    let third = ProxyProcess::start(&db.url, &spill, &[], true).await;
    // The replayed copy is removed once the ledger has skipped it.
    eventually(
        Duration::from_secs(10),
        "the spill copy replayed and removed",
        || async {
            let left = std::fs::read_dir(&spill).unwrap().count();
            holds(left == 0, left)
        },
    )
    .await;
    db.assert_usage(f.vps, r1 + r2, w1 + w2).await;
    assert!(third.terminate().await.success());
    db.assert_usage(f.vps, r1 + r2, w1 + w2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_each_way_stream_through_with_bounded_memory() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let spill = temp_dir("rss");
    let proxy = ProxyProcess::start(&db.url, &spill, &[], true).await;
    // Warm up (directory, pools, allocator) before taking the baseline.
    for _ in 0..3 {
        assert_eq!(
            exchange(
                proxy.egress,
                &get_request(&origin.url("/bytes/100000"), &f.basic())
            )
            .await
            .status,
            200
        );
    }
    let baseline = proxy.rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), proxy.pid());
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                peak.fetch_max(rss, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let proxy_url = format!("http://{}:{}@{}", f.agent, f.token, proxy.egress);
    let download = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "-x",
            &proxy_url,
        ])
        .arg(origin.url(&format!("/bytes/{SIZE}")))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&download.stdout),
        SIZE.to_string(),
        "{}",
        String::from_utf8_lossy(&download.stderr)
    );

    let dir = temp_dir("upload50");
    let file = dir.join("upload.bin");
    std::fs::write(&file, vec![0x5a; SIZE as usize]).unwrap();
    let upload = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-x",
            &proxy_url,
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(origin.url("/echo/upload"))
        .output()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&upload.stdout).unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(SIZE));
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();

    let growth_mib = (peak.load(Ordering::SeqCst).saturating_sub(baseline)) as f64 / 1024.0;
    println!(
        "proxy RSS baseline {} KiB, peak growth {growth_mib:.1} MiB while moving 100 MiB",
        baseline
    );
    assert!(
        growth_mib < 16.0,
        "proxy RSS grew {growth_mib:.1} MiB: bodies are being buffered"
    );
    eventually(
        Duration::from_secs(10),
        format!("both directions counted: rx and tx >= {SIZE}"),
        || async {
            let (rx, tx, _) = db.usage(f.vps).await;
            holds(rx as u64 >= SIZE && tx as u64 >= SIZE, (rx, tx))
        },
    )
    .await;
    assert!(proxy.terminate().await.success());
}
