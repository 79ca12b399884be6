//! Hostile caps: what one client or agent can hold on a proxy is bounded.
//! Tunnels and WebSockets keep their connection slot until they end; per-agent
//! caps on connections, tunnels and the connection rate refuse with `429` and a
//! JSON reason while other agents carry on; the origin pool stays within its
//! bounds whatever spellings and names an agent uses; malformed bodies and
//! ports are bad requests; an idle HTTP/2 connection is closed while a
//! streaming one is not. Every destination is on loopback, reached through a
//! dialer that can only ever dial loopback. Prints what it measures.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::client::{exchange, get_request, read_head};
use support::hostile::{read_response, RawResponse};
use support::hostile_load::{
    loopback_seams, loopback_spellings, metric, metrics, CountingOrigin, POOL_SUFFIX,
};
use support::origin::{EchoServer, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds};
use support::{Fixture, TestDb};

/// One test at a time: metrics are process-wide, and the tests count
/// connections and sockets on a small shared machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const GENEROUS: Duration = Duration::from_secs(10);

/// What a CONNECT attempt got.
enum Connect {
    /// 200: the tunnel is open.
    Open(TcpStream),
    /// Another answer (status, head, body).
    Refused(RawResponse),
    /// The connection closed or reset before a complete answer.
    Closed,
}

/// Send a CONNECT to `target` on a new connection to `proxy`.
async fn connect(proxy: SocketAddr, auth: &str, target: SocketAddr) -> Connect {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    match connect_on(&mut s, auth, target).await {
        None => Connect::Open(s),
        Some(Some(r)) => Connect::Refused(r),
        Some(None) => Connect::Closed,
    }
}

/// Send a CONNECT on `s`: `None` if the tunnel opened, else the refusal
/// (`Some(None)` if the connection closed first).
async fn connect_on(
    s: &mut TcpStream,
    auth: &str,
    target: SocketAddr,
) -> Option<Option<RawResponse>> {
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\nproxy-authorization: {auth}\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return Some(None);
    }
    let head = tokio::time::timeout(GENEROUS, read_head(s))
        .await
        .expect("an answer to CONNECT");
    if head.starts_with(b"HTTP/1.1 200") {
        return None;
    }
    if !head.ends_with(b"\r\n\r\n") {
        return Some(None);
    }
    let mut response = RawResponse::from_head(&head);
    if s.read_exact(&mut response.body).await.is_err() {
        return Some(None);
    }
    Some(Some(response))
}

/// A tunnel echoes a byte both ways.
async fn echoes(s: &mut TcpStream) {
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(GENEROUS, s.read_exact(&mut b))
        .await
        .expect("the tunnel echoes")
        .unwrap();
    assert_eq!(&b, b"x");
}

fn reason(r: &RawResponse) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Wait until the series `name` in the admin's metrics reads `want`.
async fn metric_reads(admin: SocketAddr, name: &str, want: f64) -> f64 {
    eventually(GENEROUS, format!("{name} reads {want}"), || async {
        let v = metric(&metrics(admin).await, name);
        holds(v == want, v)
    })
    .await
}

