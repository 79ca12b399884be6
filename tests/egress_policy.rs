//! Per-agent egress policies end to end: rules in PostgreSQL, judged on plain
//! HTTP and CONNECT, report mode, live changes closing open tunnels, and the
//! SNI of a tunnel's ClientHello. Names resolve from a fixed table to loopback
//! addresses (127.0.0.x) and the dialer can only ever reach loopback, so no
//! test here can send a packet elsewhere even if a refusal is broken.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use support::client::{basic, exchange, get_request, read_head, tunnel};
use support::hostile::{loopback_seams, LoopbackOnlyDialer};
use support::origin::Origin;
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds};
use support::TestDb;

/// An origin on a loopback address of its own that echoes what it gets,
/// counting and keeping the bytes it received.
struct Recorder {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    data: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start(ip: &str) -> Recorder {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let data = Arc::new(Mutex::new(Vec::new()));
        let (counted, kept) = (received.clone(), data.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counted, kept) = (counted.clone(), kept.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counted.fetch_add(n as u64, Ordering::SeqCst);
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            received,
            data,
        }
    }
}

/// One rule as a test writes it: action, host, CIDR, ports.
type RuleSpec<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<Vec<i32>>);

/// A policy with `rules`, returning its id and the rule ids in order.
async fn policy(
    db: &TestDb,
    name: &str,
    mode: &str,
    default_action: &str,
    rules: &[RuleSpec<'_>],
) -> (i64, Vec<i64>) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO egress_policies (name, mode, default_action) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(mode)
    .bind(default_action)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut ids = Vec::new();
    for (action, host, cidr, ports) in rules {
        ids.push(add_rule(db, id, action, *host, *cidr, ports.clone()).await);
    }
    (id, ids)
}

async fn add_rule(
    db: &TestDb,
    policy: i64,
    action: &str,
    host: Option<&str>,
    cidr: Option<&str>,
    ports: Option<Vec<i32>>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO egress_policy_rules (policy_id, action, host, cidr, ports)
         VALUES ($1, $2, $3, $4::cidr, $5) RETURNING id",
    )
    .bind(policy)
    .bind(action)
    .bind(host)
    .bind(cidr)
    .bind(ports)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn assign_to_plan(db: &TestDb, plan: Uuid, policy: i64) {
    sqlx::query("UPDATE plans SET egress_policy_id = $2 WHERE id = $1")
        .bind(plan)
        .bind(policy)
        .execute(&db.pool)
        .await
        .unwrap();
}

/// The seams: every `*.test` name in `names` resolves to its loopback address.
fn seams(names: &[(&'static str, &str)]) -> (tollgate_proxy::Seams, Arc<LoopbackOnlyDialer>) {
    let table: HashMap<&'static str, Vec<IpAddr>> = names
        .iter()
        .map(|(name, ip)| (*name, vec![ip.parse().unwrap()]))
        .collect();
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    (loopback_seams(table, dialer.clone()), dialer)
}

/// CONNECT `target` and return the response head's status and headers as text,
/// and the JSON body of a refusal.
async fn connect(proxy: SocketAddr, auth: &str, target: &str) -> (u16, String, Option<Value>) {
    let ex = tunnel(proxy, auth, target, b"ping").await;
    let json = serde_json::from_slice(&ex.body).ok();
    (ex.status, ex.head, json)
}

fn deny_reason(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-tollgate-deny-reason")
            .then(|| v.trim().to_owned())
    })
}

