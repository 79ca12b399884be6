//! Criterion benches for the per-chunk and per-request hot paths:
//! - counting a chunk on a connection bound to its VPS (alone and with another
//!   thread counting to the same VPS at the same time);
//! - a chunk through `MeteredIo` (the whole wrapper, into a sink);
//! - building a flush batch of 100,000 dirty VPSes;
//! - the framing guard following a keep-alive request stream.
//!
//! Run: `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::AsyncWrite;
use uuid::Uuid;

use tollgate_proxy::flusher::build_batch;
use tollgate_proxy::meter::{ConnTally, Meter, MeteredIo};
use tollgate_proxy::telemetry::Listener;

fn count_chunk(c: &mut Criterion) {
    let meter = Meter::new();
    let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
    let tally = ConnTally::bound_to(counter.clone());
    let mut group = c.benchmark_group("meter");
    group.throughput(Throughput::Elements(1));
    group.bench_function("count_chunk/uncontended", |b| {
        b.iter(|| tally.record_rx(black_box(16_384)))
    });

    // Another long-lived thread (like a second tokio worker) counts to the same VPS
    // at the same time: two connections of one VPS on two cores.
    let busy = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let other = {
        let (busy, done, counter) = (busy.clone(), done.clone(), counter.clone());
        std::thread::spawn(move || {
            let tally = ConnTally::bound_to(counter);
            while !done.load(Ordering::Relaxed) {
                if busy.load(Ordering::Relaxed) {
                    tally.record_tx(black_box(1500));
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    group.bench_function("count_chunk/contended_same_vps", |b| {
        b.iter_custom(|iters| {
            busy.store(true, Ordering::SeqCst);
            let t = Instant::now();
            for _ in 0..iters {
                tally.record_rx(black_box(16_384));
            }
            let elapsed = t.elapsed();
            busy.store(false, Ordering::SeqCst);
            elapsed
        })
    });
    done.store(true, Ordering::SeqCst);
    other.join().unwrap();

    // The full wrapper: a 16 KiB write through MeteredIo into a sink.
    let io_tally = Arc::new(ConnTally::bound_to(counter.clone()));
    let mut io = MeteredIo::new(tokio::io::sink(), io_tally, Listener::Egress);
    let chunk = vec![0u8; 16 * 1024];
    let mut cx = Context::from_waker(Waker::noop());
    group.bench_function("metered_io_write_16k", |b| {
        b.iter(
            || match Pin::new(&mut io).poll_write(&mut cx, black_box(&chunk)) {
                Poll::Ready(Ok(n)) => n,
                other => panic!("{other:?}"),
            },
        )
    });
    group.finish();
}

fn flush_batch(c: &mut Criterion) {
    let meter = Meter::new();
    let user = Uuid::new_v4();
    let counters: Vec<_> = (0..100_000)
        .map(|_| meter.counter(Uuid::new_v4(), user))
        .collect();
    let mut group = c.benchmark_group("flush");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("drain_and_build_100k_dirty_vpses", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for c in &counters {
                    c.add_rx(1234);
                    c.add_tx(56);
                }
                let t = Instant::now();
                let drained = meter.drain();
                let now = chrono::Utc::now();
                let batch = build_batch(
                    Uuid::nil(),
                    1,
                    &drained,
                    now - chrono::Duration::seconds(1),
                    now,
                );
                black_box(batch);
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, count_chunk, flush_batch);
criterion_main!(benches);
