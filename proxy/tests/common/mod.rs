//! Test harness: real axum backends on their own runtimes (so a test can
//! stop one outright and start it again on the same port), the real proxy
//! binary on free ports with a generated configuration, and a raw HTTP/1.1
//! client that can bind any 127.0.0.0/8 source address.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get as route_get};
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a backend knows about itself.
#[derive(Clone)]
struct BackendInfo {
    /// Its id, sent back in `X-Backend-Id` and the body.
    id: String,
    /// When set, `/health` answers 503 (draining).
    draining: Arc<AtomicBool>,
}

/// An axum backend on its own runtime.
pub struct Backend {
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its runtime; dropping it closes every connection at once.
    runtime: Option<tokio::runtime::Runtime>,
    /// Health switch.
    pub draining: Arc<AtomicBool>,
}

async fn health(State(info): State<BackendInfo>) -> StatusCode {
    if info.draining.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn echo_ws(ws: WebSocketUpgrade, State(info): State<BackendInfo>) -> Response {
    ws.on_upgrade(move |socket| echo(socket, info.id))
}

async fn echo(mut socket: WebSocket, id: String) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(format!("{id}:{}", t.as_str()).into()),
            Message::Close(_) => return,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

async fn describe(State(info): State<BackendInfo>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = serde_json::json!({
        "backend": info.id,
        "x_forwarded_for": h("x-forwarded-for"),
        "x_real_ip": h("x-real-ip"),
        "x_forwarded_proto": h("x-forwarded-proto"),
        "x_request_id": h("x-request-id"),
        "body_len": body.len(),
    });
    ([("x-backend-id", info.id.clone())], body.to_string())
}

impl Backend {
    /// Starts backend `id` on a free port.
    pub fn start(id: &str) -> Self {
        Self::start_on(id, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts backend `id` on `addr` (port 0: any).
    pub fn start_on(id: &str, addr: SocketAddr) -> Self {
        let draining = Arc::new(AtomicBool::new(false));
        let info = BackendInfo { id: id.to_string(), draining: draining.clone() };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("bind {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/health", route_get(health))
            .route("/ws/{*rest}", any(echo_ws))
            .fallback(describe)
            .with_state(info);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.ok();
        });
        Self { id: id.to_string(), addr, runtime: Some(runtime), draining }
    }

    /// Stops it: the listener and every open connection close.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        let mut again = Self::start_on(&self.id, self.addr);
        self.runtime = again.runtime.take();
        self.draining = again.draining.clone();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The proxy binary running on free ports.
pub struct Proxy {
    /// Public listener.
    pub public: SocketAddr,
    /// Status listener.
    pub status: SocketAddr,
    /// Its configuration file.
    pub config_path: PathBuf,
    /// The process.
    child: Child,
    /// Temporary directory with the config and log.
    dir: tempfile::TempDir,
}

/// Settings tests vary; the rest of the config is generated.
#[derive(Clone)]
pub struct ProxyOptions {
    /// Extra TOML for `[server]`.
    pub server: String,
    /// Extra TOML for `[client]`.
    pub client: String,
    /// Extra TOML for `[upstreams.backends]`.
    pub upstream: String,
    /// Extra TOML for `[upstreams.backends.health]`.
    pub health: String,
    /// `[websocket]` idle timeout.
    pub ws_idle: String,
    /// Extra TOML for `[websocket]`.
    pub websocket: String,
    /// Routes (TOML), or empty for the defaults.
    pub routes: String,
    /// Extra tables appended at the end (e.g. `[listen.tls]`).
    pub extra: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            server: String::new(),
            client: String::new(),
            upstream: String::new(),
            health: "interval = \"200ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n".into(),
            ws_idle: "1h".into(),
            websocket: String::new(),
            routes: String::new(),
            extra: String::new(),
        }
    }
}

