//! Change notifications: what PostgreSQL's NOTIFY triggers announce (migration
//! 017 and later), parsed once into typed events for the proxy and the monitor.
//!
//! | channel | payload | event |
//! |---|---|---|
//! | `tollgate_agent` | agent id | [`Change::Agent`]: token rotated, VPS re-assigned or changed, agent deleted |
//! | `tollgate_billing` | `user:<id>` or `plan:<id>` | [`Change::Billing`]: limits, rates or budget changed |
//! | `tollgate_decision` | `<user id>:<period start>` | [`Change::Decision`]: a decision was published |

use sqlx::PgPool;
use uuid::Uuid;

use super::{usage, AGENT_CHANNEL, BILLING_CHANNEL, DECISION_CHANNEL};
use crate::billing::Period;

/// A change someone else made that may matter to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An agent's token, VPS or VPS details changed, or the agent was deleted.
    Agent(Uuid),
    /// Limits, rates or budget changed.
    Billing(BillingChange),
    /// A decision was published for `user` in `period`.
    Decision { user: Uuid, period: Period },
}

/// Whose limits, rates or budget changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingChange {
    User(Uuid),
    /// Every user on the plan.
    Plan(Uuid),
}

impl BillingChange {
    /// The users the change affects.
    pub async fn users(self, pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
        match self {
            BillingChange::User(user) => Ok(vec![user]),
            BillingChange::Plan(plan) => usage::users_on_plan(pool, plan).await,
        }
    }
}

/// A notification that does not parse: its channel and payload, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed notification on {channel}: {payload:?}")]
pub struct Malformed {
    pub channel: String,
    pub payload: String,
}

impl Change {
    /// Every channel that carries changes.
    pub const CHANNELS: [&'static str; 3] = [AGENT_CHANNEL, BILLING_CHANNEL, DECISION_CHANNEL];

    /// Parse one notification.
    pub fn parse(channel: &str, payload: &str) -> Result<Change, Malformed> {
        let parsed = match channel {
            AGENT_CHANNEL => payload.parse().ok().map(Change::Agent),
            BILLING_CHANNEL => match payload.split_once(':') {
                Some(("user", id)) => id.parse().ok().map(BillingChange::User),
                Some(("plan", id)) => id.parse().ok().map(BillingChange::Plan),
                _ => None,
            }
            .map(Change::Billing),
            DECISION_CHANNEL => payload.split_once(':').and_then(|(user, period)| {
                Some(Change::Decision {
                    user: user.parse().ok()?,
                    period: period.parse().ok()?,
                })
            }),
            _ => None,
        };
        parsed.ok_or_else(|| Malformed {
            channel: channel.to_owned(),
            payload: payload.chars().take(200).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_parses_into_its_event() {
        let id = Uuid::new_v4();
        assert_eq!(
            Change::parse(AGENT_CHANNEL, &id.to_string()),
            Ok(Change::Agent(id))
        );
        assert_eq!(
            Change::parse(BILLING_CHANNEL, &format!("user:{id}")),
            Ok(Change::Billing(BillingChange::User(id)))
        );
        assert_eq!(
            Change::parse(BILLING_CHANNEL, &format!("plan:{id}")),
            Ok(Change::Billing(BillingChange::Plan(id)))
        );
        let period: Period = "2026-12-01".parse().unwrap();
        assert_eq!(
            Change::parse(DECISION_CHANNEL, &format!("{id}:2026-12-01")),
            Ok(Change::Decision { user: id, period })
        );
    }

    #[test]
    fn malformed_payloads_are_refused_not_guessed() {
        for (channel, payload) in [
            (AGENT_CHANNEL, "not-a-uuid"),
            (BILLING_CHANNEL, "team:00000000-0000-0000-0000-000000000000"),
            (BILLING_CHANNEL, "user:nope"),
            (DECISION_CHANNEL, "00000000-0000-0000-0000-000000000000"),
            (
                DECISION_CHANNEL,
                "00000000-0000-0000-0000-000000000000:yesterday",
            ),
            ("other_channel", "x"),
        ] {
            assert!(
                Change::parse(channel, payload).is_err(),
                "{channel} {payload}"
            );
        }
    }
}
