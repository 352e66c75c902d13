//! Unit tests of the policy and the layer, over in-process backends behind a real `Balance`
//! (no sockets). Tests about waiting run on tokio's paused clock.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_balance::{AllCoolingDown, Balance, NoBackends, ServedBy, TriedBackends};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::retry::Policy;
use tower::{BoxError, Layer, Service, ServiceExt};

use super::*;
use crate::policy::{RequestCopy, RetrySettings};

// ---- scripted backends ----

/// What a scripted backend does with one request.
#[derive(Debug, Clone)]
enum Answer {
    /// Answer with this status.
    Status(u16),
    /// Answer 429 with `retry-after-ms`.
    Throttle(Duration),
    /// Fail like an attempt timeout.
    Elapsed,
    /// Fail like a broken exchange (an I/O error).
    Io,
    /// Fail with an error the stack made about the request itself (never retried).
    Refused,
    /// Wait for the notification, then answer with this status.
    Gated(Arc<Notify>, u16),
}

/// One request as a scripted backend saw it.
#[derive(Debug, Clone)]
struct Call {
    backend: usize,
    at: Instant,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    tried: Option<TriedBackends>,
    body: Bytes,
}

/// The answers each backend gives, in order (then 200), and every call received.
#[derive(Debug, Clone)]
struct Script {
    answers: Arc<Vec<Mutex<VecDeque<Answer>>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Script {
    fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    fn backends_called(&self) -> Vec<usize> {
        lock(&self.calls).iter().map(|call| call.backend).collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap()
}

/// A backend service `b<index>` that follows its script.
#[derive(Debug, Clone)]
struct Backend {
    index: usize,
    script: Script,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<ReplayBody>> for Backend {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        let index = self.index;
        let script = self.script.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let Ok(collected) = body.collect().await;
            lock(&script.calls).push(Call {
                backend: index,
                at: Instant::now(),
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                tried: parts.extensions.get::<TriedBackends>().copied(),
                body: collected.to_bytes(),
            });
            let answer = lock(&script.answers[index]).pop_front();
            match answer.unwrap_or(Answer::Status(200)) {
                Answer::Status(code) => Ok(respond(code, index)),
                Answer::Throttle(wait) => {
                    let mut response = respond(429, index);
                    let millis = u64::try_from(wait.as_millis()).unwrap();
                    response
                        .headers_mut()
                        .insert("retry-after-ms", HeaderValue::from(millis));
                    Ok(response)
                }
                Answer::Elapsed => Err(Box::new(tower::timeout::error::Elapsed::new()) as BoxError),
                Answer::Io => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset before the response head",
                )) as BoxError),
                Answer::Refused => Err("refused by the stack".into()),
                Answer::Gated(notify, code) => {
                    notify.notified().await;
                    Ok(respond(code, index))
                }
            }
        })
    }
}

fn respond(code: u16, index: usize) -> Response<String> {
    let mut response = Response::new(format!("b{index} says {code}"));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

/// A `Balance` over one scripted backend per entry of `answers`, named `b0`, `b1`, ...
fn balance(answers: Vec<Vec<Answer>>) -> (Script, Balance<Backend>) {
    let script = Script {
        answers: Arc::new(answers.into_iter().map(|a| Mutex::new(a.into())).collect()),
        calls: Arc::default(),
    };
    let backends = (0..script.answers.len()).map(|index| {
        let backend = Backend {
            index,
            script: script.clone(),
        };
        (format!("b{index}"), backend)
    });
    let balance = Balance::new(backends);
    (script, balance)
}

type Stack = RetryNextBackendService<Balance<Backend>>;

/// The retry layer, configured by `configure`, over a balance of scripted backends.
fn stack(
    answers: Vec<Vec<Answer>>,
    configure: impl FnOnce(RetryNextBackendLayer) -> RetryNextBackendLayer,
) -> (Script, Stack) {
    let (script, balance) = balance(answers);
    let layer = configure(RetryNextBackendLayer::new(balance.health()));
    (script, layer.layer(balance))
}

/// Sends `request` through a clone of `service`.
async fn send<B>(service: &Stack, request: Request<B>) -> Result<Response<String>, BoxError>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    service.clone().oneshot(request).await
}

