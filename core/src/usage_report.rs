//! The usage report: each user's usage in a period against their plan, the
//! overage cost, the budget, and the decision the billing rules give for those
//! figures (next to the decision last published, when there is one).
//!
//! `tollgate usage` and the proxy's usage API both read it from here, so the
//! CLI, the API and enforcement agree: the figures come from
//! [`usage::user_billing`], the statement every decision is made from, and the
//! decision from [`billing::decide`](crate::billing::decide). [`CsvExport`]
//! writes the CSV of a period a page of users at a time, for both.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::billing::{BlockReason, Decision, OnExhausted, Period};
use crate::db::{decisions, usage};

/// One user's line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub user_id: Uuid,
    pub email: String,
    pub plan: Option<String>,
    pub period: Period,
    #[serde(flatten)]
    pub decision: Decision,
    /// `allowed`, or `blocked:<reason>`, as the rules give it now.
    pub status: String,
    /// The decision last published for this period, in the same form, if any.
    pub published_status: Option<String>,
}

/// Rows for `period`, for `users` (those that exist) or every user, in email
/// order.
pub async fn rows(
    pool: &PgPool,
    period: Period,
    users: Option<&[Uuid]>,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    let all;
    let ids = match users {
        Some(ids) => ids,
        None => {
            all = usage::all_users(pool).await?;
            &all
        }
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let billing = usage::user_billing(pool, ids, period).await?;
    let published: HashMap<Uuid, String> = decisions::load(pool, period, Some(ids))
        .await?
        .into_iter()
        .map(|d| (d.user_id, status_of(d.blocked, d.on_exhausted)))
        .collect();
    Ok(billing
        .into_iter()
        .map(|b| {
            let decision = b.decide();
            UsageRow {
                status: status_of(decision.blocked, decision.on_exhausted),
                published_status: published.get(&b.user_id).cloned(),
                user_id: b.user_id,
                email: b.email,
                plan: b.plan_name,
                period,
                decision,
            }
        })
        .collect())
}

/// `allowed`, `blocked:<reason>`, or `throttled:<reason>` for a plan that
/// throttles its exhausted users.
pub fn status_of(blocked: Option<BlockReason>, on_exhausted: OnExhausted) -> String {
    match (blocked, on_exhausted) {
        (None, _) => "allowed".to_owned(),
        (Some(r), OnExhausted::Block) => format!("blocked:{r}"),
        (Some(r), OnExhausted::Throttle { .. }) => format!("throttled:{r}"),
    }
}

/// The CSV header line. Quantities are in the units the tables hold: bytes,
/// CPU-milliseconds, MB-seconds, cents. Limits are empty for a user without a plan.
pub const CSV_HEADER: &str = "period,user_id,email,plan,\
bandwidth_bytes,cpu_ms,memory_mb_seconds,max_vps_storage_bytes,\
max_bandwidth_bytes,max_cpu_ms,max_memory_mb_seconds,max_storage_bytes,\
overage_bandwidth_bytes,overage_cpu_ms,overage_memory_mb_seconds,\
overage_cost_cents,budget_cents,status,published_status\n";

/// Append `row` to `out` as one CSV line (RFC 4180 quoting, `\n` line end).
pub fn write_csv_row(row: &UsageRow, out: &mut String) {
    let f = &row.decision.figures;
    let (u, o) = (&f.usage, &f.overage);
    let _ = write!(out, "{},{},", row.period, row.user_id);
    csv_field(&row.email, out);
    out.push(',');
    csv_field(row.plan.as_deref().unwrap_or(""), out);
    let _ = write!(
        out,
        ",{},{},{},{},",
        u.bandwidth_bytes, u.cpu_ms, u.memory_mb_seconds, u.max_vps_storage_bytes
    );
    match &f.limits {
        Some(l) => {
            let _ = write!(
                out,
                "{},{},{},{},",
                l.max_bandwidth_bytes, l.max_cpu_ms, l.max_memory_mb_seconds, l.max_storage_bytes
            );
        }
        None => out.push_str(",,,,"),
    }
    let _ = write!(
        out,
        "{},{},{},{},{},{},{}",
        o.bandwidth_bytes,
        o.cpu_ms,
        o.memory_mb_seconds,
        f.overage_cost_cents,
        f.budget_cents,
        row.status,
        row.published_status.as_deref().unwrap_or("")
    );
    out.push('\n');
}

/// `value` as a CSV field: quoted, with quotes doubled, when it holds a comma,
/// a quote or a line break.
fn csv_field(value: &str, out: &mut String) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// Users per page of a [`CsvExport`].
pub const CSV_PAGE_USERS: i64 = 500;

/// The CSV of a period, one page of users at a time: the header, then one line
/// per user in email order. Only one page is ever in memory, so the export of a
/// large fleet streams.
pub struct CsvExport {
    pool: PgPool,
    period: Period,
    only: Option<Vec<Uuid>>,
    /// Email of the last user written; `None` before the first page.
    after: Option<String>,
    started: bool,
    done: bool,
    page_users: i64,
}

impl CsvExport {
    /// The export of `period` for every user, or only for `only`.
    pub fn new(pool: PgPool, period: Period, only: Option<Vec<Uuid>>) -> Self {
        Self::with_page_size(pool, period, only, CSV_PAGE_USERS)
    }

    /// As [`CsvExport::new`], `page_users` users per page (at least 1).
    pub fn with_page_size(
        pool: PgPool,
        period: Period,
        only: Option<Vec<Uuid>>,
        page_users: i64,
    ) -> Self {
        CsvExport {
            pool,
            period,
            only,
            after: None,
            started: false,
            done: false,
            page_users: page_users.max(1),
        }
    }

    /// The next part of the CSV (the first starts with the header), or `None`
    /// once every user has been written.
    pub async fn next_chunk(&mut self) -> Result<Option<String>, sqlx::Error> {
        if self.done {
            return Ok(None);
        }
        let page = usage::user_page(
            &self.pool,
            self.after.as_deref(),
            self.only.as_deref(),
            self.page_users,
        )
        .await?;
        let mut out = String::new();
        if !self.started {
            out.push_str(CSV_HEADER);
            self.started = true;
        }
        if (page.len() as i64) < self.page_users {
            self.done = true;
        }
        let Some((_, last)) = page.last() else {
            return Ok((!out.is_empty()).then_some(out));
        };
        self.after = Some(last.clone());
        let ids: Vec<Uuid> = page.iter().map(|(id, _)| *id).collect();
        for row in rows(&self.pool, self.period, Some(&ids)).await? {
            write_csv_row(&row, &mut out);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{decide, PlanLimits, Usage};

    fn row(email: &str, plan: Option<PlanLimits>) -> UsageRow {
        let usage = Usage {
            bandwidth_bytes: 3 << 30,
            cpu_ms: 7,
            memory_mb_seconds: 11,
            max_vps_storage_bytes: 13,
        };
        let decision = decide(plan.as_ref(), &usage, 150);
        UsageRow {
            user_id: Uuid::nil(),
            email: email.into(),
            plan: plan.map(|_| "pro, \"annual\"".into()),
            period: "2025-03".parse().unwrap(),
            status: status_of(decision.blocked, decision.on_exhausted),
            decision,
            published_status: None,
        }
    }

    #[test]
    fn csv_lines_have_every_header_column_and_quote_what_needs_it() {
        let limits = PlanLimits {
            max_bandwidth_bytes: 1 << 30,
            max_cpu_ms: 100,
            max_memory_mb_seconds: 200,
            max_storage_bytes: 300,
            bandwidth_cents_per_gib: 50,
            cpu_cents_per_hour: 0,
            memory_cents_per_gib_hour: 0,
        };
        let mut out = String::new();
        write_csv_row(&row("a,b@example.com", Some(limits)), &mut out);
        assert_eq!(
            out,
            "2025-03,00000000-0000-0000-0000-000000000000,\"a,b@example.com\",\
             \"pro, \"\"annual\"\"\",3221225472,7,11,13,1073741824,100,200,300,\
             2147483648,0,0,100,150,allowed,\n"
        );
        let mut out = String::new();
        write_csv_row(&row("c@example.com", None), &mut out);
        assert!(
            out.contains(",c@example.com,,3221225472,7,11,13,,,,,"),
            "{out}"
        );
        assert!(out.ends_with(",blocked:no_plan,\n"), "{out}");
        let columns = CSV_HEADER.trim_end().split(',').count();
        assert_eq!(columns, 19);
        // Both lines have as many fields as the header once quoted commas are
        // discounted.
        assert_eq!(out.trim_end().split(',').count(), columns);
    }
}
