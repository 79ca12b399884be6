//! Connections to upstreams (origins for egress, VPS gateways for ingress), the
//! same for both listeners: opening one ([`Connector::open`]: resolve once,
//! check every address against the egress policy where one applies, dial only a
//! checked address, all within one deadline, typed errors), an HTTP/1.1
//! handshake over any socket, and a pool of idle connections per key.
//!
//! A request without a body (the common case) is exchanged by its own task
//! (`h1`): its connection comes back to the pool once the response has been
//! read to the end. A request with a body goes through hyper's client, whose
//! connection goes back as soon as its response head is handed on and is handed
//! out again once hyper says it can take another request. Connections idle
//! longer than the pool's timeout, or closed by the peer, are dropped at
//! checkout or by the reaper.

use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::body::{Flow, ProxyBody, Source};
use crate::egress_policy::{Dial, EgressPolicy, Host, Resolve};
use crate::gate::StreamGuard;
use crate::h1::{self, Failure, Link};
use crate::headers::{strip_hop_by_hop, Outbound};
use crate::rescue::ProxyError;
use crate::CappedMap;

/// An upstream's response as the client gets it: hop-by-hop headers dropped,
/// the body streamed under `guard`.
pub fn passed_on(response: Response<impl Into<Source>>, guard: StreamGuard) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, ProxyBody::guarded(body, guard, Flow::ToClient))
}

/// How upstream connections are opened: the resolver and dialer (tests put in
/// ones that can only ever reach loopback).
#[derive(Clone)]
pub struct Connector {
    pub resolver: Arc<dyn Resolve>,
    pub dialer: Arc<dyn Dial>,
}

impl Connector {
    /// Resolve `host` once, check every address against `policy` (when given;
    /// one denied address refuses the destination), and connect to the first
    /// checked address that answers, all within `timeout`. Returns the socket
    /// and the address it reached.
    pub async fn open(
        &self,
        host: &Host,
        port: u16,
        policy: Option<&EgressPolicy>,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let deadline = Instant::now() + timeout;
        let addrs = self.resolve(host, port, policy, deadline).await?;
        self.dial(host, port, addrs, deadline).await
    }

    /// Resolve `host` once and check every address against `policy` (when
    /// given): one denied address refuses the destination.
    pub async fn resolve(
        &self,
        host: &Host,
        port: u16,
        policy: Option<&EgressPolicy>,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>, ProxyError> {
        let addrs: Vec<SocketAddr> = match host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Host::Name(name) => {
                let resolved = tokio::time::timeout_at(deadline, self.resolver.resolve(name, port))
                    .await
                    .map_err(|_| ProxyError::UpstreamTimeout)?;
                resolved.map_err(|source| ProxyError::Resolve {
                    host: name.clone(),
                    source,
                })?
            }
        };
        if addrs.is_empty() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
            return Err(ProxyError::Resolve {
                host: host.to_string(),
                source,
            });
        }
        if let Some(policy) = policy {
            for addr in &addrs {
                policy
                    .check_ip(addr.ip())
                    .map_err(|reason| ProxyError::Denied {
                        reason,
                        host: host.to_string(),
                        port,
                        policy: None,
                    })?;
            }
        }
        Ok(addrs)
    }

    /// Connect to the first of `addrs` (checked already) that answers.
    pub async fn dial(
        &self,
        host: &Host,
        port: u16,
        addrs: Vec<SocketAddr>,
        deadline: Instant,
    ) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, self.dialer.dial(addr)).await {
                Ok(Ok(stream)) => return Ok((stream, addr)),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => return Err(ProxyError::UpstreamTimeout),
            }
        }
        Err(ProxyError::Connect {
            target: format!("{host}:{port}"),
            source: last_error.unwrap_or_else(|| std::io::Error::other("no address answered")),
        })
    }
}

pub type Sender = http1::SendRequest<ProxyBody>;