/// Every rule kind, over plain HTTP and CONNECT: exact host, `*.suffix` (not
/// the suffix itself), CIDR (deny wins over an allowed name; bare IPs), ports,
/// the default, and an agent's own policy replacing its plan's. A refused name
/// is never resolved, let alone dialed.
#[tokio::test]
async fn each_rule_kind_allows_and_denies_over_http_and_connect() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let echo = Recorder::start("127.0.0.1").await;
    let fenced = Recorder::start("127.0.0.2").await;
    let open_ip = Recorder::start("127.0.0.3").await;
    let (http_port, echo_port) = (origin.addr.port(), echo.addr.port());
    let (strict, rules) = policy(
        &db,
        "strict",
        "enforce",
        "deny",
        &[
            ("allow", Some("api.allowed.test"), None, None),
            (
                "allow",
                Some("*.cdn.test"),
                None,
                Some(vec![i32::from(echo_port), i32::from(fenced.addr.port())]),
            ),
            ("deny", Some("secret.cdn.test"), None, None),
            ("deny", None, Some("127.0.0.2/32"), None),
            ("allow", None, Some("127.0.0.3/32"), None),
        ],
    )
    .await;
    assign_to_plan(&db, f.plan, strict).await;
    let (open, _) = policy(&db, "open", "enforce", "allow", &[]).await;
    let other_vps = db.vps(f.user, "fly", "127.0.0.1", "running").await;
    let (other_agent, other_token) = db.agent(f.user, Some(other_vps)).await;
    sqlx::query("UPDATE agents SET egress_policy_id = $2 WHERE id = $1")
        .bind(other_agent)
        .bind(open)
        .execute(&db.pool)
        .await
        .unwrap();

    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo_port, fenced.addr.port(), open_ip.addr.port()];
    let (seams, dialer) = seams(&[
        ("api.allowed.test", "127.0.0.1"),
        ("elsewhere.test", "127.0.0.1"),
        ("a.cdn.test", "127.0.0.1"),
        ("cdn.test", "127.0.0.1"),
        ("secret.cdn.test", "127.0.0.1"),
        ("sneaky.cdn.test", "127.0.0.2"),
    ]);
    let proxy = TestProxy::start_with(config, seams).await;
    let auth = f.basic();

    // Plain HTTP.
    let ok = exchange(
        proxy.egress,
        &get_request(&format!("http://api.allowed.test:{http_port}/x"), &auth),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    let refused = exchange(
        proxy.egress,
        &get_request(&format!("http://elsewhere.test:{http_port}/x"), &auth),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.head);
    assert_eq!(
        refused.header("x-tollgate-deny-reason").as_deref(),
        Some("policy_default")
    );
    let body: Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(body["error"], "egress_denied");
    assert_eq!(body["policy"], "strict");
    assert_eq!(body["rule"]["rule"], "default deny");
    // Allowed by `*.cdn.test`, but not on this port.
    let off_port = exchange(
        proxy.egress,
        &get_request(&format!("http://a.cdn.test:{http_port}/"), &auth),
    )
    .await;
    assert_eq!(off_port.status, 403);

    // CONNECT by name.
    let (status, _, _) = connect(proxy.egress, &auth, &format!("a.cdn.test:{echo_port}")).await;
    assert_eq!(status, 200);
    for (target, reason, rule) in [
        (format!("cdn.test:{echo_port}"), "policy_default", None),
        (
            format!("secret.cdn.test:{echo_port}"),
            "policy_rule",
            Some(rules[2]),
        ),
        (
            format!("sneaky.cdn.test:{}", fenced.addr.port()),
            "policy_rule",
            Some(rules[3]),
        ),
    ] {
        let (status, head, body) = connect(proxy.egress, &auth, &target).await;
        assert_eq!(status, 403, "CONNECT {target}: {head}");
        assert_eq!(
            deny_reason(&head).as_deref(),
            Some(reason),
            "CONNECT {target}"
        );
        let body = body.expect("a JSON refusal");
        assert_eq!(
            body["rule"]["id"].as_i64(),
            rule,
            "CONNECT {target}: {body}"
        );
    }
    // CONNECT to bare IPs: CIDR rules only.
    let (status, _, _) = connect(proxy.egress, &auth, &open_ip.addr.to_string()).await;
    assert_eq!(status, 200);
    let (status, head, _) = connect(proxy.egress, &auth, &fenced.addr.to_string()).await;
    assert_eq!(
        (status, deny_reason(&head).as_deref()),
        (403, Some("policy_rule"))
    );
    assert_eq!(
        fenced.received.load(Ordering::SeqCst),
        0,
        "a refused address got bytes"
    );

    // The other agent's own policy replaces the plan's.
    let other = basic(other_agent, &other_token);
    let ok = exchange(
        proxy.egress,
        &get_request(&format!("http://elsewhere.test:{http_port}/x"), &other),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.head);

    // Refused names were never dialed; the CIDR refusal was judged before dialing.
    let dialed: Vec<SocketAddr> = dialer.attempts();
    assert!(
        dialed
            .iter()
            .all(|a| a.ip() != "127.0.0.2".parse::<IpAddr>().unwrap()),
        "dialed a refused address: {dialed:?}"
    );
    proxy.stop().await;
}

