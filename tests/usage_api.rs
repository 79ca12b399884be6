//! The usage API end to end: real PostgreSQL, the proxy's own listener on port
//! 0, a real HTTP client, and the built `tollgate usage` for comparison. The API
//! must give exactly what the CLI prints (the same rows, the same CSV bytes),
//! the table's own figures per VPS, and nothing without the token.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use uuid::Uuid;

use support::proxy::{
    free_port, free_ports, http_get, temp_dir, test_config, ProxyProcess, TestProxy,
};
use support::{tollgate_bin, Fixture, TestDb};
use tollgate_core::billing::{BlockReason, Period};
use tollgate_core::clock::SystemClock;
use tollgate_core::config::Config;

const TOKEN: &str = "usage-api-test-token-0123456789abcdef";

fn with_usage_api(mut config: Config) -> Config {
    let api = &mut config.proxy.usage_api;
    api.enabled = true;
    api.token = Some(TOKEN.to_owned());
    config
}

async fn start(db: &TestDb) -> (TestProxy, String) {
    let proxy = TestProxy::start(with_usage_api(test_config(&db.url))).await;
    let base = format!("http://{}", proxy.usage_api.expect("usage API listener"));
    (proxy, base)
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(base: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

async fn get_json(base: &str, path: &str) -> (StatusCode, Value) {
    let response = get(base, path).await;
    let status = response.status();
    let body = response.json::<Value>().await.unwrap();
    (status, body)
}

/// `tollgate usage ARGS` against `db`: its standard output (it must succeed).
fn cli(db: &TestDb, args: &[&str]) -> Vec<u8> {
    let out = Command::new(tollgate_bin())
        .arg("usage")
        .args(args)
        .env_remove("TOLLGATE_CONFIG")
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run tollgate usage");
    assert!(
        out.status.success(),
        "tollgate usage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Add to `vps`'s counters in `period`.
async fn add_usage(db: &TestDb, vps: Uuid, period: Period, rx: i64, tx: i64, cpu: i64, mem: i64) {
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes,
                                        bandwidth_tx_bytes, cpu_used_ms, memory_used_mb_seconds)
         VALUES ($1, $2, $3 + $4, $3, $4, $5, $6)
         ON CONFLICT (vps_id, period_start) DO UPDATE SET
             bandwidth_bytes = vps_usage_periods.bandwidth_bytes + EXCLUDED.bandwidth_bytes,
             bandwidth_rx_bytes = vps_usage_periods.bandwidth_rx_bytes + EXCLUDED.bandwidth_rx_bytes,
             bandwidth_tx_bytes = vps_usage_periods.bandwidth_tx_bytes + EXCLUDED.bandwidth_tx_bytes,
             cpu_used_ms = vps_usage_periods.cpu_used_ms + EXCLUDED.cpu_used_ms,
             memory_used_mb_seconds = vps_usage_periods.memory_used_mb_seconds + EXCLUDED.memory_used_mb_seconds",
    )
    .bind(vps)
    .bind(period.start())
    .bind(rx)
    .bind(tx)
    .bind(cpu)
    .bind(mem)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// A user over their bandwidth limit with overage on sale, two VPSes (one
/// destroyed) with usage this month and in `past`, and a budget this month.
async fn billed_user(db: &TestDb, past: Period) -> Fixture {
    let f = db.fixture("sprites").await;
    db.update_plan(
        f.plan,
        "max_bandwidth_bytes = 1073741824, overage_bandwidth_cost_per_gb_cents = 40, \
         max_cpu_ms = 1000, overage_cpu_cost_per_hour_cents = 7",
    )
    .await;
    let gone = db.vps(f.user, "sprites", "127.0.0.2", "destroyed").await;
    let now = Period::current();
    add_usage(db, f.vps, now, 3 << 30, 1 << 29, 5_000_000, 77).await;
    add_usage(db, gone, now, 1 << 20, 12_345, 1, 2).await;
    add_usage(db, f.vps, past, 1 << 31, 0, 9, 9).await;
    db.set_budget(f.user, 250).await;
    f
}

#[tokio::test]
async fn user_usage_is_what_tollgate_usage_prints() {
    let db = TestDb::new().await;
    let past: Period = "2024-02".parse().unwrap();
    let f = billed_user(&db, past).await;
    let other = db.fixture("fly").await;
    db.publish_block(f.user, BlockReason::BudgetExhausted).await;
    let (proxy, base) = start(&db).await;

    let user = f.user.to_string();
    for (query, period) in [
        (String::new(), Period::current()),
        ("?period=2024-02".to_owned(), past),
    ] {
        let (status, api) = get_json(&base, &format!("/v1/users/{user}/usage{query}")).await;
        assert_eq!(status, StatusCode::OK, "{api}");
        let period = period.to_string();
        let printed: Value =
            serde_json::from_slice(&cli(&db, &["--json", "--user", &user, "--period", &period]))
                .unwrap();
        assert_eq!(api, printed[0], "period {period}");
        assert_eq!(api["period"], format!("{period}-01"));
    }
    // The figures are the billing rules' own: 2.5 GiB + 1 MiB + 12345 B over
    // 1 GiB at 40 c/GiB, plus 5000 s of CPU over 1 s at 7 c/h, rounded up once.
    let (_, now) = get_json(&base, &format!("/v1/users/{user}/usage")).await;
    let figures = &now["figures"];
    let used = (3i64 << 30) + (1 << 29) + (1 << 20) + 12_345;
    assert_eq!(figures["usage"]["bandwidth_bytes"], used);
    assert_eq!(figures["usage"]["cpu_ms"], 5_000_001);
    assert_eq!(figures["overage"]["bandwidth_bytes"], used - (1 << 30));
    let bw = (used - (1 << 30)) as i128 * 40;
    let cpu = (5_000_001i128 - 1000) * 7;
    let denominator = 3_600_000i128 * (1 << 30);
    let cents = (bw * 3_600_000 + cpu * (1 << 30) + denominator - 1) / denominator;
    assert_eq!(figures["overage_cost_cents"], cents as i64);
    assert_eq!(figures["budget_cents"], 250);
    assert_eq!(now["status"], "allowed");
    assert_eq!(now["blocked"], Value::Null);
    assert_eq!(now["published_status"], "blocked:budget_exhausted");

    // Another user's figures are their own.
    let (_, theirs) = get_json(&base, &format!("/v1/users/{}/usage", other.user)).await;
    assert_eq!(theirs["figures"]["usage"]["bandwidth_bytes"], 0);
    proxy.stop().await;
}

#[tokio::test]
async fn vps_usage_is_the_table_row() {
    let db = TestDb::new().await;
    let past: Period = "2023-12".parse().unwrap();
    let f = billed_user(&db, past).await;
    let idle = db.vps(f.user, "k8s", "127.0.0.3", "stopped").await;
    let (proxy, base) = start(&db).await;

    for (query, period) in [
        (String::new(), Period::current()),
        ("?period=2023-12".into(), past),
    ] {
        let (status, api) = get_json(&base, &format!("/v1/vpses/{}/usage{query}", f.vps)).await;
        assert_eq!(status, StatusCode::OK, "{api}");
        let row: (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT bandwidth_bytes, bandwidth_rx_bytes, bandwidth_tx_bytes, cpu_used_ms,
                    memory_used_mb_seconds
             FROM vps_usage_periods WHERE vps_id = $1 AND period_start = $2",
        )
        .bind(f.vps)
        .bind(period.start())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let have = (
            api["bandwidth_bytes"].as_i64().unwrap(),
            api["bandwidth_rx_bytes"].as_i64().unwrap(),
            api["bandwidth_tx_bytes"].as_i64().unwrap(),
            api["cpu_used_ms"].as_i64().unwrap(),
            api["memory_used_mb_seconds"].as_i64().unwrap(),
        );
        assert_eq!(have, row, "period {period}");
        assert_eq!(api["user_id"], f.user.to_string());
        assert_eq!(api["vps_id"], f.vps.to_string());
        assert_eq!(api["period"], period.start().to_string());
        assert_eq!(api["provider"], "sprites");
        assert_eq!(api["state"], "running");
    }
    // A VPS without a row this month has zeros.
    let (status, api) = get_json(&base, &format!("/v1/vpses/{idle}/usage")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api["bandwidth_bytes"], 0);
    assert_eq!(api["state"], "stopped");
    proxy.stop().await;
}

#[tokio::test]
async fn csv_export_is_the_cli_csv_with_one_line_per_user() {
    let db = TestDb::new().await;
    let f = billed_user(&db, "2024-02".parse().unwrap()).await;
    db.publish_block(f.user, BlockReason::Bandwidth).await;
    // More users than a page holds, one without a plan and one whose email
    // needs quoting.
    sqlx::query(
        "INSERT INTO users (email, plan_id)
         SELECT 'bulk-' || lpad(g::text, 5, '0') || '@example.com', $1
         FROM generate_series(1, 1234) g",
    )
    .bind(f.plan)
    .execute(&db.pool)
    .await
    .unwrap();
    db.user("\"quoted,comma\"@example.com", None).await;
    let (proxy, base) = start(&db).await;

    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (query, period) in [
        (String::new(), Period::current().to_string()),
        ("?period=2024-02".into(), "2024-02".into()),
    ] {
        let response = get(&base, &format!("/v1/usage.csv{query}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/csv; charset=utf-8"
        );
        // Streamed: no length known up front.
        assert!(response.headers().get("content-length").is_none());
        let api = response.bytes().await.unwrap();
        let printed = cli(&db, &["--csv", "--period", &period]);
        assert_eq!(
            String::from_utf8_lossy(&api),
            String::from_utf8_lossy(&printed),
            "period {period}"
        );
        let text = String::from_utf8(api.to_vec()).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            tollgate_core::usage_report::CSV_HEADER.trim_end()
        );
        let ids: std::collections::BTreeSet<&str> =
            lines.map(|l| l.split(',').nth(1).unwrap()).collect();
        assert_eq!(ids.len() as i64, users, "one line per user");
        assert_eq!(text.lines().count() as i64, users + 1);
        assert!(ids.contains(f.user.to_string().as_str()));
    }
    let text = get(&base, "/v1/usage.csv").await.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&f.user.to_string()))
        .unwrap();
    assert!(line.ends_with(",allowed,blocked:bandwidth"), "{line}");
    assert!(
        text.contains(",\"\"\"quoted,comma\"\"@example.com\",,"),
        "quoted email, no plan"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn without_the_token_nothing_answers() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let (proxy, base) = start(&db).await;
    let paths = [
        format!("/v1/users/{}/usage", f.user),
        format!("/v1/users/{}/decision", f.user),
        format!("/v1/vpses/{}/usage", f.vps),
        "/v1/usage.csv".to_owned(),
        "/v1/nothing-here".to_owned(),
        "/v1/users/not-a-uuid/usage".to_owned(),
    ];
    let wrong = format!("{}x", &TOKEN[..TOKEN.len() - 1]);
    for path in &paths {
        for auth in [
            None,
            Some(format!("Bearer {wrong}")),
            Some(format!("Bearer {}", &TOKEN[1..])),
            Some(format!("Basic {TOKEN}")),
        ] {
            let mut request = client().get(format!("{base}{path}"));
            if let Some(auth) = &auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{path} {auth:?}"
            );
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
    // With it, they do.
    let (status, _) = get_json(&base, &paths[0]).await;
    assert_eq!(status, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn bad_ids_and_periods_are_400_and_unknown_ones_404() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let (proxy, base) = start(&db).await;
    let unknown = Uuid::new_v4();
    for (path, status, error) in [
        ("/v1/users/42/usage".to_owned(), 400, "bad_request"),
        ("/v1/vpses/not-a-vps/usage".into(), 400, "bad_request"),
        ("/v1/users/%27;drop/decision".into(), 400, "bad_request"),
        (
            format!("/v1/users/{}/usage?period=2024-13", f.user),
            400,
            "bad_request",
        ),
        (
            format!("/v1/vpses/{}/usage?period=last", f.vps),
            400,
            "bad_request",
        ),
        ("/v1/usage.csv?period=2024-02-15".into(), 400, "bad_request"),
        (format!("/v1/users/{unknown}/usage"), 404, "not_found"),
        (format!("/v1/vpses/{unknown}/usage"), 404, "not_found"),
        (format!("/v1/users/{unknown}/decision"), 404, "not_found"),
        // Known user, nothing published yet.
        (format!("/v1/users/{}/decision", f.user), 404, "not_found"),
        ("/v1/users".into(), 404, "not_found"),
    ] {
        let (have, body) = get_json(&base, &path).await;
        assert_eq!(have.as_u16(), status, "{path}: {body}");
        assert_eq!(body["error"], error, "{path}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let response = client()
        .post(format!("{base}/v1/usage.csv"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);

    // Once published, the decision is served as stored.
    db.publish_block(f.user, BlockReason::Storage).await;
    let (status, body) = get_json(&base, &format!("/v1/users/{}/decision", f.user)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["blocked"], true);
    assert_eq!(body["reason"], "storage");
    assert_eq!(body["status"], "blocked:storage");
    assert_eq!(body["decided_by"], "monitor");
    assert_eq!(body["period"], Period::current().start().to_string());
    assert!(body["figures"]["usage"].is_object());
    // Not for another month.
    let (status, _) = get_json(
        &base,
        &format!("/v1/users/{}/decision?period=2020-01", f.user),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    proxy.stop().await;
}

/// Every path the OpenAPI document lists answers 200 with the token.
#[tokio::test]
async fn every_documented_path_answers() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    db.publish_block(f.user, BlockReason::NoPlan).await;
    let (proxy, base) = start(&db).await;
    let served = client()
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let doc: Value = served.json().await.unwrap();
    let file: Value = serde_json::from_str(include_str!("../docs/usage-api.json")).unwrap();
    assert_eq!(doc, file);
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 5);
    for (template, item) in paths {
        let id = if template.starts_with("/v1/vpses/") {
            f.vps
        } else {
            f.user
        };
        let path = template.replace("{id}", &id.to_string());
        let response = get(&base, &path).await;
        assert_eq!(response.status(), StatusCode::OK, "{template}");
        let documented = &item["get"]["responses"]["200"]["content"];
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            documented
                .as_object()
                .unwrap()
                .keys()
                .any(|k| content_type.starts_with(k.as_str())),
            "{template}: {content_type} is documented"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_503_without_its_error_text() {
    let mut config = Config::default();
    config.database.url = format!("postgres://tollgate:pw@127.0.0.1:{}/nowhere", free_port());
    config.database.connect_timeout = Duration::from_millis(500);
    let pool = tollgate_core::db::lazy_pool(&config.database, "usage-api-test").unwrap();
    let api =
        tollgate_proxy::usage_api::UsageApi::new(pool, TOKEN.to_owned(), Arc::new(SystemClock));
    for path in [
        format!("/v1/users/{}/usage", Uuid::new_v4()),
        format!("/v1/users/{}/decision", Uuid::new_v4()),
        format!("/v1/vpses/{}/usage", Uuid::new_v4()),
        "/v1/usage.csv".to_owned(),
    ] {
        let request = Request::get(&path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(())
            .unwrap();
        let response = tollgate_proxy::usage_api::handle(&api, request).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "database_unavailable", "{path}");
        let text = body.to_string().to_lowercase();
        for leak in ["refused", "pool", "nowhere", "127.0.0.1", "io error"] {
            assert!(!text.contains(leak), "{path}: {text}");
        }
    }
}

#[tokio::test]
async fn the_listener_exists_only_when_enabled() {
    let db = TestDb::new().await;
    // In-process: nothing is bound unless enabled.
    let mut config = test_config(&db.url);
    config.proxy.ingress.enabled = false;
    let listeners = tollgate_proxy::Listeners::bind(&config).await.unwrap();
    assert!(listeners.usage_api.is_none());
    let listeners = tollgate_proxy::Listeners::bind(&with_usage_api(config))
        .await
        .unwrap();
    assert!(listeners.usage_api.is_some());
    drop(listeners);

    // The binary: a configured but disabled address stays closed; enabled, it answers.
    let spill = temp_dir("usage-api-spill");
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let disabled = ProxyProcess::start(
        &db.url,
        &spill,
        &[("TOLLGATE_PROXY__USAGE_API__LISTEN", &listen)],
        true,
    )
    .await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens on {addr} while the usage API is disabled"
    );
    disabled.terminate().await;
    let enabled = ProxyProcess::start(
        &db.url,
        &spill,
        &[
            ("TOLLGATE_PROXY__USAGE_API__LISTEN", &listen),
            ("TOLLGATE_PROXY__USAGE_API__ENABLED", "true"),
            ("TOLLGATE_PROXY__USAGE_API__TOKEN", TOKEN),
        ],
        true,
    )
    .await;
    let (status, _) = http_get(addr, "/v1/usage.csv").await.unwrap();
    assert_eq!(status, 401);
    let csv = client()
        .get(format!("http://{addr}/v1/usage.csv"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(enabled.terminate().await.success());
}

/// `tollgate proxy` logging at debug level, answered with the right token and
/// wrong ones: its log names the usage API and never holds a token.
#[tokio::test]
async fn the_token_never_reaches_the_proxys_log() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let dir = temp_dir("usage-api-log");
    let log = dir.join("stderr.log");
    let [egress, admin, api] = free_ports();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    let mut child = Command::new(tollgate_bin())
        .arg("proxy")
        .env_remove("TOLLGATE_CONFIG")
        .env("DATABASE_URL", &db.url)
        .env(
            "TOLLGATE_PROXY__EGRESS__LISTEN",
            format!("127.0.0.1:{egress}"),
        )
        .env("TOLLGATE_PROXY__INGRESS__ENABLED", "false")
        .env(
            "TOLLGATE_PROXY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .env("TOLLGATE_PROXY__METER__SPILL_DIR", dir.join("spill"))
        .env("TOLLGATE_PROXY__USAGE_API__ENABLED", "true")
        .env(
            "TOLLGATE_PROXY__USAGE_API__LISTEN",
            format!("127.0.0.1:{api}"),
        )
        .env("TOLLGATE_PROXY__USAGE_API__TOKEN_FILE", &token_file)
        .env("TOLLGATE_LOG__FILTER", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{api}");
    support::wait::eventually(Duration::from_secs(20), "the usage API answers", || {
        let url = format!("{base}/v1/openapi.json");
        async move {
            match reqwest::get(url).await.map(|r| r.status()) {
                Ok(StatusCode::OK) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let wrong = format!("{}Q", &TOKEN[..TOKEN.len() - 1]);
    for token in [TOKEN, wrong.as_str()] {
        for path in [
            format!("/v1/users/{}/usage", f.user),
            "/v1/usage.csv".to_owned(),
            "/v1/users/x/usage".to_owned(),
        ] {
            let status = client()
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status();
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("usage_api"), "{text}");
    let stem = &TOKEN[..TOKEN.len() - 1];
    assert!(!text.contains(stem), "a token is in the log:\n{text}");
}
