//! OpenAI's official Python SDK (`openai` from PyPI), unchanged, pointed at
//! the proxy: it streams an answer with usage, reads one whole, lists the
//! models and raises its own `NotFoundError` for an unknown model. The
//! Python comes from `OPENAI_PYTHON` (set by `scripts/test.sh`, see
//! `ensure_openai_sdk` in `scripts/setup.sh`).

mod common;

use chat_wire::Event;
use common::*;
use serde_json::Value;
use std::process::Command;

const CLIENT: &str = r#"
import json, sys
from openai import OpenAI, NotFoundError
client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=30)
stream = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "hello from the sdk"}],
    stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-Id": sys.argv[2]})
text, finish, usage, ids = "", None, None, set()
for chunk in stream:
    ids.add(chunk.id)
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.model_dump()
whole = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "and again"}])
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    missing = "no error"
except NotFoundError as e:
    missing = e.body.get("code") if isinstance(e.body, dict) else str(e.body)
print(json.dumps({
    "text": text, "finish": finish, "usage": usage, "ids": sorted(ids),
    "whole": whole.choices[0].message.content, "whole_usage": whole.usage.model_dump(),
    "models": [m.id for m in client.models.list()], "missing": missing,
}))
"#;

fn python() -> String {
    let python = std::env::var("OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_sdk = Command::new(&python).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    assert!(has_sdk, "{python} has no `openai` package: run scripts/test.sh, or set OPENAI_PYTHON to a Python with it");
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openais_python_sdk_streams_an_answer_through_the_proxy() {
    let python = python();
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let first = Backend::start(&redis, &[&node]).await;
    let second = Backend::start(&redis, &[&node]).await;
    first.wait_healthy_nodes(1).await;
    second.wait_healthy_nodes(1).await;
    let proxy = EdgeProxy::start(&[&first, &second]).await;
    let session = unique("s-sdk");

    let base_url = proxy.url("/v1");
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).args(["-c", CLIENT, &base_url, &session]).output())
            .await
            .unwrap()
            .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK client failed:\n{stderr}");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));

    assert_eq!(got["finish"], "stop", "{got}");
    assert_eq!(got["ids"].as_array().unwrap().len(), 1, "one completion id: {got}");
    assert_eq!(got["usage"]["completion_tokens"], Pace::QUICK.events() - 1, "{got}");
    assert!(got["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{got}");
    assert!(!got["whole"].as_str().unwrap().is_empty(), "{got}");
    assert_eq!(got["whole_usage"]["completion_tokens"], Pace::QUICK.events() - 1, "{got}");
    assert_eq!(got["models"], serde_json::json!(["chat"]));
    assert_eq!(got["missing"], "model_not_found", "{got}");

    // What the SDK put together is the stored answer, whole and in order.
    let id = got["ids"][0].as_str().unwrap();
    let request_id = id.strip_prefix("chatcmpl-").unwrap();
    let body = http().get(proxy.url(&format!("/api/chat/{request_id}/events"))).send().await.unwrap();
    let events: Vec<Event> = body
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| Event::from_json(d).unwrap())
        .collect();
    assert_eq!(assert_complete(&events, 1), got["text"].as_str().unwrap());
}
