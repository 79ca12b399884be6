//! The hot-path side of enforcement (SPEC §4.4): each user's decision in force,
//! checked in memory on every request and every relayed chunk, and the guard a
//! stream or tunnel carries so it stops the moment its user is blocked or its
//! agent's credential is revoked.
//!
//! Gates are kept current by the enforcer's worker (`enforcement`), which is the
//! only writer; the request path only reads them.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{BlockReason, Period};

use crate::meter::VpsCounter;

/// A user is blocked: why, and for which month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub reason: BlockReason,
    pub period: Period,
}

fn reason_code(reason: Option<BlockReason>) -> u8 {
    match reason {
        None => 0,
        Some(r) => {
            1 + BlockReason::ALL
                .iter()
                .position(|x| *x == r)
                .expect("listed") as u8
        }
    }
}

fn reason_of(code: u8) -> Option<BlockReason> {
    code.checked_sub(1).map(|i| BlockReason::ALL[i as usize])
}

/// `headroom` when none is known: only the published decision applies.
const NO_HEADROOM: u64 = u64::MAX;

/// The decision in force for one user, and the token their long-lived streams
/// watch.
///
/// Between decisions, the gate also refuses once the bytes this proxy has
/// counted for the user but not yet written exceed the bandwidth headroom the
/// last evaluation left (`billing::bandwidth_headroom`): unflushed usage counts
/// at once, not a flush interval later.
#[derive(Debug)]
pub struct UserGate {
    user_id: Uuid,
    reason: AtomicU8,
    /// Days since the epoch of the decision's period start.
    period_day: AtomicI64,
    cut: Mutex<CancellationToken>,
    /// Bandwidth bytes left before the decision flips, as of the last evaluation.
    headroom: AtomicU64,
    /// The reason the decision will flip with, once the headroom is used up.
    headroom_reason: AtomicU8,
    /// Counters of the user's VPSes that this proxy meters.
    counters: RwLock<Vec<Arc<VpsCounter>>>,
}

impl UserGate {
    pub(crate) fn new(user_id: Uuid) -> Self {
        Self {
            user_id,
            reason: AtomicU8::new(0),
            period_day: AtomicI64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            headroom: AtomicU64::new(NO_HEADROOM),
            headroom_reason: AtomicU8::new(0),
            counters: RwLock::new(Vec::new()),
        }
    }

    /// Count `counter`'s unflushed bytes against this user's headroom.
    pub fn track(&self, counter: &Arc<VpsCounter>) {
        let known = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|c| Arc::ptr_eq(c, counter));
        if !known {
            // Checked again under the write lock: two fills of one agent at
            // once must not count its VPS twice.
            let mut counters = self.counters.write().unwrap_or_else(|p| p.into_inner());
            if !counters.iter().any(|c| Arc::ptr_eq(c, counter)) {
                counters.push(counter.clone());
            }
        }
    }

    pub(crate) fn set_headroom(&self, headroom: Option<(u64, BlockReason)>) {
        match headroom {
            Some((bytes, reason)) => {
                self.headroom_reason
                    .store(reason_code(Some(reason)), Ordering::Release);
                self.headroom.store(bytes, Ordering::Release);
            }
            None => self.headroom.store(NO_HEADROOM, Ordering::Release),
        }
    }

    /// Bytes counted for this user here and not yet written.
    fn unflushed(&self) -> u64 {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.unsettled())
            .sum()
    }

    pub fn user_id(&self) -> Uuid {
        self.user_id
    }

    /// `Err` if the user is blocked. Take [`UserGate::cut_token`] *before* calling
    /// this, so a block landing in between still reaches the stream.
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        if let Some(reason) = reason_of(self.reason.load(Ordering::SeqCst)) {
            return Err(Blocked {
                reason,
                period: self.period(),
            });
        }
        let headroom = self.headroom.load(Ordering::Acquire);
        if headroom != NO_HEADROOM && self.unflushed() > headroom {
            let reason = reason_of(self.headroom_reason.load(Ordering::Acquire))
                .unwrap_or(BlockReason::Bandwidth);
            return Err(Blocked {
                reason,
                period: self.period(),
            });
        }
        Ok(())
    }

    /// A token cancelled when this user next becomes blocked.
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn period(&self) -> Period {
        let day = self.period_day.load(Ordering::Acquire);
        chrono::NaiveDate::from_num_days_from_ce_opt(day as i32)
            .and_then(Period::starting)
            .unwrap_or_else(Period::current)
    }

    /// Set the decision; returns the previous reason.
    pub(crate) fn set(&self, reason: Option<BlockReason>, period: Period) -> Option<BlockReason> {
        use chrono::Datelike;
        self.period_day.store(
            i64::from(period.start().num_days_from_ce()),
            Ordering::Release,
        );
        let previous = reason_of(self.reason.swap(reason_code(reason), Ordering::SeqCst));
        if reason.is_some() && previous.is_none() {
            let mut token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
            token.cancel();
            *token = CancellationToken::new();
        }
        previous
    }
}

