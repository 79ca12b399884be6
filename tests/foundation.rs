//! Schema, data access and CLI against a real PostgreSQL, one fresh database per test.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use chrono::{Datelike, Utc};
use sqlx::postgres::PgListener;
use support::TestDb;
use uuid::Uuid;

use tollgate_core::billing::{self, BlockReason, Overage, Period, PlanLimits, Usage};
use tollgate_core::db::usage::{BandwidthDelta, FlushBatch, FlushOutcome, PeriodDeltas};
use tollgate_core::db::{self, decisions, usage};

/// Every column of the seed's tables: type, nullability, default. Tollgate adds
/// only the rx/tx split to `vps_usage_periods` and the egress policy of a plan
/// and of an agent (migration 021).
const EXPECTED_COLUMNS: &str = "
accounts.id uuid NOT NULL DEFAULT gen_random_uuid()
accounts.user_id uuid NOT NULL
accounts.type text NOT NULL
accounts.provider text NOT NULL
accounts.provider_account_id text NOT NULL
accounts.refresh_token text
accounts.access_token text
accounts.expires_at integer
accounts.token_type text
accounts.scope text
accounts.id_token text
accounts.session_state text
accounts.created_at timestamp with time zone NOT NULL DEFAULT now()
accounts.updated_at timestamp with time zone NOT NULL DEFAULT now()
agent_channels.id uuid NOT NULL DEFAULT gen_random_uuid()
agent_channels.agent_id uuid NOT NULL
agent_channels.channel_kind text NOT NULL
agent_channels.credentials jsonb NOT NULL DEFAULT '{}'::jsonb
agent_channels.enabled boolean NOT NULL DEFAULT true
agent_channels.webhook_secret text
agent_channels.created_at timestamp with time zone NOT NULL DEFAULT now()
agent_channels.updated_at timestamp with time zone NOT NULL DEFAULT now()
agents.id uuid NOT NULL DEFAULT gen_random_uuid()
agents.user_id uuid NOT NULL
agents.vps_id uuid
agents.name text NOT NULL
agents.gateway_token text NOT NULL DEFAULT (replace((gen_random_uuid())::text, '-'::text, ''::text) || replace((gen_random_uuid())::text, '-'::text, ''::text))
agents.created_at timestamp with time zone NOT NULL DEFAULT now()
agents.updated_at timestamp with time zone NOT NULL DEFAULT now()
agents.egress_policy_id bigint
agents.bandwidth_bytes_per_second bigint
overage_budgets.user_id uuid NOT NULL
overage_budgets.period_start date NOT NULL
overage_budgets.budget_cents bigint NOT NULL DEFAULT 0
overage_budgets.created_at timestamp with time zone NOT NULL DEFAULT now()
overage_budgets.updated_at timestamp with time zone NOT NULL DEFAULT now()
plan_vps_configs.plan_id uuid NOT NULL
plan_vps_configs.vps_config_id uuid NOT NULL
plans.id uuid NOT NULL DEFAULT gen_random_uuid()
plans.name text NOT NULL
plans.max_agents integer NOT NULL
plans.max_vpses integer NOT NULL
plans.max_bandwidth_bytes bigint NOT NULL DEFAULT '107374182400'::bigint
plans.max_storage_bytes bigint NOT NULL DEFAULT '53687091200'::bigint
plans.max_cpu_ms bigint NOT NULL DEFAULT 360000000
plans.max_memory_mb_seconds bigint NOT NULL DEFAULT 1843200000
plans.created_at timestamp with time zone NOT NULL DEFAULT now()
plans.updated_at timestamp with time zone NOT NULL DEFAULT now()
plans.overage_bandwidth_cost_per_gb_cents bigint NOT NULL DEFAULT 0
plans.overage_cpu_cost_per_hour_cents bigint NOT NULL DEFAULT 0
plans.overage_memory_cost_per_gb_hour_cents bigint NOT NULL DEFAULT 0
plans.egress_policy_id bigint
plans.on_exhausted text NOT NULL DEFAULT 'block'::text
plans.throttle_bytes_per_second bigint
sessions.id uuid NOT NULL DEFAULT gen_random_uuid()
sessions.session_token text NOT NULL
sessions.user_id uuid NOT NULL
sessions.expires timestamp with time zone NOT NULL
sessions.created_at timestamp with time zone NOT NULL DEFAULT now()
sessions.updated_at timestamp with time zone NOT NULL DEFAULT now()
users.id uuid NOT NULL DEFAULT gen_random_uuid()
users.email text NOT NULL
users.name text
users.plan_id uuid
users.created_at timestamp with time zone NOT NULL DEFAULT now()
users.updated_at timestamp with time zone NOT NULL DEFAULT now()
users.email_verified timestamp with time zone
users.image text
verification_tokens.identifier text NOT NULL
verification_tokens.token text NOT NULL
verification_tokens.expires timestamp with time zone NOT NULL
vps_configs.id uuid NOT NULL DEFAULT gen_random_uuid()
vps_configs.name text NOT NULL
vps_configs.provider text NOT NULL
vps_configs.image text NOT NULL
vps_configs.cpu_millicores integer NOT NULL
vps_configs.memory_mb integer NOT NULL
vps_configs.disk_gb integer NOT NULL
vps_configs.created_at timestamp with time zone NOT NULL DEFAULT now()
vps_configs.updated_at timestamp with time zone NOT NULL DEFAULT now()
vps_usage_periods.vps_id uuid NOT NULL
vps_usage_periods.period_start date NOT NULL
vps_usage_periods.bandwidth_bytes bigint NOT NULL DEFAULT 0
vps_usage_periods.cpu_used_ms bigint NOT NULL DEFAULT 0
vps_usage_periods.memory_used_mb_seconds bigint NOT NULL DEFAULT 0
vps_usage_periods.created_at timestamp with time zone NOT NULL DEFAULT now()
vps_usage_periods.updated_at timestamp with time zone NOT NULL DEFAULT now()
vps_usage_periods.bandwidth_rx_bytes bigint NOT NULL DEFAULT 0
vps_usage_periods.bandwidth_tx_bytes bigint NOT NULL DEFAULT 0
vpses.id uuid NOT NULL DEFAULT gen_random_uuid()
vpses.user_id uuid NOT NULL
vpses.vps_config_id uuid NOT NULL
vpses.name text NOT NULL
vpses.provider text NOT NULL
vpses.provider_vm_id text
vpses.address text
vpses.state vps_state NOT NULL DEFAULT 'provisioning'::vps_state
vpses.storage_used_bytes bigint NOT NULL DEFAULT 0
vpses.cpu_used_ms bigint
vpses.memory_used_mb_seconds bigint
vpses.created_at timestamp with time zone NOT NULL DEFAULT now()
vpses.updated_at timestamp with time zone NOT NULL DEFAULT now()
";

