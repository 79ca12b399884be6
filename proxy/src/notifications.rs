//! LISTEN for changes that must take effect within a second: rotated tokens and
//! changed VPSes (directory), plan and budget changes and published decisions
//! (enforcement), and egress policy changes (`agent_policy`). Whatever was
//! read before the connection listened may have changed unheard (at start,
//! while it was being made; after it dropped, while it was down), so each time
//! it listens every cached agent and decision is re-read.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tollgate_core::db::changes::Change;

use crate::agent_policy::Policies;
use crate::directory::Directory;
use crate::enforcement::{Enforcer, Event};
use crate::health::Health;
use crate::telemetry;

const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(
    pool: PgPool,
    directory: Arc<Directory>,
    enforcer: Arc<Enforcer>,
    policies: Arc<Policies>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen_all(Change::CHANNELS).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match health.observe("listening for changes", listener).await {
            Ok(l) => l,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Whatever was read before this connection listened (at start: agents
        // and decisions loaded while it was being made) may have changed
        // unheard: it is read again now that changes are heard.
        if !std::mem::take(&mut first) {
            metrics::counter!(telemetry::NOTIFY_RECONNECTS).increment(1);
        }
        catch_up(&directory, &enforcer, &policies).await;
        health.mark_listening();
        loop {
            let next = tokio::select! {
                n = health.observe("receiving change notifications", listener.try_recv()) => n,
                _ = shutdown.cancelled() => return,
            };
            match next {
                Ok(Some(n)) => dispatch(&n, &directory, &enforcer, &policies),
                // The connection dropped and was re-established: we may have missed some.
                Ok(None) => {
                    metrics::counter!(telemetry::NOTIFY_RECONNECTS).increment(1);
                    catch_up(&directory, &enforcer, &policies).await;
                }
                Err(_) => break,
            }
        }
    }
}

async fn catch_up(directory: &Directory, enforcer: &Enforcer, policies: &Policies) {
    policies.reload();
    tracing::info!(
        "listening for changes: re-reading cached agents and decisions, which may have changed unheard"
    );
    if let Err(e) = directory.refresh(Duration::ZERO).await {
        tracing::warn!(error = %e, "re-reading agents failed; they refresh on their own schedule");
    }
    enforcer.send(Event::CatchUp);
}

fn dispatch(
    n: &PgNotification,
    directory: &Arc<Directory>,
    enforcer: &Arc<Enforcer>,
    policies: &Policies,
) {
    match Change::parse(n.channel(), n.payload()) {
        Ok(Change::Agent(agent)) => directory.invalidate(agent),
        Ok(Change::Billing(change)) => enforcer.send(Event::BillingChanged(change)),
        Ok(Change::Decision { user, period }) => enforcer.send(Event::Published { user, period }),
        Ok(Change::EgressPolicy) => policies.reload(),
        Err(e) => tracing::warn!(error = %e, "ignoring a malformed change notification"),
    }
}
