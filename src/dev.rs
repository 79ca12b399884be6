//! `tollgate dev`: everything on one machine (SPEC §9).
//!
//! Finds or starts PostgreSQL (see `tollgate_core::local_postgres`), creates and
//! migrates the `tollgate_dev` database, seeds a demo plan, user, VPS and agent
//! (idempotently: fixed ids, existing rows kept), starts the services, prints
//! copy-paste commands, and runs until SIGINT (Ctrl-C) or SIGTERM. A private
//! PostgreSQL it started is stopped on exit, whatever the way out.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_core::billing::Period;
use tollgate_core::config::{CgroupVersion, Config, SourceConfig};
use tollgate_core::db;
use tollgate_core::local_postgres::{self, Origin, Search};

/// Database created for `tollgate dev` on a local server.
pub const DEV_DATABASE: &str = "tollgate_dev";

/// Fixed ids of the demo rows, so seeding twice changes nothing.
pub mod demo {
    use uuid::{uuid, Uuid};
    pub const PLAN: Uuid = uuid!("7011a7e0-0000-4000-8000-000000000001");
    pub const VPS_CONFIG: Uuid = uuid!("7011a7e0-0000-4000-8000-000000000002");
    pub const USER: Uuid = uuid!("7011a7e0-0000-4000-8000-000000000003");
    pub const VPS: Uuid = uuid!("7011a7e0-0000-4000-8000-000000000004");
    pub const AGENT: Uuid = uuid!("7011a7e0-0000-4000-8000-000000000005");
    pub const EMAIL: &str = "demo@tollgate.local";
    /// Provider of the demo VPS: one that bills CPU and memory, so the monitor samples it.
    pub const PROVIDER: &str = "sprites";
    /// Overage budget seeded for the current month, cents.
    pub const BUDGET_CENTS: i64 = 500;
}

/// What `seed` leaves in the database.
#[derive(Debug, Clone)]
pub struct DemoAgent {
    pub agent_id: Uuid,
    pub gateway_token: String,
    pub vps_id: Uuid,
    pub user_email: String,
}

/// Insert the demo rows unless present; return the demo agent and its token.
pub async fn seed(pool: &PgPool, vps_address: &str) -> anyhow::Result<DemoAgent> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO plans (id, name, max_agents, max_vpses,
                            overage_bandwidth_cost_per_gb_cents, overage_cpu_cost_per_hour_cents,
                            overage_memory_cost_per_gb_hour_cents)
         VALUES ($1, 'demo', 3, 3, 10, 5, 1) ON CONFLICT DO NOTHING",
    )
    .bind(demo::PLAN)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO vps_configs (id, name, provider, image, cpu_millicores, memory_mb, disk_gb)
         VALUES ($1, 'demo-small', $2, 'tollgate/demo-gateway', 1000, 1024, 10) ON CONFLICT DO NOTHING",
    )
    .bind(demo::VPS_CONFIG)
    .bind(demo::PROVIDER)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO plan_vps_configs (plan_id, vps_config_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(demo::PLAN)
        .bind(demo::VPS_CONFIG)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO users (id, email, name, plan_id) VALUES ($1, $2, 'Demo User', $3) ON CONFLICT DO NOTHING")
        .bind(demo::USER)
        .bind(demo::EMAIL)
        .bind(demo::PLAN)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO vpses (id, user_id, vps_config_id, name, provider, provider_vm_id, address, state)
         VALUES ($1, $2, $3, 'demo-vps', $4, 'demo-vm', $5, 'running') ON CONFLICT DO NOTHING",
    )
    .bind(demo::VPS)
    .bind(demo::USER)
    .bind(demo::VPS_CONFIG)
    .bind(demo::PROVIDER)
    .bind(vps_address)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO agents (id, user_id, vps_id, name) VALUES ($1, $2, $3, 'demo-agent') ON CONFLICT DO NOTHING")
        .bind(demo::AGENT)
        .bind(demo::USER)
        .bind(demo::VPS)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(demo::USER)
    .bind(Period::current().start())
    .bind(demo::BUDGET_CENTS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    let agent = db::agents::agent_by_id(pool, demo::AGENT)
        .await?
        .context("the demo agent is missing after seeding")?;
    Ok(DemoAgent {
        agent_id: agent.agent_id,
        gateway_token: agent.gateway_token,
        vps_id: agent.vps.map(|v| v.id).unwrap_or(demo::VPS),
        user_email: demo::EMAIL.into(),
    })
}

