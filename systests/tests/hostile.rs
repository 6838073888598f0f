//! Hostile input against a real cluster (2 AI nodes, 2 backends, the edge
//! proxy with 2 worker processes as the benchmarks run it, one Redis):
//! malformed HTTP sent as raw bytes, request smuggling,
//! header and body floods, slow clients, bad ids, path traversal, and bad
//! WebSocket frames written by hand. Every case is a row of a table with the
//! answer it must get; each runs on its own connection, every read is bounded,
//! and the battery runs three times while the proxy's and backends' memory is
//! watched. Afterwards a normal chat must still stream to `done`.
//!
//! The rule where the contract names no status: a 4xx answer or a closed
//! connection, never a 5xx, never a hang, never a second answer to one
//! request (a second answer means smuggled bytes were taken for a request).

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound on the whole test.
const TEST_WAIT: Duration = Duration::from_secs(540);
/// The proxy's whole-header deadline in this test (cuts slowloris clients).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The proxy's longest pause in a request body in this test (then 408).
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the first answer (or the close) of one case.
const CASE_WAIT: Duration = Duration::from_secs(8);
/// After an answer, how long a second one is waited for.
const LINGER: Duration = Duration::from_millis(250);
/// The same for smuggling cases, where a second answer is the failure looked for.
const SMUGGLE_LINGER: Duration = Duration::from_millis(1500);
/// The backends' body limit (413 past it), below the proxy's.
const BACKEND_BODY_LIMIT: usize = 262_144;
/// The proxy's body limit (413 past it, before any backend sees the body).
const PROXY_BODY_LIMIT: usize = 1_048_576;
/// The backends' WebSocket frame limit (close 1009 past it).
const FRAME_LIMIT: usize = 65_536;
/// Times the battery runs while memory is watched.
const ROUNDS: usize = 3;
/// Allowed RSS growth of one process over the rounds.
const RSS_GROWTH_LIMIT_KIB: u64 = 30 * 1024;
/// A resume for a request nobody made: answered `unknown_request`, so it
/// proves a socket still reads and answers frames.
const PROBE_ID: &str = "r-hostile-probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_clean_answer_and_leaves_the_cluster_serving() {
    // Builds (or checks) the binaries before the clock starts.
    ai_node_bin();
    proxy_bin();
    tokio::time::timeout(TEST_WAIT, hostile_battery()).await.expect("the test ran out of time");
}

async fn hostile_battery() {
    let redis = redis_url();
    let nodes = [AiNode::start(&redis, Pace::QUICK).await, AiNode::start(&redis, Pace::QUICK).await];
    let node_refs = [&nodes[0], &nodes[1]];
    let mut backends = Vec::new();
    for _ in 0..2 {
        let backend = Backend::builder(&redis, &node_refs)
            .set("limits", "max_body_bytes", BACKEND_BODY_LIMIT)
            .set("limits", "max_frame_bytes", FRAME_LIMIT)
            // Three rounds of the battery from one IP must not run into the
            // chat rate limits: this test is about input, not rates.
            .set("limits", "session_rate_per_sec", "1000.0")
            .set("limits", "session_burst", 1000)
            .set("limits", "ip_rate_per_sec", "1000.0")
            .set("limits", "ip_burst", 1000)
            .start()
            .await;
        backend.wait_healthy_nodes(2).await;
        backends.push(backend);
    }
    let extra = format!(
        "[client]\nheader_timeout = \"{}ms\"\nbody_timeout = \"{}ms\"\nmax_body_bytes = {PROXY_BODY_LIMIT}\n",
        HEADER_TIMEOUT.as_millis(),
        BODY_TIMEOUT.as_millis()
    );
    // The proxy as the benchmarks run it: 2 worker processes of one thread.
    let mut proxy =
        EdgeProxy::start_configured(&[&backends[0], &backends[1]], "processes = 2\nthreads = 1\n", &extra).await;
    let workers = proxy.workers();
    assert_eq!(workers.len(), 2, "worker processes: {workers:?}");

    // Whatever the proxy is asked to reach besides its backends, it must
    // not connect here.
    let trap = Trap::start().await;

    let http_cases = proxy_http_cases(trap.port);
    let direct_cases = backend_http_cases();
    let ws_cases = ws_cases();
    let total = http_cases.len() + direct_cases.len() + ws_cases.len();
    println!(
        "hostile battery: {} cases ({} HTTP through the proxy, {} HTTP straight at a backend, {} WebSocket)",
        total,
        http_cases.len(),
        direct_cases.len(),
        ws_cases.len()
    );
    assert!(total >= 40, "the battery has at least 40 cases, has {total}");

    // A first normal chat, so memory is measured on a warmed-up cluster.
    still_serves(&proxy).await;
    let pids: Vec<(String, u32)> = std::iter::once(("proxy supervisor".to_string(), proxy.pid()))
        .chain(workers.iter().enumerate().map(|(i, pid)| (format!("proxy worker {i}"), *pid)))
        .chain(backends.iter().map(|b| (format!("backend {}", b.backend_id), b.pid())))
        .collect();
    let before: Vec<u64> = pids.iter().map(|(_, pid)| rss_kib(*pid)).collect();

    let mut failures = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        let verbose = round == 1;
        for case in &http_cases {
            let out = exchange(proxy.addr(), case).await;
            record(&mut failures, round, "proxy", &case.name, judge(case, &out), verbose);
        }
        let direct = SocketAddr::from(([127, 0, 0, 1], backends[0].port));
        for case in &direct_cases {
            let out = exchange(direct, case).await;
            record(&mut failures, round, "backend", &case.name, judge(case, &out), verbose);
        }
        for case in &ws_cases {
            let verdict = run_ws_case(proxy.addr(), case).await;
            record(&mut failures, round, "ws", &case.name, verdict, verbose);
        }
        let rss: Vec<String> = pids.iter().map(|(name, pid)| format!("{name} {} KiB", rss_kib(*pid))).collect();
        println!("round {round}: {:.1?}, RSS: {}", started.elapsed(), rss.join(", "));
        assert!(proxy.is_running(), "the proxy died in round {round}:\n{}", proxy.log_tail());
        // A worker that died would be replaced unseen: the same ones must serve.
        assert_eq!(proxy.workers(), workers, "a proxy worker died in round {round}:\n{}", proxy.log_tail());
        for backend in &mut backends {
            assert!(backend.is_running(), "backend {} died in round {round}", backend.backend_id);
        }
    }

    let after: Vec<u64> = pids.iter().map(|(_, pid)| rss_kib(*pid)).collect();
    let mut memory = String::new();
    for (((name, _), b), a) in pids.iter().zip(&before).zip(&after) {
        let _ = writeln!(memory, "  {name}: {b} KiB -> {a} KiB ({:+} KiB)", *a as i64 - *b as i64);
    }
    println!("RSS before and after {ROUNDS} rounds of {total} cases:\n{memory}");

    // The cluster still serves, through the proxy, end to end.
    still_serves(&proxy).await;
    assert_eq!(trap.connections(), 0, "the proxy connected to a host named by a client (open proxy)");
    // No case is a backend failure: hostile clients must not be able to take
    // a backend out of service for everyone pinned to it.
    let ejections = passive_ejections(&proxy).await;
    assert_eq!(ejections, 0, "hostile input made the proxy take a backend out {ejections} times");

    for ((name, _), (b, a)) in pids.iter().zip(before.iter().zip(&after)) {
        assert!(
            a.saturating_sub(*b) < RSS_GROWTH_LIMIT_KIB,
            "{name} grew by more than {RSS_GROWTH_LIMIT_KIB} KiB over {ROUNDS} rounds:\n{memory}"
        );
    }
    assert!(failures.is_empty(), "{} of {} case runs failed:\n{}", failures.len(), total * ROUNDS, failures.join("\n"));
}

