//! A WebSocket after the backend's `101`: bytes both ways until either side
//! closes or nothing moves for the WebSocket idle time. Each direction has a
//! small buffer (frames of a chat are small); an idle tunnel holds little
//! more than its two sockets.

use std::time::Duration;

use pingora_core::protocols::{l4, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read at once in each direction: chat frames are small, and a
/// larger one just takes more reads. (Both buffers stay allocated while the
/// tunnel is idle; they are most of what an idle tunnel holds.)
const BUFFER: usize = 2048;

/// Runs the tunnel to its end. A plain TCP client leaves Pingora's `Stream`
/// for its bare socket first: the wrapper's per-read and per-write
/// bookkeeping (rewind buffer, pending-time accounting, buffered writer) is
/// for HTTP, not for frames passed through.
pub async fn run(client: Stream, upstream: TcpStream, idle: Duration) {
    let fd = match client.as_any().downcast_ref::<l4::stream::Stream>().map(worker_sys::dup_fd) {
        Some(Ok(fd)) => fd,
        _ => return pass(client, upstream, idle).await,
    };
    // Dropping the wrapper closes its descriptor and takes it out of the
    // runtime's poller; the duplicate keeps the connection open. (The lean
    // path reads into its own buffer and writes unbuffered, so the wrapper
    // holds no bytes.)
    drop(client);
    let socket = std::net::TcpStream::from(fd);
    match socket.set_nonblocking(true).and_then(|()| TcpStream::from_std(socket)) {
        Ok(socket) => pass(socket, upstream, idle).await,
        Err(e) => log::warn!("websocket tunnel: cannot register the client socket, closing: {e}"),
    }
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
