//! This proxy's headroom leases (SPEC §12, `core::db::leases`): the worker that
//! asks PostgreSQL for slices of a user's headroom when a gate runs low, keeps
//! them alive, gives idle ones back, and suspends them all when it cannot.
//!
//! A gate spends its lease on the hot path without a database round trip; it
//! asks for more once half is spent, so traffic far from its limit never waits.
//! A slice is an eighth of what the user has left fleet-wide, between
//! `min_slice_bytes` and `max_slice_bytes`: large far from the limit, small near
//! it, so the last bytes are shared out among replicas in ever smaller pieces.
//!
//! If the database cannot be reached, or leases cannot be renewed before they
//! lapse, leases are suspended: every gate falls back to the headroom of the
//! last decision it knows (SPEC §4.5), and a new epoch begins once the
//! database answers again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{BlockReason, Period};
use tollgate_core::clock::Clock;
use tollgate_core::config::LeaseConfig;
use tollgate_core::db::leases::{self, Holder, Settlement};

use crate::enforcement::Enforcer;
use crate::gate::{LeaseAsks, UserGate, UNLEASED};
use crate::health::Health;
use crate::meter::Drained;
use crate::telemetry;

/// Grants under way at once.
const CONCURRENT_GRANTS: usize = 16;
/// How long a user whose headroom was spent waits before asking again.
const SPENT_RETRY: Duration = Duration::from_secs(1);
/// Renewals in a row without traffic after which a lease far from its user's
/// limit goes back (about a minute with the default ttl).
const IDLE_RENEWALS: u8 = 6;
/// Renewals between two clean-ups of spent and dead lease rows.
const TIDY_EVERY: u64 = 30;
/// A user with less than this many slices left unleased is near their limit:
/// their idle leases go back at once rather than at the next renewal.
const TIGHT_SLICES: u64 = 8;

/// The lease side of this proxy.
#[derive(Debug)]
pub struct Leases {
    pool: PgPool,
    health: Arc<Health>,
    config: LeaseConfig,
    instance: Uuid,
    /// The current epoch; bumped whenever every lease is dropped.
    epoch: Arc<AtomicI64>,
    suspended: AtomicBool,
    asks: mpsc::UnboundedSender<Uuid>,
    /// Live proxies, as of the last renewal: a throttled user's rate is
    /// divided among them.
    replicas: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
}

pub type Asks = mpsc::UnboundedReceiver<Uuid>;

impl Leases {
    pub fn new(
        pool: PgPool,
        health: Arc<Health>,
        config: LeaseConfig,
        instance: Uuid,
        clock: Arc<dyn Clock>,
    ) -> (Arc<Self>, Asks) {
        let (asks, receiver) = mpsc::unbounded_channel();
        let leases = Self {
            pool,
            health,
            config,
            instance,
            epoch: Arc::new(AtomicI64::new(0)),
            suspended: AtomicBool::new(false),
            asks,
            replicas: Arc::new(AtomicU64::new(1)),
            clock,
        };
        (Arc::new(leases), receiver)
    }

    /// What a new gate asks with; `None` when leases are switched off.
    pub fn asks(&self) -> Option<LeaseAsks> {
        self.config.enabled.then(|| LeaseAsks {
            asks: self.asks.clone(),
            wait: self.config.wait,
            replicas: self.replicas.clone(),
        })
    }

    /// The lease a new gate starts with.
    pub fn initial(&self) -> u64 {
        match self.config.enabled && !self.suspended.load(Ordering::Acquire) {
            true => 0,
            false => UNLEASED,
        }
    }

