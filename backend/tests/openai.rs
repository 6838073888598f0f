//! The OpenAI-compatible face: `/v1/chat/completions` streamed and whole,
//! usage, resume by id on another backend, `/v1/models`, and OpenAI's error
//! shape for bad input. Real backends, a real AI node, a real Redis.

mod common;

use chat_wire::Event;
use common::*;
use serde_json::{json, Value};

/// One server-sent event: its `id:` and `data:`.
#[derive(Debug)]
struct Sse {
    id: Option<String>,
    data: String,
}

fn parse_sse(body: &str) -> Vec<Sse> {
    let mut out = Vec::new();
    for block in body.replace("\r\n", "\n").split("\n\n") {
        let (mut id, mut data) = (None, None::<String>);
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "data" => data = Some(data.map_or(value.to_owned(), |d| format!("{d}\n{value}"))),
                _ => {}
            }
        }
        if let Some(data) = data {
            out.push(Sse { id, data });
        }
    }
    out
}

async fn post(backend: &Backend, body: Value) -> reqwest::Response {
    http().post(backend.url("/v1/chat/completions")).json(&body).send().await.unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": text}])
}

/// The content of a streamed answer's chunks, checked against OpenAI's
/// chunk shape: ids count from `first_id`, one completion id throughout.
fn contents(events: &[Sse], first_id: u64) -> (String, Vec<Value>) {
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("{err}: {}", e.data)))
        .collect();
    let ids: Vec<u64> = events.iter().filter_map(|e| e.id.as_ref()).map(|id| id.parse().unwrap()).collect();
    let expected: Vec<u64> = (first_id..first_id + ids.len() as u64).collect();
    assert_eq!(ids, expected, "SSE ids are the seqs, without gaps or repeats");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], chunks[0]["id"], "one completion id: {c}");
    }
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|choice| choice["delta"]["content"].as_str())
        .collect();
    (text, chunks)
}