const SEED_TABLES: [&str; 12] = [
    "plans",
    "vps_configs",
    "plan_vps_configs",
    "users",
    "vpses",
    "agents",
    "accounts",
    "sessions",
    "verification_tokens",
    "vps_usage_periods",
    "overage_budgets",
    "agent_channels",
];

fn lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn migrations_reproduce_the_seed_schema_in_the_catalogue() {
    let db = TestDb::new().await;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT c.table_name || '.' || c.column_name || ' '
                || CASE WHEN c.data_type = 'USER-DEFINED' THEN c.udt_name ELSE c.data_type END
                || CASE WHEN c.is_nullable = 'NO' THEN ' NOT NULL' ELSE '' END
                || COALESCE(' DEFAULT ' || c.column_default, '')
         FROM information_schema.columns c
         WHERE c.table_schema = 'public' AND c.table_name = ANY($1)",
    )
    .bind(&SEED_TABLES[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let actual: BTreeSet<String> = columns.into_iter().collect();
    let expected = lines(EXPECTED_COLUMNS);
    let missing: Vec<_> = expected.difference(&actual).collect();
    let extra: Vec<_> = actual.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing: {missing:#?}\nunexpected: {extra:#?}"
    );

    // Primary keys.
    let pks: Vec<String> = sqlx::query_scalar(
        "SELECT tc.table_name || ' (' || string_agg(k.column_name, ', ' ORDER BY k.ordinal_position) || ')'
         FROM information_schema.table_constraints tc
         JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name, table_name)
         WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_name = ANY($1)
         GROUP BY tc.table_name",
    )
    .bind(&SEED_TABLES[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pks.into_iter().collect::<BTreeSet<_>>(),
        lines(
            "accounts (id)
             agent_channels (id)
             agents (id)
             overage_budgets (user_id, period_start)
             plan_vps_configs (plan_id, vps_config_id)
             plans (id)
             sessions (id)
             users (id)
             verification_tokens (identifier, token)
             vps_configs (id)
             vps_usage_periods (vps_id, period_start)
             vpses (id)"
        )
    );

    // Foreign keys with their ON DELETE rules.
    let fks: Vec<String> = sqlx::query_scalar(
        "SELECT k.table_name || '.' || k.column_name || ' -> ' || u.table_name || '.' || u.column_name
                || ' ON DELETE ' || r.delete_rule
         FROM information_schema.referential_constraints r
         JOIN information_schema.key_column_usage k
              ON k.constraint_name = r.constraint_name AND k.constraint_schema = r.constraint_schema
         JOIN information_schema.constraint_column_usage u
              ON u.constraint_name = r.constraint_name AND u.constraint_schema = r.constraint_schema
         WHERE k.table_name = ANY($1)",
    )
    .bind(&SEED_TABLES[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        fks.into_iter().collect::<BTreeSet<_>>(),
        lines(
            "accounts.user_id -> users.id ON DELETE CASCADE
             agent_channels.agent_id -> agents.id ON DELETE CASCADE
             agents.egress_policy_id -> egress_policies.id ON DELETE SET NULL
             agents.user_id -> users.id ON DELETE CASCADE
             agents.vps_id -> vpses.id ON DELETE SET NULL
             overage_budgets.user_id -> users.id ON DELETE CASCADE
             plan_vps_configs.plan_id -> plans.id ON DELETE CASCADE
             plan_vps_configs.vps_config_id -> vps_configs.id ON DELETE CASCADE
             plans.egress_policy_id -> egress_policies.id ON DELETE SET NULL
             sessions.user_id -> users.id ON DELETE CASCADE
             users.plan_id -> plans.id ON DELETE SET NULL
             vps_usage_periods.vps_id -> vpses.id ON DELETE CASCADE
             vpses.user_id -> users.id ON DELETE CASCADE
             vpses.vps_config_id -> vps_configs.id ON DELETE NO ACTION"
        )
    );

    // Unique constraints.
    let uniques: Vec<String> = sqlx::query_scalar(
        "SELECT tc.table_name || ' (' || string_agg(k.column_name, ', ' ORDER BY k.ordinal_position) || ')'
         FROM information_schema.table_constraints tc
         JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name, table_name)
         WHERE tc.constraint_type = 'UNIQUE' AND tc.table_name = ANY($1)
         GROUP BY tc.table_name, tc.constraint_name",
    )
    .bind(&SEED_TABLES[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        uniques.into_iter().collect::<BTreeSet<_>>(),
        lines(
            "accounts (provider, provider_account_id)
             agent_channels (agent_id, channel_kind)
             agents (vps_id)
             plans (name)
             sessions (session_token)
             users (email)
             vps_configs (name)"
        )
    );

    // The vps_state enum, in order.
    let states: Vec<String> =
        sqlx::query_scalar("SELECT unnest(enum_range(NULL::vps_state))::text")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(states, ["provisioning", "running", "stopped", "destroyed"]);

    // set_updated_at() on every seed table with updated_at.
    let triggered: Vec<String> = sqlx::query_scalar(
        "SELECT event_object_table FROM information_schema.triggers
         WHERE action_statement = 'EXECUTE FUNCTION set_updated_at()' AND event_manipulation = 'UPDATE'
           AND action_timing = 'BEFORE' AND event_object_table = ANY($1)",
    )
    .bind(&SEED_TABLES[..])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let with_updated_at: BTreeSet<&str> = EXPECTED_COLUMNS
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_suffix(".updated_at timestamp with time zone NOT NULL DEFAULT now()")
        })
        .collect();
    assert_eq!(
        triggered
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        with_updated_at
    );

    // Indexes on what the hot queries filter by.
    let indexed: Vec<String> = sqlx::query_scalar(
        "SELECT tablename || ': ' || indexdef FROM pg_indexes WHERE schemaname = 'public'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (table, column) in [
        ("vpses", "user_id"),
        ("agents", "user_id"),
        ("users", "plan_id"),
    ] {
        assert!(
            indexed
                .iter()
                .any(|i| i.starts_with(table) && i.contains(&format!("({column})"))),
            "no index on {table}.{column}: {indexed:#?}"
        );
    }
}

