//! Wire behaviour of `aoai_upstream::server` over real loopback sockets.
//!
//! Each test serves a small tower service (one that records what it received and answers with a
//! chosen body, or one built for the case) with `serve_connection`, and talks to it from a raw
//! TCP client that writes exact bytes and parses the answers itself, so the test controls the
//! request framing and sees the answer's framing exactly. Covered: what the service receives
//! (method, target, headers, body bytes, bodies in pieces or read on another task, chunked
//! bodies, `Expect: 100-continue`), keep-alive, HTTP/1.0 and pipelining, the refusals (smuggling
//! shapes, malformed and oversized heads, invalid chunked bodies), the framing of answers
//! (length, chunked, close, `HEAD`, 204, short, long and failing bodies, the service's own
//! framing fields), streaming without buffering (an answer's frames, a request body streamed
//! back), cancellation when the caller leaves (a body read or not), graceful shutdown, service
//! errors, an answer to a caller still sending a body nobody reads, the head timeout (idle
//! connections, heads sent slowly, answers longer than the timeout), and an answer's head freed
//! only once it has gone out. Every wait is bounded by
//! `support::wire::WAIT`: a hang fails instead of blocking.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use aoai_upstream::server::{Builder, Connection, RequestBody, TimedBody, serve_connection};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};
use tower::Service;

mod support;

use support::wire::{Answer, RawClient, within};
use support::{TestBody, channel_body, full};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A bound for something that must not happen (a drop too early, a connection ending too early).
const MUST_NOT_HAPPEN: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Services

/// One request as the service received it.
#[derive(Debug)]
struct Received {
    method: String,
    /// Path and query, as the request line had them.
    uri: String,
    version: http::Version,
    /// Names as `http` spells them (lowercase), values as received, in `HeaderMap` order.
    headers: Vec<(String, String)>,
    /// The body's exact size hint when the service was called.
    size_hint: Option<u64>,
    /// The body read to its end, or the kind of error reading it gave; `None` when the service
    /// did not read it.
    body: Option<Result<Vec<u8>, io::ErrorKind>>,
}

impl Received {
    fn body(&self) -> &[u8] {
        match &self.body {
            Some(Ok(body)) => body,
            other => panic!("the body was not read whole: {other:?}"),
        }
    }
}

/// What a recording service received, and how many times it was called.
struct Log {
    rx: mpsc::UnboundedReceiver<Received>,
    calls: Arc<AtomicUsize>,
}

impl Log {
    async fn next(&mut self) -> Received {
        within("the service to record a request", self.rx.recv())
            .await
            .expect("service gone")
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn assert_no_more(&mut self) {
        if let Ok(received) = self.rx.try_recv() {
            panic!("the service received another request: {received:?}");
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadBody {
    /// Reads the body to its end before answering.
    Whole,
    /// Answers without touching the body.
    Never,
}

/// A service that records each request (after reading its body, if `read` says so) and answers
/// with `respond(received)`.
fn recorder(
    read: ReadBody,
    respond: impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static,
) -> (
    impl Service<
        Request<RequestBody>,
        Response = Response<TestBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
    Log,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let respond = Arc::new(respond);
    let service = tower::service_fn(move |request: Request<RequestBody>| {
        counted.fetch_add(1, Ordering::SeqCst);
        let tx = tx.clone();
        let respond = Arc::clone(&respond);
        async move {
            let (parts, body) = request.into_parts();
            let size_hint = body.size_hint().exact();
            let body = match read {
                ReadBody::Whole => Some(
                    body.collect()
                        .await
                        .map(|collected| collected.to_bytes().to_vec())
                        .map_err(|e| e.kind()),
                ),
                ReadBody::Never => None,
            };
            let received = Received {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                version: parts.version,
                headers: parts
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.as_str().to_owned(),
                            String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                size_hint,
                body,
            };
            let response = respond(&received);
            let _ = tx.send(received);
            Ok::<_, Infallible>(response)
        }
    });
    (service, Log { rx, calls })
}

/// A `respond` for [`recorder`]: `200` with `"{method} {uri} {body}"`.
fn echo(received: &Received) -> Response<TestBody> {
    Response::new(full(echo_text(received)))
}

fn echo_text(received: &Received) -> String {
    let body = match &received.body {
        Some(Ok(body)) => String::from_utf8_lossy(body).into_owned(),
        Some(Err(kind)) => format!("<{kind:?}>"),
        None => String::new(),
    };
    format!("{} {} {body}", received.method, received.uri)
}

/// An answer of `body` with `status`.
fn with_status(body: TestBody, status: StatusCode) -> Response<TestBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// An answer of `body` with the field `name: value`.
fn with_field(body: TestBody, name: &'static str, value: &'static str) -> Response<TestBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(name, value.parse().unwrap());
    response
}

/// A `respond` for [`recorder`] that answers its one request with `body`.
fn once(body: TestBody) -> impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static {
    first_then(body, |_| panic!("one streaming answer"))
}

/// A `respond` for [`recorder`] that answers the first request with `body`, and each later one
/// with `then`.
fn first_then(
    body: TestBody,
    then: impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static,
) -> impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static {
    let first = std::sync::Mutex::new(Some(body));
    move |received| match first.lock().unwrap().take() {
        Some(body) => Response::new(body),
        None => then(received),
    }
}

/// Sends `event` down an answer's channel body and checks that the caller reads it as the next
/// chunk.
async fn assert_relayed(
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
    client: &mut RawClient,
    event: &'static [u8],
) {
    tx.send(Ok(Bytes::from_static(event))).await.unwrap();
    assert_eq!(client.read_chunk().await.as_deref(), Some(event));
}

/// A channel body already holding `frames` and then ending.
fn streamed(frames: &[&'static str]) -> TestBody {
    let (tx, body) = channel_body(8);
    for frame in frames {
        tx.try_send(Ok(Bytes::from_static(frame.as_bytes())))
            .unwrap();
    }
    body
}

/// Sends on its channel when dropped: tells the test a service future was dropped.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

// ---------------------------------------------------------------------------------------------
// Server side

/// A listener on `127.0.0.1:0` serving every accepted connection with a clone of one service.
struct Server {
    addr: SocketAddr,
    /// Each connection's outcome, as connections end.
    ended: mpsc::UnboundedReceiver<io::Result<()>>,
}

impl Server {
    /// Serves `service` with `settings` on a fresh listener, and connects one client to it.
    async fn start<S, B>(settings: Builder, service: S) -> (Self, RawClient)
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = settings.serve_connection(stream, service.clone());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(connection.await);
                });
            }
        });
        let server = Self { addr, ended };
        let client = server.connect().await;
        (server, client)
    }

    async fn connect(&self) -> RawClient {
        RawClient::connect(self.addr).await
    }

    /// The outcome of the next connection to end.
    async fn next_end(&mut self) -> io::Result<()> {
        within("a served connection to end", self.ended.recv())
            .await
            .expect("accept loop gone")
    }

    /// Drops `client`, then gives the outcome of the next connection to end.
    async fn end_of(&mut self, client: RawClient) -> io::Result<()> {
        drop(client);
        self.next_end().await
    }

    /// Checks that no served connection has ended yet.
    fn assert_none_ended(&mut self) {
        if let Ok(outcome) = self.ended.try_recv() {
            panic!("a connection ended: {outcome:?}");
        }
    }
}

/// A [`recorder`] served by a [`Server`] with the default settings, with one client connected.
async fn recorded(
    read: ReadBody,
    respond: impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static,
) -> (Server, RawClient, Log) {
    recorded_with(Builder::new(), read, respond).await
}

