//! `proxy`: parses flags, sets up logging, loads the configuration and
//! hands over to [`proxy::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// jemalloc: about 8% less CPU per proxied request than glibc's malloc,
/// whose arena locks showed in the profile under load (benches/results).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use proxy::config::{self, Overrides};

/// The edge proxy in front of the chat backends.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "conf/proxy.toml")]
    config: PathBuf,
    /// Check the configuration and exit: 0 when usable, 1 when not.
    #[arg(short, long)]
    test: bool,
    /// Public listener address (overrides the file and PROXY_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Status listener address (overrides the file and PROXY_STATUS_LISTEN).
    #[arg(long)]
    status_listen: Option<String>,
    /// Backends, comma-separated host:port (overrides the file and PROXY_BACKENDS).
    #[arg(long)]
    backends: Option<String>,
    /// Graceful upgrade: take the listeners over from the running proxy.
    #[arg(short, long)]
    upgrade: bool,
    /// Run in the background.
    #[arg(short, long)]
    daemon: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let flag = |value: &Option<String>, name: &str| value.clone().map(|v| (v, format!("flag --{name}")));
    let overrides = Overrides::from_env().then(Overrides {
        listen: flag(&args.listen, "listen"),
        status_listen: flag(&args.status_listen, "status-listen"),
        backends: flag(&args.backends, "backends"),
    });

    let config = match config::load(&args.config, &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            if args.test {
                eprintln!("configuration {} test failed", args.config.display());
            }
            return ExitCode::FAILURE;
        }
    };
    if args.test {
        println!("configuration {} is ok", args.config.display());
        return ExitCode::SUCCESS;
    }

    let options = proxy::RunOptions { config_path: args.config, overrides, upgrade: args.upgrade, daemon: args.daemon };
    match proxy::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
