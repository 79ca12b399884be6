//! Per-agent caps (SPEC §4.6): no agent holds more than its share of the
//! proxy's connections, tunnels and WebSockets, or opens connections faster
//! than its rate, whatever the others do. Beyond a cap the request gets `429`
//! with a JSON reason, counted in `tollgate_agent_limit_refusals_total`.
//!
//! - connections: egress client connections bound to the agent (counted when
//!   the connection first authenticates, held until it and every tunnel opened
//!   on it have closed); on ingress, requests to the agent under way;
//! - tunnels: CONNECT tunnels and WebSockets open, on both listeners;
//! - connection rate: new egress connections bound per second (a token bucket
//!   holding one second's worth).
//!
//! What an agent holds is released by dropping the [`Held`] it was given, so
//! it cannot leak on any path. An agent's record lives while it holds anything
//! and for a while after (so closing and reopening does not refill its bucket).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use tollgate_core::config::AgentLimitsConfig;

use crate::telemetry::{self, Listener};
use crate::CappedMap;

/// Which cap refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Tunnels,
    ConnectionRate,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "agent_connections",
            Limit::Tunnels => "agent_tunnels",
            Limit::ConnectionRate => "agent_connection_rate",
        }
    }
}

/// What one agent holds now.
#[derive(Debug)]
struct Usage {
    connections: AtomicUsize,
    tunnels: AtomicUsize,
    /// Tokens left and when they were last topped up (at the agent's last
    /// new connection, or when the record was made).
    bucket: Mutex<(f64, Instant)>,
}

impl Usage {
    /// How long since the agent last asked for a new connection (or since its
    /// record was made).
    fn quiet_for(&self) -> Duration {
        self.bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .elapsed()
    }
}

/// Every agent's holdings on this proxy.
#[derive(Debug)]
pub struct AgentLimits {
    agents: CappedMap<Uuid, Arc<Usage>>,
    config: AgentLimitsConfig,
}

/// A connection or tunnel counted against its agent until dropped.
#[derive(Debug)]
#[must_use]
pub struct Held {
    usage: Arc<Usage>,
    limit: Limit,
}

impl Drop for Held {
    fn drop(&mut self) {
        let counter = match self.limit {
            Limit::Tunnels => &self.usage.tunnels,
            _ => &self.usage.connections,
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AgentLimits {
    pub fn new(config: AgentLimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            agents: CappedMap::default(),
            config,
        })
    }

    fn usage(&self, agent: Uuid) -> Arc<Usage> {
        if let Some(u) = self.agents.get(&agent) {
            return u.clone();
        }
        let now = Instant::now();
        let burst = self.config.new_connections_per_second as f64;
        self.agents
            .entry(agent)
            .or_insert_with(|| {
                Arc::new(Usage {
                    connections: AtomicUsize::new(0),
                    tunnels: AtomicUsize::new(0),
                    bucket: Mutex::new((burst, now)),
                })
            })
            .clone()
    }

    /// Count a new client connection (egress) against `agent`: its rate, then
    /// its cap.
    pub fn connection(&self, agent: Uuid, listener: Listener) -> Result<Held, Limit> {
        let usage = self.usage(agent);
        self.take_token(&usage)
            .map_err(|limit| refused(listener, limit))?;
        hold(usage, Limit::Connections, self.config.max_connections)
            .map_err(|limit| refused(listener, limit))
    }

    /// Count a request under way (ingress) against `agent`'s connection cap.
    pub fn request(&self, agent: Uuid, listener: Listener) -> Result<Held, Limit> {
        hold(
            self.usage(agent),
            Limit::Connections,
            self.config.max_connections,
        )
        .map_err(|limit| refused(listener, limit))
    }

    /// Count a tunnel or WebSocket against `agent`'s cap.
    pub fn tunnel(&self, agent: Uuid, listener: Listener) -> Result<Held, Limit> {
        hold(self.usage(agent), Limit::Tunnels, self.config.max_tunnels)
            .map_err(|limit| refused(listener, limit))
    }

    fn take_token(&self, usage: &Usage) -> Result<(), Limit> {
        let rate = self.config.new_connections_per_second as f64;
        let mut bucket = usage.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.1).as_secs_f64() * rate;
        *bucket = ((bucket.0 + refill).min(rate), now);
        match bucket.0 >= 1.0 {
            true => {
                bucket.0 -= 1.0;
                Ok(())
            }
            false => Err(Limit::ConnectionRate),
        }
    }