/// [`recorded`], serving with `settings`.
async fn recorded_with(
    settings: Builder,
    read: ReadBody,
    respond: impl Fn(&Received) -> Response<TestBody> + Send + Sync + 'static,
) -> (Server, RawClient, Log) {
    let (service, log) = recorder(read, respond);
    let (server, client) = Server::start(settings, service).await;
    (server, client, log)
}

/// A recorder reading each body whole and answering with [`echo`], served, with one client.
async fn echoed() -> (Server, RawClient, Log) {
    echoed_with(Builder::new()).await
}

/// [`echoed`], serving with `settings`.
async fn echoed_with(settings: Builder) -> (Server, RawClient, Log) {
    recorded_with(settings, ReadBody::Whole, echo).await
}

/// What a service that never answers tells: each call, and each of its futures dropped.
struct Hanging {
    called: mpsc::UnboundedReceiver<()>,
    dropped: mpsc::UnboundedReceiver<()>,
}

impl Hanging {
    async fn called(&mut self) {
        within("the service to be called", self.called.recv())
            .await
            .unwrap();
    }

    async fn dropped(&mut self) {
        within("the service future to be dropped", self.dropped.recv())
            .await
            .unwrap();
    }
}

/// A service that never answers, served, with one client. With `hold_body` its future holds the
/// request's body without reading it; without, the request is dropped before the future runs.
async fn hanging(hold_body: bool) -> (Server, RawClient, Hanging) {
    let (called_tx, called) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let service = tower::service_fn(move |request: Request<RequestBody>| {
        let _ = called_tx.send(());
        let guard = DropSignal(dropped_tx.clone());
        let body = hold_body.then(|| request.into_body());
        async move {
            let _body = body;
            let _guard = guard;
            std::future::pending::<Result<Response<TestBody>, Infallible>>().await
        }
    });
    let (server, client) = Server::start(Builder::new(), service).await;
    (server, client, Hanging { called, dropped })
}

/// Polls `connection` on a task of its own until the returned sender fires, then calls
/// `graceful_shutdown` and keeps polling it to its end.
fn run_with_shutdown(connection: Connection) -> (oneshot::Sender<()>, JoinHandle<io::Result<()>>) {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut connection = connection;
        tokio::select! {
            outcome = &mut connection => return outcome,
            _ = rx => {}
        }
        connection.graceful_shutdown();
        connection.await
    });
    (tx, task)
}

/// One connection accepted on a fresh listener and served by `service` under
/// [`run_with_shutdown`], with its client.
async fn served_with_shutdown<S>(
    service: S,
) -> (RawClient, oneshot::Sender<()>, JoinHandle<io::Result<()>>)
where
    S: Service<Request<RequestBody>, Response = Response<TestBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = RawClient::connect(listener.local_addr().unwrap()).await;
    let (stream, _) = within("accept", listener.accept()).await.unwrap();
    let (shutdown, task) = run_with_shutdown(serve_connection(stream, service));
    (client, shutdown, task)
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The answer has exactly one `date` field, an HTTP date within a few seconds of now.
fn assert_date_is_now(answer: &Answer) {
    assert_eq!(answer.header_count("date"), 1, "{answer:?}");
    let date = answer.header("date").unwrap();
    let date = httpdate::parse_http_date(date).unwrap_or_else(|e| panic!("date {date:?}: {e}"));
    let now = SystemTime::now();
    let off = now.duration_since(date).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(5), "date {off:?} away from now");
}

/// The answer has exactly one `content-length` field, `length`.
fn assert_content_length(answer: &Answer, length: usize) {
    assert_eq!(answer.header_count("content-length"), 1, "{answer:?}");
    assert_eq!(
        answer.header("content-length"),
        Some(length.to_string().as_str()),
        "{answer:?}"
    );
}

/// The answer is a `200` with the body `text`.
fn assert_ok(answer: &Answer, text: &str) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), text);
}

/// The next two answers are [`echo`]'s: `text` for a request whose body was `body`, then
/// `GET /next `, and the service received them so. Gives what it received first.
async fn assert_echoed_then_next(
    client: &mut RawClient,
    log: &mut Log,
    text: &str,
    body: &[u8],
) -> Received {
    assert_eq!(client.read_answer().await.text(), text);
    assert_eq!(client.read_answer().await.text(), "GET /next ");
    let received = log.next().await;
    assert_eq!(received.body(), body);
    assert_eq!(log.next().await.uri, "/next");
    received
}

/// `raw` on a fresh connection is refused with `status`, a JSON error of `code`, and
/// `connection: close`; the connection is closed, and the service never called.
async fn assert_refused(raw: &[u8], status: u16, code: &str) {
    let (mut server, mut client, mut log) = echoed().await;
    let answer = client.ask(raw).await;
    assert_refusal(&answer, status, code);
    client.expect_close(&answer).await;
    server
        .end_of(client)
        .await
        .expect("a refusal ends the connection cleanly");
    assert_eq!(log.calls(), 0, "the service was called");
    log.assert_no_more();
}

