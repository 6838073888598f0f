//! API keys: nothing without one (401, close 4401), a session and its
//! requests are their key's alone on every backend (404, close 4404,
//! `unknown_request`), per-key limits (429 `key_limited`), and the key's own
//! usage. Real backends and a node on a real Redis; keys in a file and in Redis.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A keys file with `[[key]]` tables for `(id, key, extra TOML)`.
fn keys_file(dir: &Path, keys: &[(&str, &str, &str)]) -> String {
    let path = dir.join("keys.toml");
    let mut text = String::new();
    for (id, key, extra) in keys {
        text.push_str(&format!("[[key]]\nid = \"{id}\"\nsha256 = \"{}\"\n{extra}\n", backend::keys::hash(key)));
    }
    std::fs::write(&path, text).unwrap();
    format!("{:?}", path.display().to_string())
}

/// A backend with keys on, once it sees its node healthy (asked with `key`:
/// `/api/ai-health` needs one too).
async fn keyed_backend(redis: &str, node: &AiNode, file: &str, key: &str) -> Backend {
    let backend =
        Backend::builder(redis, &[node]).set("auth", "enabled", true).set("auth", "keys_file", file).start().await;
    wait_healthy_with(&backend, key).await;
    backend
}

async fn wait_healthy_with(backend: &Backend, key: &str) {
    let healthy = eventually(Duration::from_secs(10), || async {
        let res = http().get(backend.url("/api/ai-health")).bearer_auth(key).send().await.unwrap();
        res.json::<Value>().await.unwrap()["healthy_nodes"].as_u64() >= Some(1)
    })
    .await;
    assert!(healthy, "the backend never saw its node healthy");
}

fn chat_as(backend: &Backend, key: Option<&str>, session: &str) -> reqwest::RequestBuilder {
    let req = http().post(backend.url("/api/chat")).json(&json!({"session_id": session, "message": "hello"}));
    match key {
        Some(key) => req.bearer_auth(key),
        None => req,
    }
}

/// Opens `/ws/chat` offering `protocols`; the close frame's code when the
/// server closes at once, else `None` (and the socket is dropped).
async fn ws_close_code(backend: &Backend, session: &str, protocols: &str) -> (Option<u16>, Option<String>) {
    let mut request = backend.ws_url(session).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.expect("the upgrade is accepted");
    let chosen = response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
    let frame = tokio::time::timeout(Duration::from_secs(2), socket.next()).await;
    let code = match frame {
        Ok(Some(Ok(Message::Close(Some(frame))))) => Some(u16::from(frame.code)),
        _ => None,
    };
    (code, chosen)
}

#[tokio::test]
async fn without_a_valid_key_nothing_is_served() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let file = keys_file(dir.path(), &[("alice", "sk-alice", ""), ("gone", "sk-gone", "revoked = true")]);
    let backend = keyed_backend(&redis, &node, &file, "sk-alice").await;
    let session = unique("s-key");

    for key in [None, Some("sk-wrong"), Some("sk-gone")] {
        let code = assert_error(chat_as(&backend, key, &session).send().await.unwrap(), 401).await;
        assert_eq!(code, "invalid_api_key", "{key:?}");
    }
    let v1 = http()
        .post(backend.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), 401);
    let body: Value = v1.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error", "OpenAI's shape under /v1: {body}");
    for path in ["/api/usage", "/api/ai-health", "/v1/models"] {
        assert_eq!(http().get(backend.url(path)).send().await.unwrap().status(), 401, "{path}");
    }
    assert_eq!(http().get(backend.url("/health")).send().await.unwrap().status(), 200, "health stays open");

    let (code, _) = ws_close_code(&backend, &session, "chat").await;
    assert_eq!(code, Some(4401), "a socket without a key is closed with 4401");
    let (code, chosen) = ws_close_code(&backend, &session, "chat, bearer.sk-alice").await;
    assert_eq!(code, None, "a browser's key in the subprotocol opens the socket");
    assert_eq!(chosen.as_deref(), Some("chat"), "the chosen subprotocol is chat, never the key");

    let res = chat_as(&backend, Some("sk-alice"), &session).send().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(metric(&backend, "backend_auth_total{outcome=\"missing\"}").await, 6);
}

