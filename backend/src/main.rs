//! `backend`: parses flags, loads the configuration, serves until SIGINT/SIGTERM.

use backend::{config, App};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The API gateway: round-robin with retry to the AI nodes, WebSocket streaming.")]
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
    let (listener, metrics) = backend::bind(&config).await?;
    log::info!(
        "backend_id={} listening on {} metrics on {:?} ai_nodes={}",
        config.backend_id,
        listener.local_addr()?,
        metrics.as_ref().map(|m| m.local_addr()).transpose()?,
        config.ai_nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(",")
    );
    let app = App::start(config).await?;
    backend::run(listener, metrics, app, chat_wire::http::shutdown_signal()).await?;
    Ok(())
}
