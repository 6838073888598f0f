//! WebSocket connections from many loopback source addresses.
//!
//! One source address can open at most ~28k connections to one destination
//! (the ephemeral port range), and TIME_WAIT eats into that across runs, so
//! sockets are spread over `127.0.<k>.1`. Distinct /24s also let nginx
//! `ip_hash` (which hashes the /24) spread clients over the backends the way
//! our proxy's per-IP key does.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio_tungstenite::{client_async, MaybeTlsStream, WebSocketStream};

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The `k`-th of `n` loopback source addresses (`n` is capped at 250).
pub fn source_ip(k: usize, n: usize) -> Ipv4Addr {
    let n = n.clamp(1, 250);
    Ipv4Addr::new(127, 0, (k % n) as u8 + 1, 1)
}

/// `host:port` of a `ws://` URL, resolved.
pub async fn target_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let Some(rest) = url.strip_prefix("ws://") else { bail!("{url:?}: only ws:// URLs are supported") };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    lookup_host(authority)
        .await
        .with_context(|| format!("resolve {authority}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{authority} has no IPv4 address"))
}

/// Opens a WebSocket to `url` (at `addr`) from source address `from`.
pub async fn connect(url: &str, addr: SocketAddr, from: Ipv4Addr, timeout: Duration) -> anyhow::Result<Ws> {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from.into(), 0)).with_context(|| format!("bind {from}"))?;
        let stream = socket.connect(addr).await.with_context(|| format!("connect {addr} from {from}"))?;
        stream.set_nodelay(true)?;
        let (ws, _) = client_async(url, MaybeTlsStream::Plain(stream)).await.context("websocket handshake")?;
        anyhow::Ok(ws)
    };
    tokio::time::timeout(timeout, attempt).await.with_context(|| format!("connect timed out after {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_cycle_through_distinct_slash_24s() {
        assert_eq!(source_ip(0, 4), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_ip(3, 4), Ipv4Addr::new(127, 0, 4, 1));
        assert_eq!(source_ip(4, 4), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_ip(7, 1000), Ipv4Addr::new(127, 0, 8, 1));
    }
}
