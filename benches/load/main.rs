//! Side-by-side load harness for SPEC §7: Tollgate beside nginx and haproxy
//! (reverse proxies) and squid and tinyproxy (forward proxies) on loopback, on
//! the same origin, each server pinned to one core with one worker, the load
//! generators and the origin on the other core. Prints one table of every §7
//! figure and writes it to `docs/benchmarks.md` with the command, machine and
//! date.
//!
//! Run: `cargo bench --bench load` (`cargo bench --bench load -- --help` for the
//! options: durations, rounds, connections, sections).
//!
//! What runs, in order:
//! 1. the meter's hot path under contention (two threads, two cores);
//! 2. a fresh PostgreSQL database (migrated, seeded), and the flush of 100,000
//!    dirty VPSes in one batch through `apply_flush` (several rounds of a first
//!    flush of a month and the flushes after it; median and spread), plus the
//!    memory of their counters;
//! 3. the origin, Tollgate (`tollgate proxy`, auth + metering + enforcement on),
//!    nginx, haproxy, squid and tinyproxy;
//! 4. ingress (reverse proxies): `wrk` with a 100-byte and a 1 MiB response,
//!    the 100-byte response again at a fixed rate (`paced`, latency below
//!    saturation), `h2load` over h2c; egress (forward proxies): `wrk` with
//!    absolute-form requests and `Proxy-Authorization` (and, for the small
//!    response, once more as an agent with a 100-rule egress policy); each
//!    beside a direct run to the origin;
//! 5. CONNECT bulk throughput and the relay's CPU time per GiB through each
//!    forward proxy, through reference relays with no proxy logic (tokio copy,
//!    a blocking read/write loop, `splice(2)`; see `relay`) and directly;
//! 6. RSS per idle keep-alive connection (10,000 connections);
//! 7. enforcement latency and overshoot through Tollgate's egress with defaults.
//!
//! Every load measurement (4 and 5) runs in interleaved rounds (`rounds`): each
//! round runs every server once, each row is the median over the rounds, shown
//! with its spread and the CPU steal during its runs; a row whose rounds are
//! more than 10 % apart is marked unstable, and so is any verdict built on it.
//! `--rounds` (or `TOLLGATE_BENCH_ROUNDS`) sets the count, 5 by default;
//! `--rounds 1 --only ingress,connect --duration 2` is a quick look while
//! developing.
//!
//! Every child process is stopped and the database dropped at the end, also
//! when a step fails.

mod counting;
mod database;
mod enforcement;
mod exchange;
mod flush;
mod idle;
mod origin;
mod paced;
mod profiling;
mod relay;
mod report;
mod rounds;
mod servers;
mod traffic;
mod tunnel;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::FutureExt;
use uuid::Uuid;

use crate::database::BenchDb;
use crate::relay::{Relay, RelayKind};
use crate::report::Results;
use crate::rounds::{Conditions, Rounds, RunMeter};
use crate::servers::{installed, Credentials, ForwardProxy, Process, ReverseProxy, Tollgate};
use crate::traffic::{Run, Target};

