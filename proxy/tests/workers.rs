//! Worker processes (`server.processes = 2`): the real proxy binary, its
//! supervisor and workers as real processes, real sockets. Each worker's own
//! metrics socket (in `{upgrade_sock}.workers.{supervisor pid}/`) shows
//! what that worker alone served, so a test can tell the workers apart.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use testkit::children_of;
use tokio::io::AsyncReadExt;

fn two_workers() -> ProxyOptions {
    ProxyOptions { server: "processes = 2\n".into(), ..Default::default() }
}

fn addrs(backends: &[Backend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// What worker `index` alone reports (its own registry, not the sum).
async fn own_metrics(proxy: &Proxy, index: usize) -> String {
    let path: PathBuf = proxy.dir().join(format!("upgrade.sock.workers.{}/worker-{index}.sock", proxy.pid()));
    let mut text = String::new();
    let mut conn = tokio::net::UnixStream::connect(&path).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    conn.read_to_string(&mut text).await.unwrap();
    text
}

/// The sum of `name`'s samples (any labels) in a metrics text.
fn total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until every worker answers on its metrics socket (it has bound its
/// listeners): the public port answers once the first one does.
async fn all_serving(proxy: &Proxy, workers: usize) {
    let dir = proxy.dir().join(format!("upgrade.sock.workers.{}", proxy.pid()));
    for index in 0..workers {
        let path = dir.join(format!("worker-{index}.sock"));
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::UnixStream::connect(&path).await.is_err() {
            assert!(Instant::now() < deadline, "worker {index} never served\n{}", proxy.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn stub(proxy: &Proxy) -> [u64; 7] {
    let r = get(proxy.status, "/nginx-status").await.unwrap();
    parse_stub_status(&r.body).unwrap_or_else(|| panic!("not stub_status: {:?}", r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_port_and_report_as_one_proxy() {
    let backends = vec![Backend::start("a"), Backend::start("b"), Backend::start("c")];
    let proxy = Proxy::start(&addrs(&backends), two_workers()).await;
    let workers = children_of(proxy.pid());
    assert_eq!(workers.len(), 2, "workers {workers:?}\n{}", proxy.log());
    all_serving(&proxy, 2).await;

    let before = stub(&proxy).await;
    for i in 0..60 {
        let r = get_from(client_ip(i), proxy.public, "/api/x", &[]).await.unwrap();
        assert_eq!(r.status, 200);
    }
    // Each worker served some (the kernel spreads connections), and every
    // status answer counts all of them, whichever worker gives it.
    let own: Vec<u64> = [own_metrics(&proxy, 0).await, own_metrics(&proxy, 1).await]
        .iter()
        .map(|t| total(t, "proxy_requests_total"))
        .collect();
    assert!(own.iter().all(|&n| n > 0), "requests per worker {own:?}");
    let after = stub(&proxy).await;
    assert_eq!(after[3] - before[3], 60, "requests: {after:?}");
    assert_eq!(after[1] - before[1], 60, "accepts");
    let metrics = get(proxy.status, "/metrics").await.unwrap().body;
    assert!(metrics.contains("\nproxy_workers 2\n"), "{metrics}");
    assert!(
        metrics.contains("proxy_requests_total{status=\"200\",upstream=\"backends\"} 60\n"),
        "own {own:?}:\n{metrics}"
    );
    assert_eq!(total(&metrics, "proxy_connections_accepted_total"), after[1]);
    assert_eq!(metrics.matches("# TYPE proxy_requests_total counter").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_request_rate_is_counted_once_across_workers() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions { client: "requests_per_second = 20\n".into(), ..two_workers() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    let me: IpAddr = "127.0.0.9".parse().unwrap();
    // Bursts of 60 requests at once on 60 connections, which the kernel
    // spreads over both workers. With a table per worker each would let 20
    // through (40); shared, 20 pass, or up to 40 if the burst straddles two
    // one-second windows, which is why there are three bursts.
    let mut passed = Vec::new();
    for _ in 0..3 {
        let burst: Vec<_> = (0..60).map(|_| tokio::spawn(get_from(me, proxy.public, "/api/x", &[]))).collect();
        let mut ok = 0;
        for r in burst {
            let status = r.await.unwrap().unwrap().status;
            assert!(status == 200 || status == 429, "{status}");
            ok += u32::from(status == 200);
        }
        passed.push(ok);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert!(passed.iter().all(|&n| (20..=40).contains(&n)), "passed per burst {passed:?}");
    assert!(passed.contains(&20), "passed per burst {passed:?}: no burst within one window saw one shared limit");
    let own: Vec<u64> = [own_metrics(&proxy, 0).await, own_metrics(&proxy, 1).await]
        .iter()
        .map(|t| total(t, "proxy_requests_total"))
        .collect();
    assert!(own.iter().all(|&n| n > 0), "both workers answered: {own:?}");
    // Another client is not affected.
    assert_eq!(get_from("127.0.0.10".parse().unwrap(), proxy.public, "/api/x", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reaches_every_worker_and_a_killed_worker_is_replaced_and_forgotten() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let proxy = Proxy::start(&[old.addr], two_workers()).await;

    // SIGHUP to the supervisor: both workers apply the new list.
    proxy.rewrite_config(&[new.addr], &two_workers());
    proxy.hangup();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut seen = std::collections::HashSet::new();
        for i in 0..40 {
            seen.insert(get_from(client_ip(i), proxy.public, "/api/x", &[]).await.unwrap().backend());
        }
        if seen.len() == 1 && seen.contains("new") {
            break;
        }
        assert!(Instant::now() < deadline, "still served by {seen:?}\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.metric("proxy_config_reloads_total{result=\"applied\"}").await, 2, "one reload per worker");

    // Connections held open, some on each worker.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(proxy.public).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stub(&proxy).await[0] != 20 {
        assert!(Instant::now() < deadline, "{:?}", stub(&proxy).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let workers = children_of(proxy.pid());
    assert_eq!(workers.len(), 2);
    let victim = workers[0];
    assert!(std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap().success());

    // Another worker takes its place and serves.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = children_of(proxy.pid());
        if now.len() == 2 && !now.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "workers {now:?}\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new worker serves once its metrics socket answers.
    all_serving(&proxy, 2).await;
    drop(held);
    // The dead worker's open connections are forgotten with it; the
    // survivor's close: nothing is left open.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stub(&proxy).await;
        if s[0] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still open: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..40 {
        let r = get_from(client_ip(i), proxy.public, "/api/x", &[]).await.unwrap();
        assert_eq!((r.status, r.backend()), (200, "new".to_string()));
    }
    assert!(proxy.log().contains("ended; starting another"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_supervisor_stops_every_worker() {
    let backends = vec![Backend::start("only")];
    let mut proxy = Proxy::start(&addrs(&backends), two_workers()).await;
    let workers = children_of(proxy.pid());
    assert_eq!(workers.len(), 2);
    proxy.signal("TERM");
    assert!(proxy.wait_exit(Duration::from_secs(10)).await, "the supervisor did not exit\n{}", proxy.log());
    for w in workers {
        assert!(!alive(w), "worker {w} outlived its supervisor");
    }
    assert!(get(proxy.public, "/api/x").await.is_err(), "nobody should be listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_serves_beside_the_old_workers_then_takes_over() {
    let backends = vec![Backend::start("only")];
    let options = ProxyOptions { server: "processes = 2\ngrace_period = \"1s\"\n".into(), ..Default::default() };
    let mut old = Proxy::start(&addrs(&backends), options).await;
    let pid_file = old.dir().join("proxy.pid");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), old.pid().to_string());
    let old_workers = children_of(old.pid());

    // SIGQUIT before a new proxy serves beside it is ignored.
    old.signal("QUIT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !old.log().contains("no new process waits") {
        assert!(Instant::now() < deadline, "{}", old.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(old.is_running());

    let mut new = old.spawn_upgrade();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !old.upgraded_log().contains("serving beside proxy") {
        assert!(Instant::now() < deadline, "the new proxy never served:\n{}", old.upgraded_log());
        assert!(new.try_wait().unwrap().is_none(), "the new proxy exited:\n{}", old.upgraded_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Until the old proxy is gone, the pid file still names it.
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), old.pid().to_string());
    let served = old.quit_and_serve_until_gone().await;
    assert!(served > 10, "{served}");
    for w in old_workers {
        assert!(!alive(w), "old worker {w} still runs");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pid_file).unwrap().trim() != new.id().to_string() {
        assert!(Instant::now() < deadline, "the pid file does not name the new proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(children_of(new.id()).len(), 2);
    for _ in 0..20 {
        assert_eq!(get(old.public, "/api/x").await.unwrap().status, 200);
    }
    assert_eq!(get(old.status, "/nginx-status").await.unwrap().status, 200);
    new.kill().ok();
    new.wait().ok();
}

#[test]
fn workers_that_cannot_bind_stop_the_supervisor_with_an_error() {
    // The public port is taken by a listener without SO_REUSEPORT.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let status = free_port();
    let text = config_text(
        taken.local_addr().unwrap().port(),
        status,
        dir.path(),
        &["127.0.0.1:9".parse().unwrap()],
        &two_workers(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("workers die before they serve"), "{log}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_daemon_the_supervisor_detaches_and_its_workers_serve() {
    let backends = vec![Backend::start("only")];
    let dir = tempfile::tempdir().unwrap();
    let (public, status) = (free_port(), free_port());
    let text = config_text(public, status, dir.path(), &addrs(&backends), &two_workers());
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_proxy")).arg("--config").arg(&path).arg("-d").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The foreground process has exited; the pid file names the detached supervisor.
    let pid_file = dir.path().join("proxy.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    let supervisor = loop {
        let pid = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid.filter(|p| children_of(*p).len() == 2) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no supervisor with 2 workers (pid file: {pid:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let public = SocketAddr::from(([127, 0, 0, 1], public));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(public, "/api/x").await.map(|r| r.status).ok() != Some(200) {
        assert!(Instant::now() < deadline, "the daemon's workers do not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workers = children_of(supervisor);
    assert!(std::process::Command::new("kill").args(["-TERM", &supervisor.to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(supervisor) || workers.iter().any(|w| alive(*w)) {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// WebSockets from client addresses `from` (so the kernel spreads them over
/// the workers), each checked with one echo.
async fn open_websockets(proxy: &Proxy, from: std::ops::Range<u32>) -> Vec<WebSocket> {
    let mut sockets = Vec::new();
    for i in from {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(client_ip(i), 0)).unwrap();
        let stream = socket.connect(proxy.public).await.unwrap();
        let url = format!("ws://{}/ws/chat?session_id=s-{i}", proxy.public);
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        sockets.push(ws);
    }
    echo_on_each(&mut sockets, "hello").await;
    sockets
}

async fn echo_on_each(sockets: &mut [WebSocket], text: &str) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    for ws in sockets {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("ws:{text}"));
    }
}

/// The names of `pid`'s threads.
fn threads_of(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Waits until `name`'s sum over worker `index`'s own metrics is `want`.
async fn wait_own(proxy: &Proxy, index: usize, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = total(&own_metrics(proxy, index).await, name);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "worker {index}: {name} {got}, not {want}\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workers_websockets_run_on_the_relay_workers_thread_which_is_restarted_with_it() {
    let backends = vec![Backend::start("ws")];
    // websocket.relays is 1 by default: worker 0 relays every tunnel.
    let proxy = Proxy::start(&addrs(&backends), two_workers()).await;
    all_serving(&proxy, 2).await;
    let accepted = "proxy_connections_accepted_total";
    let accepted_before = total(&own_metrics(&proxy, 1).await, accepted);
    let mut sockets = open_websockets(&proxy, 0..24).await;

    // Worker 1 accepted some of them and handed each over: worker 0 counts
    // and relays all, and only worker 0 has a relay thread.
    let handed = "proxy_websocket_handoffs_total{outcome=\"handed_over\"}";
    let own1 = own_metrics(&proxy, 1).await;
    let accepted1 = total(&own1, accepted) - accepted_before;
    assert!(accepted1 > 0 && accepted1 < 24, "worker 1 accepted {accepted1} of 24");
    assert_eq!(total(&own1, "proxy_websocket_handoffs_total"), accepted1, "{own1}");
    assert!(own1.contains(&format!("{handed} {accepted1}\n")), "{own1}");
    wait_own(&proxy, 1, "proxy_websockets_active", 0).await;
    wait_own(&proxy, 1, "proxy_connections_active", 0).await;
    wait_own(&proxy, 0, "proxy_websockets_active", 24).await;
    wait_own(&proxy, 0, "proxy_connections_active", 24).await;
    assert_eq!(stub(&proxy).await[0], 24, "stub_status counts each once");
    let workers = children_of(proxy.pid());
    let relaying: Vec<u32> = workers.iter().copied().filter(|&p| threads_of(p).contains(&"relay".into())).collect();
    assert_eq!(relaying.len(), 1, "threads {:?}", workers.iter().map(|&p| threads_of(p)).collect::<Vec<_>>());

    // Bytes still pass both ways after the hand-over; closing half of the
    // sockets takes them off worker 0's counts.
    echo_on_each(&mut sockets, "again").await;
    for mut ws in sockets.drain(12..) {
        ws.close(None).await.unwrap();
    }
    wait_own(&proxy, 0, "proxy_websockets_active", 12).await;
    wait_own(&proxy, 0, "proxy_connections_active", 12).await;

    // The relay worker dies: its tunnels end with it, and the worker that
    // replaces it takes over the inbox, so tunnels handed over from then on
    // run again.
    assert!(std::process::Command::new("kill").args(["-KILL", &relaying[0].to_string()]).status().unwrap().success());
    for mut ws in sockets {
        use futures::StreamExt;
        let end =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the tunnel ends with its relay");
        assert!(!matches!(end, Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))), "{end:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while children_of(proxy.pid()).len() != 2 || children_of(proxy.pid()).contains(&relaying[0]) {
        assert!(Instant::now() < deadline, "no new worker\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    all_serving(&proxy, 2).await;
    let handed_before = total(&own_metrics(&proxy, 1).await, "proxy_websocket_handoffs_total");
    let _sockets = open_websockets(&proxy, 100..124).await;
    let own1 = own_metrics(&proxy, 1).await;
    assert!(total(&own1, "proxy_websocket_handoffs_total") > handed_before, "{own1}");
    wait_own(&proxy, 0, "proxy_websockets_active", 24).await;
    wait_own(&proxy, 1, "proxy_websockets_active", 0).await;
    assert_eq!(stub(&proxy).await[0], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_relays_0_each_worker_relays_its_own_websockets() {
    let backends = vec![Backend::start("ws")];
    let options = ProxyOptions { websocket: "relays = 0\n".into(), ..two_workers() };
    let proxy = Proxy::start(&addrs(&backends), options).await;
    all_serving(&proxy, 2).await;
    let _sockets = open_websockets(&proxy, 0..24).await;
    let own = [own_metrics(&proxy, 0).await, own_metrics(&proxy, 1).await];
    let open: Vec<u64> = own.iter().map(|t| total(t, "proxy_websockets_active")).collect();
    assert!(open.iter().all(|&n| n > 0) && open.iter().sum::<u64>() == 24, "open per worker {open:?}");
    assert!(own.iter().all(|t| total(t, "proxy_websocket_handoffs_total") == 0));
    assert_eq!(stub(&proxy).await[0], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_its_websockets_while_the_relay_worker_has_no_descriptors_to_spare() {
    let backends = vec![Backend::start("ws")];
    let proxy = Proxy::start(&addrs(&backends), two_workers()).await;
    all_serving(&proxy, 2).await;
    let workers = children_of(proxy.pid());
    let (relay, other): (Vec<u32>, Vec<u32>) = workers.iter().partition(|&&p| threads_of(p).contains(&"relay".into()));
    assert_eq!((relay.len(), other.len()), (1, 1), "workers {workers:?}");
    // A worker reads its open-files limit at its first tunnel and takes it
    // for the relay's: 1,030 leaves room for 3 tunnels beyond the 1,024
    // kept in reserve. Worker 1's own descriptors are far below that.
    let (mut soft, mut hard) = (0, 0);
    rlimit::prlimit(other[0] as i32, rlimit::Resource::NOFILE, None, Some((&mut soft, &mut hard))).unwrap();
    assert!(soft > 1030 && hard >= 1030, "limits {soft}/{hard}");
    rlimit::prlimit(other[0] as i32, rlimit::Resource::NOFILE, Some((1030, hard)), None).unwrap();

    let accepted = "proxy_connections_accepted_total";
    let accepted_before = total(&own_metrics(&proxy, 1).await, accepted);
    let mut sockets = open_websockets(&proxy, 0..24).await;
    let own1 = own_metrics(&proxy, 1).await;
    let accepted1 = total(&own1, accepted) - accepted_before;
    assert!((4..24).contains(&accepted1), "worker 1 accepted {accepted1} of 24: too few to fill the relay");
    let count = |outcome: &str| total(&own1, &format!("proxy_websocket_handoffs_total{{outcome=\"{outcome}\"}}"));
    let (handed, kept) = (count("handed_over"), count("kept"));
    assert_eq!(handed + kept, accepted1, "{own1}");
    // Once the relay holds 3 open connections (its own clients' or handed
    // over), worker 1 relays the rest itself, on a relay thread of its own.
    assert!(kept > 0 && handed <= 3, "handed over {handed}, kept {kept}\n{own1}");
    assert!(threads_of(other[0]).contains(&"relay".into()), "{:?}", threads_of(other[0]));
    wait_own(&proxy, 1, "proxy_websockets_active", kept).await;
    wait_own(&proxy, 0, "proxy_websockets_active", 24 - kept).await;
    assert_eq!(stub(&proxy).await[0], 24, "stub_status counts each once");
    echo_on_each(&mut sockets, "kept").await;
    for mut ws in sockets {
        ws.close(None).await.unwrap();
    }
    wait_own(&proxy, 1, "proxy_websockets_active", 0).await;
    wait_own(&proxy, 0, "proxy_websockets_active", 0).await;
}
