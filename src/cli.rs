//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tollgate: metering proxy and usage enforcer for one-agent-per-VPS fleets.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// Config file (TOML). Default: $TOLLGATE_CONFIG, else built-in defaults.
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the metering proxy (egress forward proxy, ingress gateway proxy, admin listener).
    Proxy {
        /// Do not apply migrations at start (for database users without DDL rights).
        #[arg(long)]
        skip_migrations: bool,
    },
    /// Run the monitor: sample CPU/memory, publish decisions (one active, others stand by).
    Monitor {
        /// Do not apply migrations at start.
        #[arg(long)]
        skip_migrations: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Everything on one machine: PostgreSQL, demo data, proxy, monitor and a demo gateway.
    Dev {
        /// Use the private PostgreSQL even when a server answers on 127.0.0.1:5432
        /// (DATABASE_URL, when set, still wins).
        #[arg(long)]
        private_postgres: bool,
        /// Folder of the private PostgreSQL: its cluster in DIR/data, log and socket.
        /// Default: target/tollgate-postgres.
        #[arg(long, value_name = "DIR")]
        postgres_dir: Option<PathBuf>,
        /// Port of the private PostgreSQL on 127.0.0.1.
        #[arg(long, value_name = "PORT", default_value_t = tollgate_core::local_postgres::PRIVATE_PORT)]
        postgres_port: u16,
    },
    /// Current-period usage per user against plan limits, overage cost, budget and decision.
    Usage {
        /// Only this user (email or id).
        #[arg(long)]
        user: Option<String>,
        /// Billing month, YYYY-MM (UTC). Default: the current month.
        #[arg(long)]
        period: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV (a header line, then one line per user), as the usage API's
        /// `/v1/usage.csv` export does.
        #[arg(long)]
        csv: bool,
    },
    /// Egress bytes per VPS per destination host in a month, largest first.
    Destinations {
        /// Only the VPS of this agent (its id).
        #[arg(long)]
        agent: Option<String>,
        /// Month, YYYY-MM (UTC). Default: the current month.
        #[arg(long)]
        period: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and print the effective config with secrets masked.
    CheckConfig {
        /// Config file; overrides --config.
        file: Option<PathBuf>,
    },
}
