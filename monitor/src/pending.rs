//! Sampled usage the monitor holds until it is due to be written.
//!
//! Every cycle samples every VPS, but writing 100,000 VPSes' samples (sample
//! state, usage period, VPS gauges: three rows each) every cycle would cost
//! more than the cycle. So each VPS's readings are accounted here, in memory,
//! and written when due: at once for a VPS seen for the first time or no longer
//! running, every cycle for users near a limit (the watch list), and otherwise
//! once per `monitor.write_interval`, an equal share of the fleet each cycle
//! (written while the sources are asked, with what was held until then).
//!
//! Nothing is lost or counted twice by holding: the database keeps the last
//! written state, and a write is conditional on it being unchanged. A monitor
//! that restarts (or a standby that takes over) starts from that state: CPU
//! counters give the exact delta over the whole span, and memory is integrated
//! over it as one interval (capped by `max_gap`, which `write_interval` may not
//! exceed). Memory: one entry per running sampled VPS, dropped once the VPS
//! stops running and its last usage is written.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use tollgate_core::billing::Period;
use tollgate_core::db::samples::{Increment, SampleState, SampleWrite};

use crate::accounting::{self, Policy, Reading};

/// One VPS's sampled usage not yet written.
#[derive(Debug)]
struct Held {
    user_id: Uuid,
    /// `sampled_at` of the state the database holds (`None`: none yet).
    stored_at: Option<DateTime<Utc>>,
    /// The state after the latest reading.
    state: SampleState,
    /// Usage accounted since the stored state, per period: (CPU-ms, MB-s).
    usage: BTreeMap<Period, (i64, i64)>,
    storage_bytes: Option<i64>,
    /// The VPS's bandwidth in a period as the last write returned it.
    bandwidth_seen: Option<(Period, i64)>,
}

/// Every running sampled VPS's held usage.
#[derive(Debug, Default)]
pub struct Pending {
    held: HashMap<Uuid, Held>,
}

/// Which held samples [`Pending::due`] picks.
#[derive(Debug, Clone, Copy)]
pub enum Due {
    /// VPSes whose turn it is (`share` of `shares`), of users far from their
    /// limits: written with what was held before this cycle's readings, while
    /// the sources are being asked.
    InTurn { share: u64, shares: u64 },
    /// VPSes never written, no longer running, or of watched users: written
    /// with this cycle's readings.
    Now,
}

/// A write [`Pending::due`] chose, and whose user it changes.
pub struct DueWrite {
    pub write: SampleWrite,
    pub user_id: Uuid,
}

impl Pending {
    /// Whether `vps_id` is held (its state known without reading the database).
    pub fn knows(&self, vps_id: &Uuid) -> bool {
        self.held.contains_key(vps_id)
    }

    /// Start holding `vps_id` from the state the database has for it.
    pub fn load(&mut self, vps_id: Uuid, user_id: Uuid, stored: Option<SampleState>) {
        let state = stored.unwrap_or_else(|| SampleState {
            vps_id,
            source: String::new(),
            sampled_at: DateTime::<Utc>::MIN_UTC,
            cpu_total_us: None,
            cpu_residue_us: 0,
            memory_bytes: None,
            memory_residue: 0,
        });
        let stored_at = (state.sampled_at != DateTime::<Utc>::MIN_UTC).then_some(state.sampled_at);
        self.held.insert(
            vps_id,
            Held {
                user_id,
                stored_at,
                state,
                usage: BTreeMap::new(),
                storage_bytes: None,
                bandwidth_seen: None,
            },
        );
    }

    /// Account a reading of a held VPS.
    pub fn record(&mut self, vps_id: Uuid, source: &str, reading: &Reading, policy: &Policy) {
        let Some(held) = self.held.get_mut(&vps_id) else {
            return;
        };
        // Nothing read yet: this reading is the baseline.
        let previous = (!held.state.source.is_empty()).then_some(&held.state);
        let write = accounting::account(vps_id, source, previous, reading, policy);
        for i in write.increments {
            let e = held.usage.entry(i.period).or_default();
            e.0 += i.cpu_ms;
            e.1 += i.memory_mb_seconds;
        }
        held.state = write.state;
        if write.storage_bytes.is_some() {
            held.storage_bytes = write.storage_bytes;
        }
    }

    /// The writes due this cycle of the kind `which` selects. VPSes with
    /// nothing new since their stored state are skipped.
    pub fn due(
        &self,
        running: &HashSet<Uuid>,
        watched: &HashSet<Uuid>,
        which: Due,
    ) -> Vec<DueWrite> {
        self.held
            .iter()
            .filter(|(_, h)| h.stored_at != Some(h.state.sampled_at) && !h.state.source.is_empty())
            .filter(|(vps_id, h)| {
                let now = h.stored_at.is_none()
                    || !running.contains(vps_id)
                    || watched.contains(&h.user_id);
                match which {
                    Due::Now => now,
                    Due::InTurn { share, shares } => !now && share_of(vps_id, shares) == share,
                }
            })
            .map(|(_, h)| DueWrite {
                user_id: h.user_id,
                write: SampleWrite {
                    state: h.state.clone(),
                    previous_sampled_at: h.stored_at,
                    increments: h
                        .usage
                        .iter()
                        .filter(|(_, (cpu, mem))| *cpu != 0 || *mem != 0)
                        .map(|(period, (cpu_ms, memory_mb_seconds))| Increment {
                            period: *period,
                            cpu_ms: *cpu_ms,
                            memory_mb_seconds: *memory_mb_seconds,
                        })
                        .collect(),
                    storage_bytes: h.storage_bytes,
                },
            })
            .collect()
    }