#[tokio::test]
async fn gateway_tokens_are_64_lowercase_hex_and_generated_by_default() {
    let db = TestDb::new().await;
    let user = db.user("t@example.com", None).await;
    let (_, token) = db.agent(user, None).await;
    assert_eq!(token.len(), 64);
    assert!(token
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    for bad in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
        let err =
            sqlx::query("INSERT INTO agents (user_id, name, gateway_token) VALUES ($1, 'x', $2)")
                .bind(user)
                .bind(bad)
                .execute(&db.pool)
                .await
                .expect_err("bad token accepted");
        assert!(
            err.to_string().contains("agents_gateway_token_format"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn updated_at_moves_on_update() {
    let db = TestDb::new().await;
    let plan = db.plan("p", 1, 0).await;
    let before: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT updated_at FROM plans WHERE id = $1")
            .bind(plan)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after: chrono::DateTime<Utc> =
        sqlx::query_scalar("UPDATE plans SET max_agents = 9 WHERE id = $1 RETURNING updated_at")
            .bind(plan)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(after > before);
}

#[tokio::test]
async fn two_processes_migrating_at_once_both_succeed() {
    let db = TestDb::empty().await;
    let run = || {
        let url = db.url.clone();
        tokio::spawn(async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            db::migrate(&pool).await
        })
    };
    let (a, b, c) = tokio::join!(run(), run(), run());
    for r in [a, b, c] {
        r.unwrap().expect("concurrent migrate succeeds");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, db::MIGRATOR.iter().count());
}

async fn next_notification(listener: &mut PgListener) -> (String, String) {
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap();
    (n.channel().to_owned(), n.payload().to_owned())
}

#[tokio::test]
async fn triggers_notify_token_rotation_vps_changes_billing_changes_and_decision_flips() {
    let db = TestDb::new().await;
    let plan = db.plan("p", 1000, 0).await;
    let user = db.user("n@example.com", Some(plan)).await;
    let vps = db.vps(user, "fly", "10.0.0.7", "running").await;
    let (agent, _) = db.agent(user, Some(vps)).await;

    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener
        .listen_all([db::AGENT_CHANNEL, db::BILLING_CHANNEL, db::DECISION_CHANNEL])
        .await
        .unwrap();

    sqlx::query("UPDATE agents SET gateway_token = repeat('b', 64) WHERE id = $1")
        .bind(agent)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut listener).await,
        (db::AGENT_CHANNEL.into(), agent.to_string())
    );

    sqlx::query("UPDATE vpses SET address = '10.0.0.8' WHERE id = $1")
        .bind(vps)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut listener).await,
        (db::AGENT_CHANNEL.into(), agent.to_string())
    );

    sqlx::query("UPDATE plans SET max_bandwidth_bytes = 5 WHERE id = $1")
        .bind(plan)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut listener).await,
        (db::BILLING_CHANNEL.into(), format!("plan:{plan}"))
    );

    sqlx::query(
        "INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES ($1, $2, 10)",
    )
    .bind(user)
    .bind(Period::current().start())
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        next_notification(&mut listener).await,
        (db::BILLING_CHANNEL.into(), format!("user:{user}"))
    );

    sqlx::query("UPDATE users SET plan_id = NULL WHERE id = $1")
        .bind(user)
        .execute(&db.pool)
        .await
        .unwrap();
    // The user's agents carry their plan (its open destinations) in the
    // proxies' directories, then the billing change.
    assert_eq!(
        next_notification(&mut listener).await,
        (db::AGENT_CHANNEL.into(), agent.to_string())
    );
    assert_eq!(
        next_notification(&mut listener).await,
        (db::BILLING_CHANNEL.into(), format!("user:{user}"))
    );

    let period = Period::current();
    let blocked = billing::decide(None, &Usage::default(), 0);
    decisions::publish(&db.pool, period, &[(user, blocked.clone())], "test")
        .await
        .unwrap();
    let expected = (
        db::DECISION_CHANNEL.to_owned(),
        format!("{user}:{}", period.start()),
    );
    assert_eq!(next_notification(&mut listener).await, expected);
    // Same outcome again: no notification; a flip: one.
    decisions::publish(&db.pool, period, &[(user, blocked)], "test")
        .await
        .unwrap();
    let limits = PlanLimits {
        max_bandwidth_bytes: 10,
        max_cpu_ms: 10,
        max_memory_mb_seconds: 10,
        max_storage_bytes: 10,
        bandwidth_cents_per_gib: 0,
        cpu_cents_per_hour: 0,
        memory_cents_per_gib_hour: 0,
    };
    let allowed = billing::decide(Some(&limits), &Usage::default(), 0);
    decisions::publish(&db.pool, period, &[(user, allowed)], "test")
        .await
        .unwrap();
    // A marker sent after both: notifications arrive in commit order, so the
    // flip's notification followed by the marker means none for the unchanged one.
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(db::DECISION_CHANNEL)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(next_notification(&mut listener).await, expected);
    assert_eq!(
        next_notification(&mut listener).await,
        (db::DECISION_CHANNEL.to_owned(), "marker".to_owned()),
        "no notification for an unchanged decision"
    );
}

