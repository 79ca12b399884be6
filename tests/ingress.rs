//! The ingress gateway proxy end to end: real PostgreSQL, real sockets, real
//! clients (reqwest over HTTP/1.1 and HTTP/2, tokio-tungstenite, raw TCP) and the
//! demo gateway counting the bytes on its own sockets.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::hostile::HoldingRelay;
use support::origin::{body_sum, pattern, tls_files, Origin};
use support::proxy::{test_config, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};

struct Setup {
    db: TestDb,
    f: Fixture,
    gateway: Origin,
    proxy: TestProxy,
}

async fn setup() -> Setup {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let proxy = TestProxy::start(config).await;
    Setup {
        db,
        f,
        gateway,
        proxy,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!(
            "http://{}/agents/{}/gateway{path}",
            self.proxy.ingress.unwrap(),
            self.f.agent
        )
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.f.token)
    }

    /// Wait until the database shows exactly what the gateway's sockets moved.
    async fn expect_gateway_bytes_counted(&self) {
        let (read, written) = self.gateway.socket_bytes();
        // rx = received by the VPS (its gateway read it); tx = sent by it.
        self.db
            .expect_usage(self.f.vps, read, written, Duration::from_secs(10))
            .await;
    }

    /// Stop the proxy (its final flush written): the database still shows exactly
    /// what the gateway's sockets moved, nothing counted twice or late.
    async fn stop_and_recheck_gateway_bytes(self) {
        self.proxy.stop().await;
        let (read, written) = self.gateway.socket_bytes();
        self.db.assert_usage(self.f.vps, read, written).await;
    }
}

fn http1() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn http_requests_pass_path_query_headers_and_large_bodies_both_ways() {
    let s = setup().await;
    let http = http1();
    let r = http
        .get(s.url("/echo/a%2Fb/c?q=1&q=2&sp=%20x"))
        .header("authorization", s.bearer())
        .header("x-custom", "to-gateway")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["path"], "/echo/a%2Fb/c");
    assert_eq!(echo["query"], "q=1&q=2&sp=%20x");
    assert_eq!(echo["headers"]["x-custom"][0], "to-gateway");
    assert_eq!(
        echo["headers"]["authorization"][0],
        s.bearer(),
        "the gateway checks the same token"
    );
    assert_eq!(
        echo["headers"]["x-forwarded-for"][0],
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "http");
    assert_eq!(
        echo["headers"]["x-forwarded-host"][0],
        s.proxy.ingress.unwrap().to_string()
    );
    assert_eq!(echo["headers"]["host"][0], s.gateway.addr.to_string());

    // Response headers come back; hop-by-hop ones do not.
    let r = http
        .get(s.url("/hop-response"))
        .header("authorization", s.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-end-to-end"], "1");
    assert!(r.headers().get("x-resp-hop").is_none() && r.headers().get("keep-alive").is_none());

    // Large bodies, streamed both ways.
    let upload: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let echo: Value = http
        .post(s.url("/echo/upload?big=1"))
        .header("authorization", s.bearer())
        .body(upload.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["body_len"].as_u64(), Some(upload.len() as u64));
    assert_eq!(echo["body_sum"].as_u64(), Some(body_sum(&upload)));
    let n = 8 * 1024 * 1024 + 17;
    let body = http
        .get(s.url(&format!("/bytes/{n}")))
        .header("authorization", s.bearer())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), n);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64)));
    s.expect_gateway_bytes_counted().await;
    // Ingress traffic shows in the proxy's metrics.
    let (_, metrics) = support::proxy::http_get(s.proxy.admin, "/metrics")
        .await
        .unwrap();
    for series in [
        "tollgate_requests_total{listener=\"ingress\",outcome=\"ok\"}",
        "tollgate_bytes_total{listener=\"ingress\",direction=\"rx\"}",
        "tollgate_bytes_total{listener=\"ingress\",direction=\"tx\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
    s.stop_and_recheck_gateway_bytes().await;
}