    /// `due` was attempted and the database took `written` (VPS ids): those now
    /// hold nothing; the others' stored state changed under us (another
    /// monitor wrote), so they are dropped and read again next cycle. VPSes
    /// no longer `running` and written are dropped too.
    pub fn settle(&mut self, due: &[DueWrite], written: &HashSet<Uuid>, running: &HashSet<Uuid>) {
        for d in due {
            let vps_id = d.write.state.vps_id;
            if !written.contains(&vps_id) || !running.contains(&vps_id) {
                self.held.remove(&vps_id);
                continue;
            }
            if let Some(h) = self.held.get_mut(&vps_id) {
                h.stored_at = Some(d.write.state.sampled_at);
                h.usage.clear();
            }
        }
        // Stopped VPSes with nothing to write are simply forgotten.
        self.held.retain(|vps_id, h| {
            running.contains(vps_id) || h.stored_at != Some(h.state.sampled_at)
        });
    }

    /// A write returned `bandwidth` for `vps_id` in `period`: whether it is
    /// what the previous write returned (no proxy flushed for this VPS in
    /// between). Unknown counts as changed.
    pub fn bandwidth_unchanged(&mut self, vps_id: Uuid, period: Period, bandwidth: i64) -> bool {
        let Some(h) = self.held.get_mut(&vps_id) else {
            return false;
        };
        let unchanged = h.bandwidth_seen == Some((period, bandwidth));
        h.bandwidth_seen = Some((period, bandwidth));
        unchanged
    }

    /// Users with a held VPS.
    pub fn users(&self) -> HashSet<Uuid> {
        self.held.values().map(|h| h.user_id).collect()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Which of `shares` equal shares of the id space `id` falls in: a VPS's turn
/// to be written, a user's turn to be swept. Ids are random, so the shares are
/// even.
pub fn share_of(id: &Uuid, shares: u64) -> u64 {
    (id.as_u128() % u128::from(shares.max(1))) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::Cpu;
    use std::time::Duration;

    const MB: u64 = 1 << 20;

    fn policy() -> Policy {
        Policy {
            cpu: true,
            memory: true,
            max_gap: Duration::from_secs(300),
            cpu_millicores: 1000,
        }
    }

    fn reading(secs: i64, cpu_us: u64) -> Reading {
        Reading {
            at: DateTime::from_timestamp(1_780_000_000 + secs, 0).unwrap(),
            cpu: Some(Cpu::CumulativeUs(cpu_us)),
            memory_bytes: Some(60 * MB),
            storage_bytes: None,
        }
    }

    #[test]
    fn held_usage_sums_to_what_each_sample_would_have_written() {
        let (vps, user) = (Uuid::new_v4(), Uuid::new_v4());
        let mut p = Pending::default();
        p.load(vps, user, None);
        let running: HashSet<Uuid> = [vps].into();
        let none = HashSet::new();
        p.record(vps, "cgroup", &reading(0, 1_000_000), &policy());
        // A new VPS is due at once, whatever its share: its baseline is written.
        let turn = |share| Due::InTurn { share, shares: 4 };
        assert!(p.due(&running, &none, turn(share_of(&vps, 4))).is_empty());
        let due = p.due(&running, &none, Due::Now);
        assert_eq!(due.len(), 1);
        assert!(due[0].write.increments.is_empty());
        p.settle(&due, &[vps].into(), &running);
        // Three readings held, 10 s apart: 1.5 s of CPU, 60 MB for 30 s.
        for (i, cpu) in [(1, 1_500_000), (2, 2_000_000), (3, 2_500_000)] {
            p.record(vps, "cgroup", &reading(10 * i, cpu), &policy());
            let other = (share_of(&vps, 4) + 1) % 4;
            assert!(
                p.due(&running, &none, turn(other)).is_empty(),
                "not its turn"
            );
            assert!(p.due(&running, &none, Due::Now).is_empty(), "not watched");
        }
        let due = p.due(&running, &none, turn(share_of(&vps, 4)));
        assert_eq!(due.len(), 1);
        let inc: (i64, i64) = due[0]
            .write
            .increments
            .iter()
            .fold((0, 0), |a, i| (a.0 + i.cpu_ms, a.1 + i.memory_mb_seconds));
        assert_eq!(inc, (1500, 60 * 30));
        assert_eq!(
            due[0].write.previous_sampled_at,
            Some(reading(0, 0).at),
            "conditional on the stored state"
        );
        // Watched users are due every cycle.
        p.settle(&due, &[vps].into(), &running);
        p.record(vps, "cgroup", &reading(40, 3_000_000), &policy());
        assert_eq!(p.due(&running, &[user].into(), Due::Now).len(), 1);
        let mine = share_of(&vps, 4);
        assert!(p.due(&running, &[user].into(), turn(mine)).is_empty());
        // A write the database refused (another writer) drops the VPS: it is read again.
        let due = p.due(&running, &[user].into(), Due::Now);
        p.settle(&due, &HashSet::new(), &running);
        assert!(!p.knows(&vps));
    }

    #[test]
    fn a_stopped_vps_is_written_then_forgotten() {
        let (vps, user) = (Uuid::new_v4(), Uuid::new_v4());
        let mut p = Pending::default();
        p.load(vps, user, None);
        let running: HashSet<Uuid> = [vps].into();
        p.record(vps, "cgroup", &reading(0, 0), &policy());
        let due = p.due(&running, &HashSet::new(), Due::Now);
        p.settle(&due, &[vps].into(), &running);
        p.record(vps, "cgroup", &reading(10, 1_000_000), &policy());
        let stopped = HashSet::new();
        let due = p.due(&stopped, &HashSet::new(), Due::Now);
        assert_eq!(due.len(), 1, "its last usage is written at once");
        p.settle(&due, &[vps].into(), &stopped);
        assert!(p.is_empty());
    }
}
