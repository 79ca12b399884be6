//! Billing semantics (SPEC §3), in one pure module shared by the proxy, the
//! monitor and the CLI.
//!
//! - A [`Period`] is a calendar month in UTC. Usage belongs to the month of the
//!   instant it happened; a span that straddles a month boundary is split at the
//!   boundary by [`split_at_month_boundaries`].
//! - [`metered_resources_for`] says which axes a provider bills.
//! - [`overage_cost_cents`] prices usage over the plan limits exactly, in integer
//!   arithmetic, rounding up once.
//! - [`decide`] turns a plan, a user's usage and budget into an allow/block
//!   [`Decision`] with a machine-readable reason and the figures behind it.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Bytes in a GiB: bandwidth rates are cents per GiB.
pub const BYTES_PER_GIB: i128 = 1 << 30;
/// CPU-milliseconds in a CPU-hour: CPU rates are cents per CPU-hour.
pub const CPU_MS_PER_HOUR: i128 = 3_600_000;
/// MB-seconds in a GiB-hour: memory rates are cents per GiB-hour (1 GiB = 1024 MB).
pub const MB_SECONDS_PER_GIB_HOUR: i128 = 1024 * 3600;

/// A billing period: the calendar month in UTC that starts on [`Period::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Period(NaiveDate);

impl Period {
    /// The month containing `instant`, in UTC whatever the local or database time zone.
    pub fn containing(instant: DateTime<Utc>) -> Self {
        let d = instant.date_naive();
        Period(NaiveDate::from_ymd_opt(d.year(), d.month(), 1).expect("day 1 exists"))
    }

    /// The period that starts on `date`, if `date` is the first day of a month.
    pub fn starting(date: NaiveDate) -> Option<Self> {
        (date.day() == 1).then_some(Period(date))
    }

    /// The current period by the system clock.
    pub fn current() -> Self {
        Self::containing(Utc::now())
    }

    /// First day of the month (the `period_start` column).
    pub fn start(self) -> NaiveDate {
        self.0
    }

    /// The first instant of the period.
    pub fn start_instant(self) -> DateTime<Utc> {
        Utc.from_utc_datetime(&self.0.and_hms_opt(0, 0, 0).expect("midnight exists"))
    }

    /// The following month.
    pub fn next(self) -> Self {
        let (y, m) = (self.0.year(), self.0.month());
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Period(NaiveDate::from_ymd_opt(y, m, 1).expect("day 1 exists"))
    }

    /// The first instant after the period.
    pub fn end_instant(self) -> DateTime<Utc> {
        self.next().start_instant()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m"))
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    /// Accepts `YYYY-MM` or `YYYY-MM-01`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let full = if s.len() == 7 {
            format!("{s}-01")
        } else {
            s.to_owned()
        };
        let date = NaiveDate::parse_from_str(&full, "%Y-%m-%d")
            .map_err(|_| format!("`{s}` is not a month: expected YYYY-MM"))?;
        Period::starting(date).ok_or_else(|| format!("`{s}` is not the first day of a month"))
    }
}

/// Split `amount`, accrued evenly over `[from, to)`, between the months the span
/// touches, in proportion to the time spent in each. The parts always sum to
/// `amount`. A span with `to <= from` is attributed wholly to the month of `to`.
pub fn split_at_month_boundaries(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    amount: u64,
) -> Vec<(Period, u64)> {
    let last = Period::containing(to);
    if to <= from || Period::containing(from) == last {
        return vec![(last, amount)];
    }
    let total = span_nanos(from, to);
    let mut parts = Vec::with_capacity(2);
    let mut period = Period::containing(from);
    let mut credited: u64 = 0;
    loop {
        let seg_end = period.end_instant().min(to);
        // Cumulative share up to the end of this segment, rounded down; the last
        // segment takes whatever is left, so nothing is lost to rounding.
        let cumulative = if seg_end == to {
            amount
        } else {
            (amount as i128 * span_nanos(from, seg_end) / total) as u64
        };
        let part = cumulative - credited;
        credited = cumulative;
        if part > 0 || seg_end == to {
            parts.push((period, part));
        }
        if seg_end == to {
            return parts;
        }
        period = period.next();
    }
}

