//! `backend`: parses flags, loads the configuration, serves until
//! SIGINT/SIGTERM; or, with a subcommand, issues or revokes an API key in
//! the configured Redis.

use backend::{config, App};
use clap::Parser;
use service_kit::flags::{self, ConfigFlags};
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The API gateway: round-robin with retry to the AI nodes, WebSocket streaming.")]
struct Args {
    #[command(flatten)]
    config: ConfigFlags,
    #[command(subcommand)]
    command: Option<KeyCommand>,
}

/// API keys in Redis (`chat:apikey:<sha256>`); the key itself is printed
/// once and stored nowhere.
#[derive(clap::Subcommand)]
enum KeyCommand {
    /// Issues a new key: prints it, stores its SHA-256 with its id and limits.
    NewKey {
        /// Who the key is for (A-Z a-z 0-9 _ - . :); its usage is counted under it.
        #[arg(long)]
        id: String,
        /// Requests it may start per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        requests_per_minute: u64,
        /// Tokens it may use per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        tokens_per_minute: u64,
        /// Answers it may have running at once (0: unlimited).
        #[arg(long, default_value_t = 0)]
        concurrent_streams: u64,
    },
    /// Revokes a key (the key, or its SHA-256).
    RevokeKey {
        /// The key or its SHA-256 in hex.
        key: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    flags::init_logging();
    let loaded = config::load(args.config.config.as_deref(), &service_kit::config::process_env);
    match (flags::checked(&args.config, loaded), args.command) {
        (Ok(config), None) => flags::finish(serve(config).await),
        (Ok(config), Some(command)) => flags::finish(keys(config, command).await),
        (Err(code), _) => code,
    }
}

async fn keys(config: config::Config, command: KeyCommand) -> anyhow::Result<()> {
    let redis = chat_wire::redis_conn::RedisConn::new(
        &config.redis_url,
        config.redis_connect_timeout,
        config.redis_command_timeout,
    )?;
    let mut pipe = redis::pipe();
    match command {
        KeyCommand::NewKey { id, requests_per_minute, tokens_per_minute, concurrent_streams } => {
            chat_wire::validate_id("id", &id)?;
            let key = backend::keys::generate();
            pipe.hset_multiple(
                chat_wire::keys::api_key(&backend::keys::hash(&key)),
                &[
                    ("id", id.clone()),
                    ("requests_per_minute", requests_per_minute.to_string()),
                    ("tokens_per_minute", tokens_per_minute.to_string()),
                    ("concurrent_streams", concurrent_streams.to_string()),
                ],
            )
            .ignore();
            redis.query::<()>(&pipe).await?;
            eprintln!("key for {id} (shown once; Redis keeps only its SHA-256):");
            println!("{key}");
        }
        KeyCommand::RevokeKey { key } => {
            let is_hash = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
            let sha = if is_hash { key.to_ascii_lowercase() } else { backend::keys::hash(&key) };
            let record = chat_wire::keys::api_key(&sha);
            pipe.exists(&record);
            let (exists,): (bool,) = redis.query(&pipe).await?;
            anyhow::ensure!(exists, "no such key in Redis");
            redis.query::<()>(redis::pipe().hset(&record, "revoked", "1").ignore()).await?;
            println!("revoked");
        }
    }
    Ok(())
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