#[tokio::test]
async fn server_sent_events_arrive_while_the_stream_is_still_open() {
    let s = setup().await;
    let started = Instant::now();
    let r = http1()
        .get(s.url("/sse/3/1000"))
        .header("authorization", s.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(
        String::from_utf8_lossy(&first).contains("data: tick 0"),
        "{first:?}"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let ended_at = started.elapsed();
    assert!(
        ended_at >= Duration::from_millis(2000),
        "the stream stayed open for all events"
    );
    // The gateway sends the events a second apart: the first one arrived while
    // the others were still to come, not all together at the end.
    assert!(
        ended_at - first_at >= Duration::from_millis(1000),
        "first event at {first_at:?}, stream ended at {ended_at:?}: the response was buffered"
    );
    assert!(String::from_utf8_lossy(&rest).contains("data: tick 2"));
    s.proxy.stop().await;
}

#[tokio::test]
async fn websocket_echo_text_binary_large_ping_and_clean_close_both_ways() {
    let s = setup().await;
    let url = s.url("/ws").replace("http://", "ws://");
    let connect = |url: String, bearer: String| async move {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", bearer.parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    let mut ws = connect(url.clone(), s.bearer()).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    let big: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &big[..]
    );
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
    // Client closes: the gateway answers the close.
    ws.close(None).await.unwrap();
    assert!(matches!(
        ws.next().await,
        Some(Ok(Message::Close(_))) | None
    ));

    // Gateway closes: the client sees the close frame and answers it.
    let mut ws = connect(url, s.bearer()).await;
    ws.send(Message::text("bye")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_)))));
    assert!(ws.next().await.is_none(), "closing handshake completed");
    // WebSocket payload and framing are counted exactly as the gateway's socket saw them.
    s.expect_gateway_bytes_counted().await;
    s.stop_and_recheck_gateway_bytes().await;
}

#[tokio::test]
async fn http2_clients_work_end_to_end() {
    let s = setup().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(s.url("/echo/h2?x=1"))
        .header("authorization", s.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/echo/h2"), Some("x=1"))
    );
    assert_eq!(
        echo["version"], "HTTP/1.1",
        "gateways are spoken to in HTTP/1.1"
    );
    // An HTTP/2 client names its host in `:authority`, not `Host`.
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        serde_json::json!([s.proxy.ingress.unwrap().to_string()])
    );
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        serde_json::json!(["127.0.0.1"])
    );
    // Cookies sent as separate HTTP/2 fields reach the gateway as one line
    // (RFC 9113 §8.2.3).
    let echo: Value = h2
        .get(s.url("/echo/cookies"))
        .header("authorization", s.bearer())
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["cookie"], serde_json::json!(["a=1; b=2"]));
    // Several concurrent streams on one connection.
    let requests = (0..20).map(|i| {
        let (h2, url, bearer) = (h2.clone(), s.url(&format!("/echo/post/{i}")), s.bearer());
        async move {
            let v: Value = h2
                .post(url)
                .header("authorization", bearer)
                .body(vec![1u8; i * 1000])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["body_len"].as_u64().unwrap()
        }
    });
    let lens = futures_util::future::join_all(requests).await;
    assert_eq!(lens, (0..20).map(|i| i * 1000).collect::<Vec<u64>>());
    s.expect_gateway_bytes_counted().await;
    s.stop_and_recheck_gateway_bytes().await;
}

