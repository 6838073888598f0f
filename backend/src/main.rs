//! `backend`: parses flags, loads the configuration, serves until SIGINT/SIGTERM.

use backend::{config, App};
use clap::Parser;
use service_kit::flags::{self, ConfigFlags};
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The API gateway: round-robin with retry to the AI nodes, WebSocket streaming.")]
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
    let (listener, metrics) = backend::bind(&config).await?;
    log::info!(
        "backend_id={} listening on {} metrics on {:?} ai_nodes={}",
        config.backend_id,
        listener.local_addr()?,
        metrics.as_ref().map(|m| m.local_addr()).transpose()?,
        config.ai_nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(",")
    );
    let app = App::start(config).await?;
    backend::run(listener, metrics, app, service_kit::http::shutdown_signal()).await?;
    Ok(())
}
