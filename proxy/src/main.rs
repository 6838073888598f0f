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
use service_kit::flags::{self, ConfigFlags};

/// Read when no `--config` is given.
const DEFAULT_CONFIG: &str = "conf/proxy.toml";

/// The edge proxy in front of the chat backends.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// `-c/--config FILE` (default conf/proxy.toml) and `-t/--test`.
    #[command(flatten)]
    config: ConfigFlags,
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
    let mut args = Args::parse();
    flags::init_logging();
    let flag = |value: &Option<String>, name: &str| value.clone().map(|v| (v, format!("flag --{name}")));
    let overrides = Overrides::from_env().then(Overrides {
        listen: flag(&args.listen, "listen"),
        status_listen: flag(&args.status_listen, "status-listen"),
        backends: flag(&args.backends, "backends"),
    });

    let path = args.config.config.get_or_insert_with(|| PathBuf::from(DEFAULT_CONFIG)).clone();
    let config = match flags::checked(&args.config, config::load(&path, &overrides)) {
        Ok(config) => config,
        Err(code) => return code,
    };

    let options = proxy::RunOptions { config_path: path, overrides, upgrade: args.upgrade, daemon: args.daemon };
    match proxy::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
