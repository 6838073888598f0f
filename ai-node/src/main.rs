//! `ai-node`: parses flags, loads the configuration, serves until SIGINT/SIGTERM.

use ai_node::{config, engine, Node};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The internal AI node: generates answers and streams them through Redis.")]
struct Args {
    /// Configuration file (TOML); built-in defaults when absent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration (file and environment) and exit: 0 when valid, 64 when not.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = match config::load(args.config.as_deref(), &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("invalid configuration:\n{errors}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: config::Config) -> anyhow::Result<()> {
    let store = ai_node::redis_store(&config)?;
    let engine = engine::from_config(&config.engine)?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    log::info!("node_id={} listening on {} redis={}", config.node_id, listener.local_addr()?, config.redis_url);
    let node = Node::new(config, store, engine);
    ai_node::run(listener, node, chat_wire::http::shutdown_signal()).await?;
    Ok(())
}
