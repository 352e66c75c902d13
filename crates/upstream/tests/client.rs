//! `UpstreamClient` under `RebaseLayer`, as an instance's stack ends, against real servers on
//! loopback sockets: hyper servers (plain, and TLS with a certificate authority made at test
//! time) and raw-byte backends for answers a hyper server would never write. Every wait is
//! bounded by [`WAIT`]: a hang fails instead of blocking.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use aoai_rebase::{Rebase, RebaseLayer, ResponseHeadTooLarge};
use aoai_upstream::UpstreamClient;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::{Barrier, mpsc},
    task::JoinSet,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tower::{BoxError, Layer, ServiceExt};

#[path = "../../../tests/support/tls.rs"]
mod tls;

use tls::Pki;

type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(future: F) -> F::Output {
    timeout(WAIT, future).await.expect("timed out")
}

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn get(uri: &str) -> Request<TestBody> {
    Request::get(uri).body(full("")).unwrap()
}

/// `client` under a `RebaseLayer` for `base_url`.
fn instance(base_url: &str, client: &UpstreamClient<TestBody>) -> Rebase<UpstreamClient<TestBody>> {
    RebaseLayer::new(base_url).unwrap().layer(client.clone())
}

async fn send(
    instance: &Rebase<UpstreamClient<TestBody>>,
    request: Request<TestBody>,
) -> Result<Response<Incoming>, BoxError> {
    bounded(instance.clone().oneshot(request)).await
}

async fn body_of(response: Response<Incoming>) -> Bytes {
    bounded(response.into_body().collect())
        .await
        .expect("response body failed")
        .to_bytes()
}

/// Every error of `error`'s source chain, the `io::Error`s' inner ones included.
fn chain(error: &BoxError) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut errors = Vec::new();
    let mut next = Some(&**error as &(dyn std::error::Error + 'static));
    while let Some(error) = next {
        errors.push(error);
        // `io::Error::source` skips the error it wraps.
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => error.source(),
        };
    }
    errors
}

fn shown(error: &BoxError) -> String {
    chain(error)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// The client's error, as classification finds it.
fn client_error(error: &BoxError) -> &hyper_util::client::legacy::Error {
    error
        .downcast_ref()
        .unwrap_or_else(|| panic!("not a client error: {}", shown(error)))
}

/// A body fed by a channel: each message is one data frame, a closed channel ends the body.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|d| Ok(Frame::data(d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A client that trusts `pki`'s CA besides the platform's roots.
fn client_trusting(pki: &Pki) -> UpstreamClient<TestBody> {
    UpstreamClient::builder()
        .add_root_certificates_pem(pki.ca_pem().as_bytes())
        .expect("a valid root")
        .build()
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A hyper server (HTTP/1.1, and HTTP/2 by ALPN under TLS) on `127.0.0.1:0` that counts the
/// connections it accepts and answers each request with `handler(request, connection index)`.
struct Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl Backend {
    async fn start<F, Fut>(tls: Option<Arc<rustls::ServerConfig>>, handler: F) -> Self
    where
        F: Fn(Request<Incoming>, usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let connection = counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let response = handler(request, connection);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let server = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(config) => match TlsAcceptor::from(config).accept(tcp).await {
                            Ok(tls) => server.serve_connection(TokioIo::new(tls), service).await,
                            Err(_) => return,
                        },
                        None => server.serve_connection(TokioIo::new(tcp), service).await,
                    };
                });
            }
        });
        Self { addr, accepts }
    }

    fn url(&self, scheme: &str, base_path: &str) -> String {
        format!("{scheme}://localhost:{}{base_path}", self.addr.port())
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

fn ok(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::new(Full::new(body.into()))
}

/// A backend on raw sockets: on each connection, reads one request head and sends it to the
/// test, writes `response` in one write, then echoes every byte that arrives (the bytes of an
/// upgraded connection) until the client closes.
async fn raw_backend(
    tls: Option<Arc<rustls::ServerConfig>>,
    response: Vec<u8>,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    async fn serve(
        mut stream: impl AsyncRead + AsyncWrite + Unpin,
        response: &[u8],
        heads: mpsc::UnboundedSender<String>,
    ) {
        let mut head = Vec::new();
        let mut buf = [0; 4096];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
        if stream.write_all(response).await.is_err() {
            return;
        }
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads_tx, heads) = mpsc::unbounded_channel();
    let response: Arc<[u8]> = response.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, response, heads) = (tls.clone(), Arc::clone(&response), heads_tx.clone());
            tokio::spawn(async move {
                match tls {
                    Some(config) => {
                        if let Ok(tls) = TlsAcceptor::from(config).accept(tcp).await {
                            serve(tls, &response, heads).await;
                        }
                    }
                    None => serve(tcp, &response, heads).await,
                }
            });
        }
    });
    (addr, heads)
}