#[tokio::test]
async fn user_billing_sums_every_vps_including_destroyed_ones_as_bigint() {
    let db = TestDb::new().await;
    let plan = db.plan("big", 1 << 40, 3).await;
    let user = db.user("sum@example.com", Some(plan)).await;
    let other = db.user("other@example.com", None).await;
    let running = db.vps(user, "k8s", "10.0.0.1", "running").await;
    let destroyed = db.vps(user, "k8s", "10.0.0.2", "destroyed").await;
    let elsewhere = db.vps(other, "fly", "10.0.0.3", "running").await;
    let period = Period::current();
    // Values beyond 2^32 each, so a sum decoded through INT4 or NUMERIC would fail.
    let big: i64 = 5_000_000_000;
    for (vps, n) in [(running, big), (destroyed, big + 1), (elsewhere, 7)] {
        sqlx::query(
            "INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes, cpu_used_ms, memory_used_mb_seconds)
             VALUES ($1, $2, $3, $3, $3)",
        )
        .bind(vps)
        .bind(period.start())
        .bind(n)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // Last month's usage does not count this month.
    sqlx::query("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_bytes) VALUES ($1, $2, 999)")
        .bind(running)
        .bind(Period::containing(period.start_instant() - chrono::Duration::days(1)).start())
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE vpses SET storage_used_bytes = CASE WHEN id = $1 THEN 100 ELSE 900 END WHERE id IN ($1, $2)")
        .bind(running)
        .bind(destroyed)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES ($1, $2, 42)",
    )
    .bind(user)
    .bind(period.start())
    .execute(&db.pool)
    .await
    .unwrap();

    let rows = usage::user_billing(&db.pool, &[user, other, Uuid::new_v4()], period)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let mine = rows.iter().find(|r| r.user_id == user).unwrap();
    assert_eq!(
        mine.usage,
        Usage {
            bandwidth_bytes: 2 * big + 1,
            cpu_ms: 2 * big + 1,
            memory_mb_seconds: 2 * big + 1,
            // The destroyed VPS's storage no longer counts.
            max_vps_storage_bytes: 100,
        }
    );
    assert_eq!(mine.budget_cents, 42);
    assert_eq!(mine.limits.unwrap().max_bandwidth_bytes, 1 << 40);
    assert_eq!(mine.plan_name.as_deref(), Some("big"));
    let theirs = rows.iter().find(|r| r.user_id == other).unwrap();
    assert_eq!(theirs.limits, None);
    assert_eq!(theirs.budget_cents, 0);
    assert_eq!(theirs.decide().blocked, Some(BlockReason::NoPlan));

    let active = usage::active_users(&db.pool, period).await.unwrap();
    assert_eq!(
        active.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([user, other])
    );
}

