//! Worker processes, like nginx's `worker_processes` (`server.processes`).
//!
//! With more than one, the process started becomes a supervisor: it maps the
//! memory the workers share ([`Shared`]: the `stub_status` counters and the
//! request-rate table), forks the workers (each a whole proxy with
//! `server.threads` threads, its own health checks and upstream pool, every
//! listener bound with `SO_REUSEPORT`, so the kernel spreads connections over
//! them), and then only watches: it passes `SIGHUP`, `SIGTERM` and `SIGINT`
//! on, starts a new worker when one dies, and stops when they have all ended.
//! Each worker serves its metrics to the others on a Unix socket, so
//! `/metrics` from any of them sums all ([`gather`]).
//!
//! Why: one process per core does about 20% more requests per CPU-second
//! than one process with as many threads (no cross-thread wake-ups or work
//! stealing; the `benches/ab.sh` A/B in the README), and each process has its own open-files
//! limit, which two descriptors per proxied WebSocket reach first.
//!
//! Graceful upgrade (`-u`): the new supervisor's workers bind the same ports
//! beside the old ones; once they answer, it listens on `server.upgrade_sock`
//! (as a one-process proxy waiting for listeners does), so the old
//! supervisor obeys `SIGQUIT` by draining and exiting. The new one writes the
//! pid file when the old one is gone.

pub mod gather;

use std::collections::hash_map::RandomState;
use std::io;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::Config;
use crate::limits::RateLimiter;
use crate::metrics::ConnectionStats;
use crate::{ProxyError, RunOptions};

/// Memory shared by every worker: made before they are forked.
pub struct Shared {
    /// `ConnectionStats::WORDS` counters, then the rate table.
    words: &'static [AtomicU64],
    /// Worker processes sharing it.
    processes: usize,
    /// Start of the rate limiter's windows.
    epoch: Instant,
    /// The rate limiter's hash keys.
    hasher: RandomState,
}

impl Shared {
    /// Maps the shared memory for `processes` workers.
    pub fn new(processes: usize) -> io::Result<Self> {
        let words = worker_sys::shared_words(ConnectionStats::WORDS + RateLimiter::WORDS)?;
        Ok(Self { words, processes, epoch: Instant::now(), hasher: RandomState::new() })
    }

    /// The `stub_status` counters as worker `worker` counts them.
    pub fn stats(&self, worker: usize) -> ConnectionStats {
        ConnectionStats::over(&self.words[..ConnectionStats::WORDS], worker, self.processes)
    }

    /// The request-rate limit over the shared table.
    pub fn limiter(&self, per_second: u32) -> RateLimiter {
        RateLimiter::over(&self.words[ConnectionStats::WORDS..], per_second, self.epoch, self.hasher.clone())
    }

    /// Forgets what worker `worker` had open (it has exited).
    fn forget_worker(&self, worker: usize) {
        ConnectionStats::forget_worker(&self.words[..ConnectionStats::WORDS], worker);
    }
}

/// Which worker a process is, and where its siblings are.
#[derive(Debug, Clone)]
pub struct Worker {
    /// This worker's number, from 0.
    pub index: usize,
    /// How many workers there are.
    pub count: usize,
    /// Directory of the workers' metrics sockets.
    pub dir: PathBuf,
    /// A relay worker's inbox: its siblings' WebSocket tunnels arrive here
    /// (`websocket.relays`; see [`crate::h1`]'s relay thread).
    pub relay_inbox: Option<Arc<UnixDatagram>>,
    /// Where a worker that relays none of its tunnels hands them.
    pub relay_outbox: Option<RelayOutbox>,
}

/// A relay worker, as a worker that hands it tunnels sees it.
#[derive(Debug, Clone)]
pub struct RelayOutbox {
    /// Its index (its open connections are counted in shared memory).
    pub worker: usize,
    /// The sending end of its inbox.
    pub socket: Arc<UnixDatagram>,
}

impl Worker {
    /// Where worker `index` serves its metrics.
    pub fn metrics_socket(&self, index: usize) -> PathBuf {
        metrics_socket(&self.dir, index)
    }
}

fn metrics_socket(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("worker-{index}.sock"))
}

/// Workers that die before they serve, this many times in a row, stop the
/// supervisor (they cannot bind, or their configuration cannot work).
const EARLY_DEATHS_ALLOWED: u32 = 3;

