//! Egress policies as stored (migration 021): every policy with its rules,
//! which policy applies to which agent, and the destinations each plan keeps
//! open while its users are blocked (migration 024), read in one snapshot.

use sqlx::PgPool;
use uuid::Uuid;

/// NOTIFY channel: any change to policies, rules, or which policy applies to
/// whom. The payload names the table; readers re-read everything.
pub const CHANNEL: &str = "tollgate_egress_policy";

/// One policy row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PolicyRow {
    pub id: i64,
    pub name: String,
    /// `enforce` or `report`.
    pub mode: String,
    /// `allow` or `deny`.
    pub default_action: String,
}

/// One rule row. `cidr` is PostgreSQL's text form (`10.0.0.0/8`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RuleRow {
    pub id: i64,
    pub policy_id: i64,
    /// `allow` or `deny`.
    pub action: String,
    pub host: Option<String>,
    pub cidr: Option<String>,
    pub ports: Option<Vec<i32>>,
}

/// A destination a plan keeps open while its users are blocked (migration
/// 024): `host` exact or `*.suffix`, on `ports` (all when `None`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OpenRow {
    pub id: i64,
    pub plan_id: Uuid,
    pub host: String,
    pub ports: Option<Vec<i32>>,
}

/// Everything a proxy needs to judge destinations, as of one moment.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub policies: Vec<PolicyRow>,
    pub rules: Vec<RuleRow>,
    /// Agents with a policy: the agent's own, else its plan's.
    pub agents: Vec<(Uuid, i64)>,
    /// Every plan's open destinations.
    pub open: Vec<OpenRow>,
}

/// Read every policy, rule and agent assignment in one snapshot.
pub async fn load(pool: &PgPool) -> Result<Stored, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let policies = sqlx::query_as::<_, PolicyRow>(
        "SELECT id, name, mode, default_action FROM egress_policies ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let rules = sqlx::query_as::<_, RuleRow>(
        "SELECT id, policy_id, action, host, cidr::text AS cidr, ports
         FROM egress_policy_rules ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let agents = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT a.id, COALESCE(a.egress_policy_id, p.egress_policy_id)
         FROM agents a
         JOIN users u ON u.id = a.user_id
         LEFT JOIN plans p ON p.id = u.plan_id
         WHERE COALESCE(a.egress_policy_id, p.egress_policy_id) IS NOT NULL",
    )
    .fetch_all(&mut *tx)
    .await?;
    let open = sqlx::query_as::<_, OpenRow>(
        "SELECT id, plan_id, host, ports FROM plan_open_destinations ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Stored {
        policies,
        rules,
        agents,
        open,
    })
}