fn batch(instance_id: Uuid, seq: i64, period: Period, deltas: &[(Uuid, u64, u64)]) -> FlushBatch {
    FlushBatch {
        instance_id,
        seq,
        leases: None,
        destinations: Default::default(),
        periods: vec![PeriodDeltas {
            period,
            deltas: deltas
                .iter()
                .map(|&(vps_id, rx, tx)| BandwidthDelta { vps_id, rx, tx })
                .collect(),
        }],
    }
}

async fn bandwidth(db: &TestDb, vps: Uuid, period: Period) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT bandwidth_bytes, bandwidth_rx_bytes, bandwidth_tx_bytes FROM vps_usage_periods
         WHERE vps_id = $1 AND period_start = $2",
    )
    .bind(vps)
    .bind(period.start())
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .unwrap_or((0, 0, 0))
}

#[tokio::test]
async fn a_flush_batch_is_applied_exactly_once_and_skips_deleted_vpses() {
    let db = TestDb::new().await;
    let user = db.user("f@example.com", None).await;
    let a = db.vps(user, "fly", "10.0.0.1", "running").await;
    let b = db.vps(user, "fly", "10.0.0.2", "running").await;
    let gone = Uuid::new_v4();
    let period = Period::current();
    let instance = Uuid::new_v4();

    let first = batch(
        instance,
        1,
        period,
        &[(a, 100, 23), (b, 5, 0), (gone, 7, 7)],
    );
    assert_eq!(
        usage::apply_flush(&db.pool, &first).await.unwrap(),
        FlushOutcome::Applied {
            rows: 2,
            dropped: vec![gone]
        }
    );
    // The same batch again (a retry after a lost acknowledgement, a replayed spill).
    assert_eq!(
        usage::apply_flush(&db.pool, &first).await.unwrap(),
        FlushOutcome::AlreadyApplied
    );
    assert_eq!(bandwidth(&db, a, period).await, (123, 100, 23));
    assert_eq!(bandwidth(&db, b, period).await, (5, 5, 0));

    // The next batch adds to the same rows.
    let second = batch(instance, 2, period, &[(a, 1, 2)]);
    usage::apply_flush(&db.pool, &second).await.unwrap();
    assert_eq!(bandwidth(&db, a, period).await, (126, 101, 25));

    // Another proxy instance with the same seq is a different batch.
    usage::apply_flush(&db.pool, &batch(Uuid::new_v4(), 1, period, &[(a, 10, 0)]))
        .await
        .unwrap();
    assert_eq!(bandwidth(&db, a, period).await, (136, 111, 25));

    let (count, dropped): (i32, i32) = sqlx::query_as(
        "SELECT vps_count, dropped_vps_count FROM flush_ledger WHERE instance_id = $1 AND seq = 1",
    )
    .bind(instance)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((count, dropped), (3, 1));
}

