//! The PROXY protocol (HAProxy's, version 1 text or version 2 binary) from
//! trusted peers (`client.proxy_protocol_from`): a load balancer or Docker's
//! port publishing in front of the proxy names the client it connected for,
//! and that address, not the balancer's, is the client for sticky routing,
//! limits, forwarding headers and the access log.
//!
//! A connection from a listed peer must start with the header (nginx's
//! `listen ... proxy_protocol` likewise); one without it, or with a broken
//! one, is closed. Connections from anyone else are never read for one. The
//! header is parsed by the `ppp` crate; the bytes read past it are the
//! start of the HTTP request.

use bytes::{Buf, BytesMut};
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::{SocketDigest, Stream};
use ppp::{v1, v2, HeaderResult, PartialResult};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Longest header taken: a version 2 header with a few TLVs fits easily
/// (addresses are at most 216 bytes); the protocol allows 64 KiB of TLVs.
pub const MAX_HEADER: usize = 4096;

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Nothing whole arrived within the header deadline.
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The peer closed first.
    #[error("the peer closed before a whole PROXY protocol header")]
    Closed,
    /// The connection does not start with a valid header.
    #[error("no valid PROXY protocol header: {0}")]
    Invalid(String),
    /// Past `MAX_HEADER` bytes and still incomplete.
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Reading failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header at the start of `stream` within `deadline` and returns
/// the bytes read past it. When the header names a client (not `UNKNOWN` /
/// `LOCAL`: a balancer's own connection, such as a health check), `stream`'s
/// socket digest is replaced by one whose peer is that client, so every
/// later look at the peer sees it.
pub async fn accept(stream: &mut Stream, deadline: Duration) -> Result<BytesMut, Refused> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let read = async {
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(Refused::Closed);
            }
            match parse(&buf) {
                Parsed::Incomplete if buf.len() >= MAX_HEADER => return Err(Refused::TooLong),
                Parsed::Incomplete => continue,
                Parsed::Header { len, source } => return Ok((len, source)),
                Parsed::Invalid(why) => return Err(Refused::Invalid(why)),
            }
        }
    };
    let (len, source) = tokio::time::timeout(deadline, read).await.map_err(|_| Refused::Timeout(deadline))??;
    buf.advance(len);
    if let Some(client) = source {
        let digest = SocketDigest::from_raw_fd(stream.id());
        let _ = digest.peer_addr.set(Some(SocketAddr::Inet(client)));
        if let Some(old) = stream.get_socket_digest() {
            if let Some(local) = old.local_addr() {
                let _ = digest.local_addr.set(Some(local.clone()));
            }
        }
        stream.set_socket_digest(digest);
    }
    Ok(buf)
}

/// What the start of a connection holds.
#[derive(Debug, PartialEq)]
enum Parsed {
    Incomplete,
    /// A whole header of `len` bytes, naming `source` (if anyone).
    Header {
        len: usize,
        source: Option<std::net::SocketAddr>,
    },
    Invalid(String),
}

fn parse(buf: &[u8]) -> Parsed {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(header)) => Parsed::Header {
            len: header.header.len(),
            source: match header.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(header)) => Parsed::Header {
            len: header.len(),
            source: match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
                (_, v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        },
        HeaderResult::V1(Err(e)) => Parsed::Invalid(format!("{e:?}")),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("{e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_names_the_client_and_leaves_the_request() {
        let input = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080\r\nGET / HTTP/1.1\r\n";
        let Parsed::Header { len, source } = parse(input) else { panic!("{:?}", parse(input)) };
        assert_eq!(source, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&input[len..], b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Header { len: 15, source: None });
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 80\r\n";
        assert!(matches!(parse(v6), Parsed::Header { source: Some(s), .. } if s.ip().is_ipv6()));
    }

    #[test]
    fn version_2_names_the_client_and_local_names_nobody() {
        let mut input = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        input.extend([0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xC0, 0x00, 0x1F, 0x90]);
        input.extend(b"GET");
        let Parsed::Header { len, source } = parse(&input) else { panic!("{:?}", parse(&input)) };
        assert_eq!(source, Some("198.51.100.9:49152".parse().unwrap()));
        assert_eq!(&input[len..], b"GET");
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Parsed::Header { len: 16, source: None });
    }

    #[test]
    fn partial_headers_wait_and_other_bytes_are_refused() {
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7"), Parsed::Incomplete);
        assert_eq!(parse(b"\r\n\r\n\0\r\n"), Parsed::Incomplete);
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n"), Parsed::Invalid(_)));
    }
}
