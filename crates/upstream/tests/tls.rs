//! `Upstream` over TLS against loopback servers: tokio-rustls on the server side, with a private
//! certificate authority and server certificates made at test time with rcgen.
//!
//! As in `http1.rs`, each server writes hand-made HTTP/1.1 bytes (now inside TLS) and parses what
//! the client sends itself; it also records what it saw of each handshake (server name, ALPN
//! offered and agreed, or why it failed). Every test is bounded by [`WAIT`]: a hang fails instead
//! of blocking.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

mod support;

use aoai_upstream::{Upstream, UpstreamBody, UpstreamClient, UpstreamError};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Mutex, mpsc},
    time::sleep,
};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};
use tower::ServiceExt;

/// Sends `request` on a clone of `upstream`.
async fn send(
    upstream: &Upstream,
    request: Request<TestBody>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    upstream.clone().oneshot(request).await
}

/// Sends `request`, expects a response, and collects its status and body.
async fn fetch(upstream: &Upstream, request: Request<TestBody>) -> (u16, Bytes) {
    let what = format!("{} {}", request.method(), request.uri());
    let response = send(upstream, request)
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {}", chain(&e)));
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("response body failed")
        .to_bytes();
    (status, body)
}

/// Sends `request` and expects a connect error; returns it with its source chain shown.
async fn connect_error(upstream: &Upstream, request: Request<TestBody>) -> (UpstreamError, String) {
    let error = match send(upstream, request).await {
        Ok(response) => panic!("expected a connect error, got {}", response.status()),
        Err(error) => error,
    };
    let shown = chain(&error);
    assert!(error.is_connect(), "not a connect error: {shown}");
    assert!(
        matches!(error, UpstreamError::Connect(_)),
        "not UpstreamError::Connect: {error:?}"
    );
    (error, shown)
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A private certificate authority, made fresh for one test.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A server's certificate chain and key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("aoai-upstream test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    /// The CA's certificate, to trust with `add_root_certificate`.
    fn root(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    fn server(&self, names: &[&str]) -> Identity {
        let (params, key) = server_params(names);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A client that trusts this CA besides Mozilla's roots.
    fn client(&self) -> UpstreamClient {
        UpstreamClient::builder()
            .add_root_certificate(self.root())
            .expect("a valid root")
            .build()
    }
}

fn server_params(names: &[&str]) -> (CertificateParams, KeyPair) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (params, KeyPair::generate().unwrap())
}

/// A self-signed server certificate (not a CA) for `names`.
fn self_signed(names: &[&str]) -> Identity {
    let (params, key) = server_params(names);
    let cert = params.self_signed(&key).unwrap();
    Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS server side

/// What a server saw of one TLS handshake.
#[derive(Clone, Debug)]
struct Handshake {
    conn: usize,
    /// The SNI the client sent.
    server_name: Option<String>,
    /// The ALPN protocols the client offered, in its order.
    offered_alpn: Vec<Vec<u8>>,
    /// The protocol both agreed on.
    agreed_alpn: Option<Vec<u8>>,
    /// Why the handshake failed, if it did.
    error: Option<String>,
}

impl Conn<TlsStream<TcpStream>> {
    /// Sends close_notify and half-closes the TCP connection (FIN), then keeps reading so a late
    /// client write does not turn into a reset; any request that still arrives is recorded (on
    /// this connection's index) for the test to see.
    async fn close_notify(mut self, closed: mpsc::UnboundedSender<usize>) {
        let _ = self.stream.shutdown().await;
        let _ = closed.send(self.index);
        while self.read_request().await.is_some() {}
    }

    /// Closes the TCP connection without close_notify, like a backend that crashed or a load
    /// balancer that dropped an idle connection.
    fn drop_abruptly(self, closed: mpsc::UnboundedSender<usize>) {
        let index = self.index;
        drop(self);
        let _ = closed.send(index);
    }
}

/// A TLS server on `127.0.0.1:0` presenting `identity`, offering ALPN `http/1.1`. It counts
/// accepts, records each handshake, and hands each established connection to a handler.
struct TlsServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: SeenLog,
    handshakes: mpsc::UnboundedReceiver<Handshake>,
}

impl TlsServer {
    async fn start<F, Fut>(identity: Identity, handler: F) -> Self
    where
        F: Fn(Conn<TlsStream<TcpStream>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (handshake_tx, handshakes) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepts);
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tcp.set_nodelay(true).unwrap();
                let index = counter.fetch_add(1, Ordering::SeqCst);
                let config = Arc::clone(&config);
                let handler = Arc::clone(&handler);
                let seen = seen_tx.clone();
                let handshakes = handshake_tx.clone();
                tokio::spawn(async move {
                    let acceptor =
                        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                    let start = match acceptor.await {
                        Ok(start) => start,
                        Err(e) => {
                            let _ = handshakes.send(Handshake {
                                conn: index,
                                server_name: None,
                                offered_alpn: Vec::new(),
                                agreed_alpn: None,
                                error: Some(format!("reading the ClientHello: {e}")),
                            });
                            return;
                        }
                    };
                    let hello = start.client_hello();
                    let mut handshake = Handshake {
                        conn: index,
                        server_name: hello.server_name().map(str::to_owned),
                        offered_alpn: hello
                            .alpn()
                            .map(|offered| offered.map(<[u8]>::to_vec).collect())
                            .unwrap_or_default(),
                        agreed_alpn: None,
                        error: None,
                    };
                    match start.into_stream(config).await {
                        Ok(stream) => {
                            handshake.agreed_alpn =
                                stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                            let _ = handshakes.send(handshake);
                            handler(Conn {
                                stream,
                                buf: Vec::new(),
                                index,
                                seen,
                            })
                            .await;
                        }
                        Err(e) => {
                            handshake.error = Some(e.to_string());
                            let _ = handshakes.send(handshake);
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepts,
            seen: SeenLog(seen),
            handshakes,
        }
    }

    /// A keep-alive server: on every connection, answers each request with `respond(request)`
    /// until the client closes.
    async fn respond<F>(identity: Identity, respond: F) -> Self
    where
        F: Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
    {
        let respond = Arc::new(respond);
        Self::start(identity, move |mut conn| {
            let respond = Arc::clone(&respond);
            async move { conn.answer_each(|request| respond(request)).await }
        })
        .await
    }

    /// `https://localhost:PORT`.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The next request the server read.
    async fn next(&mut self) -> Seen {
        self.seen.next().await
    }

    /// The next handshake the server saw.
    async fn handshake(&mut self) -> Handshake {
        self.handshakes.recv().await.expect("server gone")
    }

    /// The connection index and target of every request read so far (after the ones taken with
    /// `next`).
    fn drain_conns(&mut self) -> Vec<(usize, String)> {
        self.seen.drain_conns()
    }
}

// ---------------------------------------------------------------------------------------------
// (a) a request and its response over TLS

#[tokio::test]
async fn post_over_https_reaches_the_server_and_the_response_comes_back() {
    bounded(async {
        let pki = Pki::new("post");
        let mut server = TlsServer::respond(pki.server(&["localhost", "127.0.0.1"]), |request| {
            let body = format!("{{\"got\":{}}}", String::from_utf8_lossy(&request.body));
            format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-ms-region: test\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        let upstream =
            Upstream::new(&format!("{}/openai/", server.url()), pki.client()).expect("base URL");
        let payload = r#"{"messages":[{"role":"user","content":"Hi"}]}"#;
        let request = Request::post("/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
            .header("content-type", "application/json")
            .header("host", "caller.example")
            .body(full(payload))
            .unwrap();
        let response = send(&upstream, request)
            .await
            .unwrap_or_else(|e| panic!("request failed: {}", chain(&e)));
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-ms-region"], "test");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("{{\"got\":{payload}}}"));

        let seen = server.next().await;
        assert_eq!(seen.method, "POST");
        assert_eq!(
            seen.target,
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        let host = format!("localhost:{}", server.port());
        assert_eq!(seen.header("host"), Some(host.as_str()));
        assert_eq!(
            seen.headers.iter().filter(|(n, _)| n == "host").count(),
            1,
            "{:?}",
            seen.headers
        );
        assert_eq!(seen.header("content-type"), Some("application/json"));
        assert_eq!(seen.framing, Framing::Length(payload.len()));
        assert_eq!(seen.body, payload.as_bytes());

        let handshake = server.handshake().await;
        assert_eq!(handshake.error, None);
        assert_eq!(
            handshake.server_name.as_deref(),
            Some("localhost"),
            "the client should send SNI"
        );
    })
    .await;
}

#[tokio::test]
async fn https_to_an_ip_address_checks_the_ip_in_the_certificate() {
    bounded(async {
        let pki = Pki::new("ip");
        let mut server =
            TlsServer::respond(pki.server(&["localhost", "127.0.0.1"]), echo_target).await;
        let url = format!("https://127.0.0.1:{}", server.port());
        let upstream = Upstream::new(&url, pki.client()).expect("base URL");
        assert_eq!(fetch(&upstream, get("/by-ip")).await, (200, "by-ip".into()));
        let handshake = server.handshake().await;
        assert_eq!(handshake.error, None);
        assert_eq!(handshake.server_name, None, "no SNI for an IP address");

        // A certificate with the DNS name only does not cover the address.
        let mut server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
        let url = format!("https://127.0.0.1:{}", server.port());
        let upstream = Upstream::new(&url, pki.client()).expect("base URL");
        let (_, shown) = connect_error(&upstream, get("/by-ip")).await;
        assert!(shown.contains("not valid for name"), "{shown}");
        assert!(server.drain_conns().is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (b), (c) connection reuse

#[tokio::test]
async fn keep_alive_reuses_one_tls_connection() {
    bounded(async {
        let pki = Pki::new("keep-alive");
        let mut server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        for path in ["/one", "/two", "/three"] {
            assert_eq!(fetch(&upstream, get(path)).await, (200, path[1..].into()));
        }
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (0, "/two".into()), (0, "/three".into())],
            "every request should come on the first connection"
        );
        assert_eq!(server.accepts(), 1, "one TLS connection, one handshake");
        assert_eq!(server.handshake().await.error, None);
        assert!(server.handshakes.try_recv().is_err(), "a second handshake");
    })
    .await;
}

/// A server that answers the first request on each connection, then closes that connection
/// (with `close_notify` when `notify`, else abruptly) and reports it.
async fn closing_server(
    identity: Identity,
    notify: bool,
) -> (TlsServer, mpsc::UnboundedReceiver<usize>) {
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let server = TlsServer::start(identity, move |mut conn| {
        let closed = closed_tx.clone();
        async move {
            if let Some(request) = conn.read_request().await {
                conn.write(&echo_target(&request)).await;
                if notify {
                    conn.close_notify(closed).await;
                } else {
                    conn.drop_abruptly(closed);
                }
            }
        }
    })
    .await;
    (server, closed)
}

async fn idle_close_is_noticed(notify: bool) {
    let pki = Pki::new("idle-close");
    let (mut server, mut closed) = closing_server(pki.server(&["localhost"]), notify).await;
    let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
    assert_eq!(fetch(&upstream, get("/one")).await, (200, "one".into()));
    assert_eq!(closed.recv().await, Some(0));
    // Let the alert and the FIN cross loopback, so the connection is idle and closed in the
    // pool, not closing while the next request goes out.
    sleep(Duration::from_millis(50)).await;
    assert_eq!(fetch(&upstream, get("/two")).await, (200, "two".into()));
    assert_eq!(
        server.drain_conns(),
        [(0, "/one".into()), (1, "/two".into())],
        "the second request should go on a new connection, not on the closed one"
    );
    assert_eq!(server.accepts(), 2);
}

#[tokio::test]
async fn idle_connection_closed_with_close_notify_is_replaced() {
    bounded(idle_close_is_noticed(true)).await;
}

#[tokio::test]
async fn idle_connection_dropped_without_close_notify_is_replaced() {
    bounded(idle_close_is_noticed(false)).await;
}

// ---------------------------------------------------------------------------------------------
// (d) streaming

#[tokio::test]
async fn sse_response_streams_chunk_by_chunk_over_tls() {
    const EVENTS: [&str; 3] = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: [DONE]\n\n",
    ];
    bounded(async {
        let pki = Pki::new("sse");
        // The test acknowledges each event it received; the server writes the next one only then.
        let (ack, acks) = mpsc::unbounded_channel::<()>();
        let acks = Arc::new(Mutex::new(acks));
        let mut server = TlsServer::start(pki.server(&["localhost"]), move |mut conn| {
            let acks = Arc::clone(&acks);
            async move {
                while let Some(request) = conn.read_request().await {
                    if request.target != "/stream" {
                        conn.write(&echo_target(&request)).await;
                        continue;
                    }
                    conn.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n",
                    )
                    .await;
                    for event in EVENTS {
                        conn.write(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                            .await;
                        if acks.lock().await.recv().await.is_none() {
                            return;
                        }
                    }
                    conn.write(b"0\r\n\r\n").await;
                }
            }
        })
        .await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        let response = send(&upstream, get("/stream"))
            .await
            .unwrap_or_else(|e| panic!("request failed: {}", chain(&e)));
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert!(
            !response.headers().contains_key("transfer-encoding"),
            "hop-by-hop header passed: {:?}",
            response.headers()
        );
        let mut body = response.into_body();
        for event in EVENTS {
            let mut got = Vec::new();
            while got.len() < event.len() {
                let frame = body
                    .frame()
                    .await
                    .unwrap_or_else(|| panic!("body ended before {event:?}"))
                    .expect("body failed");
                got.extend_from_slice(&frame.into_data().expect("a data frame"));
            }
            assert_eq!(String::from_utf8_lossy(&got), event);
            ack.send(()).unwrap();
        }
        assert!(body.frame().await.is_none(), "more after the last chunk");
        drop(body);

        // Read whole, the connection went back to the pool.
        assert_eq!(fetch(&upstream, get("/after")).await, (200, "after".into()));
        assert_eq!(
            server.drain_conns(),
            [(0, "/stream".into()), (0, "/after".into())]
        );
        assert_eq!(server.accepts(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (e), (f) certificate verification

#[tokio::test]
async fn untrusted_certificate_is_a_connect_error() {
    bounded(async {
        let pki = Pki::new("untrusted");
        let mut server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
        // Mozilla's roots only: the private CA is unknown.
        let upstream = Upstream::new(&server.url(), UpstreamClient::new()).expect("base URL");
        let (_, shown) = connect_error(&upstream, get("/secret")).await;
        assert!(shown.contains("certificate"), "{shown}");
        assert!(shown.contains("UnknownIssuer"), "{shown}");
        // The handshake failed, so no request reached the server.
        let handshake = server.handshake().await;
        assert!(handshake.error.is_some(), "{handshake:?}");
        assert!(server.drain_conns().is_empty());
        assert_eq!(server.accepts(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_times_out_as_a_connect_error() {
    bounded(async {
        // Accepts TCP connections and never says a word of TLS.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tcp);
        });
        let client = UpstreamClient::builder()
            .connect_timeout(Duration::from_millis(200))
            .build();
        let upstream =
            Upstream::new(&format!("https://localhost:{port}"), client).expect("base URL");
        let started = std::time::Instant::now();
        let (_, shown) = connect_error(&upstream, get("/")).await;
        assert!(shown.contains("TLS handshake timed out"), "{shown}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    })
    .await;
}

#[tokio::test]
async fn certificate_for_another_name_is_refused() {
    bounded(async {
        let pki = Pki::new("other-name");
        let mut server = TlsServer::respond(pki.server(&["example.test"]), echo_target).await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        let (_, shown) = connect_error(&upstream, get("/secret")).await;
        assert!(shown.contains("certificate not valid for name"), "{shown}");
        assert!(shown.contains("localhost"), "{shown}");
        assert!(shown.contains("example.test"), "{shown}");
        let handshake = server.handshake().await;
        assert!(handshake.error.is_some(), "{handshake:?}");
        assert!(server.drain_conns().is_empty());
    })
    .await;
}

#[tokio::test]
async fn self_signed_server_certificate_can_be_trusted_directly() {
    bounded(async {
        let identity = self_signed(&["localhost"]);
        let root = identity.chain[0].clone();
        let server = TlsServer::respond(identity, echo_target).await;
        let client = UpstreamClient::builder()
            .add_root_certificate(root)
            .expect("a valid root")
            .build();
        let upstream = Upstream::new(&server.url(), client).expect("base URL");
        assert_eq!(fetch(&upstream, get("/self")).await, (200, "self".into()));
    })
    .await;
}

#[tokio::test]
async fn every_added_root_certificate_is_trusted() {
    bounded(async {
        let first = Pki::new("first");
        let second = Pki::new("second");
        let client = UpstreamClient::builder()
            .add_root_certificate(first.root())
            .expect("a valid root")
            .add_root_certificate(second.root())
            .expect("a valid root")
            .build();
        for pki in [&first, &second] {
            let server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
            let upstream = Upstream::new(&server.url(), client.clone()).expect("base URL");
            assert_eq!(fetch(&upstream, get("/ok")).await, (200, "ok".into()));
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_root_certificate_is_refused_when_added() {
    bounded(async {
        let pki = Pki::new("invalid-root");
        let builder = UpstreamClient::builder()
            .add_root_certificate(pki.root())
            .expect("a valid root");
        let error = builder
            .clone()
            .add_root_certificate(CertificateDer::from(b"not a certificate".to_vec()))
            .unwrap_err();
        assert_eq!(error.to_string(), "invalid root certificate");
        let cause = std::error::Error::source(&error)
            .expect("the reason")
            .to_string();
        assert!(cause.contains("BadEncoding"), "{cause}");
        // The builder's Debug names how many roots it holds, not the certificates.
        let shown = format!("{builder:?}");
        assert!(shown.contains("root_certificates"), "{shown}");
        assert!(shown.len() < 200, "{shown}");
        // The valid root still works once the invalid one was refused.
        let mut server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
        let upstream = Upstream::new(&server.url(), builder.build()).expect("base URL");
        assert_eq!(fetch(&upstream, get("/ok")).await.0, 200);
        assert_eq!(server.drain_conns().len(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (g) ALPN

#[tokio::test]
async fn client_offers_and_agrees_on_alpn_http11() {
    bounded(async {
        let pki = Pki::new("alpn");
        let mut server = TlsServer::respond(pki.server(&["localhost"]), echo_target).await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        assert_eq!(fetch(&upstream, get("/alpn")).await, (200, "alpn".into()));
        let handshake = server.handshake().await;
        assert_eq!(handshake.conn, 0);
        assert_eq!(handshake.error, None);
        assert_eq!(handshake.offered_alpn, [b"http/1.1".to_vec()]);
        assert_eq!(handshake.agreed_alpn.as_deref(), Some(&b"http/1.1"[..]));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// TLS beyond the basics: records without data, closure alerts, large bodies

#[tokio::test]
async fn idle_connection_stays_usable_after_a_key_update() {
    bounded(async {
        let pki = Pki::new("key-update");
        let (updated_tx, mut updated) = mpsc::unbounded_channel();
        let mut server = TlsServer::start(pki.server(&["localhost"]), move |mut conn| {
            let updated = updated_tx.clone();
            async move {
                let mut first = true;
                while let Some(request) = conn.read_request().await {
                    conn.write(&echo_target(&request)).await;
                    if first {
                        // A TLS record with no application data while the connection idles.
                        conn.stream.get_mut().1.refresh_traffic_keys().unwrap();
                        conn.stream.flush().await.unwrap();
                        let _ = updated.send(());
                        first = false;
                    }
                }
            }
        })
        .await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        assert_eq!(fetch(&upstream, get("/one")).await, (200, "one".into()));
        updated.recv().await.unwrap();
        sleep(Duration::from_millis(50)).await;
        assert_eq!(fetch(&upstream, get("/two")).await, (200, "two".into()));
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (0, "/two".into())],
            "a key update is not a reason to drop the connection"
        );
        assert_eq!(server.accepts(), 1);
    })
    .await;
}

/// A server that answers with a body delimited by the end of the connection, ended with
/// `close_notify` when `notify`, else by a bare TCP close.
async fn close_delimited(notify: bool) -> Result<Bytes, UpstreamError> {
    let pki = Pki::new("close-delimited");
    let (closed_tx, _closed) = mpsc::unbounded_channel();
    let server = TlsServer::start(pki.server(&["localhost"]), move |mut conn| {
        let closed = closed_tx.clone();
        async move {
            if conn.read_request().await.is_some() {
                conn.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
                if notify {
                    conn.close_notify(closed).await;
                } else {
                    conn.drop_abruptly(closed);
                }
            }
        }
    })
    .await;
    let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
    let response = send(&upstream, get("/"))
        .await
        .unwrap_or_else(|e| panic!("request failed: {}", chain(&e)));
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
}

#[tokio::test]
async fn close_delimited_body_ends_with_close_notify() {
    bounded(async {
        let body = close_delimited(true).await.expect("body");
        assert_eq!(body, "until the end");
    })
    .await;
}

/// RFC 9112, 9.8: a response with neither `Content-Length` nor chunked framing is complete only
/// if a closure alert was received; a bare TCP close may be a truncation attack.
#[tokio::test]
async fn close_delimited_body_without_close_notify_is_a_body_error() {
    bounded(async {
        match close_delimited(false).await {
            Ok(body) => panic!("truncatable body accepted: {body:?}"),
            Err(error) => {
                assert!(matches!(error, UpstreamError::Body(_)), "{error:?}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn large_bodies_cross_tls_both_ways() {
    bounded(async {
        let pki = Pki::new("large");
        let mut server = TlsServer::respond(pki.server(&["localhost"]), |request| {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                request.body.len()
            )
            .into_bytes();
            response.extend_from_slice(&request.body);
            response
        })
        .await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        let payload: Bytes = (0..3 * 1024 * 1024)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        for _ in 0..2 {
            let request = Request::post("/echo").body(full(payload.clone())).unwrap();
            let (status, body) = fetch(&upstream, request).await;
            assert_eq!(status, 200);
            assert!(
                body == payload,
                "echoed body differs ({} bytes)",
                body.len()
            );
            let seen = server.next().await;
            assert_eq!(seen.framing, Framing::Length(payload.len()));
        }
        assert_eq!(server.accepts(), 1);
    })
    .await;
}

#[tokio::test]
async fn request_the_server_closed_on_without_answering_is_sent_again_on_a_new_connection() {
    bounded(async {
        let pki = Pki::new("replay");
        let (closed_tx, _closed) = mpsc::unbounded_channel();
        let mut server = TlsServer::start(pki.server(&["localhost"]), move |mut conn| {
            let closed = closed_tx.clone();
            async move {
                let mut answered = 0;
                while let Some(request) = conn.read_request().await {
                    if conn.index == 0 && answered == 1 {
                        // The pooled connection dies just as the request arrives.
                        conn.close_notify(closed).await;
                        return;
                    }
                    conn.write(&echo_target(&request)).await;
                    answered += 1;
                }
            }
        })
        .await;
        let upstream = Upstream::new(&server.url(), pki.client()).expect("base URL");
        assert_eq!(fetch(&upstream, get("/one")).await, (200, "one".into()));
        let request = Request::post("/two").body(full("payload")).unwrap();
        assert_eq!(fetch(&upstream, request).await, (200, "two".into()));
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (0, "/two".into()), (1, "/two".into())]
        );
        assert_eq!(server.accepts(), 2);
    })
    .await;
}
