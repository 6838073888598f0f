//! The workspace's one test harness, for the crates' own tests and the
//! system tests (`systests/`): the real `backend`, `ai-node` and `proxy`
//! binaries on free ports, a real Redis (the shared one, or one a test owns
//! and stops), and the HTTP and WebSocket clients a user would hold.
//!
//! Every process logs to a file in its own temporary directory; when a test
//! panics, the tail of each log is printed so the failure explains itself.

mod redis_cluster;

pub use redis_cluster::OwnRedisCluster;

use chat_wire::{Event, EventKind};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for one event of a stream.
pub const EVENT_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for a whole stream, however many events it has.
pub const STREAM_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a process to answer `/health`.
const READY_WAIT: Duration = Duration::from_secs(30);

/// The shared Redis the tests use: `TEST_REDIS_URL`, else the machine's default.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A unique id for this test's sessions and nodes, so tests never share keys.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", chat_wire::new_request_id())
}

/// A free port on 127.0.0.1 (bound and released; the process binds it again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A binary of the workspace, in the target directory of the running test.
/// It is a bin of another crate, so cargo does not build it for the test:
/// the first call for each binary in a test process runs `cargo build -p
/// <package>` (a no-op when it is fresh, and it keeps a stale binary from
/// being tested). If that build fails, an existing binary is used with a
/// warning.
fn workspace_bin(package: &'static str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let test = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<package>
    let dir = test.parent().and_then(Path::parent).expect("a test runs from target/<profile>/deps");
    let bin = dir.join(format!("{package}{}", std::env::consts::EXE_SUFFIX));
    let mut built = BUILT.lock().unwrap();
    if !built.contains(&package) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let ok = Command::new(cargo)
            .args(["build", "--quiet", "-p", package])
            .current_dir(workspace)
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
        if !ok {
            assert!(bin.exists(), "cargo build -p {package} failed and there is no {}", bin.display());
            eprintln!("warning: cargo build -p {package} failed; using the existing {}", bin.display());
        }
        built.push(package);
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// The `ai-node` binary (see [`workspace_bin`]).
pub fn ai_node_bin() -> PathBuf {
    workspace_bin("ai-node")
}

/// The `backend` binary (see [`workspace_bin`]).
pub fn backend_bin() -> PathBuf {
    workspace_bin("backend")
}

/// The edge `proxy` binary (see [`workspace_bin`]).
pub fn proxy_bin() -> PathBuf {
    workspace_bin("proxy")
}

/// A child process that is killed when dropped, with its output in a log file.
struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Holds the config and log files for as long as the process lives.
    _dir: tempfile::TempDir,
}

impl Process {
    fn spawn(name: &str, mut command: Command, dir: tempfile::TempDir) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        command.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process { name: name.to_owned(), child: Some(child), log, _dir: dir }
    }

    /// SIGKILL: the process gets no chance to say goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("process is running").id()
    }

    fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_some(),
            None => true,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Polls `url` until it answers 200; panics with the log if the process dies
    /// or stays silent.
    async fn wait_ready(&mut self, url: &str) {
        let deadline = Instant::now() + READY_WAIT;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
        loop {
            if let Ok(res) = client.get(url).send().await {
                if res.status() == 200 {
                    return;
                }
            }
            if self.has_exited() {
                panic!("{} exited before it was ready:\n{}", self.name, self.log_tail());
            }
            if Instant::now() > deadline {
                panic!("{} did not answer 200 on {url}:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- last lines of {} -----\n{}", self.name, self.log_tail());
        }
    }
}

/// How a synthetic AI node paces its answers.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first_token_ms: u64,
    pub tokens_per_second: f64,
    pub answer_tokens: u64,
}

impl Pace {
    /// About 0.4 s per answer: quick, yet long enough to be interrupted.
    pub const QUICK: Pace = Pace { first_token_ms: 5, tokens_per_second: 50.0, answer_tokens: 20 };
    /// 100 ms a piece: plenty of time to act between two chunks.
    pub const SLOW: Pace = Pace { first_token_ms: 5, tokens_per_second: 10.0, answer_tokens: 30 };

