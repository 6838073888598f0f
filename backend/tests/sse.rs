//! `POST /api/chat` with `Accept: text/event-stream` answers with the stream
//! itself and ends after its last event.

mod common;

use chat_wire::Event;
use common::*;
use serde_json::json;
use std::time::Duration;

/// One server-sent event: its `id:`, `event:` and `data:` lines.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Splits an SSE body into events, skipping comments (keep-alives).
fn parse_sse(body: &str) -> Vec<SseEvent> {
    let body = body.replace("\r\n", "\n");
    let mut events = Vec::new();
    for block in body.split("\n\n") {
        let mut event = SseEvent::default();
        let mut has_data = false;
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => event.id = Some(value.to_owned()),
                "event" => event.event = Some(value.to_owned()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        if has_data {
            events.push(event);
        }
    }
    events
}

#[tokio::test]
async fn sse_chat_streams_every_event_and_ends_after_done() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let res = http()
        .post(backend.url("/api/chat"))
        .header("accept", "text/event-stream")
        .json(&json!({"session_id": unique("s"), "message": "stream it to me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    assert!(res.headers().contains_key("x-backend-id"));
    // The body ends only when the server closes the stream.
    let body = tokio::time::timeout(Duration::from_secs(15), res.text()).await.expect("stream ended").unwrap();

    let sse = parse_sse(&body);
    let events: Vec<Event> =
        sse.iter().map(|e| Event::from_json(&e.data).unwrap_or_else(|err| panic!("{err}: {}", e.data))).collect();
    for (raw, event) in sse.iter().zip(&events) {
        assert_eq!(raw.id.as_deref(), Some(event.seq.to_string().as_str()), "id: is the seq");
        let kind = serde_json::to_value(event.kind).unwrap();
        assert_eq!(raw.event.as_deref(), kind.as_str(), "event: is the type");
    }
    assert!(events.iter().all(|e| e.request_id == events[0].request_id), "one request");
    let text = assert_complete(&events, 1);
    assert!(!text.trim().is_empty());
    assert_eq!(events.len() as u64, Pace::QUICK.events());
}
