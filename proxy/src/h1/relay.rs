//! The relay thread: one per process, started with its first WebSocket, it
//! passes the bytes of every plain-TCP tunnel in one event loop (mio's
//! edge-triggered epoll), as an nginx worker does. A frame costs its `recv`,
//! its `send` and a share of an `epoll_wait`, with no task to wake, schedule
//! and poll. An idle tunnel holds its two sockets and a small record; bytes
//! are kept only while the receiving side is not taking them (at most one
//! read, [`READ`], per direction), and then the other side is not read, so
//! TCP's window pushes back on the sender.
//!
//! With several worker processes, fewer relays carry the same frames with
//! fewer wake-ups (more events per `epoll_wait`): `websocket.relays` names
//! how many workers relay, and the others hand each tunnel's two sockets
//! over a Unix socket ([`hand_over`]) to a relay worker, whose thread takes
//! them from its [`Inbox`] and counts them as its own.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

/// Bytes read at once (one buffer for the whole thread).
const READ: usize = 16 * 1024;
/// Tunnels handed over and not yet taken by the thread.
const QUEUE: usize = 1024;
/// The token of the waker; a tunnel's are `2 * key` (client) and
/// `2 * key + 1` (backend).
const WAKE: Token = Token(usize::MAX);
/// The token of the inbox (tunnels from sibling workers).
const INBOX: Token = Token(usize::MAX - 1);

/// A tunnel to relay: both sockets non-blocking, and what must live as long
/// as the tunnel (gauges, the connection count).
pub struct Job {
    pub client: std::net::TcpStream,
    pub upstream: std::net::TcpStream,
    pub idle: Duration,
    pub hold: Box<dyn Send>,
}

/// Where a relay worker takes its siblings' tunnels from.
pub struct Inbox {
    /// The receiving end of the socket the siblings send on.
    pub socket: UnixDatagram,
    /// Counts a tunnel taken over in this process (open connection,
    /// WebSocket gauge) for as long as the returned value lives.
    pub adopt: Box<dyn Fn() -> Box<dyn Send> + Send>,
    /// Set to 1 while the thread reads the inbox, so siblings hand tunnels
    /// over only then (and keep them while it cannot).
    pub ready: &'static AtomicU64,
}

/// Hands `job`'s sockets to a sibling worker's relay over `socket` (the
/// sending end of its [`Inbox`]). On success this process's descriptors
/// close and `job.hold` is dropped here: the receiving worker counts the
/// tunnel. Gives the job back when the socket takes no more now.
pub fn hand_over(socket: &UnixDatagram, job: Job) -> Result<(), Job> {
    let idle = u64::try_from(job.idle.as_millis()).unwrap_or(u64::MAX).to_le_bytes();
    match worker_sys::send_fds(socket, &idle, &[job.client.as_fd(), job.upstream.as_fd()]) {
        Ok(()) => Ok(()),
        Err(e) => {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("cannot hand a WebSocket tunnel to the relay worker, relaying it here: {e}");
            }
            Err(job)
        }
    }
}

static RELAY: OnceLock<Option<Relay>> = OnceLock::new();

/// The way to the process's relay thread.
pub struct Relay {
    jobs: SyncSender<Job>,
    waker: Waker,
}

impl Relay {
    /// The process's relay, started on first use; `None` when it cannot be
    /// (the caller relays on its own).
    pub fn get() -> Option<&'static Relay> {
        RELAY.get_or_init(|| Relay::start(None)).as_ref()
    }

    /// Starts this process's relay now, taking tunnels from `inbox` too
    /// (a relay worker, before it serves). Does nothing if it has started.
    pub fn start_with_inbox(inbox: Inbox) {
        RELAY.get_or_init(|| Relay::start(Some(inbox)));
    }

    fn start(inbox: Option<Inbox>) -> Option<Relay> {
        let start = || -> io::Result<Relay> {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKE)?;
            let inbox = match inbox {
                Some(inbox) => {
                    inbox.socket.set_nonblocking(true)?;
                    let mut socket = mio::net::UnixDatagram::from_std(inbox.socket);
                    poll.registry().register(&mut socket, INBOX, Interest::READABLE)?;
                    Some(Taken { socket, adopt: inbox.adopt, ready: inbox.ready })
                }
                None => None,
            };
            let (jobs, queued) = sync_channel(QUEUE);
            std::thread::Builder::new().name("relay".into()).spawn(move || Loop::new(poll, queued, inbox).run())?;
            Ok(Relay { jobs, waker })
        };
        start().inspect_err(|e| log::error!("no relay thread, tunnels run as tasks: {e}")).ok()
    }

    /// Hands `job` to the thread; gives it back when the queue is full or the
    /// thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match self.jobs.try_send(job) {
            Ok(()) => {
                // The job is queued; a failed wake-up would leave it there.
                self.waker.wake().map_err(|e| log::error!("relay thread: cannot wake it: {e}")).ok();
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job),
        }
    }
}

