//! The egress forward proxy end to end: real PostgreSQL, real sockets, real
//! clients (curl, reqwest, raw TCP), a real origin on loopback.

mod support;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::client::{
    self, assert_refused_both_ways, basic, exchange, get_request, post_request, tunnel,
    tunnel_sending_early,
};
use support::hostile::{loopback_seams, LoopbackOnlyDialer};
use support::origin::{body_sum, pattern, tls_files, tls_server_config_from, EchoServer, Origin};
use support::proxy::{http_get, temp_dir, test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::TestDb;
use tollgate_proxy::Seams;

/// A database with one agent, an origin, and a proxy with the test config.
struct Setup {
    db: TestDb,
    f: support::Fixture,
    origin: Origin,
    proxy: TestProxy,
}

async fn setup() -> Setup {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let proxy = TestProxy::start(test_config(&db.url)).await;
    Setup {
        db,
        f,
        origin,
        proxy,
    }
}

/// As [`setup`], for an agent on `provider`, with an echo server that CONNECT
/// may reach (its port is the only one allowed).
async fn setup_with_echo(provider: &str) -> (Setup, EchoServer) {
    let db = TestDb::new().await;
    let f = db.fixture(provider).await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let proxy = TestProxy::start(config).await;
    let setup = Setup {
        db,
        f,
        origin,
        proxy,
    };
    (setup, echo)
}

/// Run curl without blocking the runtime the proxy under test shares.
async fn curl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("run curl")
}

