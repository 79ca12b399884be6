//! Interleaved rounds: every load measurement runs round after round over all
//! its servers (round 1: direct, Tollgate, nginx, haproxy; round 2 the same
//! again; ...), so a slow minute on this shared machine hits every server alike
//! instead of one. Each server's row is the median over its rounds, shown with
//! its spread, and every run records the CPU steal the hypervisor took while it
//! ran and how busy the server core and the load core were (from `/proc/stat`).

/// Relative spread above which a row is marked unstable: (max − min) / median.
pub const UNSTABLE_SPREAD: f64 = 0.10;

/// Percent of its time a core ran anything at or above which it is taken to
/// have set a run's pace (alone, or with the other core if that one is as
/// busy).
pub const SATURATED: f64 = 95.0;

/// CPU time counters from `/proc/stat` (clock ticks): all CPUs together
/// (`cpu`) and each core (`cpuN`).
#[derive(Debug, Clone)]
pub struct CpuClock {
    machine: Ticks,
    cores: Vec<(usize, Ticks)>,
}

#[derive(Debug, Clone, Copy)]
struct Ticks {
    total: u64,
    idle: u64,
    steal: u64,
}

impl Ticks {
    /// "user nice system idle iowait irq softirq steal guest guest_nice";
    /// guest time is already counted in user and nice.
    fn parse(fields: &str) -> Option<Ticks> {
        let v: Vec<u64> = fields
            .split_whitespace()
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(Ticks {
            total: v.iter().sum(),
            idle: v.get(3)? + v.get(4)?,
            steal: *v.get(7)?,
        })
    }

    /// Ticks elapsed since `earlier`, and of them those stolen and those run.
    fn since(self, earlier: Ticks) -> Option<(u64, u64, u64)> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| (total, steal, total.saturating_sub(idle + steal)))
    }
}

impl CpuClock {
    /// The counters now; `None` where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut lines = stat.lines();
        let machine = Ticks::parse(lines.next()?.strip_prefix("cpu ")?)?;
        let cores = lines
            .map_while(|line| {
                let (core, fields) = line.strip_prefix("cpu")?.split_once(' ')?;
                Some((core.parse().ok()?, Ticks::parse(fields)?))
            })
            .collect();
        Some(CpuClock { machine, cores })
    }

    fn core(&self, id: usize) -> Option<Ticks> {
        self.cores.iter().find(|(c, _)| *c == id).map(|(_, t)| *t)
    }
}

/// How busy the two cores were during a run: percent of each one's time spent
/// running anything (neither idle nor stolen).
#[derive(Debug, Clone, Copy)]
pub struct CoresBusy {
    /// The core the servers under test run on.
    pub server: f64,
    /// The core wrk, the origin and the harness run on.
    pub load: f64,
}

/// What the machine did during one run besides it.
#[derive(Debug, Clone, Copy)]
pub struct Conditions {
    /// Percent of all CPUs' time the hypervisor took (NaN where unreadable).
    pub steal_percent: f64,
    pub cores: Option<CoresBusy>,
}

/// Reads `/proc/stat` before a run and again after it.
pub struct RunMeter {
    start: Option<CpuClock>,
    server_cpu: usize,
    load_cpu: usize,
}

impl RunMeter {
    pub fn start(server_cpu: usize, load_cpu: usize) -> RunMeter {
        RunMeter {
            start: CpuClock::now(),
            server_cpu,
            load_cpu,
        }
    }

    pub fn finish(self) -> Conditions {
        let (Some(start), Some(end)) = (self.start, CpuClock::now()) else {
            return Conditions {
                steal_percent: f64::NAN,
                cores: None,
            };
        };
        let percent = |part: u64, whole: u64| part as f64 / whole as f64 * 100.0;
        let busy = |core: usize| {
            let (total, _, ran) = end.core(core)?.since(start.core(core)?)?;
            Some(percent(ran, total))
        };
        Conditions {
            steal_percent: end
                .machine
                .since(start.machine)
                .map_or(f64::NAN, |(total, steal, _)| percent(steal, total)),
            cores: busy(self.server_cpu)
                .zip(busy(self.load_cpu))
                .map(|(server, load)| CoresBusy { server, load }),
        }
    }
}

/// One run of one round, with the steal while it ran.
#[derive(Debug, Clone, Copy)]
pub struct Measured<T> {
    pub value: T,
    /// Percent of the machine's CPU time stolen during the run.
    pub steal_percent: f64,
    pub cores: Option<CoresBusy>,
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
    pub fn push(&mut self, value: T, during: Conditions) {
        self.runs.push(Measured {
            value,
            steal_percent: during.steal_percent,
            cores: during.cores,
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

    /// Median busy share of the server core and of the load core over the
    /// rounds; `None` without readings.
    pub fn cores(&self) -> Option<CoresBusy> {
        let busy: Vec<CoresBusy> = self.runs.iter().filter_map(|m| m.cores).collect();
        (!busy.is_empty()).then(|| CoresBusy {
            server: Spread::of(busy.iter().map(|c| c.server).collect()).median,
            load: Spread::of(busy.iter().map(|c| c.load).collect()).median,
        })
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
