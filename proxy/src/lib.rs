//! Tollgate's metering proxy: one HTTP engine (hyper + tokio) serving the egress
//! forward proxy and the ingress gateway proxy, sharing one agent directory, one
//! meter, one flusher, one enforcer and one admin listener.
//!
//! ```text
//!  client socket ─▶ server (limits, TLS, HTTP/1 fast path or hyper + framing guard, HTTP/2) ─▶ handle
//!      │ egress: MeteredIo counts here                                        │
//!      ▼                                                                      ▼
//!  Stages::proxy:  target/route ─▶ auth (directory) ─▶ agent caps ─▶ enforcement (gate)
//!                  ─▶ destination (egress policy / the VPS) ─▶ relay (pooled HTTP,
//!                  CONNECT tunnel, upgrade) ─▶ upstream (ingress: MeteredIo counts here)
//!  every request ends once, in exchange (metric + event + decision log line); errors
//!  become responses in rescue
//!  meter ──every flush_interval──▶ flusher ──(ledger, exactly once)──▶ PostgreSQL
//!                                     └──▶ enforcer re-evaluates flushed users ──▶ gates
//!  PostgreSQL NOTIFY ──▶ notifications ──▶ directory (evict, revoke) / enforcer (apply)
//! ```
//!
//! The usage API ([`usage_api`], `[proxy.usage_api]`) answers on a listener of
//! its own, from the same billing rules.
//!
//! `docs/request-path.md` walks through the stages. [`run`] takes its listeners
//! and shutdown token from the caller, so tests bind port 0 and stop it at will.
#![deny(unsafe_code)] // but `splice`, the system calls std does not wrap, `allocator`, `h1::parsed_value` and `inbound::Origin::text`

pub mod agent_limits;
pub mod agent_policy;
pub mod allocator;
pub mod auth;
pub mod body;
pub mod decision_log;
pub mod directory;
pub mod egress;
pub mod egress_policy;
pub mod enforcement;
pub mod exchange;
pub mod fields;
pub mod flusher;
pub mod framing;
pub mod gate;
pub mod h1;
pub mod h1_server;
pub mod headers;
pub mod health;
pub mod inbound;
pub mod ingress;
pub mod leases;
pub mod meter;
pub mod notifications;
pub mod pacing;
pub mod relay;
pub mod rescue;
pub mod server;
pub mod signal;
pub mod sni;
pub mod splice;
pub mod telemetry;
pub mod upstream;
pub mod usage_api;
pub mod workers;

/// A concurrent map on the request path whose size the proxy's own caps or
/// the fleet bound (pooled connections and their places, agents holding
/// connections, the directory's agents), hashed
/// with foldhash: seeded at random per map, a fraction of SipHash's cost on a
/// short key. A map a client can fill with keys of its choosing keeps std's
/// SipHash.
pub type CappedMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::config::{Config, TlsConfig};
use tollgate_core::{admin, db};

use crate::agent_limits::AgentLimits;
use crate::agent_policy::Policies as AgentPolicies;
use crate::decision_log::DecisionLog;
use crate::directory::Directory;
use crate::egress::Egress;
use crate::egress_policy::{Dial, EgressPolicy, Resolve, SystemResolver, TcpDialer};
use crate::enforcement::Enforcer;
use crate::flusher::Flusher;
use crate::health::Health;
use crate::ingress::Ingress;
use crate::leases::Leases;
use crate::meter::Meter;
use crate::relay::Relays;
use crate::server::{Limits, Stages};
use crate::signal::Signal;
use crate::upstream::{Connector, Pool, PoolLimits};
use crate::workers::{Load, Workers};

/// The proxy's sockets, bound by the caller.
pub struct Listeners {
    pub egress: Option<TcpListener>,
    pub ingress: Option<TcpListener>,
    pub admin: TcpListener,
    /// The usage API, when `proxy.usage_api.enabled`.
    pub usage_api: Option<TcpListener>,
}

impl Listeners {
    /// Bind the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let p = &config.proxy;
        let bind = |addr: SocketAddr, key: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {key} {addr}"))
        };
        Ok(Listeners {
            egress: match p.egress.enabled {
                true => Some(bind(p.egress.listen, "proxy.egress.listen").await?),
                false => None,
            },
            ingress: match p.ingress.enabled {
                true => Some(bind(p.ingress.listen, "proxy.ingress.listen").await?),
                false => None,
            },
            admin: bind(p.admin.listen, "proxy.admin.listen").await?,
            usage_api: match p.usage_api.enabled {
                true => Some(bind(p.usage_api.listen, "proxy.usage_api.listen").await?),
                false => None,
            },
        })
    }
}