fn span_nanos(from: DateTime<Utc>, to: DateTime<Utc>) -> i128 {
    let d = to - from;
    // Spans longer than ~292 years do not fit in i64 nanoseconds; fall back to ms.
    d.num_nanoseconds()
        .map(i128::from)
        .unwrap_or_else(|| i128::from(d.num_milliseconds()) * 1_000_000)
}

/// Which resource axes a provider bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MeteredResources {
    pub bandwidth: bool,
    pub cpu: bool,
    pub memory: bool,
}

impl MeteredResources {
    pub const ALL: Self = Self {
        bandwidth: true,
        cpu: true,
        memory: true,
    };
    pub const BANDWIDTH_ONLY: Self = Self {
        bandwidth: true,
        cpu: false,
        memory: false,
    };

    /// Whether the monitor must sample this provider's VPSes at all.
    pub fn needs_sampling(self) -> bool {
        self.cpu || self.memory
    }
}

/// The metering policy for a provider name (case-insensitive). Fixed-allocation
/// providers (`fly`, `hetzner`) bill bandwidth only; elastic ones (`sprites`, `k8s`)
/// bill everything; an unknown provider bills everything (over-enforce rather than
/// under-enforce), and is logged once per name.
pub fn metered_resources_for(provider: &str) -> MeteredResources {
    let name = provider.trim().to_ascii_lowercase();
    match name.as_str() {
        "fly" | "hetzner" => MeteredResources::BANDWIDTH_ONLY,
        "sprites" | "k8s" => MeteredResources::ALL,
        _ => {
            log_unknown_provider_once(name);
            MeteredResources::ALL
        }
    }
}

fn log_unknown_provider_once(name: String) {
    /// Bounded so a stream of junk provider names cannot grow memory without limit.
    const MAX_REMEMBERED: usize = 1024;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() < MAX_REMEMBERED && !seen.contains(&name) {
        tracing::warn!(
            provider = %name,
            "unknown VPS provider: metering bandwidth, CPU and memory for it; \
             add it to the metering policy if it bills fewer axes"
        );
        seen.insert(name);
    }
}

/// A plan's monthly limits and overage rates, as stored in `plans`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLimits {
    pub max_bandwidth_bytes: i64,
    pub max_cpu_ms: i64,
    pub max_memory_mb_seconds: i64,
    /// Per-VPS storage gauge limit.
    pub max_storage_bytes: i64,
    /// Cents per GiB over `max_bandwidth_bytes`; 0 = overage not on sale.
    pub bandwidth_cents_per_gib: i64,
    /// Cents per CPU-hour over `max_cpu_ms`; 0 = overage not on sale.
    pub cpu_cents_per_hour: i64,
    /// Cents per GiB-hour over `max_memory_mb_seconds`; 0 = overage not on sale.
    pub memory_cents_per_gib_hour: i64,
}

/// A user's usage in one period, summed over all their VPSes (destroyed ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bandwidth_bytes: i64,
    pub cpu_ms: i64,
    pub memory_mb_seconds: i64,
    /// The largest storage gauge among the user's live VPSes.
    pub max_vps_storage_bytes: i64,
}

/// Usage over the limits, per axis (never negative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overage {
    pub bandwidth_bytes: i64,
    pub cpu_ms: i64,
    pub memory_mb_seconds: i64,
}

