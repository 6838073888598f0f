//! Live upstream changes: on `SIGHUP` the configuration file is read and
//! checked again (with the same environment and command-line overrides), and
//! each group's server list and settings are swapped in. Open connections
//! and WebSockets are untouched; only new requests see the new ring. A file
//! that fails its checks changes nothing.

use std::path::PathBuf;
use std::sync::Arc;

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

/// Installs the process's `SIGHUP` handler at once, so a reload signal that
/// arrives before the reload service runs is not fatal (the default action
/// of `SIGHUP` is to terminate).
pub fn catch_sighup_early() {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        if let Err(e) = signal(SignalKind::hangup()) {
            log::warn!("cannot install the SIGHUP handler: {e}");
        }
    });
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
