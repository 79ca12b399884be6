//! The decision log end to end: real PostgreSQL, real sockets and clients, a
//! proxy writing its decision log to a file; one JSON line per request and per
//! tunnel, with exactly the fields an operator relies on and never a secret.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use support::client::{basic, exchange, get_request, post_request, tunnel};
use support::hostile::{loopback_seams, LoopbackOnlyDialer};
use support::origin::{EchoServer, Origin};
use support::proxy::{temp_dir, test_config, ProxyProcess, TestProxy};
use support::wait::{eventually, holds, PROMPTLY};
use support::{Fixture, TestDb};
use tollgate_core::config::{Config, DecisionLogSink};

/// A query string that must never reach the log unless asked for.
const SECRET_QUERY: &str = "sig=q7secretvalue";

fn with_file_log(mut config: Config, include_query: bool) -> (Config, PathBuf) {
    let path = temp_dir("decision-log").join("decisions.jsonl");
    let log = &mut config.proxy.decision_log;
    log.sink = DecisionLogSink::File;
    log.path = Some(path.clone());
    log.include_query = include_query;
    (config, path)
}

/// Every line of the log so far, parsed (each must be one JSON object).
fn read_lines(path: &Path) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            other => panic!("not a JSON object line: {l:?} ({other:?})"),
        })
        .collect()
}

/// Wait for the one line that has every field in `select` with those values.
async fn line_where(path: &Path, select: Value) -> Map<String, Value> {
    let select = select.as_object().unwrap().clone();
    eventually(
        PROMPTLY,
        format!("one decision line with {select:?} in {}", path.display()),
        || {
            let select = select.clone();
            async move {
                let all = read_lines(path);
                let found: Vec<_> = all
                    .iter()
                    .filter(|l| select.iter().all(|(k, v)| l.get(k) == Some(v)))
                    .cloned()
                    .collect();
                match found.as_slice() {
                    [one] => Ok(one.clone()),
                    _ => Err((found.len(), all)),
                }
            }
        },
    )
    .await
}

/// `line` has exactly these fields (besides `ts` and `duration_ms`, which are
/// checked for their form).
fn assert_fields(line: &Map<String, Value>, want: Value) {
    let mut line = line.clone();
    let ts = line.remove("ts").expect("ts");
    let ts = ts.as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(ts).expect("ts is RFC 3339");
    assert!(
        ts.ends_with('Z') && ts.len() == "2026-01-01T00:00:00.000Z".len(),
        "{ts}"
    );
    let age = chrono::Utc::now().signed_duration_since(parsed);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
        "{ts}"
    );
    let duration = line.remove("duration_ms").expect("duration_ms");
    assert!(duration.as_f64().is_some_and(|d| d >= 0.0), "{duration}");
    assert_eq!(Value::Object(line), want);
}

fn ids(f: &Fixture) -> Value {
    json!({
        "agent_id": f.agent.to_string(),
        "user_id": f.user.to_string(),
        "vps_id": f.vps.to_string(),
    })
}

/// `a` with the fields of `b` added.
fn merged(a: Value, b: Value) -> Value {
    let mut a = a.as_object().unwrap().clone();
    a.extend(b.as_object().unwrap().clone());
    Value::Object(a)
}

/// Nothing secret anywhere in the log: the token, the credentials as sent,
/// the query string.
fn assert_no_secrets(path: &Path, f: &Fixture, query_allowed: bool) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(!text.contains(&f.token), "the token is in the log");
    assert!(
        !text.contains(&f.token[..16]),
        "part of the token is in the log"
    );
    let credentials = basic(f.agent, &f.token);
    let encoded = credentials.trim_start_matches("Basic ");
    assert!(!text.contains(encoded), "the credentials are in the log");
    if !query_allowed {
        assert!(
            !text.contains("q7secretvalue"),
            "a query string is in the log"
        );
        assert!(!text.contains('?'), "a query string is in the log");
    }
}

