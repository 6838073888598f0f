//! The start of every service binary (`proxy`, `backend`, `ai-node`): one
//! flag set, logging, and loading the configuration with one exit code.
//!
//! `-c/--config FILE` names the file; `-t/--test` checks it (file,
//! environment and flags) and exits, like `nginx -t`. `--check-config` is the
//! old spelling of `--test`, kept so no operator's command breaks. An
//! unusable configuration prints every problem and exits [`EXIT_CONFIG`].

use crate::config::ConfigError;
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit code of an unusable configuration (`EX_USAGE`), in every binary.
pub const EXIT_CONFIG: u8 = 64;

/// The flags every service binary takes.
#[derive(Debug, clap::Args)]
pub struct ConfigFlags {
    /// Configuration file (TOML); built-in defaults when absent.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file, environment and flags) and exit: 0 when usable, 64 when not.
    #[arg(short, long, visible_alias = "check-config")]
    pub test: bool,
}

/// Starts logging: `RUST_LOG`, info by default.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// What to do with a loaded configuration. `Err` carries the exit code when
/// the binary must stop here: an unusable configuration ([`EXIT_CONFIG`],
/// every problem printed), or a usable one under `--test` (0).
pub fn checked<C>(flags: &ConfigFlags, loaded: Result<C, ConfigError>) -> Result<C, ExitCode> {
    let name = flags.config.as_ref().map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
    let config = loaded.map_err(|e| {
        eprintln!("{e}");
        eprintln!("configuration {name} is invalid");
        ExitCode::from(EXIT_CONFIG)
    })?;
    if flags.test {
        println!("configuration {name} is ok");
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
