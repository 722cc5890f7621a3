use std::process::ExitCode;

use clap::Parser as _;
use hvnet::{
    agent, bench,
    cli::{Cli, Command},
    config::{Config, FileConfig},
    privileges,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,netlink_packet_route=error"),
    )
    .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // One line, the whole cause chain: what failed and what to do.
            eprintln!("hvnet: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let file = match &args.config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let config = Config::resolve(file, args.overrides())?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            privileges::check()?;
            let rows = bench::run(args.repeat, args.rounds.max(1))?;
            Ok(if bench::print(&rows) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
