//! Fleet scale, side by side (SPEC §12): N proxy replicas (1, 2, 4 by default)
//! in front of one PostgreSQL, with M active VPSes, each replica a full
//! `tollgate_proxy::run` in this process on loopback ports.
//!
//! Per replica count, two phases:
//! 1. **Fleet traffic**: small requests through the replicas' egress listeners,
//!    spread over M agents (one VPS and one user each), for `--duration`
//!    seconds. Reported: requests/s, flush statements/s and rows written/s
//!    (from `flush_ledger`), mean flush latency, lease grants/s.
//! 2. **Overshoot**: one user with a `--limit` byte plan, hammered by
//!    `--connections` downloads in total spread over the replicas until every
//!    one is refused; reported as bytes past the limit, beside the bound
//!    `docs/operations.md` states (connections x 640 KiB), with leases on and off.
//!
//! Run: `cargo bench --bench scale` (`-- --help` for the options). Traffic stays
//! on loopback; the database is created fresh and dropped at the end.

#[allow(dead_code)]
#[path = "load/database.rs"]
mod database;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate::demo_gateway::DemoGateway;
use tollgate_core::config::Config;
use tollgate_proxy::{Listeners, Options};

use crate::database::{BenchDb, SeededAgent};

/// What one client connection can move past its last check (docs/operations.md).
const PER_CONNECTION: u64 = 640 * 1024;

#[derive(Debug, Parser)]
#[command(name = "scale")]
struct Args {
    /// Replica counts to compare.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    replicas: Vec<usize>,
    /// Active VPSes (one agent and one user each).
    #[arg(long, default_value_t = 5_000)]
    vpses: usize,
    /// Seconds of fleet traffic per replica count.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent clients of the fleet traffic.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Bandwidth limit of the overshoot user, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    limit: u64,
    /// Downloads hammering the overshoot user, in total over the replicas.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Flush interval of every replica, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tollgate_core::telemetry::init_tracing(&tollgate_core::config::LogConfig {
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ..Default::default()
    });
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("CARGO_TARGET_TMPDIR is inside target/")?
        .to_path_buf();
    let db = BenchDb::create(&target_dir).await?;
    let outcome = measure(&args, &db).await;
    db.drop_database().await?;
    outcome
}

/// A row of the report.
struct Row {
    replicas: usize,
    requests_per_s: f64,
    statements_per_s: f64,
    rows_per_s: f64,
    flush_ms: f64,
    grants_per_s: f64,
    overshoot_on: u64,
    overshoot_off: u64,
}

async fn measure(args: &Args, db: &BenchDb) -> anyhow::Result<()> {
    eprintln!("seeding {} VPSes", args.vpses);
    let fleet = seed_fleet(db, args.vpses).await?;
    let origin = DemoGateway::start().await;
    let mut rows = Vec::new();
    for &n in &args.replicas {
        eprintln!("== {n} replica(s): fleet traffic");
        let replicas = Replicas::start(db, n, args, true).await?;
        let (requests_per_s, statements_per_s, rows_per_s, flush_ms, grants_per_s) =
            fleet_traffic(db, &replicas, &fleet, &origin, args).await?;
        replicas.stop().await;
        let mut overshoot = [0u64; 2];
        for (i, leases) in [true, false].into_iter().enumerate() {
            eprintln!(
                "== {n} replica(s): overshoot, leases {}",
                if leases { "on" } else { "off" }
            );
            let replicas = Replicas::start(db, n, args, leases).await?;
            let label = format!("overshoot-{n}-{leases}-{}", Uuid::new_v4().simple());
            let user = db.agent(&label, args.limit as i64).await?;
            hammer(&replicas, &user, &origin, args.connections).await;
            replicas.stop().await;
            let used = db.bandwidth(user.vps_id).await? as u64;
            overshoot[i] = used.saturating_sub(args.limit);
        }
        rows.push(Row {
            replicas: n,
            requests_per_s,
            statements_per_s,
            rows_per_s,
            flush_ms,
            grants_per_s,
            overshoot_on: overshoot[0],
            overshoot_off: overshoot[1],
        });
    }
    let bound = args.connections as u64 * PER_CONNECTION;
    println!(
        "\n{} active VPSes, {} s of traffic per replica count, {} clients, flush every {} ms; overshoot: {} downloads against a {} MiB limit, bound {} KiB\n",
        args.vpses,
        args.duration,
        args.clients,
        args.flush_interval_ms,
        args.connections,
        args.limit >> 20,
        bound >> 10
    );
    println!("| replicas | requests/s | flush statements/s | rows written/s | flush latency (mean) | lease grants/s | overshoot, leases on | overshoot, leases off |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let pct = |b: u64| 100.0 * b as f64 / args.limit as f64;
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} ms | {:.1} | {} KiB ({:.1} %) | {} KiB ({:.1} %) |",
            r.replicas,
            r.requests_per_s,
            r.statements_per_s,
            r.rows_per_s,
            r.flush_ms,
            r.grants_per_s,
            r.overshoot_on >> 10,
            pct(r.overshoot_on),
            r.overshoot_off >> 10,
            pct(r.overshoot_off),
        );
    }
    Ok(())
}