/// Report mode refuses nothing: a destination the policy would deny is passed
/// on, and counted as reported.
#[tokio::test]
async fn report_mode_passes_what_it_would_refuse_and_counts_it() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let echo = Recorder::start("127.0.0.1").await;
    let (watching, rules) = policy(
        &db,
        "watching",
        "report",
        "allow",
        &[("deny", Some("*.tracked.test"), None, None)],
    )
    .await;
    assign_to_plan(&db, f.plan, watching).await;
    let mut config = test_config(&db.url);
    let log = log_decisions(&mut config);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let (seams, _) = seams(&[("x.tracked.test", "127.0.0.1")]);
    let proxy = TestProxy::start_with(config, seams).await;
    let before = support::counter(
        "tollgate_egress_policy_reported_total",
        &[("reason", "policy_rule")],
    );
    let target = format!("x.tracked.test:{}", echo.addr.port());
    let ex = tunnel(proxy.egress, &f.basic(), &target, b"hello").await;
    assert_eq!(ex.status, 200, "{}", ex.head);
    assert_eq!(ex.body, b"hello");
    let after = support::counter(
        "tollgate_egress_policy_reported_total",
        &[("reason", "policy_rule")],
    );
    assert!(
        after > before,
        "report-mode refusal not counted ({before} -> {after})"
    );
    let lines = decisions(
        &log,
        serde_json::json!({"host": "x.tracked.test", "policy_mode": "report"}),
        1,
    )
    .await;
    assert_eq!(lines[0]["deny_reason"], "policy_rule");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(
        lines[0]["deny_rule"],
        format!("#{} deny host *.tracked.test", rules[0])
    );
    proxy.stop().await;
}

/// Log decisions to a file of their own; returns its path.
fn log_decisions(config: &mut tollgate_core::config::Config) -> std::path::PathBuf {
    let path = support::proxy::temp_dir("policy-decisions").join("decisions.jsonl");
    config.proxy.decision_log.sink = tollgate_core::config::DecisionLogSink::File;
    config.proxy.decision_log.path = Some(path.clone());
    path
}

/// Wait until the decision log holds `n` lines with every field of `select`.
async fn decisions(path: &std::path::Path, select: Value, n: usize) -> Vec<Value> {
    let select = select.as_object().unwrap().clone();
    eventually(
        Duration::from_secs(10),
        format!("{n} decision lines with {select:?}"),
        || {
            let select = select.clone();
            async move {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let found: Vec<Value> = text
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .filter(|l| select.iter().all(|(k, v)| l.get(k) == Some(v)))
                    .collect();
                holds(found.len() >= n, found)
            }
        },
    )
    .await
}

