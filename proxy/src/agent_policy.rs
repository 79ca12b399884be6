//! Per-agent egress policies (SPEC §10): where each agent may go, read from
//! PostgreSQL (migration 021) and kept live.
//!
//! The order of checks for an egress destination:
//! 1. the built-in SSRF list and the configured CIDR and port lists
//!    ([`crate::egress_policy`]): always, and no policy can open what they refuse;
//! 2. the agent's policy (its own, else its plan's; none: nothing more to check):
//!    a matching `deny` rule refuses, else a matching `allow` rule passes, else
//!    the policy's default action decides. A rule matches on the requested name
//!    (exact host, or `*.suffix` for names below the suffix) or on an address
//!    the name resolved to (CIDR), and on the port when it lists ports. A name
//!    with several addresses passes only if every address does;
//! 3. for a CONNECT, the SNI of the TLS ClientHello, when it names another host,
//!    must pass the same policy ([`crate::sni`]).
//!
//! A name the policy refuses whatever its addresses is refused before it is
//! resolved. In `report` mode nothing is refused: the would-be refusal is
//! logged and counted.
//!
//! [`Policies`] holds the compiled snapshot behind a watch channel. A
//! notification on `tollgate_egress_policy` makes it re-read everything (changes
//! coalesce); relays watch the channel and end when a new snapshot forbids
//! their destination. Judging is lock-free and allocation-free: hash lookups
//! for the name and each of its parent domains, and one lookup per CIDR prefix
//! length present for each address.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::db::policies::{self, Stored};

use crate::directory::Agent;
use crate::egress_policy::{carried_v4, parse_host, Host};
use crate::sni::Hello;
use crate::telemetry;

/// What a rule or a policy's default does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Whether a policy refuses what it denies, or only reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Report,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }
}

/// One rule, as refusals and the decision log name it.
#[derive(Debug)]
pub struct Rule {
    pub id: i64,
    pub action: Action,
    /// Sorted; empty: any port.
    ports: Box<[u16]>,
    /// `deny host *.example.com ports 22`: what the rule says, for people.
    pub text: Arc<str>,
}

impl Rule {
    #[inline]
    fn covers(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.binary_search(&port).is_ok()
    }
}

/// Why a policy refuses a destination.
#[derive(Debug, Clone)]
pub struct Denial {
    pub policy: Arc<str>,
    pub mode: Mode,
    /// The deny rule that matched; `None` when the policy's default refused.
    pub rule: Option<Arc<Rule>>,
}

impl Denial {
    /// The `X-Tollgate-Deny-Reason` and metric label.
    pub fn reason(&self) -> &'static str {
        match self.rule {
            Some(_) => "policy_rule",
            None => "policy_default",
        }
    }

    /// The rule (or default) for the decision log: `#12 deny host *.example.com`.
    pub fn rule_text(&self) -> Arc<str> {
        match &self.rule {
            Some(rule) => format!("#{} {}", rule.id, rule.text).into(),
            None => format!("default deny of {}", self.policy).into(),
        }
    }
}

type Rules = Vec<Arc<Rule>>;

/// The multiply-rotate hash of rustc (FxHash): a few cycles for the masked
/// addresses and short names looked up per request, where SipHash's defence
/// against flooding buys nothing (only the operator's rules are keys; a tenant
/// only looks up).
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(tail) ^ (rest.len() as u64) << 56);
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// One compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub id: i64,
    pub name: Arc<str>,
    pub mode: Mode,
    default: Action,
    exact: FxMap<Box<str>, Rules>,
    /// `*.example.com` is kept under `example.com`.
    suffix: FxMap<Box<str>, Rules>,
    /// By prefix length, longest first; keys are the masked network bits.
    v4: Vec<(u8, FxMap<u32, Rules>)>,
    v6: Vec<(u8, FxMap<u128, Rules>)>,
    /// Rules that name only ports, by port.
    by_port: FxMap<u16, Rules>,
    /// Rules that match every destination (only rules that do not compile).
    any_host: Rules,
    /// Whether an address can make this policy allow what its name does not.
    allows_by_address: bool,
    /// Whether any rule looks at addresses: pooled connections are then kept
    /// apart per compiled policy, so a reused connection's address was judged
    /// by the policy now in force.
    pub judges_addresses: bool,
    /// Unique per compiled policy (a changed policy gets a new one).
    pub generation: u64,
}

/// What one lookup found.
#[derive(Default)]
struct Found<'a> {
    allowed: bool,
    /// The matching deny rule with the lowest id (so the answer is stable).
    denied: Option<&'a Arc<Rule>>,
}

