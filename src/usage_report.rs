//! `tollgate usage`: each user's usage in a period against their plan, the overage
//! cost, the budget, and the decision the billing rules give for those figures
//! (next to the decision last published, when there is one). The rows and the
//! CSV come from [`tollgate_core::usage_report`], which the usage API serves too;
//! this module finds the user and prints.

use std::io::Write;

use anyhow::{bail, Context};
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_core::billing::Period;
pub use tollgate_core::usage_report::UsageRow;
use tollgate_core::usage_report::{self, CsvExport};

/// The user with this email or id.
async fn find_user(pool: &PgPool, user: &str) -> anyhow::Result<Uuid> {
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM users WHERE email = $1 OR id::text = $1")
            .bind(user)
            .fetch_optional(pool)
            .await?;
    match id {
        Some(id) => Ok(id),
        None => bail!("no user with email or id `{user}`"),
    }
}

/// Rows for `period`, for one user (email or id) or all of them.
pub async fn rows(
    pool: &PgPool,
    period: Period,
    user: Option<&str>,
) -> anyhow::Result<Vec<UsageRow>> {
    let ids = match user {
        Some(u) => Some(vec![find_user(pool, u).await?]),
        None => None,
    };
    usage_report::rows(pool, period, ids.as_deref())
        .await
        .context("reading usage")
}

/// Write the CSV of `period` (one user, or all of them) to `out` as it is read,
/// a page of users at a time: the same bytes as the usage API's export.
pub async fn write_csv(
    pool: &PgPool,
    period: Period,
    user: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let only = match user {
        Some(u) => Some(vec![find_user(pool, u).await?]),
        None => None,
    };
    let mut export = CsvExport::new(pool.clone(), period, only);
    while let Some(chunk) = export.next_chunk().await.context("reading usage")? {
        out.write_all(chunk.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// Print `rows` as JSON (an array) or as an aligned table.
pub fn print(rows: &[UsageRow], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let header = [
        "USER",
        "PLAN",
        "BANDWIDTH",
        "CPU",
        "MEMORY",
        "STORAGE (max VPS)",
        "OVERAGE",
        "BUDGET",
        "DECISION",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let f = &r.decision.figures;
        let u = &f.usage;
        let (bw, cpu, mem, storage) = match &f.limits {
            Some(l) => (
                format!(
                    "{} / {}",
                    bytes(u.bandwidth_bytes),
                    bytes(l.max_bandwidth_bytes)
                ),
                format!("{} / {}", cpu_hours(u.cpu_ms), cpu_hours(l.max_cpu_ms)),
                format!(
                    "{} / {}",
                    gib_hours(u.memory_mb_seconds),
                    gib_hours(l.max_memory_mb_seconds)
                ),
                format!(
                    "{} / {}",
                    bytes(u.max_vps_storage_bytes),
                    bytes(l.max_storage_bytes)
                ),
            ),
            None => (
                bytes(u.bandwidth_bytes),
                cpu_hours(u.cpu_ms),
                gib_hours(u.memory_mb_seconds),
                bytes(u.max_vps_storage_bytes),
            ),
        };
        let mut decision = r.status.clone();
        if let Some(published) = r.published_status.as_ref().filter(|p| **p != r.status) {
            decision.push_str(&format!(" (published: {published})"));
        }
        table.push(vec![
            r.email.clone(),
            r.plan.clone().unwrap_or_else(|| "-".into()),
            bw,
            cpu,
            mem,
            storage,
            dollars(f.overage_cost_cents),
            dollars(f.budget_cents),
            decision,
        ]);
    }
    write_table(&table, out)?;
    if rows.is_empty() {
        writeln!(out, "(no users)")?;
    }
    Ok(())
}

/// Write `table` (a header row, then rows) with its columns aligned.
pub(crate) fn write_table(table: &[Vec<String>], out: &mut impl Write) -> anyhow::Result<()> {
    let columns = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// `n` bytes in binary units (`512 B`, `1.5 KiB`, `100.0 GiB`).
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn cpu_hours(ms: i64) -> String {
    format!("{:.2} CPU-h", ms as f64 / 3_600_000.0)
}

fn gib_hours(mb_seconds: i64) -> String {
    format!("{:.2} GiB-h", mb_seconds as f64 / (1024.0 * 3600.0))
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(107_374_182_400), "100.0 GiB");
        assert_eq!(cpu_hours(360_000_000), "100.00 CPU-h");
        assert_eq!(gib_hours(1_843_200_000), "500.00 GiB-h");
        assert_eq!(dollars(1234), "$12.34");
        assert_eq!(dollars(5), "$0.05");
    }
}