/// CONNECT `target` and expect `200`: the tunnel's client side.
async fn connected(proxy: SocketAddr, auth: &str, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\nproxy-authorization: {auth}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Open a CONNECT tunnel and check it echoes.
async fn open_tunnel(proxy: SocketAddr, auth: &str, target: &str) -> TcpStream {
    let mut s = connected(proxy, auth, target).await;
    echoes(&mut s).await.expect("the tunnel echoes");
    s
}

/// Open a WebSocket through the egress proxy (`ws://authority/ws`) and check
/// it echoes.
async fn open_websocket(
    proxy: SocketAddr,
    auth: &str,
    authority: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let request = format!(
        "GET http://{authority}/ws HTTP/1.1\r\nhost: {authority}\r\nproxy-authorization: {auth}\r\n\
         connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let head = String::from_utf8(read_head(&mut s).await).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws
}

async fn echoes(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    Ok(())
}

/// A change that forbids a destination closes the open tunnels to it within a
/// second, on the replica's notification alone; tunnels elsewhere stay open,
/// and new requests are refused.
#[tokio::test]
async fn a_tightening_closes_open_tunnels_to_what_it_forbids_within_a_second() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let echo = Recorder::start("127.0.0.1").await;
    let port = echo.addr.port();
    let origin = Origin::start().await;
    let (live, _) = policy(&db, "live", "enforce", "allow", &[]).await;
    assign_to_plan(&db, f.plan, live).await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![port];
    // Long idle limits: only the policy may end these tunnels.
    config.proxy.egress.tunnel_idle_timeout = Duration::from_secs(120);
    let (seams, _) = seams(&[("doomed.test", "127.0.0.1"), ("kept.test", "127.0.0.1")]);
    let proxy = TestProxy::start_with(config, seams).await;
    let auth = f.basic();
    let mut doomed = open_tunnel(proxy.egress, &auth, &format!("doomed.test:{port}")).await;
    let mut kept = open_tunnel(proxy.egress, &auth, &format!("kept.test:{port}")).await;
    let mut unrelated_ip = open_tunnel(proxy.egress, &auth, &format!("127.0.0.1:{port}")).await;
    let mut ws = open_websocket(
        proxy.egress,
        &auth,
        &format!("doomed.test:{}", origin.addr.port()),
    )
    .await;

    add_rule(&db, live, "deny", Some("doomed.test"), None, None).await;
    let changed = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), doomed.read(&mut buf)).await;
    let took = changed.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the forbidden tunnel is still open: {closed:?}"
    );
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    eprintln!("the forbidden tunnel closed {took:?} after the change was committed");
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let took = changed.elapsed();
    assert!(
        matches!(ended, Ok(None) | Ok(Some(Err(_)))),
        "the forbidden WebSocket is still open: {ended:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "WebSocket closed after {took:?}"
    );
    echoes(&mut kept)
        .await
        .expect("a tunnel to an allowed name stays open");
    echoes(&mut unrelated_ip)
        .await
        .expect("a tunnel by address stays open");
    let (status, head, _) = connect(proxy.egress, &auth, &format!("doomed.test:{port}")).await;
    assert_eq!(
        (status, deny_reason(&head).as_deref()),
        (403, Some("policy_rule"))
    );

    // A CIDR rule closes the tunnel opened by address too.
    add_rule(
        &db,
        live,
        "deny",
        None,
        Some("127.0.0.1/32"),
        Some(vec![i32::from(port)]),
    )
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), unrelated_ip.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let cuts = support::counter(
        "tollgate_egress_policy_cuts_total",
        &[("reason", "policy_changed")],
    );
    assert!(cuts >= 2, "{cuts} tunnels counted as closed by a change");
    proxy.stop().await;
}

/// A TLS client's ClientHello through a tunnel, naming `sni`. Returns whether
/// the hello reached the origin (each call names a host the others do not).
async fn hello_through(
    proxy: SocketAddr,
    auth: &str,
    target: &str,
    sni: &str,
    origin: &Recorder,
) -> bool {
    let s = connected(proxy, auth, target).await;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // The origin echoes, so the handshake fails either way: what matters is
    // whether the hello got there.
    // It ends when the echo comes back (the origin had the hello) or when the
    // proxy closes the tunnel (it never passed it on).
    let _ = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, s)).await;
    let data = origin.data.lock().unwrap();
    data.windows(sni.len()).any(|w| w == sni.as_bytes())
}

