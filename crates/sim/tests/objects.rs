//! The objects each instance holds: stored Responses and their chains, conversations, files,
//! batches and threads, known to the instance that created them and to no other.

use std::time::Duration;

use aoai_sim::{ObjectKind, SimConfig, SimHandle};
use serde_json::{Value, json};

const API: &str = "api-version=2025-04-01-preview";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

async fn instances() -> (SimHandle, SimHandle) {
    (
        aoai_sim::start(SimConfig::new("eastus")).await,
        aoai_sim::start(SimConfig::new("westus")).await,
    )
}

fn url(sim: &SimHandle, path: &str) -> String {
    format!("{}{path}", sim.url())
}

/// Status and JSON body.
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    answer(client().post(url).json(body).send().await.expect("send")).await
}

async fn get(url: &str) -> (u16, Value) {
    answer(client().get(url).send().await.expect("send")).await
}

async fn delete(url: &str) -> (u16, Value) {
    answer(client().delete(url).send().await.expect("send")).await
}

fn reply_text(response: &Value) -> &str {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .expect("output text")
}

/// The answer to a successful `DELETE`, exactly.
fn deleted(id: &str, object: &str) -> (u16, Value) {
    (200, json!({"id": id, "object": object, "deleted": true}))
}

/// Azure's 404 for a response, exactly.
fn response_not_found(id: &str) -> Value {
    json!({"error": {
        "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error",
        "param": null,
        "code": null,
    }})
}

// ---- Responses ----

#[tokio::test]
async fn five_turns_follow_one_chain_on_one_instance() {
    let (sim, _) = instances().await;
    let responses = url(&sim, "/openai/v1/responses");
    let (status, first) = post(&responses, &json!({"model": "gpt-4o", "input": "turn 1"})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["previous_response_id"], Value::Null);
    assert_eq!(first["store"], true);
    assert!(!reply_text(&first).contains("turn"), "{first}");
    let mut previous = first["id"].as_str().unwrap().to_owned();
    for turn in 2..=5 {
        let request = json!({
            "model": "gpt-4o",
            "input": format!("turn {turn}"),
            "previous_response_id": previous,
        });
        let (status, body) = post(&responses, &request).await;
        assert_eq!(status, 200, "turn {turn}: {body}");
        assert_eq!(body["previous_response_id"], previous.as_str());
        assert!(
            reply_text(&body).starts_with(&format!("Hello from eastus (turn {turn})")),
            "{body}"
        );
        previous = body["id"].as_str().unwrap().to_owned();
    }
    assert_eq!(sim.object_count(ObjectKind::Response), 5);

    // The last response's input items: the five inputs and the four earlier answers.
    let items = format!("/openai/v1/responses/{previous}/input_items");
    let (status, newest_first) = get(&url(&sim, &items)).await;
    assert_eq!(status, 200, "{newest_first}");
    assert_eq!(newest_first["object"], "list");
    assert_eq!(newest_first["has_more"], false);
    let data = newest_first["data"].as_array().unwrap();
    assert_eq!(data.len(), 9);
    assert_eq!(data[0]["content"][0]["text"], "turn 5");
    assert_eq!(data[0]["role"], "user");
    assert_eq!(newest_first["first_id"], data[0]["id"]);
    let (_, oldest_first) = get(&url(&sim, &format!("{items}?order=asc&limit=2"))).await;
    let data = oldest_first["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(oldest_first["has_more"], true);
    assert_eq!(data[0]["content"][0]["type"], "input_text");
    assert_eq!(data[0]["content"][0]["text"], "turn 1");
    assert_eq!(data[1]["role"], "assistant");
    assert_eq!(data[1]["content"][0]["type"], "output_text");
}

#[tokio::test]
async fn a_previous_response_on_another_instance_is_not_found() {
    let (a, b) = instances().await;
    let (_, first) = post(
        &url(&a, &format!("/openai/responses?{API}")),
        &json!({"model": "gpt-4o", "input": "Hi"}),
    )
    .await;
    let id = first["id"].as_str().unwrap();
    let follow_up = json!({"model": "gpt-4o", "input": "And?", "previous_response_id": id});
    for path in [
        format!("/openai/responses?{API}"),
        "/openai/v1/responses".to_owned(),
    ] {
        let (status, body) = post(&url(&b, &path), &follow_up).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            json!({"error": {
                "message": format!("Previous response with id '{id}' not found."),
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }})
        );
    }
    assert_eq!(b.object_count(ObjectKind::Response), 0);
    let (status, body) = get(&url(&b, &format!("/openai/v1/responses/{id}"))).await;
    assert_eq!((status, body), (404, response_not_found(id)));
    // The instance that holds it continues the chain.
    let (status, body) = post(&url(&a, "/openai/v1/responses"), &follow_up).await;
    assert_eq!(status, 200, "{body}");
    assert!(reply_text(&body).contains("(turn 2)"), "{body}");
}