    /// Events of a complete answer: one chunk per piece, then `done`.
    pub fn events(&self) -> u64 {
        self.answer_tokens + 1
    }
}

/// The lease of the test nodes: a node silent (dead or paused) for longer
/// than this is taken over.
pub const NODE_LEASE_MS: u64 = 1_500;

/// A real `ai-node` process with a synthetic engine.
pub struct AiNode {
    /// The URL the backend is given, `http://127.0.0.1:PORT`.
    pub url: String,
    pub node_id: String,
    process: Process,
}

impl AiNode {
    pub async fn start(redis_url: &str, pace: Pace) -> AiNode {
        Self::start_with(redis_url, pace, false, None, "").await
    }

    /// A node with more settings: `extra` is TOML lines added to its
    /// `[server]` section, or `[stream]` lines after a `[stream]` marker line.
    pub async fn start_configured(redis_url: &str, pace: Pace, extra: &str) -> AiNode {
        Self::start_with(redis_url, pace, false, None, extra).await
    }

    /// A node whose streams keep `max_len` events (answers longer than the
    /// default 10,000).
    pub async fn start_keeping(redis_url: &str, pace: Pace, max_len: usize) -> AiNode {
        Self::start_with(redis_url, pace, false, Some(max_len), "").await
    }

    /// A node whose every piece ends with its id, so that two producers of
    /// one answer show in its text.
    pub async fn start_tagged(redis_url: &str, pace: Pace) -> AiNode {
        Self::start_with(redis_url, pace, true, None, "").await
    }

    async fn start_with(redis_url: &str, pace: Pace, tagged: bool, max_len: Option<usize>, extra: &str) -> AiNode {
        let (server_extra, stream_extra) = extra.split_once("[stream]\n").unwrap_or((extra, ""));
        let max_len = max_len.map(|n| format!("max_len = {n}\n")).unwrap_or_default() + stream_extra;
        let node_id = unique("ai");
        let tag = if tagged { format!("tag = \"[{node_id}]\"\n") } else { String::new() };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ai-node.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nshutdown_grace_ms = 500\n{server_extra}\n[stream]\nlease_ms = {NODE_LEASE_MS}\n{max_len}\n[engine]\nkind = \"synthetic\"\n\n[engine.synthetic]\n\
                 first_token_ms = {}\ntokens_per_second = {:.1}\nanswer_tokens = {}\n{tag}",
                pace.first_token_ms, pace.tokens_per_second, pace.answer_tokens
            ),
        )
        .unwrap();
        let port = free_port();
        let mut command = Command::new(ai_node_bin());
        command
            .arg("--config")
            .arg(&config)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("REDIS_URL", redis_url)
            .env("NODE_ID", &node_id);
        let mut process = Process::spawn("ai-node", command, dir);
        let url = format!("http://127.0.0.1:{port}");
        process.wait_ready(&format!("{url}/health")).await;
        AiNode { url, node_id, process }
    }

    /// SIGKILL, as a crashed machine would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: the node freezes (a long GC pause, a stalled VM) and comes
    /// back with `unpause`, unaware that time passed.
    pub fn pause(&self) {
        signal(self.process.pid(), "-STOP");
    }

    pub fn unpause(&self) {
        signal(self.process.pid(), "-CONT");
    }
}

fn signal(pid: u32, which: &str) {
    let sent = Command::new("kill").args([which, &pid.to_string()]).status().map(|s| s.success());
    assert!(matches!(sent, Ok(true)), "kill {which} {pid} failed");
}

/// Settings for a backend process, written to its config file.
pub struct BackendBuilder {
    redis_url: String,
    ai_urls: Vec<String>,
    /// section -> key -> TOML literal.
    settings: BTreeMap<String, BTreeMap<String, String>>,
}

impl BackendBuilder {
    /// Sets `[section] key = value`; `value` is written as a TOML literal, so
    /// strings must carry their own quotes.
    pub fn set(mut self, section: &str, key: &str, value: impl std::fmt::Display) -> Self {
        self.settings.entry(section.to_owned()).or_default().insert(key.to_owned(), value.to_string());
        self
    }