#[tokio::test]
async fn every_egress_request_and_tunnel_leaves_one_line_with_its_facts() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let echo = EchoServer::start().await;
    let mut config = test_config(&db.url);
    config.proxy.egress.connect_ports = vec![echo.addr.port()];
    config.proxy.ingress.enabled = false;
    let (config, log) = with_file_log(config, false);
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    // A name the built-in list refuses by its address; never dialed.
    let table = HashMap::from([("internal.example", vec!["10.0.0.1".parse().unwrap()])]);
    let proxy = TestProxy::start_with(config, loopback_seams(table, dialer.clone())).await;
    let auth = f.basic();
    let (o_host, o_port) = (origin.addr.ip().to_string(), origin.addr.port());
    let o_addr = origin.addr.to_string();

    // A plain GET, with a query string that stays out of the log.
    let url = origin.url(&format!("/bytes/1000?{SECRET_QUERY}"));
    let get = exchange(proxy.egress, &get_request(&url, &auth)).await;
    assert_eq!(get.status, 200, "{}", get.head);
    assert_eq!(get.body.len(), 1000);
    let line = line_where(&log, json!({"path": "/bytes/1000"})).await;
    assert_fields(
        &line,
        merged(
            ids(&f),
            json!({
                "listener": "egress", "method": "GET",
                "host": o_host, "port": o_port, "addr": o_addr, "path": "/bytes/1000",
                "status": 200, "outcome": "ok", "ended": "complete",
                "bytes_up": 0, "bytes_down": 1000,
            }),
        ),
    );

    // A POST: its body up, the echo down.
    let body = vec![b'p'; 3001];
    let post = exchange(
        proxy.egress,
        &post_request(&origin.url("/echo/upload"), &auth, &body),
    )
    .await;
    assert_eq!(post.status, 200, "{}", post.head);
    let line = line_where(&log, json!({"method": "POST"})).await;
    assert_fields(
        &line,
        merged(
            ids(&f),
            json!({
                "listener": "egress", "method": "POST",
                "host": o_host, "port": o_port, "addr": o_addr, "path": "/echo/upload",
                "status": 200, "outcome": "ok", "ended": "complete",
                "bytes_up": 3001, "bytes_down": post.body.len(),
            }),
        ),
    );

    // A CONNECT tunnel: exactly the bytes each way, no path.
    let payload = vec![b't'; 54_321];
    let tunneled = tunnel(proxy.egress, &auth, &echo.addr.to_string(), &payload).await;
    assert_eq!(tunneled.status, 200, "{}", tunneled.head);
    assert_eq!(tunneled.body.len(), payload.len());
    let line = line_where(&log, json!({"method": "CONNECT", "status": 200})).await;
    assert_fields(
        &line,
        merged(
            ids(&f),
            json!({
                "listener": "egress", "method": "CONNECT",
                "host": echo.addr.ip().to_string(), "port": echo.addr.port(),
                "addr": echo.addr.to_string(),
                "status": 200, "outcome": "tunnel", "ended": "complete",
                "bytes_up": 54_321, "bytes_down": 54_321,
            }),
        ),
    );

    // Refused by the built-in list: the reason, enforced; nothing dialed.
    let refused = exchange(
        proxy.egress,
        &get_request(&format!("http://internal.example/x?{SECRET_QUERY}"), &auth),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.head);
    let line = line_where(&log, json!({"host": "internal.example"})).await;
    assert_fields(
        &line,
        merged(
            ids(&f),
            json!({
                "listener": "egress", "method": "GET",
                "host": "internal.example", "port": 80, "path": "/x",
                "status": 403, "outcome": "denied", "ended": "complete",
                "bytes_up": 0, "bytes_down": refused.body.len(),
                "deny_reason": "private", "policy_mode": "enforce",
            }),
        ),
    );
    assert!(
        dialer.attempts().iter().all(|a| a.ip().is_loopback()),
        "a refused destination was dialed: {:?}",
        dialer.attempts()
    );

    // Wrong credentials: 407, no agent.
    let wrong = exchange(
        proxy.egress,
        &get_request(&origin.url("/status/204"), &basic(f.agent, &"0".repeat(64))),
    )
    .await;
    assert_eq!(wrong.status, 407, "{}", wrong.head);
    let line = line_where(&log, json!({"status": 407})).await;
    assert_fields(
        &line,
        json!({
            "listener": "egress", "method": "GET",
            "host": o_host, "port": o_port, "path": "/status/204",
            "status": 407, "outcome": "auth_failed", "ended": "complete",
            "bytes_up": 0, "bytes_down": wrong.body.len(),
        }),
    );

    // Requests over pooled origin connections (opened by earlier exchanges)
    // still name the address they reached.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy.proxy_url(f.agent, &f.token)).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for i in 0..5 {
        let r = client
            .get(origin.url(&format!("/echo/pooled/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    for i in 0..5 {
        let line = line_where(&log, json!({"path": format!("/echo/pooled/{i}")})).await;
        assert_eq!(line["addr"], o_addr, "{line:?}");
    }
    assert!(
        origin.connections() < 7,
        "7 requests reached the origin over {} connections: none was pooled",
        origin.connections()
    );

    proxy.stop().await;
    // One line per exchange, no more.
    assert_eq!(read_lines(&log).len(), 10, "{:#?}", read_lines(&log));
    assert_no_secrets(&log, &f, false);
}

#[tokio::test]
async fn ingress_requests_name_the_gateway_and_keep_the_query_only_when_configured() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let (config, log) = with_file_log(config, true);
    let proxy = TestProxy::start(config).await;
    let ingress = proxy.ingress.unwrap();
    let http = reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("http://{ingress}/agents/{}/gateway", f.agent);

    let r = http
        .post(format!("{base}/echo/in?{SECRET_QUERY}"))
        .bearer_auth(&f.token)
        .body(vec![b'i'; 777])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let down = r.bytes().await.unwrap().len();
    let path = format!("/agents/{}/gateway/echo/in?{SECRET_QUERY}", f.agent);
    let line = line_where(&log, json!({"path": path})).await;
    assert_fields(
        &line,
        merged(
            ids(&f),
            json!({
                "listener": "ingress", "method": "POST",
                "host": "127.0.0.1", "port": gateway.addr.port(),
                "addr": gateway.addr.to_string(), "path": path,
                "status": 200, "outcome": "ok", "ended": "complete",
                "bytes_up": 777, "bytes_down": down,
            }),
        ),
    );

    // A wrong token: 401, no agent, no gateway.
    let r = http
        .get(format!("{base}/x"))
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let down = r.bytes().await.unwrap().len();
    let line = line_where(&log, json!({"status": 401})).await;
    assert_fields(
        &line,
        json!({
            "listener": "ingress", "method": "GET",
            "path": format!("/agents/{}/gateway/x", f.agent),
            "status": 401, "outcome": "auth_failed", "ended": "complete",
            "bytes_up": 0, "bytes_down": down,
        }),
    );

    // Egress through the same proxy: the query kept too, as configured.
    let url = gateway.url(&format!("/status/204?{SECRET_QUERY}"));
    let get = exchange(proxy.egress, &get_request(&url, &f.basic())).await;
    assert_eq!(get.status, 204, "{}", get.head);
    let line = line_where(&log, json!({"listener": "egress"})).await;
    assert_eq!(line["path"], format!("/status/204?{SECRET_QUERY}"));

    proxy.stop().await;
    assert_eq!(read_lines(&log).len(), 3, "{:#?}", read_lines(&log));
    assert_no_secrets(&log, &f, true);
}

