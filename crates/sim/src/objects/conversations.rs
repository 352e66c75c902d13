//! Conversations (`/conversations`): created, read, deleted, their items listed and added to,
//! and the conversation a `POST /responses` names with `conversation`, whose items the response
//! then extends.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::responses::input_items;
use super::{Kind, ObjectKind, Objects, OpenAiError, Page, Store, WithItems, openai_error};
use crate::service::{json_bytes, to_json};
use crate::{SimState, ids};

/// One conversation.
#[derive(Debug)]
pub(super) struct Conversation {
    /// The conversation object as it was answered.
    body: Bytes,
    /// Its items, oldest first, each its id and JSON.
    items: Vec<(String, Bytes)>,
    /// How many responses continued it.
    turns: u64,
}

/// The conversation a request names, found on this instance.
#[derive(Debug)]
pub(crate) struct InConversation {
    /// Its id.
    pub(crate) id: String,
    /// The turn of the response continuing it: 1 for its first response.
    pub(crate) turn: u64,
}

/// `{"id":...,"object":"conversation","created_at":...,"metadata":{}}`.
#[derive(Serialize)]
struct ConversationObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    metadata: Map<String, Value>,
}

/// Azure's 404 for a conversation this instance does not hold.
fn not_found(id: &str) -> OpenAiError {
    openai_error(
        StatusCode::NOT_FOUND,
        format!("Conversation with id '{id}' not found."),
        Some("conversation"),
        None,
    )
}

/// The conversation the request names with `conversation` (its id, or `{"id": ...}`), `None`
/// when it names none, or the 404 when this instance does not hold it; a 400 when it names a
/// `previous_response_id` as well.
pub(crate) fn conversation_of(
    state: &SimState,
    request: &Map<String, Value>,
) -> Result<Option<InConversation>, OpenAiError> {
    let id = match request.get("conversation") {
        Some(Value::String(id)) => id,
        Some(Value::Object(conversation)) => match conversation.get("id") {
            Some(Value::String(id)) => id,
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    if request.contains_key("previous_response_id") {
        return Err(openai_error(
            StatusCode::BAD_REQUEST,
            "Mutually exclusive parameters: 'previous_response_id' and 'conversation'. Ensure \
             you are only providing one of: 'previous_response_id' or 'conversation'."
                .to_owned(),
            None,
            Some("mutually_exclusive_parameters"),
        ));
    }
    match state.objects().conversations.get(id) {
        Some(conversation) => Ok(Some(InConversation {
            id: id.clone(),
            turn: conversation.turns + 1,
        })),
        None => Err(not_found(id)),
    }
}

/// Appends the request's input items and the response's `output` items to conversation `id`.
pub(crate) fn extend_conversation(
    state: &SimState,
    id: &str,
    request: &Map<String, Value>,
    output: Vec<(String, Bytes)>,
) {
    if let Some(conversation) = state.objects().conversations.get_mut(id) {
        conversation.items.extend(input_items(request.get("input")));
        conversation.items.extend(output);
        conversation.turns += 1;
    }
}

/// `POST /conversations`: a new conversation, with the body's `items` if any.
pub(super) async fn create(State(state): State<SimState>, body: Bytes) -> Response {
    let request: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(_) if body.is_empty() => Map::new(),
        Err(error) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                format!("Invalid body: {error}"),
                None,
                None,
            )
            .into_response();
        }
    };
    let id = ids::id("conv_", 48);
    let object = to_json(&ConversationObject {
        id: &id,
        object: "conversation",
        created_at: ids::unix_now(),
        metadata: match request.get("metadata") {
            Some(Value::Object(metadata)) => metadata.clone(),
            _ => Map::new(),
        },
    });
    let items = input_items(request.get("items"));
    let size = object.len()
        + items
            .iter()
            .map(|(id, item)| id.len() + item.len())
            .sum::<usize>();
    let conversation = Conversation {
        body: object.clone(),
        items,
        turns: 0,
    };
    let mut objects = state.objects();
    objects.conversations.insert(id, conversation, size);
    objects.count(ObjectKind::Conversation);
    json_bytes(StatusCode::OK, object)
}

impl Kind for Conversation {
    const DELETED: &'static str = "conversation.deleted";

    fn store(objects: &mut Objects) -> &mut Store<Self> {
        &mut objects.conversations
    }

    fn not_found(id: &str) -> Response {
        not_found(id).into_response()
    }

    /// The conversation object as it was answered.
    fn answer(&self) -> Response {
        json_bytes(StatusCode::OK, self.body.clone())
    }
}

impl WithItems for Conversation {
    fn items(&self) -> &[(String, Bytes)] {
        &self.items
    }
}

/// `POST /conversations/{id}/items` with `{"items": [...]}`: the items added, as a list.
pub(super) async fn add_items(
    State(state): State<SimState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let request: Map<String, Value> = serde_json::from_slice(&body).unwrap_or_default();
    let added = input_items(request.get("items"));
    match state.objects().conversations.get_mut(&id) {
        Some(conversation) => conversation.items.extend(added.iter().cloned()),
        None => return not_found(&id).into_response(),
    }
    Page::from_query(None, added.len().max(1), false).list(added)
}