    pub async fn start(self) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("backend.toml");
        let mut text = String::new();
        for (section, keys) in &self.settings {
            text.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                text.push_str(&format!("{key} = {value}\n"));
            }
            text.push('\n');
        }
        std::fs::write(&config, text).unwrap();

        let port = free_port();
        let metrics_port = free_port();
        let backend_id = unique("backend");
        let mut command = Command::new(backend_bin());
        command
            .arg("--config")
            .arg(&config)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_LISTEN_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("REDIS_URL", &self.redis_url)
            .env("AI_SERVICE_URLS", self.ai_urls.join(","))
            .env("BACKEND_ID", &backend_id);
        let mut process = Process::spawn("backend", command, dir);
        let base = format!("http://127.0.0.1:{port}");
        process.wait_ready(&format!("{base}/health")).await;
        Backend { base, port, metrics_port, backend_id, process }
    }
}

/// A real `backend` process.
pub struct Backend {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub port: u16,
    pub metrics_port: u16,
    pub backend_id: String,
    process: Process,
}

impl Backend {
    /// A backend in front of `nodes`, with health checks frequent enough for tests.
    pub fn builder(redis_url: &str, nodes: &[&AiNode]) -> BackendBuilder {
        Self::builder_for_urls(redis_url, nodes.iter().map(|n| n.url.clone()).collect())
    }

    pub fn builder_for_urls(redis_url: &str, ai_urls: Vec<String>) -> BackendBuilder {
        BackendBuilder { redis_url: redis_url.to_owned(), ai_urls, settings: BTreeMap::new() }
            .set("server", "shutdown_grace_ms", 500)
            .set("ai", "health_interval_ms", 500)
            .set("ai", "health_timeout_ms", 500)
    }

    pub async fn start(redis_url: &str, nodes: &[&AiNode]) -> Backend {
        Self::builder(redis_url, nodes).start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, session_id: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/chat?session_id={session_id}", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub async fn ai_health(&self) -> Value {
        let res = http().get(self.url("/api/ai-health")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// Waits until the backend counts `n` healthy nodes (nodes start unhealthy
    /// until their first check passes).
    pub async fn wait_healthy_nodes(&self, n: u64) {
        let healthy = eventually(Duration::from_secs(15), || async {
            let res = http().get(self.url("/api/ai-health")).send().await;
            match res {
                Ok(res) => res.json::<Value>().await.map(|v| v["healthy_nodes"] == n).unwrap_or(false),
                Err(_) => false,
            }
        })
        .await;
        assert!(healthy, "backend never saw {n} healthy nodes: {}", self.ai_health().await);
    }

    /// `POST /api/chat` with a JSON body.
    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        http().post(self.url("/api/chat")).json(body).send().await.unwrap()
    }

    /// A chat that must be accepted; returns the 202 body.
    pub async fn chat(&self, session_id: &str, message: &str) -> Accepted {
        let res = self.post_chat(&json!({"session_id": session_id, "message": message})).await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 202, "chat not accepted: {body}");
        assert_eq!(body["status"], "accepted", "{body}");
        assert_eq!(body["session_id"], session_id, "{body}");
        Accepted {
            request_id: body["request_id"].as_str().expect("request_id").to_owned(),
            node: body["node"].as_str().expect("node").to_owned(),
        }
    }
}

/// What a backend answers when it takes a chat.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub request_id: String,
    /// The AI node's URL, as configured.
    pub node: String,
}

/// Asserts an error answer: the status, the backend's id header, and the one
/// JSON error shape. Returns the error code.
pub async fn assert_error(res: reqwest::Response, status: u16) -> String {
    let got = res.status();
    let backend_id = res.headers().get("x-backend-id").map(|v| v.to_str().unwrap().to_owned());
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "expected {status}, got {got}: {text}");
    assert!(backend_id.is_some(), "an error answer carries X-Backend-Id");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code: {body}"));
    assert!(!code.is_empty(), "{body}");
    assert!(body["error"]["message"].is_string(), "no error.message: {body}");
    code.to_owned()
}

