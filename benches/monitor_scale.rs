//! The monitor at fleet size (SPEC §7: 100,000 users and 100,000 sampled VPSes,
//! under 2 s of work per cycle), against a real PostgreSQL and a real
//! Prometheus.
//!
//! Run: `cargo bench --bench monitor_scale` (`-- --vpses 100000 --rounds 12
//! --spacing 5` are the defaults; `--write-interval SECONDS` overrides
//! `monitor.write_interval`).
//!
//! 1. A fresh database on the server `tollgate dev` and the tests use
//!    (`tollgate_monitor_bench_<unix time>`), migrated, seeded with one user
//!    per VPS and `--vpses` running `k8s` VPSes.
//! 2. An exporter on loopback serving one CPU and one memory series per VPS in
//!    Prometheus' text format, the CPU counters growing on every scrape.
//! 3. Prometheus (the `prometheus` binary on `PATH`, e.g. Debian's package)
//!    scraping it every `--spacing` seconds, with a temporary config and data
//!    directory, on a loopback port.
//! 4. The monitor's cycle with the default `[monitor]` settings and a fleet
//!    Prometheus source (`sum by (vm) (...)`): the first cycle (a new leader,
//!    which decides everyone and writes every VPS's baseline), then `--rounds`
//!    cycles `--spacing` seconds apart, while a simulated proxy flushes the
//!    bandwidth of 1 % of the VPSes between cycles.
//!
//! Reports each cycle's work (wall time of the cycle), source queries, VPS
//! samples written, users decided from a fresh read of their figures (`read`)
//! or from known figures plus the usage just written (`kept`: far from every
//! limit), decisions stored and rows written; then the median and spread of
//! the steady cycles, and how long Prometheus alone takes to answer. Prometheus is stopped, its directory removed and
//! the database dropped at the end, also when a step fails.

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use tollgate_core::billing::Period;
use tollgate_core::config::{Config, SourceConfig};
use tollgate_monitor::cycle::{self, CycleReport, Sources, Tracker};

use crate::database::BenchDb;

#[allow(dead_code)]
#[path = "load/database.rs"]
mod database;

/// The whole run, Prometheus' start and the seeding included.
const DEADLINE: Duration = Duration::from_secs(900);

struct Args {
    vpses: usize,
    rounds: usize,
    spacing: Duration,
    /// `monitor.write_interval`, when not the default.
    write_interval: Option<Duration>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        vpses: 100_000,
        rounds: 12,
        spacing: Duration::from_secs(5),
        write_interval: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().context("a value after the option");
        match arg.as_str() {
            "--vpses" => a.vpses = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--spacing" => a.spacing = Duration::from_secs(value()?.parse()?),
            "--write-interval" => a.write_interval = Some(Duration::from_secs(value()?.parse()?)),
            // cargo bench passes --bench.
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "monitor_scale [--vpses N] [--rounds R] [--spacing SECONDS] [--write-interval SECONDS]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other}"),
        }
    }
    if a.rounds == 0 || a.vpses == 0 || a.spacing.is_zero() {
        bail!("--vpses, --rounds and --spacing must be above 0");
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match tokio::time::timeout(DEADLINE, run(args)).await {
            Ok(result) => result,
            Err(_) => bail!("the bench did not finish within {DEADLINE:?}"),
        }
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let prometheus = which("prometheus")
        .context("the `prometheus` binary is not on PATH (Debian: apt-get install prometheus)")?;
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("CARGO_TARGET_TMPDIR is inside target/")?
        .to_path_buf();
    let db = BenchDb::create(&target).await?;
    let result = async {
        let started = Instant::now();
        let vm_ids = seed(&db.pool, args.vpses).await?;
        println!(
            "seeded {} users and running k8s VPSes in {:.1?}",
            args.vpses,
            started.elapsed()
        );
        let exporter = Exporter::start(vm_ids).await?;
        let prom = Prometheus::start(&prometheus, exporter.port, args.spacing)?;
        let result = measure(&db, &args, &exporter, &prom).await;
        drop(prom);
        result
    }
    .await;
    db.drop_database().await?;
    result
}

