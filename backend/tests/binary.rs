//! The `backend` binary itself: its configuration check, and the health,
//! node-health and metrics endpoints an operator looks at.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// This crate's own binary, built by cargo for these tests.
const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_backend");

#[test]
fn check_config_accepts_a_valid_file_and_names_a_misspelt_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[ai]\nurls = [\"http://127.0.0.1:8000\"]\n[stream]\nstall_timeout_ms = 1500\n").unwrap();
    let ok = Command::new(BACKEND_BIN).arg("--config").arg(&good).arg("--check-config").output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let bad = dir.path().join("typo.toml");
    std::fs::write(&bad, "[limits]\nmax_body_bytez = 10\n").unwrap();
    let out = Command::new(BACKEND_BIN).arg("--config").arg(&bad).arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "an invalid configuration exits with 64");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.toml") && stderr.contains("max_body_bytez"), "{stderr}");

    let env_bad = Command::new(BACKEND_BIN)
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .env("LISTEN_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(env_bad.status.code(), Some(64), "the environment is checked too");
}

#[tokio::test]
async fn health_ai_health_and_metrics_answer_in_their_documented_shapes() {
    let redis = redis_url();
    let mut node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let res = http().get(backend.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-backend-id"], backend.backend_id.as_str());
    let health: Value = res.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["backend_id"], backend.backend_id.as_str(), "{health}");

    let ai = backend.ai_health().await;
    assert_eq!(ai["total_nodes"], 1, "{ai}");
    assert_eq!(ai["healthy_nodes"], 1, "{ai}");
    assert_eq!(ai["nodes"][0]["url"], node.url.as_str(), "{ai}");
    assert_eq!(ai["nodes"][0]["status"], "healthy", "{ai}");

    let accepted = backend.chat(&unique("s"), "count me").await;
    assert_eq!(accepted.node, node.url);
    let metrics = http().get(backend.metrics_url()).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("# TYPE "), "Prometheus text format: {text}");

    node.kill();
    let noticed = eventually(Duration::from_secs(10), || async {
        let ai = backend.ai_health().await;
        ai["healthy_nodes"] == 0 && ai["nodes"][0]["status"] == "unhealthy"
    })
    .await;
    assert!(noticed, "a dead node turns unhealthy: {}", backend.ai_health().await);
}