/// Asserts `events` are one request's stream from `first_seq` on: consecutive
/// seq, chunks only before the end, and a `done` at the end. Returns the text.
pub fn assert_complete(events: &[Event], first_seq: u64) -> String {
    assert!(!events.is_empty(), "no events");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (first_seq..first_seq + events.len() as u64).collect();
    assert_eq!(seqs, expected, "seq must count on without gaps or repeats");
    let (last, chunks) = events.split_last().unwrap();
    assert!(chunks.iter().all(|e| e.kind == EventKind::Chunk), "only the last event ends the stream: {events:?}");
    assert_eq!(last.kind, EventKind::Done, "the stream ends with done: {last:?}");
    assert!(last.finish_reason.is_some(), "done carries a finish_reason: {last:?}");
    chunks.iter().filter_map(|e| e.delta.clone()).collect()
}

/// A WebSocket client on `/ws/chat`.
pub struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read ahead while waiting for a particular one (an `accepted`
    /// may trail the first chunks of its request).
    pending: VecDeque<Value>,
}

impl Ws {
    pub async fn connect(backend: &Backend, session_id: &str) -> Ws {
        let connecting = tokio_tungstenite::connect_async(backend.ws_url(session_id));
        let (socket, response) = tokio::time::timeout(EVENT_WAIT, connecting)
            .await
            .expect("WebSocket upgrade timed out")
            .expect("WebSocket upgrade failed");
        assert_eq!(response.status(), 101);
        Ws { socket, pending: VecDeque::new() }
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.send(Message::text(frame.to_string())).await;
    }

    pub async fn send(&mut self, message: Message) {
        tokio::time::timeout(EVENT_WAIT, self.socket.send(message)).await.expect("send timed out").unwrap();
    }

    /// The next JSON text frame; panics on a close, an error or a timeout.
    pub async fn next_json(&mut self, within: Duration) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("no frame in time")
                .expect("socket ended")
                .expect("socket failed");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}"))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Sends a `chat` frame and returns the `accepted` answer.
    pub async fn chat(&mut self, message: &str) -> Accepted {
        self.send_json(json!({"type": "chat", "message": message})).await;
        let mut early = Vec::new();
        let accepted = loop {
            let frame = self.next_json(EVENT_WAIT).await;
            match frame["type"].as_str() {
                Some("accepted") => break frame,
                Some("chunk" | "done" | "error") if frame["request_id"].is_string() => early.push(frame),
                _ => panic!("expected accepted, got {frame}"),
            }
        };
        self.pending.extend(early);
        Accepted {
            request_id: accepted["request_id"].as_str().unwrap_or_else(|| panic!("{accepted}")).to_owned(),
            node: accepted["node"].as_str().unwrap_or_else(|| panic!("{accepted}")).to_owned(),
        }
    }

    pub async fn resume(&mut self, request_id: &str, after_seq: u64) {
        self.send_json(json!({"type": "resume", "request_id": request_id, "after_seq": after_seq})).await;
    }

    /// The next event of `request_id`, skipping frames about other requests.
    pub async fn next_event(&mut self, request_id: &str, within: Duration) -> Event {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next_json(left).await;
            let is_event = matches!(frame["type"].as_str(), Some("chunk" | "done" | "error"));
            if is_event && frame["request_id"] == request_id {
                return Event::from_json(&frame.to_string()).unwrap_or_else(|e| panic!("bad event ({e}): {frame}"));
            }
        }
    }

    /// Every event of `request_id` up to and including the one that ends it.
    pub async fn until_end(&mut self, request_id: &str) -> Vec<Event> {
        let deadline = Instant::now() + STREAM_WAIT;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).min(EVENT_WAIT);
            let event = self.next_event(request_id, left).await;
            let end = event.is_terminal();
            events.push(event);
            if end {
                return events;
            }
        }
    }

    /// Asserts that no frame but pings and pongs arrives within `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Some(frame) = self.pending.pop_front() {
            panic!("unexpected frame {frame}");
        }
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(message) = tokio::time::timeout_at(deadline, self.socket.next()).await {
            match message {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns it.
    pub async fn close_frame(&mut self, within: Duration) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next()).await.expect("no close in time");
            match message {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket failed without a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Drops the connection the way a lost network would: no close handshake.
    pub fn drop_abruptly(self) {
        drop(self.socket);
    }
}

/// The value of the line of a backend's `/metrics` that starts with `name`
/// (a metric name with its labels and a space), 0 when absent.
pub async fn metric(backend: &Backend, name: &str) -> u64 {
    let text = http().get(backend.metrics_url()).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Starts `redis-server` as `command_for(port)` builds it, on a free port,
/// and waits until it answers. A server that exits first (its port was taken
/// between [`free_port`] and its bind: any process's outgoing connection can
/// be given that port) is started again on another, up to 5 times.
pub fn spawn_redis(mut command_for: impl FnMut(u16) -> Command) -> (u16, Child) {
    let mut failures = Vec::new();
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn_quiet(command_for(port));
        match wait_redis(port, &mut child) {
            Ok(()) => return (port, child),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("port {port}: {why}"));
            }
        }
    }
    panic!("redis-server did not start: {failures:?}");
}