/// An exchange on a link failed.
fn upstream_broke(failure: Failure) -> ProxyError {
    match failure {
        Failure::TimedOut => ProxyError::UpstreamTimeout,
        failure => ProxyError::UpstreamExchange(failure.into_io()),
    }
}

/// `work`, unless `due` comes first.
async fn by<T>(due: Instant, work: impl Future<Output = T>) -> Result<T, ProxyError> {
    tokio::time::timeout_at(due, work)
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)
}

/// Largest read buffer per upstream connection, bytes.
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// Speak HTTP/1.1 over `io`; the connection is driven by a spawned task. With
/// `upgrades`, a `101 Switching Protocols` response hands the socket over.
pub async fn handshake<I>(io: I, upgrades: bool) -> Result<Sender, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Bounded reads keep body frames small: memory per connection stays low, and a
    // stream cut at the headroom stops within one frame.
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUF)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A connection as the pool keeps it: hyper's, which enters the pool as soon
/// as its response head is handed on (usually while that response's body is
/// still streaming) and can take a new request once hyper reports it ready; or
/// a link, which enters it idle.
enum Conn<I> {
    Hyper(Sender),
    Link(Link<I>),
}

/// A pooled connection.
struct Pooled<I> {
    conn: Conn<I>,
    /// The address it is connected to (for the decision log of the exchanges
    /// it serves).
    addr: SocketAddr,
    /// When it was returned (an upper bound on how long it has been idle).
    since: Instant,
    /// The agent whose exchange put it here.
    owner: Uuid,
}

/// How many connections a pool keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Per key (origin or VPS gateway): connections in the pool, not those
    /// out of it for an exchange.
    pub per_key: usize,
    /// Per agent, over all keys, in the pool or out of it for an exchange:
    /// no agent fills the pool for everyone.
    pub per_agent: usize,
    /// In all, in the pool or out of it; beyond it the connection returned
    /// longest ago is closed.
    pub total: usize,
    pub idle_timeout: Duration,
    /// Serving threads: each keeps its own idle connections (the limits hold
    /// over all of them), so an exchange never waits on another thread's
    /// runtime for its socket.
    pub shards: usize,
}

/// What a pool is keyed by.
pub trait Key: Hash + Eq + Clone + Send + Sync + 'static {}
impl<T: Hash + Eq + Clone + Send + Sync + 'static> Key for T {}

/// What a pooled connection runs over.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Socket for T {}

/// Connections per key (origin host and port, or VPS), most recently returned
/// last, bounded per key, per agent and in total; one share per serving
/// thread (`workers`).
pub struct Pool<K, I> {
    idle: Box<[CappedMap<K, Vec<Pooled<I>>>]>,
    /// Places held per key (connections in the pool) over every thread's
    /// share, and per agent (in the pool or out of it for an exchange).
    per_key: CappedMap<K, usize>,
    per_agent: CappedMap<Uuid, usize>,
    total: AtomicUsize,
    limits: PoolLimits,
}