/// The build's `target/` directory: `$CARGO_TARGET_DIR`, else the directory two
/// levels above this executable (`target/<profile>/tollgate`), else `./target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.file_name().is_some_and(|n| n == "target"))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Dev adjustments on top of the loaded config: loopback listeners instead of the
/// production wildcard defaults, loopback destinations allowed so the demo works
/// offline, spill files under `target/`.
pub fn dev_config(mut config: Config, database_url: String) -> Config {
    let defaults = Config::default();
    let loopback = |addr: SocketAddr, default: SocketAddr| {
        if addr == default {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        }
    };
    config.database.url = database_url;
    let p = &mut config.proxy;
    p.egress.listen = loopback(p.egress.listen, defaults.proxy.egress.listen);
    p.ingress.listen = loopback(p.ingress.listen, defaults.proxy.ingress.listen);
    p.admin.listen = loopback(p.admin.listen, defaults.proxy.admin.listen);
    config.monitor.admin.listen =
        loopback(config.monitor.admin.listen, defaults.monitor.admin.listen);
    for net in ["127.0.0.0/8", "::1/128"] {
        let net = net.parse().expect("valid CIDR");
        if !p.egress.allow_cidrs.contains(&net) {
            p.egress.allow_cidrs.push(net);
        }
    }
    if p.meter.spill_dir == defaults.proxy.meter.spill_dir {
        p.meter.spill_dir = target_dir().join("tollgate-dev").join("spill");
    }
    let m = &mut config.monitor;
    if m.interval == defaults.monitor.interval {
        m.interval = std::time::Duration::from_secs(5);
    }
    m.providers
        .entry(demo::PROVIDER.to_owned())
        .or_insert_with(|| SourceConfig::Cgroup {
            root: PathBuf::from(CGROUP_ROOT),
            version: CgroupVersion::Auto,
            path: DEMO_CGROUP.to_owned(),
        });
    config
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The demo VPS's cgroup below each hierarchy; the dev process itself runs in it,
/// so the demo VPS's CPU and memory are those of `tollgate dev`.
const DEMO_CGROUP: &str = "tollgate-dev/{vps_id}";

/// Create the demo VPS's cgroup and move this process into it (v1: the `cpuacct`
/// and `memory` hierarchies; v2: the unified one). Best effort: without the
/// rights, the monitor's samples of the demo VPS fail and say why.
fn enter_demo_cgroup(vps_id: Uuid) {
    let root = std::path::Path::new(CGROUP_ROOT);
    let relative = DEMO_CGROUP.replace("{vps_id}", &vps_id.to_string());
    let dirs: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join(&relative)]
    } else {
        vec![
            root.join("cpuacct").join(&relative),
            root.join("memory").join(&relative),
        ]
    };
    for dir in dirs {
        let entered = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        });
        if let Err(e) = entered {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot run dev in the demo VPS's cgroup; its CPU/memory samples will fail");
        }
    }
}

/// Run `tollgate dev` until SIGINT (Ctrl-C) or SIGTERM, with PostgreSQL found or
/// started as `search` says. A private PostgreSQL it started is stopped however
/// dev ends: a signal (also one during start-up), an error, a panic.
pub async fn run(config: Config, search: Search) -> anyhow::Result<()> {
    // Signals are handled from the start, so none kills the process before it
    // has stopped the PostgreSQL it started.
    let shutdown = tollgate_core::shutdown::on_signal();
    let server = local_postgres::find_or_start_with(&search).await?;
    let _stop = StopOnExit(&server);
    if shutdown.is_cancelled() {
        return Ok(());
    }
    run_with(&server, config, shutdown).await
}

/// Stops the private PostgreSQL this process started when dropped: on return,
/// on an error and when unwinding from a panic alike.
struct StopOnExit<'a>(&'a local_postgres::Server);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.stop_if_started_here() {
            tracing::error!(error = %format!("{e:#}"), "could not stop the private PostgreSQL");
        }
    }
}

