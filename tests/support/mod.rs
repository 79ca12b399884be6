//! Test support: a fresh, migrated PostgreSQL database per test, on a server
//! found or started exactly as `tollgate dev` does (no environment needed), and
//! helpers to insert the rows tests build on.
#![allow(dead_code)]

pub mod client;
pub mod deploy;
pub mod hostile;
pub mod hostile_load;
pub mod logs;
pub mod monitor;
pub mod origin;
pub mod pg_relay;
pub mod proxy;
pub mod service;
pub mod wait;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

use tollgate_core::local_postgres::{self, Server};

const PREFIX: &str = "tollgate_t_";

/// The shared server, found once per test process.
pub async fn server() -> &'static Server {
    static SERVER: OnceCell<Server> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("CARGO_TARGET_TMPDIR is inside target/")
                .to_path_buf();
            let server = local_postgres::find_or_start(&target)
                .await
                .expect("a PostgreSQL server");
            drop_stale_databases(&server).await;
            server
        })
        .await
}

/// A fresh database with every migration applied.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// Rotate `agent`'s gateway token to `token` (64 lowercase hex characters).
    pub async fn set_token(&self, agent: Uuid, token: &str) {
        sqlx::query("UPDATE agents SET gateway_token = $2 WHERE id = $1")
            .bind(agent)
            .bind(token)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        tollgate_core::db::migrate(&db.pool)
            .await
            .expect("migrations apply");
        db
    }

    /// A fresh database with no migrations applied.
    pub async fn empty() -> TestDb {
        let server = server().await;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!(
            "{PREFIX}{secs}_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        let url = if server.origin == local_postgres::Origin::DatabaseUrl {
            // DATABASE_URL names one database; create siblings on the same server.
            let mut options = PgConnectOptions::from_str(&server.url).unwrap();
            options = options.database("postgres");
            create_database(&options, &name).await;
            replace_database(&server.url, &name)
        } else {
            create_database(&server.options, &name).await;
            server.database_url(&name)
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to the test database");
        TestDb { pool, url, name }
    }

    /// Insert a plan with the given limits/rates (everything else default).
    pub async fn plan(&self, name: &str, max_bandwidth_bytes: i64, bandwidth_rate: i64) -> Uuid {
        sqlx::query_scalar(
            "INSERT INTO plans (name, max_agents, max_vpses, max_bandwidth_bytes, overage_bandwidth_cost_per_gb_cents)
             VALUES ($1, 5, 5, $2, $3) RETURNING id",
        )
        .bind(name)
        .bind(max_bandwidth_bytes)
        .bind(bandwidth_rate)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn user(&self, email: &str, plan: Option<Uuid>) -> Uuid {
        sqlx::query_scalar("INSERT INTO users (email, plan_id) VALUES ($1, $2) RETURNING id")
            .bind(email)
            .bind(plan)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// A VPS in `state` for `user` on `provider`, with its own config row.
    pub async fn vps(&self, user: Uuid, provider: &str, address: &str, state: &str) -> Uuid {
        let config: Uuid = sqlx::query_scalar(
            "INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
             VALUES ($1, $2, 'img', 1000, 1024, 10) RETURNING id",
        )
        .bind(format!("cfg-{}", Uuid::new_v4()))
        .bind(provider)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        sqlx::query_scalar(
            "INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
             VALUES ($1, $2, 'vps', $3, 'vm-' || gen_random_uuid(), $4, $5::vps_state) RETURNING id",
        )
        .bind(user)
        .bind(config)
        .bind(provider)
        .bind(address)
        .bind(state)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// An agent on `vps` (or none); returns its id and generated token.
    pub async fn agent(&self, user: Uuid, vps: Option<Uuid>) -> (Uuid, String) {
        sqlx::query_as("INSERT INTO agents (user_id, vps_id, name) VALUES ($1, $2, 'agent') RETURNING id, gateway_token")
            .bind(user)
            .bind(vps)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

async fn create_database(admin: &PgConnectOptions, name: &str) {
    let mut conn = admin
        .connect()
        .await
        .expect("connect to the maintenance database");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Drop test databases left behind more than an hour ago (by crashed or killed runs).
async fn drop_stale_databases(server: &Server) {
    let mut options = server.options.clone();
    if server.origin == local_postgres::Origin::DatabaseUrl {
        options = options.database("postgres");
    }
    let Ok(mut conn) = options.connect().await else {
        return;
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("{PREFIX}%"))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for name in names {
        let created: Option<u64> = name[PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|s| s.parse().ok());
        if created.is_some_and(|t| t + 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    }
    conn.close().await.ok();
}

/// A plan (1 TiB bandwidth, rate 0), a user on it, a running VPS and its agent.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub plan: Uuid,
    pub user: Uuid,
    pub vps: Uuid,
    pub agent: Uuid,
    pub token: String,
}

impl Fixture {
    /// `Proxy-Authorization` value for the agent.
    pub fn basic(&self) -> String {
        client::basic(self.agent, &self.token)
    }
}

impl TestDb {
    pub async fn fixture(&self, provider: &str) -> Fixture {
        let plan = self
            .plan(&format!("plan-{}", Uuid::new_v4()), 1 << 40, 0)
            .await;
        let user = self
            .user(&format!("{}@example.com", Uuid::new_v4()), Some(plan))
            .await;
        let vps = self.vps(user, provider, "127.0.0.1", "running").await;
        let (agent, token) = self.agent(user, Some(vps)).await;
        Fixture {
            plan,
            user,
            vps,
            agent,
            token,
        }
    }

    /// `UPDATE plans SET {set} WHERE id = plan`, e.g. `"max_cpu_ms = 300"`.
    pub async fn update_plan(&self, plan: Uuid, set: &str) {
        sqlx::query(&format!("UPDATE plans SET {set} WHERE id = $1"))
            .bind(plan)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Set `user`'s overage budget for the current period.
    pub async fn set_budget(&self, user: Uuid, cents: i64) {
        sqlx::query(
            "INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, period_start) DO UPDATE SET budget_cents = EXCLUDED.budget_cents",
        )
        .bind(user)
        .bind(tollgate_core::billing::Period::current().start())
        .bind(cents)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Publish a block of `user` the way the monitor does.
    pub async fn publish_block(&self, user: Uuid, reason: tollgate_core::billing::BlockReason) {
        let decision = tollgate_core::billing::Decision {
            blocked: Some(reason),
            figures: tollgate_core::billing::decide(None, &Default::default(), 0).figures,
            on_exhausted: Default::default(),
        };
        let period = tollgate_core::billing::Period::current();
        tollgate_core::db::decisions::publish(&self.pool, period, &[(user, decision)], "monitor")
            .await
            .unwrap();
    }

    /// (rx, tx, bandwidth) recorded for `vps` in the current period.
    pub async fn usage(&self, vps: Uuid) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT bandwidth_rx_bytes, bandwidth_tx_bytes, bandwidth_bytes FROM vps_usage_periods
             WHERE vps_id = $1 AND period_start = $2",
        )
        .bind(vps)
        .bind(tollgate_core::billing::Period::current().start())
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .unwrap_or((0, 0, 0))
    }

    /// Wait until `vps` shows exactly (rx, tx) (and their sum); panics with the
    /// last value otherwise. That nothing more is counted afterwards is checked
    /// with [`TestDb::assert_usage`] once the proxy has stopped.
    pub async fn expect_usage(&self, vps: Uuid, rx: u64, tx: u64, within: std::time::Duration) {
        let want = (rx as i64, tx as i64, (rx + tx) as i64);
        wait::eventually(
            within,
            format!("usage (rx, tx, total) of VPS {vps} = {want:?}"),
            || async {
                let usage = self.usage(vps).await;
                wait::holds(usage == want, usage)
            },
        )
        .await;
    }

    /// `vps` shows exactly (rx, tx) now. Called after the proxy has stopped: its
    /// final flush has been written, so nothing was counted twice or late.
    pub async fn assert_usage(&self, vps: Uuid, rx: u64, tx: u64) {
        assert_eq!(
            self.usage(vps).await,
            (rx as i64, tx as i64, (rx + tx) as i64),
            "usage (rx, tx, total) of VPS {vps} after the proxy stopped"
        );
    }
}

/// Host and port of the test PostgreSQL server.
pub async fn server_addr() -> std::net::SocketAddr {
    let s = server().await;
    let host = if s.options.get_host().starts_with('/') {
        "127.0.0.1"
    } else {
        s.options.get_host()
    };
    let ip: std::net::IpAddr = host
        .parse()
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    std::net::SocketAddr::new(ip, s.options.get_port())
}

/// Path of the built `tollgate` binary.
pub fn tollgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

/// The value of the counter `name` with exactly these labels (0 if absent), from
/// this process's metrics recorder.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = tollgate_core::telemetry::render_metrics();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            let inside = &l[name.len() + 1..l.find('}').unwrap_or(l.len())];
            let have: Vec<&str> = inside.split(',').collect();
            have.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}
