//! What `/healthz` and `/readyz` report: the process is up; it has finished
//! starting (migrations, spill replay, decisions loaded), hears change
//! notifications, and has reached the database recently enough to still serve
//! from its caches.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::telemetry;

/// Whether `error` came from a database that answered (as opposed to one that
/// could not be reached or timed out).
pub fn answered(error: &sqlx::Error) -> bool {
    match error {
        // Connection exceptions, operator intervention (a terminated backend, a
        // shutdown) and exhausted resources mean it did not serve us.
        sqlx::Error::Database(e) => !e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57")),
        _ => matches!(
            error,
            sqlx::Error::RowNotFound
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::ColumnNotFound(_)
        ),
    }
}

#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    started: AtomicBool,
    /// Whether change notifications (revocations, decisions) have been heard
    /// since start: once true, stays true (a dropped connection is caught up).
    listening: AtomicBool,
    /// Milliseconds after `epoch` of the last successful database operation, +1 (0 = never).
    db_ok_at: AtomicU64,
    db_down: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            started: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            db_ok_at: AtomicU64::new(0),
            db_down: AtomicBool::new(false),
        }
    }

    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// The first LISTEN for changes is in place: revocations and decisions
    /// published from now on are heard.
    pub fn mark_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    pub fn db_ok(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.db_ok_at.fetch_max(ms, Ordering::AcqRel);
        if self.db_down.swap(false, Ordering::AcqRel) {
            tracing::info!("database reachable again");
            telemetry::database_up(true);
        }
    }

    pub fn db_failed(&self, what: &str, error: &sqlx::Error) {
        if !self.db_down.swap(true, Ordering::AcqRel) {
            tracing::warn!(%error, during = what, "database unreachable; serving known agents from cache");
            telemetry::database_up(false);
        }
    }

    /// Await a database operation, recording whether the database answered: the
    /// one place database reachability is observed, so `/readyz`, the
    /// `tollgate_database_up` gauge and the directory's outage behaviour agree.
    pub async fn observe<T>(
        &self,
        what: &'static str,
        operation: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        let result = operation.await;
        match &result {
            Ok(_) => self.db_ok(),
            // An answer that is an error (a constraint, a bad row) still means
            // the database is there.
            Err(e) if answered(e) => self.db_ok(),
            Err(e) => self.db_failed(what, e),
        }
        result
    }

    /// Time since the database last answered, if it ever did.
    pub fn db_age(&self) -> Option<Duration> {
        let at = self.db_ok_at.load(Ordering::Acquire);
        (at > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(at - 1))
        })
    }

    /// Ready to take traffic: started, listening for changes (a proxy that
    /// cannot hear a revocation or a block must not take traffic), and the
    /// database answered within `max_stale` (beyond it, cached agents are no
    /// longer served anyway).
    pub fn ready(&self, max_stale: Duration) -> Result<(), &'static str> {
        if !self.started.load(Ordering::Acquire) {
            return Err("starting");
        }
        if !self.listening.load(Ordering::Acquire) {
            return Err("not yet listening for change notifications (LISTEN on the database)");
        }
        match self.db_age() {
            Some(age) if age <= max_stale => Ok(()),
            _ => Err("database unreachable for longer than proxy.directory.max_stale"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_ready_only_once_it_hears_changes() {
        let health = Health::new();
        let max_stale = Duration::from_secs(600);
        assert_eq!(health.ready(max_stale), Err("starting"));
        health.db_ok();
        health.mark_started();
        let not_listening = health.ready(max_stale).unwrap_err();
        assert!(
            not_listening.contains("change notifications"),
            "{not_listening}"
        );
        health.mark_listening();
        assert_eq!(health.ready(max_stale), Ok(()));
    }
}