#[tokio::test]
async fn published_decisions_round_trip_and_changed_at_moves_only_on_flips() {
    let db = TestDb::new().await;
    let user = db.user("d@example.com", None).await;
    let period = Period::current();
    let d = billing::decide(
        None,
        &Usage {
            bandwidth_bytes: 5,
            ..Usage::default()
        },
        3,
    );
    decisions::publish(
        &db.pool,
        period,
        &[(user, d.clone()), (Uuid::new_v4(), d.clone())],
        "proxy-1",
    )
    .await
    .unwrap();
    let loaded = decisions::load(&db.pool, period, None).await.unwrap();
    assert_eq!(
        loaded.len(),
        1,
        "decisions for unknown users are not stored"
    );
    let first = &loaded[0];
    assert_eq!(first.blocked, Some(BlockReason::NoPlan));
    assert_eq!(first.decided_by, "proxy-1");
    assert_eq!(first.figures["usage"]["bandwidth_bytes"], 5);
    assert_eq!(first.figures["budget_cents"], 3);

    tokio::time::sleep(Duration::from_millis(20)).await;
    decisions::publish(&db.pool, period, &[(user, d)], "monitor")
        .await
        .unwrap();
    let again = &decisions::load(&db.pool, period, Some(&[user]))
        .await
        .unwrap()[0];
    assert_eq!(again.changed_at, first.changed_at);
    assert!(again.decided_at > first.decided_at);
    assert_eq!(again.decided_by, "monitor");
}