impl Overage {
    pub fn of(usage: &Usage, limits: &PlanLimits) -> Self {
        let over = |used: i64, limit: i64| used.saturating_sub(limit.max(0)).max(0);
        Overage {
            bandwidth_bytes: over(usage.bandwidth_bytes, limits.max_bandwidth_bytes),
            cpu_ms: over(usage.cpu_ms, limits.max_cpu_ms),
            memory_mb_seconds: over(usage.memory_mb_seconds, limits.max_memory_mb_seconds),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Overage::default()
    }
}

/// The cost in cents of `overage` at the plan's rates:
/// `ceil(bw*bw_rate/2^30 + cpu*cpu_rate/3_600_000 + mem*mem_rate/(1024*3600))`,
/// exact in i128 and rounded up once. Saturates at `i64::MAX`.
pub fn overage_cost_cents(overage: &Overage, limits: &PlanLimits) -> i64 {
    let terms = [
        (
            overage.bandwidth_bytes,
            limits.bandwidth_cents_per_gib,
            BYTES_PER_GIB,
        ),
        (overage.cpu_ms, limits.cpu_cents_per_hour, CPU_MS_PER_HOUR),
        (
            overage.memory_mb_seconds,
            limits.memory_cents_per_gib_hour,
            MB_SECONDS_PER_GIB_HOUR,
        ),
    ];
    // Common denominator 2^30 * 3^2 * 5^5; every divisor above divides it.
    const DENOMINATOR: i128 = BYTES_PER_GIB * 9 * 3125;
    let mut whole: i128 = 0;
    let mut fraction: i128 = 0; // in units of 1/DENOMINATOR, always < 3 * DENOMINATOR
    for (amount, rate, divisor) in terms {
        // Both factors are at most i64::MAX, so the product fits in i128.
        let numerator = i128::from(amount.max(0)) * i128::from(rate.max(0));
        whole += numerator / divisor;
        fraction += (numerator % divisor) * (DENOMINATOR / divisor);
    }
    let cents = whole + (fraction + DENOMINATOR - 1) / DENOMINATOR;
    i64::try_from(cents).unwrap_or(i64::MAX)
}

/// Why a user is blocked. The string forms are stored in `usage_decisions.reason`
/// and returned to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    /// The user has no plan.
    NoPlan,
    /// Bandwidth is over the limit and bandwidth overage is not on sale.
    Bandwidth,
    /// CPU is over the limit and CPU overage is not on sale.
    Cpu,
    /// Memory is over the limit and memory overage is not on sale.
    Memory,
    /// A VPS's storage is over the per-VPS limit (storage overage is never on sale).
    Storage,
    /// Overage is on sale for every axis over its limit, but costs more than the budget.
    BudgetExhausted,
}

impl BlockReason {
    pub const ALL: [BlockReason; 6] = [
        BlockReason::NoPlan,
        BlockReason::Bandwidth,
        BlockReason::Cpu,
        BlockReason::Memory,
        BlockReason::Storage,
        BlockReason::BudgetExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::NoPlan => "no_plan",
            BlockReason::Bandwidth => "bandwidth",
            BlockReason::Cpu => "cpu",
            BlockReason::Memory => "memory",
            BlockReason::Storage => "storage",
            BlockReason::BudgetExhausted => "budget_exhausted",
        }
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BlockReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BlockReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown block reason `{s}`"))
    }
}

/// The numbers a decision was made from, stored with it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub usage: Usage,
    /// `None` when the user has no plan.
    pub limits: Option<PlanLimits>,
    pub overage: Overage,
    pub overage_cost_cents: i64,
    pub budget_cents: i64,
}

/// What a plan does once its user is exhausted (`plans.on_exhausted`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum OnExhausted {
    /// Refuse new requests (403) and cut streams.
    #[default]
    Block,
    /// Let traffic go on at this many bytes per second, the user's connections
    /// on every proxy together, both ways together.
    Throttle { bytes_per_second: u64 },
}

impl OnExhausted {
    /// From `plans.on_exhausted` and `plans.throttle_bytes_per_second` (the
    /// schema makes a throttling plan carry a rate above 0).
    pub fn of_plan(on_exhausted: Option<&str>, bytes_per_second: Option<i64>) -> Self {
        match (on_exhausted, bytes_per_second) {
            (Some("throttle"), Some(rate)) if rate > 0 => OnExhausted::Throttle {
                bytes_per_second: rate as u64,
            },
            _ => OnExhausted::Block,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnExhausted::Block => "block",
            OnExhausted::Throttle { .. } => "throttle",
        }
    }

    /// The throttle rate, if the plan throttles.
    pub fn rate(self) -> Option<u64> {
        match self {
            OnExhausted::Block => None,
            OnExhausted::Throttle { bytes_per_second } => Some(bytes_per_second),
        }
    }
}

/// Allow or block a user, with the figures behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// `None` when allowed.
    pub blocked: Option<BlockReason>,
    pub figures: Figures,
    /// What a block means for this user's traffic (the plan's choice; a user
    /// with no plan is always blocked).
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

