//! The real `ai-node` binary: configuration checks and a served request.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ai-node");

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_misspelt_key() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/ai-node.toml");
    let ok = Command::new(BIN).args(["--config", shipped, "--check-config"]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("typo.toml");
    std::fs::write(&bad, "[engine]\nkind = \"synthetic\"\n[engine.synthetic]\nanswer_tokenz = 3\n").unwrap();
    let out = Command::new(BIN).args(["--config", bad.to_str().unwrap(), "--check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.toml") && stderr.contains("answer_tokenz"), "{stderr}");

    let env_bad = Command::new(BIN).args(["--check-config"]).env("LISTEN_ADDR", "not-an-address").output().unwrap();
    assert_eq!(env_bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&env_bad.stderr).contains("server.listen_addr"));
}

#[tokio::test]
async fn the_binary_serves_a_chat_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["--config", concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/ai-node.toml")])
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", redis_url())
        .env("NODE_ID", "ai-bin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{port}/health");
    let up = eventually(Duration::from_secs(10), || {
        let health = health.clone();
        async move { http().get(&health).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    assert!(up, "the node came up");
    let session = unique("s");
    let mut sub = Subscriber::session(&redis_url(), &session).await;
    let res: Value = http()
        .post(format!("http://127.0.0.1:{port}/chat"))
        .json(&json!({"session_id": session, "message": "from a real process"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(res["node"], "ai-bin");
    let events = sub.until_end(res["request_id"].as_str().unwrap()).await;
    assert_eq!(events.len(), 41, "40 pieces and done, as conf/ai-node.toml says");

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit after SIGTERM: {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
