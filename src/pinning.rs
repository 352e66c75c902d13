//! Objects that live on one instance (stored responses, files, batches, threads, ...): a request
//! that names one goes to the instance that holds it, and a request that creates one is never
//! repeated where the first may have acted.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use aoai_balance::{
    AzureOpenAiClassifier, Classify, Failure, Outcome, PinnedTo, SeekObject, ServedBy,
};
use aoai_retry::ReplayBody;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Either, Full, Limited};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower::{BoxError, Layer, Service};

/// Where the gateway has seen objects live: object id to backend name, learnt from the answers
/// that created them and from the backend that answered a request naming one.
///
/// Bounded and forgetful: two generations of at most half the capacity each; when the newer
/// one is full, or older than the expiry, the older one is dropped. A forgotten object (or one
/// this process never saw: after a restart, or created through another replica) is found by
/// asking the backends. Clones share the map.
#[derive(Clone)]
pub struct ObjectMap {
    inner: Arc<Mutex<Generations>>,
    capacity: usize,
    expiry: Duration,
}

struct Generations {
    newer: HashMap<Box<str>, Arc<str>>,
    older: HashMap<Box<str>, Arc<str>>,
    newer_since: Instant,
}

impl ObjectMap {
    /// Up to 100,000 objects, each remembered for a day at least and two at most.
    pub fn new() -> Self {
        Self::with_capacity(100_000, Duration::from_secs(24 * 3600))
    }

