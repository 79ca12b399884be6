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
//! - Invalidation wins over reads in flight: a read that started before an
//!   invalidation of its id is not installed (a fill reads again), so a row read
//!   just before a rotation can never bring the old token back.
//! - Revocation: each entry carries a token, [`Agent::revoked`], that relays
//!   opened with the entry watch. It passes from an entry to its successor while
//!   the credential stays valid (same gateway token, VPS and user) and is
//!   cancelled when a re-read shows it is not: token rotated, agent deleted,
//!   moved to another VPS or user. An evicted entry is re-read at once in the
//!   background, so its relays are cut within the second even if no request
//!   comes.
//! - Survives the database: while it is down, entries keep serving until they
//!   are `max_stale` old (an evicted entry too, until the database can say
//!   whether its credential still holds); unknown ids get `Unavailable` (503),
//!   not `Unknown` (407).
//!
//! Each entry carries the resolved per-VPS counter and user gate, so the request
//! path does one map lookup for auth, metering and enforcement together.
//!
//! Start-up reads nothing: a proxy in front of 100,000 agents serves its first
//! request after one read of that agent. What the directory holds is reported
//! as `tollgate_directory_entries` (by state) and an estimate of its memory,
//! `tollgate_directory_bytes`, each time it changes size.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::DirectoryConfig;
use tollgate_core::db::agents::{self, AgentRecord, VpsRecord};

use crate::enforcement::Enforcer;
use crate::gate::UserGate;
use crate::health::Health;
use crate::ingress::Gateway;
use crate::meter::{Meter, VpsCounter};
use crate::pacing::AgentBandwidth;
use crate::signal::Signal;
use crate::telemetry;
use crate::CappedMap;

/// Database reads for unknown ids at once.
const MAX_CONCURRENT_FILLS: usize = 4;
/// Agents re-read per statement when refreshing.
const REFRESH_BATCH: usize = 5_000;
/// Reads of one id a fill makes when invalidations keep landing during them.
const FILL_ATTEMPTS: usize = 3;
/// Heap bytes of a cached agent beyond the `Agent` itself: the gateway token (64
/// hex characters), the VPS's address and provider names, and the revocation
/// token's shared node.
const ENTRY_HEAP_BYTES: usize = 64 + 32 + 128;
/// First and longest wait before re-reading evicted entries again after the
/// database failed to answer.
const RECHECK_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// A known agent, as the request path needs it.
pub struct Agent {
    pub agent_id: Uuid,
    pub user_id: Uuid,
    token: Box<[u8]>,
    pub vps: Option<VpsRecord>,
    /// The egress policy that applied when the entry was read.
    pub egress_policy_id: Option<i64>,
    /// The user's plan when the entry was read.
    pub plan_id: Option<Uuid>,
    /// The agent's own bandwidth limit, shared by its streams on this proxy.
    pub bandwidth: Option<Arc<AgentBandwidth>>,
    /// The counter of the agent's VPS (none without a VPS).
    pub counter: Option<Arc<VpsCounter>>,
    pub gate: Arc<UserGate>,
    /// Where ingress requests to this agent go, worked out from `vps` by the
    /// first that needs it (a changed VPS is a new entry).
    pub gateway: OnceLock<Result<Gateway, &'static str>>,
    fetched_at: Instant,
    revoked: Arc<Signal>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.agent_id)
            .field("user_id", &self.user_id)
            .field("vps", &self.vps)
            .field("revoked", &self.revoked.is_raised())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Whether `token` is this agent's gateway token, in constant time.
    pub fn token_matches(&self, token: &[u8]) -> bool {
        crate::auth::same_secret(token, &self.token)
    }

    /// When the entry was read from the database.
    pub fn fetched_at(&self) -> Instant {
        self.fetched_at
    }

    /// Raised once the credential this entry was read with stops being valid
    /// (token rotated, agent deleted, moved to another VPS or user). Shared with
    /// the entries that succeed this one while the credential holds, so a relay
    /// that watches it is cut by whichever later change revokes it.
    pub fn revoked(&self) -> &Arc<Signal> {
        &self.revoked
    }

    /// Whether `record` carries the credential this entry was read with.
    fn same_credential(&self, record: &AgentRecord) -> bool {
        self.user_id == record.user_id
            && self.vps.as_ref().map(|v| v.id) == record.vps.as_ref().map(|v| v.id)
            && self.token_matches(record.gateway_token.as_bytes())
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

/// Reads of one id in flight, and how many invalidations of it landed meanwhile.
#[derive(Debug, Default)]
struct ReadState {
    readers: u32,
    generation: u64,
}

/// A database read of some ids in flight: knows, per id, whether an
/// invalidation landed since it started. Dropping it ends the read.
struct Reads<'a> {
    directory: &'a Directory,
    started: HashMap<Uuid, u64>,
}