impl<K, I> Pool<K, I>
where
    K: Key,
    I: Socket,
{
    pub fn new(limits: PoolLimits) -> Arc<Self> {
        Arc::new(Self {
            idle: (0..limits.shards.max(1))
                .map(|_| CappedMap::default())
                .collect(),
            per_key: CappedMap::default(),
            per_agent: CappedMap::default(),
            total: AtomicUsize::new(0),
            limits,
        })
    }

    /// The most recently returned connection to `key` that can take a request
    /// now, if any, the address it is connected to, and the places it holds.
    /// Connections still finishing their previous exchange stay for later;
    /// closed and expired ones are dropped.
    fn checkout(
        self: &Arc<Self>,
        key: &K,
        now: Instant,
    ) -> Option<(Conn<I>, SocketAddr, Lease<K, I>)> {
        let mut list = self.share().get_mut(key)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let pooled = &mut list[i];
            let expired = now.saturating_duration_since(pooled.since) >= self.limits.idle_timeout;
            let (dead, ready) = match &mut pooled.conn {
                Conn::Hyper(sender) => (expired || sender.is_closed(), sender.is_ready()),
                Conn::Link(link) => (expired || link.is_stale(), true),
            };
            if dead {
                let pooled = list.remove(i);
                self.free_places(key, &pooled.owner);
            } else if ready {
                let pooled = list.remove(i);
                // Out of the pool, it no longer counts against the key.
                free_place(&self.per_key, key);
                let lease = Lease::of(self, key.clone(), pooled.owner);
                return Some((pooled.conn, pooled.addr, lease));
            }
        }
        None
    }

    /// The agent's and the total places for a new connection to `key` used by
    /// `owner`'s exchange, taken before the exchange so that the connection
    /// comes back without taking them then. None beyond the agent's limit, or
    /// while the key's connections in the pool (on other threads) are at its
    /// limit: the connection is closed after its exchange. At the total limit,
    /// the connection returned longest ago makes room.
    fn lease(self: &Arc<Self>, key: K, owner: Uuid) -> Option<Lease<K, I>> {
        let limits = self.limits;
        let key_full = || self.per_key.get(&key).is_some_and(|n| *n >= limits.per_key);
        // (No connection elsewhere is closed to make room for one that would
        // not be kept.)
        if limits.per_key == 0 || key_full() {
            return None;
        }
        // Places are reserved before the exchange (and given back if the
        // connection does not come back), so concurrent returns cannot overrun
        // the limits.
        if !take_place(&self.per_agent, owner, limits.per_agent) {
            return None;
        }
        let take_total = || {
            self.total
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limits.total).then_some(n + 1)
                })
                .is_ok()
        };
        // No map guard is held while evicting: it walks every shard.
        if take_total() || (self.evict_oldest() && take_total()) {
            Some(Lease::of(self, key, owner))
        } else {
            free_place(&self.per_agent, &owner);
            None
        }
    }

    /// This serving thread's idle connections.
    fn share(&self) -> &CappedMap<K, Vec<Pooled<I>>> {
        &self.idle[crate::workers::current().min(self.idle.len() - 1)]
    }

    /// Give up the places of a pooled connection to `key` held for `owner`.
    fn free_places(&self, key: &K, owner: &Uuid) {
        free_place(&self.per_key, key);
        self.free_leased(owner);
    }

    /// Give up the places of a connection out of the pool for an exchange
    /// (it holds none of its key's).
    fn free_leased(&self, owner: &Uuid) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        free_place(&self.per_agent, owner);
    }

    /// Close the connection returned longest ago; false if there is none.
    fn evict_oldest(&self) -> bool {
        let mut oldest: Option<(usize, K, Instant)> = None;
        for (share, idle) in self.idle.iter().enumerate() {
            for entry in idle.iter() {
                for pooled in entry.value() {
                    if oldest
                        .as_ref()
                        .is_none_or(|(_, _, since)| pooled.since < *since)
                    {
                        oldest = Some((share, entry.key().clone(), pooled.since));
                    }
                }
            }
        }
        let Some((share, key, since)) = oldest else {
            return false;
        };
        let Some(mut list) = self.idle[share].get_mut(&key) else {
            return false;
        };
        match list.iter().position(|p| p.since == since) {
            Some(i) => {
                let pooled = list.remove(i);
                self.free_places(&key, &pooled.owner);
                true
            }
            None => false,
        }
    }

    /// Send `req` on an idle connection to `key`, or on a new one from
    /// `connect`, and give the connection back to the pool (as `owner`'s) once
    /// the exchange is over. A request without a body is exchanged by this
    /// task (`h1`); one with a body through hyper's client. A pooled connection
    /// the peer closed meanwhile is found before the request goes out, or (for
    /// a request that may be repeated) by its answering nothing; the request is
    /// then sent once on a fresh connection. The response head is due within
    /// `timeout` (a link's own timer bounds its exchange; the rest is under a
    /// timeout). Returns the response and the address of the connection that
    /// carried it.
    ///
    /// The future keeps its arguments where they were given (an `async fn`
    /// would copy them into its body's own variables first, hundreds of bytes
    /// per request for `req`).
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a, O, F, Fut>(
        self: &'a Arc<Self>,
        key: K,
        owner: Uuid,
        req: O,
        connect: F,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Response<Source>, SocketAddr), ProxyError>> + 'a
    where
        O: Outgoing + 'a,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<(I, SocketAddr), ProxyError>> + 'a,
    {
        async move {
            // One reading of the clock serves the deadline and the pool's idle
            // ages: its own, not the exchange's, so that `response_timeout`
            // gives the upstream its full time whatever the directory or a
            // name resolution took before.
            let now = Instant::now();
            let due = now + timeout;
            // The head a request without a body goes out with (made before any
            // wait: the request itself is not shared across them).
            let direct = req.head();
            let req = match (self.checkout(&key, now), &direct) {
                (Some((Conn::Link(link), addr, lease)), Some(direct)) => {
                    match self
                        .direct(link, addr, direct, Some(lease), owner, due)
                        .await
                    {
                        Err(Failure::Unanswered(_)) if direct.1.is_idempotent() => {
                            Unsent::Given(req)
                        }
                        answered => return answered.map_err(upstream_broke),
                    }
                }
                // Through hyper's client: boxed, so the common exchange's future
                // (moved into a box per request by the server) stays small.
                (Some((conn, addr, lease)), _) => {
                    match by(
                        due,
                        Box::pin(self.through_pooled(
                            conn,
                            addr,
                            req.into_request()?,
                            lease,
                            owner,
                        )),
                    )
                    .await?
                    {
                        Ok(answered) => return answered,
                        Err(unsent) => Unsent::Back(unsent),
                    }
                }
                (None, _) => Unsent::Given(req),
            };
            let (io, addr) = by(due, connect()).await??;
            let lease = self.lease(key, owner);
            match &direct {
                Some(direct) => self
                    .direct(Link::new(io), addr, direct, lease, owner, due)
                    .await
                    .map_err(upstream_broke),
                None => {
                    by(
                        due,
                        Box::pin(async {
                            let sender =
                                handshake(io, false).await.map_err(ProxyError::Upstream)?;
                            through_hyper(sender, addr, req.into_request()?, lease, owner).await
                        }),
                    )
                    .await?
                }
            }
        }
    }

    /// `req` over `conn`, a pooled connection (holding `lease`) that is not to
    /// take it directly: the answer, or the request back if the connection was
    /// closed before it went out.
    async fn through_pooled(
        &self,
        conn: Conn<I>,
        addr: SocketAddr,
        req: Request<ProxyBody>,
        lease: Lease<K, I>,
        owner: Uuid,
    ) -> Result<Result<(Response<Source>, SocketAddr), ProxyError>, Request<ProxyBody>> {
        match conn {
            Conn::Link(link) => {
                let sender = match handshake(link.into_io(), false).await {
                    Ok(sender) => sender,
                    Err(e) => return Ok(Err(ProxyError::Upstream(e))),
                };
                Ok(through_hyper(sender, addr, req, Some(lease), owner).await)
            }
            Conn::Hyper(mut sender) => match sender.try_send_request(req).await {
                Ok(response) => {
                    lease.give_back(Conn::Hyper(sender), owner, addr);
                    Ok(Ok((response.map(Source::from), addr)))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => Err(unsent),
                    None => Ok(Err(ProxyError::Upstream(e.into_error()))),
                },
            },
        }
    }

    /// A request without a body (its head, and its method) over `link`; the
    /// link comes back to the pool in `lease`'s places when the response has
    /// been read to its end (without a lease, it is closed then). (Its
    /// arguments stay where they were given, as [`Pool::send`]'s.)
    #[allow(clippy::manual_async_fn)]
    fn direct<'a>(
        &'a self,
        link: Link<I>,
        addr: SocketAddr,
        (head, method): &'a (Vec<u8>, Method),
        lease: Option<Lease<K, I>>,
        owner: Uuid,
        due: Instant,
    ) -> impl Future<Output = Result<(Response<Source>, SocketAddr), Failure>> + 'a {
        async move {
            let answer = link.exchange(head, method, due).await?;
            let release = Box::new(move |link| {
                if let Some(lease) = lease {
                    lease.give_back(Conn::Link(link), owner, addr);
                }
            });
            Ok((answer.into_response(release), addr))
        }
    }

    /// One plain exchange, as both listeners make it: `req` over a pooled
    /// connection to `key` (or one `open` makes, with the address it reached;
    /// boxed: a new connection is the exception, and the pooled path's future
    /// stays small), its response head within `timeout`, passed on under
    /// `guard`; a failure is attributed to whoever caused it. Returns the
    /// response and the address of the connection that carried it. (Its
    /// arguments stay where they were given, as [`Pool::send`]'s.)
    #[allow(clippy::manual_async_fn)]
    pub fn exchange<'a, O, F, Fut>(
        self: &'a Arc<Self>,
        key: K,
        owner: Uuid,
        req: O,
        timeout: Duration,
        guard: StreamGuard,
        open: F,
    ) -> impl Future<Output = Result<(Response<ProxyBody>, SocketAddr), ProxyError>> + 'a
    where
        O: Outgoing + 'a,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<(I, SocketAddr), ProxyError>> + 'a,
    {
        async move {
            let connect = || Box::pin(open());
            let (response, addr) = self
                .send(key, owner, req, connect, timeout)
                .await
                .map_err(|e| e.attributed(&guard))?;
            Ok((passed_on(response, guard), addr))
        }
    }

    /// Drop expired and closed connections, until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        let timeout = self.limits.idle_timeout;
        let every = (timeout / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            for idle in &self.idle {
                idle.retain(|key, list| {
                    list.retain_mut(|p| {
                        let keep = p.since.elapsed() < timeout
                            && match &mut p.conn {
                                Conn::Hyper(sender) => !sender.is_closed(),
                                Conn::Link(link) => !link.is_stale(),
                            };
                        if !keep {
                            self.free_places(key, &p.owner);
                        }
                        keep
                    });
                    !list.is_empty()
                });
            }
        }
    }

    /// Connections held, idle or finishing an exchange (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// A request the pool sends: without a body, as a head this task writes (no
