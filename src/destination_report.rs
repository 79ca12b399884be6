//! `tollgate destinations`: the egress bytes of each VPS per destination host
//! in a month (the `tollgate_destination_usage` view), largest first. A VPS's
//! hosts are its top `proxy.meter.destination_top_n`, plus `other` for the rest.

use std::io::Write;

use anyhow::{bail, Context};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_core::billing::Period;

use crate::usage_report::{bytes, write_table};

/// One VPS's bytes to one host in the period, as seen from the VPS.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DestinationRow {
    pub user_id: Uuid,
    pub email: String,
    /// The agent on the VPS now, if any.
    pub agent_id: Option<Uuid>,
    pub vps_id: Uuid,
    pub vps_name: String,
    #[sqlx(skip)]
    pub period: Option<Period>,
    /// The host as the requests named it, or `other`.
    pub host: String,
    /// Bytes the VPS received from the host.
    pub rx_bytes: i64,
    /// Bytes the VPS sent to the host.
    pub tx_bytes: i64,
    pub total_bytes: i64,
}

/// Rows for `period`, for one agent (by id) or every VPS, by total bytes.
pub async fn rows(
    pool: &PgPool,
    period: Period,
    agent: Option<&str>,
) -> anyhow::Result<Vec<DestinationRow>> {
    let agent_id = match agent {
        Some(a) => {
            let Ok(id) = a.parse::<Uuid>() else {
                bail!("`{a}` is not an agent id (a UUID)");
            };
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1)")
                    .bind(id)
                    .fetch_one(pool)
                    .await?;
            if !exists {
                bail!("no agent with id `{a}`");
            }
            Some(id)
        }
        None => None,
    };
    let mut rows: Vec<DestinationRow> = sqlx::query_as(
        "SELECT user_id, email, agent_id, vps_id, vps_name, host, rx_bytes, tx_bytes, total_bytes
         FROM tollgate_destination_usage
         WHERE period_start = $1 AND ($2::uuid IS NULL OR agent_id = $2)
         ORDER BY total_bytes DESC, email, vps_id, host",
    )
    .bind(period.start())
    .bind(agent_id)
    .fetch_all(pool)
    .await
    .context("reading tollgate_destination_usage")?;
    for r in &mut rows {
        r.period = Some(period);
    }
    Ok(rows)
}

/// Print `rows` as JSON (an array) or as an aligned table.
pub fn print(rows: &[DestinationRow], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let header = ["USER", "AGENT", "VPS", "HOST", "RECEIVED", "SENT", "TOTAL"];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        table.push(vec![
            r.email.clone(),
            r.agent_id.map_or_else(|| "-".into(), |a| a.to_string()),
            r.vps_name.clone(),
            r.host.clone(),
            bytes(r.rx_bytes),
            bytes(r.tx_bytes),
            bytes(r.total_bytes),
        ]);
    }
    write_table(&table, out)?;
    if rows.is_empty() {
        writeln!(out, "(no egress bytes per destination in this period)")?;
    }
    Ok(())
}
