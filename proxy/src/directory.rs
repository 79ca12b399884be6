//! The agent directory: agent id -> token, VPS, user, kept in memory so a warm
//! request never waits on the database (SPEC §4.1).
//!
//! - Filled on demand: a miss reads the agent (and its user's decision) once;
//!   concurrent misses are bounded so a flood of random ids cannot swamp the
//!   database, and ids the database does not know are remembered for
//!   `negative_ttl` in a bounded negative cache.
//! - Kept fresh: entries older than `refresh_after` are re-read in batches in the
//!   background; a NOTIFY (token rotated, VPS re-assigned or changed, agent
//!   deleted) evicts the entry at once, so the next request re-reads it.
//! - Survives the database: while it is down, entries keep serving until they
//!   are `max_stale` old; unknown ids get `Unavailable` (503), not `Unknown` (407).
//!
//! Each entry carries the resolved per-VPS counter and user gate, so the request
//! path does one map lookup for auth, metering and enforcement together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use uuid::Uuid;

use tollgate_core::config::DirectoryConfig;
use tollgate_core::db::agents::{self, AgentRecord, VpsRecord};

use crate::enforcement::{Enforcer, UserGate};
use crate::health::Health;
use crate::meter::{Meter, VpsCounter};
use crate::telemetry;

/// Database reads for unknown ids at once.
const MAX_CONCURRENT_FILLS: usize = 4;
/// Agents re-read per statement when refreshing.
const REFRESH_BATCH: usize = 5_000;

/// A known agent, as the request path needs it.
pub struct Agent {
    pub agent_id: Uuid,
    pub user_id: Uuid,
    token: Box<[u8]>,
    pub vps: Option<VpsRecord>,
    /// The counter of the agent's VPS (none without a VPS).
    pub counter: Option<Arc<VpsCounter>>,
    pub gate: Arc<UserGate>,
    fetched_at: Instant,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.agent_id)
            .field("user_id", &self.user_id)
            .field("vps", &self.vps)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Whether `token` is this agent's gateway token, in constant time.
    pub fn token_matches(&self, token: &[u8]) -> bool {
        self.token.ct_eq(token).into()
    }
}

/// Result of a lookup.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<Agent>),
    /// The database says no such agent.
    Unknown,
    /// Cannot tell: the database is unreachable and the agent is not cached (or
    /// its entry is older than `max_stale`).
    Unavailable,
}

#[derive(Debug)]
pub struct Directory {
    entries: DashMap<Uuid, Arc<Agent>>,
    unknown: DashMap<Uuid, Instant>,
    fills: Semaphore,
    pool: PgPool,
    meter: Arc<Meter>,
    enforcer: Arc<Enforcer>,
    health: Arc<Health>,
    config: DirectoryConfig,
}

impl Directory {
    pub fn new(
        pool: PgPool,
        meter: Arc<Meter>,
        enforcer: Arc<Enforcer>,
        health: Arc<Health>,
        config: DirectoryConfig,
    ) -> Self {
        Self {
            entries: DashMap::new(),
            unknown: DashMap::new(),
            fills: Semaphore::new(MAX_CONCURRENT_FILLS),
            pool,
            meter,
            enforcer,
            health,
            config,
        }
    }

    /// Find an agent: from memory when possible, else from the database.
    pub async fn lookup(&self, agent_id: Uuid) -> Lookup {
        if let Some(found) = self.cached(agent_id) {
            return found;
        }
        // Boxed: the database read is large, and a request future that held it
        // inline would carry it (hyper keeps one per open connection) on the warm
        // path too.
        Box::pin(self.fill(agent_id)).await
    }

    /// Read an agent the cache cannot answer for, one fill per id at a time.
    async fn fill(&self, agent_id: Uuid) -> Lookup {
        let Ok(_permit) = self.fills.acquire().await else {
            return Lookup::Unavailable;
        };
        // Another task may have filled it while we waited.
        if let Some(found) = self.cached(agent_id) {
            return found;
        }
        let outcome = match agents::agent_by_id(&self.pool, agent_id).await {
            Ok(Some(record)) => match self.entry(record, None).await {
                Ok(agent) => {
                    self.entries.insert(agent_id, agent.clone());
                    Lookup::Found(agent)
                }
                Err(e) => {
                    self.health.db_failed("loading a user's decision", &e);
                    Lookup::Unavailable
                }
            },
            Ok(None) => {
                self.remember_unknown(agent_id);
                Lookup::Unknown
            }
            Err(e) => {
                self.health.db_failed("looking up an agent", &e);
                Lookup::Unavailable
            }
        };
        if !matches!(outcome, Lookup::Unavailable) {
            self.health.db_ok();
        }
        let result = match outcome {
            Lookup::Found(_) => "filled",
            Lookup::Unknown => "unknown",
            Lookup::Unavailable => "unavailable",
        };
        metrics::counter!(telemetry::DIRECTORY_LOOKUPS, "result" => result).increment(1);
        outcome
    }