/// `n` agents, each with its own user on one generous plan and a running VPS.
async fn seed_fleet(db: &BenchDb, n: usize) -> anyhow::Result<Vec<(Uuid, String)>> {
    let mut tx = db.pool.begin().await?;
    let plan: Uuid = sqlx::query_scalar(
        "INSERT INTO plans (name, max_agents, max_vpses) VALUES ('scale', 1, 1) RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await?;
    let config: Uuid = sqlx::query_scalar(
        "INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
         VALUES ('scale', 'hetzner', 'bench', 1000, 1024, 10) RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await?;
    let agents: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH u AS (
             INSERT INTO users (email, plan_id)
             SELECT 'scale-' || g || '@bench.tollgate', $1 FROM generate_series(1, $3) AS g
             RETURNING id
         ), v AS (
             INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
             SELECT id, $2, 'scale-' || id, 'hetzner', 'scale-' || id, '127.0.0.1', 'running' FROM u
             RETURNING id, user_id
         )
         INSERT INTO agents (user_id, vps_id, name)
         SELECT user_id, id, 'scale' FROM v
         RETURNING id, gateway_token",
    )
    .bind(plan)
    .bind(config)
    .bind(i32::try_from(n)?)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("ANALYZE").execute(&db.pool).await?;
    Ok(agents)
}

/// Proxies running in this process against one database.
struct Replicas {
    egress: Vec<SocketAddr>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Replicas {
    async fn start(db: &BenchDb, n: usize, args: &Args, leases: bool) -> anyhow::Result<Replicas> {
        let stop = CancellationToken::new();
        let (mut egress, mut tasks) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let mut config = Config::default();
            config.database.url = db.url.clone();
            let p = &mut config.proxy;
            p.egress.allow_cidrs = vec!["127.0.0.0/8".parse()?];
            p.meter.flush_interval = Duration::from_millis(args.flush_interval_ms);
            p.meter.spill_dir =
                std::env::temp_dir().join(format!("tollgate-scale-{}", Uuid::new_v4()));
            p.leases.enabled = leases;
            p.ingress.enabled = false;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            egress.push(listener.local_addr()?);
            let listeners = Listeners {
                egress: Some(listener),
                ingress: None,
                admin: TcpListener::bind("127.0.0.1:0").await?,
                usage_api: None,
            };
            tasks.push(tokio::spawn(tollgate_proxy::run(
                config,
                listeners,
                Options::default(),
                stop.clone(),
            )));
        }
        Ok(Replicas {
            egress,
            stop,
            tasks,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn basic(agent: Uuid, token: &str) -> String {
    let raw = format!("{agent}:{token}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// One request on a fresh connection; the bytes read back.
async fn request(proxy: SocketAddr, url: &str, auth: &str) -> Option<(u16, u64)> {
    let mut s = TcpStream::connect(proxy).await.ok()?;
    let host = url.trim_start_matches("http://").split('/').next()?;
    let head = format!(
        "GET {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut read, mut first) = (0u64, Vec::new());
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if first.len() < 16 {
                    first.extend_from_slice(&buf[..n.min(16)]);
                }
                read += n as u64;
            }
        }
    }
    let status = std::str::from_utf8(&first)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, read))
}

/// Small requests over the whole fleet through every replica for the duration.
async fn fleet_traffic(
    db: &BenchDb,
    replicas: &Replicas,
    fleet: &[(Uuid, String)],
    origin: &DemoGateway,
    args: &Args,
) -> anyhow::Result<(f64, f64, f64, f64, f64)> {
    let url = origin.url("/bytes/100");
    let auths: Arc<Vec<String>> = Arc::new(fleet.iter().map(|(a, t)| basic(*a, t)).collect());
    let (n, m) = (replicas.egress.len(), auths.len());
    // Request i goes as agent i % m to replica (i + i / m) % n: no affinity, so
    // every replica sees every agent, as behind a load balancer.
    let spread = move |i: usize| ((i + i / m) % n, i % m);
    // Warm-up: every agent once on every replica (directories filled, leases
    // granted), so the window measures the steady state.
    eprintln!("   warming {} agent-replica pairs", n * m);
    let next = Arc::new(AtomicU64::new(0));
    let mut warming = Vec::new();
    for _ in 0..args.clients {
        let (next, auths, url, egress) = (
            next.clone(),
            auths.clone(),
            url.clone(),
            replicas.egress.clone(),
        );
        warming.push(tokio::spawn(async move {
            let limit = Instant::now() + Duration::from_secs(300);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n * m || Instant::now() > limit {
                    return;
                }
                let (r, a) = spread(i);
                request(egress[r], &url, &auths[a]).await;
            }
        }));
    }
    for w in warming {
        let _ = w.await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (next, done, auths, url) = (next.clone(), done.clone(), auths.clone(), url.clone());
        let egress = replicas.egress.clone();
        clients.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (r, a) = spread(next.fetch_add(1, Ordering::Relaxed) as usize);
                if let Some((200, _)) = request(egress[r], &url, &auths[a]).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await?;
    let (sum0, count0) =
        tollgate_core::telemetry::histogram_totals("tollgate_flush_duration_seconds");
    let grants0 = counter_total("tollgate_lease_grants_total");
    for c in clients {
        let _ = c.await;
    }
    let secs = args.duration as f64;
    let (sum1, count1) =
        tollgate_core::telemetry::histogram_totals("tollgate_flush_duration_seconds");
    let grants1 = counter_total("tollgate_lease_grants_total");
    let (statements, rows): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(vps_count), 0)::BIGINT FROM flush_ledger
         WHERE applied_at >= $1 AND applied_at < $1 + make_interval(secs => $2)",
    )
    .bind(started_at)
    .bind(secs)
    .fetch_one(&db.pool)
    .await?;
    let flush_ms = if count1 > count0 {
        1000.0 * (sum1 - sum0) / (count1 - count0)
    } else {
        0.0
    };
    Ok((
        done.load(Ordering::Relaxed) as f64 / secs,
        statements as f64 / secs,
        rows as f64 / secs,
        flush_ms,
        (grants1 - grants0) / secs,
    ))
}

/// `connections` downloads for `user`, spread over the replicas, each repeated
/// until the proxy refuses it.
async fn hammer(replicas: &Replicas, user: &SeededAgent, origin: &DemoGateway, connections: usize) {
    let url = origin.url(&format!("/bytes/{}", 1 << 20));
    let auth = basic(user.agent_id, &user.token);
    let mut clients = Vec::new();
    for i in 0..connections {
        let proxy = replicas.egress[i % replicas.egress.len()];
        let (url, auth) = (url.clone(), auth.clone());
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Some((403, _)) = request(proxy, &url, &auth).await {
                    return;
                }
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
}

/// A counter's value, all label sets together.
fn counter_total(name: &str) -> f64 {
    let text = tollgate_core::telemetry::render_metrics();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
