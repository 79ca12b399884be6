//! The `tollgate` binary: parse arguments and config, set up logs, run a command.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tollgate::cli::{Cli, Command};
use tollgate_core::config::Config;

#[global_allocator]
static ALLOCATOR: tollgate_proxy::allocator::Allocator = tollgate_proxy::allocator::Allocator;

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
    let runtime = match runtime_builder(&cli.command).enable_all().build() {
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

/// The async runtime. The proxy serves from threads of its own, each with a
/// single-threaded runtime (`tollgate_proxy::workers`), the calling thread
/// being the first of them. Every other command gets one worker thread per
/// core (`TOKIO_WORKER_THREADS` overrides), and with a single worker the
/// current-thread scheduler, which does the same work without the
/// cross-thread hand-offs of the multi-thread one.
fn runtime_builder(command: &Command) -> tokio::runtime::Builder {
    let workers = tollgate_proxy::workers::configured();
    if workers == 1 || matches!(command, Command::Proxy { .. }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}
