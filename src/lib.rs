//! The `tollgate` command: one binary for the proxy, the monitor and the
//! operator tools. `main` parses arguments and config and calls [`run`].
#![forbid(unsafe_code)]

pub mod cli;
pub mod demo_gateway;
pub mod destination_report;
pub mod dev;
pub mod usage_report;

use anyhow::Context;
use tollgate_core::billing::Period;
use tollgate_core::config::Config;
use tollgate_core::db;

use cli::Command;

/// Run one command to completion.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let pool = db::lazy_pool(&config.database, "tollgate-migrate")?;
            db::migrate(&pool).await.with_context(|| {
                format!(
                    "applying migrations to {}",
                    tollgate_core::config::mask_url_password(&config.database.url)
                )
            })?;
            let latest = db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
            println!("database is at migration {latest:03}");
            Ok(())
        }
        Command::Proxy { skip_migrations } => {
            let listeners = tollgate_proxy::Listeners::bind(&config).await?;
            let options = tollgate_proxy::Options {
                migrate: !skip_migrations,
                workers: tollgate_proxy::workers::configured(),
                ..Default::default()
            };
            tollgate_proxy::run(
                config,
                listeners,
                options,
                tollgate_core::shutdown::on_signal(),
            )
            .await
        }
        Command::Monitor { skip_migrations } => {
            let admin = tollgate_monitor::bind_admin(&config).await?;
            let options = tollgate_monitor::Options {
                migrate: !skip_migrations,
                ..Default::default()
            };
            tollgate_monitor::run(config, admin, options, tollgate_core::shutdown::on_signal())
                .await
        }
        Command::Dev {
            private_postgres,
            postgres_dir,
            postgres_port,
        } => {
            let mut search = tollgate_core::local_postgres::Search::under(&dev::target_dir());
            search.try_local = !private_postgres;
            search.dir = postgres_dir.unwrap_or(search.dir);
            search.port = postgres_port;
            dev::run(config, search).await
        }
        Command::Usage {
            user,
            period,
            json,
            csv,
        } => {
            let period = match period {
                Some(p) => p.parse::<Period>().map_err(anyhow::Error::msg)?,
                None => Period::current(),
            };
            let pool = db::lazy_pool(&config.database, "tollgate-usage")?;
            let from = || {
                format!(
                    "reading usage from {}",
                    tollgate_core::config::mask_url_password(&config.database.url)
                )
            };
            if csv {
                let mut out = std::io::stdout().lock();
                return usage_report::write_csv(&pool, period, user.as_deref(), &mut out)
                    .await
                    .with_context(from);
            }
            let rows = usage_report::rows(&pool, period, user.as_deref())
                .await
                .with_context(from)?;
            usage_report::print(&rows, json, &mut std::io::stdout().lock())
        }
        Command::Destinations {
            agent,
            period,
            json,
        } => {
            let period = match period {
                Some(p) => p.parse::<Period>().map_err(anyhow::Error::msg)?,
                None => Period::current(),
            };
            let pool = db::lazy_pool(&config.database, "tollgate-destinations")?;
            let rows = destination_report::rows(&pool, period, agent.as_deref())
                .await
                .with_context(|| {
                    format!(
                        "reading bytes per destination from {}",
                        tollgate_core::config::mask_url_password(&config.database.url)
                    )
                })?;
            destination_report::print(&rows, json, &mut std::io::stdout().lock())
        }
        Command::CheckConfig { .. } => unreachable!("handled in main before the runtime starts"),
    }
}