/// Wait until the series `name` has moved by at least `by` since `before`.
async fn metric_moved(admin: SocketAddr, before: &str, name: &str, by: f64) -> f64 {
    let start = metric(before, name);
    eventually(GENEROUS, format!("{name} moved by {by}"), || async {
        let moved = metric(&metrics(admin).await, name) - start;
        holds(moved >= by, moved)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_and_websockets_hold_their_connection_slot_until_they_end() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let echo = EchoServer::start().await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.max_connections = 50;
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    config.proxy.ingress.max_connections = 50;
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (seams, dialer) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;

    // Egress: 120 CONNECT tunnels from one client, each on its own connection.
    let (mut open, mut refused_503, mut closed) = (Vec::new(), 0, 0);
    for _ in 0..120 {
        match connect(proxy.egress, &f.basic(), echo.addr).await {
            Connect::Open(s) => open.push(s),
            Connect::Refused(r) => {
                assert_eq!(r.status, 503, "{}", r.head);
                assert_eq!(reason(&r), "connections");
                refused_503 += 1;
            }
            // Refused by the listener before it read the CONNECT: the 503 can
            // be lost to the reset of the unread request.
            Connect::Closed => closed += 1,
        }
    }
    for s in &mut open {
        echoes(s).await;
    }
    let gauge = metric_reads(
        proxy.admin,
        "tollgate_active_connections{listener=\"egress\"}",
        open.len() as f64,
    )
    .await;
    println!(
        "open tunnels held under a limit of 50: {} (of 120 tried; {refused_503} refused with 503, \
         {closed} closed before the 503 was read); tollgate_active_connections{{listener=\"egress\"}} = {gauge}",
        open.len()
    );
    assert_eq!(open.len(), 50, "tunnels open under a limit of 50");
    assert_eq!(refused_503 + closed, 70);
    assert!(refused_503 > 0, "the listener answers 503 beyond its limit");

    // Closing the tunnels gives the slots back.
    drop(open);
    metric_reads(
        proxy.admin,
        "tollgate_active_connections{listener=\"egress\"}",
        0.0,
    )
    .await;
    match connect(proxy.egress, &f.basic(), echo.addr).await {
        Connect::Open(mut s) => echoes(&mut s).await,
        _ => panic!("no tunnel after the others closed"),
    }

    // Ingress: 120 WebSockets through to the gateway's echo.
    let url = format!(
        "ws://{}/agents/{}/gateway/ws",
        proxy.ingress.unwrap(),
        f.agent
    );
    let (mut sockets, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..120 {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", f.token).parse().unwrap(),
        );
        match tokio::time::timeout(GENEROUS, tokio_tungstenite::connect_async(req))
            .await
            .expect("a WebSocket handshake answer")
        {
            Ok((ws, _)) => sockets.push(ws),
            Err(e) => refused.push(e.to_string()),
        }
    }
    for ws in &mut sockets {
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    }
    let gauge = metric_reads(
        proxy.admin,
        "tollgate_active_connections{listener=\"ingress\"}",
        sockets.len() as f64,
    )
    .await;
    let with_503 = refused.iter().filter(|e| e.contains("503")).count();
    println!(
        "open WebSockets held under a limit of 50: {} (of 120 tried; {} refused, {with_503} of them with a 503); \
         tollgate_active_connections{{listener=\"ingress\"}} = {gauge}",
        sockets.len(),
        refused.len()
    );
    assert_eq!(sockets.len(), 50, "WebSockets open under a limit of 50");
    assert!(
        with_503 > 0,
        "the listener answers 503 beyond its limit: {refused:?}"
    );
    drop(sockets);
    metric_reads(
        proxy.admin,
        "tollgate_active_connections{listener=\"ingress\"}",
        0.0,
    )
    .await;
    let mut again = websocket(proxy.ingress.unwrap(), &f)
        .await
        .expect("a WebSocket after the others closed");
    again.send(Message::text("again")).await.unwrap();
    assert_eq!(again.next().await.unwrap().unwrap(), Message::text("again"));
    drop(again);

    assert!(dialer
        .attempts()
        .iter()
        .all(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST));
    proxy.stop().await;
}

/// A WebSocket to the gateway's echo through ingress, as `f`'s agent; the
/// handshake error's text if refused.
async fn websocket(
    ingress: SocketAddr,
    f: &Fixture,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>, String>
{
    let mut req = format!("ws://{ingress}/agents/{}/gateway/ws", f.agent)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", f.token).parse().unwrap(),
    );
    tokio::time::timeout(GENEROUS, tokio_tungstenite::connect_async(req))
        .await
        .expect("a WebSocket handshake answer")
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// A WebSocket handshake through ingress as `f`'s agent, on a raw socket: the
/// answer's head and body.
async fn raw_websocket(ingress: SocketAddr, f: &Fixture) -> RawResponse {
    let mut s = TcpStream::connect(ingress).await.unwrap();
    s.write_all(
        format!(
            "GET /agents/{}/gateway/ws HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\n\
             connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            f.agent, f.token
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_response(&mut s).await
}

/// A GET through egress on a new connection, reading one response.
async fn get_once(proxy: SocketAddr, url: &str, auth: &str) -> RawResponse {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    s.write_all(
        format!("GET {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    read_response(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_caps_refuse_one_agent_and_leave_the_others_alone() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let (a, b) = (db.fixture("fly").await, db.fixture("fly").await);
    let echo = EchoServer::start().await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    config.proxy.agent_limits.max_connections = 4;
    config.proxy.agent_limits.max_tunnels = 3;
    config.proxy.agent_limits.new_connections_per_second = 100;
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (seams, dialer) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let before = metrics(proxy.admin).await;

    // Agent a: three tunnels, its cap.
    let mut tunnels_a = Vec::new();
    for _ in 0..3 {
        match connect(proxy.egress, &a.basic(), echo.addr).await {
            Connect::Open(s) => tunnels_a.push(s),
            _ => panic!("agent a's tunnel under its cap was refused"),
        }
    }
    // Tunnels and WebSockets share the cap: agent a's WebSocket through
    // ingress is one too many as well.
    let refused = raw_websocket(proxy.ingress.unwrap(), &a).await;
    assert_eq!(refused.status, 429, "{}", refused.head);
    assert_eq!(reason(&refused), "agent_tunnels");
    // A fourth connection binds (4 of 4), but its tunnel is one too many.
    let mut fourth = TcpStream::connect(proxy.egress).await.unwrap();
    let refused = connect_on(&mut fourth, &a.basic(), echo.addr)
        .await
        .expect("refused")
        .expect("a refusal, not a close");
    assert_eq!(refused.status, 429, "{}", refused.head);
    assert_eq!(reason(&refused), "agent_tunnels");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&refused.body).unwrap()["error"],
        "too_many_requests"
    );
    // Agent b still gets its tunnels.
    let mut tunnels_b = Vec::new();
    for _ in 0..3 {
        match connect(proxy.egress, &b.basic(), echo.addr).await {
            Connect::Open(mut s) => {
                echoes(&mut s).await;
                tunnels_b.push(s);
            }
            _ => panic!("agent b's tunnel was refused while agent a was at its cap"),
        }
    }
    // And a third agent its WebSocket.
    let c = db.fixture("fly").await;
    let mut ws = websocket(proxy.ingress.unwrap(), &c)
        .await
        .expect("agent c's WebSocket while agent a is at its cap");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    drop(ws);
    // A fifth connection of agent a: over its connection cap, and closed.
    let url = gateway.url("/status/204");
    let r = get_once(proxy.egress, &url, &a.basic()).await;
    assert_eq!(r.status, 429, "{}", r.head);
    assert_eq!(reason(&r), "agent_connections");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // Agent b is not held back by a's connections either.
    assert_eq!(get_once(proxy.egress, &url, &b.basic()).await.status, 204);

    let tunnels = metric_moved(
        proxy.admin,
        &before,
        "tollgate_agent_limit_refusals_total{listener=\"egress\",limit=\"agent_tunnels\"}",
        1.0,
    )
    .await;
    let websockets = metric_moved(
        proxy.admin,
        &before,
        "tollgate_agent_limit_refusals_total{listener=\"ingress\",limit=\"agent_tunnels\"}",
        1.0,
    )
    .await;
    let connections = metric_moved(
        proxy.admin,
        &before,
        "tollgate_agent_limit_refusals_total{listener=\"egress\",limit=\"agent_connections\"}",
        1.0,
    )
    .await;
    println!(
        "per-agent caps (4 connections, 3 tunnels): refusals counted: agent_tunnels +{tunnels} egress, +{websockets} ingress, \
         agent_connections +{connections}"
    );

    // After closing, the capacity comes back.
    for s in &mut tunnels_a {
        echoes(s).await;
    }
    drop(tunnels_a);
    drop(fourth);
    let reopened = Instant::now();
    let mut again = eventually(GENEROUS, "agent a opens a tunnel again", || async {
        match connect(proxy.egress, &a.basic(), echo.addr).await {
            Connect::Open(s) => Ok(s),
            Connect::Refused(r) => Err(format!("{} {}", r.status, reason(&r))),
            Connect::Closed => Err("closed".to_owned()),
        }
    })
    .await;
    echoes(&mut again).await;
    println!(
        "agent a's capacity came back {:?} after closing",
        reopened.elapsed()
    );
    // The rest comes back as the proxy sees the other closed connections
    // end (each on the serving thread that serves it).
    let mut more = Vec::new();
    for _ in 0..2 {
        let tunnel = eventually(
            GENEROUS,
            "agent a's capacity comes back in full",
            || async {
                match connect(proxy.egress, &a.basic(), echo.addr).await {
                    Connect::Open(s) => Ok(s),
                    Connect::Refused(r) => Err(format!("{} {}", r.status, reason(&r))),
                    Connect::Closed => Err("closed".to_owned()),
                }
            },
        )
        .await;
        more.push(tunnel);
    }
    drop((again, more, tunnels_b));

    // The rate: another agent opening connections fast.
    let c = db.fixture("fly").await;
    let mut config = test_config(&db.url);
    config.proxy.agent_limits.new_connections_per_second = 5;
    let (seams, _) = loopback_seams();
    let rated = TestProxy::start_with(config, seams).await;
    let before = metrics(rated.admin).await;
    let started = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    for _ in 0..30 {
        let ex = exchange(rated.egress, &get_request(&url, &c.basic())).await;
        match ex.status {
            204 => ok += 1,
            429 => {
                assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&ex.body).unwrap()["reason"],
                    "agent_connection_rate"
                );
                limited += 1;
            }
            other => panic!("{other}: {}", ex.head),
        }
    }
    let elapsed = started.elapsed();
    let allowed = 5.0 + 5.0 * elapsed.as_secs_f64() + 1.0;
    println!(
        "connection rate 5/s: {ok} of 30 new connections in {elapsed:?} allowed, {limited} refused \
         with agent_connection_rate (at most {allowed:.1} allowed)"
    );
    assert!(limited > 0, "no connection was refused for its rate");
    assert!(f64::from(ok) <= allowed, "{ok} connections allowed");
    let rate = metric_moved(
        rated.admin,
        &before,
        "tollgate_agent_limit_refusals_total{listener=\"egress\",limit=\"agent_connection_rate\"}",
        f64::from(limited),
    )
    .await;
    assert_eq!(rate, f64::from(limited));
    // A second later, the bucket has refilled.
    eventually(GENEROUS, "agent c connects again", || async {
        let ex = exchange(rated.egress, &get_request(&url, &c.basic())).await;
        holds(ex.status == 204, ex.status)
    })
    .await;
    assert!(dialer
        .attempts()
        .iter()
        .all(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST));
    rated.stop().await;
    proxy.stop().await;
}

/// Send `GET http://{host}:{port}/` requests on one kept-alive connection, one
/// per host; every answer must be 200.
async fn keep_alive_gets(proxy: SocketAddr, auth: String, hosts: Vec<String>, port: u16) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    for host in hosts {
        let request = format!(
            "GET http://{host}:{port}/ HTTP/1.1\r\nhost: {host}:{port}\r\nproxy-authorization: {auth}\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 200, "{host}: {}", r.head);
    }
}

/// Run `hosts` over `clients` kept-alive connections at once.
async fn spread(proxy: SocketAddr, f: &Fixture, hosts: Vec<String>, port: u16, clients: usize) {
    let mut lanes: Vec<Vec<String>> = vec![Vec::new(); clients];
    for (i, h) in hosts.into_iter().enumerate() {
        lanes[i % clients].push(h);
    }
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|lane| tokio::spawn(keep_alive_gets(proxy, f.basic(), lane, port)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Wait until the origin holds at most `cap` connections; returns how many.
async fn settles_within(origin: &CountingOrigin, cap: usize, what: &str) -> usize {
    eventually(
        GENEROUS,
        format!("{what}: origin sockets <= {cap}"),
        || async { holds(origin.open() <= cap, origin.open()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_pool_stays_within_its_bounds_whatever_the_spelling() {
    let _serial = SERIAL.lock().await;
    const PER_HOST: usize = 2;
    const PER_AGENT: usize = 8;
    const TOTAL: usize = 12;
    // Spellings of one origin go out over this many clients at once (one
    // pool key: its cap holds under concurrent returns); names one at a time.
    const CLIENTS: usize = 4;
    // While a client is busy, it may hold one origin socket in use and one
    // the proxy has let go whose close the origin has not yet seen.
    const BUSY: usize = 2 * CLIENTS;
    let db = TestDb::new().await;
    let (a, b) = (db.fixture("fly").await, db.fixture("fly").await);
    let origin = CountingOrigin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.upstream_max_idle_per_host = PER_HOST;
    config.proxy.egress.upstream_max_idle_per_agent = PER_AGENT;
    config.proxy.egress.upstream_max_idle_total = TOTAL;
    let (seams, dialer) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let port = origin.addr.port();

    // 1,500 spellings of 127.0.0.1: one origin, so at most PER_HOST kept.
    let spellings = loopback_spellings(1500);
    assert_eq!(
        spellings
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1500
    );
    let started = Instant::now();
    spread(proxy.egress, &a, spellings, port, CLIENTS).await;
    let after_spellings = settles_within(&origin, PER_HOST, "after 1,500 spellings").await;
    println!(
        "idle origin sockets after 1,500 spellings: {after_spellings} (cap per host {PER_HOST}; \
         peak {} while {CLIENTS} clients were busy, bound {}; {} accepted; {:?})",
        origin.peak(),
        PER_HOST + BUSY,
        origin.accepted(),
        started.elapsed()
    );
    assert!(origin.peak() <= PER_HOST + BUSY, "peak {}", origin.peak());

    // 1,500 names of agent a, all resolving to 127.0.0.1: each a different
    // pool key, so only the per-agent cap holds them.
    origin.reset_peak();
    let names: Vec<String> = (0..1500)
        .map(|i| match i % 3 {
            0 => format!("n{i}{POOL_SUFFIX}"),
            1 => format!("N{i}.Pool.Test"),
            _ => format!("n{i}.POOL.TEST."),
        })
        .collect();
    spread(proxy.egress, &a, names, port, 1).await;
    let after_names = settles_within(&origin, PER_AGENT, "after agent a's 1,500 names").await;
    println!(
        "idle origin sockets after agent a's 1,500 names: {after_names} (cap per agent {PER_AGENT}; \
         peak {}, bound {}; {} accepted in all)",
        origin.peak(),
        PER_AGENT + 2,
        origin.accepted()
    );
    assert!(origin.peak() <= PER_AGENT + 2, "peak {}", origin.peak());

    // Another agent's 1,500 names: the total cap holds both.
    origin.reset_peak();
    let names: Vec<String> = (0..1500).map(|i| format!("m{i}{POOL_SUFFIX}")).collect();
    spread(proxy.egress, &b, names, port, 1).await;
    let after_both = settles_within(&origin, TOTAL, "after agent b's 1,500 names").await;
    println!(
        "idle origin sockets after a second agent's 1,500 names: {after_both} (cap in all {TOTAL}; \
         peak {}, bound {}; {} accepted in all)",
        origin.peak(),
        TOTAL + 2,
        origin.accepted()
    );
    assert!(origin.peak() <= TOTAL + 2, "peak {}", origin.peak());

    let attempts = dialer.attempts();
    assert!(!attempts.is_empty());
    assert!(
        attempts
            .iter()
            .all(|a| *a == SocketAddr::from(([127, 0, 0, 1], port))),
        "every dial went to the origin on 127.0.0.1"
    );
    proxy.stop().await;
}

/// Many clients of one agent returning connections to different origins at
/// once: the pool's total and per-agent caps hold under concurrent returns as
/// they do one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_pool_caps_hold_under_concurrent_returns() {
    let _serial = SERIAL.lock().await;
    const TOTAL: usize = 4;
    const PER_AGENT: usize = 3;
    const CLIENTS: usize = 16;
    let db = TestDb::new().await;
    let (a, b) = (db.fixture("fly").await, db.fixture("fly").await);
    let origin = CountingOrigin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.upstream_max_idle_per_host = 1;
    config.proxy.egress.upstream_max_idle_per_agent = PER_AGENT;
    config.proxy.egress.upstream_max_idle_total = TOTAL;
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let port = origin.addr.port();
    let mut worst = 0;
    for round in 0..5 {
        let names = |agent: &str| -> Vec<String> {
            (0..400)
                .map(|i| format!("{agent}{round}x{i}{POOL_SUFFIX}"))
                .collect()
        };
        tokio::join!(
            spread(proxy.egress, &a, names("a"), port, CLIENTS / 2),
            spread(proxy.egress, &b, names("b"), port, CLIENTS / 2),
        );
        // Let the origin see every close of a connection the pool let go.
        let mut settled = origin.open();
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            settled = origin.open();
        }
        worst = worst.max(settled);
        println!(
            "round {round}: {settled} origin sockets kept after {CLIENTS} clients of 2 agents returned 800 \
             connections at once (cap in all {TOTAL}, per agent {PER_AGENT})"
        );
    }
    assert!(
        worst <= TOTAL,
        "the pool kept {worst} origin sockets under a cap of {TOTAL}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_ports_are_bad_requests() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let before = metrics(proxy.admin).await;
    let bad_chunk = "zz\r\nhello\r\n0\r\n\r\n";

    // Egress plain HTTP with an invalid chunk size line.
    let url = gateway.url("/echo");
    let request = format!(
        "POST {url} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n{bad_chunk}",
        gateway.addr,
        f.basic()
    );
    let ex = exchange(proxy.egress, request.as_bytes()).await;
    assert_eq!(ex.status, 400, "egress: {}{}", ex.head, ex.body_text());
    let egress_bad = metric_moved(
        proxy.admin,
        &before,
        "tollgate_requests_total{listener=\"egress\",outcome=\"bad_request\"}",
        1.0,
    )
    .await;

    // Ingress, the same body.
    let request = format!(
        "POST /agents/{}/gateway/echo HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{bad_chunk}",
        f.agent, f.token
    );
    let ex = exchange(proxy.ingress.unwrap(), request.as_bytes()).await;
    assert_eq!(ex.status, 400, "ingress: {}{}", ex.head, ex.body_text());
    let ingress_bad = metric_moved(
        proxy.admin,
        &before,
        "tollgate_requests_total{listener=\"ingress\",outcome=\"bad_request\"}",
        1.0,
    )
    .await;
    println!(
        "malformed chunked bodies: 400 on egress and ingress; bad_request counted +{egress_bad} egress, +{ingress_bad} ingress"
    );
    for listener in ["egress", "ingress"] {
        let upstream = format!(
            "tollgate_requests_total{{listener=\"{listener}\",outcome=\"upstream_error\"}}"
        );
        assert_eq!(
            metric(&metrics(proxy.admin).await, &upstream),
            metric(&before, &upstream),
            "a client's malformed body is not the upstream's failure"
        );
    }

    // A port that is no port.
    let ex = exchange(
        proxy.egress,
        &get_request("http://127.0.0.1:99999/", &f.basic()),
    )
    .await;
    assert_eq!(ex.status, 400, "port 99999: {}", ex.head);
    println!("http://127.0.0.1:99999/ through egress: {}", ex.status);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_and_a_streaming_one_is_not() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    config.proxy.ingress.header_read_timeout = Duration::from_secs(1);
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let ingress = proxy.ingress.unwrap();

    let h2 = || async {
        let tcp = TcpStream::connect(ingress).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(conn))
    };

    // Idle: no request at all.
    let started = Instant::now();
    let (_sender, conn) = h2().await;
    let ended = tokio::time::timeout(GENEROUS, conn).await;
    let idle_closed = started.elapsed();
    println!("idle HTTP/2 connection closed by the proxy after {idle_closed:?} (timeout 1 s)");
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection still open after {GENEROUS:?}"
    );
    assert!(
        idle_closed >= Duration::from_millis(900),
        "closed after {idle_closed:?}, before the 1 s timeout"
    );

    // Streaming: 30 events 100 ms apart, well past the timeout.
    let (mut sender, conn) = h2().await;
    let req = http::Request::get(format!(
        "http://{ingress}/agents/{}/gateway/sse/30/100",
        f.agent
    ))
    .header("authorization", format!("Bearer {}", f.token))
    .body(http_body_util::Empty::<bytes::Bytes>::new())
    .unwrap();
    let started = Instant::now();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(frame) = tokio::time::timeout(GENEROUS, body.frame())
        .await
        .expect("the stream keeps flowing")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            text.extend_from_slice(&data);
        }
    }
    let streamed = started.elapsed();
    let events = String::from_utf8_lossy(&text).matches("data: tick").count();
    println!("HTTP/2 SSE stream under a 1 s idle timeout: {events} of 30 events over {streamed:?}");
    assert_eq!(
        events,
        30,
        "the stream was cut: {}",
        String::from_utf8_lossy(&text)
    );
    assert!(streamed >= Duration::from_millis(2500));
    drop(sender);
    let _ = tokio::time::timeout(GENEROUS, conn).await;
    proxy.stop().await;
}

/// The idle close must not depend on the client's cooperation: a client that
/// sends the HTTP/2 preface and its settings, then never reads or answers
/// anything (no SETTINGS or PING acknowledgements), is closed within a few
/// header read timeouts too, as an idle HTTP/1.1 client is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_client_that_acknowledges_nothing_is_closed_too() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.header_read_timeout = Duration::from_secs(1);
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(config, seams).await;
    let started = Instant::now();
    let mut deaf = TcpStream::connect(proxy.ingress.unwrap()).await.unwrap();
    deaf.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let closed = tokio::time::timeout(GENEROUS, async {
        let mut sink = [0u8; 4096];
        loop {
            match deaf.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "idle HTTP/2 client that acknowledges nothing (1 s header read timeout): {}",
        match closed {
            Ok(()) => format!("closed by the proxy after {elapsed:?}"),
            Err(_) => format!("still open after {elapsed:?}"),
        }
    );
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 client that acknowledges nothing still open after {GENEROUS:?}"
    );
    proxy.stop().await;
}

/// A burst of connections is spread over the serving threads (the test proxy
/// runs two), whichever thread the kernel woke to accept each: no thread
/// serves more than two connections beyond another. Every connection, handed
/// over or not, is then served.
#[tokio::test]
async fn a_burst_of_connections_is_spread_over_the_serving_threads() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let (seams, _) = loopback_seams();
    let proxy = TestProxy::start_with(test_config(&db.url), seams).await;
    let on = |text: &str, thread: usize| {
        metric(
            text,
            &format!("tollgate_serving_thread_connections{{thread=\"{thread}\"}}"),
        )
    };
    let before = metrics(proxy.admin).await;
    let before = (on(&before, 0), on(&before, 1));

    const BURST: usize = 40;
    let mut burst =
        futures_util::future::join_all((0..BURST).map(|_| TcpStream::connect(proxy.egress)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
    let (zero, one) = eventually(GENEROUS, "every connection of the burst placed", || async {
        let text = metrics(proxy.admin).await;
        let placed = (on(&text, 0) - before.0, on(&text, 1) - before.1);
        holds(placed.0 + placed.1 == BURST as f64, placed)
    })
    .await;
    println!("a burst of {BURST} connections: {zero} on serving thread 0, {one} on thread 1");
    assert!(
        (zero - one).abs() <= 2.0,
        "{zero} and {one} connections on the two serving threads"
    );

    let request = get_request(&origin.url("/status/204"), &f.basic());
    for stream in &mut burst {
        stream.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(GENEROUS, stream.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 204"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    proxy.stop().await;
}