/// How the proxy reaches the outside world and tells the time. Tests substitute
/// resolvers and dialers that can only ever reach loopback, and clocks set near
/// a month boundary.
#[derive(Clone)]
pub struct Seams {
    pub resolver: Arc<dyn Resolve>,
    pub dialer: Arc<dyn Dial>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Seams {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            dialer: Arc::new(TcpDialer),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Start-up choices.
#[derive(Clone, Default)]
pub struct Options {
    /// Apply migrations at start (retrying until the database answers).
    pub migrate: bool,
    pub seams: Seams,
    /// Serving threads, the caller's included (`workers`; 0 or 1: the
    /// caller's runtime serves alone).
    pub workers: usize,
}

/// What every listener's accept loops share.
struct Serving {
    /// Raised when `run`'s shutdown token is cancelled; what connections
    /// watch between requests (`signal`: read without a lock).
    shutdown: Arc<Signal>,
    tracker: TaskTracker,
    workers: Workers,
    /// Open connections per serving thread, over every listener.
    load: Load,
}

impl Serving {
    /// Serve `listener` with `stages` (TLS from `tls`, when configured) until
    /// shutdown: one accept loop on each serving thread, all taking
    /// connections from the same socket and placing each on the thread
    /// serving the fewest (`workers::Load`).
    fn start<S: Stages>(
        &self,
        stages: Arc<S>,
        listener: TcpListener,
        limits: Limits,
        tls: &Option<TlsConfig>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let tls = match tls {
            Some(tls) => Some(server::tls_acceptor(tls, server::alpn::<S>())?),
            None => None,
        };
        let name = S::SHAPE.listener.as_str();
        let addr = listener.local_addr()?;
        tracing::info!(listener = name, listen = %addr, tls = tls.is_some(), threads = self.workers.count(), "listening");
        // Each thread's runtime watches the socket for itself.
        let socket = listener.into_std()?;
        let mut sockets = (0..self.workers.count())
            .map(|_| socket.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("sharing the {name} socket {addr} between threads"))?
            .into_iter();
        // One connection limit for the listener, whichever thread accepts.
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        // Each thread's inbox for the connections others hand it.
        let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..self.workers.count())
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let inboxes: Arc<[_]> = inboxes.into();
        receivers.reverse();
        Ok(self.workers.on_each(|here| {
            let socket = sockets.next().expect("a socket per thread");
            let sharing = server::Sharing {
                here,
                load: self.load.clone(),
                inboxes: inboxes.clone(),
                inbox: receivers.pop().expect("an inbox per thread"),
            };
            let (stages, tls, slots) = (stages.clone(), tls.clone(), slots.clone());
            let (shutdown, tracker) = (self.shutdown.clone(), self.tracker.clone());
            async move {
                match TcpListener::from_std(socket) {
                    Ok(listener) => {
                        server::run(
                            stages, listener, limits, slots, tls, sharing, shutdown, tracker,
                        )
                        .await
                    }
                    Err(e) => tracing::error!(listener = name, error = %e, "cannot watch the listening socket"),
                }
            }
        }))
    }
}

/// Run the proxy until `shutdown`, then drain, flush and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The recorder must exist before metrics are described, or the help texts are lost.
    tollgate_core::telemetry::metrics_handle();
    telemetry::describe();
    let instance_id = Uuid::new_v4();
    let health = Arc::new(Health::new());
    let pool = db::lazy_pool(&config.database, "tollgate-proxy")?;
    let background = CancellationToken::new();

    let admin_stop = CancellationToken::new();
    let ready = {
        let (health, max_stale, shutdown) = (
            health.clone(),
            config.proxy.directory.max_stale,
            shutdown.clone(),
        );
        Arc::new(move || {
            if shutdown.is_cancelled() {
                return Err("draining".to_owned());
            }
            health.ready(max_stale).map_err(str::to_owned)
        })
    };
    let admin_task = tokio::spawn(admin::serve(listeners.admin, ready, admin_stop.clone()));

    if options.migrate {
        db::migrate_when_reachable(&pool, &shutdown, |e| {
            health.db_failed("applying migrations", e)
        })
        .await?;
        health.db_ok();
    }

    let meter = Arc::new(Meter::with_destination_top_n(
        config.proxy.meter.destination_top_n,
    ));
    let (leases, asks) = Leases::new(
        pool.clone(),
        health.clone(),
        config.proxy.leases.clone(),
        instance_id,
        options.seams.clock.clone(),
    );
    let (enforcer, events) = Enforcer::new(
        pool.clone(),
        health.clone(),
        format!("proxy:{instance_id}"),
        config.proxy.meter.decision_refresh,
        options.seams.clock.clone(),
        leases.clone(),
    );
    let enforcer = Arc::new(enforcer);
    let directory = Arc::new(Directory::new(
        pool.clone(),
        meter.clone(),
        enforcer.clone(),
        health.clone(),
        config.proxy.directory.clone(),
    ));
    let mut flusher = Flusher::new(
        meter.clone(),
        pool.clone(),
        enforcer.clone(),
        health.clone(),
        config.proxy.meter.clone(),
        instance_id,
        options.seams.clock.clone(),
    );
    let spilled = flusher.load_spills()?;
    if spilled > 0 {
        tracing::info!(batches = spilled, "spilled batches queued for replay");
    }

