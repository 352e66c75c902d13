//! `Upstream` against real servers on loopback sockets.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use aoai_upstream::{InvalidBaseUrl, Upstream, UpstreamClient, UpstreamError};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, oneshot},
    time::timeout,
};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for any single wait; a hang fails the test instead of blocking it.
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(future: F) -> F::Output {
    timeout(WAIT, future).await.expect("timed out")
}

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body fed by a channel: each message is one data frame, a closed channel ends the body.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|message| message.map(|chunk| chunk.map(Frame::data)))
    }
}

fn channel_body() -> (mpsc::Sender<Result<Bytes, BoxError>>, TestBody) {
    let (tx, rx) = mpsc::channel(1);
    (tx, ChannelBody { rx }.boxed_unsync())
}

/// A hyper HTTP/1.1 server on `127.0.0.1:0` that counts accepted connections.
struct TestServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl TestServer {
    async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let accepted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                let service = hyper::service::service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { addr, connections }
    }

    fn url(&self, base_path: &str) -> String {
        format!("http://{}{base_path}", self.addr)
    }

    fn host(&self) -> HeaderValue {
        HeaderValue::from_str(&self.addr.to_string()).unwrap()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What a recording server saw.
#[derive(Debug)]
struct Received {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A server that records every request, body included, and answers `200 ok`.
async fn recording_server() -> (TestServer, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = TestServer::start(move |request: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            tx.send(Received {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
            })
            .unwrap();
            Response::new(full("ok"))
        }
    })
    .await;
    (server, rx)
}

fn upstream(base_url: &str) -> Upstream {
    Upstream::new(base_url, UpstreamClient::new()).unwrap()
}

fn get(uri: &str) -> Request<TestBody> {
    Request::get(uri).body(full(Bytes::new())).unwrap()
}

/// A server on a raw socket: reads one request head, writes `response`, closes its write side.
async fn raw_server(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed before sending a request head");
            head.extend_from_slice(&buf[..n]);
        }
        stream.write_all(response).await.unwrap();
        stream.shutdown().await.unwrap();
        // Keep the socket until the client is done so no reset cuts the response short.
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    addr
}

#[tokio::test]
async fn joins_path_and_query_onto_the_base_path() {
    let (server, mut received) = recording_server().await;
    let cases = [
        (
            "/openai",
            "/deployments/d/chat/completions?api-version=2024-10-21",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21",
        ),
        (
            "/openai/",
            "/deployments/d/embeddings?api-version=2024-10-21",
            "/openai/deployments/d/embeddings?api-version=2024-10-21",
        ),
        (
            "",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21",
        ),
        ("/", "/openai/models", "/openai/models"),
        ("/openai", "/", "/openai/"),
        // The caller's scheme and authority are ignored.
        (
            "/openai",
            "http://caller.example:1/models?x=1",
            "/openai/models?x=1",
        ),
    ];
    for (base_path, request_uri, expected) in cases {
        let response = bounded(upstream(&server.url(base_path)).oneshot(get(request_uri)))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let seen = bounded(received.recv()).await.unwrap();
        assert_eq!(seen.uri, expected, "base {base_path:?} + {request_uri:?}");
        assert_eq!(seen.headers["host"], server.host());
    }
}