/// A configuration for `backends` with `options`, listening on the given ports.
pub fn config_text(
    public: u16,
    status: u16,
    dir: &std::path::Path,
    backends: &[SocketAddr],
    o: &ProxyOptions,
) -> String {
    let servers: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[server]\nthreads = 2\n{grace}shutdown_timeout = \"1s\"\npid_file = \"{dir}/proxy.pid\"\nupgrade_sock = \"{dir}/upgrade.sock\"\n{server}\n\
         [listen]\npublic = \"127.0.0.1:{public}\"\nstatus = \"127.0.0.1:{status}\"\n\
         [client]\n{client}\n\
         [websocket]\nidle_timeout = \"{ws}\"\n{websocket}\n\
         [upstreams.backends]\nservers = [{servers}]\n{upstream}\n\
         [upstreams.backends.health]\n{health}\n{routes}\n{extra}\n",
        dir = dir.display(),
        grace = if o.server.contains("grace_period") { "" } else { "grace_period = \"0s\"\n" },
        server = o.server,
        client = o.client,
        ws = o.ws_idle,
        websocket = o.websocket,
        servers = servers.join(", "),
        upstream = o.upstream,
        health = o.health,
        routes = o.routes,
        extra = o.extra,
    )
}

impl Proxy {
    /// Starts the proxy in front of `backends` and waits until it serves.
    pub async fn start(backends: &[SocketAddr], options: ProxyOptions) -> Self {
        let proxy = Self::spawn(backends, options);
        proxy.wait_for_up(backends.len()).await;
        proxy
    }