#[tokio::test]
async fn the_dashboard_view_prices_overage_exactly_like_the_billing_module() {
    let db = TestDb::new().await;
    let cases: [(i64, i64, i64, i64, i64, i64); 8] = [
        (1, 1, 0, 0, 0, 0),
        (1 << 30, 5, 0, 0, 0, 0),
        ((1 << 30) + 1, 5, 0, 0, 0, 0),
        (536_870_912, 1, 1_800_000, 1, 0, 0),
        (0, 0, 3_600_000, 10, 3_686_400, 3),
        (123_456_789_012, 7, 987_654_321, 13, 55_555_555, 11),
        (i64::MAX, i64::MAX, i64::MAX, i64::MAX, i64::MAX, i64::MAX),
        (-5, 3, 0, 0, 0, 0),
    ];
    for (bw, bw_rate, cpu, cpu_rate, mem, mem_rate) in cases {
        let sql: i64 =
            sqlx::query_scalar("SELECT tollgate_overage_cost_cents($1, $2, $3, $4, $5, $6)")
                .bind(bw)
                .bind(bw_rate)
                .bind(cpu)
                .bind(cpu_rate)
                .bind(mem)
                .bind(mem_rate)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let limits = PlanLimits {
            max_bandwidth_bytes: 0,
            max_cpu_ms: 0,
            max_memory_mb_seconds: 0,
            max_storage_bytes: 0,
            bandwidth_cents_per_gib: bw_rate,
            cpu_cents_per_hour: cpu_rate,
            memory_cents_per_gib_hour: mem_rate,
        };
        let over = Overage {
            bandwidth_bytes: bw.max(0),
            cpu_ms: cpu,
            memory_mb_seconds: mem,
        };
        assert_eq!(
            sql,
            billing::overage_cost_cents(&over, &limits),
            "case {bw} {bw_rate} {cpu} {cpu_rate} {mem} {mem_rate}"
        );
    }
}