/// Tollgate's side-by-side load harness (SPEC §7).
#[derive(Debug, Clone, Parser)]
#[command(name = "load")]
pub struct Args {
    #[command(subcommand)]
    command: Option<Internal>,
    /// Seconds per measured load run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Seconds of unrecorded warm-up before each load run.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Interleaved rounds of every load run (HTTP and CONNECT); each row is the
    /// median over them, shown with its spread.
    #[arg(long, env = "TOLLGATE_BENCH_ROUNDS", default_value_t = 5)]
    rounds: usize,
    /// Concurrent connections per load run.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// HTTP/2 runs: connections x concurrent streams per connection.
    #[arg(long, default_value_t = 8)]
    h2_connections: usize,
    #[arg(long, default_value_t = 8)]
    h2_streams: usize,
    /// Requests per second of the paced ingress row (an open-loop run at a
    /// fixed rate, below every server's capacity, to compare latency where
    /// neither core is saturated); 0 leaves the row out.
    #[arg(long, default_value_t = 20_000)]
    paced_rate: u32,
    /// Seconds of each CONNECT bulk transfer.
    #[arg(long, default_value_t = 5)]
    tunnel_duration: u64,
    /// Idle keep-alive connections for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// VPSes in the flush and counter-memory measurements.
    #[arg(long, default_value_t = 100_000)]
    flush_vpses: usize,
    /// Rounds of the flush measurement (each: one insert, two updates, in a month of its own).
    #[arg(long, default_value_t = 5)]
    flush_rounds: usize,
    /// Enforcement trials (each with a fresh agent).
    #[arg(long, default_value_t = 3)]
    enforcement_trials: usize,
    /// Core the servers under test run on (one each).
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,
    /// Core the load generators, the origin and this harness run on.
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// Only these sections (comma-separated); docs/benchmarks.md is then left alone.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Do not write docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
    /// Before measuring, keep every server up this many seconds and print how to
    /// reach them (for manual profiling with perf, strace, wrk).
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Record Tollgate with `perf` during its first run of each load section
    /// (written to target/load-profiles/).
    #[arg(long)]
    profile: bool,
    /// The `tollgate` binary under test (default: the one this bench was built
    /// with). Point it at another build to compare two builds on this machine.
    #[arg(long)]
    tollgate: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Subcommand)]
enum Internal {
    /// Serve the origin (started by the harness itself).
    #[command(hide = true)]
    Origin,
    /// Relay connections to a loopback port (started by the harness itself).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        upstream: u16,
        #[arg(long, value_enum)]
        kind: RelayKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Section {
    Meter,
    Flush,
    Ingress,
    /// Ingress small responses at a fixed rate (`--paced-rate`).
    Paced,
    Egress,
    /// Ingress and egress small responses again, every server with two workers
    /// on both cores (the load generator shares them).
    TwoWorkers,
    Connect,
    Idle,
    Enforcement,
}

impl Args {
    fn tollgate_binary(&self) -> &Path {
        self.tollgate
            .as_deref()
            .unwrap_or(Path::new(env!("CARGO_BIN_EXE_tollgate")))
    }

    fn runs(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }

    /// Whether a section that starts the servers under test runs.
    fn runs_servers(&self) -> bool {
        [
            Section::Ingress,
            Section::Paced,
            Section::Egress,
            Section::TwoWorkers,
            Section::Connect,
            Section::Idle,
            Section::Enforcement,
        ]
        .iter()
        .any(|s| self.runs(*s))
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup)
    }
}

/// The CONNECT baseline whose source runs on the server core.
pub const DIRECT_ACROSS_CORES: &str = "direct, source on the server core";

/// The CONNECT reference that relays with tokio's two-way copy and nothing else.
pub const BARE_RELAY: &str = "bare relay (tokio copy, 256 KiB)";

/// The CONNECT ceiling for a relay here: a blocking read/write loop.
pub const MINIMAL_RELAY: &str = "minimal relay (blocking read/write, 256 KiB)";

/// The CONNECT reference that never copies to user space.
pub const SPLICE_RELAY: &str = "splice relay (splice(2), 256 KiB pipe)";

/// The egress row whose agent has an egress policy of 100 rules.
pub const TOLLGATE_POLICY: &str = "Tollgate, 100-rule policy";

/// Plan limit of the agent under load: never reached.
const UNLIMITED: i64 = 1 << 50;
/// Plan limit of the enforcement agents.
const ENFORCEMENT_LIMIT: u64 = 1 << 20;
/// Response size the enforcement agents fetch.
const ENFORCEMENT_RESPONSE: usize = 16 * 1024;