    /// Starts the proxy in front of `backends` without waiting for it.
    pub fn spawn(backends: &[SocketAddr], options: ProxyOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let public = free_port();
        let status = free_port();
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config_text(public, status, dir.path(), backends, &options)).unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .arg("--config")
            .arg(&config_path)
            .env_remove("PROXY_LISTEN")
            .env_remove("PROXY_STATUS_LISTEN")
            .env_remove("PROXY_BACKENDS")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            public: SocketAddr::from(([127, 0, 0, 1], public)),
            status: SocketAddr::from(([127, 0, 0, 1], status)),
            config_path,
            child,
            dir,
        }
    }

    /// Rewrites the configuration file for the same ports.
    pub fn rewrite_config(&self, backends: &[SocketAddr], options: &ProxyOptions) {
        let text = config_text(self.public.port(), self.status.port(), self.dir.path(), backends, options);
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Sends `SIGHUP`.
    pub fn hangup(&self) {
        let ok = Command::new("kill").arg("-HUP").arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok);
    }

    /// Sends `signal` (e.g. `QUIT`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let ok =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok);
    }

    /// Starts a second proxy with the same configuration and `--upgrade`,
    /// which waits to take the listeners over from this one.
    pub fn spawn_upgrade(&self) -> Child {
        let log = std::fs::File::create(self.dir.path().join("proxy-upgraded.log")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_proxy"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade")
            .env_remove("PROXY_LISTEN")
            .env_remove("PROXY_STATUS_LISTEN")
            .env_remove("PROXY_BACKENDS")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Waits up to `limit` for the process to exit; true if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `/upstreams` as JSON.
    pub async fn upstreams(&self) -> serde_json::Value {
        let r = get(self.status, "/upstreams").await.expect("status listener answers");
        serde_json::from_str(&r.body).unwrap()
    }

    /// The value of one metric line of `/metrics` (0 when absent), e.g.
    /// `proxy_config_reloads_total{result="rejected"}`.
    pub async fn metric(&self, name: &str) -> u64 {
        let r = get(self.status, "/metrics").await.expect("status listener answers");
        r.body.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    /// Health of each backend address of the `backends` group.
    pub async fn health(&self) -> HashMap<String, String> {
        let u = self.upstreams().await;
        u["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["addr"].as_str().unwrap().to_string(), b["health"].as_str().unwrap().to_string()))
            .collect()
    }

    /// Waits until `n` backends are up.
    pub async fn wait_for_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = get(self.status, "/upstreams").await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.body) {
                    let up = v["upstreams"][0]["backends"]
                        .as_array()
                        .map(|b| b.iter().filter(|b| b["health"] == "up").count())
                        .unwrap_or(0);
                    // The status listener can come up before the public one:
                    // one request the proxy answers itself (400 for a second
                    // Host, so no backend's count moves), then wait until the
                    // proxy has closed that connection: tests start from none open.
                    let local = IpAddr::from([127, 0, 0, 1]);
                    let probe = request_from(local, self.public, "GET", "/", &[("Host", "x")], b"").await;
                    if up >= n && probe.is_ok_and(|r| r.status == 400) {
                        self.wait_for_no_open_connections().await;
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "proxy not ready:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the public listener has no open connection.
    async fn wait_for_no_open_connections(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = get(self.status, "/nginx-status").await.ok().and_then(|r| parse_stub_status(&r.body));
            if status.is_some_and(|s| s[0] == 0) {
                return;
            }
            assert!(Instant::now() < deadline, "connections stay open: {status:?}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `addr` has health `want`.
    pub async fn wait_for_health(&self, addr: SocketAddr, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.health().await.get(&addr.to_string()).map(String::as_str) == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{addr} never became {want}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `kill -QUIT $(cat pid_file)` as the README's upgrade steps do,
    /// then a request every 20 ms until this (old) process has exited, at
    /// most 20 s: every one must be answered 200. Returns how many were.
    pub async fn quit_and_serve_until_gone(&mut self) -> usize {
        let pid_file = self.dir.path().join("proxy.pid");
        let quit = format!("kill -QUIT $(cat {})", pid_file.display());
        assert!(Command::new("sh").arg("-c").arg(&quit).status().unwrap().success(), "{quit}");
        let started = Instant::now();
        let mut served = 0;
        while self.is_running() {
            let r = get(self.public, "/api/x").await.expect("a request failed during the upgrade");
            assert_eq!(r.status, 200);
            served += 1;
            assert!(started.elapsed() < Duration::from_secs(20), "the old proxy did not exit:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        served
    }

    /// Its temporary directory (config, logs, pid file, upgrade socket).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The log of the process [`Self::spawn_upgrade`] started, so far.
    pub fn upgraded_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy-upgraded.log")).unwrap_or_default()
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("proxy.log")) {
            f.read_to_string(&mut s).ok();
        }
        s
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        if std::thread::panicking() {
            eprintln!("---- proxy log ----\n{}", self.log());
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// Body as text.
    pub body: String,
}

impl HttpResponse {
    /// The backend that answered (from the body the test backends send).
    pub fn backend(&self) -> String {
        self.headers.get("x-backend-id").cloned().unwrap_or_default()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// GET `path` from 127.0.0.1.
pub async fn get(to: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    request_from(IpAddr::from([127, 0, 0, 1]), to, "GET", path, &[], b"").await
}

/// GET `path` from source address `from`.
pub async fn get_from(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    request_from(from, to, "GET", path, headers, b"").await
}

/// One request on a fresh connection from source address `from`.
pub async fn request_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    let answer = raw_exchange(from, to, &raw, Duration::from_secs(10)).await?;
    parse_response(&answer)
        .ok_or_else(|| std::io::Error::other(format!("unparsable answer: {:?}", String::from_utf8_lossy(&answer))))
}

/// Connects from `from`, writes `raw`, reads until close or `limit`.
pub async fn raw_exchange(from: IpAddr, to: SocketAddr, raw: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(to).await?;
    stream.write_all(raw).await?;
    let mut out = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(out)
}

/// Parses a whole HTTP/1.1 response (content-length, chunked or to close).
pub fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let body = if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = rest;
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).ok()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size.min(rest.len())]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        out
    } else if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// The i-th of many distinct client addresses in 127.0.0.0/8 (never 127.0.0.1).
pub fn client_ip(i: u32) -> IpAddr {
    IpAddr::from([127, 1 + (i / 250) as u8, 0, (i % 250 + 1) as u8])
}

/// Parses nginx `stub_status` text strictly: returns
/// (active, accepts, handled, requests, reading, writing, waiting).
pub fn parse_stub_status(text: &str) -> Option<[u64; 7]> {
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() != 5 || !lines[4].is_empty() {
        return None;
    }
    let active = lines[0].strip_prefix("Active connections: ")?.strip_suffix(' ')?.parse().ok()?;
    if lines[1] != "server accepts handled requests" {
        return None;
    }
    let nums: Vec<u64> =
        lines[2].strip_prefix(' ')?.strip_suffix(' ')?.split(' ').map(|n| n.parse().ok()).collect::<Option<_>>()?;
    if nums.len() != 3 {
        return None;
    }
    let rest = lines[3].strip_prefix("Reading: ")?.strip_suffix(' ')?;
    let (reading, rest) = rest.split_once(" Writing: ")?;
    let (writing, waiting) = rest.split_once(" Waiting: ")?;
    Some([active, nums[0], nums[1], nums[2], reading.parse().ok()?, writing.parse().ok()?, waiting.parse().ok()?])
}