impl<'a> Found<'a> {
    #[inline]
    fn visit(&mut self, rules: &'a [Arc<Rule>], port: u16) {
        for rule in rules {
            if !rule.covers(port) {
                continue;
            }
            match rule.action {
                Action::Allow => self.allowed = true,
                Action::Deny => {
                    if self.denied.is_none_or(|d| rule.id < d.id) {
                        self.denied = Some(rule);
                    }
                }
            }
        }
    }
}

impl Policy {
    /// Judge `name` (when the request named one) at `addr` (when known) and `port`.
    fn judge(&self, name: Option<&str>, addr: Option<IpAddr>, port: u16) -> Result<(), Denial> {
        let mut found = Found::default();
        if let Some(name) = name {
            if let Some(rules) = self.exact.get(name) {
                found.visit(rules, port);
            }
            let mut rest = name;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(rules) = self.suffix.get(parent) {
                    found.visit(rules, port);
                }
                rest = parent;
            }
        }
        if let Some(addr) = addr {
            self.visit_address(addr, port, &mut found);
            if let IpAddr::V6(v6) = addr {
                // Every spelling of an IPv4 address is that address.
                if let Some(v4) = carried_v4(v6) {
                    self.visit_address(IpAddr::V4(v4), port, &mut found);
                }
            }
        }
        if let Some(rules) = self.by_port.get(&port) {
            found.visit(rules, port);
        }
        found.visit(&self.any_host, port);
        match (found.denied, found.allowed, self.default) {
            (Some(rule), _, _) => Err(self.denial(Some(rule.clone()))),
            (None, true, _) | (None, false, Action::Allow) => Ok(()),
            (None, false, Action::Deny) => Err(self.denial(None)),
        }
    }

    #[inline]
    fn visit_address<'a>(&'a self, addr: IpAddr, port: u16, found: &mut Found<'a>) {
        match addr {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                for (len, nets) in &self.v4 {
                    if let Some(rules) = nets.get(&mask_v4(bits, *len)) {
                        found.visit(rules, port);
                    }
                }
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                for (len, nets) in &self.v6 {
                    if let Some(rules) = nets.get(&mask_v6(bits, *len)) {
                        found.visit(rules, port);
                    }
                }
            }
        }
    }

    fn denial(&self, rule: Option<Arc<Rule>>) -> Denial {
        Denial {
            policy: self.name.clone(),
            mode: self.mode,
            rule,
        }
    }

    /// Before resolving: the refusal of `name` on `port`, if no address it could
    /// resolve to would change it.
    pub fn judge_name(&self, name: &str, port: u16) -> Result<(), Denial> {
        match self.judge(Some(name), None, port) {
            Err(denial) if denial.rule.is_none() && self.allows_by_address => Ok(()),
            judged => judged,
        }
    }

    /// The destination `name` (if named) at every one of `addrs`, on `port`.
    pub fn judge_addresses(
        &self,
        name: Option<&str>,
        addrs: &[SocketAddr],
        port: u16,
    ) -> Result<(), Denial> {
        if addrs.is_empty() {
            return self.judge(name, None, port);
        }
        addrs
            .iter()
            .try_for_each(|addr| self.judge(name, Some(addr.ip()), port))
    }
}

#[inline]
fn mask_v4(bits: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(len)))
    }
}

#[inline]
fn mask_v6(bits: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(len)))
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A rule row that does not compile: it refuses everything, so a broken deny
/// rule never opens what it meant to close.
fn broken(id: i64, why: &str) -> Arc<Rule> {
    tracing::error!(
        rule = id,
        why,
        "egress policy rule is invalid; it refuses every destination until fixed"
    );
    Arc::new(Rule {
        id,
        action: Action::Deny,
        ports: Box::new([]),
        text: format!("invalid rule ({why})").into(),
    })
}