fn reqwest_client(proxy_url: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy_url).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn curl_and_reqwest_requests_arrive_intact_without_hop_by_hop_headers() {
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let proxy_url = proxy.proxy_url(f.agent, &f.token);

    // curl GET with a query string, custom headers and hop-by-hop headers.
    let out = curl(&[
        "-x",
        &proxy_url,
        "-H",
        "X-Custom: kept",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: dropped",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        &origin.url("/echo/path?a=1&b=two%20words&a=3"),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/path");
    assert_eq!(echo["query"], "a=1&b=two%20words&a=3");
    assert_eq!(echo["headers"]["x-custom"][0], "kept");
    assert_eq!(echo["headers"]["host"][0], origin.addr.to_string());
    for hop in [
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "keep-alive",
        "te",
        "connection",
    ] {
        assert!(
            echo["headers"].get(hop).is_none(),
            "{hop} reached the origin: {echo}"
        );
    }

    // Response hop-by-hop headers stay on the origin's hop.
    let out = curl(&[
        "-x",
        &proxy_url,
        "-D",
        "-",
        "-o",
        "/dev/null",
        &origin.url("/hop-response"),
    ])
    .await;
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("x-end-to-end: 1"), "{head}");
    for hop in ["x-resp-hop", "keep-alive:", "proxy-authenticate"] {
        assert!(!head.contains(hop), "{hop} reached the client: {head}");
    }

    // reqwest POST and PUT with bodies; a chunked (streamed) upload.
    let http = reqwest_client(&proxy_url);
    let body = b"{\"hello\":\"world\"}".to_vec();
    let echo: Value = http
        .post(origin.url("/echo/post?x=1"))
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body_len"].as_u64()),
        (Some("POST"), Some(body.len() as u64))
    );
    assert_eq!(echo["body_sum"].as_u64(), Some(body_sum(&body)));
    let echo: Value = http
        .put(origin.url("/echo/put"))
        .body("replace")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body_len"].as_u64()),
        (Some("PUT"), Some(7))
    );

    let chunks: Vec<Result<Vec<u8>, io::Error>> =
        (0..50).map(|i| Ok(vec![i as u8; 1000])).collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let echo: Value = http
        .post(origin.url("/echo/chunked"))
        .body(streamed)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(50_000));
    assert_eq!(echo["headers"]["transfer-encoding"][0], "chunked");

    // A chunked response arrives whole.
    let bytes = http
        .get(origin.url("/chunked/300000"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len(), 300_000);
    assert!(bytes
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64)));
    proxy.stop().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_the_body_forwarded() {
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let dir = temp_dir("upload");
    let file = dir.join("body.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let out = curl(&[
        "-v",
        "-x",
        &proxy.proxy_url(f.agent, &f.token),
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        &origin.url("/echo/upload"),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "{stderr}");
    let echo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(100_000));
    assert!(
        echo["headers"].get("expect").is_none(),
        "the expectation was met on the proxy's hop"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connect_carries_https_to_a_local_tls_origin() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let (tls, _) = tls_files("connect-origin");
    let origin = Origin::start_tls(tls_server_config_from(&tls, &[b"http/1.1"])).await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![origin.addr.port()];
    let proxy = TestProxy::start(config).await;
    let url = format!("https://localhost:{}/echo/secure?q=1", origin.addr.port());
    let out = curl(&[
        "-x",
        &proxy.proxy_url(f.agent, &f.token),
        "--cacert",
        tls.cert.to_str().unwrap(),
        &url,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echo["path"], "/echo/secure");
    assert_eq!(echo["query"], "q=1");
    // The whole tunnel (TLS included) is counted: at least what the origin moved.
    let (origin_read, origin_written) = origin.socket_bytes();
    eventually(
        Duration::from_secs(10),
        format!("tunnel bytes counted: rx >= {origin_written}, tx >= {origin_read}"),
        || async {
            let (rx, tx, _) = db.usage(f.vps).await;
            holds(
                rx as u64 >= origin_written && tx as u64 >= origin_read,
                (rx, tx),
            )
        },
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn database_counts_equal_the_bytes_each_client_moved_over_many_connections() {
    let (
        Setup {
            db,
            f,
            origin,
            proxy,
        },
        echo,
    ) = setup_with_echo("hetzner").await;
    let auth = f.basic();

    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let (auth, proxy_addr) = (auth.clone(), proxy.egress);
        let (origin_url, echo_addr) = (origin.url(""), echo.addr);
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => {
                    exchange(
                        proxy_addr,
                        &get_request(&format!("{origin_url}/bytes/{}", 1000 + i * 7919), &auth),
                    )
                    .await
                }
                1 => {
                    exchange(
                        proxy_addr,
                        &post_request(
                            &format!("{origin_url}/echo/p"),
                            &auth,
                            &vec![b'x'; (i * 3001) as usize],
                        ),
                    )
                    .await
                }
                2 => {
                    exchange(
                        proxy_addr,
                        &get_request(&format!("{origin_url}/chunked/{}", i * 10_007), &auth),
                    )
                    .await
                }
                _ => {
                    // Every other tunnel starts sending before the 200 arrives.
                    let early = vec![b'e'; (i / 4 % 2 * 300) as usize];
                    let payload = vec![b'y'; (i * 12_345) as usize];
                    let ex = tunnel_sending_early(
                        proxy_addr,
                        &auth,
                        &echo_addr.to_string(),
                        &early,
                        &payload,
                    )
                    .await;
                    assert!(
                        ex.body == [early, payload].concat(),
                        "tunnel {i} echo differs"
                    );
                    ex
                }
            }
        }));
    }
    let (mut written, mut read) = (0u64, 0u64);
    for t in tasks {
        let ex = t.await.unwrap();
        assert_eq!(ex.status, 200, "{}", ex.head);
        written += ex.written;
        read += ex.read;
    }
    // rx = what the VPS received = what the client read; tx = what it wrote.
    db.expect_usage(f.vps, read, written, Duration::from_secs(10))
        .await;
    proxy.stop().await;
    db.assert_usage(f.vps, read, written).await;
}

