//! The monitor against real PostgreSQL, real kernel cgroup counters, a real
//! Prometheus, and an HTTP server speaking the in-VM agent's `/metrics` JSON.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use uuid::Uuid;

use support::monitor::{monitor_config, Cgroup, CounterFiles, TestMonitor};
use support::proxy::{free_port, temp_dir};
use support::service::{require_tool, Service};
use support::wait::{eventually, holds, PROMPTLY};
use support::TestDb;
use tollgate_core::billing::Period;
use tollgate_core::config::SourceConfig;
use tollgate_core::db::samples::{self, SampleTarget};
use tollgate_monitor::accounting::{Cpu, Reading};
use tollgate_monitor::cycle::{self, Sources, Tracker};
use tollgate_monitor::sources::{FailureReason, SampleError, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    cpu_ms: i64,
    memory_mb_seconds: i64,
}

async fn recorded(db: &TestDb, vps: Uuid) -> Recorded {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT cpu_used_ms, memory_used_mb_seconds FROM vps_usage_periods WHERE vps_id = $1 AND period_start = $2",
    )
    .bind(vps)
    .bind(Period::current().start())
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    let (cpu_ms, memory_mb_seconds) = row.unwrap_or((0, 0));
    Recorded {
        cpu_ms,
        memory_mb_seconds,
    }
}

