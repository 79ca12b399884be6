//! Turning two consecutive readings of a VPS into usage (SPEC §5), exactly:
//!
//! - CPU-ms from a cumulative counter: the difference to the previous reading;
//!   a counter that went backwards was reset (a reboot) and counts its new value.
//!   Sub-millisecond remainders carry over in the state, so nothing is rounded
//!   away over many samples. Sources that only report a utilisation percentage
//!   (the in-VM agent) are integrated into a synthetic cumulative counter.
//! - Memory-MB-seconds by trapezoid integration of two readings over the time
//!   between them, with gaps longer than `max_gap` counting only `max_gap`.
//! - The first reading of a VPS is a baseline: it counts nothing.
//! - Usage spanning a month boundary is split at the boundary in proportion to
//!   time (`billing::split_at_month_boundaries`).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use tollgate_core::billing::{split_at_month_boundaries, Period};
use tollgate_core::db::samples::{Increment, SampleState, SampleWrite};

/// Bytes in the MB of MB-seconds (a MiB, as `memory_mb` of VM presets).
const BYTES_PER_MB: i128 = 1 << 20;
/// Byte-milliseconds in one MB-second.
const BYTE_MS_PER_MB_SECOND: i128 = BYTES_PER_MB * 1000;

/// How a source reports CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cpu {
    /// A cumulative counter of CPU time, microseconds.
    CumulativeUs(u64),
    /// Utilisation of the whole VPS in percent (0-100) since its last report.
    Percent(f64),
}

/// One reading of a VPS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub at: DateTime<Utc>,
    pub cpu: Option<Cpu>,
    pub memory_bytes: Option<u64>,
    pub storage_bytes: Option<u64>,
}

/// What to account for a VPS.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub cpu: bool,
    pub memory: bool,
    pub max_gap: Duration,
    /// CPU allocation, to turn a utilisation percentage into CPU time.
    pub cpu_millicores: i32,
}

