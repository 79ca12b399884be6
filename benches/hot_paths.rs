//! Criterion benches for the per-chunk and per-request hot paths:
//! - counting a chunk on a connection bound to its VPS (alone and with another
//!   thread counting to the same VPS at the same time);
//! - a chunk through `MeteredIo` (the whole wrapper, into a sink);
//! - building a flush batch of 100,000 dirty VPSes;
//! - the framing guard following a request head;
//! - per request: the agent directory lookup (a warm entry) and the user's
//!   decision check, alone (as before every streamed frame) and with taking the
//!   stream guard (as at the start of every request). These run against a real
//!   PostgreSQL database (found or started as `tollgate dev` does, created
//!   fresh and dropped after), which fills the directory once;
//! - an agent's egress policy of 1,000 rules (exact hosts, wildcards, CIDRs of
//!   many prefix lengths, port lists) judging one request: the snapshot in
//!   force, the name before resolving, and the name at two addresses.
//!
//! Run: `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

use tollgate_core::clock::SystemClock;
use tollgate_core::config::{Config, LeaseConfig};
use tollgate_core::db::policies::{PolicyRow, RuleRow, Stored};
use tollgate_proxy::agent_policy::{compile, Policies, Snapshot};
use tollgate_proxy::directory::{Directory, Lookup};
use tollgate_proxy::enforcement::Enforcer;
use tollgate_proxy::flusher::build_batch;
use tollgate_proxy::framing::{FramingGuard, Verdicts};
use tollgate_proxy::gate::StreamGuard;
use tollgate_proxy::health::Health;
use tollgate_proxy::leases::Leases;
use tollgate_proxy::meter::{ConnTally, Meter, MeteredIo};
use tollgate_proxy::telemetry::Listener;

/// The load harness's database: created fresh, migrated, seeded with SQL.
#[path = "load/database.rs"]
#[allow(dead_code)]
mod database;

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

fn framing(c: &mut Criterion) {
    let head: &[u8] = b"GET http://origin.example:8080/v1/items?page=2 HTTP/1.1\r\n\
        host: origin.example:8080\r\nuser-agent: agent/1.0\r\naccept: */*\r\n\
        proxy-authorization: Basic MDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwOnRva2Vu\r\n\r\n";
    let verdicts = Arc::new(Verdicts::default());
    let mut buf = [0u8; 4096];
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("guard_one_request_head", |b| {
        b.iter(|| {
            let mut guard = FramingGuard::new(black_box(head), 64 * 1024, verdicts.clone());
            let mut read = ReadBuf::new(&mut buf);
            let _ = Pin::new(&mut guard).poll_read(&mut cx, &mut read);
            verdicts.next()
        })
    });
    group.finish();
}

/// A gateway's response head, as the pooled upstream link reads it.
fn response_head(c: &mut Criterion) {
    let head = bytes::Bytes::from_static(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\
        date: Thu, 03 Dec 2026 23:00:00 GMT\r\nserver: gateway\r\ncache-control: no-store\r\n\r\n",
    );
    let mut group = c.benchmark_group("h1");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_response_head", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(&black_box(&head)[..]);
            tollgate_proxy::h1::parse_head(&mut buf)
                .ok()
                .flatten()
                .expect("a whole head")
        })
    });
    group.finish();
}

/// Directory lookup and decision check on a warm entry, filled once from
/// PostgreSQL.
fn lookups(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let target = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside target/")
        .to_path_buf();
    let seeded = runtime.block_on(async {
        let db = database::BenchDb::create(&target).await?;
        let agent = db.agent("lookups", 1 << 40).await?;
        anyhow::Ok((db, agent))
    });
    let (db, agent) = match seeded {
        Ok(seeded) => seeded,
        Err(e) => {
            eprintln!("lookups: skipped, no PostgreSQL to fill the directory from: {e:#}");
            return;
        }
    };
    let config = Config::default();
    let health = Arc::new(Health::new());
    // Leases off: the lookup is measured, not the grants no worker answers here.
    let (leases, _asks) = Leases::new(
        db.pool.clone(),
        health.clone(),
        LeaseConfig {
            enabled: false,
            ..LeaseConfig::default()
        },
        Uuid::new_v4(),
        Arc::new(SystemClock),
    );
    let (enforcer, _events) = Enforcer::new(
        db.pool.clone(),
        health.clone(),
        "bench".into(),
        config.proxy.meter.decision_refresh,
        Arc::new(SystemClock),
        leases,
    );
    let directory = Directory::new(
        db.pool.clone(),
        Arc::new(Meter::new()),
        Arc::new(enforcer),
        health,
        config.proxy.directory.clone(),
    );
    let Lookup::Found(entry) =
        runtime.block_on(directory.lookup(agent.agent_id, tokio::time::Instant::now()))
    else {
        panic!("the seeded agent is not found");
    };
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Elements(1));
    // A warm lookup completes on its first poll.
    group.bench_function("directory_lookup_warm", |b| {
        b.iter(|| {
            match directory
                .lookup(black_box(agent.agent_id), tokio::time::Instant::now())
                .now_or_never()
            {
                Some(Lookup::Found(agent)) => agent,
                other => panic!("{other:?}"),
            }
        })
    });
    group.bench_function("decision_check", |b| b.iter(|| entry.gate.check()));
    group.bench_function("decision_guard_and_check", |b| {
        b.iter(|| {
            let guard = StreamGuard::new(&entry.gate, Some(entry.revoked().clone()));
            guard.check().map(|()| guard)
        })
    });
    group.finish();
    drop(entry);
    if let Err(e) = runtime.block_on(db.drop_database()) {
        eprintln!("lookups: could not drop the bench database: {e:#}");
    }
}