/// (sampled_at, cpu_total_us, memory_bytes) of the VPS's last sample.
async fn last_sample(db: &TestDb, vps: Uuid) -> Option<(DateTime<Utc>, Option<i64>, Option<i64>)> {
    sqlx::query_as(
        "SELECT sampled_at, cpu_total_us, memory_bytes FROM vps_sample_state WHERE vps_id = $1",
    )
    .bind(vps)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// Wait for a sample of `vps` taken after `after`.
async fn sample_after(
    db: &TestDb,
    vps: Uuid,
    after: DateTime<Utc>,
    within: Duration,
) -> DateTime<Utc> {
    eventually(
        within,
        format!("a sample of {vps} after {after}"),
        || async {
            match last_sample(db, vps).await {
                Some((at, _, _)) if at > after => Ok(at),
                other => Err(other),
            }
        },
    )
    .await
}

/// The first sample (baseline) of `vps`.
async fn first_sample(db: &TestDb, vps: Uuid) -> DateTime<Utc> {
    sample_after(db, vps, DateTime::<Utc>::MIN_UTC, Duration::from_secs(10)).await
}

/// A monitor sampling `provider` VPSes from `source` every `interval`.
async fn monitor_with(
    db: &TestDb,
    interval: Duration,
    provider: &str,
    source: SourceConfig,
) -> TestMonitor {
    let mut config = monitor_config(&db.url, interval);
    config.monitor.providers.insert(provider.into(), source);
    TestMonitor::start(config).await
}

async fn wait_recorded(
    db: &TestDb,
    vps: Uuid,
    want: impl Fn(Recorded) -> bool,
    within: Duration,
) -> Recorded {
    eventually(
        within,
        format!("the wanted usage recorded for {vps}"),
        || async {
            let r = recorded(db, vps).await;
            holds(want(r), r)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_cpu_matches_the_kernels_own_counter() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let mut cgroup = Cgroup::create(f.vps);
    let monitor = monitor_with(&db, Duration::from_millis(250), "k8s", Cgroup::source()).await;
    // Baseline with the cgroup empty: its counter stands still.
    let baseline_at = first_sample(&db, f.vps).await;
    let before_ns = cgroup.cpu_ns();

    cgroup.spawn("while :; do :; done");
    // Run the busy loop until the kernel has counted 1.2 s of its CPU (about as
    // long on an idle machine; longer when the cores are shared).
    eventually(
        Duration::from_secs(60),
        "the busy loop used 1.2 s of CPU",
        || async {
            let used_ns = cgroup.cpu_ns() - before_ns;
            holds(used_ns >= 1_200_000_000, used_ns)
        },
    )
    .await;
    cgroup.kill_all();
    let stopped = Utc::now();
    let kernel_ms = (cgroup.cpu_ns() - before_ns) as f64 / 1e6;
    sample_after(
        &db,
        f.vps,
        stopped + chrono::Duration::milliseconds(100),
        Duration::from_secs(5),
    )
    .await;
    let got = recorded(&db, f.vps).await;
    let error = (got.cpu_ms as f64 - kernel_ms).abs() / kernel_ms;
    println!("kernel counted {kernel_ms:.1} ms of CPU, the monitor recorded {} ms ({:.2}% off), baseline at {baseline_at}", got.cpu_ms, error * 100.0);
    assert!(kernel_ms > 1000.0, "the busy loop ran: {kernel_ms} ms");
    assert!(
        error <= 0.05,
        "recorded {} ms vs the kernel's {kernel_ms:.1} ms",
        got.cpu_ms
    );
    // The VPS's own cumulative gauge follows.
    let gauge: Option<i64> = sqlx::query_scalar("SELECT cpu_used_ms FROM vpses WHERE id = $1")
        .bind(f.vps)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(gauge, Some(got.cpu_ms));
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_memory_integrates_to_the_expected_mb_seconds() {
    let db = TestDb::new().await;
    let f = db.fixture("sprites").await;
    let mut cgroup = Cgroup::create(f.vps);
    let monitor = monitor_with(&db, Duration::from_millis(100), "sprites", Cgroup::source()).await;
    first_sample(&db, f.vps).await;

    // A process holding 128 MiB it has written to (so the pages are really charged).
    cgroup.spawn(
        "exec python3 -c 'import time; b = bytearray(b\"\\x01\") * (128 << 20); time.sleep(3)'",
    );
    // Our own readings of the kernel's gauge every 10 ms, to integrate independently.
    let mut readings: Vec<(DateTime<Utc>, u64)> = Vec::new();
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        readings.push((Utc::now(), cgroup.memory_bytes()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cgroup.kill_all();
    // Let the monitor see the cgroup empty again, so its integral covers the whole
    // lifetime of the allocation, as ours does.
    let killed = Utc::now();
    sample_after(
        &db,
        f.vps,
        killed + chrono::Duration::milliseconds(150),
        Duration::from_secs(5),
    )
    .await;
    monitor.stop().await;
    let got = recorded(&db, f.vps).await;
    // Our integral over the allocation's lifetime vs the monitor's over its samples
    // (outside that lifetime the cgroup is empty).
    let mut ours = 0.0;
    for w in readings.windows(2) {
        let dt = (w[1].0 - w[0].0).num_microseconds().unwrap() as f64 / 1e6;
        ours += (w[0].1 + w[1].1) as f64 / 2.0 / (1 << 20) as f64 * dt;
    }
    let error = (got.memory_mb_seconds as f64 - ours).abs() / ours;
    println!(
        "memory: ours {ours:.1} MB-s, monitor {} MB-s ({:.1}% off)",
        got.memory_mb_seconds,
        error * 100.0
    );
    assert!(ours > 128.0 * 2.0, "the allocation was held: {ours} MB-s");
    assert!(
        error <= 0.10,
        "monitor {} MB-s vs {ours:.1} MB-s",
        got.memory_mb_seconds
    );
}

/// A `/metrics` exporter whose values the test sets.
struct Exporter {
    port: u16,
    values: Arc<Mutex<BTreeMap<&'static str, f64>>>,
}

impl Exporter {
    async fn start(vm: &str) -> Exporter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let values = Arc::new(Mutex::new(BTreeMap::from([("cpu", 0.0), ("memory", 0.0)])));
        let (v, vm) = (values.clone(), vm.to_owned());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (v, vm) = (v.clone(), vm.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let values = v.lock().unwrap().clone();
                        let body = format!(
                            "# TYPE test_cpu_seconds_total counter\ntest_cpu_seconds_total{{vm=\"{vm}\"}} {}\n\
                             # TYPE test_memory_bytes gauge\ntest_memory_bytes{{vm=\"{vm}\"}} {}\n",
                            values["cpu"], values["memory"]
                        );
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Exporter { port, values }
    }

    fn set(&self, cpu_seconds: f64, memory: f64) {
        let mut v = self.values.lock().unwrap();
        v.insert("cpu", cpu_seconds);
        v.insert("memory", memory);
    }
}

/// What Prometheus currently answers for `query`.
async fn prom_value(port: u16, query: &str) -> Option<f64> {
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        tollgate_monitor::http::encode_query_value(query)
    );
    let (_, body) = tollgate_monitor::http::get(&url, &[]).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_deltas_match_the_exporters_counter_deltas() {
    let Some(prometheus) = require_tool("prometheus", "apt-get install prometheus") else {
        return;
    };
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let vm: String = sqlx::query_scalar("SELECT provider_vm_id FROM vpses WHERE id = $1")
        .bind(f.vps)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let exporter = Exporter::start(&vm).await;
    exporter.set(100.0, 256.0 * (1 << 20) as f64);
    let dir = temp_dir("prometheus");
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            exporter.port
        ),
    )
    .unwrap();
    let mut prom = Service::start(
        "prometheus",
        prometheus.to_str().unwrap(),
        &[
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &[],
        &dir,
    );
    let cpu_query = "test_cpu_seconds_total{vm=\"{vm_id}\"}";
    let rendered = cpu_query.replace("{vm_id}", &vm);
    eventually(
        Duration::from_secs(30),
        "Prometheus scrapes the exporter's 100 s of CPU",
        || {
            prom.assert_running();
            let log = prom.log();
            let rendered = &rendered;
            async move {
                let value = prom_value(prom_port, rendered).await;
                holds(value == Some(100.0), (value, log))
                    .map_err(|(value, log)| format!("{value:?}; Prometheus log:\n{log}"))
            }
        },
    )
    .await;

    let mut config = monitor_config(&db.url, Duration::from_millis(500));
    config.monitor.providers.insert(
        "k8s".into(),
        SourceConfig::Prometheus {
            url: format!("http://127.0.0.1:{prom_port}"),
            cpu_query: cpu_query.into(),
            memory_query: "test_memory_bytes{vm=\"{vm_id}\"}".into(),
            vps_label: None,
            vps_label_value: "{vm_id}".into(),
        },
    );
    let monitor = TestMonitor::start(config).await;
    let (first_at, cpu_us, mem) = {
        first_sample(&db, f.vps).await;
        last_sample(&db, f.vps).await.unwrap()
    };
    assert_eq!(
        (cpu_us, mem),
        (Some(100_000_000), Some(256 << 20)),
        "baseline from Prometheus"
    );

    // The counter moves by 7.25 s: exactly 7250 ms recorded.
    exporter.set(107.25, 256.0 * (1 << 20) as f64);
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 7250, Duration::from_secs(15)).await;
    // A reset (the container restarted) counts the new value.
    exporter.set(2.0, 256.0 * (1 << 20) as f64);
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 9250, Duration::from_secs(15)).await;
    // Three more cycles sample the unchanged counter; then nothing more is counted.
    monitor
        .wait_cycles(monitor.status.cycles() + 3, Duration::from_secs(15))
        .await;
    monitor.stop().await;
    let got = recorded(&db, f.vps).await;
    assert_eq!(got.cpu_ms, 9250, "nothing counted twice afterwards");
    // Constant 256 MiB between the first and last sample.
    let (last_at, _, _) = last_sample(&db, f.vps).await.unwrap();
    let expected = 256.0 * (last_at - first_at).num_milliseconds() as f64 / 1000.0;
    assert!(
        (got.memory_mb_seconds as f64 - expected).abs() <= expected * 0.01 + 1.0,
        "{} vs {expected}",
        got.memory_mb_seconds
    );
}

#[tokio::test]
async fn the_in_vm_agent_api_is_a_source_with_its_token() {
    let db = TestDb::new().await;
    let good = db.fixture("sprites").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    s.lock().unwrap().push(auth.clone());
                    async move {
                        let response = if auth.as_deref() == Some("Bearer agent-secret") {
                            hyper::Response::new(Full::new(Bytes::from(
                                r#"{"cpu_usage_percent": 50.0, "memory_used_bytes": 1073741824, "memory_total_bytes": 4294967296,
                                    "disk_used_bytes": 3221225472, "disk_total_bytes": 85899345920,
                                    "load_average": [0.5, 0.3, 0.2], "timestamp": "2024-01-01T00:00:00Z"}"#,
                            )))
                        } else {
                            hyper::Response::builder()
                                .status(401)
                                .body(Full::new(Bytes::from("unauthorized")))
                                .unwrap()
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    // A second VPS on another provider whose configured token is wrong.
    let wrong_user = db.user("wrong@example.com", Some(good.plan)).await;
    let wrong_vps = db.vps(wrong_user, "acme", "127.0.0.1", "running").await;
    let agent = |token: &str| SourceConfig::Agent {
        url: format!("http://{{address}}:{port}/metrics"),
        token_header: "Authorization".into(),
        token: Some(token.into()),
    };
    let mut config = monitor_config(&db.url, Duration::from_millis(300));
    config
        .monitor
        .providers
        .insert("sprites".into(), agent("Bearer agent-secret"));
    config
        .monitor
        .providers
        .insert("acme".into(), agent("Bearer wrong"));
    let monitor = TestMonitor::start(config).await;
    let first = first_sample(&db, good.vps).await;
    let r = wait_recorded(&db, good.vps, |r| r.cpu_ms > 0, Duration::from_secs(10)).await;
    monitor.stop().await;
    let (last, _, mem) = last_sample(&db, good.vps).await.unwrap();
    let seconds = (last - first).num_milliseconds() as f64 / 1000.0;
    let r2 = recorded(&db, good.vps).await;
    // 50% of a 1-core VPS: 500 CPU-ms per second; 1 GiB: 1024 MB-s per second.
    assert!(
        (r2.cpu_ms as f64 - 500.0 * seconds).abs() <= 5.0 + 0.01 * 500.0 * seconds,
        "{r2:?} over {seconds} s"
    );
    assert!(
        (r2.memory_mb_seconds as f64 - 1024.0 * seconds).abs() <= 2.0 + 0.01 * 1024.0 * seconds,
        "{r2:?} over {seconds} s"
    );
    assert!(r.cpu_ms > 0 && mem == Some(1 << 30));
    let storage: i64 = sqlx::query_scalar("SELECT storage_used_bytes FROM vpses WHERE id = $1")
        .bind(good.vps)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        storage,
        3 << 30,
        "disk_used_bytes becomes the storage gauge"
    );
    // The wrong token never produced a sample; the agent saw it.
    assert!(last_sample(&db, wrong_vps).await.is_none());
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|a| a.as_deref() == Some("Bearer wrong")));
}

#[tokio::test]
async fn restarts_neither_lose_nor_double_usage_and_resets_count_the_new_value() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let files = CounterFiles::new();
    files.set(f.vps, 1_000_000_000, 64 << 20);
    let mut config = monitor_config(&db.url, Duration::from_millis(200));
    config
        .monitor
        .providers
        .insert("k8s".into(), files.source());

    let first = TestMonitor::start(config.clone()).await;
    first_sample(&db, f.vps).await;
    files.set(f.vps, 3_000_000_000, 64 << 20); // +2 s
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 2000, Duration::from_secs(10)).await;
    first.stop().await;

    // While no monitor runs, the VPS keeps using CPU.
    files.set(f.vps, 5_500_000_000, 64 << 20); // +2.5 s
    let second = TestMonitor::start(config.clone()).await;
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 4500, Duration::from_secs(10)).await;
    // Killed abruptly between samples, then restarted: still exact.
    second.kill().await;
    files.set(f.vps, 6_000_000_000, 64 << 20); // +0.5 s
    let third = TestMonitor::start(config.clone()).await;
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 5000, Duration::from_secs(10)).await;
    // The VPS rebooted: its counter restarted from zero and now reads 0.75 s.
    files.set(f.vps, 750_000_000, 64 << 20);
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 5750, Duration::from_secs(10)).await;
    third
        .wait_cycles(third.status.cycles() + 3, Duration::from_secs(5))
        .await;
    third.stop().await;
    assert_eq!(
        recorded(&db, f.vps).await.cpu_ms,
        5750,
        "nothing counted twice"
    );
}