async fn measure(
    db: &BenchDb,
    args: &Args,
    exporter: &Exporter,
    prom: &Prometheus,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let count_query = "count(bench_cpu_seconds_total)";
    loop {
        let up = prom.query_value(count_query).await;
        if up == Some(args.vpses as f64) && exporter.scrapes.load(Ordering::SeqCst) >= 2 {
            break;
        }
        prom.check_running()?;
        if started.elapsed() > Duration::from_secs(180) {
            bail!("Prometheus did not scrape the exporter's {} series within 180 s (last count: {up:?})", args.vpses);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "Prometheus holds {} series per metric after {:.1?}",
        args.vpses,
        started.elapsed()
    );

    let mut config = Config::default();
    config.log.filter = "warn,tollgate_monitor=info".into();
    tollgate_core::telemetry::init_tracing(&config.log);
    config.monitor.providers.insert(
        "k8s".into(),
        SourceConfig::Prometheus {
            url: format!("http://127.0.0.1:{}", prom.port),
            cpu_query: "sum by (vm) (bench_cpu_seconds_total)".into(),
            memory_query: "sum by (vm) (bench_memory_bytes)".into(),
            vps_label: Some("vm".into()),
            vps_label_value: "{vm_id}".into(),
        },
    );
    if let Some(w) = args.write_interval {
        config.monitor.write_interval = w;
    }
    let m = &config.monitor;
    println!(
        "monitor: interval {:?}, write_interval {:?}, full_sweep_interval {:?}, fleet Prometheus source",
        m.interval, m.write_interval, m.full_sweep_interval
    );
    let sources = Sources::from_config(m);
    let mut tracker = Tracker::new();
    let vps_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM vpses ORDER BY id")
        .fetch_all(&db.pool)
        .await?;

    println!(
        "\n{:<9} {:>9} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8}  sample/write/decide s",
        "cycle",
        "work",
        "sampled",
        "failed",
        "queries",
        "written",
        "read",
        "kept",
        "published",
        "rows",
        "flushed",
    );
    let mut steady = Vec::new();
    for round in 0..=args.rounds {
        let flushed = if round == 0 {
            0
        } else {
            tokio::time::sleep(args.spacing).await;
            flush_some(&db.pool, &vps_ids, round, args.vpses / 100).await?
        };
        let began = Instant::now();
        let report = cycle::run_cycle(&db.pool, m, &sources, "monitor-bench", &mut tracker).await?;
        let work = began.elapsed();
        print_row(round, work, &report, flushed);
        if report.sampled != args.vpses {
            println!(
                "          only {} of {} VPSes sampled ({} failed: see the log line above)",
                report.sampled, args.vpses, report.failed
            );
        }
        if round > 0 {
            steady.push(work);
        }
    }
    steady.sort();
    let median = steady[steady.len() / 2];
    let (low, high) = (steady[0], steady[steady.len() - 1]);
    println!(
        "\nsteady cycles at {} VPSes: median {:.3} s, spread {:.3}-{:.3} s over {} cycles (target < 2 s)",
        args.vpses,
        median.as_secs_f64(),
        low.as_secs_f64(),
        high.as_secs_f64(),
        steady.len()
    );
    println!(
        "exporter scraped {} times; rows = 3 per VPS written (sample state, usage, VPS gauges) + decisions stored",
        exporter.scrapes.load(Ordering::SeqCst)
    );
    // Prometheus' own share: the two fleet queries alone, as the monitor asks them.
    let mut alone = Vec::new();
    for _ in 0..3 {
        let began = Instant::now();
        let url = |q: &str| {
            format!(
                "http://127.0.0.1:{}/api/v1/query?query={}",
                prom.port,
                tollgate_monitor::http::encode_query_value(q)
            )
        };
        let (cpu, memory) = (
            url("sum by (vm) (bench_cpu_seconds_total)"),
            url("sum by (vm) (bench_memory_bytes)"),
        );
        let (a, b) = tokio::join!(
            tollgate_monitor::http::get_large(&cpu, &[]),
            tollgate_monitor::http::get_large(&memory, &[])
        );
        let bytes = a?.1.len() + b?.1.len();
        alone.push((began.elapsed(), bytes));
    }
    alone.sort();
    let (took, bytes) = alone[alone.len() / 2];
    println!(
        "the two fleet queries alone: median {:.3} s, {:.1} MB of answers",
        took.as_secs_f64(),
        bytes as f64 / 1e6
    );
    Ok(())
}

fn print_row(round: usize, work: Duration, r: &CycleReport, flushed: usize) {
    let name = if round == 0 {
        "takeover".to_owned()
    } else {
        format!("{round}")
    };
    println!(
        "{:<9} {:>8.3}s {:>8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8}  {:.2}/{:.2}/{:.2}",
        name,
        work.as_secs_f64(),
        r.sampled,
        r.failed,
        r.queries,
        r.written,
        r.read,
        r.kept,
        r.published,
        3 * r.written + r.published,
        flushed,
        r.sampling.as_secs_f64(),
        r.writing.as_secs_f64(),
        r.deciding.as_secs_f64(),
    );
}

/// A plan far from its limits, one user per VPS, `n` running k8s VPSes.
/// Returns each VPS's VM id, in exporter order.
async fn seed(pool: &PgPool, n: usize) -> anyhow::Result<Vec<String>> {
    let n = i32::try_from(n)?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO plans (name, max_agents, max_vpses, max_bandwidth_bytes, max_cpu_ms,
                            max_memory_mb_seconds, max_storage_bytes)
         VALUES ('bench', 5, 5, 1099511627776, 1000000000000, 1000000000000000, 1099511627776)",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO users (email, plan_id)
         SELECT 'user-' || g || '@bench.tollgate', (SELECT id FROM plans WHERE name = 'bench')
         FROM generate_series(1, $1) AS g",
    )
    .bind(n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
         VALUES ('bench', 'k8s', 'bench', 1000, 1024, 10)",
    )
    .execute(&mut *tx)
    .await?;
    let vm_ids: Vec<String> = sqlx::query_scalar(
        "INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
         SELECT u.id, (SELECT id FROM vps_configs WHERE name = 'bench'), 'vps', 'k8s',
                'vm-' || substr(u.email, 6, strpos(u.email, '@') - 6), '127.0.0.1', 'running'
         FROM users u
         RETURNING provider_vm_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    Ok(vm_ids)
}

/// What proxies do between cycles: add bandwidth to `count` VPSes (a different
/// share each round). Returns how many rows it touched.
async fn flush_some(
    pool: &PgPool,
    vps_ids: &[Uuid],
    round: usize,
    count: usize,
) -> anyhow::Result<usize> {
    let start = (round * count) % vps_ids.len().max(1);
    let ids: Vec<Uuid> = vps_ids
        .iter()
        .cycle()
        .skip(start)
        .take(count)
        .copied()
        .collect();
    let rows = sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes, bandwidth_tx_bytes)
         SELECT id, $2, 1000, 600, 400 FROM UNNEST($1::uuid[]) AS id ORDER BY id
         ON CONFLICT (vps_id, period_start) DO UPDATE SET
             bandwidth_bytes = vps_usage_periods.bandwidth_bytes + 1000,
             bandwidth_rx_bytes = vps_usage_periods.bandwidth_rx_bytes + 600,
             bandwidth_tx_bytes = vps_usage_periods.bandwidth_tx_bytes + 400",
    )
    .bind(&ids)
    .bind(Period::current().start())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(rows as usize)
}