fn spawn_quiet(mut command: Command) -> Child {
    command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("redis-server must be installed")
}

/// Waits until the `redis-server` on `port` answers PING (10 s at most);
/// `Err` says why not.
fn wait_redis(port: u16, child: &mut Child) -> Result<(), String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) {
            if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited before answering ({status})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("did not answer within 10 s".into())
}

/// A `redis-server` of the test's own, for tests that disturb Redis (stop
/// and restart it, change its users, kill its clients).
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
    /// Where it keeps an append-only file, when it persists.
    aof: Option<tempfile::TempDir>,
}

impl OwnRedis {
    /// A Redis that keeps nothing: a restart empties it.
    pub fn start() -> OwnRedis {
        Self::start_on_a_free_port(None)
    }

    /// A Redis that keeps its data across a restart (an append-only file
    /// synced on every write), as a production Redis does: for tests whose
    /// subject is an outage, not a Redis that forgets every request.
    pub fn start_persistent() -> OwnRedis {
        Self::start_on_a_free_port(Some(tempfile::tempdir().unwrap()))
    }

    fn start_on_a_free_port(aof: Option<tempfile::TempDir>) -> OwnRedis {
        let mut redis = OwnRedis { port: 0, child: None, aof };
        let (port, child) = spawn_redis(|port| redis.server_command(port));
        redis.port = port;
        redis.child = Some(child);
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The `redis-server` command line for `port`.
    fn server_command(&self, port: u16) -> Command {
        let mut command = Command::new("redis-server");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match &self.aof {
            None => command.args(["--appendonly", "no"]),
            Some(dir) => command.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"]).arg(dir.path()),
        };
        command
    }

    /// Starts again on the same port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = spawn_quiet(self.server_command(self.port));
        if let Err(why) = wait_redis(self.port, &mut child) {
            panic!("redis-server on port {} {why}", self.port);
        }
        self.child = Some(child);
    }