#[tokio::test]
async fn a_session_and_its_requests_are_their_keys_alone_on_every_backend() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let file = keys_file(dir.path(), &[("alice", "sk-alice", ""), ("bob", "sk-bob", "")]);
    let first = keyed_backend(&redis, &node, &file, "sk-alice").await;
    let second = keyed_backend(&redis, &node, &file, "sk-alice").await;
    let session = unique("s-alice");

    let accepted: Value = chat_as(&first, Some("sk-alice"), &session).send().await.unwrap().json().await.unwrap();
    let request_id = accepted["request_id"].as_str().unwrap().to_owned();
    let events = |backend: &Backend, key: &str| {
        http().get(backend.url(&format!("/api/chat/{request_id}/events"))).bearer_auth(key.to_owned()).send()
    };
    let mine = events(&second, "sk-alice").await.unwrap();
    assert_eq!(mine.status(), 200, "the owner reads it on any backend");
    let text = tokio::time::timeout(STREAM_WAIT, mine.text()).await.unwrap().unwrap();
    assert!(text.contains("\"done\""), "{text}");

    for backend in [&first, &second] {
        let code = assert_error(chat_as(backend, Some("sk-bob"), &session).send().await.unwrap(), 404).await;
        assert_eq!(code, "unknown_session", "bob cannot write into alice's session");
        let code = assert_error(events(backend, "sk-bob").await.unwrap(), 404).await;
        assert_eq!(code, "unknown_request", "bob cannot read alice's request");
        let (code, _) = ws_close_code(backend, &session, "chat, bearer.sk-bob").await;
        assert_eq!(code, Some(4404), "bob cannot follow alice's session");
    }
    let resume = http()
        .get(second.url(&format!("/v1/chat/completions/chatcmpl-{request_id}/events")))
        .bearer_auth("sk-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status(), 404);

    // From a socket on his own session, bob's resume of alice's request is refused like an unknown one.
    let mut request = second.ws_url(&unique("s-bob")).into_client_request().unwrap();
    request.headers_mut().insert("authorization", "Bearer sk-bob".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let frame = json!({"type": "resume", "request_id": request_id, "after_seq": 0}).to_string();
    socket.send(Message::text(frame)).await.unwrap();
    let answer = loop {
        match tokio::time::timeout(EVENT_WAIT, socket.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unknown_request", "{answer}");
}

#[tokio::test]
async fn a_key_is_held_to_its_limits_and_sees_its_own_usage() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let dir = tempfile::tempdir().unwrap();
    let (rpm_key, streams_key) = (unique("sk-rpm"), unique("sk-streams"));
    let file = keys_file(
        dir.path(),
        &[
            (&unique("rpm"), &rpm_key, "requests_per_minute = 2"),
            (&unique("streams"), &streams_key, "concurrent_streams = 1"),
        ],
    );
    let backend = keyed_backend(&redis, &node, &file, &streams_key).await;

    // Two requests a minute, whatever the session.
    for _ in 0..2 {
        let res = chat_as(&backend, Some(&rpm_key), &unique("s")).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    let code = assert_error(chat_as(&backend, Some(&rpm_key), &unique("s")).send().await.unwrap(), 429).await;
    assert_eq!(code, "key_limited");

    // One answer at a time: a slow answer runs, the next is refused meanwhile.
    let res = chat_as(&backend, Some(&streams_key), &unique("s")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let code = assert_error(chat_as(&backend, Some(&streams_key), &unique("s")).send().await.unwrap(), 429).await;
    assert_eq!(code, "key_limited");

    let usage: Value =
        http().get(backend.url("/api/usage")).bearer_auth(&rpm_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["this_minute"]["requests"], 2, "{usage}");
    assert_eq!(usage["limits"]["requests_per_minute"], 2, "{usage}");
    assert!(usage["key_id"].as_str().unwrap().starts_with("rpm"), "{usage}");
}

#[tokio::test]
async fn a_key_in_redis_works_until_it_is_revoked() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let dir = tempfile::tempdir().unwrap();
    let file = keys_file(dir.path(), &[]);
    let backend = Backend::builder(&redis, &[&node])
        .set("auth", "enabled", true)
        .set("auth", "keys_file", file)
        .set("auth", "cache", "\"100ms\"")
        .start()
        .await;
    let key = backend::keys::generate();
    let record = chat_wire::keys::api_key(&backend::keys::hash(&key));
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET").arg(&record).arg("id").arg(unique("team")).query_async(&mut conn).await.unwrap();
    wait_healthy_with(&backend, &key).await;

    let res = chat_as(&backend, Some(&key), &unique("s")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let _: () = redis::cmd("HSET").arg(&record).arg("revoked").arg("1").query_async(&mut conn).await.unwrap();
    let revoked = eventually(Duration::from_secs(3), || async {
        chat_as(&backend, Some(&key), &unique("s")).send().await.unwrap().status() == 401
    })
    .await;
    assert!(revoked, "a revoked key stops working within the cache time");
    let _: () = redis::cmd("DEL").arg(&record).query_async(&mut conn).await.unwrap();
}

#[tokio::test]
async fn a_node_with_a_secret_takes_work_only_from_a_backend_that_knows_it() {
    let redis = redis_url();
    let node = AiNode::start_configured(&redis, Pace::QUICK, "secret = \"s3cret-node\"\n").await;
    let body = json!({"session_id": unique("s"), "message": "hi", "request_id": chat_wire::new_request_id()});
    let direct = http().post(format!("{}/chat", node.url)).json(&body).send().await.unwrap();
    assert_eq!(direct.status(), 401, "nothing but a backend starts work");
    let wrong =
        http().post(format!("{}/chat", node.url)).header("x-node-secret", "guess").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(http().get(format!("{}/health", node.url)).send().await.unwrap().status(), 200, "health stays open");

    let knowing = Backend::builder(&redis, &[&node]).set("ai", "node_secret", "\"s3cret-node\"").start().await;
    knowing.wait_healthy_nodes(1).await;
    let mut ws = Ws::connect(&knowing, &unique("s")).await;
    let accepted = ws.chat("hello").await;
    assert_complete(&ws.until_end(&accepted.request_id).await, 1);

    let unknowing = Backend::start(&redis, &[&node]).await;
    unknowing.wait_healthy_nodes(1).await;
    let code = assert_error(unknowing.post_chat(&json!({"session_id": unique("s"), "message": "hi"})).await, 503).await;
    assert_eq!(code, "no_node_available", "a refused secret is the backend's problem, told as no node");
}