/// One tunnel as the thread holds it.
struct Tunnel {
    client: TcpStream,
    upstream: TcpStream,
    /// Read from the client, not yet taken by the backend.
    to_upstream: Vec<u8>,
    /// Read from the backend, not yet taken by the client.
    to_client: Vec<u8>,
    /// The client has not ended its side.
    client_open: bool,
    /// A hang-up or error was seen on the side: read it until it says so
    /// (a short read does not mean the end-of-file was read).
    client_hup: bool,
    upstream_hup: bool,
    idle: Duration,
    last: Instant,
    _hold: Box<dyn Send>,
}

/// What one pass of bytes from a side to the other ended with.
enum Flow {
    /// Everything read was passed on; the source has nothing more now.
    Drained,
    /// The destination takes no more for now; the rest waits in the tunnel.
    Blocked,
    /// The source ended its side.
    Ended,
    /// A socket failed.
    Failed,
}

/// The inbox as the thread holds it.
struct Taken {
    socket: mio::net::UnixDatagram,
    adopt: Box<dyn Fn() -> Box<dyn Send> + Send>,
    ready: &'static AtomicU64,
}

struct Loop {
    poll: Poll,
    queued: Receiver<Job>,
    /// Tunnels handed over by sibling workers.
    inbox: Option<Taken>,
    tunnels: Slab<Tunnel>,
    buf: Box<[u8]>,
    /// How often idle tunnels are looked for: a quarter of the shortest
    /// idle time, between 10 ms and 1 s.
    sweep_every: Duration,
    next_sweep: Instant,
}

