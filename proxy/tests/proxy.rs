//! End-to-end tests: the real proxy binary in front of real axum backends,
//! driven over real sockets from many 127.0.0.0/8 source addresses.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Which backend each of `n` client addresses reaches.
async fn backends_by_client(proxy: &Proxy, n: u32) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for i in 0..n {
        let r = get_from(client_ip(i), proxy.public, "/api/whoami", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        out.insert(i, r.backend());
    }
    out
}

fn three_backends() -> Vec<Backend> {
    vec![Backend::start("b1"), Backend::start("b2"), Backend::start("b3")]
}

fn addrs(backends: &[Backend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_ip_always_reaches_the_same_backend_and_clients_spread_evenly() {
    let backends = three_backends();
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;

    let first = backends_by_client(&proxy, 1000).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for b in first.values() {
        *counts.entry(b).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        assert!((283..=383).contains(n), "backend {b} got {n} of 1000 clients: {counts:?}");
    }
    // Again, and again: every client lands where it did.
    for i in (0..1000).step_by(7) {
        for _ in 0..2 {
            let r = get_from(client_ip(i), proxy.public, "/api/again", &[]).await.unwrap();
            assert_eq!(r.backend(), first[&i], "client {i} moved");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_thread_runtimes_and_tiny_buffers_still_proxy_every_byte() {
    // One runtime per thread, each with its own upstream pool; client
    // buffers far below a request or response (and none for writes).
    let backends = three_backends();
    let options = ProxyOptions {
        server: "work_stealing = false\n".into(),
        client: "read_buffer = 512\nwrite_buffer = 0\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let first = backends_by_client(&proxy, 60).await;
    assert_eq!(first.values().collect::<std::collections::HashSet<_>>().len(), 3, "{first:?}");

    // Keepalive connections, requests spread over both runtimes' threads.
    let mut clients = Vec::new();
    for i in 0..8u32 {
        let public = proxy.public;
        let want = first[&i].clone();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().local_address(client_ip(i)).build().unwrap();
            for n in 0..25 {
                let body = vec![b'a' + (n % 26) as u8; 1000 * n as usize + 1];
                let r = client.post(format!("http://{public}/api/echo")).body(body.clone()).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()["x-backend-id"], want.as_str(), "client {i} moved");
                let echoed: serde_json::Value = r.json().await.unwrap();
                assert_eq!(echoed["body_len"], body.len(), "client {i} request {n}");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backends_clients_move_the_others_stay_and_it_comes_back() {
    let mut backends = three_backends();
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    let before = backends_by_client(&proxy, 300).await;

    backends[1].stop();
    proxy.wait_for_health(backends[1].addr, "down").await;
    let during = backends_by_client(&proxy, 300).await;
    for (i, b) in &before {
        if b == "b2" {
            assert_ne!(during[i], "b2", "client {i} still on the stopped backend");
        } else {
            assert_eq!(&during[i], b, "client {i} moved although its backend is up");
        }
    }

    backends[1].restart();
    proxy.wait_for_health(backends[1].addr, "up").await;
    let after = backends_by_client(&proxy, 300).await;
    assert_eq!(after, before, "clients did not return to the restored backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_retries_on_the_next_backend_and_passive_checks_take_it_out() {
    let mut backends = three_backends();
    let options = ProxyOptions {
        // Active checks too slow to notice: only retries and passive checks act.
        health: "interval = \"1h\"\n".into(),
        upstream: "max_fails = 2\nfail_timeout = \"30s\"\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let before = backends_by_client(&proxy, 60).await;
    backends[0].stop();

    // Every request still succeeds, served by the next backend on the ring.
    let during = backends_by_client(&proxy, 60).await;
    for (i, b) in &before {
        if b != "b1" {
            assert_eq!(&during[i], b);
        } else {
            assert_ne!(during[i], "b1");
        }
    }
    let health = proxy.health().await;
    assert_eq!(health[&backends[0].addr.to_string()], "failed", "{health:?}");
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    assert!(metrics.contains("proxy_upstream_retries_total{upstream=\"backends\"}"), "{metrics}");
    assert!(metrics.contains("proxy_upstream_passive_ejections_total{upstream=\"backends\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let backends = three_backends();
    let options = ProxyOptions { client: "trusted_proxies = [\"127.0.0.2/32\"]\n".into(), ..Default::default() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let untrusted: IpAddr = "127.0.0.3".parse().unwrap();
    let trusted: IpAddr = "127.0.0.2".parse().unwrap();

    let plain = get_from(untrusted, proxy.public, "/api/x", &[]).await.unwrap();
    let mut seen_trusted = HashSet::new();
    for i in 0..40 {
        let forged = format!("10.9.{i}.1");
        let r = get_from(untrusted, proxy.public, "/api/x", &[("X-Forwarded-For", &forged), ("X-Real-IP", &forged)])
            .await
            .unwrap();
        assert_eq!(r.backend(), plain.backend(), "a forged header moved the client");
        assert_eq!(r.json()["x_real_ip"], "127.0.0.3");
        assert_eq!(r.json()["x_forwarded_for"], "127.0.0.3");

        let r = get_from(trusted, proxy.public, "/api/x", &[("X-Forwarded-For", &forged)]).await.unwrap();
        assert_eq!(r.json()["x_real_ip"], forged.as_str());
        assert_eq!(r.json()["x_forwarded_for"], format!("{forged}, 127.0.0.2").as_str());
        seen_trusted.insert(r.backend());
    }
    assert!(seen_trusted.len() > 1, "a trusted proxy's clients all went to one backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_to_the_backend_and_the_request_id_round_trip() {
    let backends = vec![Backend::start("only")];
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;

    let r = get(proxy.public, "/api/headers").await.unwrap();
    let id = r.headers.get("x-request-id").cloned().expect("x-request-id returned");
    assert!(!id.is_empty());
    let seen = r.json();
    assert_eq!(seen["x_request_id"], id.as_str());
    assert_eq!(seen["x_forwarded_proto"], "http");
    assert_eq!(seen["x_real_ip"], "127.0.0.1");
    assert_eq!(r.backend(), "only");

    let r = get_from("127.0.0.1".parse().unwrap(), proxy.public, "/api/headers", &[("X-Request-Id", "r-given-42")])
        .await
        .unwrap();
    assert_eq!(r.headers["x-request-id"], "r-given-42");
    assert_eq!(r.json()["x_request_id"], "r-given-42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_paths_are_answered_404_by_the_proxy() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions {
        routes: "[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let r = get(proxy.public, "/elsewhere").await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_through_the_proxy_and_an_idle_socket_outlives_http_timeouts() {
    let backends = vec![Backend::start("ws1")];
    let options = ProxyOptions {
        client: "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nkeepalive_timeout = \"1s\"\n".into(),
        upstream: "read_timeout = \"1s\"\n".into(),
        ws_idle: "30s".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let url = format!("ws://{}/ws/chat?session_id=s-1", proxy.public);
    let (mut ws, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(response.headers().contains_key("x-request-id"));

    ws.send(Message::Text("hello".into())).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ws1:hello");
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    assert!(metrics.contains("proxy_websockets_active 1"), "{metrics}");

    // Idle for three times every HTTP timeout, then still alive both ways.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.send(Message::Text("still there".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ws1:still there");
    ws.close(None).await.ok();
}

/// Byte `i` of what the raw backend floods with.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// A backend that answers `/health` with 200 and an upgrade with `101`, then
/// on `/flood` writes [`pattern`] bytes as fast as they are taken, `total`
/// in all (counted in the returned counter), and closes; on `/count` it
/// reads until the client's end and answers `got N`. The bytes after the
/// `101` are not WebSocket frames: the proxy passes bytes, not frames.
async fn raw_upgrade_backend(total: u64) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let written = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut buf = [0u8; 1024];
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                if head.starts_with("GET /health ") {
                    let _ =
                        socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    return;
                }
                let switched = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                                sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if socket.write_all(switched.as_bytes()).await.is_err() {
                    return;
                }
                if head.starts_with("GET /count ") {
                    let mut n = 0u64;
                    let mut buf = vec![0u8; 65536];
                    while let Ok(k @ 1..) = socket.read(&mut buf).await {
                        n += k as u64;
                    }
                    let _ = socket.write_all(format!("got {n}").as_bytes()).await;
                    return;
                }
                let mut at = 0u64;
                while at < total {
                    let chunk: Vec<u8> = (at..(at + 65536).min(total)).map(pattern).collect();
                    let Ok(n) = socket.write(&chunk).await else { return };
                    at += n as u64;
                    written.store(at, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, written)
}

/// A raw upgrade request for `path` through the proxy; returns the socket
/// and the bytes that came after the `101` head.
async fn upgrade_raw(proxy: &Proxy, path: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    let mut client = tokio::net::TcpStream::connect(proxy.public).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    (client, got.split_off(end))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_holds_a_flooding_backend_back_while_its_client_reads_nothing_and_loses_no_byte() {
    // Far more than the socket buffers on the way can hold.
    const TOTAL: u64 = 128 << 20;
    let (addr, written) = raw_upgrade_backend(TOTAL).await;
    let proxy = Proxy::start(&[addr], ProxyOptions::default()).await;
    let (mut client, mut got) = upgrade_raw(&proxy, "/flood").await;

    // The client reads nothing: once the buffers on the way are full, the
    // backend's writes stop.
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the backend never stalled: {now} bytes written");
        last = now;
    }
    assert!(last < TOTAL / 2, "{last} bytes written to a client that reads nothing");

    // Then every byte arrives, in order, and the backend's end ends it.
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    loop {
        for &b in &got {
            assert_eq!(b, pattern(at), "byte {at}");
            at += 1;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("stalled at byte {at}"))
            .unwrap();
        if n == 0 {
            break;
        }
        got = buf[..n].to_vec();
    }
    assert_eq!(at, TOTAL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_counts(&proxy).await.1 != "proxy_websockets_active 0" {
        assert!(Instant::now() < deadline, "the tunnel is still counted: {:?}", open_counts(&proxy).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ends_its_side_of_a_tunnel_still_gets_the_backends_answer() {
    let (addr, _) = raw_upgrade_backend(0).await;
    let proxy = Proxy::start(&[addr], ProxyOptions::default()).await;
    let (mut client, early) = upgrade_raw(&proxy, "/count").await;
    assert!(early.is_empty());
    let sent = vec![7u8; 300_000];
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, format!("got {}", sent.len()));
}

/// `stub_status` Active connections and the `proxy_websockets_active` gauge.
async fn open_counts(proxy: &Proxy) -> (u64, String) {
    let stub = parse_stub_status(&get(proxy.status, "/nginx-status").await.unwrap().body).unwrap();
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    let gauge = metrics.lines().find(|l| l.starts_with("proxy_websockets_active ")).unwrap_or("").to_string();
    (stub[0], gauge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_counts_as_an_active_connection_until_its_client_closes_it() {
    let backends = vec![Backend::start("ws1")];
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    let (before, gauge) = open_counts(&proxy).await;
    assert_eq!(gauge, "proxy_websockets_active 0");
    let url = format!("ws://{}/ws/chat?session_id=s-count", proxy.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ws1:hello");
    // The tunnel runs as a task of its own after the upgrade; the connection
    // stays counted while it runs, and both counts fall when it ends.
    assert_eq!(open_counts(&proxy).await, (before + 1, "proxy_websockets_active 1".to_string()));
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_counts(&proxy).await;
        if now == (before, "proxy_websockets_active 0".to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "still counted 5 s after the close: {now:?} (before: {before})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
}

/// Voluntary context switches summed over the threads of `pid`, and their names.
fn threads_of(pid: u32) -> (u64, Vec<String>) {
    let mut switches = 0;
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(n) = line.strip_prefix("voluntary_ctxt_switches:") {
                switches += n.trim().parse::<u64>().unwrap_or(0);
            }
            if let Some(n) = line.strip_prefix("Name:") {
                names.push(n.trim().to_string());
            }
        }
    }
    (switches, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_sleeps_after_serving_no_clock_thread_ticks() {
    let backends = vec![Backend::start("b")];
    let options = ProxyOptions {
        health: "interval = \"2s\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    for _ in 0..20 {
        assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
    }
    let url = format!("ws://{}/ws/chat?session_id=s-quiet", proxy.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    ws.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Pingora's fast-timeout clock thread, once started, wakes every 10 ms
    // (300 times in 3 s) for the life of the process; the proxy keeps
    // Pingora's timeouts on Tokio's timer so it never starts. What is left:
    // health checks, one timer per runtime thread every 250 ms.
    let (before, names) = threads_of(proxy.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, _) = threads_of(proxy.pid());
    assert!(!names.iter().any(|n| n == "Timer thread"), "threads: {names:?}");
    assert!(after - before < 150, "{} wake-ups in 3 s idle; threads: {names:?}", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_idle_past_its_timeout_is_closed_and_traffic_keeps_one_open() {
    let backends = vec![Backend::start("ws1")];
    let options = ProxyOptions { ws_idle: "1s".into(), ..Default::default() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let url = format!("ws://{}/ws/chat?session_id=s-idle", proxy.public);
    let (mut busy, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut idle, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    // A frame every 400 ms keeps `busy` open for 2.4 s, past the 1 s idle time.
    let started = std::time::Instant::now();
    for i in 0..6 {
        busy.send(Message::Text(format!("ping {i}").into())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), busy.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("ws1:ping {i}"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // `idle` sent nothing: the proxy closed it (its TCP connection ends).
    let end = tokio::time::timeout(Duration::from_secs(5), idle.next()).await.expect("the idle socket is closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    assert!(metrics.contains("proxy_websockets_active 1"), "{metrics}");
    busy.send(Message::Text("last".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), busy.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ws1:last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_upstream_list_and_open_websockets_stay_up() {
    let first = Backend::start("old");
    let mut options = ProxyOptions::default();
    let mut proxy = Proxy::start(&[first.addr], options.clone()).await;
    let url = format!("ws://{}/ws/chat", proxy.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("a".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap().as_str(), "old:a");

    let second = Backend::start("new");
    options.upstream = String::new();
    proxy.rewrite_config(&[first.addr, second.addr], &options);
    proxy.hangup();
    proxy.wait_for_health(second.addr, "up").await;
    assert!(proxy.is_running());

    let reached: HashSet<String> = backends_by_client(&proxy, 60).await.into_values().collect();
    assert!(reached.contains("new"), "the new backend got no traffic: {reached:?}");
    ws.send(Message::Text("b".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "old:b");

    // A broken file changes nothing and keeps the proxy up.
    let rejected = "proxy_config_reloads_total{result=\"rejected\"}";
    let before = proxy.metric(rejected).await;
    std::fs::write(&proxy.config_path, "[upstreams.backends]\nservers = []\n").unwrap();
    proxy.hangup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.metric(rejected).await == before {
        assert!(tokio::time::Instant::now() < deadline, "the broken file was never read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.is_running());
    assert_eq!(proxy.health().await.len(), 2);
}

/// A `SIGHUP` that reaches the proxy while it starts (held here in its first
/// round of health checks by a backend that accepts and never answers) is
/// applied once it serves, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_starting_is_applied() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let new = Backend::start("new");
    let options = ProxyOptions {
        health: "interval = \"200ms\"\ntimeout = \"2s\"\nrise = 1\nfall = 1\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::spawn(&[silent_addr], options.clone());
    // The first probe: the proxy is past its signal set-up, not yet serving.
    let (_probe, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .unwrap_or_else(|_| panic!("no health probe came:\n{}", proxy.log()))
        .unwrap();
    proxy.rewrite_config(&[new.addr], &options);
    proxy.hangup();
    proxy.wait_for_up(1).await;
    assert_eq!(proxy.health().await.keys().collect::<Vec<_>>(), [&new.addr.to_string()]);
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().backend(), "new");
    assert_eq!(proxy.metric("proxy_config_reloads_total{result=\"applied\"}").await, 1);
}

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["--config", path.to_str().unwrap(), "--test"])
        .env_remove("PROXY_LISTEN")
        .env_remove("PROXY_STATUS_LISTEN")
        .env_remove("PROXY_BACKENDS")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn config_test_rejects_bad_files_naming_file_key_and_line() {
    let good = "[upstreams.backends]\nservers = [\"127.0.0.1:1\"]\n";
    assert_eq!(check_config(good), (true, String::new()));

    let (ok, err) = check_config("[listen]\npublik = \"0.0.0.0:8080\"\n");
    assert!(!ok);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[listen]\npublik = 1\n").unwrap();
    let code = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["-c", bad.to_str().unwrap(), "-t"]).output().unwrap();
    assert_eq!(code.status.code(), Some(64), "an unusable configuration exits 64, as in the other services");
    assert!(err.contains("p.toml") && err.contains("line 2") && err.contains("publik"), "{err}");

    let (ok, err) = check_config("[listen]\npublic = \"0.0.0.0:80800\"\n");
    assert!(!ok);
    assert!(err.contains("p.toml:2: listen.public"), "{err}");

    let (ok, err) = check_config("[listen]\nstatus = \"127.0.0.1:8090\"\n\n[upstreams.backends]\nservers = []\n");
    assert!(!ok);
    assert!(err.contains("p.toml:5: upstreams.backends.servers"), "{err}");

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/proxy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["--config", shipped, "--test"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_status_has_nginx_format_and_its_counters_move() {
    let backends = vec![Backend::start("only")];
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    let r = get(proxy.status, "/nginx-status").await.unwrap();
    assert_eq!(r.status, 200);
    let before = parse_stub_status(&r.body).unwrap_or_else(|| panic!("not stub_status: {:?}", r.body));
    for _ in 0..5 {
        assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
    }
    let after = parse_stub_status(&get(proxy.status, "/nginx-status").await.unwrap().body).unwrap();
    assert_eq!(after[1], before[1] + 5, "accepts");
    assert_eq!(after[2], before[2] + 5, "handled");
    assert_eq!(after[3], before[3] + 5, "requests");
    assert_eq!(after[0], after[4] + after[5] + after[6], "active = reading + writing + waiting");

    let upstreams = proxy.upstreams().await;
    assert_eq!(upstreams["upstreams"][0]["name"], "backends");
    assert_eq!(upstreams["upstreams"][0]["backends"][0]["health"], "up");
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    for name in [
        "proxy_requests_total{status=\"200\",upstream=\"backends\"} 5",
        "proxy_request_duration_seconds_bucket",
        "proxy_upstream_up{backend=",
        "proxy_websockets_active 0",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    // The status endpoints are not on the public listener.
    let public = get(proxy.public, "/nginx-status").await.unwrap();
    assert_eq!(public.backend(), "only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clean_4xx_or_close_and_the_proxy_keeps_serving() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions {
        client: "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nmax_body_bytes = 1000\n".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let me: IpAddr = "127.0.0.1".parse().unwrap();
    let status_of = |raw: &[u8]| parse_response(raw).map(|r| r.status);

    // Malformed request line.
    let out = raw_exchange(me, proxy.public, b"THIS IS NOT HTTP\r\n\r\n", Duration::from_secs(5)).await.unwrap();
    assert!(matches!(status_of(&out), None | Some(400..=499)), "{:?}", String::from_utf8_lossy(&out));

    // Oversized header: over Pingora's 1 MiB header limit.
    let mut big = b"GET /api/x HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1_100_000));
    big.extend_from_slice(b"\r\n\r\n");
    let out = raw_exchange(me, proxy.public, &big, Duration::from_secs(5)).await;
    if let Ok(out) = out {
        assert!(matches!(status_of(&out), None | Some(400..=499)), "{:?}", status_of(&out));
    }

    // Oversized body, announced and chunked.
    let body = vec![b'x'; 5000];
    let r = request_from(me, proxy.public, "POST", "/api/chat", &[], &body).await.unwrap();
    assert_eq!(r.status, 413);
    let mut chunked =
        b"POST /api/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(b"3e8\r\n");
        chunked.extend(std::iter::repeat_n(b'y', 1000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = raw_exchange(me, proxy.public, &chunked, Duration::from_secs(5)).await.unwrap_or_default();
    assert!(matches!(status_of(&out), None | Some(413)), "{:?}", status_of(&out));

    // A body that stalls: 408.
    let out = raw_exchange(
        me,
        proxy.public,
        b"POST /api/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly-a-little",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status_of(&out), Some(408), "{:?}", String::from_utf8_lossy(&out));

    // Slowloris: a header trickled a byte at a time is cut at the header deadline.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    let mut slow = socket.connect(proxy.public).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /api/x HTTP/1.1\r\nHost: t\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'z')) {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        if started.elapsed() > Duration::from_secs(6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cut, "a slowloris client was not cut");
    assert!(started.elapsed() < Duration::from_secs(4), "cut too late: {:?}", started.elapsed());

    // And the proxy still serves.
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_request_rate_gets_429() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions { client: "requests_per_second = 5\n".into(), ..Default::default() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let me: IpAddr = "127.0.0.9".parse().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(get_from(me, proxy.public, "/api/x", &[]).await.unwrap().status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    // Another client is not affected.
    let other = get_from("127.0.0.10".parse().unwrap(), proxy.public, "/api/x", &[]).await.unwrap();
    assert_eq!(other.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_the_listeners_to_a_new_process_without_failed_requests() {
    let backends = vec![Backend::start("only")];
    // A grace period: the drain in which keep-alive clients are told to close.
    let options = ProxyOptions { server: "grace_period = \"2s\"\n".into(), ..Default::default() };
    let mut old = Proxy::start(&addrs(&backends), options).await;
    // The README's steps: the pid file names the running proxy (also in the
    // foreground); start the new one with -u, then `kill -QUIT $(cat pid_file)`.
    let pid_file = old.config_path.parent().unwrap().join("proxy.pid");
    let old_pid = std::fs::read_to_string(&pid_file).expect("a pid file in the foreground");
    assert_eq!(old_pid.trim(), old.pid().to_string());
    let mut new = old.spawn_upgrade();

    // A keep-alive client that never retries: every request it sends must
    // be answered; it opens a new connection only when told to close.
    let public = old.public;
    let keepalive = tokio::spawn(async move {
        let (mut answered, mut told_to_close) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(12);
        let mut conn = tokio::net::TcpStream::connect(public).await.unwrap();
        while Instant::now() < deadline {
            conn.write_all(b"GET /api/k HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            let (status, close) = read_one_response(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("a keep-alive request was lost after {answered} answers: {e}"));
            assert_eq!(status, 200);
            answered += 1;
            if close {
                told_to_close += 1;
                conn = tokio::net::TcpStream::connect(public).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (answered, told_to_close)
    });

    // The new process waits on the upgrade socket; the old one sends its listeners on SIGQUIT.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served = old.quit_and_serve_until_gone().await;
    assert!(served > 10);
    // The new process now owns both listeners, and the pid file.
    assert_eq!(get(old.public, "/api/x").await.unwrap().status, 200);
    assert_eq!(get(old.status, "/nginx-status").await.unwrap().status, 200);
    assert!(new.try_wait().unwrap().is_none(), "the new process exited");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), new.id().to_string());
    let (answered, told_to_close) = keepalive.await.expect("the keep-alive client lost a request");
    assert!(answered > 50 && told_to_close >= 1, "answered {answered}, told to close {told_to_close}");
    new.kill().ok();
    new.wait().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_gets_no_listeners_exits_non_zero_and_the_proxy_keeps_serving() {
    let backends = vec![Backend::start("only")];
    let proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    // No SIGQUIT is sent: nothing hands the listeners over.
    let mut new = proxy.spawn_upgrade();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = new.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the new process kept waiting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "a new process without listeners exited 0");
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
}

#[tokio::test]
async fn sigquit_with_no_new_process_waiting_is_ignored_and_the_proxy_keeps_serving() {
    let backends = vec![Backend::start("only")];
    let mut proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    proxy.signal("QUIT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("no new process waits") {
        assert!(Instant::now() < deadline, "the SIGQUIT was not read:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past Pingora's own drain (it would have closed the listeners by now).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(proxy.is_running(), "the proxy exited on a SIGQUIT nobody could take over from");
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
}

/// Reads one response (`Content-Length` body) from a keep-alive connection:
/// its status and whether it says `Connection: close`.
async fn read_one_response(conn: &mut tokio::net::TcpStream) -> Result<(u16, bool), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or("no status")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or("no content-length")?;
            if buf.len() >= end + 4 + length {
                return Ok((status, head.contains("connection: close")));
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed with {} bytes of a response read", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_within_the_configured_grace() {
    let backends = vec![Backend::start("only")];
    let mut proxy = Proxy::start(&addrs(&backends), ProxyOptions::default()).await;
    proxy.signal("TERM");
    assert!(proxy.wait_exit(Duration::from_secs(8)).await, "still running after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_and_the_proxy_keeps_serving() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions { client: "max_connections = 2\n".into(), ..Default::default() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let idle1 = tokio::net::TcpStream::connect(proxy.public).await.unwrap();
    let idle2 = tokio::net::TcpStream::connect(proxy.public).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = get(proxy.public, "/api/x").await;
    assert!(refused.is_err(), "a third connection was served: {refused:?}");
    drop((idle1, idle2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(proxy.public, "/api/x").await.unwrap().status, 200);
    let status = parse_stub_status(&get(proxy.status, "/nginx-status").await.unwrap().body).unwrap();
    assert!(status[1] > status[2], "accepts should exceed handled: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optional_tls_listener_serves_and_says_https_to_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    if !made.is_ok_and(|o| o.status.success()) {
        eprintln!("openssl not available: skipping the TLS test");
        return;
    }
    let backends = vec![Backend::start("only")];
    let tls_port = free_port();
    let options = ProxyOptions {
        extra: format!(
            "[listen.tls]\naddr = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        ..Default::default()
    };
    let _proxy = Proxy::start(&addrs(&backends), options).await;
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let r = client.get(format!("https://localhost:{tls_port}/api/tls")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["x_forwarded_proto"], "https");
}

/// Kills the daemons a test started, whatever happens to the test.
struct Daemons(Vec<u32>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[tokio::test]
async fn the_readme_upgrade_steps_work_for_a_daemon() {
    let backends = vec![Backend::start("only")];
    let dir = tempfile::tempdir().unwrap();
    let (public, status) = (free_port(), free_port());
    let config = dir.path().join("proxy.toml");
    let options = ProxyOptions { server: "grace_period = \"1s\"\n".into(), ..Default::default() };
    std::fs::write(&config, config_text(public, status, dir.path(), &addrs(&backends), &options)).unwrap();
    let pid_file = dir.path().join("proxy.pid");
    let run = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxy"));
        command.arg("--config").arg(&config).args(extra).env("RUST_LOG", "info");
        for var in ["PROXY_LISTEN", "PROXY_STATUS_LISTEN", "PROXY_BACKENDS"] {
            command.env_remove(var);
        }
        command.status().unwrap()
    };
    let public = SocketAddr::from(([127, 0, 0, 1], public));
    let mut daemons = Daemons(Vec::new());

    // `proxy --config ... -d`: the command returns, the daemon serves.
    assert!(run(&["-d"]).success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let old = loop {
        if let Some(pid) = read_pid(&pid_file) {
            if get(public, "/api/x").await.is_ok_and(|r| r.status == 200) {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "the daemon did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    daemons.0.push(old);

    // `proxy --config ... -d -u &`: the command waits in the foreground for
    // the listeners (the pid file still names the old daemon), then
    // `kill -QUIT $(cat proxy.pid)`; after the hand-over the new process
    // daemonizes, and the command returns.
    let upgrading = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_proxy"))
                .arg("--config")
                .arg(&config)
                .args(["-d", "-u"])
                .env("RUST_LOG", "info")
                .env_remove("PROXY_LISTEN")
                .env_remove("PROXY_STATUS_LISTEN")
                .env_remove("PROXY_BACKENDS")
                .status()
                .unwrap()
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !signals_listener(dir.path()) {
        assert!(Instant::now() < deadline, "the new process never waited for the listeners");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(read_pid(&pid_file), Some(old), "the pid file still names the old daemon");
    let quit = format!("kill -QUIT $(cat {})", pid_file.display());
    assert!(Command::new("sh").arg("-c").arg(&quit).status().unwrap().success(), "{quit}");
    let returned = tokio::time::timeout(Duration::from_secs(20), upgrading).await.expect("the -d -u command returns");
    assert!(returned.unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(old) {
        let r = get(public, "/api/x").await.expect("a request failed during the upgrade");
        assert_eq!(r.status, 200);
        assert!(Instant::now() < deadline, "the old daemon did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = read_pid(&pid_file).expect("the new daemon's pid file");
    daemons.0.push(new);
    assert_ne!(new, old);
    assert!(alive(new));
    assert_eq!(get(public, "/api/x").await.unwrap().status, 200);
}

/// Whether the new process listens on the test's upgrade socket.
fn signals_listener(dir: &std::path::Path) -> bool {
    proxy::signals::someone_listens_on(dir.join("upgrade.sock").to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_a_trusted_balancer_names_the_client_and_is_required_of_it() {
    let backends = three_backends();
    let options = ProxyOptions { client: "proxy_protocol_from = [\"127.0.0.2/32\"]\n".into(), ..Default::default() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let balancer: IpAddr = "127.0.0.2".parse().unwrap();
    let limit = Duration::from_secs(5);
    let request = b"GET /api/headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let v1 = |client: &str| {
        let mut raw = format!("PROXY TCP4 {client} 10.0.0.1 40000 8080\r\n").into_bytes();
        raw.extend_from_slice(request);
        raw
    };

    // Version 1: the named client is the client for the forwarding headers
    // and for sticky routing (the balancer's many clients spread out, each
    // one staying on its backend).
    let mut spread = HashSet::new();
    for i in 0..30 {
        let client = format!("198.51.{i}.7");
        let first = parse_response(&raw_exchange(balancer, proxy.public, &v1(&client), limit).await.unwrap()).unwrap();
        assert_eq!(first.status, 200, "{}", first.body);
        assert_eq!(first.json()["x_real_ip"], client.as_str());
        assert_eq!(first.json()["x_forwarded_for"], client.as_str());
        let again = parse_response(&raw_exchange(balancer, proxy.public, &v1(&client), limit).await.unwrap()).unwrap();
        assert_eq!(again.backend(), first.backend(), "the same client stays on its backend");
        spread.insert(first.backend());
    }
    assert!(spread.len() > 1, "the balancer's clients all went to one backend");

    // Version 2 (binary), as Docker's userland proxy or a cloud balancer sends it.
    let mut raw = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    raw.extend([0x21, 0x11, 0, 12, 203, 0, 113, 5, 10, 0, 0, 1, 0x9C, 0x40, 0x1F, 0x90]);
    raw.extend_from_slice(request);
    let r = parse_response(&raw_exchange(balancer, proxy.public, &raw, limit).await.unwrap()).unwrap();
    assert_eq!(r.json()["x_real_ip"], "203.0.113.5");

    // `UNKNOWN` (the balancer's own check): served as the balancer.
    let mut raw = b"PROXY UNKNOWN\r\n".to_vec();
    raw.extend_from_slice(request);
    let r = parse_response(&raw_exchange(balancer, proxy.public, &raw, limit).await.unwrap()).unwrap();
    assert_eq!(r.json()["x_real_ip"], "127.0.0.2");

    // From the balancer, a request without the header is closed unanswered.
    let refused = proxy.metric("proxy_rejected_total{reason=\"proxy_protocol\"}").await;
    let raw = raw_exchange(balancer, proxy.public, request, limit).await.unwrap_or_default();
    assert!(raw.is_empty(), "answered: {}", String::from_utf8_lossy(&raw));
    assert_eq!(proxy.metric("proxy_rejected_total{reason=\"proxy_protocol\"}").await, refused + 1);

    // From anyone else a PROXY line is not believed: it is a bad request.
    let other: IpAddr = "127.0.0.3".parse().unwrap();
    let raw = raw_exchange(other, proxy.public, &v1("198.51.100.1"), limit).await.unwrap();
    let r = parse_response(&raw).unwrap();
    assert!((400..500).contains(&r.status), "{}", r.status);
    assert_ne!(r.body.contains("198.51.100.1"), true);
}