/// hyper); otherwise as a request hyper's client sends.
pub trait Outgoing {
    /// The head to write and the request's method, for a request that is
    /// all head.
    fn head(&self) -> Option<(Vec<u8>, Method)>;

    /// The request for hyper's client (an error if it cannot be made).
    fn into_request(self) -> Result<Request<ProxyBody>, ProxyError>;
}

impl Outgoing for Outbound {
    fn head(&self) -> Option<(Vec<u8>, Method)> {
        self.is_head_only().then(|| {
            let mut head = Vec::new();
            self.write_head(&mut head);
            (head, self.method().clone())
        })
    }

    fn into_request(self) -> Result<Request<ProxyBody>, ProxyError> {
        Outbound::into_request(self)
    }
}

/// A request made elsewhere, sent as it is.
impl Outgoing for Request<ProxyBody> {
    fn head(&self) -> Option<(Vec<u8>, Method)> {
        matches!(self.body(), ProxyBody::Empty).then(|| {
            let mut head = Vec::new();
            h1::encode_head(self, &mut head);
            (head, self.method().clone())
        })
    }

    fn into_request(self) -> Result<Request<ProxyBody>, ProxyError> {
        Ok(self)
    }
}

/// A request that has not gone out: as it was given, or as hyper's client gave
/// it back.
// Each variant is a whole request (`R` is one too, which the lint cannot see).
#[allow(clippy::large_enum_variant)]
enum Unsent<R> {
    Given(R),
    Back(Request<ProxyBody>),
}

