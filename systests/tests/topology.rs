//! The public face is the proxy and nothing behind it: through the proxy's
//! port no request reaches an AI node, Redis or an internal endpoint, and the
//! compose file publishes only the proxy and keeps Redis and the AI nodes on
//! an internal-only network.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on the whole test.
const TEST_WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn nothing_behind_the_backends_is_reachable_through_the_proxy() {
    ai_node_bin();
    proxy_bin();
    tokio::time::timeout(TEST_WAIT, through_the_proxy()).await.expect("the test ran out of time");
}

/// Header value of an answer.
fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// Asserts the contract's JSON 404 and returns the answering backend's id.
async fn assert_json_404(res: reqwest::Response, what: &str) -> Option<String> {
    let status = res.status();
    let backend_id = header(&res, "x-backend-id");
    let text = res.text().await.unwrap();
    assert_eq!(status, 404, "{what}: expected a 404, got {status}: {text}");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: 404 body is not JSON ({e}): {text}"));
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{what}: {body}");
    assert_no_internals(what, &text);
    backend_id
}

/// Text that only an AI node, Redis or a metrics endpoint would send.
fn assert_no_internals(what: &str, text: &str) {
    for leak in ["+PONG", "redis_version", "# HELP", "# TYPE", "Active connections", "node_id", "\"duplicate\""] {
        assert!(!text.contains(leak), "{what}: the answer looks internal ({leak:?}): {text}");
    }
}

