//! Interleaved rounds: every load measurement runs round after round over all
//! its servers (round 1: direct, Tollgate, nginx, haproxy; round 2 the same
//! again; ...), so a slow minute on this shared machine hits every server alike
//! instead of one. Each server's row is the median over its rounds, shown with
//! its spread, and every run records the CPU steal the hypervisor took while it
//! ran (from `/proc/stat`).

/// Relative spread above which a row is marked unstable: (max − min) / median.
pub const UNSTABLE_SPREAD: f64 = 0.10;

/// The machine's CPU time counters (all CPUs, clock ticks), from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    busy_and_idle: u64,
    steal: u64,
}

impl CpuClock {
    /// The counters now; `None` where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // "cpu  user nice system idle iowait irq softirq steal guest guest_nice";
        // guest time is already counted in user and nice.
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(CpuClock {
            busy_and_idle: fields.iter().sum(),
            steal: *fields.get(7)?,
        })
    }

    /// Steal since `self`: percent of the CPU time elapsed on all CPUs.
    pub fn steal_since(self) -> Option<f64> {
        let now = CpuClock::now()?;
        let elapsed = now.busy_and_idle.checked_sub(self.busy_and_idle)?;
        let steal = now.steal.checked_sub(self.steal)?;
        (elapsed > 0).then(|| steal as f64 / elapsed as f64 * 100.0)
    }
}

/// Counts the steal of one run: started before it, read after it.
pub struct StealMeter(Option<CpuClock>);

impl StealMeter {
    pub fn start() -> StealMeter {
        StealMeter(CpuClock::now())
    }

    /// Percent of the CPU time since `start` (NaN where `/proc/stat` is unreadable).
    pub fn percent(self) -> f64 {
        self.0.and_then(CpuClock::steal_since).unwrap_or(f64::NAN)
    }
}

/// One run of one round, with the steal while it ran.
#[derive(Debug, Clone, Copy)]
pub struct Measured<T> {
    pub value: T,
    /// Percent of the machine's CPU time stolen during the run.
    pub steal_percent: f64,
}

/// One server's runs of one measurement, one per round, in round order.
#[derive(Debug, Clone)]
pub struct Rounds<T> {
    pub runs: Vec<Measured<T>>,
}

impl<T> Default for Rounds<T> {
    fn default() -> Self {
        Rounds { runs: Vec::new() }
    }
}

impl<T> Rounds<T> {
    pub fn push(&mut self, value: T, steal_percent: f64) {
        self.runs.push(Measured {
            value,
            steal_percent,
        });
    }

    /// Median, min and max of one figure over the rounds.
    pub fn spread(&self, figure: impl Fn(&T) -> f64) -> Spread {
        Spread::of(self.runs.iter().map(|m| figure(&m.value)).collect())
    }

    /// The run whose `figure` is the median (the upper one of an even count).
    pub fn median_run(&self, figure: impl Fn(&T) -> f64) -> Option<&T> {
        let mut runs: Vec<&T> = self.runs.iter().map(|m| &m.value).collect();
        runs.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
        runs.get(runs.len() / 2).copied()
    }

    /// Median and max steal over the rounds (rounds without a reading left out).
    pub fn steal(&self) -> Spread {
        Spread::of(
            self.runs
                .iter()
                .map(|m| m.steal_percent)
                .filter(|s| s.is_finite())
                .collect(),
        )
    }
}

/// The median of some rounds' figures and how far they are apart.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        match (values.first(), values.last()) {
            (Some(&min), Some(&max)) => Spread {
                median: values[values.len() / 2],
                min,
                max,
                rounds: values.len(),
            },
            _ => Spread::default(),
        }
    }

    /// (max − min) / median; 0 for fewer than two rounds.
    pub fn relative(&self) -> f64 {
        if self.rounds < 2 || self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median
        }
    }

    /// Whether the rounds are too far apart for the median to be trusted.
    pub fn unstable(&self) -> bool {
        self.relative() > UNSTABLE_SPREAD
    }
}
