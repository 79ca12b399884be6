//! Bandwidth pacing: a user throttled instead of blocked, and an agent's own
//! bandwidth limit, hold their bytes to a rate.
//!
//! A [`Pacer`] is a token bucket kept as one number, the instant at which the
//! bytes already passed will have been paid for at the rate (the "theoretical
//! arrival time" of GCRA). Passing `n` bytes moves it `n / rate` later, from no
//! earlier than now; the bytes may be written once it is reached. A chunk is
//! thus written when it has been paid for, never before, and idle time earns
//! no credit, so no window from the first byte on sees more than the rate.
//! Every connection of a user (or an agent) shares one pacer, lock-free.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The bytes of a stream, held to a rate together with every other stream
/// sharing the pacer.
#[derive(Debug)]
pub struct Pacer {
    /// Nanoseconds after `origin` at which what was passed is paid for.
    paid_until: AtomicU64,
    origin: Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    pub fn new() -> Self {
        Self {
            paid_until: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// Pass `bytes` at `bytes_per_second`: the instant they may be written,
    /// or `None` if that is now.
    pub fn pass(&self, bytes: usize, bytes_per_second: u64) -> Option<Instant> {
        if bytes == 0 || bytes_per_second == 0 {
            return None;
        }
        let cost = (bytes as u128 * 1_000_000_000 / u128::from(bytes_per_second))
            .min(u128::from(u64::MAX / 4)) as u64;
        let now = self.origin.elapsed().as_nanos() as u64;
        let mut due = 0;
        let _ = self
            .paid_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |paid| {
                due = paid.max(now).saturating_add(cost);
                Some(due)
            });
        (due > now).then(|| self.origin + Duration::from_nanos(due))
    }
}

/// Which way bytes go, from the agent's side: an agent's bandwidth limit holds
/// each way to its rate on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    ToAgent,
    FromAgent,
}

/// An agent's own bandwidth limit (`agents.bandwidth_bytes_per_second`), each
/// way, on this proxy.
#[derive(Debug)]
pub struct AgentBandwidth {
    pub bytes_per_second: u64,
    to_agent: Pacer,
    from_agent: Pacer,
}

impl AgentBandwidth {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second,
            to_agent: Pacer::new(),
            from_agent: Pacer::new(),
        }
    }

    /// When `bytes` going `way` may be written (`None`: now).
    pub fn pass(&self, way: Way, bytes: usize) -> Option<Instant> {
        let pacer = match way {
            Way::ToAgent => &self.to_agent,
            Way::FromAgent => &self.from_agent,
        };
        pacer.pass(bytes, self.bytes_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_are_written_once_paid_for_and_idle_time_earns_nothing() {
        let pacer = Pacer::new();
        let start = Instant::now();
        // 1000 B/s: 500 bytes are paid for half a second on.
        assert_eq!(
            pacer.pass(500, 1000),
            Some(start + Duration::from_millis(500))
        );
        // The next 500 queue behind them, whoever passes them.
        assert_eq!(pacer.pass(500, 1000), Some(start + Duration::from_secs(1)));
        // Ten idle seconds later, no burst is owed: the same cost again.
        tokio::time::advance(Duration::from_secs(11)).await;
        let now = Instant::now();
        assert_eq!(
            pacer.pass(100, 1000),
            Some(now + Duration::from_millis(100))
        );
        assert_eq!(pacer.pass(0, 1000), None);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_sharing_a_pacer_share_its_rate() {
        let pacer = std::sync::Arc::new(Pacer::new());
        let start = Instant::now();
        let mut last = start;
        for i in 0..100 {
            // Two streams, taking turns, 10 KiB chunks at 100 KiB/s.
            let due = pacer.pass(10 * 1024, 100 * 1024).unwrap();
            assert!(due >= last, "chunk {i} paid after the one before");
            last = due;
        }
        assert_eq!(last - start, Duration::from_secs(10));
    }

    #[test]
    fn each_way_has_its_own_rate() {
        let agent = AgentBandwidth::new(1000);
        let to = agent.pass(Way::ToAgent, 1000).unwrap();
        let from = agent.pass(Way::FromAgent, 1000).unwrap();
        let apart = if to > from { to - from } else { from - to };
        assert!(apart < Duration::from_millis(50), "{apart:?}");
    }
}
