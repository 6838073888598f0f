//! Idle upstream connections: taking one out and putting it back is one
//! short lock, with no spawned task, channel or timer (Pingora's pool spawns
//! an idle watcher per release and hands connections over through a
//! oneshot). An idle connection the backend closed is found when it is next
//! used, and the request goes again on a new one.
//!
//! With one work-stealing runtime every worker shares the pool (a request
//! may finish on another thread than it started). With one runtime per
//! thread (`work_stealing = false`) each thread keeps its own connections:
//! a socket is served by the runtime that opened it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// A pooled connection older than this is closed rather than reused: the
/// backend may have timed it out.
pub const MAX_IDLE: Duration = Duration::from_secs(60);

struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// Idle connections by backend (and by thread when runtimes do not share).
pub struct Pool {
    idle: Mutex<HashMap<(SocketAddr, u64), Vec<Idle>>>,
    /// Connections kept per backend (per thread when `per_thread`).
    cap: usize,
    /// One pool per thread (one runtime per thread).
    per_thread: bool,
}

/// A number unique to the current thread.
pub fn thread_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}

impl Pool {
    /// A pool keeping up to `cap` idle connections per backend.
    pub fn new(cap: usize, per_thread: bool) -> Self {
        Self { idle: Mutex::new(HashMap::new()), cap, per_thread }
    }

    fn key(&self, addr: SocketAddr) -> (SocketAddr, u64) {
        (addr, if self.per_thread { thread_key() } else { 0 })
    }

    /// The most recently used idle connection to `addr`.
    pub fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let key = self.key(addr);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(&key)?;
        while let Some(conn) = conns.pop() {
            if conn.since.elapsed() < MAX_IDLE {
                return Some(conn.stream);
            }
        }
        None
    }

    /// Keeps `stream` for reuse (closed instead when the pool is full).
    pub fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let key = self.key(addr);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry(key).or_default();
        // The oldest is at the front: close it once it is too old to reuse.
        if conns.first().is_some_and(|c| c.since.elapsed() >= MAX_IDLE) {
            conns.remove(0);
        }
        if conns.len() < self.cap {
            conns.push(Idle { stream, since: Instant::now() });
        }
    }
}