    /// Forget agents that hold nothing and have asked for no new connection
    /// for `quiet`. With `quiet` at least a second, a forgotten bucket was
    /// full again: forgetting an agent gives it nothing it did not have.
    pub fn sweep(&self, quiet: Duration) {
        // A record someone holds or is about to count on (a clone taken, not
        // yet incremented) stays, so an agent never has two.
        self.agents.retain(|_, u| {
            Arc::strong_count(u) > 1
                || u.connections.load(Ordering::Acquire) > 0
                || u.tunnels.load(Ordering::Acquire) > 0
                || u.quiet_for() < quiet
        });
    }

    /// Sweep every `every` until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        const EVERY: Duration = Duration::from_secs(10);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => self.sweep(EVERY),
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Agents with a record (for tests and metrics).
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

fn hold(usage: Arc<Usage>, limit: Limit, max: usize) -> Result<Held, Limit> {
    let counter = match limit {
        Limit::Tunnels => &usage.tunnels,
        _ => &usage.connections,
    };
    let taken = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    });
    match taken {
        Ok(_) => Ok(Held { usage, limit }),
        Err(_) => Err(limit),
    }
}

fn refused(listener: Listener, limit: Limit) -> Limit {
    telemetry::agent_limit_refused(listener, limit.as_str());
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, tunnels: usize, rate: u32) -> Arc<AgentLimits> {
        AgentLimits::new(AgentLimitsConfig {
            max_connections: connections,
            max_tunnels: tunnels,
            new_connections_per_second: rate,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn caps_hold_per_agent_and_release_on_drop() {
        let l = limits(2, 1, 100);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = l.connection(a, Listener::Egress).unwrap();
        let _second = l.connection(a, Listener::Egress).unwrap();
        assert_eq!(
            l.connection(a, Listener::Egress).unwrap_err(),
            Limit::Connections
        );
        // Another agent is not affected.
        let _other = l.connection(b, Listener::Egress).unwrap();
        drop(first);
        let _again = l.connection(a, Listener::Egress).unwrap();
        let tunnel = l.tunnel(a, Listener::Ingress).unwrap();
        assert_eq!(l.tunnel(a, Listener::Ingress).unwrap_err(), Limit::Tunnels);
        drop(tunnel);
        let _tunnel = l.tunnel(a, Listener::Ingress).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn new_connections_are_rate_limited_and_the_bucket_survives_closing() {
        let l = limits(1000, 10, 5);
        let a = Uuid::new_v4();
        for _ in 0..5 {
            drop(l.connection(a, Listener::Egress).unwrap());
        }
        assert_eq!(
            l.connection(a, Listener::Egress).unwrap_err(),
            Limit::ConnectionRate
        );
        // Holding nothing, but recently: the sweep keeps the record (and its
        // empty bucket).
        l.sweep(Duration::from_secs(10));
        assert_eq!(
            l.connection(a, Listener::Egress).unwrap_err(),
            Limit::ConnectionRate
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(l.connection(a, Listener::Egress).is_ok(), "refilled");
        tokio::time::advance(Duration::from_secs(11)).await;
        l.sweep(Duration::from_secs(10));
        assert!(l.is_empty(), "quiet agents are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_with_requests_only_is_kept_while_one_is_under_way() {
        let l = limits(10, 10, 5);
        let a = Uuid::new_v4();
        let request = l.request(a, Listener::Ingress).unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        l.sweep(Duration::from_secs(10));
        assert_eq!(l.len(), 1, "a request under way keeps the record");
        drop(request);
        l.sweep(Duration::from_secs(10));
        assert!(
            l.is_empty(),
            "no request under way, no new connection for 10 s"
        );
        // A new record starts with the full bucket the old one had refilled to.
        for _ in 0..5 {
            drop(l.connection(a, Listener::Egress).unwrap());
        }
        assert_eq!(
            l.connection(a, Listener::Egress).unwrap_err(),
            Limit::ConnectionRate
        );
    }
}
