//! The Prometheus files under `deploy/prometheus/` and the dashboard's PromQL,
//! checked with the real tools that run on this machine:
//!
//! - promtool: the scrape configs, the alert rules and their unit tests;
//! - every alert has a procedure in `docs/operations.md`;
//! - a real Prometheus scraping a running `tollgate proxy` (and monitor, when the
//!   binary has one): every PromQL expression of the dashboard and the alert
//!   rules runs through the HTTP API, and the traffic panels show the test traffic.
//!
//! `.ci/run` installs every tool. Elsewhere a missing tool skips its check with a
//! note on stderr, except under `CI`, where it fails.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::deploy::{dashboard, datasource_type, panels, read, repo_path, run_ok, scratch, yaml};
use support::proxy::free_ports;
use support::service::{require_tool, Service};
use support::wait::{eventually, holds};
use support::TestDb;

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
    eventually(within, format!("{url} answers 200"), || async {
        let status = client.get(url).send().await.map(|r| r.status());
        match status {
            Ok(s) if s.is_success() => Ok(()),
            other => Err(other),
        }
    })
    .await;
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
    let [egress, admin, monitor_admin, prom_port] = free_ports();
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
    eventually(
        Duration::from_secs(60),
        "traffic panels show the test traffic",
        || {
            proxy.assert_running();
            let log = proxy.log();
            let (queries, plain, base) = (&queries, &plain, &base);
            async move {
                let mut missing = Vec::new();
                // Connection-limit refusals are the one series this traffic does not cause.
                let shown = queries.iter().filter(|(t, e, _)| {
                    must_show.contains(&t.as_str())
                        && !e.contains("tollgate_rejected_connections_total")
                });
                for (title, expr, _) in shown {
                    let query = [("query", expr.clone())];
                    let data = prom_api(plain, base, "/api/v1/query", &query).await;
                    let empty = data["result"].as_array().unwrap().is_empty();
                    let zero_traffic = title.starts_with("Bytes") && vector_sum(&data) <= 0.0;
                    if empty || zero_traffic {
                        missing.push(format!("{title}: {expr}"));
                    }
                }
                holds(missing.is_empty(), ()).map_err(|()| {
                    format!("without data:\n{}\nproxy log:\n{log}", missing.join("\n"))
                })
            }
        },
    )
    .await;

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
    let loaded = eventually(Duration::from_secs(30), "every rule evaluated", || async {
        let data = prom_api(&plain, &base, "/api/v1/rules", &[]).await;
        let loaded: Vec<Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(loaded.len(), rules.len(), "rules loaded by Prometheus");
        let bad: Vec<String> = loaded
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        let unknown = bad.iter().filter(|b| b.contains("\"unknown\"")).count();
        assert_eq!(bad.len(), unknown, "rules failing in Prometheus: {bad:?}");
        holds(bad.is_empty(), loaded).map_err(|_| bad)
    })
    .await;
    // The proxy is scraped and up: its down alerts stay quiet.
    for r in &loaded {
        if r["name"] == "TollgateProxyDown" || r["name"] == "TollgateProxyAbsent" {
            assert_eq!(r["state"], "inactive", "{r}");
        }
    }

    stop_traffic.cancel();
    traffic.await.unwrap();
    proxy.assert_running();
    drop(monitor);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