/// A POST with a small JSON body and a declared length.
fn post(body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

fn served_by(response: &Response<String>) -> &str {
    response.extensions().get::<ServedBy>().unwrap().name()
}

/// A body of separate chunks with no declared length (like `Transfer-Encoding: chunked`); an
/// `Err` entry fails the body there. A stalling one never ends after its chunks: a caller that
/// stopped sending.
#[derive(Debug)]
struct Chunks {
    chunks: VecDeque<Result<Bytes, BoxError>>,
    stalls: bool,
    /// Says it has ended once its chunks are out (and stalls if polled again regardless).
    says_ended: bool,
}

impl Chunks {
    fn new(chunks: impl IntoIterator<Item = Result<Bytes, BoxError>>) -> Self {
        Self {
            chunks: chunks.into_iter().collect(),
            stalls: false,
            says_ended: false,
        }
    }

    fn stalled() -> Self {
        Self {
            chunks: VecDeque::new(),
            stalls: true,
            says_ended: false,
        }
    }

    /// Like hyper's body for a request whose length is known: it says when it has ended.
    fn saying_ended(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into_iter().map(Ok).collect(),
            stalls: true,
            says_ended: true,
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.chunks.pop_front() {
            Some(chunk) => Poll::Ready(Some(chunk.map(Frame::data))),
            None if this.stalls => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.says_ended && self.chunks.is_empty()
    }
}

fn chunked(chunks: Vec<Bytes>) -> Request<Chunks> {
    Request::builder()
        .method(Method::POST)
        .uri("/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21")
        .body(Chunks::new(chunks.into_iter().map(Ok)))
        .unwrap()
}

/// `len` deterministic pseudo-random bytes (xorshift), every byte value possible.
fn noise(len: usize) -> Bytes {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[3]
        })
        .collect::<Vec<u8>>()
        .into()
}

fn settings(health: aoai_balance::BalanceHealth, max_attempts: usize) -> Arc<RetrySettings> {
    Arc::new(RetrySettings {
        health: Arc::new(health),
        max_attempts,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        budget: None,
    })
}

/// Calls `Policy::retry` with the response type pinned down.
fn retry(
    policy: &mut RetryNextBackend,
    request: &mut Request<ReplayBody>,
    result: &mut Result<Response<String>, BoxError>,
) -> Option<Backoff> {
    Policy::<Request<ReplayBody>, Response<String>, BoxError>::retry(policy, request, result)
}

fn clone_request(
    policy: &mut RetryNextBackend,
    request: &Request<ReplayBody>,
) -> Option<Request<ReplayBody>> {
    Policy::<Request<ReplayBody>, Response<String>, BoxError>::clone_request(policy, request)
}

// ---- the policy itself ----

#[tokio::test]
async fn the_policy_records_the_backend_of_each_response_and_error() {
    let (_script, balance) = balance(vec![
        vec![Answer::Status(503)],
        vec![Answer::Elapsed],
        vec![],
    ]);
    let mut policy = RetryNextBackend::new(AzureOpenAiClassifier, settings(balance.health(), 3));
    let mut request = Request::new(ReplayBody::new(Bytes::from_static(b"{}")));

    let attempt = clone_request(&mut policy, &request).unwrap();
    let mut result = balance.clone().oneshot(attempt).await;
    assert_eq!(result.as_ref().unwrap().status(), 503);
    assert!(retry(&mut policy, &mut request, &mut result).is_some());
    let tried = *request.extensions().get::<TriedBackends>().unwrap();
    assert!(tried.contains(0) && !tried.contains(1) && !tried.contains(2));
    assert_eq!((tried.last(), tried.attempts()), (Some(0), 1));

    // The retry carries the record, so the balance picks b1; its error names it.
    let attempt = clone_request(&mut policy, &request).unwrap();
    let mut result = balance.clone().oneshot(attempt).await;
    assert!(result.is_err());
    assert!(retry(&mut policy, &mut request, &mut result).is_some());
    let tried = *request.extensions().get::<TriedBackends>().unwrap();
    assert!(tried.contains(0) && tried.contains(1) && !tried.contains(2));
    assert_eq!((tried.last(), tried.attempts()), (Some(1), 2));
}

#[tokio::test]
async fn each_attempt_carries_the_backends_tried_before_it() {
    let (script, service) = stack(
        vec![vec![Answer::Status(503)], vec![Answer::Status(503)], vec![]],
        |layer| layer,
    );
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b2");

    let calls = script.calls();
    assert_eq!(script.backends_called(), [0, 1, 2]);
    assert_eq!(calls[0].tried, None);
    let second = calls[1].tried.unwrap();
    assert!(second.contains(0) && !second.contains(1));
    assert_eq!((second.last(), second.attempts()), (Some(0), 1));
    let third = calls[2].tried.unwrap();
    assert!(third.contains(0) && third.contains(1) && !third.contains(2));
    assert_eq!((third.last(), third.attempts()), (Some(1), 2));
}