/// One raw request on a fresh connection; everything read until the server
/// closes or 5 s pass.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.unwrap().unwrap();
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Status of a raw answer (`None` when the connection closed without one).
fn raw_status(answer: &str) -> Option<u16> {
    answer.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

async fn through_the_proxy() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let proxy = EdgeProxy::start_with(&[&backend], "[client]\nheader_timeout = \"2s\"\n").await;
    let client = http();
    let node_addr = node.url.trim_start_matches("http://").to_owned();
    let metrics_addr = format!("127.0.0.1:{}", backend.metrics_port);

    // The control: the public API answers, from our backend.
    let res = client.get(proxy.url("/api/ai-health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-backend-id").as_deref(), Some(backend.backend_id.as_str()));
    // And the internal endpoints exist where they are: so the 404s below
    // mean "not routed", not "not running".
    let res = client.get(backend.metrics_url()).send().await.unwrap();
    assert_eq!(res.status(), 200, "the backend's metrics listener serves /metrics directly");
    assert!(res.text().await.unwrap().contains("# TYPE"));
    let res = client.post(format!("{}/chat", node.url)).json(&json!({})).send().await.unwrap();
    assert_ne!(res.status(), 404, "the AI node serves POST /chat directly");

    // 1. No AI node endpoint: POST /chat is the backend's 404, GET /health is the backend's.
    let node_chat = json!({"session_id": unique("s"), "message": "hi", "request_id": "r-topology-1"});
    let res = client.post(proxy.url("/chat")).json(&node_chat).send().await.unwrap();
    let answered_by = assert_json_404(res, "POST /chat through the proxy").await;
    assert_eq!(answered_by.as_deref(), Some(backend.backend_id.as_str()), "POST /chat is answered by the backend");

    let res = client.get(proxy.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-backend-id").as_deref(), Some(backend.backend_id.as_str()), "/health is the backend's");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["backend_id"], backend.backend_id.as_str(), "/health names the backend: {body}");
    assert!(body.get("node_id").is_none(), "/health through the proxy is never a node's: {body}");

    // Naming the node as the Host, or in an absolute-form URI, changes nothing.
    let res = client.get(proxy.url("/health")).header("host", &node_addr).send().await.unwrap();
    assert_eq!(header(&res, "x-backend-id").as_deref(), Some(backend.backend_id.as_str()), "Host: node");
    let body: Value = res.json().await.unwrap();
    assert!(body.get("node_id").is_none() && body["backend_id"] == backend.backend_id.as_str(), "Host: node: {body}");
    let answer = raw(
        proxy.addr(),
        format!(
            "POST http://{node_addr}/chat HTTP/1.1\r\nHost: {node_addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{node_chat}",
            node_chat.to_string().len()
        )
        .as_bytes(),
    )
    .await;
    let status = raw_status(&answer);
    assert!(status.is_none_or(|s| (400..500).contains(&s)), "absolute-form POST to the node: {answer}");
    assert_no_internals("absolute-form POST to the node", &answer);
    assert!(!answer.contains("\"accepted\""), "the node took a chat through the proxy: {answer}");

    // 2. No Redis: inline commands, as a request line or as a path, get
    // nowhere near it; a canary key survives them.
    let mut redis_conn = redis::Client::open(redis.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("the test's Redis answers");
    let canary = unique("topology-canary");
    redis::cmd("SET").arg(&canary).arg("alive").arg("EX").arg(120).query::<()>(&mut redis_conn).unwrap();

    for inline in ["PING\r\n", "FLUSHALL\r\n", "CONFIG SET dir /tmp\r\n", "*1\r\n$4\r\nPING\r\n"] {
        let answer = raw(proxy.addr(), inline.as_bytes()).await;
        let status = raw_status(&answer);
        assert!(status.is_none_or(|s| (400..500).contains(&s)), "inline {inline:?}: {answer}");
        assert_no_internals(&format!("inline {inline:?}"), &answer);
    }
    for path in
        ["/PING", "/FLUSHALL", "/KEYS%20*", "/CONFIG%20SET%20dir%20%2Ftmp", "/INFO", "/%2A1%0D%0A%244%0D%0APING"]
    {
        let res = client.get(proxy.url(path)).send().await.unwrap();
        assert_json_404(res, &format!("GET {path}")).await;
        let res = client.post(proxy.url(path)).body("FLUSHALL\r\n").send().await.unwrap();
        assert!(res.status() == 404 || res.status() == 405, "POST {path}: {}", res.status());
        assert_no_internals(&format!("POST {path}"), &res.text().await.unwrap());
    }
    let alive: Option<String> = redis::cmd("GET").arg(&canary).query(&mut redis_conn).unwrap();
    assert_eq!(alive.as_deref(), Some("alive"), "the canary key survived every Redis-looking request");
    let _: () = redis::cmd("DEL").arg(&canary).query(&mut redis_conn).unwrap();

    // 3. No internal endpoint: the backend's /metrics (its own listener) and
    // the proxy's status pages are 404s on the public port, by path, by Host
    // and by absolute-form URI.
    for path in ["/metrics", "/nginx-status", "/upstreams", "/api/metrics", "/ws/metrics"] {
        let res = client.get(proxy.url(path)).send().await.unwrap();
        assert_json_404(res, &format!("GET {path} on the public port")).await;
    }
    let res = client.get(proxy.url("/metrics")).header("host", &metrics_addr).send().await.unwrap();
    assert_json_404(res, "GET /metrics with Host: the metrics listener").await;
    let status_addr = format!("127.0.0.1:{}", proxy.status);
    let res = client.get(proxy.url("/nginx-status")).header("host", &status_addr).send().await.unwrap();
    assert_json_404(res, "GET /nginx-status with Host: the status listener").await;
    for target in [format!("http://{metrics_addr}/metrics"), format!("http://{status_addr}/metrics")] {
        let answer = raw(
            proxy.addr(),
            format!("GET {target} HTTP/1.1\r\nHost: hostile.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let status = raw_status(&answer);
        assert!(status.is_none_or(|s| (400..500).contains(&s)), "GET {target} through the proxy: {answer}");
        assert_no_internals(&format!("GET {target}"), &answer);
    }
}

// ------------------------------------------------------ docker-compose ----

/// A YAML mapping entry, as far as the compose file needs: `key: value`,
/// an optional `&anchor`, nested entries and `- item` lists.
#[derive(Debug, Default)]
struct Entry {
    key: String,
    /// The text after the colon (anchor removed), e.g. `[internal]` or `true`.
    value: String,
    anchor: Option<String>,
    children: Vec<Entry>,
    items: Vec<String>,
}

impl Entry {
    fn child(&self, key: &str) -> Option<&Entry> {
        self.children.iter().find(|c| c.key == key)
    }
}

/// Lines without comments and blanks, as (indent, text).
fn yaml_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .filter_map(|line| {
            let mut quoted = None;
            let mut end = line.len();
            for (i, c) in line.char_indices() {
                match (c, quoted) {
                    ('"' | '\'', None) => quoted = Some(c),
                    (q, Some(open)) if q == open => quoted = None,
                    ('#', None) if i == 0 || line[..i].ends_with(' ') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let line = line[..end].trim_end();
            let content = line.trim_start();
            (!content.is_empty()).then(|| (line.len() - content.len(), content.to_owned()))
        })
        .collect()
}

fn parse_block(lines: &[(usize, String)], at: &mut usize, indent: usize) -> Vec<Entry> {
    let mut entries = Vec::new();
    while *at < lines.len() && lines[*at].0 == indent {
        let text = &lines[*at].1;
        *at += 1;
        let (key, rest) = text.split_once(':').unwrap_or((text.as_str(), ""));
        let mut entry = Entry { key: key.trim().trim_matches('"').to_owned(), ..Entry::default() };
        let rest = rest.trim();
        match rest.strip_prefix('&') {
            Some(anchored) => {
                let (name, value) = anchored.split_once(' ').unwrap_or((anchored, ""));
                entry.anchor = Some(name.to_owned());
                entry.value = value.trim().to_owned();
            }
            None => entry.value = rest.to_owned(),
        }
        if *at < lines.len() && lines[*at].0 > indent {
            let inner = lines[*at].0;
            if lines[*at].1.starts_with("- ") {
                while *at < lines.len() && lines[*at].0 == inner && lines[*at].1.starts_with("- ") {
                    entry.items.push(lines[*at].1[2..].trim().trim_matches('"').to_owned());
                    *at += 1;
                }
            } else {
                entry.children = parse_block(lines, at, inner);
            }
        }
        entries.push(entry);
    }
    entries
}

fn collect_anchors<'a>(entries: &'a [Entry], anchors: &mut HashMap<String, &'a Entry>) {
    for entry in entries {
        if let Some(name) = &entry.anchor {
            anchors.insert(name.clone(), entry);
        }
        collect_anchors(&entry.children, anchors);
    }
}

/// The entry's keys with `<<: *anchor` merges applied (own keys win).
fn merged<'a>(entry: &'a Entry, anchors: &HashMap<String, &'a Entry>) -> BTreeMap<String, &'a Entry> {
    let mut keys = BTreeMap::new();
    for merge in entry.children.iter().filter(|c| c.key == "<<") {
        let name = merge.value.strip_prefix('*').unwrap_or_else(|| panic!("unsupported merge {:?}", merge.value));
        let base = anchors.get(name).unwrap_or_else(|| panic!("no anchor &{name}"));
        keys.extend(merged(base, anchors));
    }
    for child in entry.children.iter().filter(|c| c.key != "<<") {
        keys.insert(child.key.clone(), child);
    }
    keys
}

/// A list value, written `[a, b]` or as `- a` items.
fn list(entry: &Entry) -> Vec<String> {
    if !entry.items.is_empty() {
        return entry.items.clone();
    }
    entry
        .value
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn compose_publishes_only_the_proxy_and_keeps_redis_and_ai_nodes_on_an_internal_network() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines = yaml_lines(&text);
    let mut at = 0;
    let root = parse_block(&lines, &mut at, 0);
    assert_eq!(at, lines.len(), "the compose file parsed to the end (stopped at {:?})", lines.get(at));
    let mut anchors = HashMap::new();
    collect_anchors(&root, &mut anchors);
    let top = |key: &str| root.iter().find(|e| e.key == key).unwrap_or_else(|| panic!("no top-level {key}:"));

    let services = &top("services").children;
    let names: Vec<&str> = services.iter().map(|s| s.key.as_str()).collect();
    for expected in ["proxy", "redis"] {
        assert!(names.contains(&expected), "service {expected} is missing: {names:?}");
    }
    let ai_nodes: Vec<&Entry> = services.iter().filter(|s| s.key.starts_with("ai")).collect();
    assert!(!ai_nodes.is_empty(), "no ai-* service: {names:?}");
    assert!(services.iter().any(|s| s.key.starts_with("backend")), "no backend service: {names:?}");

    for service in services {
        let keys = merged(service, &anchors);
        assert!(keys.contains_key("image") || keys.contains_key("build"), "{}: merges were not applied", service.key);
        assert!(!keys.contains_key("network_mode"), "{} uses network_mode, bypassing the networks", service.key);
        let published = keys.get("ports").map(|p| list(p)).unwrap_or_default();
        if service.key == "proxy" {
            assert!(!published.is_empty(), "the proxy publishes its port");
            for port in &published {
                // The host side may be a variable with 8080 as its default
                // (`${CHAT_PORT:-8080}:8080`, so a test can pick a free port).
                let public = port == "8080:8080" || (port.starts_with("${") && port.ends_with(":-8080}:8080"));
                assert!(
                    public || port.starts_with("127.0.0.1:"),
                    "only the public port is published beyond the host's loopback: {port}"
                );
            }
            let networks = keys.get("networks").map(|n| list(n)).unwrap_or_default();
            assert!(
                !networks.iter().any(|n| n == "internal"),
                "the proxy is not on the internal network: {networks:?}"
            );
        } else {
            assert!(published.is_empty(), "{} publishes ports {published:?}; only the proxy may", service.key);
        }
    }

    for service in services.iter().filter(|s| s.key == "redis" || s.key.starts_with("ai")) {
        let keys = merged(service, &anchors);
        let networks = keys.get("networks").map(|n| list(n)).unwrap_or_default();
        assert_eq!(networks, ["internal"], "{} is on the internal network only", service.key);
    }
    // The node services do take their settings from the anchor (the merge
    // the checks above depend on).
    for node in &ai_nodes {
        assert!(merged(node, &anchors).contains_key("command"), "{}: the x-ai-node anchor was merged", node.key);
    }

    let internal = top("networks").child("internal").expect("a network named internal");
    let flag = internal.child("internal").map(|e| e.value.as_str());
    assert_eq!(flag, Some("true"), "the internal network is `internal: true`");
}

#[test]
fn the_compose_parser_reads_anchors_merges_and_lists() {
    let text = "x-base: &base\n  networks: [internal]\n  ports:\n    - \"1:1\" # published\n\nservices:\n  a:\n    <<: *base\n    image: x\n";
    let lines = yaml_lines(text);
    let mut at = 0;
    let root = parse_block(&lines, &mut at, 0);
    let mut anchors = HashMap::new();
    collect_anchors(&root, &mut anchors);
    let a = root[1].child("a").unwrap();
    let keys = merged(a, &anchors);
    assert_eq!(list(keys["networks"]), ["internal"]);
    assert_eq!(list(keys["ports"]), ["1:1"]);
    assert_eq!(keys["image"].value, "x");
}
