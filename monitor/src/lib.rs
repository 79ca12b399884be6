//! Tollgate's monitor (SPEC §5): samples CPU and memory of the VPSes whose
//! provider bills them, turns readings into usage exactly once, and publishes
//! every active user's allow/block decision.
//!
//! Only one monitor is active: each instance tries a PostgreSQL advisory lock on
//! a dedicated connection; the holder leads (samples every `interval`, decides
//! the users whose inputs changed plus a share of everyone, and re-decides users
//! at once when a plan or budget changes), the others stand by
//! and try again every half interval. If the leader dies its session ends, the
//! lock is released, and a standby takes over within one interval.
//!
//! ```text
//!  leader lock ─▶ every interval: running VPSes ─▶ one request per source ─▶ readings
//!                   (agent: per VPS, bounded concurrency; timeouts)            │
//!                 accounting (counter deltas, trapezoid memory, month split)◀──┘
//!                   ─▶ held until due (write_interval share; at once near a limit)
//!                   ─▶ one transaction: sample state + usage + gauges
//!                   ─▶ decisions for users whose inputs changed + a sweep share
//!                   ─▶ usage_decisions (changed outcomes) + NOTIFY
//!  NOTIFY tollgate_billing ─▶ decide the affected users now
//! ```
//!
//! Every monitor, leader or standby, also delivers quota notifications from
//! the outbox as signed webhooks ([`webhooks`]).
#![forbid(unsafe_code)]

pub mod accounting;
pub mod cycle;
pub mod http;
pub mod pending;
pub mod sources;
pub mod telemetry;
pub mod webhooks;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::Config;
use tollgate_core::db::changes::Change;
use tollgate_core::db::{self, BILLING_CHANNEL};

use crate::cycle::{Sources, Tracker};

/// What a running monitor is doing, for callers that embed it (and tests).
#[derive(Debug, Default)]
pub struct Status {
    leader: AtomicBool,
    cycles: AtomicU64,
    db_ok: AtomicBool,
}

impl Status {
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Cycles completed while leading.
    pub fn cycles(&self) -> u64 {
        self.cycles.load(Ordering::SeqCst)
    }

    fn set_leader(&self, leading: bool) {
        self.leader.store(leading, Ordering::SeqCst);
        metrics::gauge!(telemetry::LEADER).set(if leading { 1.0 } else { 0.0 });
    }

    fn set_db(&self, ok: bool) {
        self.db_ok.store(ok, Ordering::SeqCst);
        metrics::gauge!(telemetry::DATABASE_UP).set(if ok { 1.0 } else { 0.0 });
    }
}

/// Bind the monitor's admin listener (`monitor.admin.listen`).
pub async fn bind_admin(config: &Config) -> anyhow::Result<TcpListener> {
    let addr = config.monitor.admin.listen;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding monitor.admin.listen {addr}"))
}

/// Start-up choices.
#[derive(Clone, Default)]
pub struct Options {
    /// Apply migrations at start.
    pub migrate: bool,
    /// Shared status (a fresh one if not given).
    pub status: Option<Arc<Status>>,
}