fn main() -> ExitCode {
    let args = Args::parse();
    let internal = match args.command {
        Some(Internal::Origin) => Some(origin::serve()),
        Some(Internal::Relay { upstream, kind }) => Some(relay::serve(kind, upstream)),
        None => None,
    };
    if let Some(result) = internal {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("load: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut results = Results::default();
    if args.runs(Section::Meter) {
        eprintln!("== meter hot path under contention");
        results.meter_ns = Some(counting::contended_ns(20_000_000, 7));
        eprintln!("== memory of {} VPS counters", args.flush_vpses);
        let (memory, meter) = counting::counters_memory(args.flush_vpses);
        drop(meter);
        results.counters = Some(memory);
    }
    // From here on this process (and the threads it starts) stays on the load core.
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", &args.load_cpu.to_string()])
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::null())
        .status();
    if !pinned.is_ok_and(|s| s.success()) {
        eprintln!(
            "load: cannot pin the harness to CPU {} with taskset",
            args.load_cpu
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, results)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, mut results: Results) -> anyhow::Result<()> {
    if args.runs_servers() {
        for tool in ["taskset", "wrk", "h2load"] {
            anyhow::ensure!(installed(tool), "{tool} is not installed");
        }
    }
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("CARGO_TARGET_TMPDIR is inside target/")?
        .to_path_buf();
    let work = std::env::temp_dir().join(format!("tollgate-load-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // nginx workers, squid and tinyproxy drop to unprivileged users when started as root.
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777))?;
    }
    eprintln!("== database");
    let db = BenchDb::create(&target_dir).await?;
    results.postgres = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&db.pool)
        .await
        .unwrap_or_default();
    let measuring = AssertUnwindSafe(measure(&args, &db, &work, &mut results)).catch_unwind();
    let outcome = tokio::select! {
        outcome = measuring => outcome,
        signal = interrupted() => Ok(Err(anyhow::anyhow!("interrupted by {signal}"))),
    };
    let dropped = db.drop_database().await;
    let measured = match outcome {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    if let Err(e) = measured {
        eprintln!(
            "load: work directory kept for inspection: {}",
            work.display()
        );
        return Err(e);
    }
    dropped.context("dropping the bench database")?;
    let _ = std::fs::remove_dir_all(&work);

    let invocation = invocation(&args);
    let table = report::table(&results);
    println!("\n{table}");
    println!("{}", report::verdicts(&results).join("\n"));
    if args.only.is_empty() && !args.no_write {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        report::write_docs(&path, &invocation, &args, &results)?;
        eprintln!("written to {}", path.display());
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM, so child processes and the database are
/// cleaned up when the harness is stopped.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// The command line as a user would type it.
fn invocation(args: &Args) -> String {
    let extra: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let _ = args;
    if extra.is_empty() {
        "cargo bench --bench load".into()
    } else {
        format!("cargo bench --bench load -- {}", extra.join(" "))
    }
}

pub fn basic_auth(agent: Uuid, token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{agent}:{token}"))
    )
}

/// Everything after the database exists; child processes stop when this returns.
async fn measure(
    args: &Args,
    db: &BenchDb,
    work: &Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    let agent = db.agent("load", UNLIMITED).await?;
    let judged = db.agent("load-policy", UNLIMITED).await?;
    db.egress_policy(judged.agent_id, 100).await?;
    let creds = Credentials {
        agent_id: agent.agent_id,
        token: agent.token.clone(),
    };
    let mut enforcement_agents = Vec::new();
    // One per request trial, and one each for the download and the tunnel.
    for i in 0..args.enforcement_trials + 2 {
        enforcement_agents.push(
            db.agent(&format!("enforcement-{i}"), ENFORCEMENT_LIMIT as i64)
                .await?,
        );
    }

    if args.runs(Section::Flush) {
        eprintln!("== flush of {} dirty VPSes", args.flush_vpses);
        results.fleet = Some(flush::measure(db, args.flush_vpses, args.flush_rounds).await?);
    }
    if !args.runs_servers() {
        return Ok(());
    }

    eprintln!("== starting the origin and the servers");
    let (cpu, load) = (args.server_cpu, args.load_cpu);
    let origin = origin::Origin::start(load, &work.join("origin.log"))?;
    let origin_addr = servers::loopback(origin.http_port);
    let bulk_addr = servers::loopback(origin.bulk_port);
    let tollgate = Tollgate::start(
        args.tollgate_binary(),
        &cpu.to_string(),
        1,
        &db.url,
        origin.http_port,
        origin.bulk_port,
        work,
    )?;
    let reverse_wanted =
        args.runs(Section::Ingress) || args.runs(Section::Paced) || args.runs(Section::Idle);
    let forward_wanted = args.runs(Section::Egress)
        || args.runs(Section::TwoWorkers)
        || args.runs(Section::Connect)
        || args.runs(Section::Idle);
    let mut reverse: Vec<(&'static str, ReverseProxy)> = Vec::new();
    let mut forward: Vec<(&'static str, ForwardProxy)> = Vec::new();
    if reverse_wanted {
        if let Some(p) = start_or_note(results, "nginx", || {
            servers::nginx(&cpu.to_string(), 1, origin.http_port, work)
        }) {
            reverse.push(("nginx", p));
        }
        if let Some(p) = start_or_note(results, "haproxy", || {
            servers::haproxy(&cpu.to_string(), 1, origin.http_port, work)
        }) {
            reverse.push(("haproxy", p));
        }
    }
    if forward_wanted {
        if let Some(p) = start_or_note(results, "squid", || servers::squid(cpu, &creds, work)) {
            forward.push(("squid", p));
        }
        let max_clients = args.idle_connections + 200;
        if let Some(p) = start_or_note(results, "tinyproxy", || {
            servers::tinyproxy(cpu, &creds, origin.bulk_port, max_clients, work)
        }) {
            forward.push(("tinyproxy", p));
        }
    }

    let origin_host = format!("127.0.0.1:{}", origin.http_port);
    let direct = |path: &str| Target {
        connect: origin_addr,
        path: path.into(),
        headers: vec![("Host".into(), origin_host.clone())],
        server: None,
    };
    let ingress_at = |addr: SocketAddr, path: &str| Target {
        connect: addr,
        path: format!("/agents/{}/gateway{path}", agent.agent_id),
        headers: vec![
            ("Host".into(), addr.to_string()),
            ("Authorization".into(), format!("Bearer {}", agent.token)),
        ],
        server: None,
    };
    let ingress = |path: &str| ingress_at(tollgate.ingress, path);
    let reverse_target = |addr: SocketAddr, path: &str| Target {
        connect: addr,
        path: path.into(),
        headers: vec![("Host".into(), addr.to_string())],
        server: None,
    };
    let proxy_auth = basic_auth(agent.agent_id, &agent.token);
    let forward_target_as = |addr: SocketAddr, path: &str, auth: &str| Target {
        connect: addr,
        path: format!("http://{origin_host}{path}"),
        headers: vec![
            ("Host".into(), origin_host.clone()),
            ("Proxy-Authorization".into(), auth.to_owned()),
        ],
        server: None,
    };
    let forward_target = |addr: SocketAddr, path: &str| forward_target_as(addr, path, &proxy_auth);
    let judged_auth = basic_auth(judged.agent_id, &judged.token);

    if args.hold > 0 {
        let i = ingress("/small");
        let e = forward_target(tollgate.egress, "/small");
        eprintln!("   origin {origin_addr} (pid {})", origin.process.pid());
        eprintln!(
            "   tollgate pid {} ingress {} egress {}",
            tollgate.process.pid(),
            tollgate.ingress,
            tollgate.egress
        );
        eprintln!(
            "   ingress: wrk -t1 -c64 -d5s -H 'Authorization: {}' http://{}{}",
            i.headers[1].1, i.connect, i.path
        );
        eprintln!(
            "   egress: {} via Proxy-Authorization: {}",
            e.path, e.headers[1].1
        );
        for (name, p) in &reverse {
            eprintln!(
                "   {name} pid {} http1 {} h2c {}",
                p.process.pid(),
                p.http1,
                p.h2c
            );
        }
        for (name, p) in &forward {
            eprintln!("   {name} pid {} {}", p.process.pid(), p.addr);
        }
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }

    let tollgate_pid = tollgate.process.pid();
    let wrk = |target: &Target| {
        traffic::wrk(
            &load.to_string(),
            1,
            target,
            args.connections,
            args.duration(),
            args.warmup(),
            work,
        )
    };
    // The direct connection, Tollgate's ingress and each reverse proxy, each
    // with the server whose CPU time it measures.
    let http1_targets = |path: &str| {
        let mut targets = vec![
            ("direct".to_owned(), direct(path)),
            ("Tollgate".to_owned(), ingress(path).served_by(tollgate_pid)),
        ];
        for (name, p) in &reverse {
            let target = reverse_target(p.http1, path).served_by(p.process.pid());
            targets.push(((*name).to_owned(), target));
        }
        targets
    };
    if args.runs(Section::Ingress) {
        for (path, out) in [
            ("/small", &mut results.ingress_small),
            ("/large", &mut results.ingress_large),
        ] {
            eprintln!("== ingress HTTP/1.1 {path}");
            let targets = http1_targets(path);
            let label = format!("ingress{}", path.replace('/', "-"));
            let profile = args
                .profile
                .then_some((tollgate.process.pid(), label.as_str()));
            *out = interleaved(args, &targets, profile, wrk)?;
        }
        eprintln!("== ingress HTTP/2 (h2c) /small");
        let mut targets = vec![("Tollgate".to_owned(), ingress("/small"))];
        for (name, p) in &reverse {
            targets.push(((*name).to_owned(), reverse_target(p.h2c, "/small")));
        }
        results.ingress_h2 = interleaved(args, &targets, None, |target| {
            traffic::h2load(
                load,
                target,
                args.h2_connections,
                args.h2_streams,
                args.duration(),
                args.warmup(),
            )
        })?;
    }

    if args.runs(Section::Paced) && args.paced_rate > 0 {
        let rate = args.paced_rate;
        eprintln!("== ingress HTTP/1.1 /small paced at {rate} req/s");
        let pace = paced::Pace {
            rate,
            connections: args.connections,
        };
        results.paced_rate = rate;
        results.ingress_paced = interleaved(args, &http1_targets("/small"), None, |target| {
            traffic::measured(target, args.warmup(), args.duration(), |duration| {
                paced::run(target, &pace, duration)
            })
        })?;
    }
    if args.runs(Section::Egress) {
        for (path, out) in [
            ("/small", &mut results.egress_small),
            ("/large", &mut results.egress_large),
        ] {
            eprintln!("== egress HTTP/1.1 {path}");
            let mut targets = vec![
                ("direct".to_owned(), direct(path)),
                (
                    "Tollgate".to_owned(),
                    forward_target(tollgate.egress, path).served_by(tollgate_pid),
                ),
            ];
            if path == "/small" {
                targets.push((
                    TOLLGATE_POLICY.to_owned(),
                    forward_target_as(tollgate.egress, path, &judged_auth).served_by(tollgate_pid),
                ));
            }
            for (name, p) in &forward {
                let target = forward_target(p.addr, path).served_by(p.process.pid());
                targets.push(((*name).to_owned(), target));
            }
            let label = format!("egress{}", path.replace('/', "-"));
            let profile = args
                .profile
                .then_some((tollgate.process.pid(), label.as_str()));
            *out = interleaved(args, &targets, profile, wrk)?;
        }
    }

    if args.runs(Section::TwoWorkers) {
        eprintln!("== two workers on two cores: ingress and egress HTTP/1.1 /small");
        // Every server again with two workers on both cores, each in a
        // directory of its own; wrk (two threads) and the origin share the cores.
        let both = format!("{cpu},{load}");
        let dir = work.join("two-workers");
        std::fs::create_dir_all(&dir)?;
        let tollgate2 = Tollgate::start(
            args.tollgate_binary(),
            &both,
            2,
            &db.url,
            origin.http_port,
            origin.bulk_port,
            &dir,
        )?;
        let mut reverse2: Vec<(&'static str, ReverseProxy)> = Vec::new();
        if let Some(p) = start_or_note(results, "nginx", || {
            servers::nginx(&both, 2, origin.http_port, &dir)
        }) {
            reverse2.push(("nginx", p));
        }
        if let Some(p) = start_or_note(results, "haproxy", || {
            servers::haproxy(&both, 2, origin.http_port, &dir)
        }) {
            reverse2.push(("haproxy", p));
        }
        let wrk2 = |target: &Target| {
            traffic::wrk(
                &both,
                2,
                target,
                args.connections,
                args.duration(),
                args.warmup(),
                &dir,
            )
        };
        let mut targets = vec![
            ("direct".to_owned(), direct("/small")),
            (
                "Tollgate".to_owned(),
                ingress_at(tollgate2.ingress, "/small").served_by(tollgate2.process.pid()),
            ),
        ];
        for (name, p) in &reverse2 {
            let target = reverse_target(p.http1, "/small").served_by(p.process.pid());
            targets.push(((*name).to_owned(), target));
        }
        results.two_workers_ingress = interleaved(args, &targets, None, wrk2)?;
        let mut targets = vec![
            ("direct".to_owned(), direct("/small")),
            (
                "Tollgate".to_owned(),
                forward_target(tollgate2.egress, "/small").served_by(tollgate2.process.pid()),
            ),
        ];
        // squid and tinyproxy keep one worker: squid's SMP mode needs shared
        // memory set up for it, tinyproxy has none. They are shown for scale.
        for (name, p) in &forward {
            let target = forward_target(p.addr, "/small").served_by(p.process.pid());
            targets.push(((*name).to_owned(), target));
        }
        results.two_workers_egress = interleaved(args, &targets, None, wrk2)?;
    }

    if args.runs(Section::Connect) {
        eprintln!("== CONNECT bulk throughput");
        let duration = Duration::from_secs(args.tunnel_duration);
        // The same connection with the source on the server core: the data crosses
        // cores once here, and twice through any proxy.
        let remote = origin::Origin::start(cpu, &work.join("origin-server-core.log"))?;
        // What any relay process gets here: reference relays on the server core.
        let relays = RelayKind::ALL
            .iter()
            .map(|kind| Ok((*kind, Relay::start(*kind, cpu, origin.bulk_port, work)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let connect = |proxy: SocketAddr| {
            Some(tunnel::Via {
                proxy,
                headers: vec![("Proxy-Authorization".to_owned(), proxy_auth.clone())],
            })
        };
        let mut tunnels: Vec<(&str, Option<tunnel::Via>, SocketAddr, Option<&Process>)> = vec![
            ("direct", None, bulk_addr, None),
            (
                DIRECT_ACROSS_CORES,
                None,
                servers::loopback(remote.bulk_port),
                None,
            ),
        ];
        for (kind, relay) in &relays {
            tunnels.push((
                kind.label(),
                None,
                servers::loopback(relay.port),
                Some(&relay.process),
            ));
        }
        tunnels.push((
            "Tollgate",
            connect(tollgate.egress),
            bulk_addr,
            Some(&tollgate.process),
        ));
        for (name, p) in &forward {
            tunnels.push((name, connect(p.addr), bulk_addr, Some(&p.process)));
        }
        let mut series: Vec<(String, Rounds<tunnel::Tunnel>)> = tunnels
            .iter()
            .map(|(name, ..)| ((*name).to_owned(), Rounds::default()))
            .collect();
        for round in 0..args.rounds.max(1) {
            for ((name, via, to, relay), (_, rounds)) in tunnels.iter().zip(&mut series) {
                let _recording =
                    match *name {
                        "Tollgate" if args.profile && round == 0 => Some(
                            profiling::Recording::start(args, tollgate.process.pid(), "connect")?,
                        ),
                        _ => None,
                    };
                let meter = RunMeter::start(cpu, load);
                let t = tunnel::throughput(via.as_ref(), *to, duration, *relay)
                    .await
                    .with_context(|| format!("CONNECT through {name}"))?;
                let during = meter.finish();
                eprintln!(
                    "   round {} {name}: {:.0} MiB/s, {}, {}",
                    round + 1,
                    t.bytes_per_sec() / (1 << 20) as f64,
                    t.cpu_secs_per_gib()
                        .map_or("no relay".into(), |c| format!("{c:.3} CPU s/GiB")),
                    conditions(&during)
                );
                rounds.push(t, during);
            }
        }
        results.connect = series;
        drop(tunnels);
        drop(relays);
        drop(remote);
    }

    if args.runs(Section::Idle) {
        let n = args.idle_connections;
        eprintln!("== RSS with {n} idle keep-alive connections");
        // Each Tollgate listener is measured in a fresh process: memory freed by
        // the connections of an earlier measurement would otherwise be reused and
        // hide the cost.
        for listener in ["ingress", "egress"] {
            let name = format!("Tollgate {listener}");
            eprintln!("   {name}");
            let fresh = Tollgate::start(
                args.tollgate_binary(),
                &cpu.to_string(),
                1,
                &db.url,
                origin.http_port,
                origin.bulk_port,
                &work.join(format!("idle-{listener}")),
            )?;
            let (addr, target) = match listener {
                "ingress" => (fresh.ingress, ingress_at(fresh.ingress, "/small")),
                _ => (fresh.egress, forward_target(fresh.egress, "/small")),
            };
            let request = exchange::get(&target.path, &target.headers);
            let measured = idle::measure(addr, &request, n, || fresh.process.tree_rss_kib())
                .await
                .map_err(|e| format!("{e:#}"));
            results.idle.push((name, measured));
        }
        let mut probes: Vec<(&str, SocketAddr, Vec<u8>, &servers::Process)> = Vec::new();
        for (name, p) in &reverse {
            let t = reverse_target(p.http1, "/small");
            probes.push((
                name,
                p.http1,
                exchange::get(&t.path, &t.headers),
                &p.process,
            ));
        }
        for (name, p) in &forward {
            let t = forward_target(p.addr, "/small");
            probes.push((name, p.addr, exchange::get(&t.path, &t.headers), &p.process));
        }
        for (name, addr, request, process) in probes {
            eprintln!("   {name}");
            let n = match name {
                "haproxy" => n.min(servers::HAPROXY_MAX_CONNECTIONS - 50),
                _ => n,
            };
            let measured = idle::measure(addr, &request, n, || process.tree_rss_kib())
                .await
                .map_err(|e| format!("{e:#}"));
            results.idle.push((name.to_owned(), measured));
        }
    }

    if args.runs(Section::Enforcement) {
        eprintln!("== enforcement latency and overshoot (defaults: flush every 1 s)");
        let (stream_agents, request_agents) = enforcement_agents.split_at(2);
        let egress = tollgate.egress;
        for agent in request_agents {
            let trial = enforcement::requests(
                db,
                agent,
                egress,
                origin.http_port,
                ENFORCEMENT_RESPONSE,
                ENFORCEMENT_LIMIT,
            )
            .await?;
            report_trial(&trial);
            results.enforcement.push(trial);
        }
        let download = 64 << 20;
        let trial = enforcement::download(
            db,
            &stream_agents[0],
            egress,
            origin.http_port,
            download,
            ENFORCEMENT_LIMIT,
        )
        .await?;
        report_trial(&trial);
        results.enforcement.push(trial);
        let trial =
            enforcement::tunnel(db, &stream_agents[1], egress, bulk_addr, ENFORCEMENT_LIMIT)
                .await?;
        report_trial(&trial);
        results.enforcement.push(trial);
    }

    results.software = software_versions();
    drop(forward);
    drop(reverse);
    drop(tollgate);
    drop(origin);
    Ok(())
}

fn report_trial(trial: &enforcement::Trial) {
    eprintln!(
        "   {:?}: {:.3} s from the limit to the block, {} bytes on the client socket, {} recorded",
        trial.kind,
        trial.latency.as_secs_f64(),
        trial.client_bytes,
        trial.recorded_bytes
    );
}

fn start_or_note<T>(
    results: &mut Results,
    name: &str,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
    if !installed(name) {
        results
            .notes
            .push(format!("{name}: not installed, skipped"));
        return None;
    }
    match start() {
        Ok(server) => Some(server),
        Err(e) => {
            results
                .notes
                .push(format!("{name}: failed to start: {e:#}"));
            None
        }
    }
}

/// `args.rounds` rounds over every target in turn (round 1 runs each target
/// once, then round 2, ...), each run with the steal while it ran; Tollgate's
/// first run is recorded by `perf` when `profile` names its pid.
fn interleaved(
    args: &Args,
    targets: &[(String, Target)],
    profile: Option<(u32, &str)>,
    mut measure: impl FnMut(&Target) -> anyhow::Result<Run>,
) -> anyhow::Result<Vec<(String, Rounds<Run>)>> {
    let mut series: Vec<(String, Rounds<Run>)> = targets
        .iter()
        .map(|(name, _)| (name.clone(), Rounds::default()))
        .collect();
    for round in 0..args.rounds.max(1) {
        for ((name, target), (_, rounds)) in targets.iter().zip(&mut series) {
            let _recording = match profile {
                Some((pid, label)) if round == 0 && name == "Tollgate" => {
                    Some(profiling::Recording::start(args, pid, label)?)
                }
                _ => None,
            };
            let meter = RunMeter::start(args.server_cpu, args.load_cpu);
            let run = measure(target).with_context(|| format!("load on {name}"))?;
            let during = meter.finish();
            eprintln!(
                "   round {} {name}: {:.0} req/s, p99 {:.2} ms, errors {}, {}",
                round + 1,
                run.requests_per_sec,
                run.p99_us / 1e3,
                run.errors,
                conditions(&during)
            );
            rounds.push(run, during);
        }
    }
    Ok(series)
}

/// "steal 0.1 %, cores busy 93 % / 99 %" (server / load) for a progress line.
fn conditions(during: &Conditions) -> String {
    let mut line = format!("steal {:.1} %", during.steal_percent);
    if let Some(busy) = during.cores {
        line.push_str(&format!(
            ", cores busy {:.0} % / {:.0} %",
            busy.server, busy.load
        ));
    }
    line
}

/// Versions of the tools and servers in the table.
fn software_versions() -> Vec<String> {
    let version = |program: &str, args: &[&str], pick: &dyn Fn(&str) -> Option<String>| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .and_then(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                pick(&text)
            })
    };
    let first_line = |text: &str| text.lines().next().map(|l| l.trim().to_owned());
    let mut out = Vec::new();
    for (program, args) in [
        ("nginx", &["-v"][..]),
        ("haproxy", &["-v"][..]),
        ("squid", &["-v"][..]),
        ("tinyproxy", &["-v"][..]),
        ("wrk", &["-v"][..]),
        ("h2load", &["--version"][..]),
    ] {
        if let Some(v) = version(program, args, &first_line) {
            out.push(v);
        }
    }
    out
}