/// The series a fleet of VMs exports: CPU seconds growing by half a second per
/// scrape, memory constant per VM.
struct Exporter {
    port: u16,
    scrapes: Arc<AtomicU64>,
}

impl Exporter {
    async fn start(vm_ids: Vec<String>) -> anyhow::Result<Exporter> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let scrapes = Arc::new(AtomicU64::new(0));
        let vm_ids = Arc::new(vm_ids);
        let counter = scrapes.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (vm_ids, counter) = (vm_ids.clone(), counter.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let (vm_ids, counter) = (vm_ids.clone(), counter.clone());
                        async move {
                            let scrape = counter.fetch_add(1, Ordering::SeqCst) + 1;
                            let body =
                                tokio::task::spawn_blocking(move || exposition(&vm_ids, scrape))
                                    .await
                                    .unwrap_or_default();
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Exporter { port, scrapes })
    }
}

fn exposition(vm_ids: &[String], scrape: u64) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(vm_ids.len() * 96);
    out.push_str("# TYPE bench_cpu_seconds_total counter\n");
    for (i, vm) in vm_ids.iter().enumerate() {
        let _ = writeln!(
            out,
            "bench_cpu_seconds_total{{vm=\"{vm}\"}} {}",
            (i % 1000) as f64 + scrape as f64 * 0.5
        );
    }
    out.push_str("# TYPE bench_memory_bytes gauge\n");
    for (i, vm) in vm_ids.iter().enumerate() {
        let _ = writeln!(
            out,
            "bench_memory_bytes{{vm=\"{vm}\"}} {}",
            (64 + i % 64) << 20
        );
    }
    out
}

/// A Prometheus server on a loopback port with a temporary config and data
/// directory; stopped and removed on drop.
struct Prometheus {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(
        binary: &std::path::Path,
        exporter_port: u16,
        every: Duration,
    ) -> anyhow::Result<Prometheus> {
        let dir = std::env::temp_dir().join(format!("tollgate-monitor-bench-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let secs = every.as_secs().max(1);
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n\
                 scrape_configs:\n  - job_name: fleet\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        Ok(Prometheus { port, child, dir })
    }

    fn check_running(&self) -> anyhow::Result<()> {
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let pid = self.child.id();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("prometheus exited; its log:\n{log}");
        }
        Ok(())
    }

    async fn query_value(&self, query: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            tollgate_monitor::http::encode_query_value(query)
        );
        let (_, body) = tollgate_monitor::http::get(&url, &[]).await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
