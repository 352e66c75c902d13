//! Server-sent events through the gateway: each chunk reaches the caller as the backend emits
//! it, in order, and a backend that breaks off mid-stream gives the caller a broken body rather
//! than a hang or a truncated-but-clean one.

mod support;

use aoai_sim::Fault;
use serde_json::{Value, json};
use support::{BOUND, CHAT, builder_over, client, serve_gateway, served_by, sims, sims_with};

/// Reads `data:` events off a streaming response, each read bounded by [`BOUND`].
struct Events {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Events {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event's data, or `None` at the clean end of the body. Panics when nothing
    /// arrives within the bound: a buffering gateway ends up here.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).unwrap();
                let data = event
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"));
                return Some(data.to_owned());
            }
            let chunk = tokio::time::timeout(BOUND, self.response.chunk())
                .await
                .expect("no SSE chunk within the bound: is the gateway buffering the stream?")
                .expect("the stream broke");
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    assert!(self.buffer.is_empty(), "stream ended mid-event");
                    return None;
                }
            }
        }
    }

    /// The next event, parsed as JSON.
    async fn next_json(&mut self) -> Value {
        let data = self.next().await.expect("the stream ended early");
        serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"))
    }
}

fn streaming_body() -> Value {
    json!({ "messages": [{ "role": "user", "content": "Hello" }], "stream": true })
}

async fn stream(base: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{CHAT}"))
        .json(&streaming_body())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn chunks_reach_the_caller_one_by_one_as_the_backend_emits_them() {
    const TOKENS: usize = 5;
    let sims = sims_with(1, |config| config.reply_tokens(TOKENS as u64)).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    // From now on the emulator sends each content chunk after the first only on release.
    sims[0].hold_chunks();

    let response = stream(&base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut events = Events::new(response);

    // Azure's first chunk: the prompt filter results, no choices.
    let first = events.next_json().await;
    assert_eq!(first["choices"], json!([]));
    assert!(first["prompt_filter_results"].is_array(), "{first}");
    // The role chunk.
    let role = events.next_json().await;
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");

    let mut text = String::new();
    for k in 0..TOKENS {
        if k > 0 {
            // Chunk k-1 is in the caller's hands; only now may chunk k leave the backend. A
            // gateway that buffered would never have delivered chunk k-1, and the read above
            // would have run out of time.
            sims[0].release_chunk();
        }
        let chunk = events.next_json().await;
        let content = chunk["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("content chunk {k} expected: {chunk}"));
        assert!(!content.is_empty());
        assert!(chunk["choices"][0]["finish_reason"].is_null());
        text.push_str(content);
    }
    assert!(text.starts_with("Hello from a"), "{text:?}");

    let finish = events.next_json().await;
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(events.next().await.as_deref(), Some("[DONE]"));
    assert_eq!(events.next().await, None);
    assert_eq!(sims[0].request_count(), 1);
}

#[tokio::test]
async fn the_streamed_bytes_are_exactly_the_backends() {
    // The same request straight to the emulator and through the gateway: the events carry ids
    // and timestamps, so compare their structure with those fields blanked.
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let normalize = |text: &str| -> Vec<Value> {
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap();
                let mut value: Value = serde_json::from_str(data).unwrap_or(json!(data));
                if let Some(object) = value.as_object_mut() {
                    object.remove("id");
                    object.remove("created");
                }
                value
            })
            .collect()
    };

    let direct = client()
        .post(format!("{}{CHAT}", sims[0].url()))
        .json(&streaming_body())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let through = stream(&base).await.text().await.unwrap();
    assert!(through.ends_with("data: [DONE]\n\n"), "{through}");
    assert_eq!(normalize(&through), normalize(&direct));
}

#[tokio::test]
async fn a_backend_closing_mid_stream_breaks_the_callers_body() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    sims[0].push_fault(Fault::DropMidBody);

    let mut response = stream(&base).await;
    // The head was already on its way: nothing to retry, the caller sees the 200.
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");
    let read_all = async {
        let mut received = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(bytes)) => received.extend_from_slice(&bytes),
                Ok(None) => return (received, None),
                Err(error) => return (received, Some(error)),
            }
        }
    };
    let (received, error) = tokio::time::timeout(BOUND, read_all)
        .await
        .expect("the caller hangs after the backend dropped the connection");
    let error = error.unwrap_or_else(|| {
        panic!(
            "the body ended cleanly after {:?}: the caller cannot tell it is cut short",
            String::from_utf8_lossy(&received)
        )
    });
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    // What the backend sent before it broke off did reach the caller.
    let received = String::from_utf8(received).unwrap();
    assert!(received.contains("prompt_filter_results"), "{received:?}");
    assert!(!received.contains("[DONE]"));
    // One attempt, on one backend.
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 0);

    // The gateway is fine afterwards.
    let response = stream(&base).await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_backend_closing_mid_json_breaks_the_callers_body() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    sims[0].push_fault(Fault::DropMidBody);

    let response = client()
        .post(format!("{base}{CHAT}"))
        .json(&json!({ "messages": [{ "role": "user", "content": "Hello" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(BOUND, response.bytes())
        .await
        .expect("the caller hangs after the backend dropped the connection");
    let error = body.expect_err("half a JSON document read as a complete body");
    assert!(error.is_body() || error.is_decode(), "{error:?}");
}
