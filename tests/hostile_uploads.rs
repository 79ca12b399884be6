//! Hostile uploads: an agent (or a user of its gateway) that pushes a request
//! body far past its user's bandwidth limit is cut within a frame of the
//! headroom, on egress plain HTTP and on ingress over HTTP/1.1 and HTTP/2; and
//! an upload trickling in while allowed stops flowing to the origin promptly
//! once the user is blocked. Every destination is the loopback demo gateway,
//! reached through a dialer that can only ever dial loopback. Prints the
//! measured overshoot and latency.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use support::hostile_load::{loopback_seams, raw_upload, Framing, Upload};
use support::hostile_load::{metric, metrics};
use support::origin::Origin;
use support::pg_relay::PgRelay;
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds};
use support::{Fixture, TestDb};

/// The plan's bandwidth limit, bytes; no overage on sale.
const LIMIT: u64 = 1_000_000;
/// What each hostile upload tries to send.
const UPLOAD: u64 = 20_000_000;
/// Overshoot past [`LIMIT`] asserted at most: one body frame (64 KiB) and
/// the buffers between the client and the origin, with room for a flush that
/// lands while the body is in flight.
const MAX_OVERSHOOT: u64 = 512 * 1024;

const GENEROUS: Duration = Duration::from_secs(30);

/// One test at a time: they measure bytes and time on a small shared machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    db: TestDb,
    f: Fixture,
    gateway: Origin,
    proxy: TestProxy,
}

/// A user on a plan of `limit` bandwidth bytes with no overage on sale, their
/// running VPS at 127.0.0.1 whose gateway is the demo gateway, and a proxy
/// reaching only loopback.
async fn setup(limit: u64) -> Setup {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    db.update_plan(
        f.plan,
        &format!("max_bandwidth_bytes = {limit}, overage_bandwidth_cost_per_gb_cents = 0"),
    )
    .await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    Setup {
        db,
        f,
        gateway,
        proxy,
    }
}

impl Setup {
    fn ingress_path(&self, path: &str) -> String {
        format!("/agents/{}/gateway{path}", self.f.agent)
    }

    fn ingress_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.proxy.ingress.unwrap(),
            self.ingress_path(path)
        )
    }
}

/// The upload was refused for usage (403 `usage_blocked`) or its connection
/// closed without a response.
fn assert_cut(how: &str, upload: &Upload) {
    let status = upload.status();
    match status {
        0 => {}
        403 => {
            let body = upload.json().expect("a JSON body with the 403");
            assert_eq!(body["error"], "usage_blocked", "{how}: {body}");
        }
        other => panic!(
            "{how}: the cut upload got {other}: {}",
            String::from_utf8_lossy(&upload.response)
        ),
    }
}

/// What the database recorded for the VPS once the proxy stopped, and what the
/// gateway's own socket moved.
struct Measured {
    rx: u64,
    tx: u64,
    total: u64,
    gateway_read: u64,
    gateway_written: u64,
}

/// The upload was refused for its credential (407 on egress, 401 on ingress,
/// `unauthorized`) or its connection closed without a response.
fn assert_revoked(how: &str, upload: &Upload) {
    match upload.status() {
        0 => {}
        401 | 407 => {
            let body = upload.json().expect("a JSON body");
            assert_eq!(body["error"], "unauthorized", "{how}: {body}");
        }
        other => panic!(
            "{how}: the cut upload got {other}: {}",
            String::from_utf8_lossy(&upload.response)
        ),
    }
}

/// Stop the proxy (final flush written) and check what the database and the
/// gateway show against the limit.
async fn stop_and_measure(s: Setup, how: &str, client: &str) -> Measured {
    let Setup {
        db,
        f,
        gateway,
        proxy,
    } = s;
    proxy.stop().await;
    let (rx, tx, total) = db.usage(f.vps).await;
    let (read, written) = gateway.socket_bytes();
    let overshoot = total - LIMIT as i64;
    println!(
        "{how}: {UPLOAD}-byte upload against a {LIMIT}-byte limit: recorded {total} bytes \
         (rx {rx}, tx {tx}), overshoot {overshoot} bytes past the limit (bound {MAX_OVERSHOOT}); \
         the gateway read {read} bytes; {client}"
    );
    assert!(
        total as u64 <= LIMIT + MAX_OVERSHOOT,
        "{how}: recorded {total} bytes, {overshoot} past the {LIMIT}-byte limit"
    );
    assert!(
        read <= LIMIT + MAX_OVERSHOOT,
        "{how}: the gateway read {read} bytes of a {UPLOAD}-byte upload"
    );
    Measured {
        rx: rx as u64,
        tx: tx as u64,
        total: total as u64,
        gateway_read: read,
        gateway_written: written,
    }
}

