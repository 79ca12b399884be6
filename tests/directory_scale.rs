//! The agent directory at fleet size: a `tollgate proxy` process started in
//! front of 100,000 agents serves its first request after reading that one
//! agent, not the whole fleet, and reports what its directory holds on
//! `/metrics`. Real PostgreSQL, a real child process, real sockets.

mod support;

use std::time::{Duration, Instant};

use uuid::Uuid;

use support::client::{basic, exchange, get_request};
use support::hostile_load::{metric, metrics};
use support::origin::Origin;
use support::proxy::{temp_dir, ProxyProcess};
use support::TestDb;

const FLEET: i64 = 100_000;
/// From spawning the process to the first answer. Generous for a loaded 2-core
/// machine: what is asserted is that nothing fleet-sized happens first (the
/// directory holds one agent afterwards), not how fast the machine is.
const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(20);
/// Agents looked up after the first, to see the memory estimate follow them.
const MORE: usize = 200;

/// 100,000 users on one plan, each with a running VPS and its agent, in one
/// statement.
async fn seed_fleet(db: &TestDb) {
    let plan = db.plan("fleet", 1 << 40, 0).await;
    sqlx::query(
        "WITH c AS (
             INSERT INTO vps_configs (name, provider, image, cpu_millicores, memory_mb, disk_gb)
             VALUES ('fleet', 'hetzner', 'img', 1000, 1024, 10) RETURNING id
         ), u AS (
             INSERT INTO users (email, plan_id)
             SELECT 'fleet-' || g || '@example.com', $1 FROM generate_series(1, $2::bigint) AS g
             RETURNING id
         ), v AS (
             INSERT INTO vpses (user_id, vps_config_id, name, provider, provider_vm_id, address, state)
             SELECT u.id, c.id, 'vps', 'hetzner', 'vm-' || u.id, '127.0.0.1', 'running'
             FROM u, c
             RETURNING id, user_id
         )
         INSERT INTO agents (user_id, vps_id, name) SELECT user_id, id, 'agent' FROM v",
    )
    .bind(plan)
    .bind(FLEET)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// `n` agents of the fleet with their tokens, skipping the first `skip`.
async fn agents(db: &TestDb, skip: i64, n: usize) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT id, gateway_token FROM agents ORDER BY id OFFSET $1 LIMIT $2")
        .bind(skip)
        .bind(n as i64)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_in_front_of_100000_agents_serves_before_reading_them_all() {
    let db = TestDb::new().await;
    let seeding = Instant::now();
    seed_fleet(&db).await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, FLEET);
    eprintln!("seeded {FLEET} agents in {:?}", seeding.elapsed());
    let first_agent = agents(&db, FLEET / 2, 1).await.remove(0);
    let origin = Origin::start().await;
    let url = origin.url("/echo/first");

    let started = Instant::now();
    let proxy = ProxyProcess::start(&db.url, &temp_dir("spill"), &[], true).await;
    let ready = started.elapsed();
    let first = exchange(
        proxy.egress,
        &get_request(&url, &basic(first_agent.0, &first_agent.1)),
    )
    .await;
    let answered = started.elapsed();
    eprintln!("proxy ready after {ready:?}, first request answered after {answered:?}");
    assert_eq!(first.status, 200, "{}", first.head);
    assert!(
        answered < FIRST_REQUEST_DEADLINE,
        "first request answered {answered:?} after start"
    );

    // One lookup read one agent: start-up loaded nothing else.
    let text = metrics(proxy.admin).await;
    assert_eq!(
        metric(&text, "tollgate_directory_entries{state=\"cached\"}"),
        1.0,
        "{text}"
    );
    let one = metric(&text, "tollgate_directory_bytes");
    // An entry holds at least its id, its token and the entry itself; a whole
    // fleet would be tens of megabytes.
    assert!(
        (100.0..64.0 * 1024.0).contains(&one),
        "directory bytes {one}"
    );

    // Each further agent read adds its entry to the count and to the estimate.
    for (agent, token) in agents(&db, 0, MORE).await {
        let ex = exchange(proxy.egress, &get_request(&url, &basic(agent, &token))).await;
        assert_eq!(ex.status, 200, "{}", ex.head);
    }
    let text = metrics(proxy.admin).await;
    assert_eq!(
        metric(&text, "tollgate_directory_entries{state=\"cached\"}"),
        (MORE + 1) as f64,
        "{text}"
    );
    let unknown = Uuid::new_v4();
    let refused = exchange(
        proxy.egress,
        &get_request(&url, &basic(unknown, &"0".repeat(64))),
    )
    .await;
    assert_eq!(refused.status, 407, "{}", refused.head);
    let text = metrics(proxy.admin).await;
    assert_eq!(
        metric(&text, "tollgate_directory_entries{state=\"unknown\"}"),
        1.0,
        "{text}"
    );
    let per_entry = (metric(&text, "tollgate_directory_bytes") - one) / MORE as f64;
    eprintln!("directory: {one} bytes with one agent, {per_entry:.0} bytes per further agent");
    assert!(
        (100.0..4096.0).contains(&per_entry),
        "estimated bytes per agent: {per_entry}"
    );
    drop(origin);
    proxy.terminate().await;
}
