//! Agents with their token, VPS and user: what the proxy's directory caches.

use sqlx::PgPool;
use uuid::Uuid;

/// `vps_state` in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "vps_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum VpsState {
    Provisioning,
    Running,
    Stopped,
    Destroyed,
}

impl VpsState {
    pub fn as_str(self) -> &'static str {
        match self {
            VpsState::Provisioning => "provisioning",
            VpsState::Running => "running",
            VpsState::Stopped => "stopped",
            VpsState::Destroyed => "destroyed",
        }
    }
}

/// The VPS an agent runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpsRecord {
    pub id: Uuid,
    pub address: Option<String>,
    pub provider: String,
    pub state: VpsState,
}

/// An agent as the proxy needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub agent_id: Uuid,
    pub user_id: Uuid,
    pub gateway_token: String,
    pub vps: Option<VpsRecord>,
    /// The egress policy that applies: the agent's own, else its plan's.
    pub egress_policy_id: Option<i64>,
    /// The user's plan (whose open destinations the agent may reach while
    /// its user is blocked).
    pub plan_id: Option<Uuid>,
    /// The agent's own bandwidth limit, bytes per second each way.
    pub bandwidth_bytes_per_second: Option<i64>,
}

impl std::fmt::Debug for AgentRecord {
    // The token stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRecord")
            .field("agent_id", &self.agent_id)
            .field("user_id", &self.user_id)
            .field("gateway_token", &"<redacted>")
            .field("vps", &self.vps)
            .field("egress_policy_id", &self.egress_policy_id)
            .field("plan_id", &self.plan_id)
            .field(
                "bandwidth_bytes_per_second",
                &self.bandwidth_bytes_per_second,
            )
            .finish()
    }
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    agent_id: Uuid,
    user_id: Uuid,
    gateway_token: String,
    vps_id: Option<Uuid>,
    address: Option<String>,
    provider: Option<String>,
    state: Option<VpsState>,
    egress_policy_id: Option<i64>,
    plan_id: Option<Uuid>,
    bandwidth_bytes_per_second: Option<i64>,
}

impl From<AgentRow> for AgentRecord {
    fn from(r: AgentRow) -> Self {
        let vps = match (r.vps_id, r.provider, r.state) {
            (Some(id), Some(provider), Some(state)) => Some(VpsRecord {
                id,
                address: r.address,
                provider,
                state,
            }),
            _ => None,
        };
        AgentRecord {
            agent_id: r.agent_id,
            user_id: r.user_id,
            gateway_token: r.gateway_token,
            vps,
            egress_policy_id: r.egress_policy_id,
            plan_id: r.plan_id,
            bandwidth_bytes_per_second: r.bandwidth_bytes_per_second,
        }
    }
}

/// The agents among `ids` that exist (missing ids are simply absent).
pub async fn agents_by_ids(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<AgentRecord>, sqlx::Error> {
    let rows: Vec<AgentRow> = sqlx::query_as(
        "SELECT a.id AS agent_id, a.user_id, a.gateway_token,
                v.id AS vps_id, v.address, v.provider, v.state,
                COALESCE(a.egress_policy_id, p.egress_policy_id) AS egress_policy_id,
                u.plan_id, a.bandwidth_bytes_per_second
         FROM agents a
         LEFT JOIN vpses v ON v.id = a.vps_id
         JOIN users u ON u.id = a.user_id
         LEFT JOIN plans p ON p.id = u.plan_id
         WHERE a.id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(AgentRecord::from).collect())
}

/// One agent by id.
pub async fn agent_by_id(pool: &PgPool, id: Uuid) -> Result<Option<AgentRecord>, sqlx::Error> {
    Ok(agents_by_ids(pool, &[id]).await?.pop())
}