impl<R: Outgoing> Unsent<R> {
    fn into_request(self) -> Result<Request<ProxyBody>, ProxyError> {
        match self {
            Unsent::Given(req) => req.into_request(),
            Unsent::Back(req) => Ok(req),
        }
    }
}

/// `req` through hyper's client on `sender`, which goes back to the pool in
/// `lease`'s places once the response head is in (without a lease, it is
/// closed once the exchange ends).
async fn through_hyper<K, I>(
    mut sender: Sender,
    addr: SocketAddr,
    req: Request<ProxyBody>,
    lease: Option<Lease<K, I>>,
    owner: Uuid,
) -> Result<(Response<Source>, SocketAddr), ProxyError>
where
    K: Key,
    I: Socket,
{
    let response = sender
        .send_request(req)
        .await
        .map_err(ProxyError::Upstream)?;
    if let Some(lease) = lease {
        lease.give_back(Conn::Hyper(sender), owner, addr);
    }
    Ok((response.map(Source::from), addr))
}

/// The places (per agent, in all) a connection holds while it is out of the
/// pool for an exchange: it comes back without taking them again, and gives
/// them up if it does not come back (closed, failed, or its response left
/// unread). Its key's place is taken only when it comes back: the per-key
/// limit bounds the connections a key keeps in the pool, so no agent's
/// exchanges under way (a slow stream or many) keep another agent's
/// connections to the same origin out of it.
struct Lease<K, I>(Option<Places<K, I>>)
where
    K: Key,
    I: Socket;