    fn cached(&self, agent_id: Uuid) -> Option<Lookup> {
        if let Some(agent) = self.entries.get(&agent_id) {
            // Served while fresh enough; past max_stale the database must confirm.
            if agent.fetched_at.elapsed() <= self.config.max_stale {
                return Some(Lookup::Found(agent.clone()));
            }
        }
        if let Some(at) = self.unknown.get(&agent_id) {
            if at.elapsed() < self.config.negative_ttl {
                return Some(Lookup::Unknown);
            }
        }
        None
    }

    fn remember_unknown(&self, agent_id: Uuid) {
        if self.unknown.len() >= self.config.negative_capacity {
            let ttl = self.config.negative_ttl;
            self.unknown.retain(|_, at| at.elapsed() < ttl);
            if self.unknown.len() >= self.config.negative_capacity {
                self.unknown.clear();
            }
        }
        self.unknown.insert(agent_id, Instant::now());
    }

    /// Build an entry, reusing the previous entry's counter and gate when the VPS
    /// and user are unchanged.
    async fn entry(
        &self,
        record: AgentRecord,
        previous: Option<&Agent>,
    ) -> Result<Arc<Agent>, sqlx::Error> {
        let gate = match previous.filter(|p| p.user_id == record.user_id) {
            Some(p) => p.gate.clone(),
            None => self.enforcer.gate(record.user_id).await?,
        };
        let counter =
            record
                .vps
                .as_ref()
                .map(|v| match previous.and_then(|p| p.counter.as_ref()) {
                    Some(c) if c.vps_id() == v.id && c.user_id() == record.user_id => c.clone(),
                    _ => self.meter.counter(v.id, record.user_id),
                });
        if let Some(counter) = &counter {
            gate.track(counter);
        }
        Ok(Arc::new(Agent {
            agent_id: record.agent_id,
            user_id: record.user_id,
            token: record.gateway_token.into_bytes().into_boxed_slice(),
            vps: record.vps,
            counter,
            gate,
            fetched_at: Instant::now(),
        }))
    }

    /// Forget an agent (its row changed); the next request re-reads it.
    pub fn invalidate(&self, agent_id: Uuid) {
        self.entries.remove(&agent_id);
        self.unknown.remove(&agent_id);
    }

    /// Re-read entries older than `older_than` in batches; drop deleted agents.
    pub async fn refresh(&self, older_than: Duration) -> Result<usize, sqlx::Error> {
        let due: Vec<Uuid> = self
            .entries
            .iter()
            .filter(|e| e.fetched_at.elapsed() >= older_than)
            .map(|e| *e.key())
            .collect();
        for chunk in due.chunks(REFRESH_BATCH) {
            let records = match agents::agents_by_ids(&self.pool, chunk).await {
                Ok(r) => r,
                Err(e) => {
                    self.health.db_failed("refreshing agents", &e);
                    return Err(e);
                }
            };
            let mut seen = std::collections::HashSet::with_capacity(records.len());
            for record in records {
                let id = record.agent_id;
                seen.insert(id);
                let previous = self.entries.get(&id).map(|e| e.clone());
                let fresh = self.entry(record, previous.as_deref()).await?;
                self.entries.insert(id, fresh);
            }
            for id in chunk.iter().filter(|id| !seen.contains(id)) {
                self.entries.remove(id);
            }
        }
        self.health.db_ok();
        metrics::gauge!(telemetry::DIRECTORY_ENTRIES).set(self.entries.len() as f64);
        Ok(due.len())
    }

    /// Background refresher: every half `refresh_after`, re-read what is due.
    pub async fn run_refresher(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let every = (self.config.refresh_after / 2).max(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.refresh(self.config.refresh_after).await {
                tracing::debug!(error = %e, "agent refresh failed; entries keep serving until max_stale");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
