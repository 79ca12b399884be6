//! Wall-clock time, behind a seam: billing periods come from it, so month
//! boundaries can be tested without waiting for one.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::billing::Period;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// The billing period now.
    fn period(&self) -> Period {
        Period::containing(self.now())
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that starts at a given instant and moves with real time, and can be
/// moved by hand: for tests and simulations of month boundaries.
#[derive(Debug)]
pub struct ShiftedClock {
    offset: Mutex<chrono::Duration>,
}

impl ShiftedClock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Self {
            offset: Mutex::new(start - Utc::now()),
        }
    }

    /// Jump to `instant` (and keep running from there).
    pub fn set(&self, instant: DateTime<Utc>) {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner()) = instant - Utc::now();
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shifted_clock_reads_its_start_and_moves_on() {
        let start = DateTime::parse_from_rfc3339("2026-11-30T23:59:59Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = ShiftedClock::starting_at(start);
        let read = clock.now();
        assert!(read >= start && read - start < chrono::Duration::seconds(1));
        assert_eq!(clock.period().to_string(), "2026-11");
        clock.set(start + chrono::Duration::seconds(2));
        assert_eq!(clock.period().to_string(), "2026-12");
    }
}
