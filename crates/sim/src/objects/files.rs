//! Files and batches: upload, read, list and delete files; create, read, list and cancel
//! batches over an uploaded file.
//!
//! They answer in Azure's own error shape, `{"error":{"code":...,"message":...}}`, with the
//! codes of Azure's files and batch API (`notFound`, `invalidPayload`).

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Kind, ObjectKind, Objects, Page, Store};
use crate::service::{azure_error, chat_completion, json, reply, to_json};
use crate::{SimState, ids};

/// A file object: `{"id":"file-...","object":"file","bytes":...,"created_at":...,
/// "filename":...,"purpose":...,"status":"processed"}`.
#[derive(Debug, Clone, Serialize)]
struct FileObject {
    id: String,
    object: &'static str,
    bytes: usize,
    created_at: u64,
    filename: String,
    purpose: String,
    status: &'static str,
}

/// A file and its content.
#[derive(Debug)]
pub(super) struct StoredFile {
    meta: FileObject,
    content: Bytes,
}

/// Azure's 404 for a file this instance does not hold:
/// `{"error":{"code":"notFound","message":"File with id 'file-...' not found."}}`.
fn file_not_found(id: &str) -> Response {
    azure_error(
        StatusCode::NOT_FOUND,
        "notFound",
        &format!("File with id '{id}' not found."),
    )
}

/// Azure's 400 for a request it cannot take.
fn invalid_payload(message: &str) -> Response {
    azure_error(StatusCode::BAD_REQUEST, "invalidPayload", message)
}

/// `POST /files`, `multipart/form-data` with the fields `purpose` and `file`.
pub(super) async fn upload(
    State(state): State<SimState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    const EXPECTED: &str =
        "The request must be multipart/form-data with the fields 'purpose' and 'file'.";
    let Ok(mut multipart) = multipart else {
        return invalid_payload(EXPECTED);
    };
    let (mut purpose, mut file) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => return invalid_payload(&error.body_text()),
        };
        let name = field.name().map(str::to_owned);
        let filename = field.file_name().unwrap_or("file").to_owned();
        let value = match field.bytes().await {
            Ok(value) => value,
            Err(error) => return invalid_payload(&error.body_text()),
        };
        match name.as_deref() {
            Some("purpose") => purpose = Some(String::from_utf8_lossy(&value).into_owned()),
            Some("file") => file = Some((filename, value)),
            _ => {}
        }
    }
    let (Some(purpose), Some((filename, content))) = (purpose, file) else {
        return invalid_payload(EXPECTED);
    };
    let meta = FileObject {
        id: ids::id("file-", 32),
        object: "file",
        bytes: content.len(),
        created_at: ids::unix_now(),
        filename,
        purpose,
        status: "processed",
    };
    let answer = json(StatusCode::OK, &meta);
    let mut objects = state.objects();
    let size = content.len();
    objects
        .files
        .insert(meta.id.clone(), StoredFile { meta, content }, size);
    objects.count(ObjectKind::File);
    answer
}

impl Kind for StoredFile {
    const DELETED: &'static str = "file";

    fn store(objects: &mut Objects) -> &mut Store<Self> {
        &mut objects.files
    }

    fn not_found(id: &str) -> Response {
        file_not_found(id)
    }

    /// The file object.
    fn answer(&self) -> Response {
        json(StatusCode::OK, &self.meta)
    }
}

/// `GET /files/{id}/content`: the bytes uploaded (or the batch output written).
pub(super) async fn content(State(state): State<SimState>, Path(id): Path<String>) -> Response {
    let content = state.objects().files.get(&id).map(|f| f.content.clone());
    match content {
        // `application/octet-stream`, as axum answers bytes.
        Some(content) => content.into_response(),
        None => file_not_found(&id),
    }
}

/// `GET /files`: newest first.
pub(super) async fn list(State(state): State<SimState>, RawQuery(query): RawQuery) -> Response {
    let items = {
        let objects = state.objects();
        objects
            .files
            .ids()
            .filter_map(|id| objects.files.get(id))
            .map(|file| (file.meta.id.clone(), to_json(&file.meta)))
            .collect()
    };
    Page::from_query(query.as_deref(), 10_000, true).list(items)
}

// ---- batches ----