/// Ingress counts the socket to the VPS: everything the gateway read is
/// counted (and what the proxy wrote into the socket as it was cut, which the
/// gateway may never read); of what the gateway wrote, only what the proxy
/// read before cutting the connection (it answers a cut body into a closing
/// socket).
fn assert_gateway_socket_counted(how: &str, m: &Measured) {
    println!(
        "{how}: rx recorded {} = gateway read {} + {} written into the socket as it was cut",
        m.rx,
        m.gateway_read,
        m.rx as i64 - m.gateway_read as i64
    );
    assert!(
        m.rx >= m.gateway_read,
        "{how}: rx recorded {} < read on the gateway's socket {}",
        m.rx,
        m.gateway_read
    );
    assert!(
        m.tx <= m.gateway_written,
        "{how}: tx recorded {} > written on the gateway's socket {}",
        m.tx,
        m.gateway_written
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_upload_past_the_limit_is_cut_near_the_limit() {
    let _serial = SERIAL.lock().await;
    let s = setup(LIMIT).await;
    let url = s.gateway.url("/echo");
    let head = format!(
        "POST {url} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {}\r\ncontent-length: {UPLOAD}\r\n\r\n",
        s.gateway.addr,
        s.f.basic()
    );
    let upload = raw_upload(
        s.proxy.egress,
        head,
        UPLOAD,
        64 * 1024,
        Framing::Length,
        Duration::from_secs(60),
    )
    .await;
    assert_cut("egress plain HTTP", &upload);
    assert!(
        upload.written < UPLOAD,
        "the client wrote the whole {UPLOAD}-byte upload"
    );
    let client = format!(
        "the client got {} after writing {} bytes in {:?}",
        upload.status(),
        upload.written,
        upload.elapsed
    );
    let m = stop_and_measure(s, "egress plain HTTP", &client).await;
    // Egress counts the client's socket: what the VPS sent is at most what the
    // client wrote, what it received exactly what the client read.
    assert!(
        m.tx <= upload.written,
        "tx {} > written {}",
        m.tx,
        upload.written
    );
    assert_eq!(m.rx, upload.response.len() as u64);
    assert!(m.gateway_read <= m.total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_http1_upload_past_the_limit_is_cut_near_the_limit() {
    let _serial = SERIAL.lock().await;
    let s = setup(LIMIT).await;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\ncontent-length: {UPLOAD}\r\n\r\n",
        s.ingress_path("/echo"),
        s.f.token
    );
    let upload = raw_upload(
        s.proxy.ingress.unwrap(),
        head,
        UPLOAD,
        64 * 1024,
        Framing::Length,
        Duration::from_secs(60),
    )
    .await;
    assert_cut("ingress HTTP/1.1", &upload);
    let client = format!(
        "the client got {} after writing {} bytes in {:?}",
        upload.status(),
        upload.written,
        upload.elapsed
    );
    let m = stop_and_measure(s, "ingress HTTP/1.1", &client).await;
    assert_gateway_socket_counted("ingress HTTP/1.1", &m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_http2_upload_past_the_limit_is_cut_near_the_limit() {
    let _serial = SERIAL.lock().await;
    let s = setup(LIMIT).await;
    let offered = Arc::new(AtomicU64::new(0));
    let count = offered.clone();
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures_util::stream::unfold(0u64, move |sent| {
        let count = count.clone();
        async move {
            if sent >= UPLOAD {
                return None;
            }
            let n = CHUNK.min(UPLOAD - sent);
            count.fetch_add(n, Ordering::SeqCst);
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'h'; n as usize])),
                sent + n,
            ))
        }
    });
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let started = Instant::now();
    let answer = client
        .post(s.ingress_url("/echo"))
        .header("authorization", format!("Bearer {}", s.f.token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    let outcome = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            assert_eq!(status, 403, "the cut HTTP/2 upload got {status}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "usage_blocked", "{body}");
            format!("403 {body}")
        }
        // The stream was reset or the connection closed.
        Err(e) => format!("an error ({e})"),
    };
    let offered = offered.load(Ordering::SeqCst);
    assert!(
        offered < UPLOAD,
        "the client's body stream was read to its end"
    );
    let client = format!(
        "the client got {outcome} after its body stream yielded {offered} bytes in {:?}",
        started.elapsed()
    );
    let m = stop_and_measure(s, "ingress HTTP/2", &client).await;
    assert_gateway_socket_counted("ingress HTTP/2", &m);
}

/// A chunked upload, 16 KiB every 50 ms, through `addr` with `head`, flowing
/// until the user is blocked: how long after the block was published the
/// gateway last received upload bytes.
async fn trickle_then_block(s: &Setup, addr: std::net::SocketAddr, head: String, how: &str) {
    trickle_then(s, addr, head, how, Stop::Block).await
}

/// What stops a trickling upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A block published for the user.
    Block,
    /// The agent's token rotated.
    Rotation,
}