/// Run the monitor until `shutdown`. `admin` serves `/metrics`, `/healthz` and
/// `/readyz` (ready when the database answers, leading or standing by).
pub async fn run(
    config: Config,
    admin: TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tollgate_core::telemetry::metrics_handle();
    telemetry::describe();
    let status = options.status.unwrap_or_default();
    let name = format!("monitor:{}", Uuid::new_v4());
    let pool = db::lazy_pool(&config.database, "tollgate-monitor")?;

    let admin_stop = CancellationToken::new();
    let ready = {
        let status = status.clone();
        Arc::new(move || {
            if status.db_ok.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("database unreachable".to_owned())
            }
        })
    };
    let admin_task = tokio::spawn(tollgate_core::admin::serve(
        admin,
        ready,
        admin_stop.clone(),
    ));

    if options.migrate {
        db::migrate_when_reachable(&pool, &shutdown, |e| {
            status.set_db(false);
            tracing::warn!(error = %e, "database unreachable; retrying migrations");
        })
        .await?;
        status.set_db(true);
    }
    tracing::info!(%name, interval = ?config.monitor.interval, "monitor started");
    // Quota notifications are delivered by every monitor, leader or standby.
    let webhooks_stop = CancellationToken::new();
    let endpoint = webhooks::Endpoint::of(&config.monitor.webhooks)?;
    let webhooks_task = tokio::spawn(webhooks::run(
        config.monitor.webhooks.clone(),
        endpoint,
        pool.clone(),
        webhooks_stop.clone(),
    ));
    let sources = Sources::from_config(&config.monitor);
    let standby_wait = (config.monitor.interval / 2).max(Duration::from_millis(200));
    while !shutdown.is_cancelled() {
        match try_lead(&config, &status).await {
            Ok(Some(lock)) => {
                tracing::info!(%name, "leading: this monitor samples and decides");
                status.set_leader(true);
                lead(&config, &pool, &sources, &name, &status, lock, &shutdown).await;
                status.set_leader(false);
                tracing::info!(%name, "no longer leading");
            }
            Ok(None) => status.set_leader(false),
            Err(e) => {
                status.set_db(false);
                tracing::warn!(error = %e, "cannot reach the database to elect a leader; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(standby_wait) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    webhooks_stop.cancel();
    let _ = webhooks_task.await;
    admin_stop.cancel();
    let _ = admin_task.await;
    pool.close().await;
    tracing::info!("monitor stopped");
    Ok(())
}

/// Try the leader lock on a dedicated connection; `Some` holds it while alive.
async fn try_lead(config: &Config, status: &Status) -> Result<Option<PgConnection>, sqlx::Error> {
    let options = db::connect_options(&config.database, "tollgate-monitor-leader")?;
    let mut conn = tokio::time::timeout(config.database.connect_timeout, options.connect())
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    status.set_db(true);
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(config.monitor.leader_lock_key)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

/// Lead until the lock connection fails or `shutdown`.
async fn lead(
    config: &Config,
    pool: &PgPool,
    sources: &Sources,
    name: &str,
    status: &Status,
    mut lock: PgConnection,
    shutdown: &CancellationToken,
) {
    let m = &config.monitor;
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(mut l) => match l.listen(BILLING_CHANNEL).await {
            Ok(()) => Some(l),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let mut ticks = tokio::time::interval(m.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A new leader knows nothing of what changed before it: its first cycle decides everyone.
    let mut tracker = Tracker::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                // Still the leader? The lock lives as long as this session.
                let alive = tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(&mut lock)).await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!("leader lock connection lost");
                    status.set_db(false);
                    return;
                }
                match cycle::timed_cycle(pool, m, sources, name, &mut tracker).await {
                    Ok(report) => {
                        status.set_db(true);
                        status.cycles.fetch_add(1, Ordering::SeqCst);
                        if report.failed > 0 {
                            tracing::info!(sampled = report.sampled, failed = report.failed, "cycle finished with failed samples");
                        }
                    }
                    Err(e) => {
                        status.set_db(false);
                        tracing::warn!(error = %e, "cycle failed; the next one retries");
                    }
                }
            }
            n = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(Some(n)) => match Change::parse(n.channel(), n.payload()) {
                    Ok(Change::Billing(change)) => {
                        if let Err(e) = cycle::on_billing_change(pool, change, name, &mut tracker).await {
                            tracing::warn!(error = %e, "re-deciding after a plan or budget change failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed change notification"),
                },
                Ok(None) => {
                    // Reconnected: changes may have been missed; the next cycle decides everyone.
                    tracker.decide_everyone_next();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the change-notification connection");
                    listener = None;
                }
            },
            _ = shutdown.cancelled() => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(m.leader_lock_key).execute(&mut lock).await;
                let _ = lock.close().await;
                return;
            }
        }
    }
}
