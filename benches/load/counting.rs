//! The meter's hot path under contention, measured the way
//! `benches/hot_paths.rs` does (`meter/count_chunk/contended_same_vps`): this
//! thread counts chunks on a connection bound to a VPS while another thread
//! counts to the same VPS without pause. Runs before the harness pins itself to
//! one core, so the two threads run on two cores.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use tollgate_proxy::meter::{ConnTally, Meter};

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
