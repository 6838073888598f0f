//! The proxy's worker processes (`server.processes`) need a few things safe
//! Rust has no API for, kept here so the rest of the workspace can forbid
//! `unsafe`:
//!
//! - [`shared_words`]: zeroed `AtomicU64`s in an anonymous `MAP_SHARED`
//!   mapping, made before the workers are forked, so every worker's atomics
//!   are the same memory (nginx's shared zones do the same);
//! - [`fork`] (and [`detach`], a daemon's double fork), refused unless the calling process has a single thread (after
//!   `fork` only async-signal-safe calls are allowed in a multi-threaded
//!   process's child; a single-threaded one's child is an ordinary process);
//! - [`dup_fd`]: a second descriptor for a socket held by a wrapper that
//!   cannot give it back (Pingora's `Stream`), so a WebSocket tunnel can run
//!   on the bare socket;
//! - [`send_fds`] and [`recv_fds`]: descriptors passed to another process
//!   over a Unix socket (`SCM_RIGHTS`), so a worker can hand a WebSocket
//!   tunnel's two sockets to the worker whose relay thread carries them.

use std::io;
use std::sync::atomic::AtomicU64;

/// `n` zeroed atomics shared with every process forked after this call, for
/// the life of the process.
pub fn shared_words(n: usize) -> io::Result<&'static [AtomicU64]> {
    if n == 0 {
        return Ok(&[]);
    }
    let len = n
        .checked_mul(std::mem::size_of::<AtomicU64>())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "shared mapping too large"))?;
    // SAFETY: a fresh anonymous mapping; no Rust object is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is page-aligned (more than AtomicU64's alignment),
    // `len` bytes long, zero-filled by the kernel (all-zero is a valid
    // AtomicU64, which has u64's layout), never unmapped (so 'static), and
    // only ever accessed through these atomics, here and in forked children.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<AtomicU64>(), n) })
}

/// Which side of a [`fork`] this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The parent; the child's process id.
    Parent(i32),
    /// The new process.
    Child,
}

/// Forks the process. Refused (`WouldBlock`) while the process has more than
/// one thread. In the child, the parent's death sends it `SIGTERM`.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("fork refused: the process has {threads} threads, not 1"),
        ));
    }
    let parent = std::process::id();
    // SAFETY: the process has one thread (checked just above; only this
    // thread could start another), so the child is a complete copy of it,
    // with no lock held by a thread that does not exist there.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number
            // reads no memory.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
            if std::os::unix::process::parent_id() != parent {
                // The parent died before the line above: nobody would tell us.
                std::process::exit(1);
            }
            Ok(Forked::Child)
        }
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Detaches into the background like a daemon (`daemon(3)`: a new session,
/// standard streams on `/dev/null`, the working directory kept); the
/// foreground process exits 0. Refused while the process has more than one
/// thread.
pub fn detach() -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("detach refused: the process has {threads} threads, not 1"),
        ));
    }
    // SAFETY: one thread (checked above), so the forked process inside
    // daemon(3) is a complete copy; the arguments are plain integers.
    if unsafe { libc::daemon(1, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Threads of this process, from `/proc/self/status`.
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::Other, "no Threads: line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn shared_words_start_at_zero_and_hold_values() {
        let words = shared_words(1000).unwrap();
        assert!(words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        words[999].fetch_add(7, Ordering::Relaxed);
        assert_eq!(words[999].load(Ordering::Relaxed), 7);
        assert!(shared_words(0).unwrap().is_empty());
    }

    #[test]
    fn fork_is_refused_with_more_than_one_thread() {
        // The test harness runs tests on threads of its own.
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(500)));
        let e = fork().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    }
}

/// A second descriptor for the open socket (or file) behind `io` (`dup`):
/// it stays open when `io` is dropped, so a connection can leave a wrapper
/// that owns its descriptor but offers no way to take it back.
pub fn dup_fd(io: &impl std::os::fd::AsRawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `io` is borrowed for the whole call, so its descriptor is open
    // while it is borrowed here; the clone is a new descriptor we own.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(io.as_raw_fd()) }.try_clone_to_owned()
}

/// Sends `data` with duplicates of `fds` (`SCM_RIGHTS`) as one message on the
/// Unix socket `socket`, without waiting: a full socket is `WouldBlock`.
pub fn send_fds(
    socket: &impl std::os::fd::AsRawFd,
    data: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let sent = sendmsg::<()>(socket.as_raw_fd(), &[io::IoSlice::new(data)], &rights, flags, None)?;
    if sent != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "message cut short"));
    }
    Ok(())
}

/// Most descriptors [`recv_fds`] takes from one message; more are closed.
pub const MAX_FDS: usize = 4;

/// Receives one message sent by [`send_fds`] from `socket` into `data`,
/// without waiting (nothing queued is `WouldBlock`); returns its length and
/// the descriptors that came with it (close-on-exec). A message cut short
/// (longer than `data`, more than [`MAX_FDS`] descriptors, or descriptors
/// the process had no room for) is `InvalidData`, and whatever descriptors
/// of it did arrive are closed, not leaked.
pub fn recv_fds(socket: &impl std::os::fd::AsRawFd, data: &mut [u8]) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    // Room for one SCM_RIGHTS header and MAX_FDS descriptors, aligned for
    // the header.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let room = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    assert!(room <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = room as _;
    // SAFETY: `msg` points at `iov` (over `data`) and `control`, both alive
    // and writable for the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with `msg.msg_controllen` bytes of
    // well-formed headers; the CMSG_* macros walk exactly those. Each
    // SCM_RIGHTS descriptor was installed in this process for this message
    // and is owned by nothing else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(first.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message cut short"));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod pass_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    #[test]
    fn descriptors_cross_a_socket_pair_with_their_message() {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        let (mut mine, theirs) = UnixStream::pair().unwrap();
        send_fds(&tx, b"hello", &[theirs.as_fd()]).unwrap();
        drop(theirs);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_fds(&rx, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same connection: bytes written to
        // it reach the other end.
        let mut received = UnixStream::from(fds.into_iter().next().unwrap());
        received.write_all(b"through").unwrap();
        let mut got = [0u8; 7];
        mine.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through");
    }

    #[test]
    fn too_many_descriptors_are_closed_not_leaked() {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        let pairs: Vec<_> = (0..MAX_FDS + 1).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<_> = pairs.iter().map(|(_, theirs)| theirs.as_fd()).collect();
        send_fds(&tx, b"x", &fds).unwrap();
        let e = recv_fds(&rx, &mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Every copy that arrived was closed, so once ours close too, each
        // connection's other end reads end-of-file.
        let (mine, theirs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        drop(theirs);
        for mut m in mine {
            m.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            assert_eq!(m.read(&mut [0u8; 1]).unwrap(), 0);
        }
    }

    #[test]
    fn nothing_queued_is_would_block() {
        let (_tx, rx) = UnixDatagram::pair().unwrap();
        let e = recv_fds(&rx, &mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    }
}