/// A bulk tunnel moves socket to socket inside the kernel (splice), including
/// the one whose client sent bytes before the 200: every byte arrives, and the
/// database holds exactly the bytes the client moved.
#[tokio::test]
async fn bulk_tunnels_are_spliced_and_counted_to_the_byte() {
    let (Setup { db, f, proxy, .. }, echo) = setup_with_echo("hetzner").await;
    let spliced = || async {
        let text = support::hostile_load::metrics(proxy.admin).await;
        support::hostile_load::metric(&text, "tollgate_spliced_bytes_total{listener=\"egress\"}")
    };
    let before = spliced().await;
    let payload: Vec<u8> = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut written) = (0, 0);
    for early in [&b""[..], b"\x16\x03\x01 sent before the 200"] {
        let ex = tunnel_sending_early(
            proxy.egress,
            &f.basic(),
            &echo.addr.to_string(),
            early,
            &payload,
        )
        .await;
        assert_eq!(ex.status, 200, "{}", ex.head);
        assert!(ex.body == [early, &payload].concat(), "the echo differs");
        (read, written) = (read + ex.read, written + ex.written);
    }
    // Both ways, two tunnels: most of 64 MB moved without a copy (counted
    // when each relay ends, just after its client has read the last byte).
    eventually(PROMPTLY, "32 MB of 64 spliced", || async {
        let moved = spliced().await - before;
        match moved >= 32e6 {
            true => Ok(()),
            false => Err(moved),
        }
    })
    .await;
    db.expect_usage(f.vps, read, written, Duration::from_secs(10))
        .await;
    proxy.stop().await;
    db.assert_usage(f.vps, read, written).await;
}

