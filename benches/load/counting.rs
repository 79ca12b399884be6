//! The meter, measured before the harness pins itself to one core:
//! - its hot path under contention, the way `benches/hot_paths.rs` does
//!   (`meter/count_chunk/contended_same_vps`): this thread counts chunks on a
//!   connection bound to a VPS while another thread counts to the same VPS
//!   without pause, on two cores;
//! - the memory of N VPS counters (this process's RSS growth), each striped
//!   over as many cache lines as the machine has cores (at most 4), as in a
//!   proxy that uses every core.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use tollgate_proxy::meter::{stripes_per_counter, ConnTally, Meter};

use crate::servers::own_rss_kib;

/// Memory of `counters` VPS counters with `stripes` cache lines each.
#[derive(Debug, Clone, Copy)]
pub struct CountersMemory {
    pub counters: usize,
    pub stripes: usize,
    pub kib: u64,
}

/// Create `n` counters in a fresh meter (as the directory does, one per VPS) and
/// measure the RSS they add. The meter is returned so it is freed only after.
pub fn counters_memory(n: usize) -> (CountersMemory, Meter) {
    let before = own_rss_kib();
    let meter = Meter::new();
    let user = Uuid::new_v4();
    for _ in 0..n {
        meter.counter(Uuid::new_v4(), user);
    }
    let kib = own_rss_kib().saturating_sub(before);
    let memory = CountersMemory {
        counters: n,
        stripes: stripes_per_counter(),
        kib,
    };
    (memory, meter)
}

/// Median nanoseconds per counted chunk over `samples` batches of `iterations`.
pub fn contended_ns(iterations: u64, samples: usize) -> f64 {
    let meter = Meter::new();
    let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
    let tally = ConnTally::bound_to(counter.clone());
    let (started, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let other = {
        let (started, stop) = (started.clone(), stop.clone());
        std::thread::spawn(move || {
            let tally = ConnTally::bound_to(counter);
            started.store(true, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                tally.record_tx(black_box(1500));
            }
        })
    };
    while !started.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let mut per_chunk: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iterations {
                tally.record_rx(black_box(16_384));
            }
            t.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    stop.store(true, Ordering::SeqCst);
    let _ = other.join();
    per_chunk.sort_by(f64::total_cmp);
    per_chunk[per_chunk.len() / 2]
}
