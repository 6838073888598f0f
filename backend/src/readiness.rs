//! Whether this backend can serve chats: its event store answers.
//!
//! `/health` says the process is up (liveness); `/ready` also says the
//! event store answered within the last couple of seconds, so a proxy whose
//! health checks use `/ready` takes out a backend cut off from Redis while
//! the others still reach it. Once the store has been lost for
//! `stream.close_when_store_lost`, the sockets here are closed with 1012
//! (the clients reconnect through the proxy and resume elsewhere).

use crate::App;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the store is pinged, and the bound of one ping.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Failed pings spanning this long make the backend unready.
const UNREADY_AFTER: Duration = Duration::from_secs(2);

pub struct Readiness {
    ready: AtomicBool,
    /// When the first ping of the current run of failures failed.
    failing_since: Mutex<Option<Instant>>,
    /// True while sockets must close: the store lost for long enough.
    evacuate: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness { ready: AtomicBool::new(true), failing_since: Mutex::new(None), evacuate: watch::channel(false).0 }
    }
}

impl Readiness {
    /// Whether the store answered lately.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Says when this backend's sockets must close (the value turns true).
    pub fn evacuation(&self) -> watch::Receiver<bool> {
        self.evacuate.subscribe()
    }

    fn record(&self, answered: bool, close_after: Option<Duration>) {
        let mut since = self.failing_since.lock().unwrap();
        if answered {
            if since.take().is_some() {
                log::info!("the event store answers again: ready");
            }
            self.ready.store(true, Ordering::Relaxed);
            self.evacuate.send_if_modified(|v| std::mem::replace(v, false));
            return;
        }
        let failing = since.get_or_insert_with(Instant::now).elapsed();
        if failing >= UNREADY_AFTER && self.ready.swap(false, Ordering::Relaxed) {
            log::warn!("the event store has not answered for {failing:?}: not ready");
        }
        if close_after.is_some_and(|after| failing >= after) && !*self.evacuate.borrow() {
            log::warn!("the event store lost for {failing:?}: closing every socket (1012) so clients move");
            self.evacuate.send_replace(true);
        }
    }

    /// Pings the store every second until `stop` turns true.
    pub fn spawn(app: Arc<App>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PING_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let answered = matches!(tokio::time::timeout(PING_EVERY, app.ledger.ping()).await, Ok(Ok(())));
                app.readiness.record(answered, app.config.close_when_store_lost);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unready_only_after_failures_span_the_window_and_ready_on_the_first_answer() {
        let r = Readiness::default();
        r.record(false, Some(Duration::from_secs(3600)));
        assert!(r.is_ready(), "one failed ping is not enough");
        *r.failing_since.lock().unwrap() = Some(Instant::now() - UNREADY_AFTER);
        r.record(false, Some(Duration::from_secs(3600)));
        assert!(!r.is_ready());
        assert!(!*r.evacuation().borrow(), "not lost long enough to close sockets");
        r.record(false, Some(Duration::from_secs(1)));
        assert!(*r.evacuation().borrow(), "lost past close_when_store_lost: sockets close");
        r.record(true, Some(Duration::from_secs(1)));
        assert!(r.is_ready() && !*r.evacuation().borrow());
    }
}