/// A batch object, in the fields and order of Azure's batch API.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Batch {
    id: String,
    object: &'static str,
    endpoint: String,
    errors: (),
    input_file_id: String,
    completion_window: String,
    status: &'static str,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: u64,
    in_progress_at: Option<u64>,
    expires_at: Option<u64>,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
    request_counts: RequestCounts,
    metadata: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct RequestCounts {
    total: u64,
    completed: u64,
    failed: u64,
}

/// Azure's 404 for a batch this instance does not hold:
/// `{"error":{"code":"notFound","message":"Batch with id 'batch_...' not found."}}`.
fn batch_not_found(id: &str) -> Response {
    azure_error(
        StatusCode::NOT_FOUND,
        "notFound",
        &format!("Batch with id '{id}' not found."),
    )
}

/// `POST /batches` with `input_file_id`, `endpoint` and `completion_window`: the batch,
/// `validating`. The input file must be on this instance, or the answer is the file's 404.
pub(super) async fn create_batch(State(state): State<SimState>, body: Bytes) -> Response {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&body) else {
        return invalid_payload("The request body must be a JSON object.");
    };
    let field = |name: &str| match request.get(name) {
        Some(Value::String(value)) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    let required = ["input_file_id", "endpoint", "completion_window"];
    let [Some(input_file_id), Some(endpoint), Some(completion_window)] = required.map(field) else {
        let name = required.iter().find(|name| field(name).is_none());
        let name = name.unwrap_or(&required[0]);
        return invalid_payload(&format!("The '{name}' field is required."));
    };
    let created_at = ids::unix_now();
    let batch = Batch {
        id: ids::id("batch_", 32),
        object: "batch",
        endpoint,
        errors: (),
        input_file_id,
        completion_window,
        status: "validating",
        output_file_id: None,
        error_file_id: None,
        created_at,
        in_progress_at: None,
        expires_at: Some(created_at + 24 * 60 * 60),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        metadata: request.get("metadata").filter(|m| m.is_object()).cloned(),
    };
    let mut objects = state.objects();
    if objects.files.get(&batch.input_file_id).is_none() {
        return file_not_found(&batch.input_file_id);
    }
    let answer = json(StatusCode::OK, &batch);
    objects.batches.insert(batch.id.clone(), batch, body.len());
    objects.count(ObjectKind::Batch);
    answer
}

/// `GET /batches/{id}`. The first read after creation runs the batch: it is `completed`, with
/// an output file on this instance holding one chat completion per request line.
pub(super) async fn batch(State(state): State<SimState>, Path(id): Path<String>) -> Response {
    let mut objects = state.objects();
    advance(&state, &mut objects, &id);
    match objects.batches.get(&id) {
        Some(batch) => json(StatusCode::OK, batch),
        None => batch_not_found(&id),
    }
}

/// `POST /batches/{id}/cancel`: a batch not finished yet is `cancelling`, then `cancelled` on
/// the next read; a finished one is answered unchanged.
pub(super) async fn cancel_batch(
    State(state): State<SimState>,
    Path(id): Path<String>,
) -> Response {
    let mut objects = state.objects();
    let Some(batch) = objects.batches.get_mut(&id) else {
        return batch_not_found(&id);
    };
    if matches!(batch.status, "validating" | "in_progress") {
        batch.status = "cancelling";
        batch.cancelling_at = Some(ids::unix_now());
    }
    json(StatusCode::OK, batch)
}

/// `GET /batches`: newest first.
pub(super) async fn batches(State(state): State<SimState>, RawQuery(query): RawQuery) -> Response {
    let items = {
        let mut objects = state.objects();
        let ids: Vec<String> = objects.batches.ids().cloned().collect();
        ids.iter()
            .filter_map(|id| {
                advance(&state, &mut objects, id);
                let batch = objects.batches.get(id)?;
                Some((id.clone(), to_json(batch)))
            })
            .collect()
    };
    Page::from_query(query.as_deref(), 20, true).list(items)
}