#[tokio::test]
async fn forwards_headers_as_sent_minus_hop_by_hop() {
    let (server, mut received) = recording_server().await;
    let opaque = HeaderValue::from_bytes(b"caf\xe9 \x80").unwrap();
    let request = Request::post("/deployments/d/chat/completions")
        .header("host", "caller.example")
        .header("connection", "X-Foo, keep-alive")
        .header("connection", "x-bar")
        .header("x-foo", "dropped")
        .header("x-bar", "dropped")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("transfer-encoding", "chunked")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic eDp5")
        .header("proxy-connection", "keep-alive")
        .header("content-type", "application/json")
        .header("content-length", "5")
        .header("authorization", "Bearer token")
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("x-opaque", opaque.clone())
        .body(full("hello"))
        .unwrap();

    let response = bounded(upstream(&server.url("/openai")).oneshot(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let seen = bounded(received.recv()).await.unwrap();
    let mut expected = HeaderMap::new();
    expected.append("content-type", HeaderValue::from_static("application/json"));
    expected.append("content-length", HeaderValue::from_static("5"));
    expected.append("authorization", HeaderValue::from_static("Bearer token"));
    expected.append("x-multi", HeaderValue::from_static("first"));
    expected.append("x-multi", HeaderValue::from_static("second"));
    expected.append("x-opaque", opaque);
    expected.append("host", server.host());
    assert_eq!(seen.headers, expected);
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.body, "hello");
}

#[tokio::test]
async fn streams_a_large_request_body_byte_for_byte() {
    const SIZE: usize = 10 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let data: Bytes = (0..SIZE)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect::<Vec<u8>>()
        .into();
    let (server, mut received) = recording_server().await;
    let (tx, body) = channel_body();
    let chunks = data.clone();
    tokio::spawn(async move {
        for start in (0..SIZE).step_by(CHUNK) {
            let chunk = chunks.slice(start..(start + CHUNK).min(SIZE));
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });

    let request = Request::post("/upload").body(body).unwrap();
    let response = bounded(upstream(&server.url("/openai")).oneshot(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = bounded(received.recv()).await.unwrap();
    assert_eq!(seen.body.len(), SIZE);
    assert!(seen.body == data, "request body differs");
}

#[tokio::test]
async fn streams_the_request_body_before_it_ends() {
    let (first_seen_tx, first_seen) = oneshot::channel::<Bytes>();
    let first_seen_tx = Arc::new(Mutex::new(Some(first_seen_tx)));
    let server = TestServer::start(move |request: Request<Incoming>| {
        let first_seen_tx = first_seen_tx.lock().unwrap().take();
        async move {
            let mut body = request.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            first_seen_tx.unwrap().send(first).unwrap();
            let rest = body.collect().await.unwrap().to_bytes();
            Response::new(full(rest))
        }
    })
    .await;

    let (tx, body) = channel_body();
    let request = Request::post("/stream").body(body).unwrap();
    let response = tokio::spawn(upstream(&server.url("")).oneshot(request));
    tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
    // A client that buffered the request body would never deliver this before the body ends.
    assert_eq!(bounded(first_seen).await.unwrap(), "first");
    tx.send(Ok(Bytes::from_static(b"rest"))).await.unwrap();
    drop(tx);

    let response = bounded(response).await.unwrap().unwrap();
    let echoed = bounded(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(echoed, "rest");
}

#[tokio::test]
async fn refuses_dot_segments_without_contacting_the_backend() {
    let (server, mut received) = recording_server().await;
    let upstream = upstream(&server.url("/openai"));
    for path in [
        "/..",
        "/deployments/../../admin",
        "/deployments/./x",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/%2E./admin",
        "/.%2e/admin",
        "/deployments/%2f../admin",
        "/deployments/..%2fadmin",
        "/%252e%252e/admin",
        "/deployments\\..\\admin",
        "/..;/admin",
    ] {
        let error = bounded(upstream.clone().oneshot(get(path)))
            .await
            .expect_err(path);
        assert!(
            matches!(error, UpstreamError::InvalidPath { .. }),
            "{path}: {error:?}"
        );
        assert!(error.to_string().contains("is not allowed"), "{error}");
    }

    let long = format!("/{}..", "a/".repeat(10_000));
    let error = bounded(upstream.clone().oneshot(get(&long)))
        .await
        .unwrap_err();
    assert!(error.to_string().len() < 120, "{error}");

    assert_eq!(server.connections(), 0);
    // The next allowed request is the first the backend sees.
    bounded(upstream.oneshot(get("/models"))).await.unwrap();
    assert_eq!(
        bounded(received.recv()).await.unwrap().uri,
        "/openai/models"
    );
    assert!(received.try_recv().is_err());
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn streams_the_response_body() {
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release)));
    let server = TestServer::start(move |_request: Request<Incoming>| {
        let release = release.lock().unwrap().take().unwrap();
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                tx.send(Ok(Bytes::from_static(b"data: first\n\n")))
                    .await
                    .unwrap();
                // The second chunk waits until the client has seen the first.
                if release.await.is_ok() {
                    let _ = tx.send(Ok(Bytes::from_static(b"data: second\n\n"))).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;

    let response = bounded(upstream(&server.url("/openai")).oneshot(get("/stream")))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = bounded(body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    release_tx.send(()).unwrap();
    let second = bounded(body.frame()).await.unwrap().unwrap();
    assert_eq!(second.into_data().unwrap(), "data: second\n\n");
    assert!(bounded(body.frame()).await.is_none());
}

#[tokio::test]
async fn server_closing_mid_body_is_a_body_error() {
    let addr = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
    let response = bounded(upstream(&format!("http://{addr}")).oneshot(get("/x")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result = bounded(response.into_body().collect()).await;
    assert!(result.is_err(), "a truncated body must fail");
}

#[tokio::test]
async fn removes_hop_by_hop_headers_from_the_response() {
    let addr = raw_server(
        b"HTTP/1.1 200 OK\r\n\
          connection: X-Bar, keep-alive\r\n\
          x-bar: dropped\r\n\
          keep-alive: timeout=5\r\n\
          proxy-authenticate: Basic\r\n\
          proxy-connection: keep-alive\r\n\
          trailer: x-checksum\r\n\
          upgrade: h2c\r\n\
          transfer-encoding: chunked\r\n\
          content-type: text/plain\r\n\
          x-keep: kept\r\n\
          \r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let response = bounded(upstream(&format!("http://{addr}/openai")).oneshot(get("/x")))
        .await
        .unwrap();
    let mut expected = HeaderMap::new();
    expected.append("content-type", HeaderValue::from_static("text/plain"));
    expected.append("x-keep", HeaderValue::from_static("kept"));
    assert_eq!(response.headers(), &expected);
    let body = bounded(response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn connect_error_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let error = bounded(upstream(&format!("http://{addr}")).oneshot(get("/x")))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "cannot connect to backend");
    let UpstreamError::Connect(source) = &error else {
        panic!("expected a connect error, got {error:?}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    // Callers that only hold a `BoxError` find it by walking the source chain.
    let boxed: BoxError = error.into();
    let cause = std::iter::successors(Some(&*boxed as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<UpstreamError>())
    .unwrap();
    assert!(cause.is_connect());
}

fn kind(error: &InvalidBaseUrl) -> &'static str {
    match error {
        InvalidBaseUrl::Unparsable(_) => "Unparsable",
        InvalidBaseUrl::MissingScheme => "MissingScheme",
        InvalidBaseUrl::UnsupportedScheme => "UnsupportedScheme",
        InvalidBaseUrl::InsecureScheme => "InsecureScheme",
        InvalidBaseUrl::UserInfo => "UserInfo",
        InvalidBaseUrl::Query => "Query",
        InvalidBaseUrl::Fragment => "Fragment",
        InvalidBaseUrl::Path => "Path",
        _ => "unknown",
    }
}

#[test]
fn invalid_base_urls_are_refused_with_clear_errors() {
    let cases = [
        ("x.openai.azure.com", "MissingScheme", "missing scheme"),
        (
            "x.openai.azure.com/openai",
            "MissingScheme",
            "missing scheme",
        ),
        (
            "ftp://x.openai.azure.com",
            "UnsupportedScheme",
            "unsupported scheme",
        ),
        (
            "http://x.openai.azure.com",
            "InsecureScheme",
            "only allowed for loopback",
        ),
        (
            "https://x.openai.azure.com/openai?api-version=1",
            "Query",
            "query string",
        ),
        (
            "https://x.openai.azure.com/openai#part",
            "Fragment",
            "fragment",
        ),
        (
            "https://x.openai.azure.com/open ai",
            "Unparsable",
            "not a valid URL",
        ),
        ("https://", "Unparsable", "not a valid URL"),
        (
            "https://user:secret@x.openai.azure.com",
            "UserInfo",
            "credentials",
        ),
        (
            "https://x.openai.azure.com/openai/../admin",
            "Path",
            "base path",
        ),
        ("https://x.openai.azure.com/%2e%2e", "Path", "base path"),
    ];
    for (url, expected, message) in cases {
        let error = Upstream::new(url, UpstreamClient::new()).unwrap_err();
        assert_eq!(kind(&error), expected, "{url}: {error:?}");
        let shown = error.to_string();
        assert!(shown.starts_with("invalid backend base URL: "), "{shown}");
        assert!(shown.contains(message), "{url}: {shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}

#[test]
fn valid_base_urls_are_accepted() {
    for url in [
        "https://x.openai.azure.com",
        "https://x.openai.azure.com/",
        "https://x.openai.azure.com/openai",
        "https://x.openai.azure.com:8443/some/base/",
        "http://127.0.0.1:1234",
        "http://localhost:8080/openai",
        "http://[::1]:8080",
    ] {
        let upstream =
            Upstream::new(url, UpstreamClient::new()).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(
            upstream.base_url().to_string().trim_end_matches('/'),
            url.trim_end_matches('/')
        );
    }
    let upstream = Upstream::new("HTTPS://X.openai.azure.com", UpstreamClient::new()).unwrap();
    assert_eq!(upstream.base_url(), "https://X.openai.azure.com/");
}

#[test]
fn services_are_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    assert_traits::<Upstream>();
    assert_traits::<UpstreamClient>();
    fn assert_send<T: Send + std::fmt::Debug>() {}
    assert_send::<aoai_upstream::future::ResponseFuture>();
    assert_traits_body::<aoai_upstream::UpstreamBody>();
    fn assert_traits_body<T: Send + Sync + Unpin + std::fmt::Debug + 'static>() {}
}
