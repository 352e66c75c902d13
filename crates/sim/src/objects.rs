//! The objects one instance holds: stored Responses, conversations, files, batches and
//! Assistants threads.
//!
//! Each [`SimState`] keeps its own; another instance does not know them, exactly like two Azure
//! OpenAI resources. A follow-up that names an object on the wrong instance gets that
//! instance's 404 (or, for `previous_response_id`, its 400), which is what breaks a proxy that
//! spreads one conversation over several instances.
//!
//! Everything is in memory, behind one [`Mutex`](std::sync::Mutex) per instance, and bounded:
//! each kind keeps at most [`KEEP`] objects and [`KEEP_BYTES`] bytes, dropping the oldest
//! first.

mod conversations;
mod files;
mod responses;
mod threads;

use std::collections::{HashMap, VecDeque};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use serde::Serialize;

use crate::service::{json, json_bytes, to_json};
use crate::{SimState, shapes};

use conversations::Conversation;
use files::StoredFile;
use responses::Stored;
use threads::Thread;

pub(crate) use conversations::{conversation_of, extend_conversation};
pub(crate) use responses::{previous_response, store_response};

/// The kinds of objects an instance creates on request, for
/// [`SimState::object_count`](crate::SimState::object_count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ObjectKind {
    /// A Responses API response stored with `"store": true` (the default).
    Response,
    /// A file uploaded with `POST /openai/files`.
    File,
    /// A batch created with `POST /openai/batches`.
    Batch,
    /// An Assistants thread created with `POST /openai/threads`.
    Thread,
    /// A thread message, created alone or with its thread.
    Message,
    /// A thread run.
    Run,
    /// A conversation created with `POST /openai/v1/conversations`.
    Conversation,
}

/// At most this many objects of one kind are kept; the oldest go first.
pub(crate) const KEEP: usize = 10_000;

/// At most this many bytes of one kind are kept (file contents, stored responses and their
/// input items); the oldest go first.
pub(crate) const KEEP_BYTES: usize = 256 << 20;

/// Everything one instance holds, and how many objects requests created.
#[derive(Debug, Default)]
pub(crate) struct Objects {
    created: HashMap<ObjectKind, usize>,
    responses: Store<Stored>,
    conversations: Store<Conversation>,
    files: Store<StoredFile>,
    batches: Store<files::Batch>,
    threads: Store<Thread>,
}

impl Objects {
    /// How many objects of `kind` requests created, deleted and dropped ones included.
    pub(crate) fn created(&self, kind: ObjectKind) -> usize {
        self.created.get(&kind).copied().unwrap_or(0)
    }

    fn count(&mut self, kind: ObjectKind) {
        *self.created.entry(kind).or_default() += 1;
    }
}