/// What a request, stream or tunnel watches: its user's cut token (taken before
/// the decision is checked, so a block landing in between still reaches it), its
/// user's gate (for bytes past the headroom), and its agent's revocation token
/// (cancelled when the credential it was opened with stops being valid).
#[derive(Debug, Clone)]
pub struct StreamGuard {
    cut: CancellationToken,
    revoked: Option<CancellationToken>,
    gate: Option<Arc<UserGate>>,
}

impl StreamGuard {
    /// Guard for `gate`'s user and, when given, the credential `revoked` belongs
    /// to. Check it with [`StreamGuard::check`] afterwards.
    pub fn new(gate: &Arc<UserGate>, revoked: Option<CancellationToken>) -> Self {
        Self {
            cut: gate.cut_token(),
            revoked,
            gate: Some(gate.clone()),
        }
    }

    /// A guard that only watches `cut`.
    pub fn from_token(cut: CancellationToken) -> Self {
        Self {
            cut,
            revoked: None,
            gate: None,
        }
    }

    /// `Err` if the user is blocked now (by decision or by unflushed bytes).
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        self.gate.as_ref().map_or(Ok(()), |g| g.check())
    }

    /// Whether the credential this guard was opened with has been revoked.
    #[inline]
    pub fn revoked(&self) -> bool {
        self.revoked.as_ref().is_some_and(|r| r.is_cancelled())
    }

    /// Whether the stream must stop now.
    #[inline]
    pub fn tripped_now(&self) -> bool {
        self.cut.is_cancelled() || self.revoked() || self.check().is_err()
    }

    /// Resolves when the stream must stop: at once on a block decision or a
    /// revocation; within `every` when unflushed bytes pass the headroom.
    pub async fn tripped(&self, every: Duration) {
        let headroom = async {
            loop {
                tokio::time::sleep(every).await;
                if self.check().is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = self.stopped() => {}
            _ = headroom => {}
        }
    }

    /// Resolves on a block decision or a revocation (not on headroom, which is
    /// checked per chunk).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let (cut, revoked) = (self.cut.clone(), self.revoked.clone());
        async move {
            match revoked {
                Some(revoked) => tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = revoked.cancelled() => {}
                },
                None => cut.cancelled().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_bytes_past_the_headroom_block_before_the_next_decision() {
        let meter = crate::meter::Meter::new();
        let gate = UserGate::new(Uuid::new_v4());
        let (a, b) = (
            meter.counter(Uuid::new_v4(), gate.user_id),
            meter.counter(Uuid::new_v4(), gate.user_id),
        );
        gate.track(&a);
        gate.track(&b);
        gate.track(&a);
        a.add_rx(10_000);
        assert!(
            gate.check().is_ok(),
            "no headroom known: only decisions apply"
        );
        gate.set_headroom(Some((10_100, BlockReason::BudgetExhausted)));
        b.add_tx(100);
        assert!(
            gate.check().is_ok(),
            "exactly at the headroom is still allowed"
        );
        b.add_tx(1);
        assert_eq!(
            gate.check().unwrap_err().reason,
            BlockReason::BudgetExhausted
        );
        // A flush drains the counters and a fresh evaluation resets the headroom.
        meter.drain();
        gate.set_headroom(Some((5, BlockReason::Bandwidth)));
        assert!(gate.check().is_ok());
    }

    #[test]
    fn reason_codes_round_trip() {
        assert_eq!(reason_of(reason_code(None)), None);
        for r in BlockReason::ALL {
            assert_eq!(reason_of(reason_code(Some(r))), Some(r));
        }
    }

    #[test]
    fn blocking_cancels_tokens_taken_before_and_not_after() {
        let gate = UserGate::new(Uuid::new_v4());
        let period = Period::current();
        let before = gate.cut_token();
        assert!(gate.check().is_ok());
        gate.set(Some(BlockReason::Bandwidth), period);
        assert!(before.is_cancelled());
        assert_eq!(
            gate.check(),
            Err(Blocked {
                reason: BlockReason::Bandwidth,
                period
            })
        );
        // Still blocked with another reason: no second cut needed, state updates.
        let during = gate.cut_token();
        gate.set(Some(BlockReason::BudgetExhausted), period);
        assert!(!during.is_cancelled());
        gate.set(None, period);
        assert!(gate.check().is_ok());
        let after = gate.cut_token();
        assert!(!after.is_cancelled());
    }
}