#[tokio::test]
async fn a_streamed_answer_is_openai_chunks_then_usage_then_done_and_matches_the_whole_one() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let body = json!({"model": "chat", "messages": user("tell me"), "stream": true,
                      "stream_options": {"include_usage": true}, "temperature": 0.2, "max_tokens": 99});
    let res = post(&backend, body).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let session = res.headers()["x-session-id"].to_str().unwrap().to_owned();
    let text_body = tokio::time::timeout(STREAM_WAIT, res.text()).await.expect("the stream ends").unwrap();
    let events = parse_sse(&text_body);
    assert_eq!(events.last().unwrap().data, "[DONE]", "{text_body}");
    let (text, chunks) = contents(&events, 1);

    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}), "role first");
    let pieces = Pace::QUICK.events() - 1;
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    let usage = &usage_chunk["usage"];
    assert_eq!(usage["completion_tokens"], pieces, "one token a piece: {usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()), "usage only on the last chunk");
    assert!(!text.trim().is_empty());

    // The same question whole, in a session of its own: the same usage.
    let res = post(&backend, json!({"model": "chat", "messages": user("tell me")})).await;
    assert_eq!(res.status(), 200);
    let whole: Value = res.json().await.unwrap();
    assert_eq!(whole["object"], "chat.completion", "{whole}");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-r-"), "{whole}");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(whole["usage"], *usage, "streamed and whole answers count alike");
    assert!(!whole["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert!(session.starts_with("oai-"), "a new session when none is named: {session}");
}

#[tokio::test]
async fn a_v1_answer_is_an_ordinary_request_of_its_session() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s-oai");

    let res = http()
        .post(backend.url("/v1/chat/completions"))
        .header("x-session-id", &session)
        .json(&json!({"model": "chat", "messages": user("first")}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-session-id"], session.as_str());
    let whole: Value = res.json().await.unwrap();
    let request_id = whole["id"].as_str().unwrap().strip_prefix("chatcmpl-").unwrap().to_owned();

    // The same answer through the native SSE resume, from the start.
    let res = http().get(backend.url(&format!("/api/chat/{request_id}/events"))).send().await.unwrap();
    let body = tokio::time::timeout(EVENT_WAIT, res.text()).await.unwrap().unwrap();
    let events: Vec<Event> = parse_sse(&body).iter().map(|e| Event::from_json(&e.data).unwrap()).collect();
    let text = assert_complete(&events, 1);
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(events.last().unwrap().usage.map(|u| u.completion_tokens), whole["usage"]["completion_tokens"].as_u64());

    // The `user` field names the session when no header does; the node keeps
    // its history, so the second turn's prompt counts the first.
    let res = post(&backend, json!({"model": "chat", "messages": user("first"), "user": session})).await;
    let second: Value = res.json().await.unwrap();
    assert!(
        second["usage"]["prompt_tokens"].as_u64().unwrap() > whole["usage"]["prompt_tokens"].as_u64().unwrap(),
        "the history is part of the prompt: {second} vs {whole}"
    );
}

#[tokio::test]
async fn a_dropped_v1_stream_resumes_by_its_id_on_another_backend() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let first = Backend::start(&redis, &[&node]).await;
    let second = Backend::start(&redis, &[&node]).await;
    first.wait_healthy_nodes(1).await;

    let body = json!({"model": "chat", "messages": user("a long one"), "stream": true});
    let mut res = post(&first, body).await;
    assert_eq!(res.status(), 200);
    // Read until a few content chunks have come, then drop the connection.
    let mut seen = String::new();
    while parse_sse(&seen).iter().filter(|e| e.id.is_some()).count() < 4 {
        let piece = tokio::time::timeout(EVENT_WAIT, res.chunk()).await.unwrap().unwrap().expect("more body");
        seen.push_str(std::str::from_utf8(&piece).unwrap());
    }
    drop(res);
    // Only whole events count as received (the last block may be cut).
    let complete = &seen[..seen.rfind("\n\n").unwrap() + 2];
    let before = parse_sse(complete);
    let (head, chunks) = contents(&before, 1);
    let completion_id = chunks[0]["id"].as_str().unwrap().to_owned();
    let last_id = before.iter().filter_map(|e| e.id.as_ref()).next_back().unwrap().clone();

    let res = http()
        .get(second.url(&format!("/v1/chat/completions/{completion_id}/events")))
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rest_body = tokio::time::timeout(STREAM_WAIT, res.text()).await.unwrap().unwrap();
    let rest = parse_sse(&rest_body);
    assert_eq!(rest.last().unwrap().data, "[DONE]", "{rest_body}");
    let (tail, rest_chunks) = contents(&rest, last_id.parse::<u64>().unwrap() + 1);
    assert!(rest_chunks.iter().all(|c| c["id"] == completion_id.as_str()));
    assert!(rest_chunks[0]["choices"][0]["delta"].get("role").is_none(), "no second role chunk on a resume");

    let request_id = completion_id.strip_prefix("chatcmpl-").unwrap();
    let res = http().get(second.url(&format!("/api/chat/{request_id}/events"))).send().await.unwrap();
    let all: Vec<Event> =
        parse_sse(&res.text().await.unwrap()).iter().map(|e| Event::from_json(&e.data).unwrap()).collect();
    assert_eq!(format!("{head}{tail}"), assert_complete(&all, 1), "nothing lost, nothing repeated");
}

#[tokio::test]
async fn bad_v1_requests_get_openai_errors_and_models_are_listed() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let models: Value = http().get(backend.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "chat", "{models}");
    let one = http().get(backend.url("/v1/models/chat")).send().await.unwrap();
    assert_eq!(one.status(), 200);

    async fn openai_error(res: reqwest::Response, status: u16) -> Value {
        assert_eq!(res.status(), status);
        let body: Value = res.json().await.unwrap();
        let e = &body["error"];
        assert!(e["message"].is_string() && e["type"].is_string() && e["code"].is_string(), "{body}");
        assert!(e.get("param").is_some(), "param is present, maybe null: {body}");
        e.clone()
    }
    let unknown_model = post(&backend, json!({"model": "gpt-9", "messages": user("x")})).await;
    let e = openai_error(unknown_model, 404).await;
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("model_not_found"), Some("model")));
    let cases = [
        json!({"model": "chat", "messages": []}),
        json!({"model": "chat", "messages": [{"role": "assistant", "content": "hi"}]}),
        json!({"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        json!({"model": "chat", "messages": user("x"), "n": 2}),
        json!({"model": "chat", "messages": user("")}),
        json!({"model": "chat", "messages": user("x"), "user": "no spaces allowed"}),
        json!({"model": "chat"}),
        json!({"model": 7, "messages": user("x")}),
    ];
    for body in cases {
        let e = openai_error(post(&backend, body.clone()).await, 400).await;
        assert_eq!(e["type"], "invalid_request_error", "{body}: {e}");
    }
    let not_json = http()
        .post(backend.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    openai_error(not_json, 400).await;
    openai_error(http().get(backend.url("/v1/embeddings")).send().await.unwrap(), 404).await;
    openai_error(http().get(backend.url("/v1/models/gpt-9")).send().await.unwrap(), 404).await;
    let gone = http().get(backend.url("/v1/chat/completions/chatcmpl-r-nothing/events")).send().await.unwrap();
    openai_error(gone, 404).await;
    // None of it started an answer.
    assert_eq!(metric(&backend, "backend_chat_requests_total{outcome=\"accepted\"}").await, 0);
}