    /// Stops it (SIGKILL): every connection to it breaks.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one command as the default user (`ACL SETUSER ...`, say).
    pub fn command(&self, args: &[&str]) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let () = cmd.query(&mut conn).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    /// `CLIENT KILL TYPE pubsub`; returns how many connections were killed.
    pub fn kill_pubsub_clients(&self) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut conn).unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Ws {
    /// Connects to any `/ws/chat` URL (through the proxy, say); returns the
    /// socket and the `X-Backend-Id` of the upgrade answer.
    pub async fn connect_url(url: &str) -> (Ws, Option<String>) {
        let connecting = tokio_tungstenite::connect_async(url);
        let (socket, response) = tokio::time::timeout(EVENT_WAIT, connecting)
            .await
            .expect("WebSocket upgrade timed out")
            .unwrap_or_else(|e| panic!("WebSocket upgrade to {url} failed: {e}"));
        assert_eq!(response.status(), 101);
        let backend_id = response.headers().get("x-backend-id").map(|v| v.to_str().unwrap().to_owned());
        (Ws { socket, pending: VecDeque::new() }, backend_id)
    }

    /// Events of `request_id` until the stream ends or the socket closes or
    /// fails (as when its backend dies). The bool tells whether the socket was
    /// cut; `None` if neither happened within `within`.
    pub async fn events_until_cut(&mut self, request_id: &str, within: Duration) -> Option<(Vec<Event>, bool)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut events = Vec::new();
        let mut frames: VecDeque<Value> = self.pending.drain(..).collect();
        loop {
            let frame = match frames.pop_front() {
                Some(frame) => frame,
                None => match tokio::time::timeout_at(deadline, self.socket.next()).await {
                    Err(_) => return None,
                    Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Some((events, true)),
                    Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}")),
                    Ok(Some(Ok(_))) => continue,
                },
            };
            let is_event = matches!(frame["type"].as_str(), Some("chunk" | "done" | "error"));
            if is_event && frame["request_id"] == request_id {
                let event = Event::from_json(&frame.to_string()).unwrap_or_else(|e| panic!("bad event ({e}): {frame}"));
                let end = event.is_terminal();
                events.push(event);
                if end {
                    return Some((events, false));
                }
            }
        }
    }
}

impl Ws {
    /// The next JSON text frame, or how the socket ended (closed, failed or
    /// silent for `within`) instead of a panic.
    pub async fn next_frame_or_cut(&mut self, within: Duration) -> Result<Value, String> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return Err(format!("no frame within {within:?}")),
                Ok(None) => return Err("socket ended without a close frame".into()),
                Ok(Some(Err(e))) => return Err(format!("socket failed: {e}")),
                Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("closed: {frame:?}")),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return serde_json::from_str(text.as_str()).map_err(|e| format!("non-JSON text ({e}): {text}"))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// The real `proxy` binary on free ports in front of real backends, for tests
/// outside `through_proxy.rs` (which keeps its own copy). `extra` is TOML
/// appended to the generated file, for sections it does not write (`[client]`,
/// `[websocket]`, `[sticky]`).
pub struct EdgeProxy {
    /// Public listener, where every client request goes.
    pub public: u16,
    /// Status listener (`/nginx-status`, `/metrics`, `/upstreams`).
    pub status: u16,
    child: Option<Child>,
    log: PathBuf,
    /// Holds the config, log, pid file and upgrade socket while the proxy lives.
    _dir: tempfile::TempDir,
}

impl EdgeProxy {
    pub async fn start(backends: &[&Backend]) -> EdgeProxy {
        Self::start_with(backends, "").await
    }

    /// Starts the proxy with `extra` TOML and waits until its status listener
    /// shows every backend up.
    pub async fn start_with(backends: &[&Backend], extra: &str) -> EdgeProxy {
        Self::start_configured(backends, "threads = 2\n", extra).await
    }

