//! A WebSocket after the backend's `101`: bytes both ways until either side
//! closes or nothing moves for the WebSocket idle time, on the relay thread
//! or, where it cannot serve, as a task with a small buffer per direction
//! (frames of a chat are small).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use pingora_core::protocols::{l4, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::relay;

/// Bytes read at once in each direction: chat frames are small, and a
/// larger one just takes more reads. (Both buffers stay allocated while the
/// tunnel is idle; they are most of what an idle tunnel holds.)
const BUFFER: usize = 2048;

/// Starts the tunnel; `hold` is dropped when it ends. A plain TCP client
/// goes as a bare socket to a relay thread ([`super::relay`]): the sibling
/// worker's behind `hand_to`, else this process's. Pingora's `Stream`
/// wrapper does per-read and per-write bookkeeping (rewind buffer,
/// pending-time accounting, buffered writer) for HTTP, not for frames passed
/// through. A TLS client, or any tunnel no relay takes, runs as a task of
/// its own. Returns whether the tunnel was handed to the sibling.
pub fn start(
    client: Stream,
    upstream: TcpStream,
    idle: Duration,
    hold: Box<dyn Send>,
    hand_to: Option<&UnixDatagram>,
) -> bool {
    let fd = match client.as_any().downcast_ref::<l4::stream::Stream>().map(worker_sys::dup_fd) {
        Some(Ok(fd)) => fd,
        _ => {
            spawn_pass(client, upstream, idle, hold);
            return false;
        }
    };
    // Dropping the wrapper closes its descriptor and takes it out of the
    // runtime's poller; the duplicate keeps the connection open. (The lean
    // path reads into its own buffer and writes unbuffered, so the wrapper
    // holds no bytes.)
    drop(client);
    let client = std::net::TcpStream::from(fd);
    // Out of the runtime's poller too, left non-blocking.
    let upstream = match client.set_nonblocking(true).and_then(|()| upstream.into_std()) {
        Ok(upstream) => upstream,
        Err(e) => {
            log::warn!("websocket tunnel: cannot take its sockets, closing: {e}");
            return false;
        }
    };
    let mut job = relay::Job { client, upstream, idle, hold };
    if let Some(socket) = hand_to {
        match relay::hand_over(socket, job) {
            Ok(()) => return true,
            Err(back) => job = back,
        }
    }
    let job = match relay::Relay::get() {
        Some(relay) => match relay.submit(job) {
            Ok(()) => return false,
            Err(job) => job,
        },
        None => job,
    };
    let relay::Job { client, upstream, idle, hold } = job;
    match TcpStream::from_std(client).and_then(|c| Ok((c, TcpStream::from_std(upstream)?))) {
        Ok((client, upstream)) => spawn_pass(client, upstream, idle, hold),
        Err(e) => log::warn!("websocket tunnel: cannot register its sockets, closing: {e}"),
    }
    false
}

/// Runs the tunnel as a task of its own; `hold` is dropped when it ends.
fn spawn_pass<C>(client: C, upstream: TcpStream, idle: Duration, hold: Box<dyn Send>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        pass(client, upstream, idle).await;
        drop(hold);
    });
}

async fn pass<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, mut upstream: TcpStream, idle: Duration) {
    let mut from_client = vec![0u8; BUFFER];
    let mut from_upstream = vec![0u8; BUFFER];
    let (mut up_read, mut up_write) = upstream.split();
    // The idle timer is re-armed only when it fires, from the last activity:
    // no timer work per frame.
    let mut last = Instant::now();
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let mut client_open = true;
    loop {
        tokio::select! {
            read = client.read(&mut from_client), if client_open => match read {
                Ok(0) | Err(_) => {
                    // The client is done sending: pass the half-close on and
                    // let the backend finish.
                    client_open = false;
                    let _ = up_write.shutdown().await;
                }
                Ok(n) => {
                    if up_write.write_all(&from_client[..n]).await.is_err() {
                        break;
                    }
                }
            },
            read = up_read.read(&mut from_upstream) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if client.write_all(&from_upstream[..n]).await.is_err() || client.flush().await.is_err() {
                        break;
                    }
                }
            },
            _ = &mut sleep => {
                if last.elapsed() >= idle {
                    log::debug!("websocket idle for {idle:?}, closing");
                    break;
                }
                sleep.as_mut().reset(last + idle);
                continue;
            }
        }
        last = Instant::now();
    }
    let _ = client.shutdown().await;
}
