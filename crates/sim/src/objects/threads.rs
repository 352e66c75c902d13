//! Assistants threads: create, read and delete a thread; add and list its messages; run it.
//!
//! A run completes at once and adds the assistant's reply to the thread. Assistants themselves
//! are not emulated: a run takes any `assistant_id`.

use std::collections::VecDeque;

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Kind, ObjectKind, Objects, OpenAiError, Page, Store, openai_error};
use crate::service::{json, reply, to_json};
use crate::{SimState, ids};

/// At most this many messages, and as many runs, are kept per thread; the oldest go first.
const KEEP_PER_THREAD: usize = 1_000;

/// A thread and what was said and run in it, oldest first.
#[derive(Debug)]
pub(super) struct Thread {
    object: ThreadObject,
    messages: VecDeque<Message>,
    runs: VecDeque<Run>,
}

#[derive(Debug, Clone, Serialize)]
struct ThreadObject {
    id: String,
    object: &'static str,
    created_at: u64,
    metadata: Value,
    tool_resources: Value,
}

#[derive(Debug, Clone, Serialize)]
struct Message {
    id: String,
    object: &'static str,
    created_at: u64,
    thread_id: String,
    status: &'static str,
    incomplete_details: (),
    completed_at: Option<u64>,
    incomplete_at: (),
    role: String,
    content: Value,
    assistant_id: Option<String>,
    run_id: Option<String>,
    attachments: Value,
    metadata: Value,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    id: String,
    object: &'static str,
    created_at: u64,
    thread_id: String,
    assistant_id: String,
    status: &'static str,
    required_action: (),
    last_error: (),
    expires_at: (),
    started_at: u64,
    cancelled_at: (),
    failed_at: (),
    completed_at: u64,
    incomplete_details: (),
    model: String,
    instructions: String,
    tools: [(); 0],
    metadata: Value,
    usage: RunUsage,
    temperature: f32,
    top_p: f32,
    max_prompt_tokens: (),
    max_completion_tokens: (),
    tool_choice: &'static str,
    parallel_tool_calls: bool,
    response_format: &'static str,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct RunUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Store<Thread> {
    /// The thread `id`, or the 404 for it.
    fn thread(&self, id: &str) -> Result<&Thread, OpenAiError> {
        self.get(id).ok_or_else(|| thread_not_found(id))
    }

    /// The thread `id` to change, or the 404 for it.
    fn thread_mut(&mut self, id: &str) -> Result<&mut Thread, OpenAiError> {
        self.get_mut(id).ok_or_else(|| thread_not_found(id))
    }
}

/// The 404 for a thread this instance does not hold:
/// `{"error":{"message":"No thread found with id 'thread_...'.",
/// "type":"invalid_request_error","param":null,"code":null}}`.
fn thread_not_found(id: &str) -> OpenAiError {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("No thread found with id '{id}'."),
        None,
        None,
    )
}

fn run_not_found(id: &str) -> OpenAiError {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("No run found with id '{id}'."),
        None,
        None,
    )
}

/// The JSON object of a body; an empty body is an empty object.
fn body_object(body: &Bytes) -> Result<Map<String, Value>, OpenAiError> {
    if body.trim_ascii().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(openai_error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.".to_owned(),
            None,
            None,
        )),
    }
}

fn missing(param: &'static str) -> OpenAiError {
    openai_error(
        StatusCode::BAD_REQUEST,
        format!("Missing required parameter: '{param}'."),
        Some(param),
        Some("missing_required_parameter"),
    )
}

