//! The process's shutdown signals, as Pingora's own watcher reads them, with
//! one difference: `SIGQUIT` (hand the listeners to a new process, then
//! drain) is obeyed only when a new process is waiting for them on
//! `server.upgrade_sock`. Pingora would drain and exit anyway, leaving the
//! port with no listener; here the signal is logged and the proxy serves on.

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

/// The watcher handed to Pingora's `Server::run`.
pub struct Signals {
    upgrade_sock: String,
}

impl Signals {
    /// Watches for the signals; a hand-over goes to `upgrade_sock`.
    pub fn new(upgrade_sock: &str) -> Signals {
        Signals { upgrade_sock: upgrade_sock.to_owned() }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    if someone_listens_on(&self.upgrade_sock) {
                        return ShutdownSignal::GracefulUpgrade;
                    }
                    ignored_quit(&self.upgrade_sock);
                }
                _ = terminate.recv() => return ShutdownSignal::GracefulTerminate,
                _ = interrupt.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

/// Logs a `SIGQUIT` that is not obeyed: nobody waits to take over.
pub fn ignored_quit(upgrade_sock: &str) {
    log::warn!("SIGQUIT: no new process waits on {upgrade_sock} (start it with --upgrade first); still serving");
}

/// Whether a Unix socket bound to `path` is listening, from `/proc/net/unix`
/// (flag `__SO_ACCEPTCON`). Connecting to find out would be taken by the new
/// process as the hand-over itself.
pub fn someone_listens_on(path: &str) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let wanted = std::fs::canonicalize(path).ok();
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        // Not Linux, or /proc is hidden: do as Pingora does.
        return true;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (fields.get(3), fields.get(7)) else { return false };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & ACCEPTCON != 0);
        listening && (*bound == path || wanted.as_deref() == Some(std::path::Path::new(bound)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_unix_socket_is_seen_and_a_bound_file_alone_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let path_text = path.to_str().unwrap();
        assert!(!someone_listens_on(path_text));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(someone_listens_on(path_text));
        drop(listener);
        assert!(path.exists(), "the file stays after the listener is gone");
        assert!(!someone_listens_on(path_text));
    }
}
