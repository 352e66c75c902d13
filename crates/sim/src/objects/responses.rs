//! Stored Responses: `GET` and `DELETE /responses/{id}`, its input items and cancel, and the
//! lookup of `previous_response_id` that `POST /responses` makes.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Kind, ObjectKind, Objects, OpenAiError, Store, WithItems, openai_error};
use crate::service::{json_bytes, to_json};
use crate::{SimState, ids};

/// One stored response.
#[derive(Debug)]
pub(super) struct Stored {
    /// The response document as it was answered.
    body: Bytes,
    /// Its input items, each its id and JSON: the earlier turns' inputs and outputs, then the
    /// request's own input. The earlier items are shared with the earlier responses.
    context: Vec<(String, Bytes)>,
    /// Its output items.
    output: Vec<(String, Bytes)>,
    /// Its place in its chain of `previous_response_id`s: 1 for a response without one.
    turn: u64,
}

/// The response a request continues with `previous_response_id`, found on this instance.
#[derive(Debug)]
pub(crate) struct Previous {
    /// Its id.
    pub(crate) id: String,
    /// The turn of the response continuing it: the previous one's plus one.
    pub(crate) turn: u64,
    /// Everything the chain said so far: its input items and its output items.
    context: Vec<(String, Bytes)>,
}

/// The response named by the request's `previous_response_id`, `None` when it names none, or
/// Azure's 400 when this instance does not hold it:
/// `{"error":{"message":"Previous response with id 'resp_...' not found.",
/// "type":"invalid_request_error","param":"previous_response_id",
/// "code":"previous_response_not_found"}}`.
pub(crate) fn previous_response(
    state: &SimState,
    request: &Map<String, Value>,
) -> Result<Option<Previous>, OpenAiError> {
    let Some(Value::String(id)) = request.get("previous_response_id") else {
        return Ok(None);
    };
    let objects = state.objects();
    let Some(stored) = objects.responses.get(id) else {
        return Err(openai_error(
            StatusCode::BAD_REQUEST,
            format!("Previous response with id '{id}' not found."),
            Some("previous_response_id"),
            Some("previous_response_not_found"),
        ));
    };
    let mut context = stored.context.clone();
    context.extend(stored.output.iter().cloned());
    Ok(Some(Previous {
        id: id.clone(),
        turn: stored.turn + 1,
        context,
    }))
}

/// Keep the response `id`, answered as `body`, with the request's input items after those of
/// the chain it continues, and count it.
pub(crate) fn store_response(
    state: &SimState,
    id: &str,
    body: Bytes,
    previous: Option<Previous>,
    request: &Map<String, Value>,
    output: Vec<(String, Bytes)>,
) {
    let (mut context, turn) = previous.map_or((Vec::new(), 1), |p| (p.context, p.turn));
    let inputs = input_items(request.get("input"));
    let size = body.len()
        + inputs
            .iter()
            .chain(&output)
            .map(|(id, item)| id.len() + item.len())
            .sum::<usize>();
    context.extend(inputs);
    let stored = Stored {
        body,
        context,
        output,
        turn,
    };
    let mut objects = state.objects();
    objects.responses.insert(id.to_owned(), stored, size);
    objects.count(ObjectKind::Response);
}

/// The request's `input` as items with ids: a string is one user message; an array's items
/// get an id when they have none, and string `content` becomes one text part, as OpenAI
/// lists them.
pub(super) fn input_items(input: Option<&Value>) -> Vec<(String, Bytes)> {
    #[derive(Serialize)]
    struct Message<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        role: &'static str,
        content: [Part<'a>; 1],
    }
    #[derive(Serialize)]
    struct Part<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        text: &'a str,
    }
    match input {
        Some(Value::String(text)) => {
            let id = ids::id("msg_", 48);
            let item = to_json(&Message {
                id: &id,
                kind: "message",
                role: "user",
                content: [Part {
                    kind: "input_text",
                    text,
                }],
            });
            vec![(id, item)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_object)
            .map(|item| {
                let mut item = item.clone();
                let id = match item.get("id") {
                    Some(Value::String(id)) => id.clone(),
                    _ => {
                        let id = ids::id("msg_", 48);
                        item.insert("id".to_owned(), Value::String(id.clone()));
                        id
                    }
                };
                if item.contains_key("role") && !item.contains_key("type") {
                    item.insert("type".to_owned(), Value::from("message"));
                }
                if let Some(Value::String(text)) = item.get("content") {
                    let kind = if item.get("role").and_then(Value::as_str) == Some("assistant") {
                        "output_text"
                    } else {
                        "input_text"
                    };
                    let part = serde_json::json!([{"type": kind, "text": text}]);
                    item.insert("content".to_owned(), part);
                }
                (id, to_json(&item))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Azure's 404 for a response this instance does not hold:
/// `{"error":{"message":"Response with id 'resp_...' not found.",
/// "type":"invalid_request_error","param":null,"code":null}}`.
fn not_found(id: &str) -> OpenAiError {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("Response with id '{id}' not found."),
        None,
        None,
    )
}

impl Kind for Stored {
    const DELETED: &'static str = "response";

    fn store(objects: &mut Objects) -> &mut Store<Self> {
        &mut objects.responses
    }

    fn not_found(id: &str) -> Response {
        not_found(id).into_response()
    }

    /// The response as it was answered.
    fn answer(&self) -> Response {
        json_bytes(StatusCode::OK, self.body.clone())
    }
}

impl WithItems for Stored {
    /// The chain's items: `GET /responses/{id}/input_items`.
    fn items(&self) -> &[(String, Bytes)] {
        &self.context
    }
}
