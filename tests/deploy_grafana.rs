//! The Grafana side of `deploy/`: every SQL query of the dashboard runs as the
//! read-only Grafana role on a migrated, seeded PostgreSQL database and returns
//! the columns its panel shows; the provisioning files match the dashboard and
//! the compose file.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Column, Executor, Row, TypeInfo};
use support::deploy::{dashboard, datasource_type, panels, read, yaml, Value};
use support::TestDb;
use uuid::Uuid;

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

/// The VPS's `bandwidth` split between two hosts and `other`, as its egress bytes.
async fn destination_rows(db: &TestDb, vps: Uuid, bandwidth: i64) {
    sqlx::query(
        "INSERT INTO vps_destination_usage (vps_id, period_start, host, rx_bytes, tx_bytes)
         SELECT $1, tollgate_current_period(), h.host, h.share / 4, h.share - h.share / 4
         FROM (VALUES ('api.example.com', $2 / 2), ('cdn.example.net', $2 / 4),
                      ('other', $2 - $2 / 2 - $2 / 4)) AS h(host, share)",
    )
    .bind(vps)
    .bind(bandwidth)
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
        destination_rows(&db, vps, bandwidth).await;
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
    let destinations_panel = queries
        .iter()
        .find(|(p, _)| p["title"] == "Top destinations this month")
        .expect("a destinations table");
    let rows = sqlx::query(&destinations_panel.1)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let top: Vec<(String, String, i64)> = rows
        .iter()
        .take(3)
        .map(|r| {
            (
                r.get::<String, _>("email"),
                r.get::<String, _>("host"),
                r.get::<i64, _>("total_bytes"),
            )
        })
        .collect();
    // Largest first: half of the 30 GiB VPS's bytes, then a quarter, then half of 12 GiB.
    assert_eq!(
        top,
        [
            (
                "exhausted@example.com".into(),
                "api.example.com".into(),
                15 * GIB
            ),
            (
                "exhausted@example.com".into(),
                "cdn.example.net".into(),
                30 * GIB / 4
            ),
            ("exhausted@example.com".into(), "other".into(), 30 * GIB / 4),
        ]
    );
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