impl Reads<'_> {
    /// Whether an invalidation of `id` landed since the read started. Asked with
    /// the id's `entries` shard locked, which `invalidate` takes too.
    fn superseded(&self, id: Uuid) -> bool {
        let Some(started) = self.started.get(&id) else {
            return true;
        };
        self.directory
            .reads
            .get(&id)
            .is_none_or(|s| s.generation != *started)
    }
}

impl Drop for Reads<'_> {
    fn drop(&mut self) {
        for id in self.started.keys() {
            if let Entry::Occupied(mut state) = self.directory.reads.entry(*id) {
                state.get_mut().readers -= 1;
                if state.get().readers == 0 {
                    state.remove();
                }
            }
        }
    }
}

/// What the database said about one id, as far as the directory took it in.
enum Read {
    Installed(Arc<Agent>),
    Deleted,
    /// An invalidation landed while reading: the row may be older than it.
    Superseded,
}

/// A row read from the database, with the counter and gate its entry will use.
struct Prepared {
    record: AgentRecord,
    counter: Option<Arc<VpsCounter>>,
    gate: Arc<UserGate>,
}

#[derive(Debug)]
pub struct Directory {
    /// Agents the database has (looked up on every request; no other id gets
    /// in, so it is a map the fleet's size bounds).
    entries: CappedMap<Uuid, Arc<Agent>>,
    /// Entries a change notification evicted, until a re-read says whether their
    /// credential still holds (their relays live on meanwhile).
    suspended: CappedMap<Uuid, Arc<Agent>>,
    /// Ids being read from the database. Lock order: an `entries` shard, then a
    /// `reads` or `suspended` shard, never the other way round.
    reads: DashMap<Uuid, ReadState>,
    /// Wakes the background task to re-read suspended entries.
    recheck: Notify,
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
        let directory = Self {
            entries: CappedMap::default(),
            suspended: CappedMap::default(),
            reads: DashMap::new(),
            recheck: Notify::new(),
            unknown: DashMap::new(),
            fills: Semaphore::new(MAX_CONCURRENT_FILLS),
            pool,
            meter,
            enforcer,
            health,
            config,
        };
        directory.report_size();
        directory
    }

    /// Find an agent: from memory when possible (fresh as of `now`, the
    /// request's clock reading), else from the database.
    pub async fn lookup(&self, agent_id: Uuid, now: Instant) -> Lookup {
        if let Some(found) = self.cached(agent_id, now) {
            return found;
        }
        // Boxed: the database read is large, and a request future that held it
        // inline would carry it (hyper keeps one per open connection) on the warm
        // path too.
        Box::pin(self.fill(agent_id)).await
    }

    /// Read an agent the cache cannot answer for.
    async fn fill(&self, agent_id: Uuid) -> Lookup {
        let Ok(_permit) = self.fills.acquire().await else {
            return Lookup::Unavailable;
        };
        // Another task may have filled it while we waited.
        if let Some(found) = self.cached(agent_id, Instant::now()) {
            return found;
        }
        let mut outcome = Lookup::Unavailable;
        for _ in 0..FILL_ATTEMPTS {
            match self.read(&[agent_id]).await {
                Ok(mut read) => match read.pop() {
                    Some(Read::Installed(agent)) => outcome = Lookup::Found(agent),
                    Some(Read::Deleted) => outcome = Lookup::Unknown,
                    Some(Read::Superseded) | None => continue,
                },
                Err(_) => outcome = self.serve_suspended(agent_id),
            }
            break;
        }
        let result = match outcome {
            Lookup::Found(_) => "filled",
            Lookup::Unknown => "unknown",
            Lookup::Unavailable => "unavailable",
        };
        metrics::counter!(telemetry::DIRECTORY_LOOKUPS, "result" => result).increment(1);
        self.report_size();
        outcome
    }

    /// While the database cannot answer, an entry evicted by a change keeps
    /// serving up to `max_stale`, like any cached entry.
    fn serve_suspended(&self, agent_id: Uuid) -> Lookup {
        match self.suspended.get(&agent_id) {
            Some(agent) if agent.fetched_at.elapsed() <= self.config.max_stale => {
                Lookup::Found(agent.clone())
            }
            _ => Lookup::Unavailable,
        }
    }

    fn cached(&self, agent_id: Uuid, now: Instant) -> Option<Lookup> {
        if let Some(agent) = self.entries.get(&agent_id) {
            // Served while fresh enough; past max_stale the database must confirm.
            if now.saturating_duration_since(agent.fetched_at) <= self.config.max_stale {
                return Some(Lookup::Found(agent.clone()));
            }
        }
        if let Some(at) = self.unknown.get(&agent_id) {
            if now.saturating_duration_since(*at) < self.config.negative_ttl {
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

    /// Read `ids` (at most one batch) and take in what the database says: install
    /// the agents found, forget (and revoke) those it no longer has, unless an
    /// invalidation of the id landed meanwhile. One `Read` per id, in order.
    async fn read(&self, ids: &[Uuid]) -> Result<Vec<Read>, sqlx::Error> {
        let reads = self.start_reads(ids);
        let records = self
            .health
            .observe("looking up agents", agents::agents_by_ids(&self.pool, ids))
            .await?;
        let mut found: HashMap<Uuid, AgentRecord> =
            records.into_iter().map(|r| (r.agent_id, r)).collect();
        let mut outcome = Vec::with_capacity(ids.len());
        for id in ids {
            let read = match found.remove(id) {
                // The user's decision is read (and observed) by the enforcer.
                Some(record) => self.install(self.prepare(record).await?, &reads),
                None => self.forget(*id, &reads),
            };
            outcome.push(read);
        }
        Ok(outcome)
    }

    fn start_reads(&self, ids: &[Uuid]) -> Reads<'_> {
        let started = ids
            .iter()
            .map(|id| {
                let mut state = self.reads.entry(*id).or_default();
                state.readers += 1;
                (*id, state.generation)
            })
            .collect();
        Reads {
            directory: self,
            started,
        }
    }

    /// The counter and gate for `record`, reusing the previous entry's when the
    /// VPS and user are unchanged.
    async fn prepare(&self, record: AgentRecord) -> Result<Prepared, sqlx::Error> {
        let id = record.agent_id;
        let previous = self
            .entries
            .get(&id)
            .map(|e| e.clone())
            .or_else(|| self.suspended.get(&id).map(|e| e.clone()));
        let previous = previous.as_deref();
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
        Ok(Prepared {
            record,
            counter,
            gate,
        })
    }

    /// Make `prepared` the entry of its agent, unless an invalidation landed
    /// since `reads` started. The entry it replaces (cached or suspended) hands
    /// on its revocation signal if the credential is the same, and is revoked if
    /// not.
    fn install(&self, prepared: Prepared, reads: &Reads<'_>) -> Read {
        let Prepared {
            record,
            counter,
            gate,
        } = prepared;
        let id = record.agent_id;
        let slot = self.entries.entry(id);
        if reads.superseded(id) {
            return Read::Superseded;
        }
        let cached = match &slot {
            Entry::Occupied(o) => Some(o.get().clone()),
            Entry::Vacant(_) => None,
        };
        let suspended = self.suspended.remove(&id).map(|(_, a)| a);
        // The same limit carries on with what the agent's streams have spent.
        let bandwidth = record.bandwidth_bytes_per_second.map(|rate| {
            cached
                .iter()
                .chain(suspended.iter())
                .filter_map(|old| old.bandwidth.clone())
                .find(|b| b.bytes_per_second == rate as u64)
                .unwrap_or_else(|| Arc::new(AgentBandwidth::new(rate as u64)))
        });
        let mut revoked = None;
        for old in cached.iter().chain(suspended.iter()) {
            if revoked.is_none() && old.same_credential(&record) {
                revoked = Some(old.revoked.clone());
            } else {
                revoke(old);
            }
        }
        let agent = Arc::new(Agent {
            agent_id: id,
            user_id: record.user_id,
            token: record.gateway_token.into_bytes().into_boxed_slice(),
            vps: record.vps,
            egress_policy_id: record.egress_policy_id,
            plan_id: record.plan_id,
            bandwidth,
            counter,
            gate,
            gateway: OnceLock::new(),
            fetched_at: Instant::now(),
            revoked: revoked.unwrap_or_default(),
        });
        slot.insert(agent.clone());
        self.unknown.remove(&id);
        Read::Installed(agent)
    }

    /// The database no longer has `id`: drop and revoke its entry, unless an
    /// invalidation landed since `reads` started.
    fn forget(&self, id: Uuid, reads: &Reads<'_>) -> Read {
        let slot = self.entries.entry(id);
        if reads.superseded(id) {
            return Read::Superseded;
        }
        if let Entry::Occupied(o) = slot {
            revoke(&o.remove());
        }
        if let Some((_, old)) = self.suspended.remove(&id) {
            revoke(&old);
        }
        self.remember_unknown(id);
        Read::Deleted
    }

    /// An agent's row changed: evict its entry so the next request re-reads it,
    /// make reads of it already in flight void, and re-read it at once in the
    /// background so relays on a revoked credential are cut without waiting for
    /// a request.
    pub fn invalidate(&self, agent_id: Uuid) {
        let slot = self.entries.entry(agent_id);
        if let Some(mut state) = self.reads.get_mut(&agent_id) {
            state.generation += 1;
        }
        if let Entry::Occupied(o) = slot {
            let old = o.remove();
            // Installing an entry clears the suspended one, so there is none here;
            // if there were, keeping both alive could hide one from revocation.
            if let Some(previous) = self.suspended.insert(agent_id, old) {
                revoke(&previous);
            }
        } else {
            drop(slot);
        }
        self.unknown.remove(&agent_id);
        if self.suspended.contains_key(&agent_id) {
            self.recheck.notify_one();
        }
        self.report_size();
    }

    /// Re-read entries older than `older_than` in batches; drop deleted agents.
    pub async fn refresh(&self, older_than: Duration) -> Result<usize, sqlx::Error> {
        let due: Vec<Uuid> = self
            .entries
            .iter()
            .filter(|e| e.fetched_at.elapsed() >= older_than)
            .map(|e| *e.key())
            .collect();
        let refreshed = async {
            for chunk in due.chunks(REFRESH_BATCH) {
                self.read(chunk).await?;
            }
            Ok(due.len())
        }
        .await;
        self.report_size();
        refreshed
    }

    /// Re-read the entries evicted by change notifications: reinstate those whose
    /// credential holds, revoke the others.
    async fn recheck_suspended(&self) -> Result<(), sqlx::Error> {
        let ids: Vec<Uuid> = self.suspended.iter().map(|e| *e.key()).collect();
        let rechecked = async {
            for chunk in ids.chunks(REFRESH_BATCH) {
                self.read(chunk).await?;
            }
            Ok(())
        }
        .await;
        self.report_size();
        rechecked
    }

    /// Background work: re-read evicted entries as soon as they are evicted
    /// (retrying with backoff while the database cannot answer), and every half
    /// `refresh_after` re-read what is due.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.config.refresh_after / 2).max(Duration::from_millis(500));
        let mut next_refresh = Instant::now() + every;
        let mut retry = None;
        let mut backoff = RECHECK_RETRY.0;
        loop {
            let wake = retry.map_or(next_refresh, |at: Instant| at.min(next_refresh));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.recheck.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.suspended.is_empty() {
                let rechecked = tokio::select! {
                    r = self.recheck_suspended() => r,
                    _ = shutdown.cancelled() => return,
                };
                match rechecked {
                    Ok(()) => (retry, backoff) = (None, RECHECK_RETRY.0),
                    Err(e) => {
                        tracing::debug!(error = %e, "re-reading changed agents failed; retrying");
                        retry = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(RECHECK_RETRY.1);
                    }
                }
            } else {
                retry = None;
            }
            if Instant::now() >= next_refresh {
                let refreshed = tokio::select! {
                    r = self.refresh(self.config.refresh_after) => r,
                    _ = shutdown.cancelled() => return,
                };
                if let Err(e) = refreshed {
                    tracing::debug!(error = %e, "agent refresh failed; entries keep serving until max_stale");
                }
                next_refresh = Instant::now() + every;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Estimated bytes the directory holds: its three tables at their current
    /// capacity, and per agent entry (cached or suspended) the shared `Agent`
    /// allocation with its token, VPS names and revocation node. The per-VPS
    /// counters and per-user gates belong to the meter and the enforcer.
    pub fn estimated_bytes(&self) -> usize {
        // A table slot: the key, the value and hashbrown's control byte.
        let agent_slot = size_of::<(Uuid, Arc<Agent>)>() + 1;
        let unknown_slot = size_of::<(Uuid, Instant)>() + 1;
        // The `Arc` allocation: two reference counts, then the agent.
        let agent = 2 * size_of::<usize>() + size_of::<Agent>() + ENTRY_HEAP_BYTES;
        (self.entries.capacity() + self.suspended.capacity()) * agent_slot
            + (self.entries.len() + self.suspended.len()) * agent
            + self.unknown.capacity() * unknown_slot
            + size_of::<Self>()
    }

    /// Publish how many agents the directory holds and its estimated memory.
    fn report_size(&self) {
        for (state, n) in [
            ("cached", self.entries.len()),
            ("suspended", self.suspended.len()),
            ("unknown", self.unknown.len()),
        ] {
            metrics::gauge!(telemetry::DIRECTORY_ENTRIES, "state" => state).set(n as f64);
        }
        metrics::gauge!(telemetry::DIRECTORY_BYTES).set(self.estimated_bytes() as f64);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Cut everything opened with `agent`'s credential.
fn revoke(agent: &Agent) {
    if agent.revoked.raise() {
        tracing::info!(agent_id = %agent.agent_id, "agent credential revoked: closing its relays");
    }
}