/// `n` rules of every kind, drawn from a fixed seed: 40 % exact hosts, 30 %
/// `*.suffix` wildcards, 25 % CIDRs (IPv4 /8 to /32 and some IPv6), 5 %
/// port-only; a quarter deny, a third carry port lists.
fn policy_rules(n: usize) -> Vec<RuleRow> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let r = next();
            let (host, cidr) = match i % 20 {
                0..=7 => (
                    Some(format!("svc{}.tenant{}.example.com", r % 997, i)),
                    None,
                ),
                8..=13 => (Some(format!("*.zone{}.example.net", i)), None),
                14..=18 => {
                    let len = 8 + (r % 25) as u8;
                    let addr = std::net::Ipv4Addr::from((r >> 16) as u32);
                    let net = ipnet::Ipv4Net::new(addr, len).unwrap().trunc();
                    (None, Some(net.to_string()))
                }
                _ => (None, None),
            };
            let cidr = match (i % 40, cidr) {
                (18, _) => Some(format!("2001:db8:{:x}::/48", r % 65536)),
                (_, cidr) => cidr,
            };
            let ports = match (host.is_none() && cidr.is_none()) || r % 3 == 0 {
                true => Some(vec![443, 8443, 1000 + (r % 1000) as i32]),
                false => None,
            };
            RuleRow {
                id: i as i64 + 1,
                policy_id: 1,
                action: if r % 4 == 0 { "deny" } else { "allow" }.into(),
                host,
                cidr,
                ports,
            }
        })
        .collect()
}

fn egress_policy(c: &mut Criterion) {
    let row = PolicyRow {
        id: 1,
        name: "bench".into(),
        mode: "enforce".into(),
        default_action: "deny".into(),
    };
    let rules = policy_rules(1_000);
    let stored = Stored {
        policies: vec![row.clone()],
        rules: rules.clone(),
        agents: vec![(Uuid::new_v4(), 1)],
        open: Vec::new(),
    };
    let policies = Policies::new();
    policies.install(Snapshot::compile(&stored, tokio::time::Instant::now()));
    let policy = compile(&row, &rules.iter().collect::<Vec<_>>());
    let addrs: Vec<std::net::SocketAddr> = vec![
        "93.184.216.34:443".parse().unwrap(),
        "[2606:2800:220:1:248:1893:25c8:1946]:443".parse().unwrap(),
    ];
    let mut group = c.benchmark_group("egress_policy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("1000_rules/name_then_two_addresses", |b| {
        b.iter(|| {
            let snapshot = policies.current();
            let name = black_box("api.zone42.example.net");
            let named = policy.judge_name(name, 443);
            let resolved = policy.judge_addresses(Some(name), black_box(&addrs), 443);
            black_box((snapshot, named, resolved))
        })
    });
    let refused = rules
        .iter()
        .find(|r| {
            r.action == "deny"
                && r.ports.is_none()
                && r.host.as_deref().is_some_and(|h| !h.starts_with('*'))
        })
        .and_then(|r| r.host.clone())
        .expect("a deny rule for an exact host");
    assert!(policy.judge_name(&refused, 443).is_err());
    group.bench_function("1000_rules/refused_name", |b| {
        b.iter(|| black_box(policy.judge_name(black_box(&refused), 443)))
    });
    group.bench_function("1000_rules/bare_address", |b| {
        b.iter(|| black_box(policy.judge_addresses(None, black_box(&addrs[..1]), 443)))
    });
    group.finish();
}

criterion_group!(
    benches,
    count_chunk,
    flush_batch,
    framing,
    response_head,
    lookups,
    egress_policy
);
criterion_main!(benches);