struct Places<K, I> {
    pool: Arc<Pool<K, I>>,
    key: K,
    /// The agent whose place it is.
    owner: Uuid,
}

impl<K, I> Lease<K, I>
where
    K: Key,
    I: Socket,
{
    fn of(pool: &Arc<Pool<K, I>>, key: K, owner: Uuid) -> Self {
        Lease(Some(Places {
            pool: pool.clone(),
            key,
            owner,
        }))
    }

    /// Put `conn` (connected to `addr`, used by `owner`'s exchange) back in
    /// the pool, in these places and one of its key's; the agent's place
    /// moves to `owner` if it was another agent's. The connection is closed
    /// if the key is at its limit or `owner` at its own.
    fn give_back(mut self, conn: Conn<I>, owner: Uuid, addr: SocketAddr) {
        let Some(places) = self.0.take() else { return };
        let pool = &places.pool;
        if !take_place(&pool.per_key, places.key.clone(), pool.limits.per_key) {
            pool.free_leased(&places.owner);
            return;
        }
        if owner != places.owner {
            if !take_place(&pool.per_agent, owner, pool.limits.per_agent) {
                pool.free_places(&places.key, &places.owner);
                return;
            }
            free_place(&pool.per_agent, &places.owner);
        }
        pool.share().entry(places.key).or_default().push(Pooled {
            conn,
            addr,
            since: Instant::now(),
            owner,
        });
    }
}

impl<K, I> Drop for Lease<K, I>
where
    K: Key,
    I: Socket,
{
    fn drop(&mut self) {
        if let Some(places) = self.0.take() {
            places.pool.free_leased(&places.owner);
        }
    }
}

/// Take one of `limit` places for `key` in `held`; no record is left for a
/// key refused one.
fn take_place<Q: Hash + Eq>(held: &CappedMap<Q, usize>, key: Q, limit: usize) -> bool {
    match held.entry(key) {
        dashmap::Entry::Occupied(mut e) if *e.get() < limit => *e.get_mut() += 1,
        dashmap::Entry::Vacant(v) if limit > 0 => {
            v.insert(1);
        }
        _ => return false,
    }
    true
}