async fn run_with(
    server: &local_postgres::Server,
    config: Config,
    shutdown: tollgate_core::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let url = server.database_url(DEV_DATABASE);
    let config = dev_config(config, url.clone());
    let prepare = async {
        local_postgres::ensure_database(server, DEV_DATABASE).await?;
        let pool = db::lazy_pool(&config.database, "tollgate-dev")?;
        db::migrate(&pool)
            .await
            .context("applying migrations to the dev database")?;
        let agent = seed(&pool, "127.0.0.1")
            .await
            .context("seeding demo data")?;
        pool.close().await;
        anyhow::Ok(agent)
    };
    let agent = tokio::select! {
        agent = prepare => agent?,
        () = shutdown.cancelled() => return Ok(()),
    };

    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], config.proxy.ingress.gateway_port));
    let gateway_listener = tokio::net::TcpListener::bind(gateway_addr)
        .await
        .with_context(|| {
            format!("binding the demo gateway on {gateway_addr} (proxy.ingress.gateway_port)")
        })?;
    let _gateway = crate::demo_gateway::DemoGateway::on(gateway_listener);
    let listeners = tollgate_proxy::Listeners::bind(&config).await?;
    let local =
        |l: &Option<tokio::net::TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
    let addresses = Addresses {
        egress: local(&listeners.egress)?,
        ingress: local(&listeners.ingress)?,
        admin: listeners.admin.local_addr()?,
        gateway: gateway_addr,
    };
    let monitor_admin = tollgate_monitor::bind_admin(&config).await?;
    enter_demo_cgroup(agent.vps_id);
    let proxy = tokio::spawn(tollgate_proxy::run(
        config.clone(),
        listeners,
        tollgate_proxy::Options::default(),
        shutdown.clone(),
    ));
    let monitor = tokio::spawn(tollgate_monitor::run(
        config.clone(),
        monitor_admin,
        tollgate_monitor::Options::default(),
        shutdown.clone(),
    ));

    let origin = match &server.origin {
        Origin::DatabaseUrl => "DATABASE_URL".to_owned(),
        Origin::Local => "the server on 127.0.0.1:5432".to_owned(),
        Origin::Private {
            dir,
            started_here: true,
            ..
        } => format!(
            "a private server on cluster {}, stopped when dev exits",
            dir.join("data").display()
        ),
        Origin::Private { dir, .. } => format!(
            "a private server on cluster {}, already running, left running",
            dir.join("data").display()
        ),
    };
    print_banner(&url, &origin, &agent, &addresses);
    let proxy = proxy.await.context("proxy task")?;
    let monitor = monitor.await.context("monitor task")?;
    proxy.and(monitor)
}

/// Where the dev services listen.
struct Addresses {
    egress: Option<SocketAddr>,
    ingress: Option<SocketAddr>,
    admin: SocketAddr,
    gateway: SocketAddr,
}

fn print_banner(url: &str, origin: &str, agent: &DemoAgent, at: &Addresses) {
    let (id, token) = (agent.agent_id, &agent.gateway_token);
    let mut out = format!(
        "\nTollgate dev is up. Ctrl-C stops it.\n\n\
         database  {url}  ({origin})\n\
         user      {email}\n\
         agent     {id}\n\
         token     {token}\n\n",
        email = agent.user_email,
    );
    if let Some(egress) = at.egress {
        out.push_str(&format!(
            "Egress (forward proxy; loopback destinations are allowed in dev):\n  \
             curl -x http://{id}:{token}@{egress} 'http://{gateway}/echo/hello?from=egress'\n\n",
            gateway = at.gateway,
        ));
    }
    if let Some(ingress) = at.ingress {
        let base = format!("http://{ingress}/agents/{id}/gateway");
        out.push_str(&format!(
            "Ingress (the demo gateway on {gateway} behind the demo VPS):\n  \
             curl -H 'Authorization: Bearer {token}' '{base}/echo/hello?from=ingress'\n  \
             curl -N -H 'Authorization: Bearer {token}' {base}/sse/5/500\n  \
             curl -i -N -H 'Authorization: Bearer {token}' -H 'Connection: Upgrade' -H 'Upgrade: websocket' \\\n       \
             -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' {base}/ws\n  \
             curl --http2-prior-knowledge -H 'Authorization: Bearer {token}' {base}/echo/h2\n\n",
            gateway = at.gateway,
        ));
    }
    out.push_str(&format!(
        "Metrics:\n  curl http://{admin}/metrics\n\n\
         Usage report:\n  DATABASE_URL={url} cargo run --release -- usage\n",
        admin = at.admin,
    ));
    println!("{out}");
}