/// A request with what a copy must keep: a method, an absolute URI, a version, repeated,
/// opaque, empty and sensitive fields, an extension, and a 4 KiB body (also returned, with the
/// extension).
fn request_to_copy() -> (Request<ReplayBody>, Bytes, TriedBackends) {
    let payload = noise(4096);
    let mut secret = HeaderValue::from_static("Bearer caller-token");
    secret.set_sensitive(true);
    let mut request = Request::builder()
        .method(Method::PUT)
        .uri("https://gateway.example/openai/deployments/d/embeddings?api-version=2024-10-21&x=%2F")
        .version(Version::HTTP_2)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header("x-multi", "one")
        .header(
            "x-opaque",
            HeaderValue::from_bytes(b"caf\xe9 \t\x80").unwrap(),
        )
        .header("x-multi", "two")
        .header("x-empty", "")
        .header("authorization", secret)
        .body(ReplayBody::new(payload.clone()))
        .unwrap();
    let mut tried = TriedBackends::new();
    tried.insert(1);
    request.extensions_mut().insert(tried);
    (request, payload, tried)
}

#[tokio::test]
async fn clone_request_keeps_method_uri_version_headers_extensions_and_body() {
    let (_script, balance) = balance(vec![vec![], vec![]]);
    let mut policy = RetryNextBackend::new(AzureOpenAiClassifier, settings(balance.health(), 3));
    let (request, payload, tried) = request_to_copy();

    let clone = clone_request(&mut policy, &request).unwrap();
    assert_eq!(clone.method(), Method::PUT);
    assert_eq!(clone.uri(), request.uri());
    assert_eq!(clone.version(), Version::HTTP_2);
    assert_eq!(clone.headers(), request.headers());
    assert_eq!(
        clone
            .headers()
            .get_all("x-multi")
            .iter()
            .collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert_eq!(clone.extensions().get::<TriedBackends>(), Some(&tried));
    assert_eq!(clone.body().size_hint().exact(), Some(4096));

    // Both yield the whole body, from the same buffer: the clone copied a reference, not data.
    let cloned = clone.into_body().frame().await.unwrap().unwrap();
    let original = request.into_body().frame().await.unwrap().unwrap();
    let (cloned, original) = (cloned.into_data().unwrap(), original.into_data().unwrap());
    assert_eq!(cloned, payload);
    assert_eq!(original, payload);
    assert_eq!(cloned.as_ptr(), original.as_ptr());
}

#[tokio::test]
async fn a_request_copy_rebuilds_method_uri_version_headers_extensions_and_body() {
    let (request, payload, tried) = request_to_copy();
    let copy = RequestCopy::of(&request);
    for rebuilt in [copy.to_request(), copy.to_request()] {
        assert_eq!(rebuilt.method(), Method::PUT);
        assert_eq!(rebuilt.uri(), request.uri());
        assert_eq!(rebuilt.version(), Version::HTTP_2);
        assert_eq!(rebuilt.headers(), request.headers());
        let names: Vec<_> = rebuilt
            .headers()
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        let original: Vec<_> = request
            .headers()
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(names, original, "fields in the order they came");
        assert!(rebuilt.headers()["authorization"].is_sensitive());
        assert!(!rebuilt.headers()["x-multi"].is_sensitive());
        assert_eq!(rebuilt.extensions().get::<TriedBackends>(), Some(&tried));
        // The body is the same buffer: the copy kept a reference, not the data.
        let body = rebuilt.into_body().frame().await.unwrap().unwrap();
        let body = body.into_data().unwrap();
        assert_eq!(body, payload);
        assert_eq!(body.as_ptr(), payload.as_ptr());
    }
    let empty = RequestCopy::of(&Request::new(ReplayBody::default())).to_request();
    assert!(empty.headers().is_empty());
    assert!(empty.body().is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn a_retry_to_an_untried_backend_goes_at_once_and_backs_off_once_all_were_tried() {
    let (script, service) = stack(
        vec![
            vec![Answer::Status(503), Answer::Status(503)],
            vec![Answer::Status(503)],
        ],
        |layer| {
            layer
                .max_attempts(3)
                .backoff(Duration::from_millis(100), Duration::from_secs(5))
        },
    );
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(served_by(&response), "b0");
    let calls = script.calls();
    assert_eq!(script.backends_called(), [0, 1, 0]);
    // On the paused clock time only moves when something sleeps.
    assert_eq!(
        calls[1].at, calls[0].at,
        "no backoff before an untried backend"
    );
    let backoff = calls[2].at - calls[1].at;
    assert!(
        backoff > Duration::ZERO,
        "a backoff once every backend was tried"
    );
    // Full jitter up to base * 2^(attempts - 1) = 200 ms.
    assert!(backoff <= Duration::from_millis(201), "{backoff:?}");
}

#[test]
fn set_retry_after_rounds_seconds_up_and_keeps_milliseconds() {
    let mut response = Response::new(());
    set_retry_after(&mut response, Duration::from_millis(1500));
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    set_retry_after(&mut response, Duration::from_secs(30));
    assert_eq!(response.headers()["retry-after"], "30");
    assert_eq!(response.headers()["retry-after-ms"], "30000");
    assert_eq!(response.headers().get_all("retry-after").iter().count(), 1);
}

// ---- what is retried ----

#[tokio::test]
async fn retryable_outcomes_go_to_the_next_backend() {
    let cases = [
        Answer::Status(408),
        Answer::Throttle(Duration::from_secs(1)),
        Answer::Status(500),
        Answer::Status(502),
        Answer::Status(503),
        Answer::Status(504),
        Answer::Elapsed,
        Answer::Io,
    ];
    for answer in cases {
        let (script, service) = stack(vec![vec![answer.clone()], vec![]], |layer| layer);
        let response = send(&service, post(b"{}")).await.unwrap();
        assert_eq!(response.status(), 200, "{answer:?}");
        assert_eq!(served_by(&response), "b1", "{answer:?}");
        assert_eq!(script.backends_called(), [0, 1], "{answer:?}");
    }
}

#[tokio::test]
async fn final_outcomes_make_exactly_one_call() {
    for code in [400, 404, 413, 422] {
        let (script, service) = stack(vec![vec![Answer::Status(code)], vec![]], |layer| layer);
        let response = send(&service, post(b"{}")).await.unwrap();
        assert_eq!(response.status(), code);
        assert_eq!(response.body(), &format!("b0 says {code}"));
        assert_eq!(script.backends_called(), [0], "{code}");
    }
    let (script, service) = stack(vec![vec![Answer::Refused], vec![]], |layer| layer);
    let error = send(&service, post(b"{}")).await.unwrap_err();
    assert!(
        error.to_string().contains("refused by the stack"),
        "{error}"
    );
    assert_eq!(script.backends_called(), [0]);
}

#[tokio::test]
async fn a_403_goes_on_to_an_untried_backend_and_is_the_callers_when_none_is_left() {
    let (script, service) = stack(vec![vec![Answer::Status(403)], vec![]], |layer| layer);
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b1");
    assert_eq!(script.backends_called(), [0, 1]);

    let (script, service) = stack(
        vec![vec![Answer::Status(403)], vec![Answer::Status(403)]],
        |layer| layer,
    );
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(script.backends_called(), [0, 1]);
}

#[tokio::test]
async fn unauthorized_is_retried_once() {
    let (script, service) = stack(vec![vec![Answer::Status(401)], vec![]], |layer| layer);
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b1");
    assert_eq!(script.backends_called(), [0, 1]);

    let all_401 = vec![vec![Answer::Status(401)]; 3];
    let (script, service) = stack(all_401, |layer| layer.max_attempts(3));
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(served_by(&response), "b1");
    assert_eq!(script.backends_called(), [0, 1]);
}

#[tokio::test]
async fn max_attempts_is_respected_exactly() {
    for max in 1..=4 {
        let (script, service) = stack(vec![vec![Answer::Status(503)]; 4], |layer| {
            layer.max_attempts(max)
        });
        let response = send(&service, post(b"{}")).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(served_by(&response), format!("b{}", max - 1));
        assert_eq!(script.calls().len(), max, "max_attempts({max})");
    }
    // Zero means one: the first attempt always goes.
    let (script, service) = stack(vec![vec![Answer::Status(503)]; 2], |layer| {
        layer.max_attempts(0)
    });
    assert_eq!(send(&service, post(b"{}")).await.unwrap().status(), 503);
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test]
async fn the_default_is_three_attempts() {
    let (script, service) = stack(vec![vec![Answer::Status(503)]; 4], |layer| layer);
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(script.calls().len(), DEFAULT_MAX_ATTEMPTS);
    assert_eq!(DEFAULT_MAX_ATTEMPTS, 3);
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_stops_retries() {
    // A reserve of one retry (1 a second over 1 s), and requests earn nothing.
    let (script, service) = stack(
        vec![vec![Answer::Status(503), Answer::Status(503)], vec![]],
        |layer| layer.budget(Duration::from_secs(1), 1, 0.0),
    );
    let first = send(&service, post(b"{}")).await.unwrap();
    assert_eq!((first.status(), served_by(&first)), (StatusCode::OK, "b1"));
    assert_eq!(script.backends_called(), [0, 1]);
    // The budget is spent: the next failure goes back to the caller after one call.
    let second = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(second.status(), 503);
    assert_eq!(script.backends_called(), [0, 1, 0]);

    // An empty budget: never a retry.
    let (script, service) = stack(vec![vec![Answer::Status(503)], vec![]], |layer| {
        layer.budget(Duration::from_secs(1), 0, 0.0)
    });
    assert_eq!(send(&service, post(b"{}")).await.unwrap().status(), 503);
    assert_eq!(script.backends_called(), [0]);

    // The same without a budget: retried.
    let (script, service) = stack(vec![vec![Answer::Status(503)], vec![]], |layer| {
        layer.without_budget()
    });
    assert_eq!(send(&service, post(b"{}")).await.unwrap().status(), 200);
    assert_eq!(script.backends_called(), [0, 1]);
}

#[tokio::test(start_paused = true)]
async fn all_cooling_stops_retries_and_names_the_soonest_recovery() {
    let (script, service) = stack(
        vec![
            vec![Answer::Throttle(Duration::from_secs(30))],
            vec![Answer::Throttle(Duration::from_secs(60))],
        ],
        |layer| layer.max_attempts(5),
    );
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(served_by(&response), "b1");
    // The last 429's own 60 s is replaced by the soonest recovery: b0's 30 s.
    assert_eq!(response.headers()["retry-after-ms"], "30000");
    assert_eq!(response.headers()["retry-after"], "30");
    assert_eq!(script.backends_called(), [0, 1]);

    // Now no backend is contacted at all.
    let error = send(&service, post(b"{}")).await.unwrap_err();
    let cooling = error
        .downcast_ref::<AllCoolingDown>()
        .expect("AllCoolingDown");
    assert_eq!(cooling.retry_after(), Duration::from_secs(30));
    assert_eq!(script.calls().len(), 2);

    tokio::time::advance(Duration::from_secs(30)).await;
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(
        (response.status(), served_by(&response)),
        (StatusCode::OK, "b0")
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_on_the_last_attempt_keeps_its_own_retry_after_while_another_backend_is_up() {
    let (_script, service) = stack(
        vec![vec![Answer::Throttle(Duration::from_secs(5))], vec![]],
        |layer| layer.max_attempts(1),
    );
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after-ms"], "5000");
    assert!(response.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn no_backends_is_returned_without_a_retry() {
    let (_script, balance) = balance(vec![]);
    let service = RetryNextBackendLayer::new(balance.health()).layer(balance);
    let error = send(&service, post(b"{}")).await.unwrap_err();
    assert!(error.is::<NoBackends>(), "{error}");
}

#[tokio::test]
async fn a_retry_never_goes_back_to_the_backend_that_just_failed() {
    // b0 fails only once two other requests have moved the rotation round to b0 again.
    let gate = Arc::new(Notify::new());
    let (script, service) = stack(
        vec![
            vec![Answer::Gated(gate.clone(), 503), Answer::Status(503)],
            vec![],
            vec![],
        ],
        |layer| layer,
    );
    let first = tokio::spawn({
        let service = service.clone();
        async move { send(&service, post(b"{}")).await }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while script.calls().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("b0 called");
    let second = send(&service, post(b"{}")).await.unwrap();
    let third = send(&service, post(b"{}")).await.unwrap();
    assert_eq!((served_by(&second), served_by(&third)), ("b1", "b2"));

    gate.notify_one();
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("first request done")
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(served_by(&first), "b1");
    assert_eq!(script.backends_called(), [0, 1, 2, 1]);
}

// ---- the body ----

#[tokio::test]
async fn the_body_is_replayed_byte_for_byte_on_every_attempt() {
    let payload = noise(64 * 1024);
    let (script, service) = stack(vec![vec![Answer::Status(503)]; 3], |layer| layer);
    let request = chunked(vec![
        payload.slice(..1000),
        payload.slice(1000..40_000),
        payload.slice(40_000..),
    ]);
    let headers = request.headers().clone();
    let response = send(&service, request).await.unwrap();
    assert_eq!(response.status(), 503);
    let calls = script.calls();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert!(
            call.body == payload,
            "backend b{} got another body",
            call.backend
        );
        assert_eq!(call.method, Method::POST);
        assert_eq!(call.headers, headers);
        assert_eq!(call.version, Version::HTTP_11);
        assert_eq!(
            call.uri,
            "/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21"
        );
    }
}

#[tokio::test]
async fn a_body_that_says_it_has_ended_is_not_polled_again() {
    let (script, service) = stack(vec![vec![Answer::Status(503)], vec![]], |layer| layer);
    let mut request = chunked(vec![]);
    *request.body_mut() = Chunks::saying_ended(vec![
        Bytes::from_static(b"{\"messages\":"),
        Bytes::from_static(b"[]}"),
    ]);
    let response = tokio::time::timeout(Duration::from_secs(5), send(&service, request))
        .await
        .expect("the body was polled after it said it had ended, and stalled")
        .unwrap();
    assert_eq!(response.status(), 200);
    let bodies: Vec<Bytes> = script.calls().into_iter().map(|call| call.body).collect();
    assert_eq!(bodies, [&b"{\"messages\":[]}"[..]; 2]);
}

#[tokio::test]
async fn an_empty_body_is_replayed_as_empty() {
    let (script, service) = stack(vec![vec![Answer::Status(500)], vec![]], |layer| layer);
    let request = Request::get("/openai/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&service, request).await.unwrap().status(), 200);
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|call| call.body.is_empty() && call.method == Method::GET)
    );
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_any_call() {
    let (script, service) = stack(vec![vec![]], |layer| layer.body_limit(16));
    let error = send(&service, post(b"{\"seventeen\":\"b\"}"))
        .await
        .unwrap_err();
    let too_large = error.downcast_ref::<BodyTooLarge>().expect("BodyTooLarge");
    assert_eq!(too_large.limit(), 16);
    assert!(script.calls().is_empty());
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_before_any_call() {
    let (script, service) = stack(vec![vec![]], |layer| layer.body_limit(16));
    let request = chunked(vec![Bytes::from_static(b"0123456789"); 2]);
    let error = send(&service, request).await.unwrap_err();
    assert_eq!(error.downcast_ref::<BodyTooLarge>().unwrap().limit(), 16);
    assert!(script.calls().is_empty());

    // Exactly the limit is fine.
    let request = chunked(vec![Bytes::from_static(b"01234567"); 2]);
    assert_eq!(send(&service, request).await.unwrap().status(), 200);
    assert_eq!(script.calls()[0].body, "0123456701234567");
}

#[tokio::test]
async fn a_failing_body_is_a_body_read_error_and_nothing_is_sent() {
    let (script, service) = stack(vec![vec![]], |layer| layer);
    let body = Chunks::new([
        Ok(Bytes::from_static(b"{\"messages\":")),
        Err("the caller went away".into()),
    ]);
    let error = send(&service, Request::new(body)).await.unwrap_err();
    assert!(error.is::<BodyReadError>(), "{error}");
    let source = std::error::Error::source(&*error).unwrap();
    assert_eq!(source.to_string(), "the caller went away");
    assert!(script.calls().is_empty());
}

#[tokio::test]
async fn with_a_tower_test_mock_each_attempt_gets_a_ready_service_and_the_whole_body() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<ReplayBody>, Response<String>>();
    let (_script, balance) = balance(vec![vec![], vec![]]);
    let mut service = RetryNextBackendLayer::new(balance.health()).layer(mock);

    let request = chunked(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
    let call = ServiceExt::<Request<Chunks>>::ready(&mut service)
        .await
        .unwrap()
        .call(request);
    let response = tokio::spawn(call);
    for status in [503, 200] {
        let (request, send) = handle.next_request().await.expect("an attempt");
        let Ok(body) = request.into_body().collect().await;
        assert_eq!(body.to_bytes(), "abcd");
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        send.send_response(response);
    }
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);

    // The service stays usable: the next call needs readiness again, and gets it.
    handle.allow(0);
    let mut ready = std::pin::pin!(ServiceExt::<Request<Chunks>>::ready(&mut service));
    let waker = std::task::Waker::noop();
    assert!(
        ready
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    handle.allow(1);
    assert!(ready.await.is_ok());
}

// ---- the deadline ----

/// A gate that is never opened: an attempt that never answers.
fn hang() -> Answer {
    Answer::Gated(Arc::new(Notify::new()), 200)
}

/// The error of a request the deadline ended, and how long it took.
async fn deadline_error<S, B>(service: S, request: Request<B>) -> (DeadlineElapsed, Duration)
where
    S: Service<Request<B>, Response = Response<String>, Error = BoxError>,
{
    let started = Instant::now();
    let error = service.oneshot(request).await.unwrap_err();
    let elapsed = started.elapsed();
    (*error.downcast::<DeadlineElapsed>().unwrap(), elapsed)
}

#[tokio::test(start_paused = true)]
async fn a_deadline_ends_a_hung_attempt_whose_timeout_is_unknown_or_longer() {
    for attempt_timeout in [None, Some(Duration::from_secs(10))] {
        let (script, service) = stack(vec![vec![hang()]], |layer| {
            layer.deadline(Duration::from_secs(2), attempt_timeout)
        });
        let (error, elapsed) = deadline_error(service, post(b"{}")).await;
        assert_eq!(error.deadline(), Duration::from_secs(2));
        assert_eq!(elapsed, Duration::from_secs(2), "{attempt_timeout:?}");
        assert_eq!(script.calls().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_answered_in_time_is_untouched_by_its_deadline() {
    let (script, service) = stack(vec![vec![Answer::Status(503)], vec![]], |layer| {
        layer.deadline(Duration::from_secs(2), Some(Duration::from_secs(1)))
    });
    let response = send(&service, post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b1");
    assert_eq!(script.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_cuts_short_the_attempt_that_would_outlast_it() {
    // Three backends that never answer, each behind a 1 s attempt timeout (which also cools it
    // down); a 2.5 s deadline. The attempts at 0 s and 1 s end by their own timeouts, before the
    // deadline; the third, from 2 s, would end at 3 s: the deadline ends it at 2.5 s.
    let (script, balance) = balance(vec![vec![hang()], vec![hang()], vec![hang()]]);
    let timed = Balance::new(
        balance
            .get_ref()
            .iter()
            .enumerate()
            .map(|(index, backend)| {
                let backend = tower::timeout::Timeout::new(backend.clone(), Duration::from_secs(1));
                (format!("b{index}"), backend)
            }),
    );
    let service = RetryNextBackendLayer::new(timed.health())
        .max_attempts(5)
        .without_budget()
        .deadline(Duration::from_millis(2500), Some(Duration::from_secs(1)))
        .layer(timed);
    let (error, elapsed) = deadline_error(service, post(b"{}")).await;
    assert_eq!(error.deadline(), Duration::from_millis(2500));
    assert_eq!(elapsed, Duration::from_millis(2500));
    let calls = script.calls();
    let backends: Vec<usize> = calls.iter().map(|call| call.backend).collect();
    assert_eq!(backends, [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_body_still_arriving_at_the_deadline_fails_without_a_call() {
    let (script, service) = stack(vec![vec![]], |layer| {
        layer.deadline(Duration::from_secs(1), Some(Duration::from_secs(10)))
    });
    let request = Request::post("/openai/deployments/gpt-4o/chat/completions")
        .body(Chunks::stalled())
        .unwrap();
    let (_, elapsed) = deadline_error(service, request).await;
    assert_eq!(elapsed, Duration::from_secs(1));
    assert!(script.calls().is_empty());
}

// ---- lingering on an over-limit body ----

/// The frames of a body fed through a channel that holds one frame: each `send` waits until
/// the body has taken the frame before it, and fails once the body is dropped.
#[derive(Debug)]
struct Frames(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl futures_util::Stream for Frames {
    type Item = Result<Frame<Bytes>, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

type Feeder = tokio::sync::mpsc::Sender<Frame<Bytes>>;

/// A request whose body is fed through the returned sender; `declared` sets its
/// `Content-Length`.
fn fed(declared: Option<usize>) -> (Feeder, Request<http_body_util::StreamBody<Frames>>) {
    let (feeder, frames) = tokio::sync::mpsc::channel(1);
    let body = http_body_util::StreamBody::new(Frames(frames));
    let mut request = Request::post("/openai/deployments/gpt-4o/embeddings")
        .body(body)
        .unwrap();
    if let Some(length) = declared {
        request
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    (feeder, request)
}

/// Sends a frame of ten bytes; `false` once the body is gone. Bounded: 10 s.
async fn feed(feeder: &Feeder) -> bool {
    let frame = Frame::data(Bytes::from_static(b"0123456789"));
    tokio::time::timeout(Duration::from_secs(10), feeder.send(frame))
        .await
        .expect("the body takes the frame or is dropped")
        .is_ok()
}

#[tokio::test]
async fn an_over_limit_body_is_answered_at_once_and_read_on_up_to_the_byte_bound() {
    // Over the limit while it arrives (no declared length), or by its declared length.
    for declared in [None, Some(1000)] {
        let (script, service) = stack(vec![vec![]], |layer| {
            layer
                .body_limit(16)
                .linger(Duration::from_secs(30), Duration::from_secs(5), 100)
        });
        let (feeder, request) = fed(declared);
        let call = tokio::spawn({
            let service = service.clone();
            async move { send(&service, request).await }
        });
        if declared.is_none() {
            // 10 bytes fit; the next 10 are over the limit.
            assert!(feed(&feeder).await && feed(&feeder).await);
        }
        let error = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the caller is answered before its body has ended")
            .unwrap()
            .unwrap_err();
        assert_eq!(error.downcast_ref::<BodyTooLarge>().unwrap().limit(), 16);
        assert!(script.calls().is_empty());

        // The caller goes on sending; every frame is taken, up to 100 bytes...
        for frame in 0..10 {
            assert!(feed(&feeder).await, "frame {frame} ({declared:?})");
        }
        // ... and after the next, the body is dropped: the sender sees it closed (a frame it
        // sent meanwhile may still sit in the channel).
        let mut taken_or_queued = 0;
        while feed(&feeder).await {
            taken_or_queued += 1;
        }
        assert!((1..=2).contains(&taken_or_queued), "{taken_or_queued}");
    }
}

#[tokio::test(start_paused = true)]
async fn lingering_ends_after_the_idle_bound_and_after_the_total_bound() {
    let layer = |layer: RetryNextBackendLayer| {
        layer
            .body_limit(16)
            .linger(Duration::from_secs(30), Duration::from_secs(5), u64::MAX)
    };
    // A caller that stops sending: its body is dropped 5 s after its last frame.
    let (_script, service) = stack(vec![vec![]], layer);
    let (feeder, request) = fed(Some(1000));
    let started = Instant::now();
    assert!(
        send(&service, request)
            .await
            .unwrap_err()
            .is::<BodyTooLarge>()
    );
    assert!(feed(&feeder).await);
    tokio::time::timeout(Duration::from_secs(60), feeder.closed())
        .await
        .expect("the body is dropped");
    assert_eq!(started.elapsed(), Duration::from_secs(5));

    // A caller that sends a frame every 4 s: its body is dropped 30 s after the answer.
    let (_script, service) = stack(vec![vec![]], layer);
    let (feeder, request) = fed(Some(1000));
    let started = Instant::now();
    assert!(
        send(&service, request)
            .await
            .unwrap_err()
            .is::<BodyTooLarge>()
    );
    let trickle = tokio::spawn({
        let feeder = feeder.clone();
        async move {
            while feed(&feeder).await {
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), feeder.closed())
        .await
        .expect("the body is dropped");
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    trickle.abort();
}

#[test]
fn without_a_runtime_an_over_limit_body_is_dropped_at_once() {
    let (script, balance) = balance(vec![vec![]]);
    let mut service = RetryNextBackendLayer::new(balance.health())
        .body_limit(16)
        .layer(balance);
    let (feeder, request) = fed(Some(1000));
    // `call` alone, outside any runtime: the refusal needs no polling.
    let future = service.call(request);
    assert!(feeder.is_closed());
    drop(future);
    assert!(script.calls().is_empty());
}

// ---- other balancers ----

#[tokio::test(start_paused = true)]
async fn the_layer_wraps_a_balancer_that_knows_no_health() {
    // A plain service, not a `Balance`: it fails once, then answers.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let service = tower::service_fn({
        let calls = calls.clone();
        move |request: Request<ReplayBody>| {
            let calls = calls.clone();
            async move {
                let Ok(body) = request.into_body().collect().await;
                let mut calls = lock(&calls);
                calls.push((Instant::now(), body.to_bytes()));
                let status = if calls.len() == 1 { 503 } else { 200 };
                Ok::<_, BoxError>(respond(status, 0))
            }
        }
    });
    let service = RetryNextBackendLayer::new(AlwaysAvailable)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .layer(service);
    let response = service.oneshot(post(b"{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    let calls = lock(&calls).clone();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|(_, body)| body == "{}"));
    // No backend is known to be untried: the retry waited a backoff (full jitter up to 100 ms).
    let backoff = calls[1].0 - calls[0].0;
    assert!(
        backoff > Duration::ZERO && backoff <= Duration::from_millis(100),
        "{backoff:?}"
    );
}

#[tokio::test]
async fn budget_settings_out_of_towers_range_are_brought_within_it() {
    let (script, service) = stack(vec![vec![Answer::Status(503)], vec![]], |layer| {
        layer.budget(Duration::ZERO, u32::MAX, f32::NAN)
    });
    assert_eq!(send(&service, post(b"{}")).await.unwrap().status(), 200);
    assert_eq!(script.backends_called(), [0, 1]);
}