/// A request head's field lines, lowercased, without the request line.
fn field_lines(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter(|line| !line.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// (a), (b) https instances

#[tokio::test]
async fn concurrent_requests_to_an_https_instance_are_http2_streams_on_one_connection() {
    const CONCURRENT: usize = 20;
    let pki = Pki::new();
    // Every concurrent request is held until all have arrived: they are in flight together.
    let barrier = Arc::new(Barrier::new(CONCURRENT));
    let backend = Backend::start(Some(pki.server()), move |request, connection| {
        let barrier = Arc::clone(&barrier);
        async move {
            if request.uri().path() == "/openai/concurrent" {
                barrier.wait().await;
            }
            ok(format!(
                "{:?} on connection {connection}",
                request.version()
            ))
        }
    })
    .await;
    let instance = instance(&backend.url("https", "/openai"), &client_trusting(&pki));

    // The first request makes the connection. (The response's version is the caller's hop's
    // once through `Rebase`: the instance's answer says which version it was asked over.)
    let first = send(&instance, get("/first")).await.unwrap();
    assert_eq!(body_of(first).await, "HTTP/2.0 on connection 0");

    let mut calls = JoinSet::new();
    for _ in 0..CONCURRENT {
        calls.spawn(instance.clone().oneshot(get("/concurrent")));
    }
    let responses = bounded(calls.join_all()).await;
    assert_eq!(responses.len(), CONCURRENT);
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_of(response).await, "HTTP/2.0 on connection 0");
    }
    assert_eq!(backend.accepts(), 1);
}

#[tokio::test]
async fn an_https_instance_whose_ca_is_not_trusted_is_a_connect_error() {
    let pki = Pki::new();
    let backend = Backend::start(Some(pki.server()), |_, _| async { ok("unreachable") }).await;
    let instance = instance(&backend.url("https", ""), &UpstreamClient::new());

    let error = send(&instance, get("/x")).await.unwrap_err();
    assert!(client_error(&error).is_connect(), "{}", shown(&error));
    assert!(shown(&error).contains("certificate"), "{}", shown(&error));
}

#[test]
fn pem_without_a_usable_certificate_is_refused_with_a_clear_message() {
    let pki = Pki::new();
    let key_only = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let broken = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
    let not_x509 = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
    let with_a_bad_one = format!("{}{not_x509}", pki.ca_pem());
    for (pem, message) in [
        ("", "no certificate found"),
        ("hello", "no certificate found"),
        (key_only.as_str(), "no certificate found"),
        (broken, "malformed PEM"),
        (not_x509, "not an X.509 certificate"),
        (with_a_bad_one.as_str(), "not an X.509 certificate"),
    ] {
        let error = UpstreamClient::builder()
            .add_root_certificates_pem(pem.as_bytes())
            .unwrap_err();
        let shown = error.to_string();
        assert!(shown.starts_with("invalid root certificate: "), "{shown}");
        assert!(shown.contains(message), "{pem:?}: {shown}");
    }
    let two = format!("{}{}", pki.ca_pem(), Pki::new().ca_pem());
    assert!(
        UpstreamClient::builder()
            .add_root_certificates_pem(two.as_bytes())
            .is_ok()
    );
}

// ---------------------------------------------------------------------------------------------
// (c), (d) http instances