/// The write for `reading`, given the previous state (if any) from `source`.
pub fn account(
    vps_id: Uuid,
    source: &str,
    previous: Option<&SampleState>,
    reading: &Reading,
    policy: &Policy,
) -> SampleWrite {
    // Counters from another source are not comparable: start over from a baseline.
    let previous = previous.filter(|p| p.source == source);
    let elapsed = previous
        .map(|p| {
            (reading.at - p.sampled_at)
                .to_std()
                .unwrap_or(Duration::ZERO)
        })
        .unwrap_or(Duration::ZERO);
    let mut state = SampleState {
        vps_id,
        source: source.to_owned(),
        sampled_at: reading.at,
        cpu_total_us: None,
        cpu_residue_us: 0,
        memory_bytes: None,
        memory_residue: 0,
    };
    let mut per_period: BTreeMap<Period, (i64, i64)> = BTreeMap::new();

    if let (true, Some(cpu)) = (policy.cpu, reading.cpu) {
        let old_total = previous
            .and_then(|p| p.cpu_total_us)
            .map(|t| t.max(0) as u64);
        let new_total = match cpu {
            Cpu::CumulativeUs(total) => total,
            Cpu::Percent(percent) => {
                let cores = f64::from(policy.cpu_millicores.max(0)) / 1000.0;
                let span = elapsed.min(policy.max_gap).as_secs_f64() * 1e6;
                let used = (percent.clamp(0.0, 100.0) / 100.0 * cores * span).round() as u64;
                old_total
                    .unwrap_or(0)
                    .saturating_add(if previous.is_some() { used } else { 0 })
            }
        };
        state.cpu_total_us = Some(i64::try_from(new_total).unwrap_or(i64::MAX));
        if let (Some(prev), Some(old)) = (previous, old_total) {
            // A counter that went backwards restarted (reboot): all of it is new.
            let delta = if new_total >= old {
                new_total - old
            } else {
                new_total
            };
            let total_us = i128::from(delta) + i128::from(prev.cpu_residue_us);
            let ms = (total_us / 1000) as u64;
            state.cpu_residue_us = (total_us % 1000) as i64;
            for (period, n) in split_at_month_boundaries(prev.sampled_at, reading.at, ms) {
                per_period.entry(period).or_default().0 += n as i64;
            }
        } else if let Some(prev) = previous {
            state.cpu_residue_us = prev.cpu_residue_us;
        }
    }

    if let (true, Some(bytes)) = (policy.memory, reading.memory_bytes) {
        state.memory_bytes = Some(i64::try_from(bytes).unwrap_or(i64::MAX));
        if let Some(prev) = previous {
            state.memory_residue = prev.memory_residue;
            if let Some(old) = prev.memory_bytes {
                let span = elapsed.min(policy.max_gap);
                let span_ms = span.as_millis() as i128;
                let area = (i128::from(old.max(0)) + i128::from(bytes)) * span_ms / 2
                    + i128::from(prev.memory_residue);
                let mb_seconds = (area / BYTE_MS_PER_MB_SECOND) as u64;
                state.memory_residue = (area % BYTE_MS_PER_MB_SECOND) as i64;
                let from = reading.at - chrono::Duration::from_std(span).unwrap_or_default();
                for (period, n) in split_at_month_boundaries(from, reading.at, mb_seconds) {
                    per_period.entry(period).or_default().1 += n as i64;
                }
            }
        }
    }

    SampleWrite {
        state,
        previous_sampled_at: previous.map(|p| p.sampled_at),
        increments: per_period
            .into_iter()
            .filter(|(_, (cpu, mem))| *cpu != 0 || *mem != 0)
            .map(|(period, (cpu_ms, memory_mb_seconds))| Increment {
                period,
                cpu_ms,
                memory_mb_seconds,
            })
            .collect(),
        storage_bytes: reading
            .storage_bytes
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn policy() -> Policy {
        Policy {
            cpu: true,
            memory: true,
            max_gap: Duration::from_secs(300),
            cpu_millicores: 2000,
        }
    }

    fn reading(t: &str, cpu_us: u64, mem: u64) -> Reading {
        Reading {
            at: at(t),
            cpu: Some(Cpu::CumulativeUs(cpu_us)),
            memory_bytes: Some(mem),
            storage_bytes: None,
        }
    }

    /// Feed readings in order; return the summed increments (cpu_ms, mb_s).
    fn run(readings: &[Reading], policy: &Policy) -> (i64, i64, SampleState) {
        let vps = Uuid::nil();
        let mut state: Option<SampleState> = None;
        let (mut cpu, mut mem) = (0, 0);
        for r in readings {
            let w = account(vps, "cgroup", state.as_ref(), r, policy);
            assert_eq!(w.previous_sampled_at, state.as_ref().map(|s| s.sampled_at));
            cpu += w.increments.iter().map(|i| i.cpu_ms).sum::<i64>();
            mem += w
                .increments
                .iter()
                .map(|i| i.memory_mb_seconds)
                .sum::<i64>();
            state = Some(w.state);
        }
        (cpu, mem, state.unwrap())
    }

    #[test]
    fn the_first_reading_is_a_baseline() {
        let w = account(
            Uuid::nil(),
            "cgroup",
            None,
            &reading("2026-05-01T00:00:00Z", 9_000_000, 4 * MB),
            &policy(),
        );
        assert!(w.increments.is_empty());
        assert_eq!(w.state.cpu_total_us, Some(9_000_000));
        assert_eq!(w.state.memory_bytes, Some(4 * MB as i64));
    }

    #[test]
    fn cpu_is_the_counter_difference_with_residues_carried() {
        let readings: Vec<Reading> = (0..=1000)
            .map(|i| {
                let t = at("2026-05-01T00:00:00Z") + chrono::Duration::seconds(i);
                Reading {
                    at: t,
                    cpu: Some(Cpu::CumulativeUs(i as u64 * 1_500)),
                    memory_bytes: None,
                    storage_bytes: None,
                }
            })
            .collect();
        // 1.5 ms per step: rounding each step down would give 1000; carrying gives 1500.
        let (cpu, _, state) = run(&readings, &policy());
        assert_eq!(cpu, 1500);
        assert_eq!(state.cpu_residue_us, 0);
    }

    #[test]
    fn a_counter_reset_counts_the_new_value() {
        let (cpu, _, _) = run(
            &[
                reading("2026-05-01T00:00:00Z", 50_000_000, 0),
                reading("2026-05-01T00:00:15Z", 60_000_000, 0), // +10 s
                reading("2026-05-01T00:00:30Z", 2_000_000, 0),  // reboot: 2 s since
            ],
            &policy(),
        );
        assert_eq!(cpu, 12_000);
    }

    #[test]
    fn memory_integrates_by_trapezoid_and_caps_gaps() {
        let (_, mem, _) = run(
            &[
                reading("2026-05-01T00:00:00Z", 0, 100 * MB),
                reading("2026-05-01T00:00:10Z", 0, 300 * MB), // (100+300)/2 * 10 = 2000
                reading("2026-05-01T00:00:20Z", 0, 300 * MB), // 300 * 10 = 3000
            ],
            &policy(),
        );
        assert_eq!(mem, 5000);
        // A 1-hour gap counts only max_gap (5 min) of memory; CPU counters stay exact.
        let (cpu, mem, _) = run(
            &[
                reading("2026-05-01T00:00:00Z", 0, 10 * MB),
                reading("2026-05-01T01:00:00Z", 3_600_000_000, 10 * MB),
            ],
            &policy(),
        );
        assert_eq!(mem, 10 * 300);
        assert_eq!(cpu, 3_600_000);
    }

    #[test]
    fn percent_sources_integrate_over_the_allocation() {
        let p = |t: &str, pct: f64| Reading {
            at: at(t),
            cpu: Some(Cpu::Percent(pct)),
            memory_bytes: None,
            storage_bytes: None,
        };
        // 50% of 2 cores for 10 s = 10 CPU-seconds.
        let (cpu, _, _) = run(
            &[
                p("2026-05-01T00:00:00Z", 0.0),
                p("2026-05-01T00:00:10Z", 50.0),
            ],
            &policy(),
        );
        assert_eq!(cpu, 10_000);
        // Tampered values are clamped.
        let (cpu, _, _) = run(
            &[
                p("2026-05-01T00:00:00Z", 0.0),
                p("2026-05-01T00:00:10Z", 5000.0),
            ],
            &policy(),
        );
        assert_eq!(cpu, 20_000);
    }

    #[test]
    fn unmetered_axes_are_not_recorded() {
        let only_cpu = Policy {
            memory: false,
            ..policy()
        };
        let (cpu, mem, state) = run(
            &[
                reading("2026-05-01T00:00:00Z", 0, 5 * MB),
                reading("2026-05-01T00:00:10Z", 2000, 5 * MB),
            ],
            &only_cpu,
        );
        assert_eq!((cpu, mem, state.memory_bytes), (2, 0, None));
    }

    #[test]
    fn a_change_of_source_starts_a_new_baseline() {
        let first = account(
            Uuid::nil(),
            "agent",
            None,
            &reading("2026-05-01T00:00:00Z", 1_000_000, MB),
            &policy(),
        );
        let second = account(
            Uuid::nil(),
            "cgroup",
            Some(&first.state),
            &reading("2026-05-01T00:00:10Z", 9_000_000, MB),
            &policy(),
        );
        assert!(second.increments.is_empty());
        assert_eq!(second.previous_sampled_at, None);
    }

    #[test]
    fn usage_across_a_month_boundary_splits_by_time() {
        let w = account(
            Uuid::nil(),
            "cgroup",
            Some(&SampleState {
                vps_id: Uuid::nil(),
                source: "cgroup".into(),
                sampled_at: at("2026-05-31T23:59:50Z"),
                cpu_total_us: Some(0),
                cpu_residue_us: 0,
                memory_bytes: Some(MB as i64),
                memory_residue: 0,
            }),
            &reading("2026-06-01T00:00:10Z", 20_000_000, MB),
            &policy(),
        );
        let months: Vec<(String, i64, i64)> = w
            .increments
            .iter()
            .map(|i| (i.period.to_string(), i.cpu_ms, i.memory_mb_seconds))
            .collect();
        assert_eq!(
            months,
            [
                ("2026-05".into(), 10_000, 10),
                ("2026-06".into(), 10_000, 10)
            ]
        );
    }
}