/// Give one of `key`'s places in `held` back, dropping its record at none.
fn free_place<Q: Hash + Eq>(held: &CappedMap<Q, usize>, key: &Q) {
    held.remove_if_mut(key, |_, n| {
        *n = n.saturating_sub(1);
        *n == 0
    });
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const LIMITS: PoolLimits = PoolLimits {
        per_key: 4,
        per_agent: 4,
        total: 4,
        idle_timeout: Duration::from_secs(60),
        shards: 1,
    };

    /// A connection to an upstream that answers every request with `len` bytes.
    fn upstream(len: usize) -> DuplexStream {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match server.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                let body = vec![b'x'; len];
                if server.write_all(answer.as_bytes()).await.is_err()
                    || server.write_all(&body).await.is_err()
                {
                    return;
                }
            }
        });
        client
    }

    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/")
            .header("host", "origin")
            .body(ProxyBody::Empty)
            .unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    const ADDR: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    #[tokio::test]
    async fn an_agent_that_leaves_responses_unread_keeps_no_places() {
        let pool = Pool::<&'static str, DuplexStream>::new(LIMITS);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        // Far more abandoned responses than the pool has places: each
        // connection's places go with it.
        for _ in 0..3 * LIMITS.total {
            let connect = || async { Ok((upstream(1 << 20), ADDR)) };
            let (response, _) = pool
                .send("origin", a, get(), connect, TIMEOUT)
                .await
                .unwrap();
            assert_eq!(
                pool.idle_count(),
                1,
                "a connection holds its places while it serves"
            );
            drop(response);
            assert_eq!(
                pool.idle_count(),
                0,
                "an abandoned response gives them back"
            );
        }
        assert!(pool.per_agent.is_empty() && pool.per_key.is_empty());

        // Read to its end, a connection stays, and the next request (another
        // agent's) reuses it without connecting: the agent's place moves.
        let connect = || async { Ok((upstream(2), ADDR)) };
        let (response, _) = pool
            .send("origin", a, get(), connect, TIMEOUT)
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        let refuse = || async { Err::<(DuplexStream, SocketAddr), _>(ProxyError::UpstreamTimeout) };
        let (response, _) = pool
            .send("origin", b, get(), refuse, TIMEOUT)
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.per_agent.get(&a).is_none());
        assert_eq!(pool.per_agent.get(&b).map(|n| *n), Some(1));
    }

    /// The per-origin limit bounds the connections an origin keeps in the
    /// pool, not the exchanges under way: an agent streaming slow responses
    /// from an origin, as many as that limit, does not keep another agent's
    /// connection to it out of the pool.
    #[tokio::test]
    async fn slow_responses_under_way_leave_room_for_another_agents_connection() {
        let limits = PoolLimits {
            per_key: 2,
            per_agent: 8,
            total: 8,
            ..LIMITS
        };
        let pool = Pool::<&'static str, DuplexStream>::new(limits);
        let (slow, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut streaming = Vec::new();
        for _ in 0..limits.per_key {
            let connect = || async { Ok((upstream(1 << 20), ADDR)) };
            let (response, _) = pool
                .send("origin", slow, get(), connect, TIMEOUT)
                .await
                .unwrap();
            streaming.push(response);
        }
        let connects = AtomicUsize::new(0);
        let connect = || async {
            connects.fetch_add(1, Ordering::Relaxed);
            Ok((upstream(2), ADDR))
        };
        for _ in 0..3 {
            let (response, _) = pool
                .send("origin", other, get(), connect, TIMEOUT)
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(
            connects.load(Ordering::Relaxed),
            1,
            "the other agent's connection was kept and reused"
        );
        // Once the slow exchanges end, the origin keeps no more than its limit.
        for response in streaming {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(pool.per_key.get("origin").map(|n| *n), Some(limits.per_key));
        assert_eq!(pool.idle_count(), limits.per_key);
    }
}
