use std::process::ExitCode;

use clap::Parser as _;
use hvnet::{
    bench,
    cli::{Cli, Command},
    client::{self, AgentClient},
    config::{Config, FileConfig},
    daemon,
    kernel::privileges,
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
            runtime()?.block_on(daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(args) => {
            let client = AgentClient::new(&args.options())?;
            runtime()?.block_on(client.follow_events())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(args) => {
            let client = AgentClient::new(&args.agent.options())?;
            let runtime = runtime()?;
            if args.json {
                let explained = runtime.block_on(client.explain_json(&args.vm))?;
                println!("{}", serde_json::to_string_pretty(&explained)?);
            } else {
                print!("{}", runtime.block_on(client.explain(&args.vm))?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => {
            let client = AgentClient::new(&args.agent.options())?;
            runtime()?.block_on(top(&client, args.once, args.json))?;
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

async fn top(client: &AgentClient, once: bool, json: bool) -> anyhow::Result<()> {
    let mut before = client.vms().await?;
    let mut at = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = client.vms().await?;
        let rows = client::top_rows(&now, Some((&before, at.elapsed().as_secs_f64())));
        if once {
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", client::render_top(&rows));
            }
            return Ok(());
        }
        // Clear the screen and redraw, like top(1).
        print!("\x1b[2J\x1b[H{}", client::render_top(&rows));
        before = now;
        at = std::time::Instant::now();
    }
}
