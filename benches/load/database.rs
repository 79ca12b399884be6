//! The harness's own database: created fresh (`tollgate_bench_<unix time>`) on
//! the server `tollgate dev` and the tests use, migrated with Tollgate's
//! migrations, seeded with plain SQL, dropped at the end. Databases left by a
//! killed run are dropped at the next start once they are an hour old.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

use tollgate_core::billing::Period;
use tollgate_core::local_postgres::{self, Origin};

const PREFIX: &str = "tollgate_bench_";

pub struct BenchDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
    admin: PgConnectOptions,
}

/// An agent on a running VPS at 127.0.0.1, with its user.
#[derive(Debug, Clone)]
pub struct SeededAgent {
    pub agent_id: Uuid,
    pub token: String,
    pub vps_id: Uuid,
}

impl BenchDb {
    pub async fn create(target_dir: &std::path::Path) -> anyhow::Result<BenchDb> {
        let server = local_postgres::find_or_start(target_dir).await?;
        let admin = match server.origin {
            // DATABASE_URL names one database; create a sibling on the same server.
            Origin::DatabaseUrl => PgConnectOptions::from_str(&server.url)?.database("postgres"),
            _ => server.options.clone(),
        };
        let mut conn = admin.connect().await.context("connecting to PostgreSQL")?;
        drop_stale(&mut conn).await;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let name = format!("{PREFIX}{secs}");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await?;
        let options = admin.clone().database(&name);
        let url = database_url(&server.url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        tollgate_core::db::migrate(&pool)
            .await
            .context("applying migrations")?;
        Ok(BenchDb {
            pool,
            url,
            name,
            admin,
        })
    }

    /// Drop the database (closing every connection to it).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut conn = self.admin.connect().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }

    /// A plan with `max_bandwidth_bytes` and overage rate 0, a user on it, a
    /// running VPS at 127.0.0.1 and its agent.
    pub async fn agent(
        &self,
        label: &str,
        max_bandwidth_bytes: i64,
    ) -> anyhow::Result<SeededAgent> {
        let mut tx = self.pool.begin().await?;
        let plan: Uuid = sqlx::query_scalar(
            "INSERT INTO plans (name, max_agents, max_vpses, max_bandwidth_bytes, overage_bandwidth_cost_per_gb_cents)
             VALUES ($1, 1, 1, $2, 0) RETURNING id",
        )
        .bind(format!("bench-{label}"))
        .bind(max_bandwidth_bytes)
        .fetch_one(&mut *tx)
        .await?;
        let user_id: Uuid =
            sqlx::query_scalar("INSERT INTO users (email, plan_id) VALUES ($1, $2) RETURNING id")
                .bind(format!("{label}@bench.tollgate"))
                .bind(plan)
                .fetch_one(&mut *tx)
                .await?;
        let config = vps_config(&mut tx, label).await?;
        let vps_id: Uuid = sqlx::query_scalar(
            "INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
             VALUES ($1, $2, $3, 'hetzner', $3, '127.0.0.1', 'running') RETURNING id",
        )
        .bind(user_id)
        .bind(config)
        .bind(format!("vps-{label}"))
        .fetch_one(&mut *tx)
        .await?;
        let (agent_id, token): (Uuid, String) = sqlx::query_as(
            "INSERT INTO agents (user_id, vps_id, name) VALUES ($1, $2, $3) RETURNING id, gateway_token",
        )
        .bind(user_id)
        .bind(vps_id)
        .bind(format!("agent-{label}"))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SeededAgent {
            agent_id,
            token,
            vps_id,
        })
    }

    /// Give `agent` an egress policy of `rules` rules that lets it reach the
    /// loopback origin: `rules - 1` that do not match it (exact hosts,
    /// wildcards, CIDRs of several lengths, port lists, a quarter of them
    /// deny rules) and the allow rule for 127.0.0.0/8 that does, under a
    /// default of deny.
    pub async fn egress_policy(&self, agent: Uuid, rules: usize) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let policy: i64 = sqlx::query_scalar(
            "INSERT INTO egress_policies (name, default_action) VALUES ($1, 'deny') RETURNING id",
        )
        .bind(format!("bench-{agent}"))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO egress_policy_rules (policy_id, action, host, cidr, ports)
             SELECT $1,
                    CASE WHEN g % 4 = 0 THEN 'deny' ELSE 'allow' END,
                    CASE WHEN g % 3 = 0 THEN 'svc' || g || '.tenant.example.com'
                         WHEN g % 3 = 1 THEN '*.zone' || g || '.example.net' END,
                    CASE WHEN g % 3 = 2
                         THEN network((((g * 7) % 200 + 11) || '.' || g % 256 || '.0.0/' || (8 + g % 17))::inet) END,
                    CASE WHEN g % 5 = 0 THEN ARRAY[443, 8443] END
             FROM generate_series(1, $2) AS g",
        )
        .bind(policy)
        .bind(i32::try_from(rules.saturating_sub(1))?)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO egress_policy_rules (policy_id, action, cidr) VALUES ($1, 'allow', '127.0.0.0/8')",
        )
        .bind(policy)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE agents SET egress_policy_id = $2 WHERE id = $1")
            .bind(agent)
            .bind(policy)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `n` running VPSes of one user (a fleet to flush); returns (user, VPS ids).
    pub async fn fleet(&self, n: usize) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
        let mut tx = self.pool.begin().await?;
        let user: Uuid = sqlx::query_scalar(
            "INSERT INTO users (email) VALUES ('fleet@bench.tollgate') RETURNING id",
        )
        .fetch_one(&mut *tx)
        .await?;
        let config = vps_config(&mut tx, "fleet").await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
             SELECT $1, $2, 'fleet-' || g, 'hetzner', 'fleet-' || g, '127.0.0.1', 'running'
             FROM generate_series(1, $3) AS g
             RETURNING id",
        )
        .bind(user)
        .bind(config)
        .bind(i32::try_from(n)?)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        sqlx::query("ANALYZE vpses").execute(&self.pool).await?;
        Ok((user, ids))
    }

    /// Bandwidth recorded for `vps` in the current period.
    pub async fn bandwidth(&self, vps: Uuid) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT bandwidth_bytes FROM vps_usage_periods WHERE vps_id = $1 AND period_start = $2",
        )
        .bind(vps)
        .bind(Period::current().start())
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0))
    }
}

async fn vps_config(tx: &mut sqlx::PgConnection, label: &str) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
         VALUES ($1, 'hetzner', 'bench', 1000, 1024, 10) RETURNING id",
    )
    .bind(format!("bench-{label}"))
    .fetch_one(tx)
    .await?)
}

/// The URL of database `name` on the server at `server_url`.
fn database_url(server_url: &str, name: &str) -> String {
    let (base, query) = server_url
        .split_once('?')
        .map_or((server_url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    match query {
        Some(q) => format!("{}/{name}?{q}", &base[..path_start]),
        None => format!("{}/{name}", &base[..path_start]),
    }
}

/// Drop bench databases older than an hour (left by killed runs).
async fn drop_stale(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("{PREFIX}%"))
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for name in names {
        let created: Option<u64> = name[PREFIX.len()..].parse().ok();
        if created.is_some_and(|t| t + 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *conn)
                .await;
        }
    }
}