impl Decision {
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// What is done to the user's traffic: `None` when allowed, else `block`
    /// or `throttle`.
    pub fn action(&self) -> Option<OnExhausted> {
        self.blocked.map(|_| self.on_exhausted)
    }

    /// This decision, for a plan that does `on_exhausted` once its user is
    /// exhausted.
    pub fn with(mut self, on_exhausted: OnExhausted) -> Self {
        if self.blocked != Some(BlockReason::NoPlan) {
            self.on_exhausted = on_exhausted;
        }
        self
    }
}

/// Decide whether a user may use resources (SPEC §3).
///
/// Allowed iff every axis is within its limit, or every axis over its limit has a
/// rate above 0, storage is within its per-VPS limit, and the overage cost is
/// within the budget. The reason reported when several apply is the first of:
/// `no_plan`, `storage`, `bandwidth`/`cpu`/`memory` (over with a rate of 0),
/// `budget_exhausted`.
pub fn decide(plan: Option<&PlanLimits>, usage: &Usage, budget_cents: i64) -> Decision {
    let budget_cents = budget_cents.max(0);
    let Some(limits) = plan else {
        return Decision {
            blocked: Some(BlockReason::NoPlan),
            figures: Figures {
                usage: *usage,
                limits: None,
                overage: Overage::default(),
                overage_cost_cents: 0,
                budget_cents,
            },
            on_exhausted: OnExhausted::Block,
        };
    };
    let overage = Overage::of(usage, limits);
    let cost = overage_cost_cents(&overage, limits);
    let not_on_sale = |over: i64, rate: i64| over > 0 && rate <= 0;
    let blocked = if usage.max_vps_storage_bytes > limits.max_storage_bytes {
        Some(BlockReason::Storage)
    } else if not_on_sale(overage.bandwidth_bytes, limits.bandwidth_cents_per_gib) {
        Some(BlockReason::Bandwidth)
    } else if not_on_sale(overage.cpu_ms, limits.cpu_cents_per_hour) {
        Some(BlockReason::Cpu)
    } else if not_on_sale(overage.memory_mb_seconds, limits.memory_cents_per_gib_hour) {
        Some(BlockReason::Memory)
    } else if cost > budget_cents {
        Some(BlockReason::BudgetExhausted)
    } else {
        None
    };
    Decision {
        blocked,
        figures: Figures {
            usage: *usage,
            limits: Some(*limits),
            overage,
            overage_cost_cents: cost,
            budget_cents,
        },
        on_exhausted: OnExhausted::Block,
    }
}

