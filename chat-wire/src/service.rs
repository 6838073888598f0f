//! The start of a service binary, shared by `ai-node` and `backend`: the
//! `--config FILE` and `--check-config` flags, logging, and loading the
//! configuration (an invalid one prints every problem and exits 64).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The flags every service binary takes.
#[derive(Debug, clap::Args)]
pub struct ConfigFlags {
    /// Configuration file (TOML); built-in defaults when absent.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file and environment) and exit: 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,
}

/// The configuration loader of a service: file (or defaults) plus environment.
pub type Loader<C> = fn(Option<&Path>, &dyn Fn(&str) -> Option<String>) -> Result<C, String>;

/// Starts logging (`RUST_LOG`, info by default) and loads the configuration.
/// `Err` carries the exit code when the binary must stop here: a bad
/// configuration (64), or a good one under `--check-config` (0).
pub fn start<C>(flags: &ConfigFlags, load: Loader<C>) -> Result<C, ExitCode> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = load(flags.config.as_deref(), &|k| std::env::var(k).ok()).map_err(|errors| {
        eprintln!("invalid configuration:\n{errors}");
        ExitCode::from(64)
    })?;
    if flags.check_config {
        println!("configuration ok");
        return Err(ExitCode::SUCCESS);
    }
    Ok(config)
}

/// The exit code of a service that ran: 0, or 1 with the error logged.
pub fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