async fn trickle_then(s: &Setup, addr: std::net::SocketAddr, head: String, how: &str, stop: Stop) {
    let upload = tokio::spawn(raw_upload(
        addr,
        head,
        64 << 20,
        16 * 1024,
        Framing::PacedChunks {
            every: Duration::from_millis(50),
        },
        Duration::from_secs(60),
    ));
    // The gateway's socket shows the upload flowing.
    let gateway = s.gateway.stats.clone();
    let read = move || gateway.read.load(Ordering::SeqCst);
    let before = read();
    eventually(
        Duration::from_secs(10),
        format!("{how}: the trickle reaches the gateway"),
        || async { holds(read() >= before + 160 * 1024, read()) },
    )
    .await;

    // Watch when the gateway last read anything.
    let last_change = Arc::new(Mutex::new((Instant::now(), read())));
    let watcher = {
        let (last_change, read) = (last_change.clone(), read.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = read();
                let mut last = last_change.lock().unwrap();
                if now != last.1 {
                    *last = (Instant::now(), now);
                }
            }
        })
    };
    // Publish just as a chunk arrives: the upload is flowing.
    eventually(
        Duration::from_secs(5),
        format!("{how}: a chunk arrives"),
        || async {
            let since = last_change.lock().unwrap().0.elapsed();
            holds(since <= Duration::from_millis(20), since)
        },
    )
    .await;
    match stop {
        Stop::Block => {
            s.db.publish_block(
                s.f.user,
                tollgate_core::billing::BlockReason::BudgetExhausted,
            )
            .await
        }
        Stop::Rotation => {
            sqlx::query("UPDATE agents SET gateway_token = md5(random()::text) || md5(random()::text) WHERE id = $1")
                .bind(s.f.agent)
                .execute(&s.db.pool)
                .await
                .unwrap();
        }
    }
    let published = Instant::now();
    let what = match stop {
        Stop::Block => "the block was published",
        Stop::Rotation => "the token was rotated",
    };
    let at_block = read();
    // Quiet for 500 ms (ten chunk intervals): the upload has stopped.
    let (stopped_at, stopped_bytes) = eventually(
        Duration::from_secs(5),
        format!("{how}: the upload stops reaching the gateway after {what}"),
        || async {
            let (at, bytes) = *last_change.lock().unwrap();
            holds(at.elapsed() >= Duration::from_millis(500), (at, bytes))
        },
    )
    .await;
    watcher.abort();
    let latency = stopped_at.saturating_duration_since(published);
    let upload = upload.await.unwrap();
    let answered = upload.answered.saturating_duration_since(published);
    println!(
        "{how}: the trickling upload last reached the gateway {latency:?} after {what} \
         ({} bytes after it; 0: it had stopped by the time the change was committed); the client got {} \
         {answered:?} after {what}, having written {} bytes",
        stopped_bytes - at_block,
        upload.status(),
        upload.written
    );
    match stop {
        Stop::Block => assert_cut(how, &upload),
        Stop::Rotation => assert_revoked(how, &upload),
    }
    assert!(
        latency <= Duration::from_secs(1),
        "{how}: the upload kept flowing {latency:?} after {what}"
    );
    assert!(
        answered <= Duration::from_secs(1),
        "{how}: the client was answered {answered:?} after {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_stops_within_a_second_of_a_block() {
    let _serial = SERIAL.lock().await;
    // Allowed for the whole test: only the published block stops it.
    let s = setup(1 << 40).await;
    let url = s.gateway.url("/echo");
    let egress = format!(
        "POST {url} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        s.gateway.addr,
        s.f.basic()
    );
    trickle_then_block(&s, s.proxy.egress, egress, "egress chunked upload").await;
    s.proxy.stop().await;

    let s = setup(1 << 40).await;
    let ingress = format!(
        "POST {} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        s.ingress_path("/echo"),
        s.f.token
    );
    trickle_then_block(
        &s,
        s.proxy.ingress.unwrap(),
        ingress,
        "ingress HTTP/1.1 chunked upload",
    )
    .await;
    s.proxy.stop().await;
}

