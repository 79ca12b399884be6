//! Waiting in integration tests: poll a condition until it holds or a deadline
//! passes. Tests never assert after a sleep; they wait for the thing itself, or
//! for a later event that proves the system has processed past the point.

use std::fmt::{Debug, Display};
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] probes.
const POLL: Duration = Duration::from_millis(20);

/// The deadline for what the SPEC promises within a second or two (a block
/// taking effect, a rotated token refused, a standby taking over). Tests check
/// that it happens, with room for a loaded 2-core machine; the load harness
/// (`benches/load`) measures how long it takes.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Poll `probe` every few milliseconds until it returns `Ok`, and return that
/// value. `Err(observed)` means "not yet". If the condition has not held
/// `deadline` after the call, panic naming `what` and the last observed value.
/// A probe still running at the deadline is abandoned.
pub async fn eventually<T, O, F, Fut>(deadline: Duration, what: impl Display, mut probe: F) -> T
where
    O: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, O>>,
{
    let started = Instant::now();
    let mut last: Option<O> = None;
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(observed)) => last = Some(observed),
            Err(_) => {}
        }
        let elapsed = started.elapsed();
        if elapsed >= deadline {
            match last {
                Some(observed) => {
                    panic!("{what}: not within {deadline:?}; last observed: {observed:?}")
                }
                None => panic!("{what}: not within {deadline:?}; the probe never returned"),
            }
        }
        tokio::time::sleep(POLL.min(deadline - elapsed)).await;
    }
}

/// A probe's answer: `Ok(observed)` if `condition` holds, else `Err(observed)`.
pub fn holds<T>(condition: bool, observed: T) -> Result<T, T> {
    if condition {
        Ok(observed)
    } else {
        Err(observed)
    }
}