/// Compile the stored rows of one policy.
pub fn compile(row: &policies::PolicyRow, rules: &[&policies::RuleRow]) -> Policy {
    let mut policy = Policy {
        id: row.id,
        name: row.name.as_str().into(),
        mode: match row.mode.as_str() {
            "report" => Mode::Report,
            _ => Mode::Enforce,
        },
        default: match row.default_action.as_str() {
            "deny" => Action::Deny,
            _ => Action::Allow,
        },
        exact: FxMap::default(),
        suffix: FxMap::default(),
        v4: Vec::new(),
        v6: Vec::new(),
        by_port: FxMap::default(),
        any_host: Vec::new(),
        allows_by_address: false,
        judges_addresses: false,
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
    };
    let mut v4: HashMap<u8, FxMap<u32, Rules>> = HashMap::new();
    let mut v6: HashMap<u8, FxMap<u128, Rules>> = HashMap::new();
    for r in rules {
        let action = match r.action.as_str() {
            "allow" => Action::Allow,
            _ => Action::Deny,
        };
        let ports = match &r.ports {
            None => Vec::new(),
            Some(ports) => match ports
                .iter()
                .map(|p| u16::try_from(*p).ok().filter(|p| *p != 0))
                .collect::<Option<Vec<u16>>>()
            {
                Some(mut ports) => {
                    ports.sort_unstable();
                    ports.dedup();
                    ports
                }
                None => {
                    policy.any_host.push(broken(r.id, "port out of range"));
                    continue;
                }
            },
        };
        let mut text = String::from(match action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        });
        if let Some(host) = &r.host {
            text.push_str(" host ");
            text.push_str(host);
        }
        if let Some(cidr) = &r.cidr {
            text.push_str(" cidr ");
            text.push_str(cidr);
        }
        if !ports.is_empty() {
            let listed: Vec<String> = ports.iter().map(u16::to_string).collect();
            text.push_str(" ports ");
            text.push_str(&listed.join(","));
        }
        let rule = Arc::new(Rule {
            id: r.id,
            action,
            ports: ports.into_boxed_slice(),
            text: text.into(),
        });
        match (&r.host, &r.cidr) {
            (Some(host), None) => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) if !suffix.is_empty() => {
                        policy.suffix.entry(suffix.into()).or_default().push(rule)
                    }
                    Some(_) => policy.any_host.push(broken(r.id, "empty wildcard")),
                    None => policy.exact.entry(host.into()).or_default().push(rule),
                }
            }
            (None, Some(cidr)) => match cidr.parse::<IpNet>() {
                Ok(net) => {
                    policy.judges_addresses = true;
                    policy.allows_by_address |= action == Action::Allow;
                    match net.trunc() {
                        IpNet::V4(n) => v4
                            .entry(n.prefix_len())
                            .or_default()
                            .entry(u32::from(n.network()))
                            .or_default()
                            .push(rule),
                        IpNet::V6(n) => v6
                            .entry(n.prefix_len())
                            .or_default()
                            .entry(u128::from(n.network()))
                            .or_default()
                            .push(rule),
                    }
                }
                Err(_) => policy.any_host.push(broken(r.id, "unreadable CIDR")),
            },
            (None, None) => {
                for port in rule.ports.iter() {
                    policy.by_port.entry(*port).or_default().push(rule.clone());
                }
            }
            (Some(_), Some(_)) => policy.any_host.push(broken(r.id, "both host and CIDR")),
        }
    }
    policy.v4 = v4.into_iter().collect();
    policy.v4.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    policy.v6 = v6.into_iter().collect();
    policy.v6.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    policy
}

/// Every policy and who it applies to, as of one read.
#[derive(Debug, Default)]
pub struct Snapshot {
    policies: HashMap<i64, Arc<Policy>>,
    agents: HashMap<Uuid, i64>,
    /// Each plan's open destinations, as a policy that allows only them.
    open: HashMap<Uuid, Arc<Policy>>,
    /// When the read started; `None` until the first read succeeds.
    loaded_at: Option<Instant>,
}

/// The policy that applies to one agent.
#[derive(Debug, Clone)]
pub enum Applied {
    /// No policy: only the built-in and configured lists.
    None,
    Policy(Arc<Policy>),
    /// The agent has a policy this proxy could not read yet: refuse.
    Unavailable,
}

impl Snapshot {
    pub fn compile(stored: &Stored, loaded_at: Instant) -> Snapshot {
        let mut by_policy: HashMap<i64, Vec<&policies::RuleRow>> = HashMap::new();
        for rule in &stored.rules {
            by_policy.entry(rule.policy_id).or_default().push(rule);
        }
        let policies = stored
            .policies
            .iter()
            .map(|row| {
                let rules = by_policy.get(&row.id).map_or(&[][..], Vec::as_slice);
                (row.id, Arc::new(compile(row, rules)))
            })
            .collect();
        let mut open_rules: HashMap<Uuid, Vec<policies::RuleRow>> = HashMap::new();
        for row in &stored.open {
            open_rules
                .entry(row.plan_id)
                .or_default()
                .push(policies::RuleRow {
                    id: row.id,
                    policy_id: 0,
                    action: "allow".into(),
                    host: Some(row.host.clone()),
                    cidr: None,
                    ports: row.ports.clone(),
                });
        }
        let open_list = policies::PolicyRow {
            id: 0,
            name: "open destinations".into(),
            mode: "enforce".into(),
            default_action: "deny".into(),
        };
        let open = open_rules
            .into_iter()
            .map(|(plan, rules)| {
                let rules: Vec<&policies::RuleRow> = rules.iter().collect();
                (plan, Arc::new(compile(&open_list, &rules)))
            })
            .collect();
        Snapshot {
            policies,
            agents: stored.agents.iter().copied().collect(),
            open,
            loaded_at: Some(loaded_at),
        }
    }