#[tokio::test]
async fn tls_clients_negotiate_http2_with_alpn() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let gateway = Origin::start().await;
    let (tls, cert) = tls_files("ingress-tls");
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    config.proxy.ingress.tls = Some(tls);
    let proxy = TestProxy::start(config).await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/agents/{}/gateway/echo/tls",
        proxy.ingress.unwrap().port(),
        f.agent
    );
    let r = client
        .get(url)
        .header("authorization", format!("Bearer {}", f.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
    proxy.stop().await;
}

#[tokio::test]
async fn a_thousand_sequential_requests_use_a_handful_of_upstream_connections() {
    let s = setup().await;
    let http = http1();
    for i in 0..1000 {
        let r = http
            .get(s.url(&format!("/status/204?i={i}")))
            .header("authorization", s.bearer())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let connections = s.gateway.connections();
    println!("1000 requests over {connections} upstream connection(s)");
    assert!(
        connections <= 3,
        "{connections} upstream connections for 1000 sequential requests"
    );
    s.expect_gateway_bytes_counted().await;
    s.stop_and_recheck_gateway_bytes().await;
}

#[tokio::test]
async fn database_counts_equal_the_gateway_socket_bytes_under_concurrency() {
    let s = setup().await;
    let http = http1();
    let tasks = (0..30u64).map(|i| {
        let bearer = s.bearer();
        let req = match i % 3 {
            0 => http.get(s.url(&format!("/bytes/{}", 1000 + i * 12_345))),
            1 => http.get(s.url(&format!("/chunked/{}", i * 7_777))),
            _ => http
                .post(s.url("/echo/p"))
                .body(vec![b'z'; (i * 4099) as usize]),
        };
        async move {
            let r = req.header("authorization", bearer).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    });
    futures_util::future::join_all(tasks).await;
    s.expect_gateway_bytes_counted().await;
    s.stop_and_recheck_gateway_bytes().await;
}

#[tokio::test]
async fn failures_map_to_401_404_503_502_and_504() {
    let s = setup().await;
    let http = http1();
    let other = s.db.fixture("k8s").await;
    let status = |req: reqwest::RequestBuilder| async move { req.send().await.unwrap() };

    // Authentication.
    for (auth, reason) in [
        (None, "missing"),
        (Some(format!("Basic {}", s.f.token)), "scheme"),
        (
            Some("Bearer ".to_owned() + &"0".repeat(64)),
            "invalid_credentials",
        ),
        // Another agent's token.
        (
            Some(format!("Bearer {}", other.token)),
            "invalid_credentials",
        ),
    ] {
        let mut req = http.get(s.url("/echo"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = status(req).await;
        assert_eq!(r.status(), 401, "{reason}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"tollgate\"");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], reason);
    }
    let unknown = format!(
        "http://{}/agents/{}/gateway/echo",
        s.proxy.ingress.unwrap(),
        uuid::Uuid::new_v4()
    );
    assert_eq!(
        status(http.get(unknown).header("authorization", s.bearer()))
            .await
            .status(),
        401
    );

    // Routes.
    for path in ["/", "/agents", "/agents/not-a-uuid/gateway/x", "/healthz"] {
        let url = format!("http://{}{path}", s.proxy.ingress.unwrap());
        assert_eq!(
            status(http.get(url).header("authorization", s.bearer()))
                .await
                .status(),
            404,
            "{path}"
        );
    }

    // An agent without a VPS -> 503.
    let (bare_agent, bare_token) = s.db.agent(s.f.user, None).await;
    let bare = format!(
        "http://{}/agents/{bare_agent}/gateway/echo",
        s.proxy.ingress.unwrap()
    );
    let r = status(
        http.get(bare)
            .header("authorization", format!("Bearer {bare_token}")),
    )
    .await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "vps_unavailable", "reason": "no_vps"})
    );

    // VPS stopped -> 503 with a reason.
    sqlx::query("UPDATE vpses SET state = 'stopped' WHERE id = $1")
        .bind(s.f.vps)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let r = eventually(PROMPTLY, "503 once the VPS is stopped", || async {
        let r = status(http.get(s.url("/echo")).header("authorization", s.bearer())).await;
        let code = r.status();
        holds(code == 503, r).map_err(|_| code)
    })
    .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "vps_unavailable", "reason": "vps_stopped"})
    );

    // Gateway down -> 502; gateway silent -> 504.
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down_port = down.local_addr().unwrap().port();
    drop(down);
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    for (port, expected) in [(down_port, 502), (silent_port, 504)] {
        let mut config = test_config(&s.db.url);
        config.proxy.ingress.gateway_port = port;
        config.proxy.ingress.response_timeout = Duration::from_millis(500);
        let proxy = TestProxy::start(config).await;
        let url = format!(
            "http://{}/agents/{}/gateway/echo",
            proxy.ingress.unwrap(),
            other.agent
        );
        let r = status(
            http.get(url)
                .header("authorization", format!("Bearer {}", other.token)),
        )
        .await;
        assert_eq!(r.status(), expected, "gateway port {port}");
        proxy.stop().await;
    }
    s.proxy.stop().await;
}

