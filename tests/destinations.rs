//! Bytes per VPS per destination host per month (`vps_destination_usage`):
//! every egress byte is attributed to the host its request named, the rows of a
//! VPS add up to exactly the bytes counted for it, each VPS keeps its top N
//! hosts plus `other`, and a batch is written once however often it is applied.
//! Real PostgreSQL, real sockets, loopback origins behind names resolved from a
//! fixed table (and a dialer that can only reach loopback).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use support::client::{basic, tunnel, Exchange};
use support::hostile::{loopback_seams, LoopbackOnlyDialer};
use support::origin::{EchoServer, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};
use tollgate_core::billing::Period;
use tollgate_core::db::usage::{
    self, BandwidthDelta, DestinationDelta, DestinationDeltas, FlushBatch, FlushOutcome,
    PeriodDeltas, PeriodDestinations,
};

/// Bytes per host as seen from the VPS: (rx = what the client read, tx = what it wrote).
type PerHost = BTreeMap<String, (u64, u64)>;

fn add(per_host: &mut PerHost, host: &str, rx: u64, tx: u64) {
    let e = per_host.entry(host.to_owned()).or_default();
    e.0 += rx;
    e.1 += tx;
}

fn sum(per_host: &PerHost) -> (u64, u64) {
    per_host
        .values()
        .fold((0, 0), |(rx, tx), (r, t)| (rx + r, tx + t))
}

/// The rows of `vps` in the current month.
async fn destination_rows(db: &TestDb, vps: Uuid) -> PerHost {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT host, rx_bytes, tx_bytes FROM vps_destination_usage
         WHERE vps_id = $1 AND period_start = $2",
    )
    .bind(vps)
    .bind(Period::current().start())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(host, rx, tx)| (host, (rx as u64, tx as u64)))
        .collect()
}

/// Wait until the rows of `vps` are exactly `want`.
async fn expect_rows(db: &TestDb, vps: Uuid, want: &PerHost) {
    eventually(
        PROMPTLY,
        format!("destination rows of VPS {vps}"),
        || async {
            let rows = destination_rows(db, vps).await;
            holds(rows == *want, rows)
        },
    )
    .await;
}

/// A client connection that counts every byte it writes and reads.
struct Client {
    s: TcpStream,
    written: u64,
    read: u64,
}

impl Client {
    async fn connect(proxy: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(proxy).await.unwrap(),
            written: 0,
            read: 0,
        }
    }

    /// Send `request` and read its whole response; returns its status and what
    /// the exchange moved as (read, written).
    async fn request(&mut self, request: &[u8]) -> (u16, (u64, u64)) {
        let before = (self.read, self.written);
        self.s.write_all(request).await.unwrap();
        self.written += request.len() as u64;
        let status = self.response().await;
        (status, (self.read - before.0, self.written - before.1))
    }

    async fn byte(&mut self) -> u8 {
        let b = self.s.read_u8().await.expect("the response goes on");
        self.read += 1;
        b
    }

    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            line.push(self.byte().await);
        }
        String::from_utf8(line).unwrap()
    }

    /// One response off the connection: its head, then its body as framed by
    /// `content-length` or chunked encoding.
    async fn response(&mut self) -> u16 {
        let status_line = self.line().await;
        let status = status_line[9..12].parse().unwrap();
        let (mut length, mut chunked) = (0usize, false);
        loop {
            let line = self.line().await.to_ascii_lowercase();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line.starts_with("transfer-encoding:") && line.contains("chunked") {
                chunked = true;
            }
        }
        if !chunked {
            for _ in 0..length {
                self.byte().await;
            }
            return status;
        }
        loop {
            let size = usize::from_str_radix(self.line().await.trim(), 16).unwrap();
            for _ in 0..size + 2 {
                self.byte().await;
            }
            if size == 0 {
                return status;
            }
        }
    }
}

fn get(url: &str, auth: &str, extra: &str) -> Vec<u8> {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    format!("GET {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\n{extra}\r\n")
        .into_bytes()
}