#[tokio::test]
async fn bad_credentials_get_407_and_count_nothing() {
    let Setup {
        db,
        f,
        origin,
        proxy,
    } = setup().await;
    let url = origin.url("/echo");
    let id = f.agent;
    let b64 = |s: String| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("scheme", Some(format!("Bearer {}", f.token))),
        ("malformed", Some("Basic %%%not-base64%%%".into())),
        (
            "malformed",
            Some(format!("Basic {}", b64(format!("{id}{}", f.token)))),
        ),
        (
            "malformed",
            Some(format!("Basic {}", b64(format!("agent-7:{}", f.token)))),
        ),
        // Unknown agents and wrong tokens get one answer: no probing for ids.
        (
            "invalid_credentials",
            Some(basic(uuid::Uuid::new_v4(), &f.token)),
        ),
        ("invalid_credentials", Some(basic(id, &"0".repeat(64)))),
        ("invalid_credentials", Some(basic(id, &f.token[..63]))),
    ];
    for (reason, auth) in cases {
        let mut req = format!(
            "GET {url} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            origin.addr
        );
        if let Some(a) = &auth {
            req.push_str(&format!("proxy-authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        let ex = exchange(proxy.egress, req.as_bytes()).await;
        assert_eq!(ex.status, 407, "{reason}: {}", ex.head);
        assert_eq!(
            ex.header("proxy-authenticate").as_deref(),
            Some("Basic realm=\"tollgate\""),
            "{reason}"
        );
        let body: Value = serde_json::from_slice(&ex.body).unwrap();
        assert_eq!(body["reason"], reason);
    }
    assert_eq!(origin.connections(), 0, "no request reached the origin");
    // Unauthenticated bytes are not counted to anyone: once the proxy has stopped
    // (its final flush written), the VPS shows exactly one good request after them.
    let good = exchange(proxy.egress, &get_request(&url, &f.basic())).await;
    assert_eq!(good.status, 200, "{}", good.head);
    db.expect_usage(f.vps, good.read, good.written, Duration::from_secs(10))
        .await;
    proxy.stop().await;
    db.assert_usage(f.vps, good.read, good.written).await;
}

#[tokio::test]
async fn a_connection_belongs_to_its_first_agent() {
    let db = TestDb::new().await;
    let a = db.fixture("fly").await;
    let b = db.fixture("fly").await;
    let origin = Origin::start().await;
    let proxy = TestProxy::start(test_config(&db.url)).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    let request = |auth: &str| {
        format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {auth}\r\n\r\n",
            origin.url("/status/204"),
            origin.addr
        )
    };
    s.write_all(request(&a.basic()).as_bytes()).await.unwrap();
    let head = String::from_utf8(client::read_head(&mut s).await).unwrap();
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    // Valid credentials of another agent on the same connection: 407 and closed.
    s.write_all(request(&b.basic()).as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("connection closed")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 407"), "{text}");
    assert!(text.contains("other_agent"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_rotated_or_deleted_token_stops_working_promptly() {
    let Setup {
        db,
        f,
        origin,
        proxy,
    } = setup().await;
    let url = origin.url("/status/204");
    assert_eq!(
        exchange(proxy.egress, &get_request(&url, &f.basic()))
            .await
            .status,
        204
    );

    let new_token = "c".repeat(64);
    db.set_token(f.agent, &new_token).await;
    let rotated = Instant::now();
    let old = f.basic();
    eventually(PROMPTLY, "the old token refused with 407", || async {
        let status = exchange(proxy.egress, &get_request(&url, &old))
            .await
            .status;
        holds(status == 407, status)
    })
    .await;
    println!(
        "old token refused {:?} after the rotation",
        rotated.elapsed()
    );
    assert_eq!(
        exchange(
            proxy.egress,
            &get_request(&url, &basic(f.agent, &new_token))
        )
        .await
        .status,
        204
    );

    // A deleted agent stops working too.
    sqlx::query("DELETE FROM agents WHERE id = $1")
        .bind(f.agent)
        .execute(&db.pool)
        .await
        .unwrap();
    let deleted = Instant::now();
    let auth = basic(f.agent, &new_token);
    eventually(PROMPTLY, "the deleted agent refused with 407", || async {
        let status = exchange(proxy.egress, &get_request(&url, &auth))
            .await
            .status;
        holds(status == 407, status)
    })
    .await;
    println!(
        "deleted agent refused {:?} after the delete",
        deleted.elapsed()
    );
    proxy.stop().await;
}

fn ssrf_seams(dialer: Arc<LoopbackOnlyDialer>) -> Seams {
    let table = HashMap::from([
        (
            "localhost",
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        ),
        ("internal.example", vec!["10.1.2.3".parse().unwrap()]),
        (
            "mixed.example",
            vec![
                "93.184.216.34".parse().unwrap(),
                "192.168.7.7".parse().unwrap(),
            ],
        ),
        ("metadata.example", vec!["169.254.169.254".parse().unwrap()]),
        ("loopback6.example", vec!["::1".parse().unwrap()]),
    ]);
    loopback_seams(table, dialer)
}

#[tokio::test]
async fn ssrf_destinations_are_refused_for_http_and_connect_without_dialing() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let mut config = test_config(&db.url);
    config.proxy.egress.allow_cidrs.clear();
    config.proxy.egress.connect_ports = vec![443, 80];
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy = TestProxy::start_with(config, ssrf_seams(dialer.clone())).await;
    let auth = f.basic();
    let table = [
        ("localhost", "loopback"),
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("2130706433", "loopback"),
        ("0x7f.0.0.1", "loopback"),
        ("0177.0.0.1", "loopback"),
        ("127.1", "loopback"),
        ("169.254.169.254", "link_local"),
        ("metadata.example", "link_local"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.5.4", "private"),
        ("100.64.0.1", "shared_address_space"),
        ("0.0.0.0", "unspecified"),
        ("[fd00::1]", "unique_local"),
        ("[fe80::1]", "link_local"),
        ("[64:ff9b::a00:1]", "private"),
        ("internal.example", "private"),
        ("mixed.example", "private"),
        ("loopback6.example", "loopback"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.10", "documentation"),
    ];
    for (host, reason) in table {
        assert_refused_both_ways(proxy.egress, &auth, host, reason).await;
    }
    // CONNECT to a port outside the allowlist, even for an otherwise fine host.
    for target in ["localhost:22", "8.8.8.8:25", "example.com:8443"] {
        let t = tunnel(proxy.egress, &auth, target, b"").await;
        assert_eq!(t.status, 403, "{target}");
        assert_eq!(
            t.header("x-tollgate-deny-reason").as_deref(),
            Some("port_not_allowed"),
            "{target}"
        );
    }
    assert!(
        dialer.attempts().is_empty(),
        "refused destinations were dialed: {:?}",
        dialer.0.lock().unwrap()
    );
    // Refusals are counted in metrics.
    let (_, metrics) = http_get(proxy.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("tollgate_egress_denials_total{reason=\"loopback\"}"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_allowlisted_cidr_is_reached() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy = TestProxy::start_with(config, ssrf_seams(dialer.clone())).await;
    let ok = exchange(
        proxy.egress,
        &get_request(&origin.url("/status/204"), &f.basic()),
    )
    .await;
    assert_eq!(ok.status, 204, "{}", ok.head);
    let t = tunnel(proxy.egress, &f.basic(), &echo.addr.to_string(), b"hello").await;
    assert_eq!((t.status, t.body.as_slice()), (200, &b"hello"[..]));
    // [::1] is not in the allowlist: still refused.
    let v6 = exchange(
        proxy.egress,
        &get_request(&format!("http://[::1]:{}/", origin.addr.port()), &f.basic()),
    )
    .await;
    assert_eq!(v6.status, 403);
    assert_eq!(dialer.0.lock().unwrap().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_proxy_keeps_serving() {
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let auth = f.basic();
    let url = origin.url("/echo");
    let host = origin.addr;
    let huge = "a".repeat(70 * 1024);
    let cases: Vec<(u16, String)> = vec![
        (431, format!("GET {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\nx-big: {huge}\r\n\r\n")),
        (400, format!(
            "POST {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )),
        (400, "HELLO THERE\r\n\r\n".into()),
        (400, "\x16\x03\x01\x02\x00garbage\r\n\r\n".into()),
        (400, format!("CONNECT nowhere HTTP/1.1\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("CONNECT :443 HTTP/1.1\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("CONNECT user@example.com:443 HTTP/1.1\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("CONNECT example.com:0 HTTP/1.1\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("GET http://user:pw@{host}/echo HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("GET /echo HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("GET https://{host}/echo HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\n\r\n")),
        (400, format!("GET http://exa%mple.com/ HTTP/1.1\r\nhost: x\r\nproxy-authorization: {auth}\r\n\r\n")),
    ];
    for (status, request) in &cases {
        let ex = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(proxy.egress, request.as_bytes()),
        )
        .await
        .expect("answered, not hung");
        assert_eq!(
            ex.status,
            *status,
            "{:?} -> {}",
            &request[..request.len().min(60)],
            ex.head
        );
        // And a good request right after.
        let good = exchange(proxy.egress, &get_request(&url, &auth)).await;
        assert_eq!(good.status, 200);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let db = TestDb::new().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.header_read_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(config).await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    // Well before the default 30 s: the configured 300 ms cut it off.
    let _ = tokio::time::timeout(PROMPTLY, s.read_to_end(&mut rest))
        .await
        .expect("closed by the header read timeout");
    println!("slow head cut off after {:?}", started.elapsed());
    proxy.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let db = TestDb::new().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.max_connections = 2;
    let proxy = TestProxy::start(config).await;
    let _a = TcpStream::connect(proxy.egress).await.unwrap();
    let _b = TcpStream::connect(proxy.egress).await.unwrap();
    // Until the proxy has accepted both, a third connection may still be served.
    let ex = eventually(
        Duration::from_secs(10),
        "a third connection refused with 503",
        || async {
            let ex = exchange(
                proxy.egress,
                b"GET http://127.0.0.1/ HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await;
            holds(ex.status == 503, ex)
        },
    )
    .await;
    let body: Value = serde_json::from_slice(&ex.body).unwrap();
    assert_eq!(body["reason"], "connections");
    proxy.stop().await;
}

#[tokio::test]
async fn blocked_users_get_403_json_and_their_tunnels_close() {
    let (
        Setup {
            db,
            f,
            origin,
            proxy,
        },
        echo,
    ) = setup_with_echo("fly").await;
    assert_eq!(
        exchange(
            proxy.egress,
            &get_request(&origin.url("/status/204"), &f.basic())
        )
        .await
        .status,
        204
    );

    // An open tunnel, then a block published from elsewhere (e.g. the monitor).
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    s.write_all(
        format!(
            "CONNECT {} HTTP/1.1\r\nproxy-authorization: {}\r\n\r\n",
            echo.addr,
            f.basic()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(String::from_utf8(client::read_head(&mut s).await)
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();

    let period = tollgate_core::billing::Period::current();
    db.publish_block(f.user, tollgate_core::billing::BlockReason::Bandwidth)
        .await;
    let published = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(PROMPTLY, s.read_to_end(&mut rest))
        .await
        .expect("tunnel closed by the block")
        .ok();
    let closed_after = published.elapsed();

    let ex = exchange(
        proxy.egress,
        &get_request(&origin.url("/status/204"), &f.basic()),
    )
    .await;
    assert_eq!(ex.status, 403, "{}", ex.head);
    let body: Value = serde_json::from_slice(&ex.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "usage_blocked", "reason": "bandwidth", "period": period.start().to_string()})
    );
    println!("tunnel closed {closed_after:?} after the decision was published");

    // A user without a plan is blocked from the first request.
    let nobody = db.user("noplan@example.com", None).await;
    let vps = db.vps(nobody, "fly", "127.0.0.1", "running").await;
    let (agent, token) = db.agent(nobody, Some(vps)).await;
    let ex = exchange(
        proxy.egress,
        &get_request(&origin.url("/status/204"), &basic(agent, &token)),
    )
    .await;
    assert_eq!(ex.status, 403);
    assert!(ex.body_text().contains("no_plan"), "{}", ex.body_text());
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_are_relayed_over_plain_http() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let mut s = TcpStream::connect(proxy.egress).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nproxy-authorization: {}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        origin.url("/ws"),
        origin.addr,
        f.basic()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let head = String::from_utf8(client::read_head(&mut s).await).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().len(), 100_000);
    ws.close(None).await.unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn keep_alive_clients_reuse_pooled_origin_connections() {
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let http = reqwest_client(&proxy.proxy_url(f.agent, &f.token));
    for i in 0..100 {
        let r = http
            .get(origin.url(&format!("/echo/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert!(
        origin.connections() <= 3,
        "{} origin connections for 100 requests",
        origin.connections()
    );
    proxy.stop().await;
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let Setup {
        f, origin, proxy, ..
    } = setup().await;
    let (status, before) = http_get(proxy.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for _ in 0..5 {
        assert_eq!(
            exchange(
                proxy.egress,
                &get_request(&origin.url("/bytes/300000"), &f.basic())
            )
            .await
            .status,
            200
        );
    }
    exchange(proxy.egress, &get_request(&origin.url("/x"), "Basic nope")).await;
    let ok = "tollgate_requests_total{listener=\"egress\",outcome=\"ok\"}";
    let rx = "tollgate_bytes_total{listener=\"egress\",direction=\"rx\"}";
    let rows = "tollgate_flush_rows_total";
    let auth = "tollgate_auth_failures_total{listener=\"egress\",reason=\"malformed\"}";
    let moved = |after: &str, name: &str| metric(after, name) - metric(&before, name);
    eventually(
        Duration::from_secs(10),
        "metrics moved by 5 requests, 1.5 MB received, a flush and an auth failure",
        || async {
            let (_, after) = http_get(proxy.admin, "/metrics").await.unwrap();
            let seen = (
                moved(&after, ok),
                moved(&after, rx),
                moved(&after, rows),
                moved(&after, auth),
                after.contains("tollgate_flush_duration_seconds_bucket"),
            );
            holds(
                seen.0 >= 5.0 && seen.1 >= 1_500_000.0 && seen.2 > 0.0 && seen.3 >= 1.0 && seen.4,
                seen,
            )
        },
    )
    .await;
    let (status, _) = http_get(proxy.admin, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn https_proxy_urls_are_served_over_tls_and_counted_on_the_encrypted_socket() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let (tls, _) = tls_files("egress-tls");
    let mut config = test_config(&db.url);
    config.proxy.egress.tls = Some(tls.clone());
    let proxy = TestProxy::start(config).await;
    let proxy_url = format!(
        "https://{}:{}@localhost:{}",
        f.agent,
        f.token,
        proxy.egress.port()
    );
    let out = curl(&[
        "-x",
        &proxy_url,
        "--proxy-cacert",
        tls.cert.to_str().unwrap(),
        &origin.url("/echo/over-tls?x=1"),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echo["query"], "x=1");
    assert!(echo["headers"].get("proxy-authorization").is_none());
    // The agent's socket carried TLS records: more than the plaintext the origin saw.
    let (origin_read, origin_written) = origin.socket_bytes();
    eventually(
        Duration::from_secs(10),
        format!("TLS bytes counted: rx > {origin_written}, tx > {origin_read}"),
        || async {
            let (rx, tx, _) = db.usage(f.vps).await;
            holds(
                rx as u64 > origin_written && tx as u64 > origin_read,
                (rx, tx),
            )
        },
    )
    .await;
    proxy.stop().await;
}