#[tokio::test]
async fn fixed_allocation_providers_are_never_sampled_and_unknown_ones_are() {
    let db = TestDb::new().await;
    let fly = db.fixture("fly").await;
    let hetzner = db.fixture("Hetzner").await;
    let unknown = db.fixture("acme-cloud").await;
    let files = CounterFiles::new();
    for vps in [fly.vps, hetzner.vps, unknown.vps] {
        files.set(vps, 1_000_000, 1 << 20);
    }
    let mut config = monitor_config(&db.url, Duration::from_millis(200));
    config.monitor.default_source = Some(files.source());
    let monitor = TestMonitor::start(config).await;
    first_sample(&db, unknown.vps).await;
    monitor.wait_cycles(3, Duration::from_secs(10)).await;
    monitor.stop().await;
    assert!(
        last_sample(&db, fly.vps).await.is_none(),
        "fly is never sampled for CPU/memory"
    );
    assert!(
        last_sample(&db, hetzner.vps).await.is_none(),
        "hetzner is never sampled for CPU/memory"
    );
    let gauges: (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT cpu_used_ms, memory_used_mb_seconds FROM vpses WHERE id = $1")
            .bind(fly.vps)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        gauges,
        (None, None),
        "fixed-resource VPSes keep NULL CPU/memory gauges"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_monitor_leads_and_a_standby_takes_over_when_it_dies() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let files = CounterFiles::new();
    files.set(f.vps, 0, 0);
    let interval = Duration::from_millis(500);
    let mut config = monitor_config(&db.url, interval);
    config
        .monitor
        .providers
        .insert("k8s".into(), files.source());
    let a = TestMonitor::start(config.clone()).await;
    let b = TestMonitor::start(config.clone()).await;
    eventually(Duration::from_secs(10), "one monitor leads", || async {
        let leading = (a.status.is_leader(), b.status.is_leader());
        holds(leading.0 || leading.1, leading)
    })
    .await;
    // Over the leader's next four cycles, exactly one leads and only it samples.
    eventually(
        Duration::from_secs(30),
        "four cycles with exactly one leader",
        || async {
            let leading = (a.status.is_leader(), b.status.is_leader());
            assert!(leading.0 ^ leading.1, "exactly one leader: {leading:?}");
            let cycles = if leading.0 { &a } else { &b }.status.cycles();
            holds(cycles >= 4, cycles)
        },
    )
    .await;
    let (leader, standby) = if a.status.is_leader() { (a, b) } else { (b, a) };
    assert!(leader.status.cycles() > 0);
    assert_eq!(standby.status.cycles(), 0, "the standby never sampled");
    // Standby answers /readyz: it is healthy, just not leading.
    let (status, _) = support::proxy::http_get(standby.admin, "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 200);

    leader.kill().await;
    let killed = Instant::now();
    eventually(PROMPTLY, "the standby takes over", || async {
        holds(standby.status.is_leader(), "still standing by")
    })
    .await;
    println!(
        "standby took over {:?} after the leader died (interval {interval:?})",
        killed.elapsed()
    );
    standby.wait_cycles(1, Duration::from_secs(5)).await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_source_times_out_without_stalling_the_cycle() {
    let db = TestDb::new().await;
    let fast = db.fixture("k8s").await;
    let slow = db.fixture("acme").await;
    // An "agent" that accepts connections and never answers.
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let files = CounterFiles::new();
    files.set(fast.vps, 0, 1 << 20);
    let mut config = monitor_config(&db.url, Duration::from_millis(600));
    config.monitor.sample_timeout = Duration::from_millis(200);
    config
        .monitor
        .providers
        .insert("k8s".into(), files.source());
    config.monitor.providers.insert(
        "acme".into(),
        SourceConfig::Agent {
            url: format!("http://{{address}}:{hang_port}/metrics"),
            token_header: "Authorization".into(),
            token: None,
        },
    );
    let monitor = TestMonitor::start(config).await;
    monitor.wait_cycles(1, Duration::from_secs(10)).await;
    let started = Instant::now();
    let cycles = monitor.status.cycles();
    monitor
        .wait_cycles(cycles + 3, Duration::from_secs(30))
        .await;
    let per_cycle = started.elapsed() / 3;
    println!("cycles took {per_cycle:?} each with a hanging source (interval 600 ms)");
    // A cycle stalled on the hanging source would never end; one that waits out
    // the 200 ms sample timeout keeps to its interval, give or take a loaded machine.
    assert!(
        per_cycle < Duration::from_secs(3),
        "cycles took {per_cycle:?} each with a hanging source"
    );
    assert!(
        last_sample(&db, fast.vps).await.is_some(),
        "the healthy VPS was sampled"
    );
    assert!(
        last_sample(&db, slow.vps).await.is_none(),
        "the hanging one never produced a sample"
    );
    let (_, metrics) = support::proxy::http_get(monitor.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_monitor_samples_total{source=\"agent\",outcome=\"timeout\"}"),
        "{metrics}"
    );
    monitor.stop().await;
}

#[tokio::test]
async fn budget_and_plan_changes_are_decided_at_once() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    // Over a 1 KiB limit with overage on sale at 5 cents/GiB and no budget.
    db.update_plan(
        f.plan,
        "max_bandwidth_bytes = 1024, overage_bandwidth_cost_per_gb_cents = 5",
    )
    .await;
    sqlx::query("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes) VALUES ($1, $2, 4096)")
        .bind(f.vps)
        .bind(Period::current().start())
        .execute(&db.pool)
        .await
        .unwrap();
    // Cycles far apart: only the notification can explain a quick change.
    let monitor = TestMonitor::start(monitor_config(&db.url, Duration::from_secs(60))).await;
    monitor.wait_cycles(1, Duration::from_secs(10)).await;
    let reason = |db: &TestDb| {
        let user = f.user;
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT reason FROM usage_decisions WHERE user_id = $1",
            )
            .bind(user)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(reason(&db).await.as_deref(), Some("budget_exhausted"));
    let changed = Instant::now();
    db.set_budget(f.user, 1).await;
    eventually(PROMPTLY, "the budget raise decided (allowed)", || async {
        let r = reason(&db).await;
        holds(r.is_none(), r)
    })
    .await;
    println!(
        "budget raise decided {:?} after the change",
        changed.elapsed()
    );
    // A plan change (no overage on sale any more) blocks again at once.
    db.update_plan(f.plan, "overage_bandwidth_cost_per_gb_cents = 0")
        .await;
    let changed = Instant::now();
    eventually(PROMPTLY, "the plan change decided (bandwidth)", || async {
        let r = reason(&db).await;
        holds(r.as_deref() == Some("bandwidth"), r)
    })
    .await;
    println!(
        "plan change decided {:?} after the change",
        changed.elapsed()
    );
    assert_eq!(
        monitor.status.cycles(),
        1,
        "decided by notification, not by a cycle"
    );
    monitor.stop().await;
}

/// A user with a running `provider` VPS, with a chosen id (the sweep visits ids
/// in order: ids near the top are swept last) on `plan`.
async fn user_with_id(db: &TestDb, id: Uuid, plan: Uuid, provider: &str) -> Uuid {
    sqlx::query("INSERT INTO users (id, email, plan_id) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(format!("{id}@example.com"))
        .bind(plan)
        .execute(&db.pool)
        .await
        .unwrap();
    db.vps(id, provider, "127.0.0.1", "running").await
}

/// When `user`'s stored decision was read, and its reason.
async fn decided(db: &TestDb, user: Uuid) -> Option<(DateTime<Utc>, Option<String>)> {
    sqlx::query_as("SELECT decided_at, reason FROM usage_decisions WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

/// Waits until every transaction that began before this call has ended, on
/// the whole server: the oldest running transaction is what the monitor's
/// usage watermark follows.
async fn settle_transactions(db: &TestDb) {
    let (now,): (i64,) = sqlx::query_as("SELECT txid_current()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "older transactions on the server end",
        || async {
            let (xmin,): (i64,) =
                sqlx::query_as("SELECT txid_snapshot_xmin(txid_current_snapshot())")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            holds(xmin > now, xmin)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_changed_users_are_decided_between_sweeps() {
    let db = TestDb::new().await;
    // A 1,000-byte bandwidth limit with no overage, and no CPU allowance at
    // all: every user on it is "near a limit", so each decision the monitor
    // makes is stored and shows in `decided_at`.
    let plan = db.plan(&format!("p-{}", Uuid::new_v4()), 1000, 0).await;
    db.update_plan(plan, "max_cpu_ms = 0").await;
    // Ids in the last share of the sweep: visited last.
    let top = |n: u128| Uuid::from_u128(u128::MAX - n);
    let (flushed, budgeted, untouched) = (top(1), top(2), top(3));
    let flushed_vps = user_with_id(&db, flushed, plan, "fly").await;
    user_with_id(&db, budgeted, plan, "fly").await;
    user_with_id(&db, untouched, plan, "fly").await;

    // 200 ms cycles, a sweep every 20 s: 100 shares, these users' share is
    // the last (cycle 99, counting the first as 0).
    const SWEEP_SHARE: u64 = 99;
    let mut config = monitor_config(&db.url, Duration::from_millis(200));
    config.monitor.full_sweep_interval = Duration::from_secs(20);
    let monitor = TestMonitor::start(config).await;
    // A new leader decides everyone in its first cycle.
    monitor.wait_cycles(1, Duration::from_secs(10)).await;
    let first = |user| {
        let db = &db;
        async move { decided(db, user).await.expect("decided in the first cycle") }
    };
    first(untouched).await;
    let (budgeted_at, _) = first(budgeted).await;

    // A proxy flushes bandwidth past the limit: decided promptly, by the monitor.
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes, bandwidth_tx_bytes)
         VALUES ($1, $2, 5000, 5000, 0)",
    )
    .bind(flushed_vps)
    .bind(Period::current().start())
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(PROMPTLY, "the flushed user decided (blocked)", || async {
        let d = decided(&db, flushed).await;
        holds(
            d.as_ref().and_then(|d| d.1.as_deref()) == Some("bandwidth"),
            d,
        )
    })
    .await;
    let cycles = monitor.status.cycles();
    assert!(
        cycles < SWEEP_SHARE,
        "decided by the change, not the sweep (cycle {cycles})"
    );

    // A budget change is decided at once.
    db.set_budget(budgeted, 100).await;
    eventually(PROMPTLY, "the budget change decided", || async {
        let d = decided(&db, budgeted).await;
        holds(d.as_ref().is_some_and(|d| d.0 > budgeted_at), d)
    })
    .await;

    // The usage watermark is the server's oldest running transaction, and
    // other tests' transactions on this server can hold it behind this
    // test's writes, which then look new again (a few extra decisions, by
    // design). Wait until no transaction older than them runs, and for two
    // cycles past that, before taking the untouched user's last decision.
    settle_transactions(&db).await;
    let settled = monitor.status.cycles();
    monitor
        .wait_cycles(settled + 2, Duration::from_secs(20))
        .await;
    let (untouched_at, _) = decided(&db, untouched).await.unwrap();

    // Ten more cycles, none of them the sweep's turn for these users: the
    // untouched user was not decided again.
    monitor
        .wait_cycles(settled + 12, Duration::from_secs(20))
        .await;
    let cycles = monitor.status.cycles();
    assert!(
        cycles < SWEEP_SHARE,
        "still before the sweep's share (cycle {cycles})"
    );
    assert_eq!(
        decided(&db, untouched).await.unwrap().0,
        untouched_at,
        "an unchanged user is not decided again between sweeps"
    );
    // The sweep reaches it in its share.
    eventually(
        Duration::from_secs(60),
        "the sweep decides the untouched user",
        || async {
            let d = decided(&db, untouched).await;
            holds(d.as_ref().is_some_and(|d| d.0 > untouched_at), d)
        },
    )
    .await;
    let cycles = monitor.status.cycles();
    assert!(
        cycles >= SWEEP_SHARE,
        "swept in its share, not before (after {cycles} cycles)"
    );
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_samples_are_written_in_their_turn_and_a_restart_loses_nothing() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let files = CounterFiles::new();
    files.set(f.vps, 1_000_000_000, 64 << 20);
    let mut config = monitor_config(&db.url, Duration::from_millis(200));
    // Far from every limit: written once per 2 s (one share in ten).
    config.monitor.write_interval = Duration::from_secs(2);
    config
        .monitor
        .providers
        .insert("k8s".into(), files.source());

    let first = TestMonitor::start(config.clone()).await;
    // A new VPS's baseline is written at once.
    let baseline = first_sample(&db, f.vps).await;
    files.set(f.vps, 3_000_000_000, 64 << 20); // +2 s
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 2000, Duration::from_secs(10)).await;
    let (written_at, _, _) = last_sample(&db, f.vps).await.unwrap();
    assert!(written_at > baseline);
    // Between turns the monitor holds what it sampled.
    files.set(f.vps, 4_000_000_000, 64 << 20); // +1 s, held
    first
        .wait_cycles(first.status.cycles() + 2, Duration::from_secs(5))
        .await;
    // Killed while holding samples: the next monitor counts from the stored state.
    first.kill().await;
    files.set(f.vps, 4_500_000_000, 64 << 20); // +0.5 s
    let second = TestMonitor::start(config).await;
    wait_recorded(&db, f.vps, |r| r.cpu_ms == 3500, Duration::from_secs(15)).await;
    second
        .wait_cycles(second.status.cycles() + 12, Duration::from_secs(10))
        .await;
    second.stop().await;
    let got = recorded(&db, f.vps).await;
    assert_eq!(got.cpu_ms, 3500, "nothing lost or counted twice");
    // 64 MiB throughout, from the baseline to the last written sample (each
    // interval is integrated in whole milliseconds).
    let (last_at, _, _) = last_sample(&db, f.vps).await.unwrap();
    let expected = 64.0 * (last_at - baseline).num_milliseconds() as f64 / 1000.0;
    assert!(
        (got.memory_mb_seconds as f64 - expected).abs() <= expected * 0.01 + 1.0,
        "{} MB-s vs {expected}",
        got.memory_mb_seconds
    );
}

/// A `/metrics` exporter serving fixed CPU and memory series for several VMs.
async fn fleet_exporter(series: Vec<(String, f64, f64)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut body = String::from("# TYPE test_cpu_seconds_total counter\n");
    for (vm, cpu, _) in &series {
        body += &format!("test_cpu_seconds_total{{vm=\"{vm}\",container=\"a\"}} {cpu}\n");
        // A second container of the same VM: fleet and per-VPS queries sum both.
        body += &format!("test_cpu_seconds_total{{vm=\"{vm}\",container=\"b\"}} 1\n");
    }
    body += "# TYPE test_memory_bytes gauge\n";
    for (vm, _, memory) in &series {
        body += &format!("test_memory_bytes{{vm=\"{vm}\",container=\"a\"}} {memory}\n");
    }
    let body = Bytes::from(body);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fleet_query_gives_the_per_vps_figures_and_a_missing_series_fails() {
    let Some(prometheus) = require_tool("prometheus", "apt-get install prometheus") else {
        return;
    };
    let db = TestDb::new().await;
    let plan = db.plan("fleet", 1 << 40, 0).await;
    let user = db.user("fleet@example.com", Some(plan)).await;
    let mut vpses = Vec::new();
    for _ in 0..3 {
        vpses.push(db.vps(user, "k8s", "127.0.0.1", "running").await);
    }
    let targets: Vec<SampleTarget> = samples::running_targets(&db.pool).await.unwrap();
    assert_eq!(targets.len(), 3);
    let vm = |i: usize| targets[i].vm_id.clone().unwrap();
    // The third VPS has no series; another VM that is no VPS of ours does.
    let exporter = fleet_exporter(vec![
        (vm(0), 12.5, 100.0 * (1 << 20) as f64),
        (vm(1), 3.25, 7.0 * (1 << 20) as f64),
        ("someone-else".into(), 99.0, 1.0),
    ])
    .await;
    let dir = temp_dir("prometheus-fleet");
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: ['127.0.0.1:{exporter}']\n"
        ),
    )
    .unwrap();
    let mut prom = Service::start(
        "prometheus",
        prometheus.to_str().unwrap(),
        &[
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &[],
        &dir,
    );
    eventually(
        Duration::from_secs(30),
        "Prometheus scrapes the exporter",
        || {
            prom.assert_running();
            async move {
                let n = prom_value(prom_port, "count(test_memory_bytes)").await;
                holds(n == Some(3.0), n)
            }
        },
    )
    .await;

    let url = format!("http://127.0.0.1:{prom_port}");
    let fleet = SourceConfig::Prometheus {
        url: url.clone(),
        cpu_query: "sum by (vm) (test_cpu_seconds_total)".into(),
        memory_query: "sum by (vm) (test_memory_bytes)".into(),
        vps_label: Some("vm".into()),
        vps_label_value: "{vm_id}".into(),
    };
    let per_vps = SourceConfig::Prometheus {
        url,
        cpu_query: "sum(test_cpu_seconds_total{vm=\"{vm_id}\"})".into(),
        memory_query: "sum(test_memory_bytes{vm=\"{vm_id}\"})".into(),
        vps_label: None,
        vps_label_value: "{vm_id}".into(),
    };
    let timeout = Duration::from_secs(5);
    let (batched, batched_queries) = Source::new(fleet.clone())
        .sample_all(&targets, 4, timeout, None)
        .await;
    let per_vps = Source::new(per_vps);
    assert!(
        per_vps.prefetch(timeout).await.is_none(),
        "templates need the VPS"
    );
    let (single, single_queries) = per_vps.sample_all(&targets, 4, timeout, None).await;
    assert_eq!((batched_queries, single_queries), (2, 6));
    let figures = |r: &Result<Reading, SampleError>| {
        r.as_ref()
            .map(|r| (r.cpu, r.memory_bytes))
            .map_err(|e| (e.reason, e.retryable))
    };
    for i in 0..2 {
        assert_eq!(figures(&batched[i]), figures(&single[i]), "VPS {i}");
    }
    assert_eq!(
        figures(&batched[0]),
        Ok((Some(Cpu::CumulativeUs(13_500_000)), Some(100 << 20)))
    );
    assert_eq!(
        figures(&batched[1]),
        Ok((Some(Cpu::CumulativeUs(4_250_000)), Some(7 << 20)))
    );
    // No series is a failed sample, never zero usage.
    assert_eq!(figures(&batched[2]), Err((FailureReason::NotFound, true)));
    assert!(single[2].is_err());

    // In a cycle: two VPSes sampled, the third counted as a failure and never written.
    tollgate_core::telemetry::metrics_handle();
    let labels = [
        ("provider", "k8s"),
        ("source", "prometheus"),
        ("reason", "not_found"),
    ];
    let before = support::counter("tollgate_monitor_sample_failures_total", &labels);
    let mut config = monitor_config(&db.url, Duration::from_secs(15));
    config.monitor.providers.insert("k8s".into(), fleet);
    let sources = Sources::from_config(&config.monitor);
    let report = cycle::run_cycle(
        &db.pool,
        &config.monitor,
        &sources,
        "monitor-test",
        &mut Tracker::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.sampled,
            report.failed,
            report.queries,
            report.written
        ),
        (2, 1, 2, 2)
    );
    assert!(support::counter("tollgate_monitor_sample_failures_total", &labels) > before);
    let missing = targets[2].vps_id;
    assert!(last_sample(&db, missing).await.is_none());
    assert_eq!(
        last_sample(&db, targets[0].vps_id)
            .await
            .map(|s| (s.1, s.2)),
        Some((Some(13_500_000), Some(100 << 20)))
    );
    drop(vpses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_to_a_vps_the_monitor_also_writes_is_decided_promptly() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    // Far from the bandwidth limit until a proxy flushes past it.
    db.update_plan(f.plan, "max_bandwidth_bytes = 1000000")
        .await;
    let files = CounterFiles::new();
    files.set(f.vps, 1_000_000_000, 64 << 20);
    let mut config = monitor_config(&db.url, Duration::from_millis(200));
    config
        .monitor
        .providers
        .insert("k8s".into(), files.source());
    let monitor = TestMonitor::start(config).await;
    // Memory use is written every cycle (64 MiB integrates to MB-seconds), and
    // the user is decided from what the monitor knows of them.
    wait_recorded(
        &db,
        f.vps,
        |r| r.memory_mb_seconds > 64,
        Duration::from_secs(10),
    )
    .await;
    monitor
        .wait_cycles(monitor.status.cycles() + 3, Duration::from_secs(10))
        .await;
    assert_eq!(decided(&db, f.user).await.and_then(|d| d.1), None);
    // A proxy adds bandwidth to the same usage row the monitor keeps writing.
    sqlx::query(
        "UPDATE vps_usage_periods SET bandwidth_bytes = bandwidth_bytes + 2000000,
             bandwidth_rx_bytes = bandwidth_rx_bytes + 2000000
         WHERE vps_id = $1 AND period_start = $2",
    )
    .bind(f.vps)
    .bind(Period::current().start())
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(
        PROMPTLY,
        "the flush decided (blocked on bandwidth)",
        || async {
            let d = decided(&db, f.user).await;
            holds(
                d.as_ref().and_then(|d| d.1.as_deref()) == Some("bandwidth"),
                d,
            )
        },
    )
    .await;
    monitor.stop().await;
}
