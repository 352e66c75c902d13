//! Server-sent events: Azure's sequence, pacing, and the chunk gate.

use std::time::{Duration, Instant};

use aoai_sim::SimConfig;
use serde_json::{Value, json};

use crate::support::{Event, SseReader, assert_same_shape, chat_url, fixture, header, post, url};

fn streaming(mut request: Value) -> Value {
    request["stream"] = json!(true);
    request
}

fn hello_stream() -> Value {
    streaming(crate::support::hello())
}

async fn stream_events(url: &str, request: &Value) -> Vec<Event> {
    let response = post(url, request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    SseReader::new(response).rest().await
}

/// The content of every content chunk of a chat stream.
fn contents(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| {
            let chunk = e.json();
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn chat_stream_follows_azures_sequence() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let events = stream_events(&chat_url(&sim), &hello_stream()).await;

    // prompt filter results, role, 5 content chunks, finish, [DONE]
    assert_eq!(events.len(), 9, "{events:#?}");
    assert!(events.iter().all(|e| e.event.is_none()));
    assert_same_shape(&events[0].json(), &fixture("chat_chunk_prompt_filter.json"));
    assert_same_shape(&events[1].json(), &fixture("chat_chunk_role.json"));
    for event in &events[2..7] {
        assert_same_shape(&event.json(), &fixture("chat_chunk_content.json"));
    }
    let finish = events[7].json();
    assert_same_shape(&finish, &fixture("chat_chunk_finish.json"));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[8].data, "[DONE]");

    assert_eq!(contents(&events).concat(), "Hello from eastus lorem ipsum");
    let ids: Vec<Value> = events[1..8]
        .iter()
        .map(|e| e.json()["id"].clone())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert!(ids[0].as_str().unwrap().starts_with("chatcmpl-"));
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_before_done() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let mut request = hello_stream();
    request["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&chat_url(&sim), &request).await;
    assert_eq!(events.len(), 10);
    for event in &events[1..8] {
        assert_eq!(event.json()["usage"], Value::Null);
    }
    let usage = events[8].json();
    assert_same_shape(&usage, &fixture("chat_chunk_usage.json"));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(events[9].data, "[DONE]");
}

#[tokio::test]
async fn max_tokens_sets_the_number_of_content_chunks() {
    let sim = aoai_sim::start(SimConfig::new("eastus").reply_tokens(50)).await;
    let mut request = hello_stream();
    request["max_tokens"] = json!(12);
    let events = stream_events(&chat_url(&sim), &request).await;
    let contents = contents(&events);
    assert_eq!(contents.len(), 12);
    assert!(contents.concat().starts_with("Hello from eastus lorem"));
    let finish = events[events.len() - 2].json();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_is_paced_by_time_to_first_token_and_chunk_delay() {
    let config = SimConfig::new("eastus")
        .time_to_first_token(Duration::from_millis(150))
        .chunk_delay(Duration::from_millis(40));
    let sim = aoai_sim::start(config).await;
    let started = Instant::now();
    let response = post(&chat_url(&sim), &hello_stream()).await;
    let mut reader = SseReader::new(response);
    let prompt_filter = reader.next().await.unwrap();
    assert!(prompt_filter.json()["prompt_filter_results"].is_array());
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "headers wait for nothing"
    );
    reader.next().await.unwrap(); // role
    reader.next().await.unwrap(); // first content chunk
    assert!(started.elapsed() >= Duration::from_millis(150));
    let rest = reader.rest().await;
    assert_eq!(rest.last().unwrap().data, "[DONE]");
    assert!(started.elapsed() >= Duration::from_millis(150 + 4 * 40));

    // Not streamed, the same tokens take the same time.
    let started = Instant::now();
    let response = post(&chat_url(&sim), &crate::support::hello()).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150 + 4 * 40));
}

#[tokio::test]
async fn held_chunks_come_out_one_release_at_a_time() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.hold_chunks();
    let response = post(&chat_url(&sim), &hello_stream()).await;
    let mut reader = SseReader::new(response);
    let quiet = Duration::from_millis(100);

    // The prompt filter, role and first content chunks are not held.
    reader.next().await.unwrap();
    reader.next().await.unwrap();
    let first = reader.next().await.unwrap();
    assert_eq!(first.json()["choices"][0]["delta"]["content"], "Hello");
    assert!(
        tokio::time::timeout(quiet, reader.next()).await.is_err(),
        "the second content chunk waits for a release"
    );

    sim.release_chunk();
    let second = reader.next().await.unwrap();
    assert_eq!(second.json()["choices"][0]["delta"]["content"], " from");
    assert!(tokio::time::timeout(quiet, reader.next()).await.is_err());

    // Releases given ahead are kept; finish and [DONE] are not held.
    sim.release_chunk();
    sim.release_chunk();
    sim.release_chunk();
    let rest = reader.rest().await;
    assert_eq!(contents(&rest).concat(), " eastus lorem ipsum");
    assert_eq!(rest.last().unwrap().data, "[DONE]");
}

#[tokio::test]
async fn legacy_completions_stream_too() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let path = "/openai/deployments/instruct/completions?api-version=2024-10-21";
    let request = json!({"prompt": "Say hello", "stream": true});
    let events = stream_events(&url(&sim, path), &request).await;
    assert_eq!(events.len(), 8);
    assert_same_shape(&events[0].json(), &fixture("chat_chunk_prompt_filter.json"));
    let text: String = events[1..6]
        .iter()
        .map(|e| {
            let chunk = e.json();
            assert_eq!(chunk["object"], "text_completion");
            chunk["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "Hello from eastus lorem ipsum");
    assert_eq!(events[6].json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[7].data, "[DONE]");
}

#[tokio::test]
async fn responses_stream_sends_the_responses_api_events() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let request = json!({"model": "gpt-4o", "input": "Say hello", "stream": true});
    let events = stream_events(&url(&sim, "/openai/v1/responses"), &request).await;
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_deref().expect("named events"))
        .collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 5]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    for (i, event) in events.iter().enumerate() {
        let data = event.json();
        assert_eq!(data["type"], event.event.as_deref().unwrap());
        assert_eq!(data["sequence_number"], i);
    }
    let deltas: String = events[4..9]
        .iter()
        .map(|e| e.json()["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deltas, "Hello from eastus lorem ipsum");
    let completed = events.last().unwrap().json();
    assert_same_shape(&completed["response"], &fixture("responses.json"));
    assert_eq!(
        completed["response"]["output"][0]["content"][0]["text"],
        deltas
    );
}