fn post(url: &str, auth: &str, body: &[u8]) -> Vec<u8> {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    let mut r = format!(
        "POST {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// An agent, an HTTP origin and an echo server on loopback, reachable under
/// the names of `hosts`; `private.test` resolves to a private address the
/// egress policy refuses.
struct Setup {
    db: TestDb,
    f: Fixture,
    origin: Origin,
    echo: EchoServer,
    proxy: TestProxy,
}

async fn setup(hosts: &[&'static str], top_n: u32) -> Setup {
    let db = TestDb::new().await;
    let f = db.fixture("hetzner").await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let mut table: HashMap<&'static str, Vec<IpAddr>> =
        hosts.iter().map(|h| (*h, vec![loopback])).collect();
    table.insert("private.test", vec!["10.1.2.3".parse().unwrap()]);
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    config.proxy.meter.destination_top_n = top_n;
    let seams = loopback_seams(table, Arc::new(LoopbackOnlyDialer::default()));
    let proxy = TestProxy::start_with(config, seams).await;
    Setup {
        db,
        f,
        origin,
        echo,
        proxy,
    }
}

#[tokio::test]
async fn every_egress_byte_goes_to_the_host_its_request_named_and_the_hosts_add_up() {
    let Setup {
        db,
        f,
        origin,
        echo,
        proxy,
    } = setup(
        &["alpha.test", "beta.test", "gamma.test", "tunnel.test"],
        50,
    )
    .await;
    let auth = f.basic();
    let port = origin.addr.port();
    let url = |host: &str, path: &str| format!("http://{host}:{port}{path}");
    let mut want = PerHost::new();

    // One kept-alive connection, request after request to different hosts.
    let mut c = Client::connect(proxy.egress).await;
    let (status, (rx, tx)) = c
        .request(&get(&url("alpha.test", "/bytes/5000"), &auth, ""))
        .await;
    assert_eq!(status, 200);
    add(&mut want, "alpha.test", rx, tx);
    let (status, (rx, tx)) = c
        .request(&post(&url("beta.test", "/echo/up"), &auth, &[b'u'; 30_000]))
        .await;
    assert_eq!(status, 200);
    add(&mut want, "beta.test", rx, tx);
    let (status, (rx, tx)) = c
        .request(&get(&url("gamma.test", "/chunked/70000"), &auth, ""))
        .await;
    assert_eq!(status, 200);
    add(&mut want, "gamma.test", rx, tx);
    // Names are counted lowercase, and any spelling of an address canonical.
    let (status, (rx, tx)) = c
        .request(&get(&url("ALPHA.Test", "/bytes/100"), &auth, ""))
        .await;
    assert_eq!(status, 200);
    add(&mut want, "alpha.test", rx, tx);
    let (status, (rx, tx)) = c
        .request(&get(&url("0x7f.1", "/bytes/10"), &auth, ""))
        .await;
    assert_eq!(status, 200);
    add(&mut want, "127.0.0.1", rx, tx);
    // A refused destination: its bytes go to the host it named.
    let (status, (rx, tx)) = c.request(&get(&url("private.test", "/x"), &auth, "")).await;
    assert_eq!(status, 403);
    add(&mut want, "private.test", rx, tx);
    // A request naming no host at all: `other`. Its connection then closes.
    let before = (c.read, c.written);
    let relative = format!(
        "GET /relative HTTP/1.1\r\nhost: alpha.test\r\nproxy-authorization: {auth}\r\nconnection: close\r\n\r\n"
    );
    let (status, _) = c.request(relative.as_bytes()).await;
    assert_eq!(status, 400);
    let mut rest = Vec::new();
    c.read += c.s.read_to_end(&mut rest).await.unwrap() as u64;
    assert!(rest.is_empty(), "nothing after the 400");
    add(&mut want, "other", c.read - before.0, c.written - before.1);
    drop(c);

    // A CONNECT tunnel, and a CONNECT refused for its port.
    let payload = vec![b't'; 200_000];
    let ex: Exchange = tunnel(
        proxy.egress,
        &auth,
        &format!("tunnel.test:{}", echo.addr.port()),
        &payload,
    )
    .await;
    assert_eq!((ex.status, ex.body.len()), (200, payload.len()));
    add(&mut want, "tunnel.test", ex.read, ex.written);
    let refused = tunnel(proxy.egress, &auth, "refused.test:9", b"").await;
    assert_eq!(refused.status, 403, "{}", refused.head);
    add(&mut want, "refused.test", refused.read, refused.written);

    // Wrong credentials: counted to no VPS, so attributed to none.
    let stranger = basic(Uuid::new_v4(), &"0".repeat(64));
    let mut s = Client::connect(proxy.egress).await;
    let (status, _) = s
        .request(&get(&url("alpha.test", "/bytes/1"), &stranger, ""))
        .await;
    assert_eq!(status, 407);
    drop(s);

    let (rx, tx) = sum(&want);
    db.expect_usage(f.vps, rx, tx, PROMPTLY).await;
    expect_rows(&db, f.vps, &want).await;
    proxy.stop().await;
    // After the final flush: nothing more, nothing twice, and the rows of the
    // VPS add up to exactly its egress bytes (it has no ingress traffic).
    assert_eq!(destination_rows(&db, f.vps).await, want);
    db.assert_usage(f.vps, rx, tx).await;
    let view: Vec<(String, i64)> = sqlx::query_as(
        "SELECT host, total_bytes FROM tollgate_destination_usage
         WHERE agent_id = $1 AND period_start = tollgate_current_period() ORDER BY host",
    )
    .bind(f.agent)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let from_view: Vec<(String, i64)> = want
        .iter()
        .map(|(h, (rx, tx))| (h.clone(), (rx + tx) as i64))
        .collect();
    assert_eq!(view, from_view);
}

#[tokio::test]
async fn a_vps_keeps_its_top_n_hosts_and_the_rest_go_to_other() {
    let hosts = [
        "big.test",
        "mid.test",
        "small1.test",
        "small2.test",
        "small3.test",
    ];
    let Setup {
        db,
        f,
        origin,
        proxy,
        ..
    } = setup(&hosts, 2).await;
    let auth = f.basic();
    let port = origin.addr.port();
    let mut moved = (0, 0);
    let mut c = Client::connect(proxy.egress).await;
    for (host, size) in hosts.iter().zip([400_000, 100_000, 10, 20, 30]) {
        let request = get(&format!("http://{host}:{port}/bytes/{size}"), &auth, "");
        let (status, (rx, tx)) = c.request(&request).await;
        assert_eq!(status, 200);
        moved = (moved.0 + rx, moved.1 + tx);
        // Each host in its own flush, so the database folds as well as the meter.
        db.expect_usage(f.vps, moved.0, moved.1, PROMPTLY).await;
    }
    drop(c);
    proxy.stop().await;
    let rows = destination_rows(&db, f.vps).await;
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        ["big.test", "mid.test", "other"],
        "{rows:?}"
    );
    assert_eq!(sum(&rows), moved, "folding keeps the sum");
    db.assert_usage(f.vps, moved.0, moved.1).await;
}

/// A batch of `(vps, host, rx, tx)` rows in `period`, with the VPS counts they add up to.
fn batch(
    instance: Uuid,
    seq: i64,
    period: Period,
    top_n: u32,
    rows: &[(Uuid, &str, u64, u64)],
) -> FlushBatch {
    let mut per_vps: BTreeMap<Uuid, (u64, u64)> = BTreeMap::new();
    for (vps, _, rx, tx) in rows {
        let e = per_vps.entry(*vps).or_default();
        *e = (e.0 + rx, e.1 + tx);
    }
    FlushBatch {
        instance_id: instance,
        seq,
        periods: vec![PeriodDeltas {
            period,
            deltas: per_vps
                .into_iter()
                .map(|(vps_id, (rx, tx))| BandwidthDelta { vps_id, rx, tx })
                .collect(),
        }],
        leases: None,
        destinations: DestinationDeltas {
            top_n,
            periods: vec![PeriodDestinations {
                period,
                rows: rows
                    .iter()
                    .map(|(vps_id, host, rx, tx)| DestinationDelta {
                        vps_id: *vps_id,
                        host: host.to_string(),
                        rx: *rx,
                        tx: *tx,
                    })
                    .collect(),
            }],
        },
    }
}

#[tokio::test]
async fn a_batch_applied_twice_is_counted_once_and_folding_keeps_the_sum() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let period = Period::current();
    let instance = Uuid::new_v4();

    let first = batch(
        instance,
        0,
        period,
        3,
        &[
            (f.vps, "a.test", 100, 1),
            (f.vps, "b.test", 50, 2),
            (f.vps, "c.test", 10, 3),
            (f.vps, "d.test", 5, 4),
            (f.vps, "e.test", 1, 0),
        ],
    );
    let outcome = usage::apply_flush(&db.pool, &first).await.unwrap();
    assert!(
        matches!(outcome, FlushOutcome::Applied { rows: 1, .. }),
        "{outcome:?}"
    );
    let want: PerHost = [
        ("a.test", (100, 1)),
        ("b.test", (50, 2)),
        ("c.test", (10, 3)),
        ("other", (6, 4)),
    ]
    .into_iter()
    .map(|(h, b)| (h.to_owned(), b))
    .collect();
    assert_eq!(destination_rows(&db, f.vps).await, want);

    // Replayed (a retry after a lost acknowledgement, a spill file read twice):
    // the ledger skips it, rows and counts alike.
    let again = usage::apply_flush(&db.pool, &first).await.unwrap();
    assert_eq!(again, FlushOutcome::AlreadyApplied);
    assert_eq!(destination_rows(&db, f.vps).await, want);
    db.assert_usage(f.vps, 166, 10).await;

    // A host new this month overtakes one in the top 3: the smallest folds.
    let second = batch(
        instance,
        1,
        period,
        3,
        &[
            (f.vps, "z.test", 40, 0),
            (f.vps, "other", 1, 1),
            (f.vps, "a.test", 1, 0),
        ],
    );
    usage::apply_flush(&db.pool, &second).await.unwrap();
    let rows = destination_rows(&db, f.vps).await;
    let want: PerHost = [
        ("a.test", (101, 1)),
        ("b.test", (50, 2)),
        ("z.test", (40, 0)),
        ("other", (17, 8)),
    ]
    .into_iter()
    .map(|(h, b)| (h.to_owned(), b))
    .collect();
    assert_eq!(rows, want);
    db.assert_usage(f.vps, 208, 11).await;
    assert_eq!(sum(&rows), (208, 11), "the rows add up to the VPS's bytes");
}

#[tokio::test]
async fn rows_of_a_vps_deleted_meanwhile_are_dropped_and_the_rest_commit() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let period = Period::current();
    let gone = Uuid::new_v4();
    // Counts and hosts of a VPS that no longer exists, next to a live one's.
    let outcome = usage::apply_flush(
        &db.pool,
        &batch(
            Uuid::new_v4(),
            0,
            period,
            50,
            &[(f.vps, "a.test", 7, 8), (gone, "b.test", 1, 1)],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome,
        FlushOutcome::Applied {
            rows: 1,
            dropped: vec![gone]
        }
    );
    // Hosts of a deleted VPS whose counts went in an earlier batch.
    let mut late = batch(Uuid::new_v4(), 0, period, 50, &[(f.vps, "a.test", 1, 0)]);
    late.periods.clear();
    late.destinations.periods[0].rows.push(DestinationDelta {
        vps_id: gone,
        host: "c.test".into(),
        rx: 5,
        tx: 5,
    });
    usage::apply_flush(&db.pool, &late).await.unwrap();
    let rows = destination_rows(&db, f.vps).await;
    assert_eq!(rows, PerHost::from([("a.test".to_owned(), (8, 8))]));
    let orphans: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vps_destination_usage WHERE vps_id = $1")
            .bind(gone)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(orphans, 0);
}

fn tollgate(args: &[&str], database_url: &str) -> std::process::Output {
    Command::new(support::tollgate_bin())
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .expect("run tollgate")
}

#[tokio::test]
async fn cli_lists_destinations_by_bytes_for_a_period_and_an_agent() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let other = db.fixture("fly").await;
    let period = Period::current();
    usage::apply_flush(
        &db.pool,
        &batch(
            Uuid::new_v4(),
            0,
            period,
            50,
            &[
                (f.vps, "small.test", 10, 20),
                (f.vps, "big.test", 3000, 4000),
                (f.vps, "other", 100, 0),
                (other.vps, "elsewhere.test", 1, 1),
            ],
        ),
    )
    .await
    .unwrap();
    let last_month = batch(
        Uuid::new_v4(),
        0,
        period.start().pred_opt().unwrap().to_string()[..7]
            .parse()
            .unwrap(),
        50,
        &[(f.vps, "old.test", 5, 5)],
    );
    usage::apply_flush(&db.pool, &last_month).await.unwrap();

    let agent = f.agent.to_string();
    let month = period.to_string();
    let out = tollgate(
        &[
            "destinations",
            "--agent",
            &agent,
            "--period",
            &month,
            "--json",
        ],
        &db.url,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, i64, i64, i64)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["agent_id"], agent.as_str());
            assert_eq!(r["vps_id"], f.vps.to_string().as_str());
            (
                r["host"].as_str().unwrap().to_owned(),
                r["rx_bytes"].as_i64().unwrap(),
                r["tx_bytes"].as_i64().unwrap(),
                r["total_bytes"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("big.test".to_owned(), 3000, 4000, 7000),
            ("other".to_owned(), 100, 0, 100),
            ("small.test".to_owned(), 10, 20, 30),
        ]
    );

    // The table: every agent, largest first; the current month by default.
    let out = tollgate(&["destinations"], &db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("USER") && lines[0].contains("HOST"),
        "{text}"
    );
    let hosts: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(
        hosts,
        ["big.test", "other", "small.test", "elsewhere.test"],
        "{text}"
    );
    assert!(lines[1].contains("6.8 KiB"), "{text}");

    let out = tollgate(&["destinations", "--agent", "nobody"], &db.url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an agent id"));
}