// ---- Conversations ----

#[tokio::test]
async fn a_conversation_holds_its_responses_turns_on_its_instance_only() {
    let (sim, other) = instances().await;
    let (status, conversation) = post(
        &url(&sim, "/openai/v1/conversations"),
        &json!({"items": [{"type": "message", "role": "user", "content": "Before"}]}),
    )
    .await;
    assert_eq!(status, 200, "{conversation}");
    assert_eq!(conversation["object"], "conversation");
    let id = conversation["id"].as_str().unwrap();
    assert!(id.starts_with("conv_"), "{id}");
    assert_eq!(sim.object_count(ObjectKind::Conversation), 1);

    for turn in 1..=3 {
        // Named by its id, or as `{"id": ...}`, as the SDKs allow.
        let named = if turn == 2 {
            json!({"id": id})
        } else {
            json!(id)
        };
        let request =
            json!({"model": "gpt-4o", "input": format!("turn {turn}"), "conversation": named});
        let (status, body) = post(&url(&sim, "/openai/v1/responses"), &request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["conversation"]["id"], id);
        assert!(
            reply_text(&body).starts_with(&format!("Hello from eastus (turn {turn})")),
            "{body}"
        );
    }
    let (status, items) = get(&url(
        &sim,
        &format!("/openai/v1/conversations/{id}/items?order=asc"),
    ))
    .await;
    assert_eq!(status, 200, "{items}");
    let data = items["data"].as_array().unwrap();
    assert_eq!(
        data.len(),
        7,
        "the first item, then three inputs and three answers"
    );
    assert_eq!(data[0]["content"][0]["text"], "Before");
    assert_eq!(data[5]["content"][0]["text"], "turn 3");
    assert_eq!(data[6]["role"], "assistant");

    // Another instance does not know it.
    let request = json!({"model": "gpt-4o", "input": "Hi", "conversation": id});
    let (status, body) = post(&url(&other, "/openai/v1/responses"), &request).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["error"]["message"],
        format!("Conversation with id '{id}' not found.")
    );
    let (status, _) = get(&url(&other, &format!("/openai/v1/conversations/{id}"))).await;
    assert_eq!(status, 404);
    assert_eq!(other.object_count(ObjectKind::Response), 0);

    // Not with a previous response as well.
    let request = json!({"model": "gpt-4o", "input": "Hi", "conversation": id, "previous_response_id": "resp_1"});
    let (status, body) = post(&url(&sim, "/openai/v1/responses"), &request).await;
    assert_eq!(status, 400, "{body}");

    let (status, added) = post(
        &url(&sim, &format!("/openai/v1/conversations/{id}/items")),
        &json!({"items": [{"type": "message", "role": "user", "content": "Added"}]}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    assert_eq!(added["data"][0]["content"][0]["text"], "Added");
    let (status, read) = get(&url(&sim, &format!("/openai/v1/conversations/{id}"))).await;
    assert_eq!((status, &read["id"]), (200, &json!(id)));
    let (status, deleted) = delete(&url(&sim, &format!("/openai/v1/conversations/{id}"))).await;
    assert_eq!(status, 200);
    assert_eq!(deleted["deleted"], true);
    let (status, _) = get(&url(&sim, &format!("/openai/v1/conversations/{id}"))).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_stored_response_is_read_cancelled_and_deleted() {
    let (sim, _) = instances().await;
    let (_, created) = post(
        &url(&sim, "/openai/v1/responses"),
        &json!({"model": "gpt-4o", "input": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    for prefix in [
        format!("/openai/responses/{id}"),
        format!("/openai/v1/responses/{id}"),
    ] {
        let (status, read) = get(&url(&sim, &format!("{prefix}?{API}"))).await;
        assert_eq!((status, &read), (200, &created));
        let (status, cancelled) = post(&url(&sim, &format!("{prefix}/cancel")), &json!({})).await;
        assert_eq!((status, &cancelled), (200, &created));
    }
    let (_, items) = get(&url(
        &sim,
        &format!("/openai/v1/responses/{id}/input_items"),
    ))
    .await;
    let item = &items["data"][0];
    assert_eq!(item["type"], "message");
    assert!(item["id"].as_str().unwrap().starts_with("msg_"), "{item}");
    assert_eq!(
        item["content"],
        json!([{"type": "input_text", "text": "Hi"}])
    );

    let path = url(&sim, &format!("/openai/v1/responses/{id}"));
    assert_eq!(delete(&path).await, deleted(id, "response"));
    assert_eq!(get(&path).await, (404, response_not_found(id)));
    assert_eq!(delete(&path).await, (404, response_not_found(id)));
    let (status, body) = get(&format!("{path}/input_items")).await;
    assert_eq!((status, body), (404, response_not_found(id)));
    let (status, body) = post(&format!("{path}/cancel"), &json!({})).await;
    assert_eq!((status, body), (404, response_not_found(id)));
    // Deleted, but it was created.
    assert_eq!(sim.object_count(ObjectKind::Response), 1);
}

#[tokio::test]
async fn store_false_keeps_nothing() {
    let (sim, _) = instances().await;
    let (status, body) = post(
        &url(&sim, "/openai/v1/responses"),
        &json!({"model": "gpt-4o", "input": "Hi", "store": false}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["store"], false);
    let id = body["id"].as_str().unwrap();
    let (status, _) = get(&url(&sim, &format!("/openai/v1/responses/{id}"))).await;
    assert_eq!(status, 404);
    assert_eq!(sim.object_count(ObjectKind::Response), 0);
}

#[tokio::test]
async fn a_streamed_response_is_stored_too() {
    let (sim, _) = instances().await;
    let response = client()
        .post(url(&sim, "/openai/v1/responses"))
        .json(&json!({"model": "gpt-4o", "input": "Hi", "stream": true}))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let completed = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .find(|event| event["type"] == "response.completed")
        .expect("response.completed");
    let id = completed["response"]["id"].as_str().unwrap();
    let (status, stored) = get(&url(&sim, &format!("/openai/v1/responses/{id}"))).await;
    assert_eq!((status, &stored), (200, &completed["response"]));
}

// ---- files and batches ----

const BOUNDARY: &str = "aoai-sim-test-boundary";

/// A `multipart/form-data` upload of `content` as `filename`, for `purpose`.
async fn upload(
    sim: &SimHandle,
    path: &str,
    purpose: &str,
    filename: &str,
    content: &str,
) -> (u16, Value) {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
    );
    let response = client()
        .post(url(sim, path))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .expect("send");
    answer(response).await
}

const BATCH_INPUT: &str = concat!(
    r#"{"custom_id":"task-0","method":"POST","url":"/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}}"#,
    "\n",
    r#"{"custom_id":"task-1","method":"POST","url":"/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"Bye"}]}}"#,
    "\n",
);

fn file_not_found(id: &str) -> Value {
    json!({"error": {"code": "notFound", "message": format!("File with id '{id}' not found.")}})
}

#[tokio::test]
async fn a_file_uploaded_then_used_by_a_batch() {
    let (sim, _) = instances().await;
    let (status, file) = upload(
        &sim,
        &format!("/openai/files?{API}"),
        "batch",
        "in.jsonl",
        BATCH_INPUT,
    )
    .await;
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap();
    assert!(file_id.starts_with("file-"), "{file}");
    assert_eq!(
        file,
        json!({
            "id": file_id,
            "object": "file",
            "bytes": BATCH_INPUT.len(),
            "created_at": file["created_at"],
            "filename": "in.jsonl",
            "purpose": "batch",
            "status": "processed",
        })
    );
    assert!(file["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        get(&url(&sim, &format!("/openai/v1/files/{file_id}"))).await,
        (200, file.clone())
    );
    let content = client()
        .get(url(&sim, &format!("/openai/files/{file_id}/content?{API}")))
        .send()
        .await
        .unwrap();
    assert_eq!(content.status(), 200);
    assert_eq!(content.text().await.unwrap(), BATCH_INPUT);
    let (_, list) = get(&url(&sim, &format!("/openai/files?{API}"))).await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"], json!([file]));

    let (status, batch) = post(
        &url(&sim, &format!("/openai/batches?{API}")),
        &json!({"input_file_id": file_id, "endpoint": "/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let batch_id = batch["id"].as_str().unwrap();
    assert!(batch_id.starts_with("batch_"), "{batch}");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["input_file_id"], file_id);
    assert_eq!(batch["output_file_id"], Value::Null);

    let (status, done) = get(&url(&sim, &format!("/openai/v1/batches/{batch_id}"))).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    let output_id = done["output_file_id"].as_str().unwrap();
    let output = client()
        .get(url(&sim, &format!("/openai/v1/files/{output_id}/content")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["custom_id"], "task-1");
    assert_eq!(lines[1]["response"]["status_code"], 200);
    assert_eq!(
        lines[1]["response"]["body"]["choices"][0]["message"]["content"],
        "Hello from eastus lorem ipsum"
    );
    let (_, batches) = get(&url(&sim, "/openai/v1/batches")).await;
    assert_eq!(batches["data"], json!([done]));

    // Exactly one of each was created by a request; the output file is the instance's own.
    assert_eq!(sim.object_count(ObjectKind::File), 1);
    assert_eq!(sim.object_count(ObjectKind::Batch), 1);

    let path = url(&sim, &format!("/openai/files/{file_id}?{API}"));
    assert_eq!(delete(&path).await, deleted(file_id, "file"));
    assert_eq!(get(&path).await, (404, file_not_found(file_id)));
}

#[tokio::test]
async fn a_batch_over_a_file_of_another_instance_is_refused() {
    let (a, b) = instances().await;
    let (_, file) = upload(&a, "/openai/v1/files", "batch", "in.jsonl", BATCH_INPUT).await;
    let file_id = file["id"].as_str().unwrap();
    let request = json!({"input_file_id": file_id, "endpoint": "/chat/completions", "completion_window": "24h"});
    let (status, body) = post(&url(&b, &format!("/openai/batches?{API}")), &request).await;
    assert_eq!((status, body), (404, file_not_found(file_id)));
    assert_eq!(b.object_count(ObjectKind::Batch), 0);
    let (status, body) = get(&url(&b, &format!("/openai/files/{file_id}/content?{API}"))).await;
    assert_eq!((status, body), (404, file_not_found(file_id)));
    let (status, body) = get(&url(&b, "/openai/v1/batches/batch_unknown")).await;
    assert_eq!(
        (status, body),
        (
            404,
            json!({"error": {"code": "notFound", "message": "Batch with id 'batch_unknown' not found."}})
        )
    );
    let (status, body) = post(
        &url(&a, "/openai/v1/batches"),
        &json!({"input_file_id": file_id}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalidPayload");
}

#[tokio::test]
async fn a_cancelled_batch_is_cancelled() {
    let (sim, _) = instances().await;
    let (_, file) = upload(&sim, "/openai/v1/files", "batch", "in.jsonl", BATCH_INPUT).await;
    let (_, batch) = post(
        &url(&sim, "/openai/v1/batches"),
        &json!({"input_file_id": file["id"], "endpoint": "/chat/completions", "completion_window": "24h"}),
    )
    .await;
    let id = batch["id"].as_str().unwrap();
    let (status, cancelling) = post(
        &url(&sim, &format!("/openai/v1/batches/{id}/cancel")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(cancelling["status"], "cancelling");
    let (_, cancelled) = get(&url(&sim, &format!("/openai/v1/batches/{id}"))).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["output_file_id"], Value::Null);
}

#[tokio::test]
async fn an_upload_that_is_not_multipart_is_refused() {
    let (sim, _) = instances().await;
    let (status, body) = post(&url(&sim, "/openai/v1/files"), &json!({"purpose": "batch"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalidPayload");
    assert_eq!(sim.object_count(ObjectKind::File), 0);
}

// ---- threads ----

fn thread_not_found(id: &str) -> Value {
    json!({"error": {
        "message": format!("No thread found with id '{id}'."),
        "type": "invalid_request_error",
        "param": null,
        "code": null,
    }})
}

#[tokio::test]
async fn threads_hold_messages_and_runs() {
    let (a, b) = instances().await;
    let (status, thread) = post(
        &url(&a, &format!("/openai/threads?{API}")),
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{thread}");
    let id = thread["id"].as_str().unwrap();
    assert!(id.starts_with("thread_"), "{thread}");
    assert_eq!(thread["object"], "thread");
    let thread_path = format!("/openai/threads/{id}?{API}");
    assert_eq!(get(&url(&a, &thread_path)).await, (200, thread.clone()));

    let (status, message) = post(
        &url(&a, &format!("/openai/threads/{id}/messages?{API}")),
        &json!({"role": "user", "content": "What is up?"}),
    )
    .await;
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["object"], "thread.message");
    assert_eq!(message["thread_id"], id);
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": {"value": "What is up?", "annotations": []}}])
    );

    let (status, run) = post(
        &url(&a, &format!("/openai/threads/{id}/runs?{API}")),
        &json!({"assistant_id": "asst_abc"}),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    let run_id = run["id"].as_str().unwrap();
    assert!(run_id.starts_with("run_"), "{run}");
    assert_eq!(run["object"], "thread.run");
    assert_eq!(run["status"], "completed");
    let run_path = format!("/openai/threads/{id}/runs/{run_id}?{API}");
    assert_eq!(get(&url(&a, &run_path)).await, (200, run.clone()));

    let (_, messages) = get(&url(&a, &format!("/openai/v1/threads/{id}/messages"))).await;
    let data = messages["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["role"], "assistant");
    assert_eq!(data[0]["run_id"], run_id);
    assert_eq!(
        data[0]["content"][0]["text"]["value"],
        "Hello from eastus lorem ipsum"
    );
    assert_eq!(data[2]["content"][0]["text"]["value"], "Hi");

    assert_eq!(a.object_count(ObjectKind::Thread), 1);
    assert_eq!(a.object_count(ObjectKind::Message), 2);
    assert_eq!(a.object_count(ObjectKind::Run), 1);

    // The other instance knows none of it.
    assert_eq!(
        get(&url(&b, &thread_path)).await,
        (404, thread_not_found(id))
    );
    assert_eq!(get(&url(&b, &run_path)).await, (404, thread_not_found(id)));
    let (status, body) = post(
        &url(&b, &format!("/openai/threads/{id}/messages?{API}")),
        &json!({"role": "user", "content": "Hello?"}),
    )
    .await;
    assert_eq!((status, body), (404, thread_not_found(id)));
    assert_eq!(b.object_count(ObjectKind::Message), 0);
    let unknown_run = format!("/openai/threads/{id}/runs/run_unknown?{API}");
    assert_eq!(
        get(&url(&a, &unknown_run)).await,
        (
            404,
            json!({"error": {
                "message": "No run found with id 'run_unknown'.",
                "type": "invalid_request_error",
                "param": null,
                "code": null,
            }})
        )
    );

    assert_eq!(
        delete(&url(&a, &thread_path)).await,
        deleted(id, "thread.deleted")
    );
    assert_eq!(
        get(&url(&a, &thread_path)).await,
        (404, thread_not_found(id))
    );
}

#[tokio::test]
async fn a_run_needs_an_assistant_and_a_message_a_role() {
    let (sim, _) = instances().await;
    let (_, thread) = post(&url(&sim, "/openai/v1/threads"), &json!({})).await;
    let id = thread["id"].as_str().unwrap();
    let (status, body) = post(
        &url(&sim, &format!("/openai/v1/threads/{id}/runs")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "assistant_id");
    let (status, body) = post(
        &url(&sim, &format!("/openai/v1/threads/{id}/messages")),
        &json!({"content": "Hi"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "role");
    assert_eq!(sim.object_count(ObjectKind::Run), 0);
    assert_eq!(sim.object_count(ObjectKind::Message), 0);
}
