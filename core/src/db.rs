//! PostgreSQL access: the connection pool, migrations, and typed queries for what
//! the proxy, the monitor and the CLI read and write. Queries are batched (`ANY`,
//! `UNNEST`): nothing here loops over users or VPSes with one statement each.

pub mod agents;
pub mod changes;
pub mod decisions;
pub mod leases;
pub mod policies;
pub mod samples;
pub mod usage;

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseConfig;

/// Migrations 001-012 reproduce the platform schema; 013+ are Tollgate's own.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// NOTIFY channel: payload is an agent id whose token, VPS or VPS details changed.
pub const AGENT_CHANNEL: &str = "tollgate_agent";
/// NOTIFY channel: payload is `user:<id>` or `plan:<id>` whose limits/budget changed.
pub const BILLING_CHANNEL: &str = "tollgate_billing";
/// NOTIFY channel: payload is `<user id>:<period_start>` whose decision flipped.
pub const DECISION_CHANNEL: &str = "tollgate_decision";

/// Connection options for `config`, tagged with `application_name` so operators
/// can tell proxies from monitors in `pg_stat_activity`.
pub fn connect_options(
    config: &DatabaseConfig,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    let statement_timeout = format!("{}ms", config.statement_timeout.as_millis());
    Ok(PgConnectOptions::from_str(&config.url)?
        .application_name(application_name)
        .options([
            ("statement_timeout", statement_timeout.as_str()),
            ("TimeZone", "UTC"),
        ]))
}

/// A pool that connects lazily: creating it never fails because the server is down.
pub fn lazy_pool(config: &DatabaseConfig, application_name: &str) -> Result<PgPool, sqlx::Error> {
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_lazy_with(connect_options(config, application_name)?))
}

/// Apply pending migrations. Safe to run from several processes at once: the
/// migrator serialises them on a PostgreSQL advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Apply migrations, retrying with backoff (up to 10 s apart) while the server is
/// unreachable, until done or `shutdown`. `unreachable` hears each failed attempt.
pub async fn migrate_when_reachable(
    pool: &PgPool,
    shutdown: &tokio_util::sync::CancellationToken,
    unreachable: impl Fn(&sqlx::Error),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_connection_error(&e) => {
                unreachable(&e)
            }
            Err(e) => return Err(e).context("applying migrations"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => anyhow::bail!("shut down before the database became reachable"),
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// Whether `error` means the server could not be reached or the connection broke,
/// as opposed to a statement the server rejected.
pub fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    ) || matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}