    /// Starts the proxy with `server` as its `[server]` lines (e.g. worker
    /// processes) and `extra` TOML, and waits until its status listener
    /// shows every backend up.
    pub async fn start_configured(backends: &[&Backend], server: &str, extra: &str) -> EdgeProxy {
        let dir = tempfile::tempdir().unwrap();
        let public = free_port();
        let status = free_port();
        let servers: Vec<String> = backends.iter().map(|b| format!("\"127.0.0.1:{}\"", b.port)).collect();
        let config = dir.path().join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\n{server}grace_period = \"0s\"\nshutdown_timeout = \"1s\"\n\
                 pid_file = \"{dir}/proxy.pid\"\nupgrade_sock = \"{dir}/upgrade.sock\"\n\n\
                 [listen]\npublic = \"127.0.0.1:{public}\"\nstatus = \"127.0.0.1:{status}\"\n\n\
                 [upstreams.backends]\nservers = [{servers}]\nconnect_timeout = \"1s\"\n\n\
                 [upstreams.backends.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\n\
                 rise = 1\nfall = 1\n\n{extra}\n",
                dir = dir.path().display(),
                servers = servers.join(", "),
            ),
        )
        .unwrap();
        let log = dir.path().join("proxy.log");
        let out = File::create(&log).unwrap();
        let mut command = Command::new(proxy_bin());
        command
            .arg("--config")
            .arg(&config)
            .env_remove("PROXY_LISTEN")
            .env_remove("PROXY_STATUS_LISTEN")
            .env_remove("PROXY_BACKENDS")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command.spawn().expect("cannot start proxy");
        let mut proxy = EdgeProxy { public, status, child: Some(child), log, _dir: dir };
        proxy.wait_up(backends.len()).await;
        proxy
    }

    /// Polls `/upstreams` until `n` backends are up.
    async fn wait_up(&mut self, n: usize) {
        let deadline = Instant::now() + READY_WAIT;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
        loop {
            if let Ok(res) = client.get(self.status_url("/upstreams")).send().await {
                if let Ok(v) = res.json::<Value>().await {
                    let up = v["upstreams"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|g| g["backends"].as_array().cloned().unwrap_or_default())
                        .filter(|b| b["health"] == "up")
                        .count();
                    if up >= n && self.public_answers().await {
                        return;
                    }
                }
            }
            let exited = self.child.as_mut().is_none_or(|c| c.try_wait().unwrap().is_some());
            assert!(!exited, "proxy exited before it was ready:\n{}", self.log_tail());
            assert!(Instant::now() < deadline, "proxy never saw {n} backends up:\n{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the public listener (which can come up after the status one)
    /// answers: a request without Host, which the proxy answers 400 itself.
    async fn public_answers(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(self.addr()).await else { return false };
        let mut answer = [0u8; 12];
        let exchange = async {
            stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
            stream.read_exact(&mut answer).await
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), exchange).await, Ok(Ok(_))) && &answer[9..] == b"400"
    }

    /// The public listener's address, for raw TCP clients.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.public))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public)
    }

    pub fn status_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.status)
    }

    pub fn ws_url(&self, session_id: &str) -> String {
        format!("ws://127.0.0.1:{}/ws/chat?session_id={session_id}", self.public)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy is running").id()
    }

    /// Its worker processes (`server.processes` above 1), from `/proc`.
    pub fn workers(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_owned()
    }
}

impl Drop for EdgeProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- last lines of proxy -----\n{}", self.log_tail());
        }
    }
}

/// Process ids whose parent is `pid`, in order, from `/proc`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // "pid (comm) state ppid ..."
        let ppid = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort();
    out
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("pid {pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

impl Backend {
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        !self.process.has_exited()
    }
}

/// Every stored event of a request, in stream order, read straight from
/// Redis (no reader follows it, so nothing touches the request).
/// A cluster URL (`redis+cluster://...`) reads from the slot's master.
pub async fn stored_events(redis_url: &str, request_id: &str) -> Vec<Event> {
    let mut xrange = redis::cmd("XRANGE");
    xrange.arg(chat_wire::keys::request_stream(request_id)).arg("-").arg("+");
    type Entries = Vec<(String, Vec<(String, String)>)>;
    let entries: Entries = match chat_wire::redis_conn::cluster_nodes(redis_url) {
        Some(nodes) => {
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            let mut conn = client.get_async_connection().await.unwrap();
            xrange.query_async(&mut conn).await.unwrap()
        }
        None => {
            let client = redis::Client::open(redis_url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            xrange.query_async(&mut conn).await.unwrap()
        }
    };
    entries
        .into_iter()
        .map(|(_, fields)| {
            let json = fields.into_iter().find(|(k, _)| k == "event").map(|(_, v)| v).unwrap();
            Event::from_json(&json).unwrap()
        })
        .collect()
}

#[cfg(test)]
mod redis_start_tests {
    use super::*;

    #[test]
    fn a_redis_server_whose_port_is_taken_is_started_again_on_another() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut calls = 0;
        let (port, mut child) = spawn_redis(|port| {
            calls += 1;
            // The first start meets a port another process already holds.
            let port = if calls == 1 { taken_port } else { port };
            let mut command = Command::new("redis-server");
            command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            command
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(calls, 2, "started again once");
        assert_ne!(port, taken_port);
    }
}