/// `response_timeout` is the gateway's own time, counted from when the request
/// goes out to it: a slow directory read before that (here held back for twice
/// the timeout) is not charged to the gateway as a 504.
#[tokio::test]
async fn the_response_timeout_counts_from_the_request_going_out() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let gateway = Origin::start().await;
    let relay = HoldingRelay::start(support::server_addr().await).await;
    let timeout = Duration::from_millis(400);
    let mut config = test_config(&relay.url_for(&db.url));
    config.proxy.ingress.gateway_port = gateway.addr.port();
    config.proxy.ingress.response_timeout = timeout;
    let proxy = TestProxy::start(config).await;

    // The directory's first read of the agent (its row carries the token).
    relay.hold_answers_containing(f.token.as_bytes());
    let url = format!(
        "http://{}/agents/{}/gateway/status/204",
        proxy.ingress.unwrap(),
        f.agent
    );
    let request = http1()
        .get(url)
        .header("authorization", format!("Bearer {}", f.token))
        .send();
    let sent = tokio::spawn(request);
    relay.wait_held(Duration::from_secs(10)).await;
    tokio::time::sleep(2 * timeout).await;
    relay.release();

    let response = sent.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        204,
        "the directory's wait was charged to the gateway"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn blocked_users_get_403_and_their_websockets_and_streams_close() {
    let s = setup().await;
    // An open WebSocket and an open SSE stream.
    let mut req = s
        .url("/ws")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", s.bearer().parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let mut sse = TcpStream::connect(s.proxy.ingress.unwrap()).await.unwrap();
    let path = format!("/agents/{}/gateway/sse/1000/100", s.f.agent);
    sse.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\r\n",
            s.bearer()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 64];
    let n = sse.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

    s.db.publish_block(
        s.f.user,
        tollgate_core::billing::BlockReason::BudgetExhausted,
    )
    .await;
    let published = Instant::now();

    let ws_closed = tokio::time::timeout(PROMPTLY, async {
        while let Some(Ok(_)) = ws.next().await {}
    });
    let sse_closed = tokio::time::timeout(PROMPTLY, async {
        let mut buf = vec![0u8; 4096];
        while sse.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let (a, b) = tokio::join!(ws_closed, sse_closed);
    assert!(
        a.is_ok(),
        "WebSocket still open {PROMPTLY:?} after the block"
    );
    assert!(
        b.is_ok(),
        "SSE stream still open {PROMPTLY:?} after the block"
    );
    println!(
        "WebSocket and SSE closed {:?} after the decision was published",
        published.elapsed()
    );

    let r = http1()
        .get(s.url("/echo"))
        .header("authorization", s.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "usage_blocked");
    assert_eq!(body["reason"], "budget_exhausted");
    s.proxy.stop().await;
}

/// A gateway the test scripts byte for byte: `/conflict` answers with two
/// different lengths, `/extra` with bytes past its length, `/cased` with
/// header names in mixed case, `/head` with the request head it got,
/// anything else with `ok`. Returns its port and how many connections it accepted.
async fn scripted_gateway() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let reply: &[u8] = if head.starts_with(b"GET /conflict ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc"
                    } else if head.starts_with(b"GET /extra ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabXYZ"
                    } else if head.starts_with(b"GET /cased ") {
                        CASED
                    } else if head.starts_with(b"GET /cased-hop ") {
                        b"HTTP/1.1 200 OK\r\nX-Gateway-Case: Kept\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
                    } else if head.starts_with(b"GET /head ") {
                        // The request's head as it arrived, then `ok`.
                        let mut echo = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                            head.len() + 2
                        )
                        .into_bytes();
                        echo.extend_from_slice(&head);
                        echo.extend_from_slice(b"ok");
                        if sock.write_all(&echo).await.is_err() {
                            return;
                        }
                        continue;
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if sock.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// A database with one agent, and a proxy whose ingress reaches the scripted
/// gateway; with how many connections the gateway accepted.
async fn behind_scripted_gateway() -> (
    TestDb,
    Fixture,
    TestProxy,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let (port, accepted) = scripted_gateway().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = port;
    let proxy = TestProxy::start(config).await;
    (db, f, proxy, accepted)
}

/// `/cased`'s response as the scripted gateway sends it.
const CASED: &[u8] = b"HTTP/1.1 200 OK\r\nX-Gateway-Case: Kept\r\nContent-Type: text/plain\r\nDate: Sat, 05 Dec 2026 03:00:00 GMT\r\nContent-Length: 2\r\n\r\nok";

/// Send `head` to `addr` and read until a response ending in `ok` is in.
async fn raw_exchange(addr: std::net::SocketAddr, head: String) -> String {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let read = async {
        while !(seen.ends_with(b"\r\n\r\nok")) {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response within 10 s");
    String::from_utf8(seen).unwrap()
}

#[tokio::test]
async fn a_clients_request_head_reaches_the_gateway_as_it_was_sent_but_for_what_the_proxy_owns() {
    let (_db, f, proxy, _) = behind_scripted_gateway().await;
    let addr = proxy.ingress.unwrap();
    let head = |version: &str| {
        format!(
            "GET /agents/{}/gateway/head HTTP/{version}\r\nHost: Client.Example\r\n\
             X-Mixed-Case: Value\r\nAuthorization: Bearer {}\r\nTE: trailers\r\n\
             Proxy-Authorization: Basic c2VjcmV0\r\nX-Forwarded-For: 203.0.113.9\r\n\
             X-Forwarded-Proto: gopher\r\nUser-Agent: raw\r\n\r\n",
            f.agent, f.token
        )
    };
    // What the gateway got: its request line and header lines.
    let got = |response: String| -> Vec<String> {
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let head = body.strip_suffix("\r\n\r\nok").expect("the echoed head");
        head.split("\r\n").map(str::to_owned).collect()
    };

    // The fast path: the client's lines in their order and case, but for
    // its Host (the gateway's instead), the hop-by-hop ones and the
    // X-Forwarded-* the proxy makes.
    let lines = got(raw_exchange(addr, head("1.1")).await);
    assert_eq!(lines[0], "GET /head HTTP/1.1");
    assert!(lines[1].starts_with("host: 127.0.0.1:"), "{lines:?}");
    assert_eq!(
        lines[2..],
        [
            "X-Mixed-Case: Value".to_owned(),
            format!("Authorization: Bearer {}", f.token),
            "User-Agent: raw".to_owned(),
            "x-forwarded-for: 203.0.113.9, 127.0.0.1".to_owned(),
            "x-forwarded-proto: http".to_owned(),
            "x-forwarded-host: Client.Example".to_owned(),
        ]
    );

    // hyper's path (an HTTP/1.0 client) sends the same headers.
    let lowercase = |lines: &[String]| -> Vec<String> {
        let mut lines: Vec<String> = lines.iter().map(|l| l.to_ascii_lowercase()).collect();
        lines.sort();
        lines
    };
    let by_hyper = got(raw_exchange(addr, head("1.0")).await);
    assert_eq!(lowercase(&by_hyper[1..]), lowercase(&lines[1..]));
    proxy.stop().await;
}

#[tokio::test]
async fn a_gateways_response_head_reaches_every_client_whole() {
    let (_db, f, proxy, _) = behind_scripted_gateway().await;
    let addr = proxy.ingress.unwrap();
    let head = |path: &str, version: &str| {
        format!(
            "GET /agents/{}/gateway{path} HTTP/{version}\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
            f.agent, f.token
        )
    };

    // An HTTP/1.1 client gets the gateway's lines as they came, names in
    // their case, its own date and length kept, nothing added but the
    // status line.
    let got = raw_exchange(addr, head("/cased", "1.1")).await;
    let sent = std::str::from_utf8(CASED).unwrap();
    let lines = &sent[sent.find("\r\n").unwrap()..];
    assert_eq!(got, format!("HTTP/1.1 200 OK{lines}"));

    // A client hyper serves (HTTP/1.0 here) gets the same headers.
    let got = raw_exchange(addr, head("/cased", "1.0"))
        .await
        .to_ascii_lowercase();
    for line in [
        "x-gateway-case: kept\r\n",
        "content-type: text/plain\r\n",
        "content-length: 2\r\n",
        "date: sat, 05 dec 2026 03:00:00 gmt\r\n",
    ] {
        assert!(got.contains(line), "{line:?} missing from {got:?}");
    }

    // So does an HTTP/2 client.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("http://{addr}/agents/{}/gateway/cased", f.agent);
    let r = h2
        .get(url)
        .header("authorization", format!("Bearer {}", f.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-gateway-case"], "Kept");
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.headers()["date"], "Sat, 05 Dec 2026 03:00:00 GMT");
    assert_eq!(r.text().await.unwrap(), "ok");

    // A hop-by-hop header among them: it is dropped, the rest pass.
    let got = raw_exchange(addr, head("/cased-hop", "1.1"))
        .await
        .to_ascii_lowercase();
    assert!(
        got.contains("x-gateway-case: kept\r\n") && got.contains("content-length: 2\r\n"),
        "{got:?}"
    );
    assert!(!got.contains("keep-alive"), "{got:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_gateway_that_breaks_framing_gets_502_and_its_connection_is_never_reused() {
    use std::sync::atomic::Ordering;
    let (_db, f, proxy, accepted) = behind_scripted_gateway().await;
    let http = http1();
    let get = |path: &str| {
        http.get(format!(
            "http://{}/agents/{}/gateway{path}",
            proxy.ingress.unwrap(),
            f.agent
        ))
        .header("authorization", format!("Bearer {}", f.token))
        .send()
    };

    // Healthy exchanges share one pooled connection.
    for _ in 0..2 {
        let r = get("/ok").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Two lengths that disagree: 502, and that connection is dropped.
    let r = get("/conflict").await.unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");

    // Bytes past the length: the client gets what the length said, and the
    // connection they arrived on carries nothing more.
    let r = get("/extra").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "2");
    assert_eq!(r.text().await.unwrap(), "ab");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let r = get("/ok").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "a connection with stray bytes on it was reused"
    );
    proxy.stop().await;
}