    let background_tasks = TaskTracker::new();
    background_tasks.spawn(enforcer.clone().run(events, background.clone()));
    background_tasks.spawn(
        leases
            .clone()
            .run(enforcer.clone(), asks, background.clone()),
    );
    background_tasks.spawn(directory.clone().run_refresher(background.clone()));
    let policies = AgentPolicies::new();
    background_tasks.spawn(policies.clone().run(pool.clone(), background.clone()));
    background_tasks.spawn(notifications::run(
        pool.clone(),
        directory.clone(),
        enforcer.clone(),
        policies.clone(),
        health.clone(),
        background.clone(),
    ));
    let flusher_stop = CancellationToken::new();
    let flusher_task = tokio::spawn(flusher.run(flusher_stop.clone()));

    // Started before any listener, stopped after the drain: every exchange's
    // line is written.
    let (decision_log, decision_writer) = DecisionLog::start(&config.proxy.decision_log)
        .await
        .context("starting the decision log")?;

    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let relays = Relays {
        tracker: connections.clone(),
        hard_stop: hard_stop.clone(),
    };
    let connector = Connector {
        resolver: options.seams.resolver.clone(),
        dialer: options.seams.dialer.clone(),
    };
    let agent_limits = AgentLimits::new(config.proxy.agent_limits.clone());
    background_tasks.spawn(agent_limits.clone().run_sweeper(background.clone()));
    let mut accept_loops = Vec::new();
    let workers = Workers::start(options.workers).context("starting the serving threads")?;
    let serving = Serving {
        shutdown: Arc::new(Signal::new()),
        tracker: connections.clone(),
        load: Load::new(workers.count()),
        workers,
    };
    let shards = serving.workers.count();
    if let Some(listener) = listeners.egress {
        let e = &config.proxy.egress;
        let egress = Arc::new(Egress {
            directory: directory.clone(),
            policy: EgressPolicy::from_config(e),
            policies: policies.clone(),
            connector: connector.clone(),
            pool: Pool::new(PoolLimits {
                per_key: e.upstream_max_idle_per_host,
                per_agent: e.upstream_max_idle_per_agent,
                total: e.upstream_max_idle_total,
                idle_timeout: e.upstream_idle_timeout,
                shards,
            }),
            relays: relays.clone(),
            agent_limits: agent_limits.clone(),
            config: e.clone(),
            decision_log: decision_log.clone(),
        });
        background_tasks.spawn(egress.pool.clone().run_reaper(background.clone()));
        let limits = Limits {
            max_connections: e.max_connections,
            max_header_bytes: e.max_header_bytes,
            header_read_timeout: e.header_read_timeout,
        };
        accept_loops.extend(serving.start(egress, listener, limits, &e.tls)?);
    }
    if let Some(listener) = listeners.ingress {
        let i = &config.proxy.ingress;
        let ingress = Arc::new(Ingress {
            directory: directory.clone(),
            connector: connector.clone(),
            // One agent per VPS: the per-VPS limit is the per-agent one.
            pool: Pool::new(PoolLimits {
                per_key: i.upstream_max_idle_per_vps,
                per_agent: i.upstream_max_idle_per_vps,
                total: i.upstream_max_idle_total,
                idle_timeout: i.upstream_idle_timeout,
                shards,
            }),
            relays: relays.clone(),
            agent_limits: agent_limits.clone(),
            config: i.clone(),
            decision_log: decision_log.clone(),
        });
        background_tasks.spawn(ingress.pool.clone().run_reaper(background.clone()));
        let limits = Limits {
            max_connections: i.max_connections,
            max_header_bytes: i.max_header_bytes,
            header_read_timeout: i.header_read_timeout,
        };
        accept_loops.extend(serving.start(ingress, listener, limits, &i.tls)?);
    }

    let usage_api_task = match listeners.usage_api {
        Some(listener) => {
            let token = config
                .proxy
                .usage_api
                .bearer_token()
                .context("the usage API's token")?;
            let api = Arc::new(usage_api::UsageApi::new(
                pool.clone(),
                token,
                options.seams.clock.clone(),
            ));
            tracing::info!(listener = "usage_api", listen = %listener.local_addr()?, "listening");
            Some(tokio::spawn(usage_api::serve(
                api,
                listener,
                shutdown.clone(),
                config.proxy.drain_timeout,
            )))
        }
        None => None,
    };

    health.mark_started();
    tracing::info!(%instance_id, "proxy started");
    shutdown.cancelled().await;
    serving.shutdown.raise();

    // Drain: stop accepting, let exchanges and tunnels finish up to the deadline.
    for a in accept_loops {
        let _ = a.await;
    }
    connections.close();
    let drain = config.proxy.drain_timeout;
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?drain, open = connections.len(), "drain deadline passed: closing what is left");
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    }
    // Every exchange has ended: write the last decisions.
    drop(decision_log);
    if let Some(writer) = decision_writer {
        writer.finish().await;
    }
    // Everything is counted now: final flush (or spill).
    flusher_stop.cancel();
    flusher_task.await.context("flusher task")?;
    leases.release_all().await;
    background.cancel();
    background_tasks.close();
    background_tasks.wait().await;
    if let Some(task) = usage_api_task {
        let _ = task.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    pool.close().await;
    // Last: database connections opened by a serving thread (a directory
    // read on a request's path) run on its runtime, flushes included.
    serving.workers.stop().await;
    tracing::info!("proxy stopped");
    Ok(())
}