/// The request's `metadata`, or `{}`.
fn metadata(request: &Map<String, Value>) -> Value {
    request
        .get("metadata")
        .filter(|m| m.is_object())
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// A message of `role` saying `content` (a string, or parts), as the thread keeps it.
fn message(thread_id: &str, role: &str, content: &Value, metadata: Value) -> Message {
    let text = |value: &str| serde_json::json!({"type": "text", "text": {"value": value, "annotations": []}});
    let content = match content {
        Value::String(value) => Value::Array(vec![text(value)]),
        Value::Array(parts) => Value::Array(
            parts
                .iter()
                .map(|part| match (part.get("type"), part.get("text")) {
                    (Some(kind), Some(Value::String(value))) if kind == "text" => text(value),
                    _ => part.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    };
    let now = ids::unix_now();
    Message {
        id: ids::id("msg_", 24),
        object: "thread.message",
        created_at: now,
        thread_id: thread_id.to_owned(),
        status: "completed",
        incomplete_details: (),
        completed_at: Some(now),
        incomplete_at: (),
        role: role.to_owned(),
        content,
        assistant_id: None,
        run_id: None,
        attachments: Value::Array(Vec::new()),
        metadata,
    }
}

/// A message from a request: `role` (`user` or `assistant`) and `content` are required.
fn requested_message(
    thread_id: &str,
    request: &Map<String, Value>,
) -> Result<Message, OpenAiError> {
    let Some(role) = request.get("role").and_then(Value::as_str) else {
        return Err(missing("role"));
    };
    let Some(content) = request.get("content").filter(|c| !c.is_null()) else {
        return Err(missing("content"));
    };
    Ok(message(thread_id, role, content, metadata(request)))
}

fn push_bounded<T>(items: &mut VecDeque<T>, item: T) {
    if items.len() >= KEEP_PER_THREAD {
        items.pop_front();
    }
    items.push_back(item);
}

/// `POST /threads`, optionally with `messages` and `metadata`.
pub(super) async fn create(
    State(state): State<SimState>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let request = body_object(&body)?;
    let id = ids::id("thread_", 24);
    let messages = match request.get("messages") {
        Some(Value::Array(messages)) => messages
            .iter()
            .map(|m| match m {
                Value::Object(m) => requested_message(&id, m),
                _ => Err(missing("messages[].role")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    let object = ThreadObject {
        id: id.clone(),
        object: "thread",
        created_at: ids::unix_now(),
        metadata: metadata(&request),
        tool_resources: Value::Object(Map::new()),
    };
    let answer = json(StatusCode::OK, &object);
    let mut objects = state.objects();
    for _ in &messages {
        objects.count(ObjectKind::Message);
    }
    let thread = Thread {
        object,
        messages: messages.into(),
        runs: VecDeque::new(),
    };
    objects.threads.insert(id, thread, body.len());
    objects.count(ObjectKind::Thread);
    Ok(answer)
}

impl Kind for Thread {
    const DELETED: &'static str = "thread.deleted";

    fn store(objects: &mut Objects) -> &mut Store<Self> {
        &mut objects.threads
    }

    fn not_found(id: &str) -> Response {
        thread_not_found(id).into_response()
    }

    /// The thread object.
    fn answer(&self) -> Response {
        json(StatusCode::OK, &self.object)
    }
}

/// `POST /threads/{id}/messages` with `role` and `content`.
pub(super) async fn create_message(
    State(state): State<SimState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let request = body_object(&body)?;
    let mut objects = state.objects();
    let thread = objects.threads.thread_mut(&id)?;
    let message = requested_message(&id, &request)?;
    let answer = json(StatusCode::OK, &message);
    push_bounded(&mut thread.messages, message);
    objects.count(ObjectKind::Message);
    Ok(answer)
}

/// `GET /threads/{id}/messages`: newest first unless `order=asc`.
pub(super) async fn messages(
    State(state): State<SimState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, OpenAiError> {
    let items = {
        let objects = state.objects();
        let thread = objects.threads.thread(&id)?;
        thread
            .messages
            .iter()
            .map(|m| (m.id.clone(), to_json(m)))
            .collect()
    };
    Ok(Page::from_query(query.as_deref(), 20, true).list(items))
}

/// `POST /threads/{id}/runs` with `assistant_id`: the run, `completed`, and the assistant's
/// reply added to the thread.
pub(super) async fn create_run(
    State(state): State<SimState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let request = body_object(&body)?;
    let mut objects = state.objects();
    let thread = objects.threads.thread_mut(&id)?;
    let assistant_id = request
        .get("assistant_id")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("assistant_id"))?;
    let prompt_chars: usize = thread
        .messages
        .iter()
        .map(|m| m.content.to_string().len())
        .sum();
    let reply = reply(&state, None);
    let now = ids::unix_now();
    let run = Run {
        id: ids::id("run_", 24),
        object: "thread.run",
        created_at: now,
        thread_id: id.clone(),
        assistant_id: assistant_id.to_owned(),
        status: "completed",
        required_action: (),
        last_error: (),
        expires_at: (),
        started_at: now,
        cancelled_at: (),
        failed_at: (),
        completed_at: now,
        incomplete_details: (),
        model: request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(&state.config().model)
            .to_owned(),
        instructions: request
            .get("instructions")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        tools: [],
        metadata: metadata(&request),
        usage: {
            let prompt_tokens = (prompt_chars as u64).div_ceil(4).max(1);
            RunUsage {
                prompt_tokens,
                completion_tokens: reply.len(),
                total_tokens: prompt_tokens + reply.len(),
            }
        },
        temperature: 1.0,
        top_p: 1.0,
        max_prompt_tokens: (),
        max_completion_tokens: (),
        tool_choice: "auto",
        parallel_tool_calls: true,
        response_format: "auto",
    };
    // The reply is the service's, not the request's: not counted as a created message.
    let mut answer = message(
        &id,
        "assistant",
        &Value::String(reply.text()),
        Value::Object(Map::new()),
    );
    answer.assistant_id = Some(run.assistant_id.clone());
    answer.run_id = Some(run.id.clone());
    push_bounded(&mut thread.messages, answer);
    let response = json(StatusCode::OK, &run);
    push_bounded(&mut thread.runs, run);
    objects.count(ObjectKind::Run);
    Ok(response)
}

/// `GET /threads/{id}/runs/{run_id}`.
pub(super) async fn run(
    State(state): State<SimState>,
    Path((id, run_id)): Path<(String, String)>,
) -> Result<Response, OpenAiError> {
    let objects = state.objects();
    let thread = objects.threads.thread(&id)?;
    let run = thread
        .runs
        .iter()
        .find(|run| run.id == run_id)
        .ok_or_else(|| run_not_found(&run_id))?;
    Ok(json(StatusCode::OK, run))
}
