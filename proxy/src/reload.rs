//! Live upstream changes: on `SIGHUP` the configuration file is read and
//! checked again (with the same environment and command-line overrides), and
//! each group's server list and settings are swapped in. Open connections
//! and WebSockets are untouched; only new requests see the new ring. A file
//! that fails its checks changes nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config, Overrides};
use crate::State;

/// The background service waiting for `SIGHUP`.
pub struct Reloader {
    /// The file to read again.
    path: PathBuf,
    /// Overrides applied at start, applied again so precedence holds.
    overrides: Overrides,
    /// Groups to update and the reload counter.
    state: Arc<State>,
}

impl Reloader {
    /// A reloader of `path`.
    pub fn new(path: PathBuf, overrides: Overrides, state: Arc<State>) -> Self {
        Self { path, overrides, state }
    }

    /// Re-reads the file and applies its upstreams; returns whether it did.
    pub async fn reload(&self) -> bool {
        let new = match config::load(&self.path, &self.overrides) {
            Ok(c) => c,
            Err(e) => {
                log::error!("reload rejected, keeping the running configuration:\n{e}");
                self.state.metrics.reloads.with_label_values(&["rejected"]).inc();
                return false;
            }
        };
        for upstream in new.upstreams {
            match self.state.upstreams.get(&upstream.name) {
                Some(group) => {
                    log::info!("upstream {}: servers now {:?}", upstream.name, upstream.servers);
                    group.reconfigure(upstream).await;
                }
                None => log::warn!(
                    "upstream {} is new: adding a group needs a restart (or a graceful upgrade)",
                    upstream.name
                ),
            }
        }
        if new.routes != self.state.config.routes {
            log::warn!("route changes need a restart (or a graceful upgrade)");
        }
        self.state.metrics.reloads.with_label_values(&["applied"]).inc();
        true
    }
}

/// The configuration a process started with `running` has after a reload
/// of `new`: the upstream groups it already has take `new`'s settings, and
/// nothing else changes (as [`Reloader::reload`] applies it). A worker
/// process started after reloads starts from this.
pub fn applied(running: &Config, new: Config) -> Config {
    let mut out = running.clone();
    for upstream in new.upstreams {
        if let Some(group) = out.upstreams.iter_mut().find(|g| g.name == upstream.name) {
            *group = upstream;
        }
    }
    out
}

/// Set by every `SIGHUP` from [`catch_sighup_early`] on; read once by the
/// reload service when it starts listening, so a reload asked for while the
/// process was still starting is done rather than lost.
static EARLY_HANGUP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the process's `SIGHUP` handler at once: a reload signal that
/// arrives before the reload service runs is neither fatal (the default
/// action of `SIGHUP` is to terminate) nor forgotten (the service reloads
/// once when it starts, [`take_early_hangup`]).
pub fn catch_sighup_early() {
    let flag = EARLY_HANGUP.get_or_init(Default::default).clone();
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, flag) {
        log::warn!("cannot install the SIGHUP handler: {e}");
    }
}

/// Whether a `SIGHUP` came since [`catch_sighup_early`] (or since the last
/// call), clearing it.
fn take_early_hangup() -> bool {
    EARLY_HANGUP.get().is_some_and(|flag| flag.swap(false, Ordering::SeqCst))
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, live reload is off: {e}");
                return;
            }
        };
        // Subscribed from here on; a SIGHUP before this is only in the flag.
        // (One arriving just now is in both: the reload runs twice, alike.)
        if take_early_hangup() {
            log::info!("SIGHUP while starting: reloading {}", self.path.display());
            self.reload().await;
        }
        loop {
            tokio::select! {
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    log::info!("SIGHUP: reloading {}", self.path.display());
                    self.reload().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sighup_before_the_reload_service_is_survived_and_remembered_once() {
        catch_sighup_early();
        assert!(!take_early_hangup(), "no SIGHUP yet");
        // Without the handler this ends the test process.
        signal_hook::low_level::raise(signal_hook::consts::SIGHUP).unwrap();
        assert!(take_early_hangup(), "the early SIGHUP is remembered");
        assert!(!take_early_hangup(), "and taken once");
    }
}