#[tokio::test]
async fn sequential_requests_to_an_http_instance_reuse_one_connection() {
    let backend = Backend::start(None, |request, connection| async move {
        ok(format!(
            "{:?} on connection {connection}",
            request.version()
        ))
    })
    .await;
    let instance = instance(&backend.url("http", ""), &UpstreamClient::new());
    for _ in 0..3 {
        let response = send(&instance, get("/x")).await.unwrap();
        assert_eq!(body_of(response).await, "HTTP/1.1 on connection 0");
        // hyper-util returns an HTTP/1.1 connection to its pool from a task of its own once the
        // response body is read; let it run (hyper-util's keep-alive tests wait the same way).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.accepts(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let instance = instance(&format!("http://{addr}"), &UpstreamClient::new());

    let error = send(&instance, get("/x")).await.unwrap_err();
    assert!(client_error(&error).is_connect(), "{}", shown(&error));
    let refused = chain(&error).into_iter().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    assert!(refused, "{}", shown(&error));
}

// ---------------------------------------------------------------------------------------------
// (e) answers a hyper server would not write

#[tokio::test]
async fn an_answer_with_transfer_encoding_and_content_length_arrives_whole_without_the_length() {
    let (addr, _heads) = raw_backend(
        None,
        b"HTTP/1.1 200 OK\r\n\
          content-type: application/json\r\n\
          transfer-encoding: chunked\r\n\
          content-length: 5\r\n\
          \r\n\
          9\r\n{\"pid\":42\r\n1\r\n}\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    let instance = instance(&format!("http://{addr}"), &UpstreamClient::new());

    let response = send(&instance, get("/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut expected = HeaderMap::new();
    expected.insert("content-type", HeaderValue::from_static("application/json"));
    assert_eq!(response.headers(), &expected);
    assert_eq!(body_of(response).await, r#"{"pid":42}"#);
}

#[tokio::test]
async fn an_answer_head_over_64_kib_is_an_error() {
    // About 100 KB of fields, in one write: the whole head may arrive in a single read.
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..50 {
        head.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(2000)).as_bytes());
    }
    head.extend_from_slice(b"content-length: 2\r\n\r\nok");
    let (addr, _heads) = raw_backend(None, head).await;
    let instance = instance(&format!("http://{addr}"), &UpstreamClient::new());

    let error = match send(&instance, get("/x")).await {
        Ok(response) => panic!("answered {} instead of failing", response.status()),
        Err(error) => error,
    };
    // hyper refuses the head if it is still incomplete after 64 KiB; if it came in one read,
    // `Rebase` refuses it.
    let too_large = chain(&error).into_iter().any(|e| {
        e.is::<ResponseHeadTooLarge>()
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse_too_large)
    });
    assert!(too_large, "{}", shown(&error));
}

// ---------------------------------------------------------------------------------------------
// (f) upgrades

/// An upgrade request through `instance` reaches the raw backend with `Connection: upgrade` and
/// `Upgrade`, and the 101's connection echoes bytes both ways.
async fn upgrade_passes(
    instance: &Rebase<UpstreamClient<TestBody>>,
    heads: &mut mpsc::UnboundedReceiver<String>,
) {
    let request = Request::get("/realtime?deployment=d")
        .header("connection", "keep-alive, Upgrade")
        .header("upgrade", "websocket")
        .header("keep-alive", "timeout=5")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
        .unwrap();
    let response = send(instance, request).await.unwrap();

    let head = bounded(heads.recv()).await.unwrap();
    assert!(
        head.starts_with("GET /realtime?deployment=d HTTP/1.1\r\n"),
        "{head}"
    );
    let fields = field_lines(&head);
    for field in [
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-version: 13",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} missing: {head}");
    }
    assert!(
        !fields.iter().any(|f| f.starts_with("keep-alive")),
        "{head}"
    );

    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["connection"], "upgrade");
    assert_eq!(response.headers()["upgrade"], "websocket");
    let mut io = TokioIo::new(bounded(hyper::upgrade::on(response)).await.unwrap());
    for message in [&b"ping"[..], b"a second message"] {
        bounded(io.write_all(message)).await.unwrap();
        let mut echoed = vec![0; message.len()];
        bounded(io.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(echoed, message);
    }
}

const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
    connection: Upgrade\r\n\
    upgrade: websocket\r\n\
    sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
    \r\n";

#[tokio::test]
async fn an_upgrade_to_an_http_instance_passes_both_ways() {
    let (addr, mut heads) = raw_backend(None, SWITCHING.to_vec()).await;
    let instance = instance(&format!("http://{addr}"), &UpstreamClient::new());
    upgrade_passes(&instance, &mut heads).await;
}

#[tokio::test]
async fn an_upgrade_to_an_https_instance_offering_http2_goes_over_http1() {
    let pki = Pki::new();
    // The backend answers in HTTP/1.1 only: an HTTP/2 connection preface would get a 101 back.
    let (addr, mut heads) = raw_backend(Some(pki.server()), SWITCHING.to_vec()).await;
    let instance = instance(
        &format!("https://localhost:{}", addr.port()),
        &client_trusting(&pki),
    );
    upgrade_passes(&instance, &mut heads).await;
}

// ---------------------------------------------------------------------------------------------
// (g) requests as sent

/// What the streaming backend saw.
enum Seen {
    Head(http::request::Parts),
    Data(Bytes),
    End,
}

#[tokio::test]
async fn a_request_streams_and_arrives_as_sent_minus_hop_by_hop() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let backend = Backend::start(None, move |request, _| {
        let seen = seen_tx.clone();
        async move {
            let (head, mut body) = request.into_parts();
            let _ = seen.send(Seen::Head(head));
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    let _ = seen.send(Seen::Data(data));
                }
            }
            let _ = seen.send(Seen::End);
            ok("done")
        }
    })
    .await;
    let instance = instance(&backend.url("http", "/openai/"), &UpstreamClient::new());

    let opaque = HeaderValue::from_bytes(b"caf\xe9 \x80").unwrap();
    let (body_tx, body_rx) = mpsc::channel(1);
    let request = Request::post("/deployments/d/chat/completions?api-version=2024-10-21&x=%20")
        .header("host", "gateway.example")
        .header("connection", "X-Foo, keep-alive")
        .header("x-foo", "dropped")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("transfer-encoding", "chunked")
        .header("upgrade", "h2c")
        .header("proxy-authorization", "Basic eDp5")
        .header("content-type", "application/json")
        .header("authorization", "Bearer token")
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("x-opaque", opaque.clone())
        .body(ChannelBody(body_rx).boxed_unsync())
        .unwrap();
    let call = tokio::spawn(instance.clone().oneshot(request));

    let Seen::Head(head) = bounded(seen.recv()).await.unwrap() else {
        panic!("the head comes first");
    };
    assert_eq!(head.method, Method::POST);
    assert_eq!(
        head.uri,
        "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%20"
    );
    let mut expected = HeaderMap::new();
    expected.append("content-type", HeaderValue::from_static("application/json"));
    expected.append("authorization", HeaderValue::from_static("Bearer token"));
    expected.append("x-multi", HeaderValue::from_static("first"));
    expected.append("x-multi", HeaderValue::from_static("second"));
    expected.append("x-opaque", opaque);
    // This hop's own fields: hyper sets `Host` from the URI, and frames a body of unknown length
    // in chunks.
    let host = format!("localhost:{}", backend.addr.port());
    expected.append("host", HeaderValue::from_str(&host).unwrap());
    expected.append("transfer-encoding", HeaderValue::from_static("chunked"));
    assert_eq!(head.headers, expected);

    // The first frame reaches the backend while the body is still open.
    body_tx.send(Bytes::from_static(b"first")).await.unwrap();
    assert!(matches!(bounded(seen.recv()).await, Some(Seen::Data(data)) if data == "first"));
    body_tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(body_tx);
    assert!(matches!(bounded(seen.recv()).await, Some(Seen::Data(data)) if data == "second"));
    assert!(matches!(bounded(seen.recv()).await, Some(Seen::End)));
    let response = bounded(call).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_of(response).await, "done");
}

#[test]
fn clients_are_send_sync_clone_and_debug() {
    fn assert_traits<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    assert_traits::<UpstreamClient<TestBody>>();
    assert_traits::<aoai_upstream::UpstreamClientBuilder>();
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<aoai_upstream::InvalidRootCertificate>();
}
