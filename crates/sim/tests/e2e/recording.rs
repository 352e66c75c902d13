//! Everything received is recorded, in order, before faults and credential checks.

use aoai_sim::{Fault, SimConfig};
use bytes::Bytes;
use http::Method;
use serde_json::json;

use crate::support::{chat_url, client, hello, post, url};

#[tokio::test]
async fn requests_are_recorded_whole_and_in_order() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::InternalError);
    client()
        .post(chat_url(&sim))
        .header("x-ms-client-request-id", "abc")
        .json(&hello())
        .send()
        .await
        .unwrap();
    post(&url(&sim, "/openai/v1/embeddings"), &json!({"input": "x"})).await;
    client()
        .get(url(&sim, "/unknown?a=1"))
        .send()
        .await
        .unwrap();

    assert_eq!(sim.request_count(), 3);
    let recorded = sim.requests();
    let first = &recorded[0];
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(first.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(first.header("x-ms-client-request-id"), Some("abc"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.json(), Some(hello()));

    assert_eq!(recorded[1].path, "/openai/v1/embeddings");
    assert_eq!(recorded[1].query, None);
    assert_eq!(recorded[2].method, Method::GET);
    assert_eq!(recorded[2].path, "/unknown");
    assert_eq!(recorded[2].query.as_deref(), Some("a=1"));
    assert!(recorded[2].body.is_empty());

    sim.clear();
    assert_eq!(sim.request_count(), 0);
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn bodies_of_any_size_are_recorded() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let content = "a".repeat(10 * 1024 * 1024);
    let body = Bytes::from(
        serde_json::to_vec(&json!({"messages": [{"role": "user", "content": content}]})).unwrap(),
    );
    let response = client()
        .post(chat_url(&sim))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = sim.requests();
    assert_eq!(recorded[0].body.len(), body.len());
    assert_eq!(recorded[0].body, body);
}

#[tokio::test]
async fn requests_are_only_counted_when_recording_is_off() {
    let sim = aoai_sim::start(SimConfig::new("eastus").record_requests(false)).await;
    for _ in 0..3 {
        assert_eq!(post(&chat_url(&sim), &hello()).await.status(), 200);
    }
    assert_eq!(sim.request_count(), 3);
    assert!(sim.requests().is_empty());
    sim.clear();
    assert_eq!(sim.request_count(), 0);
}