/// One worker process as the supervisor sees it.
struct Running {
    pid: Pid,
    /// Whether it has answered on its metrics socket (its listeners are bound).
    serving: bool,
}

/// Signals the supervisor has seen, set by handlers, read by its loop.
#[derive(Default)]
struct Seen {
    hangup: Arc<AtomicBool>,
    terminate: Arc<AtomicBool>,
    interrupt: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
}

impl Seen {
    fn watch() -> io::Result<Self> {
        let seen = Self::default();
        for (signal, flag) in [
            (signal_hook::consts::SIGHUP, &seen.hangup),
            (signal_hook::consts::SIGTERM, &seen.terminate),
            (signal_hook::consts::SIGINT, &seen.interrupt),
            (signal_hook::consts::SIGQUIT, &seen.quit),
        ] {
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(seen)
    }
}

/// Where an upgrade stands (`-u`).
enum Upgrade {
    /// Not an upgrade, or done: the pid file is ours.
    None,
    /// Our workers are starting beside proxy `old`.
    Starting { old: i32 },
    /// Ours serve; we listen on the upgrade socket until `old` is gone.
    Beside { old: i32, _listener: Option<UnixListener> },
}

/// Runs `serve` in `config.server.processes` worker processes and supervises
/// them until they have all ended. Must be called while the process has one
/// thread.
pub fn supervise(
    config: &Config,
    options: &RunOptions,
    shared: &Shared,
    serve: impl Fn(Worker, Config) -> Result<(), ProxyError>,
) -> Result<(), ProxyError> {
    // What a worker started from now on serves with: the file as reloaded.
    let mut current = config.clone();
    let count = config.server.processes;
    if options.daemon {
        worker_sys::detach().map_err(ProxyError::Workers)?;
    }
    let pid_file = PathBuf::from(&config.server.pid_file);
    let upgrade_sock = &config.server.upgrade_sock;
    let dir = PathBuf::from(format!("{upgrade_sock}.workers.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(ProxyError::Workers)?;
    let seen = Seen::watch().map_err(ProxyError::Workers)?;
    // One socket pair per relay worker, made before the workers so all share
    // them, and kept here so a restarted relay worker takes what was sent
    // to it meanwhile.
    let relays = config.websocket_relays.min(count);
    let relay_sockets: Vec<(Arc<UnixDatagram>, Arc<UnixDatagram>)> = (0..relays)
        .map(|_| UnixDatagram::pair().map(|(tx, rx)| (Arc::new(tx), Arc::new(rx))))
        .collect::<io::Result<_>>()
        .map_err(ProxyError::Workers)?;

    let spawn = |index: usize, config: &Config| -> io::Result<Running> {
        match worker_sys::fork()? {
            worker_sys::Forked::Child => {
                let worker = Worker {
                    index,
                    count,
                    dir: dir.clone(),
                    relay_inbox: relay_sockets.get(index).map(|(_, rx)| rx.clone()),
                    relay_outbox: (index >= relays && relays > 0).then(|| RelayOutbox {
                        worker: index % relays,
                        socket: relay_sockets[index % relays].0.clone(),
                    }),
                };
                let code = match serve(worker, config.clone()) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("worker {index}: {e}");
                        1
                    }
                };
                std::process::exit(code)
            }
            worker_sys::Forked::Parent(pid) => Ok(Running { pid: Pid::from_raw(pid), serving: false }),
        }
    };
    let mut workers: Vec<Option<Running>> = Vec::with_capacity(count);
    for index in 0..count {
        workers.push(Some(spawn(index, &current).map_err(ProxyError::Workers)?));
    }
    log::info!("supervisor {}: {count} worker processes", std::process::id());

    // Taking over from a running proxy: who it is, before the pid file is ours.
    let mut upgrade = match options.upgrade.then(|| read_pid(&pid_file)).flatten() {
        Some(old) => Upgrade::Starting { old },
        None => {
            write_pid(&pid_file);
            Upgrade::None
        }
    };
    let stop_within = config.server.grace_period + config.server.shutdown_timeout + Duration::from_secs(5);
    let mut stopping: Option<Instant> = None;
    let mut early_deaths = 0;
    let result = loop {
        std::thread::sleep(Duration::from_millis(50));
        for (index, w) in workers.iter_mut().enumerate() {
            if let Some(w) = w.as_mut().filter(|w| !w.serving) {
                w.serving = UnixStream::connect(metrics_socket(&dir, index)).is_ok();
                if w.serving {
                    early_deaths = 0;
                }
            }
        }
        upgrade = match upgrade {
            Upgrade::Starting { old } if workers.iter().flatten().all(|w| w.serving) => {
                let _ = std::fs::remove_file(upgrade_sock);
                let listener = UnixListener::bind(upgrade_sock)
                    .inspect_err(|e| log::warn!("cannot listen on {upgrade_sock}: {e}"))
                    .ok();
                log::info!("serving beside proxy {old}: send it SIGQUIT to hand over");
                Upgrade::Beside { old, _listener: listener }
            }
            Upgrade::Beside { old, .. } if kill(Pid::from_raw(old), None).is_err() => {
                log::info!("proxy {old} is gone: the upgrade is done");
                let _ = std::fs::remove_file(upgrade_sock);
                write_pid(&pid_file);
                Upgrade::None
            }
            other => other,
        };
        if seen.hangup.swap(false, Ordering::Relaxed) {
            log::info!("SIGHUP: passed on to the workers");
            signal_all(&workers, Signal::SIGHUP);
            // Read here too, so a worker started later serves what the others do.
            match crate::config::load(&options.config_path, &options.overrides) {
                Ok(new) => current = crate::reload::applied(&current, new),
                Err(e) => log::warn!("SIGHUP: workers started later keep the running configuration:\n{e}"),
            }
        }
        if seen.quit.swap(false, Ordering::Relaxed) && stopping.is_none() {
            if matches!(upgrade, Upgrade::None) && crate::signals::someone_listens_on(upgrade_sock) {
                log::info!("SIGQUIT: a new proxy serves beside us; draining");
                seen.terminate.store(true, Ordering::Relaxed);
            } else {
                crate::signals::ignored_quit(upgrade_sock);
            }
        }
        if seen.interrupt.swap(false, Ordering::Relaxed) {
            signal_all(&workers, Signal::SIGINT);
            stopping.get_or_insert_with(Instant::now);
        }
        if seen.terminate.swap(false, Ordering::Relaxed) {
            signal_all(&workers, Signal::SIGTERM);
            stopping.get_or_insert_with(Instant::now);
        }

        // Reap every worker that ended; start another unless stopping.
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            let pid = match status {
                WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) => pid,
                WaitStatus::StillAlive => break,
                _ => continue,
            };
            let Some(index) = workers.iter().position(|w| w.as_ref().is_some_and(|w| w.pid == pid)) else {
                continue;
            };
            let served = workers[index].take().is_some_and(|w| w.serving);
            shared.forget_worker(index);
            if stopping.is_some() {
                continue;
            }
            if !served {
                early_deaths += 1;
            }
            if early_deaths >= EARLY_DEATHS_ALLOWED {
                log::error!("worker {index} ({status:?}): workers die before they serve; stopping");
                signal_all(&workers, Signal::SIGTERM);
                stopping = Some(Instant::now());
                continue;
            }
            log::warn!("worker {index} ({status:?}) ended; starting another");
            match spawn(index, &current) {
                Ok(w) => workers[index] = Some(w),
                Err(e) => log::error!("cannot start worker {index}: {e}"),
            }
        }
        if let Some(since) = stopping {
            if workers.iter().all(Option::is_none) {
                break if early_deaths >= EARLY_DEATHS_ALLOWED { Err(ProxyError::WorkersFailed) } else { Ok(()) };
            }
            if since.elapsed() > stop_within {
                log::warn!("workers still running after {stop_within:?}: killing them");
                signal_all(&workers, Signal::SIGKILL);
            }
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn signal_all(workers: &[Option<Running>], signal: Signal) {
    for w in workers.iter().flatten() {
        let _ = kill(w.pid, signal);
    }
}

/// Whether every listener's address can be bound with `SO_REUSEPORT` (no
/// other process holds it without): a socket is bound, never listened on, and
/// dropped, so it joins no accept group.
pub fn check_ports_shareable(config: &Config) -> io::Result<()> {
    let mut addrs = vec![config.listen.public, config.listen.status];
    addrs.extend(config.listen.tls.as_ref().map(|t| t.addr));
    for addr in addrs {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("cannot share {addr}: {e}")))?;
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write_pid(path: &Path) {
    if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
        log::warn!("cannot write the pid file {}: {e}", path.display());
    }
}
