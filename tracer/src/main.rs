use std::process::ExitCode;

use clap::Parser as _;
use hvnet::{
    agent, bench,
    cli::{Cli, Command},
    client,
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
            runtime()?.block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(args) => {
            runtime()?.block_on(client::follow_events(args.agent))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(args) => {
            let path = format!("/api/v1/vms/{}/explain", args.vm);
            print!(
                "{}",
                runtime()?.block_on(client::get_text(args.agent.agent, &path))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => {
            runtime()?.block_on(top(args.agent.agent, args.once))?;
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

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

async fn top(agent: std::net::SocketAddr, once: bool) -> anyhow::Result<()> {
    let mut before = client::get_json(agent, "/api/v1/vms").await?;
    let mut at = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = client::get_json(agent, "/api/v1/vms").await?;
        let table = client::render_top(&now, Some((&before, at.elapsed().as_secs_f64())));
        if once {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and redraw, like top(1).
        print!("\x1b[2J\x1b[H{table}");
        before = now;
        at = std::time::Instant::now();
    }
}