/// `answer` is a refusal with `status` and a JSON error of `code` with a message.
fn assert_refusal(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.status_line,
        format!(
            "HTTP/1.1 {status} {}",
            StatusCode::from_u16(status)
                .unwrap()
                .canonical_reason()
                .unwrap()
        )
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_content_length(answer, answer.body.len());
    assert_date_is_now(answer);
    let prefix = format!(r#"{{"error":{{"code":"{code}","message":""#);
    let message = answer
        .text()
        .strip_prefix(prefix.as_str())
        .and_then(|rest| rest.strip_suffix(r#""}}"#))
        .unwrap_or_else(|| panic!("error body {:?}", answer.text()));
    assert!(
        !message.is_empty() && !message.contains('"'),
        "message {message:?}"
    );
}

/// [`assert_refused`] with `400 BadRequest`.
async fn assert_bad_request(raw: &[u8]) {
    assert_refused(raw, 400, "BadRequest").await;
}

/// [`assert_refused`] with `431 RequestHeaderFieldsTooLarge`.
async fn assert_head_too_large(raw: &str) {
    assert_refused(raw.as_bytes(), 431, "RequestHeaderFieldsTooLarge").await;
}

// ---------------------------------------------------------------------------------------------
// 1. A request and its answer

#[tokio::test]
async fn a_post_arriving_with_its_body_reaches_the_service_whole_and_is_answered() {
    let (mut server, mut client, mut log) = recorded(ReadBody::Whole, |received| {
        let body = full(format!("got {} bytes", received.body().len()));
        with_field(body, "x-answer", "yes")
    })
    .await;
    let body = r#"{"messages":[{"role":"user","content":"Hi"}]}"#;
    let answer = client
        .ask(format!(
            "POST /openai/deployments/d/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n\
             Host: gw\r\nX-Multi: one\r\nContent-Type: application/json\r\nx-multi: two\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;

    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    assert_eq!(answer.text(), format!("got {} bytes", body.len()));
    assert_content_length(&answer, answer.body.len());
    assert_date_is_now(&answer);
    assert_eq!(answer.header("x-answer"), Some("yes"));
    assert_eq!(answer.header("connection"), None, "{answer:?}");

    let received = log.next().await;
    assert_eq!(received.method, "POST");
    assert_eq!(
        received.uri,
        "/openai/deployments/d/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(received.version, http::Version::HTTP_11);
    let length = body.len().to_string();
    assert_eq!(
        received.headers,
        [
            ("host", "gw"),
            ("x-multi", "one"),
            ("x-multi", "two"),
            ("content-type", "application/json"),
            ("content-length", length.as_str()),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    assert_eq!(received.size_hint, Some(body.len() as u64));
    assert_eq!(received.body(), body.as_bytes());
    server.assert_none_ended();
}

#[tokio::test]
async fn an_answer_with_its_own_date_keeps_it() {
    const DATE: &str = "Thu, 01 Jan 2015 00:00:00 GMT";
    let (_server, mut client, _log) =
        recorded(ReadBody::Whole, |_| with_field(full("dated"), "date", DATE)).await;
    let answer = client.ask("GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.header_count("date"), 1, "{answer:?}");
    assert_eq!(answer.header("date"), Some(DATE));
    assert_eq!(answer.text(), "dated");
}

// ---------------------------------------------------------------------------------------------
// 2. Keep-alive

#[tokio::test]
async fn two_requests_in_turn_on_one_connection_are_both_answered() {
    let (mut server, mut client, mut log) = echoed().await;

    let first = client
        .ask("POST /first HTTP/1.1\r\nContent-Length: 3\r\n\r\none")
        .await;
    assert_ok(&first, "POST /first one");
    assert_eq!(first.header("connection"), None);

    let second = client.ask("GET /second?x=1 HTTP/1.1\r\n\r\n").await;
    assert_ok(&second, "GET /second?x=1 ");

    assert_eq!(log.next().await.uri, "/first");
    let received = log.next().await;
    assert_eq!(received.uri, "/second?x=1");
    assert_eq!(received.size_hint, Some(0));
    assert_eq!(received.body(), b"");
    server.assert_none_ended();

    server
        .end_of(client)
        .await
        .expect("the caller closing an idle connection ends it cleanly");
}

#[tokio::test]
async fn an_http10_request_without_keep_alive_is_answered_and_the_connection_closed() {
    let (_server, mut client, mut log) = echoed().await;
    let answer = client.ask("GET /old HTTP/1.0\r\nHost: gw\r\n\r\n").await;
    assert_ok(&answer, "GET /old ");
    assert_content_length(&answer, answer.body.len());
    client.expect_close(&answer).await;
    assert_eq!(log.next().await.version, http::Version::HTTP_10);
}

#[tokio::test]
async fn an_http10_request_with_keep_alive_keeps_the_connection() {
    let (_server, mut client, mut log) = echoed().await;

    let first = client
        .ask("GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_ok(&first, "GET /one ");
    assert_content_length(&first, first.body.len());
    assert_eq!(first.header_count("connection"), 1, "{first:?}");
    assert_eq!(first.header("connection"), Some("keep-alive"));

    // Still open: a second request (without keep-alive this time) is answered, then closed.
    let second = client.ask("GET /two HTTP/1.0\r\n\r\n").await;
    assert_eq!(second.text(), "GET /two ");
    client.expect_close(&second).await;

    assert_eq!(log.next().await.version, http::Version::HTTP_10);
    assert_eq!(log.next().await.uri, "/two");
}

#[tokio::test]
async fn connection_close_on_http11_is_answered_with_close_and_the_connection_closed() {
    let (mut server, mut client, mut log) = echoed().await;
    let answer = client
        .ask("GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await;
    assert_ok(&answer, "GET /last ");
    client.expect_close(&answer).await;
    assert_eq!(log.next().await.uri, "/last");
    server.end_of(client).await.expect("ends cleanly");
}

/// An answer of `body` with `x-trace: abc` and `connection: options`.
fn traced(options: &'static str) -> Response<TestBody> {
    let mut response = with_field(full("traced"), "x-trace", "abc");
    response
        .headers_mut()
        .insert("connection", options.parse().unwrap());
    response
}

#[tokio::test]
async fn an_answer_naming_its_own_hop_by_hop_field_sends_both_and_keeps_the_connection() {
    let (_server, mut client, mut log) =
        recorded(ReadBody::Whole, |_| traced("x-trace, keep-alive")).await;
    let answer = client.ask("GET /one HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.text(), "traced");
    assert_eq!(answer.header("x-trace"), Some("abc"), "{answer:?}");
    assert_eq!(answer.header_count("connection"), 1, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("x-trace"));

    let second = client.ask("GET /two HTTP/1.1\r\n\r\n").await;
    assert_eq!(second.text(), "traced", "still open: {second:?}");
    assert_eq!(log.next().await.uri, "/one");
    assert_eq!(log.next().await.uri, "/two");
}

#[tokio::test]
async fn an_answer_saying_close_with_a_named_field_is_closed_after_it() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |_| traced("close, x-trace")).await;
    let answer = client.ask("GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.header("x-trace"), Some("abc"), "{answer:?}");
    let connection: Vec<&str> = answer
        .headers
        .iter()
        .filter(|(name, _)| name == "connection")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(connection, ["x-trace", "close"], "{answer:?}");
    client.expect_closed().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Pipelining

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send(
            "GET /first HTTP/1.1\r\n\r\n\
             POST /second HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
             GET /third HTTP/1.1\r\n\r\n",
        )
        .await;
    for expected in ["GET /first ", "POST /second hello", "GET /third "] {
        assert_ok(&client.read_answer().await, expected);
    }
    for expected in ["/first", "/second", "/third"] {
        assert_eq!(log.next().await.uri, expected);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A body in pieces

#[tokio::test]
async fn a_body_arriving_in_pieces_reaches_the_service_whole() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send_alone("POST /pieces HTTP/1.1\r\nContent-Length: 26\r\n\r\n")
        .await;
    client
        .send_in_pieces(&[b"abcdefg", b"hijklmn", b"opqrstu", b"vwxyz"])
        .await;

    let answer = client.read_answer().await;
    assert_ok(&answer, "POST /pieces abcdefghijklmnopqrstuvwxyz");
    let received = log.next().await;
    assert_eq!(received.size_hint, Some(26), "the declared length");
    assert_eq!(received.body(), b"abcdefghijklmnopqrstuvwxyz");

    // The body's end was found exactly: the connection carries the next request.
    let next = client.ask("GET /after HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "GET /after ");
}

#[tokio::test]
async fn a_body_whose_rest_arrives_with_the_next_request_is_split_right() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send_alone("POST /split HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        .await;
    client.send("56789GET /next HTTP/1.1\r\n\r\n").await;
    assert_echoed_then_next(
        &mut client,
        &mut log,
        "POST /split 0123456789",
        b"0123456789",
    )
    .await;
}

#[tokio::test]
async fn a_body_read_on_another_task_still_arrives() {
    // As a service does that hands the body to a client whose connection task sends it (hyper's
    // client, reqwest): the body is polled from a task other than the connection's, while the
    // rest of it has yet to arrive.
    let service = tower::service_fn(|request: Request<RequestBody>| async move {
        let body = tokio::spawn(async move { request.into_body().collect().await })
            .await
            .unwrap();
        let text = match body {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(e) => format!("<{:?}>", e.kind()),
        };
        Ok::<_, Infallible>(Response::new(full(text)))
    });
    let (_server, mut client) = Server::start(Builder::new(), service).await;
    client
        .send_alone("POST /elsewhere HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
        .await;
    client.send_in_pieces(&[b"hello", b"world"]).await;
    assert_ok(&client.read_answer().await, "helloworld");
}

// ---------------------------------------------------------------------------------------------
// 5. Chunked request bodies

#[tokio::test]
async fn a_chunked_body_in_one_write_is_decoded_and_the_next_pipelined_request_served() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send(
            "POST /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
             GET /next HTTP/1.1\r\n\r\n",
        )
        .await;
    let text = "POST /chunked hello world";
    let received = assert_echoed_then_next(&mut client, &mut log, text, b"hello world").await;
    assert_eq!(received.size_hint, None, "a chunked body's size is unknown");
    assert_eq!(
        received.headers,
        [("transfer-encoding".to_owned(), "chunked".to_owned())]
    );
}

#[tokio::test]
async fn a_chunked_body_split_across_writes_is_decoded() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send_alone("POST /split HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    // Boundaries inside the size line, its CRLF, the data, the data's CRLF and the last chunk.
    client
        .send_in_pieces(&[
            b"5\r",
            b"\nhel",
            b"lo\r",
            b"\n1",
            b"0\r\n0123456789",
            b"abcdef\r\n0",
            b"\r\n\r",
            b"\nGET /next HTTP/1.1\r\n\r\n",
        ])
        .await;
    let body = b"hello0123456789abcdef";
    let text = "POST /split hello0123456789abcdef";
    assert_echoed_then_next(&mut client, &mut log, text, body).await;
}

#[tokio::test]
async fn chunk_extensions_and_trailers_are_accepted_and_not_part_of_the_body() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send(
            "POST /ext HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;name=value\r\nhello\r\n\
             3 ; quoted=\"a;b\"\r\nabc\r\n\
             0;last\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n\
             GET /next HTTP/1.1\r\n\r\n",
        )
        .await;
    assert_echoed_then_next(&mut client, &mut log, "POST /ext helloabc", b"helloabc").await;
}

// ---------------------------------------------------------------------------------------------
// 6. Expect: 100-continue

#[tokio::test]
async fn expect_100_continue_is_answered_when_the_service_reads_the_body() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send("POST /upload HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = client.read_head().await;
    assert_eq!(interim.status_line, "HTTP/1.1 100 Continue");
    assert!(interim.headers.is_empty(), "{interim:?}");

    assert_ok(&client.ask("hello").await, "POST /upload hello");
    assert_eq!(log.next().await.body(), b"hello");

    let next = client.ask("GET /next HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "GET /next ");
}

#[tokio::test]
async fn expect_100_continue_with_a_chunked_body_is_answered_too() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send("POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(client.read_head().await.status, 100);
    let answer = client.ask("3\r\nabc\r\n0\r\n\r\n").await;
    assert_eq!(answer.text(), "POST /upload abc");
    assert_eq!(log.next().await.body(), b"abc");
}

#[tokio::test]
async fn expect_100_continue_with_the_body_already_sent_gets_the_answer_only() {
    let (_server, mut client, mut log) = echoed().await;
    let answer = client
        .ask(
            "POST /eager HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello\
             GET /next HTTP/1.1\r\n\r\n",
        )
        .await;
    assert_ok(&answer, "POST /eager hello");
    assert_eq!(client.read_answer().await.text(), "GET /next ");
    assert_eq!(log.next().await.body(), b"hello");
}

#[tokio::test]
async fn expect_100_continue_is_not_answered_when_the_service_does_not_read_the_body() {
    let (_server, mut client, mut log) = recorded(ReadBody::Never, |_| {
        with_status(full("no thanks"), StatusCode::PAYLOAD_TOO_LARGE)
    })
    .await;
    // The first thing back is the final answer, though no body byte was sent.
    let answer = client
        .ask("POST /upload HTTP/1.1\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(answer.status_line, "HTTP/1.1 413 Payload Too Large");
    assert_eq!(answer.text(), "no thanks");
    client.expect_close(&answer).await;
    let received = log.next().await;
    assert_eq!(received.uri, "/upload");
    assert_eq!(received.size_hint, Some(1_000_000));
}

// ---------------------------------------------------------------------------------------------
// 7. Refusals

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_400() {
    // The smuggling shape: whichever framing a front end picked, `/smuggled` must not be served.
    assert_bad_request(
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused_400() {
    assert_bad_request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        .await;
    assert_bad_request(b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\nhello!").await;
}

#[tokio::test]
async fn a_malformed_content_length_is_refused_400() {
    assert_bad_request(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello").await;
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused_400() {
    assert_bad_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxxxxx").await;
    assert_bad_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n")
        .await;
}

#[tokio::test]
async fn a_coding_before_chunked_is_refused_501() {
    assert_refused(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "NotImplemented",
    )
    .await;
}

#[tokio::test]
async fn a_malformed_request_line_is_refused_400() {
    assert_bad_request(b"GET / HTTP/1.1x\r\n\r\n").await;
    assert_bad_request(b"GET / HTTP/2.0\r\n\r\n").await;
    assert_bad_request(b"G(T / HTTP/1.1\r\n\r\n").await;
}

#[tokio::test]
async fn more_than_100_header_fields_are_refused_431() {
    let fields: String = (0..101).map(|i| format!("x-f{i}: v\r\n")).collect();
    assert_head_too_large(&format!("GET / HTTP/1.1\r\n{fields}\r\n")).await;
}

#[tokio::test]
async fn a_head_over_64_kib_is_refused_431() {
    let big = "a".repeat(70 * 1024);
    assert_head_too_large(&format!("GET / HTTP/1.1\r\nx-big: {big}\r\n\r\n")).await;
}

#[tokio::test]
async fn heads_at_the_limits_are_accepted() {
    let (_server, mut client, mut log) = echoed().await;

    let fields: String = (0..100).map(|i| format!("x-f{i}: v{i}\r\n")).collect();
    let answer = client
        .ask(format!("GET /many HTTP/1.1\r\n{fields}\r\n"))
        .await;
    assert_eq!(answer.status, 200);
    let received = log.next().await;
    assert_eq!(received.headers.len(), 100);
    assert_eq!(received.headers[99], ("x-f99".to_owned(), "v99".to_owned()));

    let big = "b".repeat(60 * 1024);
    let answer = client
        .ask(format!("GET /big HTTP/1.1\r\nx-big: {big}\r\n\r\n"))
        .await;
    assert_eq!(answer.status, 200);
    let received = log.next().await;
    assert_eq!(received.headers, [("x-big".to_owned(), big)]);
}

#[tokio::test]
async fn transfer_encoding_on_http10_is_refused_400() {
    assert_bad_request(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

/// The next answer is the `400` of [`echo`] for a body that failed as invalid (`text`), and the
/// connection is closed after it.
async fn assert_invalid_body_answered(client: &mut RawClient, log: &mut Log, text: &str) {
    let answer = client.read_answer().await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.text(), text);
    client.expect_close(&answer).await;
    assert_eq!(log.next().await.body, Some(Err(io::ErrorKind::InvalidData)));
}

#[tokio::test]
async fn an_invalid_chunk_size_fails_the_body_and_closes_the_connection() {
    let (server, mut client, mut log) = recorded(ReadBody::Whole, |received| {
        if received.body.as_ref().is_some_and(Result::is_err) {
            with_status(full(echo_text(received)), StatusCode::BAD_REQUEST)
        } else {
            echo(received)
        }
    })
    .await;

    // Arriving with the head.
    client
        .send(
            "POST /bad HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             zz\r\nhello\r\n0\r\n\r\nGET /after HTTP/1.1\r\n\r\n",
        )
        .await;
    assert_invalid_body_answered(&mut client, &mut log, "POST /bad <InvalidData>").await;

    // Arriving after a good chunk.
    let mut client = server.connect().await;
    client
        .send_alone("POST /bad-later HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    client
        .send("5x\r\nworld\r\n0\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
        .await;
    assert_invalid_body_answered(&mut client, &mut log, "POST /bad-later <InvalidData>").await;

    assert_eq!(log.calls(), 2, "`/after` must not be served");
    log.assert_no_more();
}

// ---------------------------------------------------------------------------------------------
// 8. Answer framing

#[tokio::test]
async fn an_answer_of_known_size_gets_content_length() {
    let (_server, mut client, _log) =
        recorded(ReadBody::Whole, |_| Response::new(full("exactly 16 bytes"))).await;
    let answer = client.ask("GET / HTTP/1.1\r\n\r\n").await;
    assert_content_length(&answer, 16);
    assert_eq!(answer.header("transfer-encoding"), None);
    assert_eq!(answer.text(), "exactly 16 bytes");
}

#[tokio::test]
async fn a_streaming_answer_is_chunked_for_http11() {
    let (mut server, mut client, _log) = recorded(ReadBody::Whole, |_| {
        Response::new(streamed(&["hello", " ", "world"]))
    })
    .await;
    let answer = client.ask("GET /stream HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header_count("transfer-encoding"), 1, "{answer:?}");
    assert!(answer.is_chunked(), "{answer:?}");
    assert_eq!(answer.header("content-length"), None);
    assert_eq!(answer.text(), "hello world");
    assert_eq!(answer.header("connection"), None);

    // The last chunk ended it exactly: the connection carries the next request.
    let next = client.ask("GET /again HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "hello world");
    server.assert_none_ended();
}

#[tokio::test]
async fn a_streaming_answer_to_http10_is_delimited_by_close() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |_| {
        Response::new(streamed(&["part one, ", "part two"]))
    })
    .await;
    // Even a caller asking to keep the connection: only closing it can end the body.
    let answer = client
        .ask("GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
    assert_eq!(answer.header("content-length"), None, "{answer:?}");
    assert!(answer.says_close(), "{answer:?}");
    assert_eq!(answer.text(), "part one, part two");
}

#[tokio::test]
async fn a_head_request_gets_content_length_and_no_body_and_the_connection_stays_usable() {
    let (_server, mut client, mut log) = echoed().await;
    client.send("HEAD /resource HTTP/1.1\r\n\r\n").await;
    let answer = client.read_head_answer().await;
    assert_eq!(answer.status, 200);
    assert_content_length(&answer, "HEAD /resource ".len());
    assert_eq!(log.next().await.method, "HEAD");

    // Any body byte sent after the HEAD answer would come before this answer's status line.
    let next = client.ask("GET /next HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "GET /next ");
}

#[tokio::test]
async fn a_head_request_for_a_streaming_answer_gets_no_body() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |received| {
        if received.method == "HEAD" {
            Response::new(streamed(&["never sent"]))
        } else {
            Response::new(full("after"))
        }
    })
    .await;
    client.send("HEAD /stream HTTP/1.1\r\n\r\n").await;
    let answer = client.read_head_answer().await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-length"), None, "{answer:?}");
    let next = client.ask("GET /next HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "after");
}

#[tokio::test]
async fn a_204_answer_has_no_body_and_no_content_length() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |received| {
        if received.uri == "/none" {
            // A body the service gave anyway must not reach the wire.
            with_status(full("not sent"), StatusCode::NO_CONTENT)
        } else {
            Response::new(full("after"))
        }
    })
    .await;
    client.send("DELETE /none HTTP/1.1\r\n\r\n").await;
    let answer = client.read_head().await;
    assert_eq!(answer.status_line, "HTTP/1.1 204 No Content");
    assert_eq!(answer.header("content-length"), None, "{answer:?}");
    assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
    let next = client.ask("GET /next HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "after");
}

#[tokio::test]
async fn an_answer_with_connection_close_closes_the_connection() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |_| {
        with_field(full("bye"), "connection", "close")
    })
    .await;
    let answer = client.ask("GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.text(), "bye");
    client.expect_close(&answer).await;
}

#[tokio::test]
async fn an_answer_body_shorter_than_its_content_length_closes_the_connection() {
    let (mut server, mut client, _log) = recorded(ReadBody::Whole, |_| {
        with_field(full("short"), "content-length", "10")
    })
    .await;
    client.send("GET / HTTP/1.1\r\n\r\n").await;
    assert_content_length(&client.read_head().await, 10);
    // What the body had, then the close that tells the caller it is cut short.
    assert_eq!(client.read_to_end().await, b"short");
    server
        .end_of(client)
        .await
        .expect("ends without an I/O error");
}

#[tokio::test]
async fn an_answer_body_longer_than_its_content_length_is_cut_and_the_connection_closed() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |_| {
        with_field(full("too long"), "content-length", "3")
    })
    .await;
    client.send("GET / HTTP/1.1\r\n\r\n").await;
    assert_content_length(&client.read_head().await, 3);
    assert_eq!(client.read_to_end().await, b"too");
}

#[tokio::test]
async fn the_answers_own_transfer_encoding_is_not_duplicated() {
    let (_server, mut client, _log) = recorded(ReadBody::Whole, |received| {
        let body = if received.uri == "/stream" {
            streamed(&["abc", "def"])
        } else {
            full("sized")
        };
        with_field(body, "transfer-encoding", "chunked")
    })
    .await;

    let answer = client.ask("GET /stream HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.header_count("transfer-encoding"), 1, "{answer:?}");
    assert!(answer.is_chunked());
    assert_eq!(answer.text(), "abcdef");

    // A body of known size goes with its length whatever the service's field said.
    let answer = client.ask("GET /sized HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
    assert_content_length(&answer, 5);
    assert_eq!(answer.text(), "sized");

    let next = client.ask("GET /sized HTTP/1.1\r\n\r\n").await;
    assert_eq!(next.text(), "sized");
}

#[tokio::test]
async fn an_answer_body_failing_midway_closes_without_the_last_chunk() {
    let (tx, body) = channel_body(8);
    tx.try_send(Ok(Bytes::from_static(b"partial"))).unwrap();
    tx.try_send(Err(io::Error::other("backend gone"))).unwrap();
    let (_server, mut client, _log) = recorded(ReadBody::Whole, once(body)).await;
    client.send("GET /stream HTTP/1.1\r\n\r\n").await;
    let answer = client.read_head().await;
    assert!(answer.is_chunked(), "{answer:?}");
    assert_eq!(client.read_chunk().await.as_deref(), Some(&b"partial"[..]));
    assert_eq!(
        client.read_to_end().await,
        b"",
        "no last chunk: the caller must see the body cut short"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Streaming

#[tokio::test]
async fn a_streaming_answer_reaches_the_caller_frame_by_frame() {
    let (tx, body) = channel_body(8);
    let (_server, mut client, _log) = recorded(ReadBody::Whole, once(body)).await;
    client
        .send("POST /sse HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .await;

    tx.send(Ok(Bytes::from_static(b"data: first\n\n")))
        .await
        .unwrap();
    let answer = client.read_head().await;
    assert!(answer.is_chunked(), "{answer:?}");
    // The second frame is not released until the first has been read by the caller.
    assert_eq!(
        client.read_chunk().await.as_deref(),
        Some(&b"data: first\n\n"[..])
    );
    assert_relayed(&tx, &mut client, b"data: second\n\n").await;
    drop(tx);
    assert_eq!(client.read_chunk().await, None);
}

#[tokio::test]
async fn a_request_pipelined_while_a_stream_waits_is_answered_after_it() {
    // A waiting stream gives its read buffer back; what the caller sends meanwhile must still be
    // read and kept for after the stream.
    let (tx, body) = channel_body(8);
    let (_server, mut client, _log) = recorded(
        ReadBody::Whole,
        first_then(body, |received| {
            Response::new(full(format!("after {}", received.uri)))
        }),
    )
    .await;
    client
        .send("POST /sse HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .await;
    tx.send(Ok(Bytes::from_static(b"data: first\n\n")))
        .await
        .unwrap();
    assert!(client.read_head().await.is_chunked());
    assert_eq!(
        client.read_chunk().await.as_deref(),
        Some(&b"data: first\n\n"[..])
    );
    // Sent alone, it is read while the stream waits, before the stream's next frame.
    client.send_alone("GET /next HTTP/1.1\r\n\r\n").await;
    assert_relayed(&tx, &mut client, b"data: second\n\n").await;
    drop(tx);
    assert_eq!(client.read_chunk().await, None);
    assert_ok(&client.read_answer().await, "after /next");
}

#[tokio::test]
async fn a_service_answering_with_its_request_body_streams_it_back() {
    // The answer's body is the request's body: what arrives after the answer started must
    // still be read off the connection and go back out.
    let service = tower::service_fn(|request: Request<RequestBody>| async move {
        Ok::<_, Infallible>(Response::new(request.into_body()))
    });
    let (_server, mut client) = Server::start(Builder::new(), service).await;
    client
        .send("POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nhello")
        .await;
    let answer = client.read_head().await;
    assert_eq!(answer.status, 200);
    assert_content_length(&answer, 10);
    assert_eq!(client.read_exact(5).await, b"hello");
    client.send("world").await;
    assert_eq!(client.read_exact(5).await, b"world");
}

// ---------------------------------------------------------------------------------------------
// 10. The caller leaving

#[tokio::test]
async fn a_caller_leaving_cancels_the_service_future() {
    let (mut server, mut client, mut service) = hanging(false).await;
    client.send("GET /forever HTTP/1.1\r\n\r\n").await;
    service.called().await;
    assert!(
        timeout(MUST_NOT_HAPPEN, service.dropped.recv())
            .await
            .is_err(),
        "the service future was dropped while its caller was still there"
    );

    drop(client);
    service.dropped().await;
    server.next_end().await.expect("ends cleanly");
}

#[tokio::test]
async fn a_caller_closing_mid_body_fails_the_body_with_unexpected_eof() {
    let (_server, mut client, mut log) = echoed().await;
    client
        .send_alone("POST /cut HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await;
    drop(client);
    let received = log.next().await;
    assert_eq!(received.uri, "/cut");
    assert_eq!(received.body, Some(Err(io::ErrorKind::UnexpectedEof)));
}

#[tokio::test]
async fn a_caller_leaving_cancels_a_service_that_has_not_read_the_body() {
    // The service holds the body without reading it yet (waiting for a slot, a token...), while
    // the rest of it has yet to arrive: the caller leaving must still cancel the request.
    let (_server, mut client, mut service) = hanging(true).await;
    client
        .send("POST /held HTTP/1.1\r\nContent-Length: 10\r\n\r\nhalf!")
        .await;
    service.called().await;
    drop(client);
    service.dropped().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Graceful shutdown

#[tokio::test]
async fn graceful_shutdown_ends_an_idle_connection() {
    let (service, _log) = recorder(ReadBody::Whole, echo);
    let (mut client, shutdown, task) = served_with_shutdown(service).await;
    let answer = client.ask("GET /one HTTP/1.1\r\n\r\n").await;
    assert_eq!(answer.text(), "GET /one ");
    assert_eq!(answer.header("connection"), None, "kept alive: {answer:?}");
    sleep(MUST_NOT_HAPPEN).await;
    assert!(!task.is_finished(), "ended before the shutdown");

    shutdown.send(()).unwrap();
    within("the idle connection to end", task)
        .await
        .unwrap()
        .expect("ends cleanly");
    client.expect_closed().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight_with_connection_close() {
    let release = Arc::new(Notify::new());
    let (called_tx, mut called) = mpsc::unbounded_channel();
    let service = {
        let release = Arc::clone(&release);
        tower::service_fn(move |request: Request<RequestBody>| {
            let release = Arc::clone(&release);
            let _ = called_tx.send(request.uri().to_string());
            async move {
                release.notified().await;
                Ok::<_, Infallible>(Response::new(full("finished")))
            }
        })
    };
    let (mut client, shutdown, task) = served_with_shutdown(service).await;
    client.send("GET /slow HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        within("the service to be called", called.recv()).await,
        Some("/slow".to_owned())
    );

    shutdown.send(()).unwrap();
    sleep(MUST_NOT_HAPPEN).await;
    assert!(!task.is_finished(), "ended with its request in flight");

    release.notify_one();
    let answer = client.read_answer().await;
    assert_ok(&answer, "finished");
    client.expect_close(&answer).await;
    drop(client);
    within("the connection to end", task)
        .await
        .unwrap()
        .expect("ends cleanly");
}

// ---------------------------------------------------------------------------------------------
// 12. Service errors

#[tokio::test]
async fn a_service_error_closes_the_connection_without_an_answer() {
    let service = tower::service_fn(|_: Request<RequestBody>| async {
        Err::<Response<TestBody>, _>(io::Error::other("service failed: boom"))
    });
    let (server, client) = Server::start(Builder::new(), service).await;
    assert_closed_unanswered(server, client, "boom").await;
}

/// Sends a request and checks that the connection closes without an answer and ends with an
/// error saying `what`.
async fn assert_closed_unanswered(mut server: Server, mut client: RawClient, what: &str) {
    client.send("GET / HTTP/1.1\r\n\r\n").await;
    client.expect_closed().await;
    let error = server
        .next_end()
        .await
        .expect_err("the connection ends with an error");
    assert!(error.to_string().contains(what), "{error}");
}

#[tokio::test]
async fn an_interim_status_as_the_answer_closes_the_connection_without_it() {
    let (server, client, _log) = recorded(ReadBody::Whole, |_| {
        with_status(full(""), StatusCode::EARLY_HINTS)
    })
    .await;
    assert_closed_unanswered(server, client, "interim status").await;
}

// ---------------------------------------------------------------------------------------------
// 13. An answer to a caller still sending

#[tokio::test]
async fn an_answer_to_a_body_nobody_reads_reaches_a_caller_still_sending() {
    const LENGTH: usize = 4 * 1024 * 1024;
    let (mut server, mut client, mut log) = recorded(ReadBody::Never, |_| {
        with_status(full("too large"), StatusCode::PAYLOAD_TOO_LARGE)
    })
    .await;
    let mut writer = client.writer.take().unwrap();
    let sending = tokio::spawn(async move {
        writer
            .write_all(
                format!("POST /upload HTTP/1.1\r\nContent-Length: {LENGTH}\r\n\r\n").as_bytes(),
            )
            .await?;
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..LENGTH / piece.len() {
            writer.write_all(&piece).await?;
        }
        io::Result::Ok(writer)
    });

    let answer = client.read_answer().await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.text(), "too large");
    client.expect_close(&answer).await;
    let received = log.next().await;
    assert_eq!(received.size_hint, Some(LENGTH as u64));

    // The server read what the caller still sent instead of resetting the connection.
    let writer = within("the caller to finish sending", sending)
        .await
        .unwrap()
        .expect("the caller's body was not refused by a reset");
    drop(writer);
    server.next_end().await.expect("ends cleanly");
}

// ---------------------------------------------------------------------------------------------
// 14. The head timeout

/// The head timeout of these tests: long enough that a loaded machine keeps to what they
/// assume of it (an answer within a fraction of it), short enough to wait out.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// [`echoed`], serving with a head timeout of [`HEAD_TIMEOUT`].
async fn echoed_with_head_timeout() -> (Server, RawClient, Log) {
    echoed_with(Builder::new().head_timeout(Some(HEAD_TIMEOUT))).await
}

/// The server closes `client`'s connection, cleanly and with nothing sent, no sooner than
/// [`HEAD_TIMEOUT`] after `since`.
async fn assert_idle_close(server: &mut Server, client: &mut RawClient, since: Instant) {
    client.expect_closed().await;
    assert!(
        since.elapsed() >= HEAD_TIMEOUT,
        "closed after {:?}",
        since.elapsed()
    );
    server.next_end().await.expect("an idle close is clean");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_head_timeout_without_an_answer() {
    let connected = Instant::now();
    let (mut server, mut client, log) = echoed_with_head_timeout().await;
    assert_idle_close(&mut server, &mut client, connected).await;
    assert_eq!(log.calls(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_the_head_timeout_after_its_last_answer() {
    let (mut server, mut client, _log) = echoed_with_head_timeout().await;
    let asked = Instant::now();
    assert_ok(
        &client.ask("GET /last HTTP/1.1\r\n\r\n").await,
        "GET /last ",
    );
    assert_idle_close(&mut server, &mut client, asked).await;
}

#[tokio::test]
async fn a_connection_asking_more_often_than_the_head_timeout_stays_open_past_it() {
    let (mut server, mut client, mut log) = echoed_with_head_timeout().await;
    let opened = Instant::now();
    for i in 0..5 {
        let answer = client.ask(format!("GET /{i} HTTP/1.1\r\n\r\n")).await;
        assert_ok(&answer, &format!("GET /{i} "));
        assert_eq!(log.next().await.uri, format!("/{i}"));
        sleep(HEAD_TIMEOUT / 2).await;
    }
    assert!(opened.elapsed() > 2 * HEAD_TIMEOUT);
    server.assert_none_ended();
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_refused_408_after_the_head_timeout() {
    let (mut server, mut client, log) = echoed_with_head_timeout().await;
    let mut writer = client.writer.take().unwrap();
    let started = Instant::now();
    // Each byte comes well within the timeout of the last; the head as a whole takes four times
    // the timeout.
    let dribble = tokio::spawn(async move {
        let head = b"POST /openai/deployments/d/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n";
        let pause = 4 * HEAD_TIMEOUT / head.len() as u32;
        for byte in head {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            sleep(pause).await;
        }
    });
    let answer = client.read_answer().await;
    assert!(
        started.elapsed() >= HEAD_TIMEOUT,
        "refused after {:?}",
        started.elapsed()
    );
    assert_refusal(&answer, 408, "RequestTimeout");
    client.expect_close(&answer).await;
    dribble.abort();
    server
        .next_end()
        .await
        .expect("a refusal ends the connection cleanly");
    assert_eq!(log.calls(), 0, "the service was called");
}

/// A connection served by `serve_connection_waited` after it waited `waited` since it was
/// accepted (as the gateway serves one after looking at its first bytes), with part of a head
/// sent at once: the time from its acceptance to its 408.
async fn refused_after_waiting(waited: Duration) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (service, log) = recorder(ReadBody::Whole, echo);
    let mut client = RawClient::connect(listener.local_addr().unwrap()).await;
    let (stream, _) = listener.accept().await.unwrap();
    let accepted = Instant::now();
    client.send("GET /late HTTP/1.1\r\nhost: x\r\n").await;
    sleep(waited).await;
    let connection = Builder::new()
        .head_timeout(Some(HEAD_TIMEOUT))
        .serve_connection_waited(stream, service, accepted.elapsed());
    let served = tokio::spawn(connection);
    let answer = client.read_answer().await;
    let refused = accepted.elapsed();
    assert_refusal(&answer, 408, "RequestTimeout");
    client.expect_close(&answer).await;
    within("the connection to end", served)
        .await
        .unwrap()
        .expect("a refusal ends the connection cleanly");
    assert_eq!(log.calls(), 0, "the service was called");
    refused
}

#[tokio::test]
async fn a_connection_that_waited_before_it_is_served_gets_the_rest_of_the_head_timeout() {
    // Three quarters waited: the rest, not the whole timeout again (1.75 timeouts in all).
    let refused = refused_after_waiting(HEAD_TIMEOUT * 3 / 4).await;
    assert!(refused >= HEAD_TIMEOUT, "refused after {refused:?}");
    assert!(refused < HEAD_TIMEOUT * 3 / 2, "refused after {refused:?}");
    // Longer than the timeout: refused at once, not a whole timeout later (2.25 timeouts).
    let refused = refused_after_waiting(HEAD_TIMEOUT * 5 / 4).await;
    assert!(refused < HEAD_TIMEOUT * 7 / 4, "refused after {refused:?}");
}

#[tokio::test]
async fn an_answer_longer_than_the_timeouts_is_not_cut_and_the_next_wait_gets_all_of_the_head_timeout()
 {
    let (tx, body) = channel_body(8);
    // The send timeout bounds each wait for the caller to make room, not the answer.
    let settings = Builder::new()
        .head_timeout(Some(HEAD_TIMEOUT))
        .send_timeout(Some(HEAD_TIMEOUT));
    // The first request gets the stream, the next ones an echo.
    let (mut server, mut client, mut log) =
        recorded_with(settings, ReadBody::Whole, first_then(body, echo)).await;
    client.send("GET /sse HTTP/1.1\r\n\r\n").await;
    assert!(client.read_head().await.is_chunked());
    // The answer streams for twice the timeout.
    for _ in 0..4 {
        assert_relayed(&tx, &mut client, b"data: {}\n\n").await;
        sleep(HEAD_TIMEOUT / 2).await;
    }
    drop(tx);
    assert_eq!(client.read_chunk().await, None);
    assert_eq!(log.next().await.uri, "/sse");
    // The ticks that fired during the answer count nothing against the wait after it: the
    // connection is still open most of a timeout later.
    sleep(HEAD_TIMEOUT * 7 / 8).await;
    client.send("GET /next HTTP/1.1\r\n\r\n").await;
    assert_ok(&client.read_answer().await, "GET /next ");
    assert_eq!(log.next().await.uri, "/next");
    server.assert_none_ended();
}

#[tokio::test]
async fn a_caller_reading_nothing_of_a_stream_is_closed_after_the_send_timeout_and_the_stream_dropped()
 {
    let (tx, body) = channel_body(1);
    let settings = Builder::new().send_timeout(Some(Duration::from_millis(500)));
    let (mut server, mut client, _log) = recorded_with(settings, ReadBody::Whole, once(body)).await;
    client.send("GET /sse HTTP/1.1\r\n\r\n").await;
    // The backend's stream sends as fast as the connection takes it, until it is dropped.
    let stream = tokio::spawn(async move {
        let event = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut sent = 0usize;
        while tx.send(Ok(event.clone())).await.is_ok() {
            sent += event.len();
        }
        sent
    });
    // The caller reads nothing: the sockets fill, and the write waits for room.
    let error = server
        .next_end()
        .await
        .expect_err("a caller that reads nothing fails its connection");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    let sent = within("the answer's stream to be dropped", stream)
        .await
        .unwrap();
    assert!(
        sent > 64 * 1024,
        "only {sent} bytes sent before the timeout"
    );
    drop(client);
}

// ---------------------------------------------------------------------------------------------
// 15. The body timeout

/// The body timeout of these tests, long enough that a loaded machine keeps to what they assume
/// of it, short enough to wait out.
const BODY_TIMEOUT: Duration = Duration::from_secs(1);

/// [`echoed`], serving with a body timeout of [`BODY_TIMEOUT`].
async fn echoed_with_body_timeout() -> (Server, RawClient, Log) {
    echoed_with(Builder::new().body_timeout(Some(BODY_TIMEOUT))).await
}

#[tokio::test]
async fn a_body_that_stops_arriving_fails_with_timed_out_after_the_body_timeout_and_the_connection_closes()
 {
    let (mut server, mut client, mut log) = echoed_with_body_timeout().await;
    let sent = Instant::now();
    client
        .send("POST /stalled HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await;
    let received = log.next().await;
    assert!(
        sent.elapsed() >= BODY_TIMEOUT,
        "failed after {:?}",
        sent.elapsed()
    );
    assert_eq!(received.body, Some(Err(io::ErrorKind::TimedOut)));
    // The service's own answer to a body it could not read, and the connection, out of step
    // with the caller, is closed after it.
    let answer = client.read_answer().await;
    assert_ok(&answer, "POST /stalled <TimedOut>");
    client.expect_close(&answer).await;
    server.next_end().await.expect("ends cleanly");
}

#[tokio::test]
async fn a_body_that_keeps_arriving_for_longer_than_the_body_timeout_is_read_whole() {
    let (mut server, mut client, mut log) = echoed_with_body_timeout().await;
    let sent = Instant::now();
    client
        .send("POST /slow HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    // A piece every half timeout, for three timeouts.
    for piece in ["a", "b", "c", "d", "e", "f"] {
        sleep(BODY_TIMEOUT / 2).await;
        client.send(format!("1\r\n{piece}\r\n")).await;
    }
    client.send("0\r\n\r\n").await;
    assert_ok(&client.read_answer().await, "POST /slow abcdef");
    assert!(sent.elapsed() > 2 * BODY_TIMEOUT);
    assert_eq!(log.next().await.body, Some(Ok(b"abcdef".to_vec())));
    assert_ok(
        &client.ask("GET /next HTTP/1.1\r\n\r\n").await,
        "GET /next ",
    );
    server.assert_none_ended();
}

#[tokio::test]
async fn a_body_the_service_does_not_read_yet_has_no_body_timeout() {
    // The service holds the body, unread, for three body timeouts (waiting for a slot, say)
    // while its rest has not arrived; then it reads it.
    let (service, mut log) = recorder(ReadBody::Whole, echo);
    let service = tower::ServiceBuilder::new()
        .map_future(|future| async move {
            sleep(3 * BODY_TIMEOUT).await;
            future.await
        })
        .service(service);
    let settings = Builder::new().body_timeout(Some(BODY_TIMEOUT));
    let (_server, mut client) = Server::start(settings, service).await;
    client
        .send("POST /held HTTP/1.1\r\nContent-Length: 10\r\n\r\nhalf!")
        .await;
    sleep(2 * BODY_TIMEOUT).await;
    client.send("rest!").await;
    assert_ok(&client.read_answer().await, "POST /held half!rest!");
    assert_eq!(log.next().await.body, Some(Ok(b"half!rest!".to_vec())));
}

/// `TimedBody` gives a body another server hands over the same limit: pieces that keep coming
/// within the timeout are read whole, and a wait for more that lasts it fails `TimedOut`.
#[tokio::test]
async fn a_timed_body_fails_with_timed_out_when_a_wait_for_more_lasts_the_body_timeout() {
    let (tx, body) = channel_body(4);
    let mut body = std::pin::pin!(TimedBody::new(body, BODY_TIMEOUT));
    let feeding = tokio::spawn(async move {
        for piece in ["ab", "cd"] {
            sleep(BODY_TIMEOUT / 2).await;
            tx.send(Ok(Bytes::from_static(piece.as_bytes())))
                .await
                .unwrap();
        }
        // Then nothing more, the body still open.
        sleep(5 * BODY_TIMEOUT).await;
        drop(tx);
    });
    for expected in ["ab", "cd"] {
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), expected);
    }
    let stalled = Instant::now();
    let error = body.frame().await.unwrap().unwrap_err();
    assert!(stalled.elapsed() >= BODY_TIMEOUT, "{:?}", stalled.elapsed());
    let error = error.downcast::<io::Error>().unwrap();
    assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    feeding.abort();
}

/// Tells, when it is dropped, whether the caller had received anything by then.
#[derive(Clone)]
struct ArrivalProbe {
    caller: Arc<std::net::TcpStream>,
    seen: mpsc::UnboundedSender<bool>,
}

impl Drop for ArrivalProbe {
    fn drop(&mut self) {
        // Loopback delivers a write before it returns; the retries cover a delivery put off.
        let arrived = (0..100).any(|_| {
            let peeked = matches!(self.caller.peek(&mut [0; 1]), Ok(n) if n > 0);
            if !peeked {
                std::thread::sleep(Duration::from_millis(1));
            }
            peeked
        });
        let _ = self.seen.send(arrived);
    }
}

/// Serves one request, answered with `body` and an [`ArrivalProbe`] among the answer's
/// extensions: the server, the caller, and whether the caller had received anything when the
/// probe was dropped.
async fn probed_answer(body: TestBody) -> (Server, RawClient, bool) {
    let caller_slot: Arc<OnceLock<Arc<std::net::TcpStream>>> = Arc::default();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let slot = Arc::clone(&caller_slot);
    let body = std::sync::Mutex::new(Some(body));
    let (server, mut client, _log) = recorded(ReadBody::Whole, move |_| {
        let caller = slot.get().expect("the caller is connected");
        let body = body.lock().unwrap().take().expect("one request");
        let mut response = Response::new(body);
        response.extensions_mut().insert(ArrivalProbe {
            caller: Arc::clone(caller),
            seen: seen_tx.clone(),
        });
        response
    })
    .await;
    caller_slot.set(Arc::new(client.socket())).unwrap();
    client.send("GET / HTTP/1.1\r\nhost: gateway\r\n\r\n").await;
    let arrived = within("the answer's head to be freed", seen_rx.recv())
        .await
        .unwrap();
    (server, client, arrived)
}

/// An answer's head (its fields and extensions) is freed once it has gone out to the caller,
/// not while the caller waits for it.
#[tokio::test]
async fn an_answers_head_is_freed_once_it_has_gone_out() {
    let (_server, mut client, arrived) = probed_answer(full("answered")).await;
    assert!(
        arrived,
        "the answer's head should be freed once it had gone out to the caller"
    );
    let answer = client.read_answer().await;
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{answer:?}");
    assert_eq!(answer.text(), "answered");
}

/// A streaming answer's head is freed once it has gone out too, while the stream goes on: a
/// stream waiting for its next event does not hold it.
#[tokio::test]
async fn a_streaming_answers_head_is_freed_once_it_has_gone_out_while_the_stream_goes_on() {
    let (events, body) = channel_body(1);
    let (_server, mut client, arrived) = probed_answer(body).await;
    assert!(
        arrived,
        "the answer's head should be freed once it had gone out to the caller"
    );
    events.send(Ok(Bytes::from_static(b"event"))).await.unwrap();
    drop(events);
    let answer = client.read_answer().await;
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{answer:?}");
    assert!(answer.is_chunked(), "{answer:?}");
    assert_eq!(answer.text(), "event");
}