#[tokio::test]
async fn sighup_reopens_the_file_after_rotation_and_env_overrides_configure_it() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let dir = temp_dir("decision-log-rotation");
    let path = dir.join("decisions.jsonl");
    let rotated = dir.join("decisions.jsonl.1");
    let proxy = ProxyProcess::start(
        &db.url,
        &temp_dir("spill"),
        &[
            ("TOLLGATE_PROXY__DECISION_LOG__SINK", "file"),
            ("TOLLGATE_PROXY__DECISION_LOG__PATH", path.to_str().unwrap()),
        ],
        true,
    )
    .await;
    let request = get_request(&origin.url("/status/204"), &f.basic());

    let first = exchange(proxy.egress, &request).await;
    assert_eq!(first.status, 204, "{}", first.head);
    line_where(&path, json!({"status": 204})).await;

    // Rotate as logrotate does: move the file away, then signal. Lines keep
    // going to the moved file until the writer has reopened the path; a
    // request whose line lands in a new file at the path proves it did.
    std::fs::rename(&path, &rotated).unwrap();
    proxy.signal("HUP");
    let mut requests = 1;
    eventually(PROMPTLY, "a line in the reopened file", || {
        requests += 1;
        let (egress, path, request) = (proxy.egress, path.clone(), request.clone());
        async move {
            let ex = exchange(egress, &request).await;
            assert_eq!(ex.status, 204, "{}", ex.head);
            let written = path.exists() && !read_lines(&path).is_empty();
            holds(written, ex.status)
        }
    })
    .await;
    let status = proxy.terminate().await;
    assert!(status.success(), "{status:?}");
    // Every request has its line, in one file or the other, whole.
    let (old, new) = (read_lines(&rotated), read_lines(&path));
    assert!(!old.is_empty() && !new.is_empty());
    assert_eq!(old.len() + new.len(), requests, "{old:#?} {new:#?}");
    for line in old.iter().chain(&new) {
        assert_eq!(line["agent_id"], f.agent.to_string(), "{line:?}");
        assert_eq!(line["status"], 204, "{line:?}");
    }
}