impl Loop {
    fn new(poll: Poll, queued: Receiver<Job>, inbox: Option<Taken>) -> Self {
        Self {
            poll,
            queued,
            inbox,
            tunnels: Slab::new(),
            buf: vec![0; READ].into_boxed_slice(),
            sweep_every: Duration::from_secs(1),
            next_sweep: Instant::now(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        if let Some(inbox) = &self.inbox {
            inbox.ready.store(1, Ordering::Release);
        }
        loop {
            // No timer while there is no tunnel: an idle process sleeps.
            let wait = (!self.tunnels.is_empty()).then(|| self.next_sweep.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, wait) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Cannot happen with a valid epoll descriptor; the tunnels
                // close with the process.
                log::error!("relay thread: epoll failed, stopping: {e}");
                if let Some(inbox) = &self.inbox {
                    inbox.ready.store(0, Ordering::Release);
                }
                return;
            }
            let now = Instant::now();
            for event in events.iter() {
                if event.token() == WAKE {
                    while let Ok(job) = self.queued.try_recv() {
                        self.add(job, now);
                    }
                    continue;
                }
                if event.token() == INBOX {
                    for job in self.handed_over() {
                        self.add(job, now);
                    }
                    continue;
                }
                let key = event.token().0 / 2;
                let Some(t) = self.tunnels.get_mut(key) else { continue };
                let hup = event.is_read_closed() || event.is_error();
                let keep = if event.token().0 % 2 == 0 {
                    t.client_hup |= hup;
                    t.on_client(event.is_readable() || hup, event.is_writable(), &mut self.buf, now)
                } else {
                    t.upstream_hup |= hup;
                    t.on_upstream(event.is_readable() || hup, event.is_writable(), &mut self.buf, now)
                };
                if !keep {
                    close(self.poll.registry(), self.tunnels.remove(key));
                }
            }
            if !self.tunnels.is_empty() && now >= self.next_sweep {
                self.sweep(now);
            }
        }
    }

    /// Starts relaying `job`.
    fn add(&mut self, job: Job, now: Instant) {
        let first = self.tunnels.is_empty();
        let entry = self.tunnels.vacant_entry();
        let key = entry.key();
        let mut client = TcpStream::from_std(job.client);
        let mut upstream = TcpStream::from_std(job.upstream);
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry
            .register(&mut client, Token(2 * key), both)
            .and_then(|()| registry.register(&mut upstream, Token(2 * key + 1), both))
        {
            log::warn!("relay thread: cannot watch a tunnel's sockets, closing it: {e}");
            let _ = registry.deregister(&mut client);
            return;
        }
        let every = (job.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        if first || every < self.sweep_every {
            self.sweep_every = every;
            self.next_sweep = now + every;
        }
        entry.insert(Tunnel {
            client,
            upstream,
            to_upstream: Vec::new(),
            to_client: Vec::new(),
            client_open: true,
            client_hup: false,
            upstream_hup: false,
            idle: job.idle,
            last: now,
            _hold: job.hold,
        });
    }

    /// The tunnels waiting in the inbox (read until it is empty: the
    /// registration is edge-triggered), each counted in this process.
    fn handed_over(&mut self) -> Vec<Job> {
        let mut jobs = Vec::new();
        let Some(Taken { socket, adopt, .. }) = &self.inbox else { return jobs };
        let mut idle = [0u8; 8];
        loop {
            match worker_sys::recv_fds(socket, &mut idle) {
                Ok((8, fds)) if fds.len() == 2 => {
                    let [client, upstream]: [_; 2] = fds.try_into().expect("two descriptors");
                    let (client, upstream) = (std::net::TcpStream::from(client), std::net::TcpStream::from(upstream));
                    // Non-blocking is a property of the open socket, so it
                    // came along; made sure of, as a blocking read would
                    // stall every tunnel.
                    if let Err(e) = client.set_nonblocking(true).and_then(|()| upstream.set_nonblocking(true)) {
                        log::warn!("relay thread: a tunnel handed over cannot be made non-blocking, closing it: {e}");
                        continue;
                    }
                    let idle = Duration::from_millis(u64::from_le_bytes(idle));
                    jobs.push(Job { client, upstream, idle, hold: adopt() });
                }
                // Its descriptors close as they drop.
                Ok((n, fds)) => {
                    log::warn!("relay thread: dropped a malformed hand-over ({n} bytes, {} fds)", fds.len())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Read and cut short (no room for its descriptors, say):
                // what arrived of it is closed; read on.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    log::warn!("relay thread: dropped a tunnel handed over: {e}");
                }
                Err(e) => {
                    // The next message to arrive raises a new edge.
                    log::warn!("relay thread: cannot read the hand-over socket: {e}");
                    break;
                }
            }
        }
        jobs
    }

    /// Closes the tunnels that moved nothing for their idle time.
    fn sweep(&mut self, now: Instant) {
        let registry = self.poll.registry();
        let idle: Vec<usize> =
            self.tunnels.iter().filter(|(_, t)| now.duration_since(t.last) >= t.idle).map(|(key, _)| key).collect();
        for key in idle {
            let t = self.tunnels.remove(key);
            log::debug!("websocket idle for {:?}, closing", t.idle);
            close(registry, t);
        }
        self.next_sweep = now + self.sweep_every;
    }
}

impl Tunnel {
    /// An event on the client's socket; returns whether the tunnel stays.
    fn on_client(&mut self, readable: bool, writable: bool, buf: &mut [u8], now: Instant) -> bool {
        if readable && self.client_open && !self.pass_to_upstream(buf, now) {
            return false;
        }
        if writable && !self.to_client.is_empty() {
            // Room again for what the backend sent: pass it, then read on.
            return self.pass_to_client(buf, now);
        }
        true
    }

    /// An event on the backend's socket; returns whether the tunnel stays.
    fn on_upstream(&mut self, readable: bool, writable: bool, buf: &mut [u8], now: Instant) -> bool {
        if readable && !self.pass_to_client(buf, now) {
            return false;
        }
        if writable && !self.to_upstream.is_empty() {
            return self.pass_to_upstream(buf, now);
        }
        true
    }

    fn pass_to_upstream(&mut self, buf: &mut [u8], now: Instant) -> bool {
        let (flow, moved) = pass(&mut self.client, &mut self.upstream, &mut self.to_upstream, buf, self.client_hup);
        if moved {
            self.last = now;
        }
        match flow {
            Flow::Drained | Flow::Blocked => true,
            Flow::Ended => {
                // The client is done sending: pass the half-close on and let
                // the backend finish.
                self.client_open = false;
                self.upstream.shutdown(Shutdown::Write).is_ok()
            }
            Flow::Failed => false,
        }
    }

    fn pass_to_client(&mut self, buf: &mut [u8], now: Instant) -> bool {
        let (flow, moved) = pass(&mut self.upstream, &mut self.client, &mut self.to_client, buf, self.upstream_hup);
        if moved {
            self.last = now;
        }
        matches!(flow, Flow::Drained | Flow::Blocked)
    }
}

/// Passes what `kept` holds, then what `from` has, to `to`; returns how it
/// ended and whether any byte moved. A read shorter than `buf` drained the
/// socket (the next bytes bring a new edge), unless `to_end` (a hang-up was
/// seen, so read on until end-of-file).
fn pass(from: &mut TcpStream, to: &mut TcpStream, kept: &mut Vec<u8>, buf: &mut [u8], to_end: bool) -> (Flow, bool) {
    let mut moved = false;
    if !kept.is_empty() {
        match write_now(to, kept) {
            Ok(n) if n == kept.len() => {
                *kept = Vec::new();
                moved = true;
            }
            Ok(n) => {
                kept.drain(..n);
                return (Flow::Blocked, moved || n > 0);
            }
            Err(_) => return (Flow::Failed, moved),
        }
    }
    loop {
        let n = match from.read(buf) {
            Ok(0) => return (Flow::Ended, moved),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Flow::Drained, moved),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return (Flow::Failed, moved),
        };
        moved = true;
        match write_now(to, &buf[..n]) {
            Ok(sent) if sent == n => {}
            Ok(sent) => {
                kept.extend_from_slice(&buf[sent..n]);
                return (Flow::Blocked, moved);
            }
            Err(_) => return (Flow::Failed, moved),
        }
        if n < buf.len() && !to_end {
            return (Flow::Drained, moved);
        }
    }
}

/// Writes what `to` takes of `bytes` now; returns how much.
fn write_now(to: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match to.write(&bytes[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Ends a tunnel: the client sees its end of the stream, both sockets close.
fn close(registry: &Registry, mut t: Tunnel) {
    let _ = registry.deregister(&mut t.client);
    let _ = registry.deregister(&mut t.upstream);
    let _ = t.client.shutdown(Shutdown::Write);
}