/// Domain fronting: a tunnel to an allowed name whose ClientHello names a host
/// the policy refuses is closed before a byte reaches the origin; the same
/// tunnel with an allowed SNI passes. A tunnel by bare IP is held to its SNI too.
#[tokio::test]
async fn a_client_hello_naming_a_refused_host_is_refused() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Recorder::start("127.0.0.1").await;
    let port = origin.addr.port();
    let (fronting, _) = policy(
        &db,
        "fronting",
        "enforce",
        "deny",
        &[
            ("allow", Some("*.allowed.test"), None, None),
            ("deny", Some("blocked.allowed.test"), None, None),
        ],
    )
    .await;
    assign_to_plan(&db, f.plan, fronting).await;
    let mut config = test_config(&db.url);
    let log = log_decisions(&mut config);
    config.proxy.egress.connect_ports = vec![port];
    let (seams, _) = seams(&[("front.allowed.test", "127.0.0.1")]);
    let proxy = TestProxy::start_with(config, seams).await;
    let auth = f.basic();
    let by_name = format!("front.allowed.test:{port}");
    assert!(hello_through(proxy.egress, &auth, &by_name, "front.allowed.test", &origin).await);
    assert!(hello_through(proxy.egress, &auth, &by_name, "other.allowed.test", &origin).await);
    assert!(
        !hello_through(
            proxy.egress,
            &auth,
            &by_name,
            "blocked.allowed.test",
            &origin
        )
        .await
    );
    assert!(!hello_through(proxy.egress, &auth, &by_name, "evil.example", &origin).await);
    assert!(
        !hello_through(
            proxy.egress,
            &auth,
            &by_name,
            "blocked.allowed.test",
            &origin
        )
        .await
    );
    // By address: once an address rule lets the tunnel open, its SNI is still
    // judged (with that address: a name at an allowed address is allowed, a
    // denied name is not).
    let by_ip = format!("127.0.0.1:{port}");
    add_rule(&db, fronting, "allow", None, Some("127.0.0.1/32"), None).await;
    eventually(
        Duration::from_secs(5),
        "the address rule is in force",
        || async {
            let (status, _, _) = connect(proxy.egress, &auth, &by_ip).await;
            holds(status == 200, status)
        },
    )
    .await;
    assert!(!hello_through(proxy.egress, &auth, &by_ip, "blocked.allowed.test", &origin).await);
    assert!(hello_through(proxy.egress, &auth, &by_ip, "x.allowed.test", &origin).await);
    assert!(support::counter("tollgate_egress_policy_cuts_total", &[("reason", "sni")]) >= 3);
    let refused = serde_json::json!({"ended": "forbidden", "deny_reason": "sni_denied", "policy_mode": "enforce"});
    let lines = decisions(&log, refused, 4).await;
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 200 && l["bytes_up"] == 0),
        "a refused hello was passed on: {lines:?}"
    );
    proxy.stop().await;
}

/// A destination a plan keeps open while its user is blocked cannot carry
/// another host: the tunnel's ClientHello must name an open destination too.
#[tokio::test]
async fn a_tunnel_to_an_open_destination_cannot_front_another_host() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Recorder::start("127.0.0.1").await;
    let port = origin.addr.port();
    sqlx::query(
        "INSERT INTO plan_open_destinations (plan_id, host) VALUES ($1, 'topup.platform.test')",
    )
    .bind(f.plan)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![port];
    let (seams, _) = seams(&[("topup.platform.test", "127.0.0.1")]);
    let proxy = TestProxy::start_with(config, seams).await;
    let auth = f.basic();
    db.publish_block(f.user, tollgate_core::billing::BlockReason::BudgetExhausted)
        .await;
    let by_ip = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "the block in force", || async {
        let (status, _, _) = connect(proxy.egress, &auth, &by_ip).await;
        holds(status == 403, status)
    })
    .await;
    let open = format!("topup.platform.test:{port}");
    assert!(hello_through(proxy.egress, &auth, &open, "topup.platform.test", &origin).await);
    assert!(!hello_through(proxy.egress, &auth, &open, "fronted.example", &origin).await);
    proxy.stop().await;
}