    /// Up to `capacity` objects, each remembered for `expiry` at least (while the map is not
    /// full) and twice that at most.
    pub fn with_capacity(capacity: usize, expiry: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Generations {
                newer: HashMap::new(),
                older: HashMap::new(),
                newer_since: Instant::now(),
            })),
            capacity: capacity.max(2),
            expiry,
        }
    }

    /// The backend `id` was last seen on.
    pub fn get(&self, id: &str) -> Option<Arc<str>> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.newer.get(id).or_else(|| map.older.get(id)).cloned()
    }

    /// Remembers that `id` lives on `backend`.
    pub fn learn(&self, id: &str, backend: &Arc<str>) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if map.newer.len() >= self.capacity / 2 || map.newer_since.elapsed() >= self.expiry {
            map.older = mem::take(&mut map.newer);
            map.newer_since = Instant::now();
        }
        map.newer.insert(id.into(), backend.clone());
    }

    /// How many objects it remembers.
    pub fn len(&self) -> usize {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.newer.len() + map.older.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for ObjectMap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ObjectMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectMap")
            .field("objects", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The collections whose members live on one instance, as they appear in paths, each with
/// whether a `POST` to it creates an object that must not be created twice.
const COLLECTIONS: [(&str, bool); 12] = [
    ("responses", false),
    ("conversations", false),
    ("items", false),
    ("files", true),
    ("batches", true),
    ("assistants", true),
    ("threads", true),
    ("messages", true),
    ("runs", true),
    ("vector_stores", true),
    ("jobs", true),
    ("uploads", true),
];

/// The body fields that name an object.
const REFERENCES: [&str; 9] = [
    "previous_response_id",
    "conversation",
    "thread_id",
    "assistant_id",
    "file_id",
    "input_file_id",
    "file_ids",
    "vector_store_id",
    "vector_store_ids",
];

/// Whether a request to `path` with `method` creates an object that must not be created twice
/// (a file, a batch, an assistant, a thread, a message, a run, a vector store, a fine-tuning
/// job, an upload): retried only when the first instance certainly did not act.
pub(crate) fn creates_object(method: &Method, path: &str) -> bool {
    method == Method::POST && last_segment(path).is_some_and(creates_once)
}

/// Whether a request to `path` with `method` creates an object whose id the gateway learns from
/// the answer: those of [`creates_object`], and stored responses.
pub(crate) fn learns_id(method: &Method, path: &str) -> bool {
    method == Method::POST
        && last_segment(path)
            .is_some_and(|last| matches!(last, "responses" | "conversations") || creates_once(last))
}

/// Whether a `POST` to the collection `name` creates an object that must not be created twice.
fn creates_once(name: &str) -> bool {
    COLLECTIONS
        .iter()
        .any(|&(collection, once)| once && collection == name)
}

fn last_segment(path: &str) -> Option<&str> {
    path.trim_end_matches('/').rsplit('/').next()
}

/// The ids of the objects a request names: in its path (`/responses/{id}`,
/// `/threads/{id}/runs`, ...) and its JSON body (`previous_response_id`, `file_id`, ...).
fn object_refs(path: &str, body: &[u8]) -> Vec<Box<str>> {
    let mut refs = Vec::new();
    let mut in_collection = false;
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    while let Some(segment) = segments.next() {
        if COLLECTIONS.iter().any(|&(name, _)| name == segment) {
            in_collection = true;
            if let Some(id) = segments.next() {
                refs.push(id.into());
                break;
            }
        }
    }
    // Only a body that can name one is parsed: of a request to one of the collections (not a
    // chat completion, whose `tool_call_id`s would match), holding a field that names one.
    if in_collection
        && !body.is_empty()
        && (contains(body, b"_id") || contains(body, b"\"conversation\""))
        && let Ok(json) = serde_json::from_slice::<Value>(body)
    {
        collect_refs(&json, &mut refs);
    }
    refs
}

fn collect_refs(value: &Value, refs: &mut Vec<Box<str>>) {
    match value {
        Value::Object(fields) => {
            for (key, value) in fields {
                if REFERENCES.contains(&key.as_str()) {
                    match value {
                        Value::String(id) => refs.push(id.as_str().into()),
                        Value::Array(ids) => {
                            refs.extend(ids.iter().filter_map(Value::as_str).map(Box::from));
                        }
                        Value::Object(object) => {
                            if let Some(id) = object.get("id").and_then(Value::as_str) {
                                refs.push(id.into());
                            }
                        }
                        _ => {}
                    }
                } else {
                    collect_refs(value, refs);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_refs(item, refs);
            }
        }
        _ => {}
    }
}

/// Sends a request that names an object to the backend that holds it ([`PinnedTo`]), when the
/// [`ObjectMap`] knows it; else lets the request be picked as any other, and marks an answer
/// saying the object is not there (a 404, or a 400 saying "not found") [`NotHere`] so the
/// retry policy asks the next backend, cooling ones too ([`SeekObject`]). The backend that
/// answers learns the object.
///
/// A request that creates an object (a `POST` to `files`, `batches`, `assistants`, `threads`,
/// `messages`, `runs`, `vector_stores`, fine-tuning `jobs` or `uploads`) that fails where the
/// instance may have acted (a timeout, a connection broken after sending, a 5xx other than 503) is marked
/// [`MayHaveActed`]: never retried, so a retry never creates a duplicate.
///
/// Sits between the retry layer (the body is read: [`ReplayBody`]) and `Balance`.
#[derive(Debug, Clone)]
pub struct PinLayer {
    objects: ObjectMap,
}

impl PinLayer {
    /// Pins by what `objects` knows, and teaches it.
    pub fn new(objects: ObjectMap) -> Self {
        Self { objects }
    }
}

impl<S> Layer<S> for PinLayer {
    type Service = PinToObject<S>;

    fn layer(&self, inner: S) -> PinToObject<S> {
        PinToObject {
            inner,
            objects: self.objects.clone(),
        }
    }
}

/// The service of [`PinLayer`].
#[derive(Debug, Clone)]
pub struct PinToObject<S> {
    inner: S,
    objects: ObjectMap,
}

/// A response extension: the backend does not hold the object the request names
/// ([`GatewayClassifier`](crate::GatewayClassifier) makes it [`Outcome::NotHere`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotHere;

/// An error (and a response extension) of a request creating an object, after which the
/// instance may have acted: never retried ([`GatewayClassifier`](crate::GatewayClassifier)
/// makes it [`Outcome::Final`]).
#[derive(Debug)]
pub struct MayHaveActed(BoxError);

impl fmt::Display for MayHaveActed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for MayHaveActed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// A response marker of [`MayHaveActed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MayHaveActedAnswer;

/// How much of a 400 answer is read to see whether it says "not found".
const NOT_FOUND_PEEK: usize = 64 * 1024;

impl<S, RB> Service<Request<ReplayBody>> for PinToObject<S>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
{
    type Response = Response<Either<RB, Full<Bytes>>>;
    type Error = BoxError;
    type Future = PinFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReplayBody>) -> Self::Future {
        let path = request.uri().path();
        let creates = creates_object(request.method(), path);
        let refs = object_refs(path, request.body().as_bytes());
        let known = refs.iter().find_map(|id| self.objects.get(id));
        let asking = match known {
            Some(backend) => {
                request.extensions_mut().insert(PinnedTo::new(backend));
                Vec::new()
            }
            None => {
                if !refs.is_empty() {
                    request.extensions_mut().insert(SeekObject);
                }
                refs
            }
        };
        PinFuture {
            state: PinState::Calling {
                inner: self.inner.call(request),
            },
            asking,
            creates,
            objects: self.objects.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`PinToObject`].
    pub struct PinFuture<F, RB>
    where
        RB: Body,
        RB::Error: Into<BoxError>,
    {
        #[pin]
        state: PinState<F, RB>,
        // The ids of the objects the request names, when no backend is known for them.
        asking: Vec<Box<str>>,
        creates: bool,
        objects: ObjectMap,
    }
}

pin_project! {
    #[project = PinStateProj]
    enum PinState<F, RB>
    where
        RB: Body,
        RB::Error: Into<BoxError>,
    {
        Calling {
            #[pin]
            inner: F,
        },
        // A 400 to a request asking for its object, read to see whether it says "not found".
        Peeking {
            #[pin]
            body: Collect<Limited<RB>>,
            parts: Option<http::response::Parts>,
        },
    }
}

impl<F, RB> fmt::Debug for PinFuture<F, RB>
where
    RB: Body,
    RB::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinFuture")
            .field("asking", &self.asking)
            .field("creates", &self.creates)
            .finish_non_exhaustive()
    }
}

impl<F, E, RB> Future for PinFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    RB: Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<Either<RB, Full<Bytes>>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                PinStateProj::Calling { inner } => {
                    let response = match ready!(inner.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            let error = error.into();
                            let may_have_acted = *this.creates
                                && matches!(
                                    AzureOpenAiClassifier.classify_error(&*error),
                                    Outcome::Failed(Failure::Timeout | Failure::Other)
                                );
                            return Poll::Ready(Err(if may_have_acted {
                                Box::new(MayHaveActed(error))
                            } else {
                                error
                            }));
                        }
                    };
                    let status = response.status();
                    if !this.asking.is_empty() && status == StatusCode::BAD_REQUEST {
                        let (parts, body) = response.into_parts();
                        this.state.set(PinState::Peeking {
                            body: Limited::new(body, NOT_FOUND_PEEK).collect(),
                            parts: Some(parts),
                        });
                        continue;
                    }
                    let mut response = response.map(Either::Left);
                    mark(&mut response, this.asking, *this.creates, this.objects);
                    return Poll::Ready(Ok(response));
                }
                PinStateProj::Peeking { body, parts } => {
                    let body = ready!(body.poll(cx)).map_err(|error| -> BoxError { error })?;
                    let parts = parts.take().expect("PinFuture polled after completion");
                    let bytes = body.to_bytes();
                    let says_not_found = contains(&bytes, b"not_found")
                        || contains(&bytes, b"not found")
                        || contains(&bytes, b"No such");
                    let mut response = Response::from_parts(parts, Either::Right(Full::new(bytes)));
                    if says_not_found {
                        response.extensions_mut().insert(NotHere);
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

/// Marks an answer for the classifier, and learns where the objects it names live.
fn mark<B>(response: &mut Response<B>, asking: &[Box<str>], creates: bool, objects: &ObjectMap) {
    let status = response.status();
    if !asking.is_empty() {
        if status == StatusCode::NOT_FOUND {
            response.extensions_mut().insert(NotHere);
        } else if status.is_success()
            && let Some(served_by) = response.extensions().get::<ServedBy>()
        {
            for id in asking {
                objects.learn(id, served_by.shared_name());
            }
        }
    }
    if creates && status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        response.extensions_mut().insert(MayHaveActedAnswer);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_in_the_path_and_the_body() {
        // In no particular order.
        let refs = |path: &str, body: &str| -> Vec<String> {
            let mut refs: Vec<String> = object_refs(path, body.as_bytes())
                .into_iter()
                .map(String::from)
                .collect();
            refs.sort();
            refs
        };
        assert_eq!(refs("/v1/responses/resp_1/input_items", ""), ["resp_1"]);
        assert_eq!(refs("/threads/thread_9/runs", ""), ["thread_9"]);
        assert_eq!(refs("/files", ""), Vec::<String>::new());
        assert_eq!(
            refs(
                "/v1/responses",
                r#"{"model":"m","previous_response_id":"resp_2","input":[{"content":[{"type":"input_file","file_id":"file-3"}]}]}"#
            ),
            ["file-3", "resp_2"]
        );
        assert_eq!(
            refs(
                "/batches",
                r#"{"input_file_id":"file-1","endpoint":"/chat/completions"}"#
            ),
            ["file-1"]
        );
        assert_eq!(
            refs(
                "/v1/responses",
                r#"{"conversation":{"id":"conv_1"},"tools":[{"vector_store_ids":["vs_1","vs_2"]}]}"#
            ),
            ["conv_1", "vs_1", "vs_2"]
        );
        assert_eq!(
            refs("/v1/responses", r#"{"input":"hi"}"#),
            Vec::<String>::new()
        );
    }

    #[test]
    fn what_creates_an_object_once() {
        let post = Method::POST;
        assert!(creates_object(&post, "/files"));
        assert!(creates_object(&post, "/v1/threads/thread_1/runs"));
        assert!(creates_object(&post, "/fine_tuning/jobs"));
        assert!(!creates_object(&post, "/v1/responses"));
        assert!(!creates_object(
            &post,
            "/deployments/gpt-4o/chat/completions"
        ));
        assert!(!creates_object(&Method::GET, "/files"));
        assert!(learns_id(&post, "/v1/responses"));
        assert!(learns_id(&post, "/files"));
        assert!(!learns_id(&post, "/deployments/gpt-4o/chat/completions"));
    }

    #[test]
    fn the_map_forgets_its_older_half_when_full() {
        let map = ObjectMap::with_capacity(4, Duration::from_secs(3600));
        let backend: Arc<str> = "a".into();
        for id in ["1", "2", "3", "4", "5"] {
            map.learn(id, &backend);
        }
        assert_eq!(map.get("5").as_deref(), Some("a"));
        assert_eq!(map.get("3").as_deref(), Some("a"));
        assert_eq!(map.get("1"), None);
        assert!(map.len() <= 4);
    }
}
