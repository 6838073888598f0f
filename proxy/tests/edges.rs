//! The request path at its edges: pipelined requests, `Upgrade` headers that
//! are not upgrades, requests the lean path hands to Pingora's proxy on the
//! same connection, pooled upstream connections the backend closed, and
//! configuration files that say nothing.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn me() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// Every `X-Request-Id` answered, in order, and every status line.
fn answers(raw: &[u8]) -> (Vec<String>, Vec<u16>) {
    let text = String::from_utf8_lossy(raw);
    let ids = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, v)| v.trim().to_string())
        .collect();
    // A body without a final newline runs into the next status line.
    let statuses = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12).and_then(|s| s.parse().ok()))
        .collect();
    (ids, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let backends = [Backend::start("only")];
    let proxy = Proxy::start(&[backends[0].addr], ProxyOptions::default()).await;
    let raw = b"GET /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: pipe-1\r\n\r\n\
                POST /b HTTP/1.1\r\nHost: t\r\nX-Request-Id: pipe-2\r\nContent-Length: 5\r\n\r\nhello\
                GET /c HTTP/1.1\r\nHost: t\r\nX-Request-Id: pipe-3\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(me(), proxy.public, raw, Duration::from_secs(5)).await.unwrap();
    let (ids, statuses) = answers(&out);
    assert_eq!(ids, ["pipe-1", "pipe-2", "pipe-3"], "{}", String::from_utf8_lossy(&out));
    assert_eq!(statuses, [200, 200, 200]);
    assert!(String::from_utf8_lossy(&out).contains("\"body_len\":5"), "the POST body went through whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_header_that_is_no_upgrade_gets_the_body_limit_and_deadline() {
    let backends = [Backend::start("only")];
    let options = ProxyOptions {
        client: "body_timeout = \"1s\"\nmax_body_bytes = 1000\n".into(),
        // A tunnel would hold the connection for an hour.
        ws_idle: "1h".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&[backends[0].addr], options).await;
    let status_of = |raw: &[u8]| parse_response(raw).map(|r| r.status);

    // A stalled body behind `Upgrade: x` (and behind a WebSocket upgrade
    // whose key is invalid): 408 at the body deadline, not a tunnel.
    for head in [
        "POST /api/x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade\r\nContent-Length: 100\r\n\r\nshort",
        "GET /ws/x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: bad\r\n\
         Sec-WebSocket-Version: 13\r\nContent-Length: 100\r\n\r\nshort",
    ] {
        let started = Instant::now();
        let out = raw_exchange(me(), proxy.public, head.as_bytes(), Duration::from_secs(8)).await.unwrap();
        assert_eq!(status_of(&out), Some(408), "{head:?}: {:?}", String::from_utf8_lossy(&out));
        assert!(started.elapsed() < Duration::from_secs(4), "{head:?} took {:?}", started.elapsed());
    }

    // Over the body limit behind `Upgrade: x`: 413, announced or chunked.
    let announced =
        "POST /api/x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade\r\nContent-Length: 5000\r\n\r\n";
    let out = raw_exchange(me(), proxy.public, announced.as_bytes(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(status_of(&out), Some(413), "{:?}", String::from_utf8_lossy(&out));
    let mut chunked = b"POST /api/x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(b"3e8\r\n");
        chunked.extend(std::iter::repeat_n(b'y', 1000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = raw_exchange(me(), proxy.public, &chunked, Duration::from_secs(5)).await.unwrap_or_default();
    assert!(matches!(status_of(&out), None | Some(413)), "{:?}", String::from_utf8_lossy(&out));

    // Under the limit, `Upgrade: x` is a plain request: answered by the backend.
    let out = raw_exchange(
        me(),
        proxy.public,
        b"POST /api/x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade, close\r\nContent-Length: 2\r\n\r\nhi",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let r = parse_response(&out).expect("an answer");
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (200, Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_handed_to_pingoras_path_is_served_and_the_connection_goes_on() {
    let backends = [Backend::start("only")];
    let proxy = Proxy::start(&[backends[0].addr], ProxyOptions::default()).await;
    // A chunked body is not the lean path's: Pingora's proxy serves it, then
    // the next request on the same connection.
    let first = b"POST /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: handed-1\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    let second = b"GET /b HTTP/1.1\r\nHost: t\r\nX-Request-Id: handed-2\r\nConnection: close\r\n\r\n";
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    let mut stream = socket.connect(proxy.public).await.unwrap();
    // The second request is sent once the first is answered (Pingora's own
    // proxy does not read pipelined requests).
    stream.write_all(first).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains("\"body_len\":7") {
        assert!(Instant::now() < deadline, "no answer: {:?}", String::from_utf8_lossy(&out));
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed after the first answer");
        out.extend_from_slice(&buf[..n]);
    }
    stream.write_all(second).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.unwrap().unwrap();
    let (ids, statuses) = answers(&out);
    assert_eq!(ids, ["handed-1", "handed-2"], "{}", String::from_utf8_lossy(&out));
    assert_eq!(statuses, [200, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_backend_closed_cost_no_request() {
    let mut backend = Backend::start("only");
    let addr: SocketAddr = backend.addr;
    let proxy = Proxy::start(&[addr], ProxyOptions::default()).await;
    // Fill the pool: several connections at once, then idle.
    let warm: Vec<_> = (0..8).map(|_| get(proxy.public, "/warm")).collect();
    for r in futures::future::join_all(warm).await {
        assert_eq!(r.unwrap().status, 200);
    }
    // The backend restarts: every pooled connection is now closed.
    backend.restart();
    proxy.wait_for_health(addr, "up").await;
    for i in 0..8 {
        let r = if i % 2 == 0 {
            get(proxy.public, "/after").await.unwrap()
        } else {
            request_from(me(), proxy.public, "POST", "/after", &[], b"body").await.unwrap()
        };
        assert_eq!(r.status, 200, "request {i} after the restart");
    }
    assert!(!proxy.log().contains("out for"), "a closed pooled connection took the backend out:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_past_max_header_bytes_gets_431_and_a_large_one_within_it_goes_through() {
    let backends = [Backend::start("only")];
    let proxy = Proxy::start(&[backends[0].addr], ProxyOptions::default()).await;
    let with_header = |bytes: usize| {
        format!("GET /h HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "b".repeat(bytes))
    };
    // 20 KB: past the lean path's 16 KiB, served by Pingora's path, within the 32 KiB default.
    let out = raw_exchange(me(), proxy.public, with_header(20_000).as_bytes(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(answers(&out).1, [200], "{}", String::from_utf8_lossy(&out[..out.len().min(300)]));
    // One 64 KB header: refused with the JSON error, never forwarded.
    let out = raw_exchange(me(), proxy.public, with_header(65_536).as_bytes(), Duration::from_secs(5)).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(answers(&out).1, [431], "{text}");
    assert!(text.contains("\"code\":\"header_too_large\""), "{text}");
    // A method name of 40,000 letters counts too.
    let long_method = format!("{} /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", "A".repeat(40_000));
    let out =
        raw_exchange(me(), proxy.public, long_method.as_bytes(), Duration::from_secs(5)).await.unwrap_or_default();
    let statuses = answers(&out).1;
    assert!(statuses.iter().all(|s| (400..500).contains(s)), "refused, never forwarded: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_behind_one_handed_to_pingoras_path_are_answered_in_order() {
    let backends = [Backend::start("only")];
    let proxy = Proxy::start(&[backends[0].addr], ProxyOptions::default()).await;
    // A chunked body sends the first request to Pingora's path; two more follow in the same write.
    let raw = b"POST /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: pp-1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
                GET /b HTTP/1.1\r\nHost: t\r\nX-Request-Id: pp-2\r\n\r\n\
                GET /c HTTP/1.1\r\nHost: t\r\nX-Request-Id: pp-3\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(me(), proxy.public, raw, Duration::from_secs(5)).await.unwrap();
    let (ids, statuses) = answers(&out);
    assert_eq!(ids, ["pp-1", "pp-2", "pp-3"], "{}", String::from_utf8_lossy(&out));
    assert_eq!(statuses, [200, 200, 200]);
    assert!(String::from_utf8_lossy(&out).contains("\"body_len\":5"), "the chunked body went through whole");
}