/// How many more bandwidth bytes `usage` can grow by before [`decide`] blocks
/// (other axes unchanged), and the reason it would then give. `None` when the
/// user is already blocked. Lets the proxy enforce on bytes it has counted but
/// not yet written.
pub fn bandwidth_headroom(
    plan: Option<&PlanLimits>,
    usage: &Usage,
    budget_cents: i64,
) -> Option<(u64, BlockReason)> {
    let limits = plan?;
    if decide(plan, usage, budget_cents).is_blocked() {
        return None;
    }
    let allowed_with = |extra: u64| {
        let grown = Usage {
            bandwidth_bytes: usage
                .bandwidth_bytes
                .saturating_add(i64::try_from(extra).unwrap_or(i64::MAX)),
            ..*usage
        };
        !decide(plan, &grown, budget_cents).is_blocked()
    };
    let reason = if limits.bandwidth_cents_per_gib > 0 {
        BlockReason::BudgetExhausted
    } else {
        BlockReason::Bandwidth
    };
    // Cost only grows with usage, so the allowed extras form a prefix: search it.
    let (mut lo, mut hi) = (0u64, i64::MAX as u64);
    if allowed_with(hi) {
        return Some((hi, reason));
    }
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if allowed_with(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some((lo, reason))
}

/// How many bandwidth bytes `usage` is past the most [`decide`] allows (other
/// axes unchanged): the overshoot of a block that bandwidth caused. `None` when
/// the user is not blocked, or would be blocked even with no bandwidth at all
/// (the block is not bandwidth's doing).
pub fn bandwidth_overshoot(
    plan: Option<&PlanLimits>,
    usage: &Usage,
    budget_cents: i64,
) -> Option<u64> {
    if !decide(plan, usage, budget_cents).is_blocked() {
        return None;
    }
    let without = Usage {
        bandwidth_bytes: 0,
        ..*usage
    };
    let (allowed, _) = bandwidth_headroom(plan, &without, budget_cents)?;
    Some((usage.bandwidth_bytes.max(0) as u64).saturating_sub(allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;

    const GIB: i64 = 1 << 30;

    #[test]
    fn overshoot_is_the_bandwidth_past_the_last_allowed_byte() {
        let limits = PlanLimits {
            max_bandwidth_bytes: 1_000_000,
            ..plan()
        };
        let at = |bandwidth_bytes| Usage {
            bandwidth_bytes,
            ..Usage::default()
        };
        assert_eq!(bandwidth_overshoot(Some(&limits), &at(1_000_000), 0), None);
        assert_eq!(
            bandwidth_overshoot(Some(&limits), &at(1_000_001), 0),
            Some(1)
        );
        assert_eq!(
            bandwidth_overshoot(Some(&limits), &at(1_049_000), 0),
            Some(49_000)
        );
        // Overage on sale: the budget sets the last allowed byte.
        let on_sale = PlanLimits {
            bandwidth_cents_per_gib: 100,
            ..limits
        };
        let ceiling = 1_000_000 + (GIB as u64) / 100;
        assert_eq!(
            bandwidth_overshoot(Some(&on_sale), &at(ceiling as i64), 1),
            None
        );
        assert_eq!(
            bandwidth_overshoot(Some(&on_sale), &at(ceiling as i64 + 7), 1),
            Some(7)
        );
        // Blocked for something else: not bandwidth's overshoot.
        assert_eq!(bandwidth_overshoot(None, &at(5), 0), None);
    }

    fn plan() -> PlanLimits {
        PlanLimits {
            max_bandwidth_bytes: 100 * GIB,
            max_cpu_ms: 360_000_000,
            max_memory_mb_seconds: 1_843_200_000,
            max_storage_bytes: 50 * GIB,
            bandwidth_cents_per_gib: 0,
            cpu_cents_per_hour: 0,
            memory_cents_per_gib_hour: 0,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn usage_bw(bytes: i64) -> Usage {
        Usage {
            bandwidth_bytes: bytes,
            ..Usage::default()
        }
    }

    #[test]
    fn period_is_the_utc_month() {
        let p = Period::containing(at("2026-03-31T23:59:59.999+00:00"));
        assert_eq!(p.start(), NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        // 23:30 on March 31st in New York is already April in UTC.
        let p = Period::containing(at("2026-03-31T23:30:00-04:00"));
        assert_eq!(p.start(), NaiveDate::from_ymd_opt(2026, 4, 1).unwrap());
        assert_eq!(
            Period::containing(at("2026-12-15T00:00:00Z"))
                .next()
                .to_string(),
            "2027-01"
        );
        assert_eq!(
            "2026-02".parse::<Period>().unwrap().start_instant(),
            at("2026-02-01T00:00:00Z")
        );
        assert!("2026-02-02".parse::<Period>().is_err());
        assert!("february".parse::<Period>().is_err());
    }

    #[test]
    fn split_inside_one_month_is_whole() {
        let parts =
            split_at_month_boundaries(at("2026-05-10T00:00:00Z"), at("2026-05-10T00:00:01Z"), 1234);
        assert_eq!(parts, vec![("2026-05".parse().unwrap(), 1234)]);
    }

    #[test]
    fn split_at_boundary_is_proportional_to_time() {
        // 1 s before and 3 s after midnight of June 1st.
        let parts =
            split_at_month_boundaries(at("2026-05-31T23:59:59Z"), at("2026-06-01T00:00:03Z"), 4000);
        assert_eq!(
            parts,
            vec![
                ("2026-05".parse().unwrap(), 1000),
                ("2026-06".parse().unwrap(), 3000)
            ]
        );
    }

    #[test]
    fn split_of_empty_or_reversed_span_goes_to_the_end_month() {
        let t = at("2026-07-01T00:00:00Z");
        assert_eq!(
            split_at_month_boundaries(t, t, 7),
            vec![("2026-07".parse().unwrap(), 7)]
        );
        let earlier = at("2026-06-30T00:00:00Z");
        assert_eq!(
            split_at_month_boundaries(t, earlier, 7),
            vec![("2026-06".parse().unwrap(), 7)]
        );
    }

    #[test]
    fn split_over_several_months_covers_each() {
        let parts =
            split_at_month_boundaries(at("2026-01-31T00:00:00Z"), at("2026-03-02T00:00:00Z"), 30);
        let months: Vec<String> = parts.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(months, ["2026-01", "2026-02", "2026-03"]);
        // 1 day of 30 in January, 28 in February, 1 in March.
        assert_eq!(
            parts.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [1, 28, 1]
        );
    }

    #[test]
    fn metering_policy_per_provider() {
        assert_eq!(
            metered_resources_for("fly"),
            MeteredResources::BANDWIDTH_ONLY
        );
        assert_eq!(
            metered_resources_for("Hetzner"),
            MeteredResources::BANDWIDTH_ONLY
        );
        assert_eq!(metered_resources_for("SPRITES"), MeteredResources::ALL);
        assert_eq!(metered_resources_for("k8s"), MeteredResources::ALL);
        assert_eq!(
            metered_resources_for("some-new-cloud"),
            MeteredResources::ALL
        );
        assert_eq!(metered_resources_for(""), MeteredResources::ALL);
        assert!(!metered_resources_for("fly").needs_sampling());
        assert!(metered_resources_for("unknown").needs_sampling());
    }

    #[test]
    fn one_byte_over_at_one_cent_per_gib_costs_one_cent() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 1,
            ..plan()
        };
        let over = Overage {
            bandwidth_bytes: 1,
            ..Overage::default()
        };
        assert_eq!(overage_cost_cents(&over, &limits), 1);
    }

    #[test]
    fn one_gib_over_at_five_cents_per_gib_costs_five() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 5,
            ..plan()
        };
        let over = Overage {
            bandwidth_bytes: GIB,
            ..Overage::default()
        };
        assert_eq!(overage_cost_cents(&over, &limits), 5);
        let over = Overage {
            bandwidth_bytes: GIB + 1,
            ..Overage::default()
        };
        assert_eq!(overage_cost_cents(&over, &limits), 6);
    }

    #[test]
    fn cpu_and_memory_rates_use_their_units() {
        let limits = PlanLimits {
            cpu_cents_per_hour: 10,
            memory_cents_per_gib_hour: 3,
            ..plan()
        };
        let one_cpu_hour = Overage {
            cpu_ms: 3_600_000,
            ..Overage::default()
        };
        assert_eq!(overage_cost_cents(&one_cpu_hour, &limits), 10);
        let one_gib_hour = Overage {
            memory_mb_seconds: 1024 * 3600,
            ..Overage::default()
        };
        assert_eq!(overage_cost_cents(&one_gib_hour, &limits), 3);
    }

    #[test]
    fn cost_rounds_up_once_not_per_axis() {
        // Half a cent on each of two axes is one cent, not two.
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 1,
            cpu_cents_per_hour: 1,
            ..plan()
        };
        let over = Overage {
            bandwidth_bytes: GIB / 2,
            cpu_ms: 1_800_000,
            memory_mb_seconds: 0,
        };
        assert_eq!(overage_cost_cents(&over, &limits), 1);
        // Just under a cent spread over three axes is one cent.
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 1,
            cpu_cents_per_hour: 1,
            memory_cents_per_gib_hour: 1,
            ..plan()
        };
        let over = Overage {
            bandwidth_bytes: GIB / 4 + GIB / 16 + GIB / 64 + GIB / 256 + GIB / 1024, // < 1/3
            cpu_ms: 1_200_000,                                                       // 1/3
            memory_mb_seconds: 1_228_800,                                            // 1/3
        };
        assert_eq!(overage_cost_cents(&over, &limits), 1);
    }

    #[test]
    fn cost_of_extreme_values_saturates_without_overflow() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: i64::MAX,
            cpu_cents_per_hour: i64::MAX,
            memory_cents_per_gib_hour: i64::MAX,
            ..plan()
        };
        let over = Overage {
            bandwidth_bytes: i64::MAX,
            cpu_ms: i64::MAX,
            memory_mb_seconds: i64::MAX,
        };
        assert_eq!(overage_cost_cents(&over, &limits), i64::MAX);
    }

    #[test]
    fn within_every_limit_is_allowed_even_with_zero_rates_and_budget() {
        let d = decide(Some(&plan()), &usage_bw(100 * GIB), 0);
        assert_eq!(d.blocked, None);
        assert_eq!(d.figures.overage_cost_cents, 0);
    }

    #[test]
    fn no_plan_is_blocked() {
        let d = decide(None, &Usage::default(), 1_000_000);
        assert_eq!(d.blocked, Some(BlockReason::NoPlan));
        assert_eq!(d.figures.limits, None);
    }

    #[test]
    fn over_a_limit_whose_rate_is_zero_is_blocked_whatever_the_budget() {
        let d = decide(Some(&plan()), &usage_bw(100 * GIB + 1), i64::MAX);
        assert_eq!(d.blocked, Some(BlockReason::Bandwidth));
        let cpu = Usage {
            cpu_ms: 360_000_001,
            ..Usage::default()
        };
        assert_eq!(
            decide(Some(&plan()), &cpu, i64::MAX).blocked,
            Some(BlockReason::Cpu)
        );
        let mem = Usage {
            memory_mb_seconds: 1_843_200_001,
            ..Usage::default()
        };
        assert_eq!(
            decide(Some(&plan()), &mem, i64::MAX).blocked,
            Some(BlockReason::Memory)
        );
    }

    #[test]
    fn a_zero_rate_on_one_axis_blocks_even_if_another_axis_is_on_sale() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 5,
            ..plan()
        };
        let usage = Usage {
            bandwidth_bytes: 101 * GIB,
            cpu_ms: 360_000_001,
            ..Usage::default()
        };
        assert_eq!(
            decide(Some(&limits), &usage, 1_000).blocked,
            Some(BlockReason::Cpu)
        );
    }

    #[test]
    fn overage_on_sale_is_allowed_up_to_the_budget() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 5,
            ..plan()
        };
        let usage = usage_bw(102 * GIB); // 2 GiB over: 10 cents
        assert_eq!(decide(Some(&limits), &usage, 10).blocked, None);
        let d = decide(Some(&limits), &usage, 9);
        assert_eq!(d.blocked, Some(BlockReason::BudgetExhausted));
        assert_eq!(d.figures.overage_cost_cents, 10);
        assert_eq!(d.figures.overage.bandwidth_bytes, 2 * GIB);
        assert_eq!(d.figures.budget_cents, 9);
    }

    #[test]
    fn missing_budget_is_zero() {
        let limits = PlanLimits {
            bandwidth_cents_per_gib: 1,
            ..plan()
        };
        assert_eq!(
            decide(Some(&limits), &usage_bw(100 * GIB + 1), 0).blocked,
            Some(BlockReason::BudgetExhausted)
        );
    }

    #[test]
    fn storage_over_its_per_vps_limit_is_blocked() {
        let usage = Usage {
            max_vps_storage_bytes: 50 * GIB + 1,
            ..Usage::default()
        };
        assert_eq!(
            decide(Some(&plan()), &usage, i64::MAX).blocked,
            Some(BlockReason::Storage)
        );
        let usage = Usage {
            max_vps_storage_bytes: 50 * GIB,
            ..Usage::default()
        };
        assert_eq!(decide(Some(&plan()), &usage, 0).blocked, None);
    }

    #[test]
    fn block_reasons_round_trip_as_strings() {
        for r in BlockReason::ALL {
            assert_eq!(r.as_str().parse::<BlockReason>().unwrap(), r);
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }

    #[test]
    fn headroom_is_what_is_left_of_the_limit_or_the_budget() {
        let limits = PlanLimits {
            max_bandwidth_bytes: 1000,
            ..plan()
        };
        assert_eq!(
            bandwidth_headroom(Some(&limits), &usage_bw(400), 0),
            Some((600, BlockReason::Bandwidth))
        );
        assert_eq!(
            bandwidth_headroom(Some(&limits), &usage_bw(1001), 1000),
            None
        );
        assert_eq!(bandwidth_headroom(None, &usage_bw(0), 1000), None);
        // 5 cents/GiB and 10 cents of budget buy 2 GiB of overage.
        let on_sale = PlanLimits {
            max_bandwidth_bytes: GIB,
            bandwidth_cents_per_gib: 5,
            ..plan()
        };
        assert_eq!(
            bandwidth_headroom(Some(&on_sale), &usage_bw(GIB / 2), 10),
            Some(((GIB / 2 + 2 * GIB) as u64, BlockReason::BudgetExhausted))
        );
    }

    proptest! {
        #[test]
        fn headroom_is_exactly_the_last_allowed_byte(
            used in 0i64..1 << 40, limit in 0i64..1 << 40, rate in 0i64..50, budget in 0i64..500,
        ) {
            let limits = PlanLimits { max_bandwidth_bytes: limit, bandwidth_cents_per_gib: rate, ..plan() };
            let u = usage_bw(used);
            match bandwidth_headroom(Some(&limits), &u, budget) {
                None => prop_assert!(decide(Some(&limits), &u, budget).is_blocked()),
                Some((room, _)) => {
                    let at = usage_bw(used + room as i64);
                    prop_assert!(!decide(Some(&limits), &at, budget).is_blocked());
                    let past = usage_bw(used + room as i64 + 1);
                    prop_assert!(decide(Some(&limits), &past, budget).is_blocked());
                }
            }
        }

        #[test]
        fn cost_never_decreases_as_usage_grows(
            bw in 0i64..1 << 50, cpu in 0i64..1 << 40, mem in 0i64..1 << 40,
            dbw in 0i64..1 << 40, dcpu in 0i64..1 << 30, dmem in 0i64..1 << 30,
            rates in (0i64..10_000, 0i64..10_000, 0i64..10_000),
        ) {
            let limits = PlanLimits {
                bandwidth_cents_per_gib: rates.0,
                cpu_cents_per_hour: rates.1,
                memory_cents_per_gib_hour: rates.2,
                ..plan()
            };
            let a = Usage { bandwidth_bytes: bw, cpu_ms: cpu, memory_mb_seconds: mem, max_vps_storage_bytes: 0 };
            let b = Usage {
                bandwidth_bytes: bw + dbw, cpu_ms: cpu + dcpu, memory_mb_seconds: mem + dmem,
                max_vps_storage_bytes: 0,
            };
            let cost = |u: &Usage| overage_cost_cents(&Overage::of(u, &limits), &limits);
            prop_assert!(cost(&a) <= cost(&b));
        }

        #[test]
        fn cost_is_the_exact_ceiling(over in 0i64..1 << 45, rate in 0i64..100_000) {
            let limits = PlanLimits { bandwidth_cents_per_gib: rate, ..plan() };
            let o = Overage { bandwidth_bytes: over, ..Overage::default() };
            let exact = i128::from(over) * i128::from(rate);
            let expected = (exact + BYTES_PER_GIB - 1) / BYTES_PER_GIB;
            prop_assert_eq!(i128::from(overage_cost_cents(&o, &limits)), expected);
        }

        #[test]
        fn more_budget_never_blocks_more(bw in 0i64..1 << 40, budget in 0i64..1000, extra in 0i64..1000) {
            let limits = PlanLimits { max_bandwidth_bytes: 1 << 30, bandwidth_cents_per_gib: 7, ..plan() };
            let u = usage_bw(bw);
            if decide(Some(&limits), &u, budget).blocked.is_none() {
                prop_assert!(decide(Some(&limits), &u, budget + extra).blocked.is_none());
            }
        }

        #[test]
        fn splitting_preserves_the_total(
            start in 1_700_000_000i64..1_900_000_000,
            len_s in 0i64..200 * 86_400,
            amount in any::<u64>(),
        ) {
            let from = DateTime::from_timestamp(start, 0).unwrap();
            let to = from + Duration::seconds(len_s);
            let parts = split_at_month_boundaries(from, to, amount);
            let total: u128 = parts.iter().map(|(_, n)| u128::from(*n)).sum();
            prop_assert_eq!(total, u128::from(amount));
            // Periods are distinct, ascending, and lie within the span.
            for w in parts.windows(2) {
                prop_assert!(w[0].0 < w[1].0);
            }
            prop_assert!(parts.first().unwrap().0 >= Period::containing(from));
            prop_assert_eq!(parts.last().unwrap().0, Period::containing(to));
        }
    }
}