    fn holder(&self) -> Holder {
        Holder {
            instance: self.instance,
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// What a flush of `drained` takes off this proxy's leases: the database
    /// side goes into the batch, the local side is applied when the batch has
    /// been written and its users decided on (see [`Settled`]).
    pub fn settlement(
        &self,
        drained: &[Drained],
        gate: impl Fn(Uuid) -> Option<Arc<UserGate>>,
    ) -> (Option<Settlement>, Settled) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut per_user: HashMap<Uuid, u64> = HashMap::new();
        for d in drained {
            *per_user.entry(d.user_id).or_default() += d.rx + d.tx;
        }
        let mut gates = Vec::new();
        let mut users = Vec::new();
        for (user, bytes) in per_user {
            if let Some(g) = gate(user).filter(|g| g.lease() != UNLEASED) {
                gates.push((g, bytes));
                users.push((user, bytes));
            }
        }
        let settled = Settled {
            epoch: self.epoch.clone(),
            expected: epoch,
            gates,
        };
        if users.is_empty() {
            return (None, settled);
        }
        let settlement = Settlement {
            epoch,
            period: Some(self.clock.period()),
            users,
        };
        (Some(settlement), settled)
    }

    /// The worker: answer asks, renew, give idle leases back, suspend and
    /// resume. Gives every lease back at shutdown.
    pub async fn run(
        self: Arc<Self>,
        enforcer: Arc<Enforcer>,
        mut asks: Asks,
        stop: CancellationToken,
    ) {
        if !self.config.enabled {
            return;
        }
        let permits = Arc::new(Semaphore::new(CONCURRENT_GRANTS));
        let mut tight: HashSet<Uuid> = HashSet::new();
        let (tight_tx, mut tight_rx) = mpsc::unbounded_channel::<Uuid>();
        let mut period = self.clock.period();
        let renew_every = self.config.ttl / 3;
        let mut valid_until = Instant::now();
        let mut renewals = 0u64;
        // Register this proxy as a holder before the first grant.
        self.renew(&enforcer, period, &[], true, &mut valid_until)
            .await;
        let mut last_renewal = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ask = asks.recv() => {
                    let Some(user) = ask else { return };
                    let Some(gate) = enforcer.known_gate(user) else { continue };
                    let permit = permits.clone().acquire_owned().await.expect("never closed");
                    let (this, enforcer, tight_tx) = (self.clone(), enforcer.clone(), tight_tx.clone());
                    tokio::spawn(async move {
                        if this.grant(&enforcer, &gate, period).await {
                            let _ = tight_tx.send(gate.user_id());
                        }
                        drop(permit);
                    });
                }
                Some(user) = tight_rx.recv() => { tight.insert(user); }
                _ = tick.tick() => {
                    let now_period = self.clock.period();
                    if now_period != period {
                        tracing::info!(period = %now_period, "new billing period: leases start over");
                        period = now_period;
                        self.start_over(&enforcer, 0);
                        tight.clear();
                    }
                    if self.suspended.load(Ordering::Acquire) {
                        if last_renewal.elapsed() >= renew_every {
                            last_renewal = Instant::now();
                            self.resume(&enforcer, period, &mut valid_until).await;
                        }
                        continue;
                    }
                    let due = last_renewal.elapsed() >= renew_every;
                    let returned = self.idle(&enforcer, &mut tight, due);
                    if due || !returned.is_empty() {
                        let mut tidy = false;
                        if due {
                            last_renewal = Instant::now();
                            renewals += 1;
                            tidy = renewals.is_multiple_of(TIDY_EVERY);
                        }
                        self.renew(&enforcer, period, &returned, tidy, &mut valid_until).await;
                    }
                    if Instant::now() >= valid_until {
                        self.suspend(&enforcer, "leases could not be renewed before they lapse");
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
    }

    /// Ask for a slice for `gate`; `true` if the user is near their limit.
    async fn grant(&self, enforcer: &Enforcer, gate: &UserGate, period: Period) -> bool {
        if self.suspended.load(Ordering::Acquire) {
            gate.reset_lease(UNLEASED);
            return false;
        }
        let holder = self.holder();
        let fresh = gate.take_lease_lost();
        let deficit = gate.unflushed().saturating_sub(gate.lease());
        let (min, max) = (self.config.min_slice_bytes, self.config.max_slice_bytes);
        let slice = |unleased: u64| {
            (unleased / 8)
                .clamp(min, max)
                .max(deficit.saturating_add(min))
        };
        let granted = self
            .health
            .observe(
                "leasing headroom",
                leases::grant(&self.pool, gate.user_id(), period, holder, fresh, slice),
            )
            .await;
        let retry = Instant::now() + SPENT_RETRY;
        match granted {
            Ok(Some(grant)) if !grant.holder_live => {
                self.suspend(enforcer, "this proxy's leases lapsed in the database");
                gate.reset_lease(UNLEASED);
                false
            }
            Ok(Some(grant)) => {
                if self.epoch.load(Ordering::Acquire) != holder.epoch {
                    // Leases started over meanwhile: this grant belongs to a
                    // dropped epoch and is not spent.
                    gate.lease_answered(0, None, retry);
                    return false;
                }
                telemetry::lease_granted(grant.granted);
                let after = gate.lease().saturating_add(grant.granted);
                let spent = (gate.unflushed() > after).then(|| {
                    grant
                        .reason
                        .or(grant.billing.decide().blocked)
                        .unwrap_or(BlockReason::Bandwidth)
                });
                gate.lease_answered(grant.granted, spent, retry);
                grant.unleased < max.saturating_mul(TIGHT_SLICES)
            }
            Ok(None) => {
                gate.lease_answered(0, Some(BlockReason::NoPlan), retry);
                false
            }
            Err(e) => {
                // This user alone falls back to the last decision until the
                // next renewal, and the grant after it starts their lease over.
                telemetry::lease_failed();
                tracing::debug!(error = %e, "leasing headroom failed; the last decision applies until the next renewal");
                gate.lose_lease();
                false
            }
        }
    }

    /// Leases nobody is using, taken back from their gates: tight ones every
    /// tick, every idle one when a renewal is `due`.
    fn idle(&self, enforcer: &Enforcer, tight: &mut HashSet<Uuid>, due: bool) -> Vec<(Uuid, u64)> {
        let mut returned = Vec::new();
        if due {
            enforcer.for_each_gate(|gate| {
                let bytes = gate.release_lease_idle_for(IDLE_RENEWALS);
                if bytes > 0 {
                    returned.push((gate.user_id(), bytes));
                }
            });
            tight.clear();
        } else {
            tight.retain(|user| match enforcer.known_gate(*user) {
                Some(gate) => {
                    let bytes = gate.release_idle_lease();
                    if bytes > 0 {
                        returned.push((*user, bytes));
                    }
                    gate.lease() != 0
                }
                None => false,
            });
        }
        returned
    }

    async fn renew(
        &self,
        enforcer: &Enforcer,
        period: Period,
        returned: &[(Uuid, u64)],
        tidy: bool,
        valid_until: &mut Instant,
    ) {
        let started = Instant::now();
        let renewed = self.health.observe(
            "renewing leases",
            leases::renew(
                &self.pool,
                self.holder(),
                period,
                returned,
                self.config.ttl,
                tidy,
            ),
        );
        match renewed.await {
            Ok(live) => {
                self.replicas.store(live, Ordering::Release);
                *valid_until = started + self.config.ttl - self.config.ttl / 3;
                enforcer.for_each_gate(UserGate::lease_again);
            }
            Err(e) => {
                telemetry::lease_failed();
                tracing::debug!(error = %e, "renewing leases failed; retrying");
                if Instant::now() >= *valid_until {
                    self.suspend(enforcer, "leases could not be renewed before they lapse");
                }
            }
        }
    }

    /// Stop trusting every lease: a new epoch, and gates fall back to the last
    /// decisions.
    fn suspend(&self, enforcer: &Enforcer, why: &str) {
        if !self.suspended.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                why,
                "headroom leases suspended; enforcing the last known decisions"
            );
            self.start_over(enforcer, UNLEASED);
        }
    }

    /// Try to start a new epoch once the database answers again.
    async fn resume(&self, enforcer: &Enforcer, period: Period, valid_until: &mut Instant) {
        let started = Instant::now();
        let next = Holder {
            instance: self.instance,
            epoch: self.epoch.load(Ordering::Acquire) + 1,
        };
        let renewed = self.health.observe(
            "resuming leases",
            leases::renew(&self.pool, next, period, &[], self.config.ttl, true),
        );
        if let Ok(live) = renewed.await {
            self.replicas.store(live, Ordering::Release);
            *valid_until = started + self.config.ttl - self.config.ttl / 3;
            self.suspended.store(false, Ordering::Release);
            self.start_over(enforcer, 0);
            tracing::info!("headroom leases resumed");
        }
    }

    /// A new epoch: every gate's lease becomes `lease`.
    fn start_over(&self, enforcer: &Enforcer, lease: u64) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        enforcer.for_each_gate(|gate| {
            gate.reset_lease(lease);
        });
    }

    /// Give every lease of this proxy back (after the final flush).
    pub async fn release_all(&self) {
        if !self.config.enabled {
            return;
        }
        match leases::release_all(&self.pool, self.instance).await {
            Ok(n) => tracing::debug!(leases = n, "leases given back"),
            Err(e) => {
                tracing::info!(error = %e, "leases could not be given back; they lapse on their own")
            }
        }
    }
}

/// The local side of a [`Settlement`]: once its batch is written and its users
/// decided on, [`Settled::apply`] takes the bytes off the gates' leases (unless
/// leases started over meanwhile). Apply it just before the batch's bytes stop
/// counting as unsettled, so the lease never looks larger than it is. Dropped
/// without applying (a batch spilled or given up), it changes nothing: a lease
/// left too large in the database only holds headroom back until it lapses.
#[derive(Debug, Default)]
pub struct Settled {
    epoch: Arc<AtomicI64>,
    expected: i64,
    gates: Vec<(Arc<UserGate>, u64)>,
}

impl Settled {
    pub fn apply(self) {
        if self.epoch.load(Ordering::Acquire) != self.expected {
            return;
        }
        for (gate, bytes) in &self.gates {
            gate.settle_lease(*bytes);
        }
    }
}