/// Bytes the flusher has taken from the meter but not yet written (a batch
/// waiting for the database) must still count against the headroom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_during_a_database_outage_stay_near_the_limit() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    db.update_plan(
        f.plan,
        &format!("max_bandwidth_bytes = {LIMIT}, overage_bandwidth_cost_per_gb_cents = 0"),
    )
    .await;
    let gateway = Origin::start().await;
    let relay = PgRelay::start(support::server_addr().await).await;
    let mut config = test_config(&relay.url_for(&db.url));
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let ingress = proxy.ingress.unwrap();
    let post = |size: u64| {
        format!(
            "POST /agents/{}/gateway/echo HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\n\
             content-length: {size}\r\nconnection: close\r\n\r\n",
            f.agent, f.token
        )
    };

    // Known to the proxy, its usage written.
    let small = raw_upload(ingress, post(1000), 1000, 1000, Framing::Length, GENEROUS).await;
    assert_eq!(small.status(), 200);
    let (read, written) = gateway.socket_bytes();
    db.expect_usage(f.vps, read, written, GENEROUS).await;

    // The database goes away; an upload well under the limit is allowed, and
    // the flush that takes its bytes fails.
    let failures = "tollgate_flush_failures_total";
    let before = metric(&metrics(proxy.admin).await, failures);
    relay.cut();
    let first = raw_upload(
        ingress,
        post(600_000),
        600_000,
        64 * 1024,
        Framing::Length,
        GENEROUS,
    )
    .await;
    assert_eq!(
        first.status(),
        200,
        "{}",
        String::from_utf8_lossy(&first.response)
    );
    eventually(
        GENEROUS,
        "a flush fails while the database is away",
        || async {
            let now = metric(&metrics(proxy.admin).await, failures);
            holds(now > before, now)
        },
    )
    .await;

    // Then one far past the limit.
    let second = raw_upload(
        ingress,
        post(UPLOAD),
        UPLOAD,
        64 * 1024,
        Framing::Length,
        GENEROUS,
    )
    .await;
    assert_cut("ingress upload during a database outage", &second);
    let (during, _) = gateway.socket_bytes();

    relay.restore();
    proxy.stop().await;
    let (rx, tx, total) = db.usage(f.vps).await;
    let (read, written) = gateway.socket_bytes();
    let overshoot = total - LIMIT as i64;
    println!(
        "ingress uploads during a database outage (600000 bytes allowed, then {UPLOAD}): recorded {total} \
         bytes (rx {rx}, tx {tx}), overshoot {overshoot} bytes past the {LIMIT}-byte limit (bound \
         {MAX_OVERSHOOT}); the gateway read {during} bytes in all"
    );
    assert!(rx as u64 >= read, "rx {rx} < gateway read {read}");
    assert!(tx as u64 <= written);
    assert!(
        total as u64 <= LIMIT + MAX_OVERSHOOT,
        "recorded {total} bytes, {overshoot} past the {LIMIT}-byte limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_stops_within_a_second_of_a_token_rotation() {
    let _serial = SERIAL.lock().await;
    let s = setup(1 << 40).await;
    let url = s.gateway.url("/echo");
    let egress = format!(
        "POST {url} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        s.gateway.addr,
        s.f.basic()
    );
    trickle_then(
        &s,
        s.proxy.egress,
        egress,
        "egress chunked upload, token rotated",
        Stop::Rotation,
    )
    .await;
    s.proxy.stop().await;

    let s = setup(1 << 40).await;
    let ingress = format!(
        "POST {} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        s.ingress_path("/echo"),
        s.f.token
    );
    trickle_then(
        &s,
        s.proxy.ingress.unwrap(),
        ingress,
        "ingress HTTP/1.1 chunked upload, token rotated",
        Stop::Rotation,
    )
    .await;
    s.proxy.stop().await;
}