/// The proxy's count of backends taken out by failures of live traffic.
async fn passive_ejections(proxy: &EdgeProxy) -> u64 {
    let text = http().get(proxy.status_url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("proxy_upstream_passive_ejections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Prints one verdict and keeps the failures.
fn record(
    failures: &mut Vec<String>,
    round: usize,
    target: &str,
    name: &str,
    verdict: Result<String, String>,
    verbose: bool,
) {
    match verdict {
        Ok(got) => {
            if verbose {
                println!("  ok   {target:<7} {name}: {got}");
            }
        }
        Err(why) => {
            println!("  FAIL {target:<7} {name} (round {round}): {why}");
            failures.push(format!("round {round} {target} {name}: {why}"));
        }
    }
}

/// A normal chat through the proxy: a WebSocket answer streamed to `done`,
/// and a REST chat accepted.
async fn still_serves(proxy: &EdgeProxy) {
    let session = unique("after");
    let (mut ws, backend_id) = Ws::connect_url(&proxy.ws_url(&session)).await;
    assert!(backend_id.is_some(), "the upgrade answer carries X-Backend-Id");
    let accepted = ws.chat("are you still there?").await;
    let events = ws.until_end(&accepted.request_id).await;
    assert_complete(&events, 1);
    let res = http()
        .post(proxy.url("/api/chat"))
        .json(&json!({"session_id": session, "message": "and over REST?"}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(status, 202, "a normal chat is accepted: {body}");
}

/// A listener that counts connections: the host an absolute-form URI or a
/// CONNECT names, which the proxy must never reach.
struct Trap {
    port: u16,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Trap { port, count, task }
    }

    fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- HTTP ----

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exactly this status, with the contract's JSON error body.
    Json(u16),
    /// One of these statuses.
    AnyOf(&'static [u16]),
    /// A 4xx answer, or the connection closed without one.
    Refused,
}

/// One hostile request, sent as raw bytes on a fresh connection.
struct HttpCase {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
    /// Delay between two bytes: a slowloris client.
    pace: Option<Duration>,
    /// After the first answer, how long a second one is waited for.
    linger: Duration,
    /// The answer or the close must come within this.
    within: Option<Duration>,
}

impl HttpCase {
    fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>, expect: Expect) -> HttpCase {
        HttpCase { name: name.into(), bytes: bytes.into(), expect, pace: None, linger: LINGER, within: None }
    }

    /// Waits long enough to see a smuggled second answer.
    fn smuggling(mut self) -> HttpCase {
        self.linger = SMUGGLE_LINGER;
        self
    }

    fn paced(mut self, gap: Duration) -> HttpCase {
        self.pace = Some(gap);
        self
    }

    fn within(mut self, limit: Duration) -> HttpCase {
        self.within = Some(limit);
        self
    }
}

/// A POST of `body` with an exact Content-Length.
fn post(path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn post_json(body: &Value) -> Vec<u8> {
    post("/api/chat", "application/json", body.to_string().as_bytes())
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: hostile.test\r\n\r\n").into_bytes()
}

/// A WebSocket upgrade request for `target`.
fn upgrade(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: hostile.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A request whose framing the proxy and a backend could read differently;
/// `body` carries a whole second request that must never be answered.
fn smuggle(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /api/chat HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: application/json\r\n{headers}\r\n{body}")
        .into_bytes()
}

/// The request smuggled in the cases below.
const SMUGGLED: &str = "GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\n\r\n";

fn proxy_http_cases(trap_port: u16) -> Vec<HttpCase> {
    let bad = Expect::Json(400);
    let not_found = Expect::Json(404);
    let mut cases = framing_cases();
    cases.extend([
        // Malformed request lines.
        HttpCase::new(
            "a TLS ClientHello on the plain port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x00\x01\x02\x03\x04\x05\x06\x07\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        HttpCase::new("request line without a version", "GET /api/ai-health\r\nHost: hostile.test\r\n\r\n", Expect::Refused),
        HttpCase::new("HTTP/0.9 request", "GET /\r\n", Expect::Refused),
        HttpCase::new("HTTP/1.7 version", "GET /api/ai-health HTTP/1.7\r\nHost: hostile.test\r\n\r\n", Expect::Refused),
        HttpCase::new("a response sent as a request", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Expect::Refused),
        HttpCase::new("space inside the target", "GET /api/ai health HTTP/1.1\r\nHost: hostile.test\r\n\r\n", Expect::Refused),
        HttpCase::new("NUL inside the target", b"GET /api/\x00ai-health HTTP/1.1\r\nHost: hostile.test\r\n\r\n".to_vec(), Expect::Refused),
        HttpCase::new(
            "method of 10,000 letters",
            format!("{} / HTTP/1.1\r\nHost: hostile.test\r\n\r\n", "A".repeat(10_000)),
            Expect::Refused,
        ),
        // Request smuggling: every variant gets one answer at most, never the smuggled one.
        HttpCase::new(
            "smuggling CL.TE (Content-Length covers a second request, chunked ends before it)",
            smuggle(
                &format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", 5 + SMUGGLED.len()),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "smuggling TE.CL (chunked covers a second request, Content-Length ends before it)",
            smuggle(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "smuggling with Transfer-Encoding before Content-Length",
            smuggle(
                &format!("Transfer-Encoding: chunked\r\nContent-Length: {}\r\n", 5 + SMUGGLED.len()),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "smuggling with an obfuscated Transfer-Encoding (space before the colon)",
            smuggle(
                &format!("Content-Length: {}\r\nTransfer-Encoding : chunked\r\n", 5 + SMUGGLED.len()),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "smuggling with Transfer-Encoding: chunked plus a second Transfer-Encoding: identity",
            smuggle(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                    5 + SMUGGLED.len()
                ),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "one Content-Length listing two values",
            smuggle(&format!("Content-Length: 2, {}\r\n", 2 + SMUGGLED.len()), &format!("{{}}{SMUGGLED}")),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new("negative Content-Length", smuggle("Content-Length: -1\r\n", "{}"), Expect::Refused).smuggling(),
        HttpCase::new(
            "Content-Length past u64",
            smuggle("Content-Length: 99999999999999999999999999\r\n", "{}"),
            Expect::Refused,
        ),
        HttpCase::new("non-numeric Content-Length", smuggle("Content-Length: abc\r\n", "{}"), Expect::Refused),
        HttpCase::new(
            "chunked body with a chunk size past u64",
            smuggle("Transfer-Encoding: chunked\r\n", "fffffffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
            Expect::Refused,
        ),
        // Header floods.
        HttpCase::new(
            "one header of 2 MiB",
            format!("GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nX-Huge: {}\r\n\r\n", "a".repeat(2 << 20)),
            Expect::Refused,
        ),
        HttpCase::new(
            "a header line without a colon",
            "GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nNoColonHere\r\n\r\n",
            Expect::Refused,
        ),
        HttpCase::new(
            "a header name with a space",
            "GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nBad Name: x\r\n\r\n",
            Expect::Refused,
        ),
        HttpCase::new(
            "an obsolete folded header line",
            "GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nX-Folded: a\r\n b\r\n\r\n",
            Expect::Refused,
        ),
        // RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request
        // without Host, or with two, or with an invalid one (the proxy checks;
        // the backend, hyper, would accept the first and the last).
        HttpCase::new("HTTP/1.1 without Host", "GET /api/ai-health HTTP/1.1\r\n\r\n", Expect::Refused),
        HttpCase::new(
            "two Host headers",
            "GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nHost: evil.test\r\n\r\n",
            Expect::Refused,
        ),
        HttpCase::new("a Host with a space in it", "GET /api/ai-health HTTP/1.1\r\nHost: a b\r\n\r\n", Expect::Refused),
        HttpCase::new(
            "very long URL (100,000 characters)",
            get(&format!("/api/{}", "a".repeat(100_000))),
            Expect::Refused,
        ),
        // Requests that try to make the proxy go somewhere else.
        HttpCase::new(
            "absolute-form URI naming another host",
            format!(
                "GET http://127.0.0.1:{trap_port}/api/ai-health HTTP/1.1\r\nHost: 127.0.0.1:{trap_port}\r\n\r\n"
            ),
            // Served by our own backends (the host is ignored) or refused.
            Expect::AnyOf(&[200, 400, 403, 404, 421]),
        ),
        HttpCase::new(
            "CONNECT to another host",
            format!("CONNECT 127.0.0.1:{trap_port} HTTP/1.1\r\nHost: 127.0.0.1:{trap_port}\r\n\r\n"),
            Expect::Refused,
        ),
        HttpCase::new("OPTIONS in asterisk form", "OPTIONS * HTTP/1.1\r\nHost: hostile.test\r\n\r\n", Expect::Refused),
        HttpCase::new(
            "TRACE (must not echo the request)",
            "TRACE /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nX-Secret: trace-canary\r\n\r\n",
            Expect::AnyOf(&[400, 403, 404, 405, 501]),
        ),
        HttpCase::new("unknown method BREW", "BREW /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\n\r\n", Expect::AnyOf(&[400, 404, 405])),
        HttpCase::new("unknown method PROPFIND", "PROPFIND / HTTP/1.1\r\nHost: hostile.test\r\nDepth: 1\r\n\r\n", Expect::AnyOf(&[400, 404, 405])),
        // Path traversal: a JSON 404, never a file.
        HttpCase::new("path traversal /../../etc/passwd", get("/../../etc/passwd"), not_found),
        HttpCase::new("path traversal %2e%2e/ encoded", get("/%2e%2e/%2e%2e/%2e%2e/etc/passwd"), not_found),
        HttpCase::new("path traversal ..%2f encoded", get("/api/..%2f..%2f..%2fetc%2fpasswd"), not_found),
        HttpCase::new("path traversal double-encoded %252e%252e%252f", get("/%252e%252e%252f%252e%252e%252fetc%252fpasswd"), not_found),
        HttpCase::new("path traversal with backslashes %5c", get("/..%5c..%5c..%5cetc%5cpasswd"), not_found),
        HttpCase::new("path traversal //etc/passwd", get("//etc/passwd"), not_found),
        // Bodies.
        HttpCase::new(
            "invalid UTF-8 in the JSON body",
            post("/api/chat", "application/json", b"{\"session_id\": \"s-1\", \"message\": \"\xff\xfe\xc3\x28\"}"),
            bad,
        ),
        HttpCase::new("a body that is not JSON (text/plain)", post("/api/chat", "text/plain", b"hello"), Expect::Json(415)),
        HttpCase::new(
            "JSON nested 100,000 deep",
            post("/api/chat", "application/json", "[".repeat(100_000).as_bytes()),
            bad,
        ),
        HttpCase::new(
            "duplicate JSON keys",
            post("/api/chat", "application/json", br#"{"session_id": "s-1", "session_id": "s-*", "message": "hi"}"#),
            bad,
        ),
        HttpCase::new(
            "message of 32,769 characters",
            post_json(&json!({"session_id": "s-1", "message": "a".repeat(chat_wire::MAX_MESSAGE_CHARS + 1)})),
            bad,
        ),
        HttpCase::new(
            "body over the backend's limit (300 KB)",
            post_json(&json!({"session_id": "s-1", "message": "a".repeat(300_000)})),
            Expect::Json(413),
        ),
        HttpCase::new(
            "body over the proxy's limit, announced (10 GB Content-Length, no body sent)",
            "POST /api/chat HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
            Expect::Json(413),
        ),
        HttpCase::new(
            "body over the proxy's limit, announced with Expect: 100-continue",
            "POST /api/chat HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: application/json\r\n\
             Content-Length: 2000000\r\nExpect: 100-continue\r\n\r\n",
            Expect::Json(413),
        ),
        HttpCase::new(
            "body over the proxy's limit, chunked (2 MiB)",
            {
                let mut r = b"POST /api/chat HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: application/json\r\n\
                              Transfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
                for _ in 0..32 {
                    r.extend_from_slice(format!("{:x}\r\n", 65_536).as_bytes());
                    r.extend(std::iter::repeat_n(b'a', 65_536));
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n\r\n");
                r
            },
            Expect::AnyOf(&[413]),
        ),
        // Slow clients.
        HttpCase::new(
            "slowloris: a header sent a byte every 100 ms",
            format!("GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\nX-Slow: {}", "a".repeat(200)),
            Expect::Refused,
        )
        .paced(Duration::from_millis(100))
        .within(HEADER_TIMEOUT + Duration::from_millis(1500)),
        HttpCase::new(
            "a body that stops half-way",
            "POST /api/chat HTTP/1.1\r\nHost: hostile.test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"session",
            Expect::AnyOf(&[408]),
        )
        .within(BODY_TIMEOUT + Duration::from_millis(2500)),
    ]);

    // Ids with control characters, NUL and Redis glob characters: 400 on
    // REST and on the WebSocket upgrade.
    let hostile_ids = [
        ("NUL", "s\u{0}x", "s%00x"),
        ("BEL", "s\u{7}x", "s%07x"),
        ("CR LF and a Redis command", "s\r\nFLUSHALL", "s%0D%0AFLUSHALL"),
        ("glob *", "s*", "s%2A"),
        ("glob ?", "s?", "s%3F"),
        ("glob [ab]", "s[ab]", "s%5Bab%5D"),
        ("glob [^a]", "s[^a]", "s%5B%5Ea%5D"),
    ];
    for (what, raw, encoded) in hostile_ids {
        cases.push(HttpCase::new(
            format!("REST session_id with {what}"),
            post_json(&json!({"session_id": raw, "message": "hi"})),
            bad,
        ));
        cases.push(HttpCase::new(
            format!("WebSocket upgrade with session_id with {what}"),
            upgrade(&format!("/ws/chat?session_id={encoded}")),
            bad,
        ));
    }
    cases.push(HttpCase::new(
        "REST user_id with glob *",
        post_json(&json!({"session_id": "s-1", "message": "hi", "user_id": "u*"})),
        bad,
    ));
    cases.push(HttpCase::new("WebSocket upgrade without session_id", upgrade("/ws/chat"), bad));
    cases.push(HttpCase::new("WebSocket upgrade with an empty session_id", upgrade("/ws/chat?session_id="), bad));
    cases.push(HttpCase::new(
        "WebSocket upgrade with a 129-character session_id",
        upgrade(&format!("/ws/chat?session_id={}", "s".repeat(129))),
        bad,
    ));
    cases.push(HttpCase::new(
        "WebSocket upgrade with Sec-WebSocket-Version 12",
        "GET /ws/chat?session_id=s-1 HTTP/1.1\r\nHost: hostile.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 12\r\n\r\n",
        Expect::Refused,
    ));
    cases.push(HttpCase::new(
        "WebSocket upgrade without Sec-WebSocket-Key",
        "GET /ws/chat?session_id=s-1 HTTP/1.1\r\nHost: hostile.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        Expect::Refused,
    ));
    cases.extend(ai_gateway_cases());
    cases
}

/// The OpenAI-compatible face and cancellation: malformed bodies, unknown
/// models and ids each get OpenAI's (or the contract's) JSON error shape.
fn ai_gateway_cases() -> Vec<HttpCase> {
    let v1 = |name: &str, body: &[u8], status: u16| {
        HttpCase::new(
            format!("/v1: {name}"),
            post("/v1/chat/completions", "application/json", body),
            Expect::Json(status),
        )
    };
    let user = |content: &str| json!([{"role": "user", "content": content}]);
    let mut cases = vec![
        v1("unknown model", json!({"model": "gpt-x", "messages": user("hi")}).to_string().as_bytes(), 404),
        v1("no messages", br#"{"model": "chat", "messages": []}"#, 400),
        v1("messages not a list", br#"{"model": "chat", "messages": "hi"}"#, 400),
        v1("last message from the assistant", br#"{"model": "chat", "messages": [{"role": "assistant", "content": "x"}]}"#, 400),
        v1("content of an image", br#"{"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#, 400),
        v1("n = 5", json!({"model": "chat", "messages": user("hi"), "n": 5}).to_string().as_bytes(), 400),
        v1("a session id with spaces in user", json!({"model": "chat", "messages": user("hi"), "user": "a b"}).to_string().as_bytes(), 400),
        v1("stream not a boolean", json!({"model": "chat", "messages": user("hi"), "stream": "yes"}).to_string().as_bytes(), 400),
        v1("truncated JSON", br#"{"model": "chat", "messages": [{"role": "#, 400),
        v1(
            "a message over the length limit",
            json!({"model": "chat", "messages": user(&"x".repeat(chat_wire::MAX_MESSAGE_CHARS + 1))}).to_string().as_bytes(),
            400,
        ),
        HttpCase::new("/v1: an endpoint we do not have", get("/v1/embeddings"), Expect::Json(404)),
        HttpCase::new("/v1: resume of an unknown completion", get("/v1/chat/completions/chatcmpl-r-none/events"), Expect::Json(404)),
        HttpCase::new(
            "/v1: a Last-Event-ID that is not a seq",
            "GET /v1/chat/completions/chatcmpl-r-none/events HTTP/1.1\r\nHost: hostile.test\r\nLast-Event-ID: -1\r\n\r\n",
            Expect::Json(400),
        ),
    ];
    for (name, target, status) in
        [("an unknown request", "/api/chat/r-nobody", 404), ("a bad id", "/api/chat/r%20x", 400)]
    {
        cases.push(HttpCase::new(
            format!("cancel of {name}"),
            format!("DELETE {target} HTTP/1.1\r\nHost: hostile.test\r\n\r\n"),
            Expect::Json(status),
        ));
    }
    cases
}

/// Framing attacks sent both through the proxy and straight at a backend.
fn framing_cases() -> Vec<HttpCase> {
    vec![
        HttpCase::new("garbage bytes", b"\x00\x01\x02garbage\xff\xfe\r\n\r\n".to_vec(), Expect::Refused),
        HttpCase::new("HTTP/3.0 version", "GET /api/ai-health HTTP/3.0\r\nHost: hostile.test\r\n\r\n", Expect::Refused),
        HttpCase::new(
            "two Content-Length headers with different values",
            smuggle(
                &format!("Content-Length: 2\r\nContent-Length: {}\r\n", 2 + SMUGGLED.len()),
                &format!("{{}}{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "chunked body with an invalid chunk size",
            smuggle("Transfer-Encoding: chunked\r\n", "zz\r\n{}\r\n0\r\n\r\n"),
            Expect::Refused,
        ),
        HttpCase::new(
            "5,000 headers",
            {
                let mut r = String::from("GET /api/ai-health HTTP/1.1\r\nHost: hostile.test\r\n");
                for i in 0..5_000 {
                    let _ = write!(r, "X-Flood-{i}: {i}\r\n");
                }
                r + "\r\n"
            },
            Expect::Refused,
        ),
    ]
}

/// Framing attacks straight at a backend's own listener: defence in depth
/// behind the proxy.
fn backend_http_cases() -> Vec<HttpCase> {
    let mut cases = framing_cases();
    cases.extend([
        HttpCase::new(
            "smuggling CL.TE",
            smuggle(
                &format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", 5 + SMUGGLED.len()),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Expect::Refused,
        )
        .smuggling(),
        HttpCase::new(
            "invalid UTF-8 in the JSON body",
            post("/api/chat", "application/json", b"{\"session_id\": \"s-1\", \"message\": \"\xff\xfe\"}"),
            Expect::Json(400),
        ),
        HttpCase::new("path traversal /../../etc/passwd", get("/../../etc/passwd"), Expect::Json(404)),
    ]);
    cases
}

/// One answer read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(200).collect()
    }
}

/// What one connection got.
#[derive(Debug)]
struct Outcome {
    /// Final answers, in order (interim 1xx left out, except a 101).
    responses: Vec<RawResponse>,
    /// Interim answers (100 Continue).
    interim: Vec<u16>,
    /// Whether the server closed the connection (EOF or reset).
    closed: bool,
    /// How the reading ended.
    how: String,
    /// Bytes that do not parse as an answer.
    unparsed: usize,
    /// From connect until the answer was complete or the connection closed.
    elapsed: Duration,
}

/// Sends `case` on a fresh connection to `addr` and reads what comes back:
/// until the connection closes, or `linger` after a complete answer, or
/// [`CASE_WAIT`]. The request is written from its own task, so a server that
/// answers before reading it all is heard.
async fn exchange(addr: SocketAddr, case: &HttpCase) -> Outcome {
    let started = Instant::now();
    let stream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        other => {
            return Outcome {
                responses: Vec::new(),
                interim: Vec::new(),
                closed: false,
                how: format!("connect failed: {other:?}"),
                unparsed: 0,
                elapsed: started.elapsed(),
            }
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let bytes = case.bytes.clone();
    let pace = case.pace;
    let writing = tokio::spawn(async move {
        match pace {
            None => {
                let _ = writer.write_all(&bytes).await;
            }
            Some(gap) => {
                for b in bytes {
                    if writer.write_all(&[b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(gap).await;
                }
            }
        }
        // The write half stays open: dropping it sends a FIN, and a
        // half-closed client is a different case.
        std::future::pending::<()>().await;
    });

    let deadline = started + CASE_WAIT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut closed = false;
    let mut how = String::from("left open");
    let mut last_bytes = started;
    let mut answered_at = None;
    loop {
        let complete = !parse_responses(&buf, false).0.is_empty();
        if complete && answered_at.is_none() {
            answered_at = Some(started.elapsed());
        }
        let until = if complete { (last_bytes + case.linger).min(deadline) } else { deadline };
        match tokio::time::timeout_at(until.into(), reader.read(&mut chunk)).await {
            Err(_) => {
                if !complete {
                    how = format!("nothing within {CASE_WAIT:?}");
                }
                break;
            }
            Ok(Ok(0)) => {
                closed = true;
                how = "closed".into();
                break;
            }
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                last_bytes = Instant::now();
            }
            Ok(Err(e)) => {
                closed = true;
                how = format!("reset ({e})");
                break;
            }
        }
    }
    writing.abort();
    let elapsed = answered_at.unwrap_or_else(|| started.elapsed());
    let (responses, interim, consumed) = parse_responses(&buf, closed);
    Outcome { responses, interim, closed, how, unparsed: buf.len() - consumed, elapsed }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Every complete answer at the start of `buf`; with `eof`, an answer
/// without a length ends at the end. Returns the answers, the interim
/// statuses and the bytes consumed.
fn parse_responses(buf: &[u8], eof: bool) -> (Vec<RawResponse>, Vec<u16>, usize) {
    let mut responses = Vec::new();
    let mut interim = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let Some(head_len) = find(&buf[pos..], b"\r\n\r\n") else { break };
        let head = String::from_utf8_lossy(&buf[pos..pos + head_len]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = match status_line.strip_prefix("HTTP/1.").and_then(|rest| rest.get(2..5)) {
            Some(code) => match code.parse::<u16>() {
                Ok(code) => code,
                Err(_) => break,
            },
            None => break,
        };
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())).collect();
        let mut at = pos + head_len + 4;
        if status == 101 {
            responses.push(RawResponse { status, headers, body: Vec::new() });
            pos = at;
            break;
        }
        if (100..200).contains(&status) {
            interim.push(status);
            pos = at;
            continue;
        }
        let header = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        let body = if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            let mut body = Vec::new();
            let mut complete = false;
            while let Some(line_len) = find(&buf[at..], b"\r\n") {
                let line = String::from_utf8_lossy(&buf[at..at + line_len]).into_owned();
                let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16) else {
                    break;
                };
                let start = at + line_len + 2;
                if size == 0 {
                    if buf.len() >= start + 2 {
                        at = start + 2;
                        complete = true;
                    }
                    break;
                }
                if buf.len() < start + size + 2 {
                    break;
                }
                body.extend_from_slice(&buf[start..start + size]);
                at = start + size + 2;
            }
            if !complete {
                break;
            }
            body
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if buf.len() < at + len {
                break;
            }
            at += len;
            buf[at - len..at].to_vec()
        } else if status == 204 || status == 304 {
            Vec::new()
        } else if eof {
            let body = buf[at..].to_vec();
            at = buf.len();
            body
        } else {
            break;
        };
        responses.push(RawResponse { status, headers, body });
        pos = at;
    }
    (responses, interim, pos)
}

/// Checks `out` against the case; `Ok` says what came back.
fn judge(case: &HttpCase, out: &Outcome) -> Result<String, String> {
    let statuses: Vec<u16> = out.responses.iter().map(|r| r.status).collect();
    let got = match statuses.first() {
        Some(status) => format!("{status} in {:.0?} ({})", out.elapsed, out.how),
        None => format!("no answer, {} after {:.0?}", out.how, out.elapsed),
    };
    if out.responses.is_empty() && !out.closed {
        return Err(format!("a hang: {got}"));
    }
    if out.responses.len() > 1 {
        let bodies: Vec<String> = out.responses.iter().map(|r| format!("{} {}", r.status, r.text())).collect();
        return Err(format!("{} answers on one connection, so a second request was read: {bodies:?}", statuses.len()));
    }
    if out.unparsed > 0 && out.responses.is_empty() {
        return Err(format!("{} bytes that are not an HTTP answer ({got})", out.unparsed));
    }
    if let Some(bad) = out.responses.iter().find(|r| r.status >= 500) {
        return Err(format!("a 5xx: {} {}", bad.status, bad.text()));
    }
    for r in &out.responses {
        let text = String::from_utf8_lossy(&r.body);
        if text.contains("root:") || text.contains("trace-canary") {
            return Err(format!("the answer leaks a file or echoes the request: {}", r.text()));
        }
    }
    if let Some(limit) = case.within {
        if out.elapsed > limit {
            return Err(format!("not answered or cut within {limit:?}: {got}"));
        }
    }
    let first = out.responses.first();
    match case.expect {
        Expect::Json(status) => {
            let Some(r) = first else { return Err(format!("expected {status}, got {got}")) };
            if r.status != status {
                return Err(format!("expected {status}, got {} {}", r.status, r.text()));
            }
            let body: Value = serde_json::from_slice(&r.body)
                .map_err(|e| format!("{status} body is not JSON ({e}): {}", r.text()))?;
            if !body["error"]["code"].is_string() || !body["error"]["message"].is_string() {
                return Err(format!("{status} body is not the error shape: {body}"));
            }
            if status == 413 && out.interim.contains(&100) {
                return Err("a 100 Continue was sent for a body over the limit".into());
            }
        }
        Expect::AnyOf(allowed) => {
            let Some(r) = first else { return Err(format!("expected one of {allowed:?}, got {got}")) };
            if !allowed.contains(&r.status) {
                return Err(format!("expected one of {allowed:?}, got {} {}", r.status, r.text()));
            }
            if r.status == 200 && r.header("x-backend-id").is_none() {
                return Err("a 200 that no backend of ours gave (no X-Backend-Id)".into());
            }
        }
        Expect::Refused => {
            if let Some(r) = first {
                if !(400..500).contains(&r.status) {
                    return Err(format!("expected a 4xx or a close, got {} {}", r.status, r.text()));
                }
            }
        }
    }
    Ok(got)
}

// ----------------------------------------------------------- WebSocket ----

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// One client frame: `first` is the FIN/RSV/opcode byte.
fn frame_with(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(first, payload, true)
}

fn text(s: &str) -> Vec<u8> {
    frame(FIN | OP_TEXT, s.as_bytes())
}

fn probe_text() -> String {
    json!({"type": "resume", "request_id": PROBE_ID, "after_seq": 0}).to_string()
}

/// What a WebSocket case must get.
#[derive(Debug, Clone, Copy)]
enum WsExpect {
    /// An `error` frame with this code; the socket stays open and answers the probe.
    Error(&'static str),
    /// No answer to the frames themselves; the socket answers the probe.
    Usable,
    /// A close frame with this code.
    Close(u16),
    /// A close frame with one of these codes, or the connection cut.
    CloseOrCut(&'static [u16]),
}

struct WsCase {
    name: String,
    /// Query string of the upgrade; `None` gives a fresh valid session.
    query: Option<String>,
    frames: Vec<Vec<u8>>,
    expect: WsExpect,
}

impl WsCase {
    fn new(name: impl Into<String>, frames: Vec<Vec<u8>>, expect: WsExpect) -> WsCase {
        WsCase { name: name.into(), query: None, frames, expect }
    }
}

fn ws_cases() -> Vec<WsCase> {
    let invalid = WsExpect::Error("invalid_frame");
    let rejected = WsExpect::Error("invalid_request");
    let resume =
        |after_seq: &str| text(&format!(r#"{{"type": "resume", "request_id": "r-1", "after_seq": {after_seq}}}"#));
    let probe = probe_text();
    let (first_half, second_half) = probe.split_at(probe.len() / 2);
    let (first_third, rest) = probe.split_at(probe.len() / 3);
    let (second_third, last_third) = rest.split_at(rest.len() / 2);
    let big = "a".repeat(FRAME_LIMIT + 1);
    vec![
        WsCase::new("non-JSON text", vec![text("hello, is this JSON?")], invalid),
        WsCase::new("empty text frame", vec![text("")], invalid),
        WsCase::new("binary frame", vec![frame(FIN | OP_BINARY, &[0, 1, 2, 0xff])], invalid),
        WsCase::new("JSON array", vec![text("[1, 2, 3]")], invalid),
        WsCase::new("unknown type", vec![text(r#"{"type": "hack", "message": "hi"}"#)], invalid),
        WsCase::new("type is a number", vec![text(r#"{"type": 42}"#)], invalid),
        WsCase::new("type is missing", vec![text(r#"{"message": "hi"}"#)], invalid),
        WsCase::new("chat without message", vec![text(r#"{"type": "chat"}"#)], invalid),
        WsCase::new("chat with a number for message", vec![text(r#"{"type": "chat", "message": 42}"#)], invalid),
        WsCase::new("resume with negative after_seq", vec![resume("-1")], invalid),
        WsCase::new("resume with after_seq past u64", vec![resume("18446744073709551616")], invalid),
        WsCase::new("resume with after_seq 1e30", vec![resume("1e30")], invalid),
        WsCase::new("resume with a string after_seq", vec![resume("\"3\"")], invalid),
        WsCase::new(
            "resume with a number for request_id",
            vec![text(r#"{"type": "resume", "request_id": 7, "after_seq": 0}"#)],
            invalid,
        ),
        WsCase::new(
            "resume with a glob request_id",
            vec![text(r#"{"type": "resume", "request_id": "r-*", "after_seq": 0}"#)],
            invalid,
        ),
        WsCase::new(
            "resume with NUL in request_id",
            vec![text(r#"{"type": "resume", "request_id": "r-\u0000", "after_seq": 0}"#)],
            invalid,
        ),
        WsCase::new(
            "resume with after_seq u64::MAX for an unknown request",
            vec![text(
                &json!({"type": "resume", "request_id": "r-nobody-made-this", "after_seq": u64::MAX}).to_string(),
            )],
            WsExpect::Error("unknown_request"),
        ),
        WsCase::new("JSON nested 10,000 deep", vec![text(&"[".repeat(10_000))], invalid),
        WsCase::new("chat with an empty message", vec![text(r#"{"type": "chat", "message": ""}"#)], rejected),
        WsCase::new("chat with a blank message", vec![text(r#"{"type": "chat", "message": "   \n\t "}"#)], rejected),
        WsCase::new(
            "chat with a 32,769-character message",
            vec![text(&json!({"type": "chat", "message": "a".repeat(chat_wire::MAX_MESSAGE_CHARS + 1)}).to_string())],
            rejected,
        ),
        WsCase::new(
            "chat with a glob user_id",
            vec![text(r#"{"type": "chat", "message": "hi", "user_id": "u*"}"#)],
            rejected,
        ),
        WsCase::new(
            "chat with NUL in user_id",
            vec![text(r#"{"type": "chat", "message": "hi", "user_id": "u\u0000"}"#)],
            rejected,
        ),
        WsCase::new(
            "a message in three fragments",
            vec![
                frame(OP_TEXT, first_third.as_bytes()),
                frame(OP_CONTINUATION, second_third.as_bytes()),
                frame(FIN | OP_CONTINUATION, last_third.as_bytes()),
            ],
            WsExpect::Usable,
        ),
        WsCase::new(
            "a fragmented message with a ping between the fragments",
            vec![
                frame(OP_TEXT, first_half.as_bytes()),
                frame(FIN | OP_PING, b"between"),
                frame(FIN | OP_CONTINUATION, second_half.as_bytes()),
            ],
            WsExpect::Usable,
        ),
        WsCase::new(
            "ping flood (2,000 pings of 125 bytes)",
            vec![frame(FIN | OP_PING, &[b'p'; 125]); 2_000],
            WsExpect::Usable,
        ),
        WsCase {
            name: "unknown query parameters on the upgrade".into(),
            query: Some(format!(
                "session_id={}&foo=bar&debug=1&x%5B%5D=%00&redirect=http://evil.test/",
                unique("hostile")
            )),
            frames: Vec::new(),
            expect: WsExpect::Usable,
        },
        // Oversized frames close with 1009.
        WsCase::new("text frame one byte over max_frame_bytes", vec![text(&big)], WsExpect::Close(1009)),
        WsCase::new(
            "binary frame one byte over max_frame_bytes",
            vec![frame(FIN | OP_BINARY, big.as_bytes())],
            WsExpect::Close(1009),
        ),
        WsCase::new(
            "fragments that add up to more than max_frame_bytes",
            {
                let piece = "a".repeat(10_000);
                let mut frames = vec![frame(OP_TEXT, piece.as_bytes())];
                frames.extend((0..6).map(|_| frame(OP_CONTINUATION, piece.as_bytes())));
                frames.push(frame(FIN | OP_CONTINUATION, piece.as_bytes()));
                frames
            },
            WsExpect::Close(1009),
        ),
        WsCase::new(
            "text frame of 300 KB (past the transport's hard cap)",
            vec![text(&"a".repeat(300_000))],
            WsExpect::CloseOrCut(&[1009]),
        ),
        // Protocol violations: a close (with the matching code) or a cut.
        WsCase::new(
            "invalid UTF-8 in a text frame",
            vec![frame(FIN | OP_TEXT, b"{\"type\": \"\xff\xfe\xc3\x28\"}")],
            WsExpect::CloseOrCut(&[1007]),
        ),
        WsCase::new(
            "invalid UTF-8 split across fragments",
            vec![frame(OP_TEXT, b"{\"type\": \"\xe2\x82"), frame(FIN | OP_CONTINUATION, b"\xff\"}")],
            WsExpect::CloseOrCut(&[1007]),
        ),
        WsCase::new(
            "continuation frame without a first fragment",
            vec![frame(FIN | OP_CONTINUATION, probe.as_bytes())],
            WsExpect::CloseOrCut(&[1002]),
        ),
        WsCase::new(
            "a new text frame inside a fragmented message",
            vec![frame(OP_TEXT, first_half.as_bytes()), text(&probe)],
            WsExpect::CloseOrCut(&[1002]),
        ),
        WsCase::new(
            "unmasked client frame",
            vec![frame_with(FIN | OP_TEXT, probe.as_bytes(), false)],
            WsExpect::CloseOrCut(&[1002]),
        ),
        WsCase::new(
            "reserved bit set without an extension",
            vec![frame(FIN | RSV1 | OP_TEXT, probe.as_bytes())],
            WsExpect::CloseOrCut(&[1002]),
        ),
        WsCase::new("unknown opcode 0x3", vec![frame(FIN | 0x3, b"?")], WsExpect::CloseOrCut(&[1002])),
        WsCase::new(
            "ping with a 126-byte payload",
            vec![frame(FIN | OP_PING, &[b'p'; 126])],
            WsExpect::CloseOrCut(&[1002]),
        ),
        WsCase::new("fragmented ping", vec![frame(OP_PING, b"half")], WsExpect::CloseOrCut(&[1002])),
        WsCase::new(
            "close frame with the invalid code 999",
            vec![frame(FIN | OP_CLOSE, &999u16.to_be_bytes())],
            WsExpect::CloseOrCut(&[1002, 1000, 999]),
        ),
    ]
}

/// What the server sent, as the client reads it.
#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
enum WsRead {
    Text(String),
    Binary(usize),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
    /// The connection ended without a close frame.
    Cut(String),
    /// Nothing before the deadline.
    Silent,
}

/// A WebSocket client that writes frames byte for byte as told.
struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades `/ws/chat?{query}`; `Err` with the answer's head when it is not a 101.
    async fn connect(addr: SocketAddr, query: &str) -> Result<RawWs, String> {
        let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.write_all(&upgrade(&format!("/ws/chat?{query}"))).await.map_err(|e| format!("write: {e}"))?;
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_len = loop {
            if let Some(at) = find(&buf, b"\r\n\r\n") {
                break at;
            }
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Err(_) => return Err("no upgrade answer in time".into()),
                Ok(Ok(0)) => return Err(format!("closed during the upgrade: {}", String::from_utf8_lossy(&buf))),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(format!("read: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("upgrade refused: {head}"));
        }
        buf.drain(..head_len + 4);
        Ok(RawWs { stream, buf })
    }

    /// Writes the frames; `false` when the server stopped reading them.
    async fn send(&mut self, frames: &[Vec<u8>]) -> bool {
        let all: Vec<u8> = frames.concat();
        matches!(tokio::time::timeout(EVENT_WAIT, self.stream.write_all(&all)).await, Ok(Ok(())))
    }

    async fn fill(&mut self, n: usize, deadline: tokio::time::Instant) -> Result<(), WsRead> {
        let mut chunk = [0u8; 16 * 1024];
        while self.buf.len() < n {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(WsRead::Silent),
                Ok(Ok(0)) => return Err(WsRead::Cut("closed without a close frame".into())),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
                Ok(Err(e)) => return Err(WsRead::Cut(format!("reset ({e})"))),
            }
        }
        Ok(())
    }

    async fn read(&mut self, deadline: tokio::time::Instant) -> WsRead {
        if let Err(ended) = self.fill(2, deadline).await {
            return ended;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let masked = b1 & 0x80 != 0;
        let (mut header, len) = match b1 & 0x7f {
            126 => (4, None),
            127 => (10, None),
            n => (2, Some(n as usize)),
        };
        if let Err(ended) = self.fill(header, deadline).await {
            return ended;
        }
        let len = len.unwrap_or_else(|| {
            if header == 4 {
                u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize
            } else {
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize
            }
        });
        if masked {
            header += 4;
        }
        if let Err(ended) = self.fill(header + len, deadline).await {
            return ended;
        }
        let mut payload: Vec<u8> = self.buf[header..header + len].to_vec();
        if masked {
            let key: Vec<u8> = self.buf[header - 4..header].to_vec();
            payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= key[i % 4]);
        }
        self.buf.drain(..header + len);
        match b0 & 0x0f {
            OP_TEXT => WsRead::Text(String::from_utf8_lossy(&payload).into_owned()),
            OP_BINARY => WsRead::Binary(payload.len()),
            OP_CLOSE => WsRead::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))),
            OP_PING => WsRead::Ping,
            0xA => WsRead::Pong,
            op => WsRead::Other(op),
        }
    }

    /// The next frame that is not a ping or a pong.
    async fn next(&mut self, within: Duration) -> WsRead {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.read(deadline).await {
                WsRead::Ping | WsRead::Pong => continue,
                other => return other,
            }
        }
    }

    /// The next text frame as JSON, or what came instead.
    async fn next_json(&mut self, within: Duration) -> Result<Value, String> {
        match self.next(within).await {
            WsRead::Text(t) => serde_json::from_str(&t).map_err(|e| format!("non-JSON text ({e}): {t}")),
            other => Err(format!("expected a text frame, got {other:?}")),
        }
    }
}

async fn run_ws_case(addr: SocketAddr, case: &WsCase) -> Result<String, String> {
    let query = case.query.clone().unwrap_or_else(|| format!("session_id={}", unique("hostile")));
    let mut ws = RawWs::connect(addr, &query).await?;
    let sent = ws.send(&case.frames).await;
    match case.expect {
        WsExpect::Error(code) => {
            let frame = ws.next_json(EVENT_WAIT).await?;
            if frame["type"] != "error" || frame["code"] != code {
                return Err(format!("expected an error frame with code {code}, got {frame}"));
            }
            let answer = probe(&mut ws).await?;
            Ok(format!("error {code}; then {answer}"))
        }
        WsExpect::Usable => {
            if !sent {
                return Err("the server stopped reading".into());
            }
            Ok(probe(&mut ws).await?)
        }
        WsExpect::Close(code) => match ws.next(EVENT_WAIT).await {
            WsRead::Close(Some(got)) if got == code => Ok(format!("close {got}")),
            other => Err(format!("expected close {code}, got {other:?}")),
        },
        WsExpect::CloseOrCut(codes) => match ws.next(EVENT_WAIT).await {
            WsRead::Close(Some(got)) if codes.contains(&got) => Ok(format!("close {got}")),
            WsRead::Cut(how) => Ok(format!("cut: {how}")),
            other => Err(format!("expected a close with one of {codes:?} or a cut, got {other:?}")),
        },
    }
}

/// Sends the probe and expects its `unknown_request` answer next.
async fn probe(ws: &mut RawWs) -> Result<String, String> {
    if !ws.send(&[text(&probe_text())]).await {
        return Err("the socket no longer takes frames".into());
    }
    let frame = ws.next_json(EVENT_WAIT).await.map_err(|e| format!("the probe got no answer: {e}"))?;
    if frame["type"] == "error" && frame["code"] == "unknown_request" && frame["request_id"] == PROBE_ID {
        Ok("the socket still answers".into())
    } else {
        Err(format!("expected the probe's unknown_request, got {frame}"))
    }
}

/// With API keys on, through the proxy: every way of presenting no valid key
/// gets 401 in the right shape, and another key can neither read, follow,
/// resume nor cancel an answer, which still ends whole for its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_on_bad_keys_are_refused_and_nothing_crosses_keys() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob, gone) = (unique("sk-alice"), unique("sk-bob"), unique("sk-gone"));
    let keys = [("alice", &alice, ""), ("bob", &bob, ""), ("gone", &gone, "revoked = true")];
    let mut text = String::new();
    for (id, key, extra) in keys {
        let _ = writeln!(text, "[[key]]\nid = \"{}\"\nsha256 = \"{}\"\n{extra}", unique(id), backend::keys::hash(key));
    }
    let file = dir.path().join("keys.toml");
    std::fs::write(&file, text).unwrap();
    let backend = Backend::builder(&redis, &[&node])
        .set("auth", "enabled", true)
        .set("auth", "keys_file", format!("{:?}", file.display().to_string()))
        .start()
        .await;
    let proxy = EdgeProxy::start(&[&backend]).await;
    let chat_body = |session: &str| json!({"session_id": session, "message": "a long answer"});

    let long_key = format!("Bearer sk-{}", "x".repeat(8_000));
    let wrong_keys: Vec<Option<String>> = vec![
        None,
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some("Basic YWxpY2U6cHc=".into()),
        Some("Bearer sk-wrong".into()),
        Some(format!("Bearer {gone}")),
        Some(format!("Bearer {alice} extra")),
        Some(long_key),
    ];
    for auth in &wrong_keys {
        let mut req = http().post(proxy.url("/api/chat")).json(&chat_body(&unique("s")));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 401, "{:?}: {body}", auth.as_deref().map(|a| &a[..a.len().min(30)]));
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        let mut v1 = http().get(proxy.url("/v1/models"));
        if let Some(a) = auth {
            v1 = v1.header("authorization", a);
        }
        let body: Value = v1.send().await.unwrap().json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error", "OpenAI's shape under /v1: {body}");
    }

    // Alice's slow answer; Bob tries everything on it.
    let session = unique("s-alice");
    let res = http().post(proxy.url("/api/chat")).bearer_auth(&alice).json(&chat_body(&session)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let request_id = res.json::<Value>().await.unwrap()["request_id"].as_str().unwrap().to_owned();
    let as_bob =
        |method: reqwest::Method, path: String| http().request(method, proxy.url(&path)).bearer_auth(&bob).send();
    for (method, path, code) in [
        (reqwest::Method::DELETE, format!("/api/chat/{request_id}"), "unknown_request"),
        (reqwest::Method::GET, format!("/api/chat/{request_id}/events"), "unknown_request"),
        (reqwest::Method::GET, format!("/v1/chat/completions/chatcmpl-{request_id}/events"), "unknown_request"),
    ] {
        let res = as_bob(method.clone(), path.clone()).await.unwrap();
        assert_eq!(res.status(), 404, "{method} {path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        assert!(!body.to_string().contains(&session), "nothing about alice's session leaks: {body}");
    }
    let res = http().post(proxy.url("/api/chat")).bearer_auth(&bob).json(&chat_body(&session)).send().await.unwrap();
    assert_eq!(res.status(), 404, "bob cannot write into alice's session");

    // Bob's own socket: alice's request is unknown to resume and to cancel.
    let mut request = proxy.ws_url(&unique("s-bob")).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for frame in [
        json!({"type": "cancel", "request_id": request_id}),
        json!({"type": "resume", "request_id": request_id, "after_seq": 0}),
    ] {
        socket.send(Message::text(frame.to_string())).await.unwrap();
        let answer = loop {
            match tokio::time::timeout(EVENT_WAIT, socket.next()).await.unwrap().unwrap().unwrap() {
                Message::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
                _ => continue,
            }
        };
        assert_eq!(
            (answer["type"].as_str(), answer["code"].as_str()),
            (Some("error"), Some("unknown_request")),
            "{frame}: {answer}"
        );
    }

    // None of it touched alice's answer: it ends whole, with done.
    let res =
        http().get(proxy.url(&format!("/api/chat/{request_id}/events"))).bearer_auth(&alice).send().await.unwrap();
    let body = tokio::time::timeout(STREAM_WAIT, res.text()).await.unwrap().unwrap();
    let events: Vec<chat_wire::Event> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| chat_wire::Event::from_json(d).unwrap())
        .collect();
    assert_complete(&events, 1);
}
