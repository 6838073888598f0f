//! `ai-node`: parses flags, loads the configuration, serves until SIGINT/SIGTERM.

use ai_node::{config, engine, Node};
use clap::Parser;
use service_kit::flags::{self, ConfigFlags};
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The internal AI node: generates answers and streams them through Redis.")]
struct Args {
    #[command(flatten)]
    config: ConfigFlags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    flags::init_logging();
    let loaded = config::load(args.config.config.as_deref(), &service_kit::config::process_env);
    match flags::checked(&args.config, loaded) {
        Ok(config) => flags::finish(serve(config).await),
        Err(code) => code,
    }
}

async fn serve(config: config::Config) -> anyhow::Result<()> {
    let store = ai_node::redis_store(&config)?;
    let engine = engine::from_config(&config.engine)?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    log::info!("node_id={} listening on {} redis={}", config.node_id, listener.local_addr()?, config.redis_url);
    let node = Node::new(config, store, engine);
    ai_node::run(listener, node, service_kit::http::shutdown_signal()).await?;
    Ok(())
}