    /// Whether `agent`'s plan keeps `name:port` open while its user is blocked.
    pub fn is_open(&self, agent: &Agent, name: &str, port: u16) -> bool {
        self.open_list(agent)
            .is_some_and(|open| open.judge_name(name, port).is_ok())
    }

    /// The destinations `agent`'s plan keeps open, as a policy that allows
    /// only them.
    fn open_list(&self, agent: &Agent) -> Option<Arc<Policy>> {
        agent.plan_id.and_then(|plan| self.open.get(&plan).cloned())
    }

    /// The policy for `agent`: from this snapshot if it was read after the
    /// agent's entry, else the one the entry was read with (an agent created
    /// since the last change is not in the snapshot, and must not slip through).
    pub fn for_agent(&self, agent: &Agent) -> Applied {
        let id = match self.loaded_at {
            Some(loaded) if loaded >= agent.fetched_at() => {
                self.agents.get(&agent.agent_id).copied()
            }
            _ => agent.egress_policy_id,
        };
        match id {
            None => Applied::None,
            Some(id) => match self.policies.get(&id) {
                Some(policy) => Applied::Policy(policy.clone()),
                None if self.loaded_at.is_none() => Applied::Unavailable,
                // Deleted since the entry was read: the plan's or agent's
                // reference was set to null with it.
                None => Applied::None,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// The live policies: the current snapshot, and a reload on every change.
#[derive(Debug)]
pub struct Policies {
    current: watch::Sender<Arc<Snapshot>>,
    changed: Notify,
}

/// Pause between failed reads.
const RETRY: Duration = Duration::from_millis(500);

impl Policies {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            current: watch::Sender::new(Arc::new(Snapshot::default())),
            changed: Notify::new(),
        })
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    /// Wait up to `wait` for the first read of the policies (a proxy that has
    /// just started); true once one is in force.
    pub async fn first_read(&self, wait: Duration) -> bool {
        let mut snapshots = self.subscribe();
        let read = snapshots.wait_for(|s| s.loaded_at.is_some());
        let outcome = tokio::time::timeout(wait, read).await;
        matches!(outcome, Ok(Ok(_)))
    }

    /// Hears every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.current.subscribe()
    }

    /// Something changed: read everything again (changes arriving meanwhile
    /// are covered by one more read).
    pub fn reload(&self) {
        self.changed.notify_one();
    }

    /// Put `snapshot` in force and tell the relays.
    pub fn install(&self, snapshot: Snapshot) {
        metrics::gauge!(telemetry::EGRESS_POLICIES).set(snapshot.len() as f64);
        self.current.send_replace(Arc::new(snapshot));
    }

    /// Read on start and after every change until `shutdown`.
    pub async fn run(self: Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        let mut stale = true;
        loop {
            if stale {
                let started = Instant::now();
                match policies::load(&pool).await {
                    Ok(stored) => {
                        self.install(Snapshot::compile(&stored, started));
                        metrics::counter!(telemetry::EGRESS_POLICY_LOADS, "outcome" => "ok")
                            .increment(1);
                        stale = false;
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::EGRESS_POLICY_LOADS, "outcome" => "error")
                            .increment(1);
                        tracing::warn!(error = %e, "reading egress policies failed; the last ones read stay in force; retrying");
                    }
                }
            }
            let wait = async {
                if stale {
                    tokio::time::sleep(RETRY).await;
                } else {
                    self.changed.notified().await;
                }
            };
            tokio::select! {
                _ = wait => stale = true,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

impl Policies {
    /// What a tunnel or WebSocket of `agent` to `host` at `addr` re-checks.
    pub fn watch(&self, agent: Arc<Agent>, host: &Host, addr: SocketAddr) -> Watch {
        Watch {
            snapshots: self.subscribe(),
            agent,
            name: host.name().map(Into::into),
            sni: None,
            addr: addr.ip(),
            port: addr.port(),
            open: false,
        }
    }
}

/// An open tunnel or WebSocket, as the policies see it: judged again whenever
/// they change, so a tightening closes it within the reload time.
#[derive(Debug)]
pub struct Watch {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    agent: Arc<Agent>,
    name: Option<Box<str>>,
    /// The host a TLS ClientHello named, when it is not `name`.
    sni: Option<Box<str>>,
    addr: IpAddr,
    port: u16,
    /// The tunnel goes to a destination the agent's plan keeps open while its
    /// user is blocked: a ClientHello must name an open destination too.
    open: bool,
}

/// The refusal of a ClientHello that cannot be read: a tunnel whose SNI cannot
/// be checked is refused wherever a policy applies.
fn unreadable_hello(policy: &Policy) -> Denial {
    static RULE: std::sync::OnceLock<Arc<Rule>> = std::sync::OnceLock::new();
    let rule = RULE.get_or_init(|| {
        Arc::new(Rule {
            id: 0,
            action: Action::Deny,
            ports: Box::new([]),
            text: "unreadable TLS ClientHello".into(),
        })
    });
    policy.denial(Some(rule.clone()))
}

impl Watch {
    /// The agent's policy now, if any.
    fn policy(&self, snapshot: &Snapshot) -> Option<Arc<Policy>> {
        match snapshot.for_agent(&self.agent) {
            Applied::Policy(policy) => Some(policy),
            Applied::None | Applied::Unavailable => None,
        }
    }

    fn judge(&self, policy: &Policy) -> Result<(), Denial> {
        policy.judge(self.name.as_deref(), Some(self.addr), self.port)?;
        match &self.sni {
            Some(sni) => policy.judge(Some(sni), Some(self.addr), self.port),
            None => Ok(()),
        }
    }

    /// This tunnel was let through as a destination the plan keeps open.
    pub fn keep_open(mut self) -> Self {
        self.open = true;
        self
    }

    /// The client's first bytes: the host its ClientHello names must pass the
    /// agent's policy too (and will on every later change), and for a tunnel
    /// to an open destination, be open itself (no fronting another host
    /// through it).
    pub fn judge_hello(&mut self, hello: &Hello) -> Result<(), Denial> {
        let snapshot = self.snapshots.borrow().clone();
        let open = match self.open {
            true => snapshot.open_list(&self.agent),
            false => None,
        };
        // An open tunnel's ClientHello is checked against the open list too.
        let policy = self.policy(&snapshot).or_else(|| open.clone());
        match hello {
            Hello::Complete(Some(sni)) => match parse_host(sni) {
                Some(Host::Name(sni)) if Some(sni.as_str()) != self.name.as_deref() => {
                    self.sni = Some(sni.into());
                }
                Some(_) => {}
                None => return policy.map_or(Ok(()), |p| Err(unreadable_hello(&p))),
            },
            Hello::Malformed => return policy.map_or(Ok(()), |p| Err(unreadable_hello(&p))),
            Hello::Complete(None) | Hello::NotTls | Hello::Partial => {}
        }
        // The CONNECT host was judged when the tunnel opened: only a new name
        // is judged here.
        let Some(sni) = &self.sni else {
            return Ok(());
        };
        if let Some(open) = open {
            open.judge_name(sni, self.port)?;
        }
        match policy {
            Some(policy) => policy.judge(Some(sni), Some(self.addr), self.port),
            None => Ok(()),
        }
    }

    /// The SNI name this tunnel's ClientHello gave, when it differs from the
    /// CONNECT host.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Resolves once the policies in force forbid this destination (enforce
    /// mode); never, if they never do.
    pub async fn forbidden(&mut self) -> Denial {
        loop {
            if self.snapshots.changed().await.is_err() {
                return std::future::pending().await;
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            if let Some(policy) = self.policy(&snapshot) {
                match self.judge(&policy) {
                    Err(denial) if denial.mode == Mode::Enforce => return denial,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        id: i64,
        action: &str,
        host: Option<&str>,
        cidr: Option<&str>,
        ports: Option<Vec<i32>>,
    ) -> policies::RuleRow {
        policies::RuleRow {
            id,
            policy_id: 1,
            action: action.into(),
            host: host.map(Into::into),
            cidr: cidr.map(Into::into),
            ports,
        }
    }

    fn policy(default_action: &str, rules: &[policies::RuleRow]) -> Policy {
        let row = policies::PolicyRow {
            id: 1,
            name: "p".into(),
            mode: "enforce".into(),
            default_action: default_action.into(),
        };
        compile(&row, &rules.iter().collect::<Vec<_>>())
    }

    fn at(ip: &str) -> Vec<SocketAddr> {
        vec![SocketAddr::new(ip.parse().unwrap(), 443)]
    }

    fn denied_by(r: Result<(), Denial>) -> Option<i64> {
        match r {
            Ok(()) => None,
            Err(d) => Some(d.rule.map_or(0, |r| r.id)),
        }
    }

    #[test]
    fn exact_and_wildcard_hosts() {
        let p = policy(
            "deny",
            &[
                rule(1, "allow", Some("api.example.com"), None, None),
                rule(2, "allow", Some("*.cdn.net"), None, Some(vec![443])),
            ],
        );
        assert_eq!(denied_by(p.judge_name("api.example.com", 80)), None);
        assert_eq!(denied_by(p.judge_name("x.api.example.com", 443)), Some(0));
        assert_eq!(denied_by(p.judge_name("a.cdn.net", 443)), None);
        assert_eq!(denied_by(p.judge_name("a.b.cdn.net", 443)), None);
        // The wildcard does not cover the suffix itself, nor other ports.
        assert_eq!(denied_by(p.judge_name("cdn.net", 443)), Some(0));
        assert_eq!(denied_by(p.judge_name("a.cdn.net", 80)), Some(0));
        assert_eq!(denied_by(p.judge_name("evilcdn.net", 443)), Some(0));
    }

    #[test]
    fn deny_wins_whatever_the_order() {
        let p = policy(
            "allow",
            &[
                rule(7, "allow", Some("*.example.com"), None, None),
                rule(3, "deny", Some("secret.example.com"), None, None),
                rule(5, "deny", None, Some("203.0.113.0/24"), None),
                rule(9, "deny", None, None, Some(vec![25])),
            ],
        );
        assert_eq!(denied_by(p.judge_name("secret.example.com", 443)), Some(3));
        assert_eq!(denied_by(p.judge_name("www.example.com", 443)), None);
        assert_eq!(
            denied_by(p.judge_addresses(Some("www.example.com"), &at("203.0.113.9"), 443)),
            Some(5)
        );
        assert_eq!(denied_by(p.judge_name("mail.example.org", 25)), Some(9));
        // Both deny rules match: the lower id is named.
        assert_eq!(
            denied_by(p.judge_addresses(Some("secret.example.com"), &at("203.0.113.9"), 443)),
            Some(3)
        );
    }

    #[test]
    fn cidrs_match_every_address_and_every_spelling() {
        let p = policy(
            "deny",
            &[
                rule(1, "allow", None, Some("198.51.100.0/24"), None),
                rule(2, "deny", None, Some("198.51.100.128/25"), Some(vec![22])),
                rule(3, "allow", None, Some("2001:db8::/32"), None),
            ],
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("198.51.100.7"), 22)),
            None
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("198.51.100.200"), 22)),
            Some(2)
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("198.51.100.200"), 443)),
            None
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("::ffff:198.51.100.200"), 22)),
            Some(2)
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("2001:db8::1"), 22)),
            None
        );
        assert_eq!(
            denied_by(p.judge_addresses(None, &at("192.0.2.1"), 443)),
            Some(0)
        );
        // A name passes only if every address does.
        let mut both = at("198.51.100.7");
        both.extend(at("192.0.2.1"));
        assert_eq!(
            denied_by(p.judge_addresses(Some("x.test"), &both, 443)),
            Some(0)
        );
        // Before resolving, a default refusal is not final when an address could allow it.
        assert_eq!(denied_by(p.judge_name("x.test", 443)), None);
    }

    #[test]
    fn invalid_rules_refuse_everything() {
        let p = policy("allow", &[rule(4, "deny", None, Some("not a cidr"), None)]);
        assert_eq!(denied_by(p.judge_name("anything.test", 443)), Some(4));
    }

    #[test]
    fn masks() {
        assert_eq!(mask_v4(0xC0A8_0101, 0), 0);
        assert_eq!(mask_v4(0xC0A8_0101, 16), 0xC0A8_0000);
        assert_eq!(mask_v4(0xC0A8_0101, 32), 0xC0A8_0101);
        assert_eq!(mask_v6(u128::MAX, 0), 0);
        assert_eq!(mask_v6(u128::MAX, 128), u128::MAX);
    }
}