/// Move batch `id` on: run it when it waits, finish its cancellation when one was asked for.
fn advance(state: &SimState, objects: &mut Objects, id: &str) {
    let Some((status, input_file_id)) = objects
        .batches
        .get(id)
        .map(|batch| (batch.status, batch.input_file_id.clone()))
    else {
        return;
    };
    let now = ids::unix_now();
    match status {
        "cancelling" => {
            if let Some(batch) = objects.batches.get_mut(id) {
                batch.status = "cancelled";
                batch.cancelled_at = Some(now);
            }
        }
        "validating" | "in_progress" => {
            // None when the input file was deleted before the batch ran.
            let output = objects
                .files
                .get(&input_file_id)
                .map(|input| run(state, &input.content));
            // The output file: made by the service, not by a request, so not counted.
            let output = output.map(|(content, counts)| {
                let meta = FileObject {
                    id: ids::id("file-", 32),
                    object: "file",
                    bytes: content.len(),
                    created_at: now,
                    filename: format!("{id}_output.jsonl"),
                    purpose: "batch_output".to_owned(),
                    status: "processed",
                };
                let file_id = meta.id.clone();
                let size = content.len();
                let file = StoredFile { meta, content };
                objects.files.insert(file_id.clone(), file, size);
                (file_id, counts)
            });
            let Some(batch) = objects.batches.get_mut(id) else {
                return;
            };
            batch.in_progress_at = Some(batch.in_progress_at.unwrap_or(now));
            match output {
                Some((file_id, counts)) => {
                    batch.status = "completed";
                    batch.finalizing_at = Some(now);
                    batch.completed_at = Some(now);
                    batch.output_file_id = Some(file_id);
                    batch.request_counts = counts;
                }
                None => {
                    batch.status = "failed";
                    batch.failed_at = Some(now);
                }
            }
        }
        _ => {}
    }
}

/// The output file of a batch over `input`: one line per request line, a chat completion for
/// each JSON object, an error for anything else.
fn run(state: &SimState, input: &[u8]) -> (Bytes, RequestCounts) {
    let mut counts = RequestCounts::default();
    let mut out = BytesMut::new();
    let lines = input
        .split(|&b| b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty());
    for line in lines {
        counts.total += 1;
        let request = serde_json::from_slice::<Map<String, Value>>(line).ok();
        let custom_id = request
            .as_ref()
            .and_then(|r| r.get("custom_id"))
            .unwrap_or(&Value::Null);
        out.extend_from_slice(br#"{"id":"#);
        out.extend_from_slice(&to_json(&ids::id("batch_req_", 32)));
        out.extend_from_slice(br#","custom_id":"#);
        out.extend_from_slice(&to_json(custom_id));
        match &request {
            Some(request) => {
                counts.completed += 1;
                let body = request.get("body");
                let max_tokens = ["max_completion_tokens", "max_tokens"]
                    .iter()
                    .find_map(|key| body.and_then(|b| b.get(*key)).and_then(Value::as_u64));
                let prompt_tokens = (line.len() as u64).div_ceil(4).max(1);
                let completion = chat_completion(state, prompt_tokens, &reply(state, max_tokens));
                out.extend_from_slice(br#","response":{"status_code":200,"request_id":"#);
                out.extend_from_slice(&to_json(&ids::uuid()));
                out.extend_from_slice(br#","body":"#);
                out.extend_from_slice(&completion);
                out.extend_from_slice(br#"},"error":null}"#);
            }
            None => {
                counts.failed += 1;
                out.extend_from_slice(
                    br#","response":null,"error":{"code":"invalid_json_line","message":"This line is not a JSON object."}}"#,
                );
            }
        }
        out.extend_from_slice(b"\n");
    }
    (out.freeze(), counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimConfig;

    #[test]
    fn a_batch_answers_every_line_and_counts_the_bad_ones() {
        let state = SimState::new(SimConfig::new("eastus"));
        let input = b"{\"custom_id\":\"a\",\"body\":{\"messages\":[]}}\n\nnot json\n";
        let (output, counts) = run(&state, input);
        assert_eq!((counts.total, counts.completed, counts.failed), (2, 1, 1));
        let lines: Vec<Value> = output
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["custom_id"], "a");
        assert_eq!(lines[0]["response"]["status_code"], 200);
        assert_eq!(lines[0]["response"]["body"]["object"], "chat.completion");
        assert!(lines[1]["response"].is_null());
        assert_eq!(lines[1]["error"]["code"], "invalid_json_line");
    }
}