/// Objects of one kind by id, in creation order, bounded by [`KEEP`] and [`KEEP_BYTES`].
#[derive(Debug)]
struct Store<T> {
    items: HashMap<String, (T, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T> Store<T> {
    /// Keep `item`, about `size` bytes, dropping the oldest objects over the bounds.
    fn insert(&mut self, id: String, item: T, size: usize) {
        while !self.order.is_empty() && (self.order.len() >= KEEP || self.bytes + size > KEEP_BYTES)
        {
            if let Some(oldest) = self.order.pop_front()
                && let Some((_, freed)) = self.items.remove(&oldest)
            {
                self.bytes -= freed;
            }
        }
        self.bytes += size;
        self.order.push_back(id.clone());
        self.items.insert(id, (item, size));
    }

    fn get(&self, id: &str) -> Option<&T> {
        self.items.get(id).map(|(item, _)| item)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.items.get_mut(id).map(|(item, _)| item)
    }

    fn remove(&mut self, id: &str) -> Option<T> {
        let (item, size) = self.items.remove(id)?;
        self.bytes -= size;
        // Linear, but deletes are rare and the store is bounded.
        self.order.retain(|kept| kept != id);
        Some(item)
    }

    /// The ids, oldest first.
    fn ids(&self) -> impl Iterator<Item = &String> {
        self.order.iter()
    }
}

/// A kind of object held by id, with the `GET` and `DELETE` its routes share.
trait Kind: Sized + Send + 'static {
    /// The `object` of the deletion answer, `{"id":...,"object":...,"deleted":true}`.
    const DELETED: &'static str;

    /// The store of this kind.
    fn store(objects: &mut Objects) -> &mut Store<Self>;

    /// The instance's 404 for `id`.
    fn not_found(id: &str) -> Response;

    /// The answer to a `GET` of the object.
    fn answer(&self) -> Response;
}

/// The kinds that list items: a stored response its input items, a conversation its items.
trait WithItems: Kind {
    /// The items, oldest first, each its id and JSON.
    fn items(&self) -> &[(String, Bytes)];
}

/// `GET /{kind}/{id}`.
async fn read<T: Kind>(State(state): State<SimState>, Path(id): Path<String>) -> Response {
    match T::store(&mut state.objects()).get(&id) {
        Some(object) => object.answer(),
        None => T::not_found(&id),
    }
}

/// `DELETE /{kind}/{id}`: `{"id":...,"object":...,"deleted":true}`.
async fn delete<T: Kind>(State(state): State<SimState>, Path(id): Path<String>) -> Response {
    let removed = T::store(&mut state.objects()).remove(&id);
    match removed {
        Some(_) => deleted(&id, T::DELETED),
        None => T::not_found(&id),
    }
}

/// `GET /{kind}/{id}/items` (`/input_items`): newest first unless `order=asc`.
async fn items<T: WithItems>(
    State(state): State<SimState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let items = match T::store(&mut state.objects()).get(&id) {
        Some(object) => object.items().to_vec(),
        None => return T::not_found(&id),
    };
    Page::from_query(query.as_deref(), 20, true).list(items)
}

/// The routes of the objects, under `/openai` and `/openai/v1` alike.
pub(crate) fn routes() -> Router<SimState> {
    let mut router = Router::new();
    for prefix in ["/openai", "/openai/v1"] {
        let at = |path: &str| format!("{prefix}{path}");
        router = router
            .route(
                &at("/responses/{id}"),
                get(read::<Stored>).delete(delete::<Stored>),
            )
            .route(&at("/responses/{id}/input_items"), get(items::<Stored>))
            // Every emulated response is finished already: a cancel answers it unchanged.
            .route(&at("/responses/{id}/cancel"), post(read::<Stored>))
            .route(&at("/conversations"), post(conversations::create))
            .route(
                &at("/conversations/{id}"),
                get(read::<Conversation>).delete(delete::<Conversation>),
            )
            .route(
                &at("/conversations/{id}/items"),
                get(items::<Conversation>).post(conversations::add_items),
            )
            .route(&at("/files"), post(files::upload).get(files::list))
            .route(
                &at("/files/{id}"),
                get(read::<StoredFile>).delete(delete::<StoredFile>),
            )
            .route(&at("/files/{id}/content"), get(files::content))
            .route(
                &at("/batches"),
                post(files::create_batch).get(files::batches),
            )
            .route(&at("/batches/{id}"), get(files::batch))
            .route(&at("/batches/{id}/cancel"), post(files::cancel_batch))
            .route(&at("/threads"), post(threads::create))
            .route(
                &at("/threads/{id}"),
                get(read::<Thread>).delete(delete::<Thread>),
            )
            .route(
                &at("/threads/{id}/messages"),
                post(threads::create_message).get(threads::messages),
            )
            .route(&at("/threads/{id}/runs"), post(threads::create_run))
            .route(&at("/threads/{id}/runs/{run_id}"), get(threads::run));
    }
    router
}

// ---- answers shared by the kinds ----

/// OpenAI's error document, which Azure passes on for Responses and Assistants objects:
/// `{"error":{"message":...,"type":"invalid_request_error","param":...,"code":...}}`.
///
/// A small value rather than a [`Response`], so that the helpers refusing a request can
/// return it in a `Result` and the handlers answer it with `?`.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

pub(crate) fn openai_error(
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
) -> OpenAiError {
    OpenAiError {
        status,
        message,
        param,
        code,
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        json(
            self.status,
            &shapes::ErrorBody {
                error: shapes::InvalidRequest {
                    message: &self.message,
                    kind: "invalid_request_error",
                    param: self.param,
                    code: self.code,
                },
            },
        )
    }
}

/// `{"id":...,"object":...,"deleted":true}`.
fn deleted(id: &str, object: &'static str) -> Response {
    #[derive(Serialize)]
    struct Deleted<'a> {
        id: &'a str,
        object: &'static str,
        deleted: bool,
    }
    json(
        StatusCode::OK,
        &Deleted {
            id,
            object,
            deleted: true,
        },
    )
}

/// What a list request asks for: `limit`, `order` and `after`.
#[derive(Debug)]
struct Page {
    limit: usize,
    newest_first: bool,
    after: Option<String>,
}

impl Page {
    /// Read the query, with the operation's defaults.
    fn from_query(query: Option<&str>, limit: usize, newest_first: bool) -> Self {
        let mut page = Self {
            limit,
            newest_first,
            after: None,
        };
        for (key, value) in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('='))
        {
            match key {
                "limit" => {
                    if let Ok(limit) = value.parse::<usize>() {
                        page.limit = limit.max(1);
                    }
                }
                "order" => page.newest_first = value != "asc",
                "after" => page.after = Some(value.to_owned()),
                _ => {}
            }
        }
        page
    }

    /// OpenAI's cursor list over `items` (oldest first, each its id and JSON):
    /// `{"object":"list","data":[...],"first_id":...,"last_id":...,"has_more":...}`.
    fn list(&self, mut items: Vec<(String, Bytes)>) -> Response {
        if self.newest_first {
            items.reverse();
        }
        let start = self
            .after
            .as_ref()
            .and_then(|after| items.iter().position(|(id, _)| id == after))
            .map_or(0, |i| i + 1);
        let rest = &items[start.min(items.len())..];
        let shown = &rest[..self.limit.min(rest.len())];
        let mut body = BytesMut::from(&br#"{"object":"list","data":["#[..]);
        for (i, (_, item)) in shown.iter().enumerate() {
            if i > 0 {
                body.extend_from_slice(b",");
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"],\"first_id\":");
        body.extend_from_slice(&to_json(&shown.first().map(|(id, _)| id)));
        body.extend_from_slice(b",\"last_id\":");
        body.extend_from_slice(&to_json(&shown.last().map(|(id, _)| id)));
        body.extend_from_slice(b",\"has_more\":");
        body.extend_from_slice(&to_json(&(rest.len() > shown.len())));
        body.extend_from_slice(b"}");
        json_bytes(StatusCode::OK, body.freeze())
    }
}
