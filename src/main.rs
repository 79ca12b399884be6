//! The `tollgate` binary: parse arguments and config, set up logs, run a command.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tollgate::cli::{Cli, Command};
use tollgate_core::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::CheckConfig { file: Some(file) } => Some(file.clone()),
        _ => cli.config.clone(),
    };
    // Validated before any port is bound; a bad config is one line and exit 2.
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig { .. } = cli.command {
        print!("{}", config.to_masked_toml());
        return ExitCode::SUCCESS;
    }
    tollgate_core::telemetry::init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
