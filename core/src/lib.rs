//! What Tollgate's proxy, monitor and CLI share.
//!
//! - [`config`]: the TOML file with `TOLLGATE_*` overrides, validated up front.
//! - [`billing`]: periods, the provider metering policy, overage cost and the
//!   allow/block decision (SPEC §3) — pure, no I/O.
//! - [`clock`]: the time seam billing periods come from.
//! - [`db`]: the pool, migrations and every query, batched.
//! - [`local_postgres`]: finding or starting PostgreSQL for `dev` and tests.
//! - [`telemetry`]: tracing and the Prometheus recorder.
//! - [`shutdown`]: the signal-driven cancellation token.
//! - [`admin`]: the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`usage_report`]: usage, limits, overage, budget and decision per user in a
//!   period, and its CSV: what `tollgate usage` and the usage API return.
#![forbid(unsafe_code)]

pub mod admin;
pub mod billing;
pub mod clock;
pub mod config;
pub mod db;
pub mod local_postgres;
pub mod shutdown;
pub mod telemetry;
pub mod usage_report;