#[tokio::test]
async fn the_current_period_is_the_utc_month_whatever_the_session_time_zone() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for zone in ["Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"] {
        sqlx::query(&format!("SET TIME ZONE '{zone}'"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let sql: chrono::NaiveDate = sqlx::query_scalar("SELECT tollgate_current_period()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let now = Utc::now();
        assert_eq!(sql, Period::containing(now).start(), "zone {zone}");
        assert_eq!(sql.day(), 1);
    }
}

#[tokio::test]
async fn the_user_usage_view_shows_figures_cost_and_decision() {
    let db = TestDb::new().await;
    let plan = db.plan("view", 1 << 30, 5).await;
    let user = db.user("v@example.com", Some(plan)).await;
    let vps = db.vps(user, "fly", "10.0.0.1", "running").await;
    let period = Period::current();
    usage::apply_flush(
        &db.pool,
        &batch(Uuid::new_v4(), 0, period, &[(vps, 1 << 30, 1 << 30)]),
    )
    .await
    .unwrap();
    let billing_rows = usage::user_billing(&db.pool, &[user], period)
        .await
        .unwrap();
    decisions::publish(
        &db.pool,
        period,
        &[(user, billing_rows[0].decide())],
        "test",
    )
    .await
    .unwrap();
    let (bw, over, cost, blocked, reason): (i64, i64, i64, bool, Option<String>) = sqlx::query_as(
        "SELECT bandwidth_bytes, bandwidth_over_bytes, overage_cost_cents, blocked, block_reason
         FROM tollgate_user_usage_current WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((bw, over, cost), (2 << 30, 1 << 30, 5));
    assert_eq!(
        (blocked, reason.as_deref()),
        (true, Some("budget_exhausted"))
    );
    let vps_bw: (i64, i64) = sqlx::query_as(
        "SELECT bandwidth_rx_bytes, bandwidth_tx_bytes FROM tollgate_vps_usage_current WHERE vps_id = $1",
    )
    .bind(vps)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(vps_bw, (1 << 30, 1 << 30));
}

fn tollgate(args: &[&str], database_url: &str) -> std::process::Output {
    Command::new(support::tollgate_bin())
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .expect("run tollgate")
}

#[tokio::test]
async fn cli_migrate_then_usage_table_and_json() {
    let db = TestDb::empty().await;
    let out = tollgate(&["migrate"], &db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = db::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("database is at migration {latest:03}")
    );

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let demo = tollgate::dev::seed(&pool, "127.0.0.1").await.unwrap();
    let period = Period::current();
    usage::apply_flush(
        &pool,
        &batch(
            Uuid::new_v4(),
            0,
            period,
            &[(demo.vps_id, 3 << 20, 1 << 20)],
        ),
    )
    .await
    .unwrap();

    let out = tollgate(&["usage"], &db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(demo.user_email.as_str()))
        .expect("demo user row");
    assert!(
        row.contains("4.0 MiB / 100.0 GiB") && row.contains("allowed"),
        "{table}"
    );

    let out = tollgate(&["usage", "--json", "--user", &demo.user_email], &db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("usage --json parses");
    assert_eq!(json[0]["email"], demo.user_email.as_str());
    assert_eq!(json[0]["figures"]["usage"]["bandwidth_bytes"], 4 << 20);
    assert_eq!(json[0]["status"], "allowed");
    assert_eq!(json[0]["period"], period.start().to_string());

    let out = tollgate(&["usage", "--user", "nobody@example.com"], &db.url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no user with email or id `nobody@example.com`"));
    let out = tollgate(&["usage", "--period", "2026-13"], &db.url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a month"));
}

#[test]
fn cli_check_config_prints_masked_config_or_one_error_line() {
    let dir = std::env::temp_dir().join(format!("tollgate-cc-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[database]\nurl = \"postgres://u:hunter2@db/x\"\n[proxy.egress]\nconnect_ports = [443, 8443]\n").unwrap();
    let out = Command::new(support::tollgate_bin())
        .args(["check-config"])
        .arg(&good)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("postgres://u:********@db/x") && !text.contains("hunter2"),
        "{text}"
    );
    let reparsed =
        tollgate_core::config::Config::from_sources(&text, &good, []).expect("output re-parses");
    assert_eq!(reparsed.proxy.egress.connect_ports, vec![443, 8443]);

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[proxy.egress]\nlisten = \"not-an-address\"\n").unwrap();
    let out = Command::new(support::tollgate_bin())
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("proxy.egress.listen"), "{err}");

    let missing = Command::new(support::tollgate_bin())
        .args(["check-config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("cannot read config file /nonexistent/tollgate.toml"));
}

/// Start `tollgate dev` against `database_url`, wait for its banner, stop it with SIGTERM.
fn dev_once(database_url: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(support::tollgate_bin())
        .arg("dev")
        .env("DATABASE_URL", database_url)
        .env("TOLLGATE_PROXY__EGRESS__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_PROXY__INGRESS__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_PROXY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_MONITOR__ADMIN__LISTEN", "127.0.0.1:0")
        .env(
            "TOLLGATE_PROXY__INGRESS__GATEWAY_PORT",
            support::proxy::free_port().to_string(),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("token") {
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "dev exited with {status}; banner:\n{banner}"
    );
    banner
}

#[tokio::test]
async fn dev_twice_in_a_row_seeds_once_and_prints_the_same_agent() {
    let db = TestDb::empty().await;
    let (url_a, url_b) = (db.url.clone(), db.url.clone());
    let first = tokio::task::spawn_blocking(move || dev_once(&url_a))
        .await
        .unwrap();
    let second = tokio::task::spawn_blocking(move || dev_once(&url_b))
        .await
        .unwrap();
    let token_line = |banner: &str| {
        banner
            .lines()
            .find(|l| l.starts_with("token"))
            .map(str::to_owned)
    };
    assert!(token_line(&first).is_some(), "{first}");
    assert_eq!(token_line(&first), token_line(&second));
    for table in [
        "plans",
        "users",
        "vpses",
        "agents",
        "vps_configs",
        "overage_budgets",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "{table}");
    }
}
