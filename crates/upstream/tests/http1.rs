//! HTTP/1.1 wire behaviour of `Upstream` against raw TCP servers on loopback.
//!
//! Each server here writes hand-made bytes, so the test controls the framing exactly, and parses
//! what the client sends itself, so the test sees the request framing exactly. Every test is
//! bounded by [`WAIT`]: a hang fails instead of blocking.

use std::{
    fmt::Debug,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use aoai_upstream::{Upstream, UpstreamClient};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::sleep,
};
use tower::{Service, ServiceExt};

mod support;

use support::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Client side, written against the service interface only

/// An `Upstream` to `server` on a fresh client, so no test shares a pool with another.
macro_rules! upstream {
    ($server:expr) => {
        Upstream::new(&$server.url(), UpstreamClient::new()).expect("valid base URL")
    };
}

/// Sends `request` on a clone of `upstream`.
async fn send<S, RB>(upstream: &S, request: Request<TestBody>) -> Result<Response<RB>, BoxError>
where
    S: Service<Request<TestBody>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
{
    upstream.clone().oneshot(request).await.map_err(Into::into)
}

/// Sends `request`, expects a response, and collects its status and body.
async fn fetch<S, RB>(upstream: &S, request: Request<TestBody>) -> (u16, Bytes)
where
    S: Service<Request<TestBody>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes>,
    RB::Error: Debug,
{
    let what = format!("{} {}", request.method(), request.uri());
    let response = send(upstream, request)
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {}", chain(&*e)));
    let status = response.status().as_u16();
    (status, body_of(response).await)
}

/// Sends `request` and collects the response on a task of its own.
///
fn spawn_exchange<S, RB>(
    upstream: S,
    request: Request<TestBody>,
) -> tokio::task::JoinHandle<Result<(http::HeaderMap, Bytes), String>>
where
    S: Service<Request<TestBody>, Response = Response<RB>> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Debug,
{
    tokio::spawn(async move {
        let response = upstream.oneshot(request).await.map_err(|e| {
            let e: BoxError = e.into();
            chain(&*e)
        })?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e:?}"))?;
        Ok((parts.headers, body.to_bytes()))
    })
}

async fn body_of<RB>(response: Response<RB>) -> Bytes
where
    RB: Body<Data = Bytes>,
    RB::Error: Debug,
{
    response
        .into_body()
        .collect()
        .await
        .expect("response body failed")
        .to_bytes()
}

// ---------------------------------------------------------------------------------------------
// Raw server side

impl Conn<TcpStream> {
    /// Writes `bytes` in pieces of `piece` bytes, pausing between them.
    async fn write_slowly(&mut self, bytes: &[u8], piece: usize) {
        for part in bytes.chunks(piece) {
            self.write(part).await;
            sleep(Duration::from_millis(1)).await;
        }
    }

    /// Half-closes the connection (FIN), then keeps reading so a late client write does not
    /// turn into a reset that could cut the response short; any request that still arrives is
    /// recorded (on this connection's index) for the test to see.
    async fn close(mut self) {
        let _ = self.stream.shutdown().await;
        while self.read_request().await.is_some() {}
    }

    /// Closes the connection at once, without reading further.
    fn drop_now(self) {
        drop(self);
    }
}

/// A TCP server on `127.0.0.1:0` that hands each accepted connection to a handler, counts
/// accepts, and records every request read with [`Conn::read_request`].
struct RawServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: SeenLog,
}

impl RawServer {
    async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Conn<TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (tx, seen) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepts);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).unwrap();
                let index = counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(Conn {
                    stream,
                    buf: Vec::new(),
                    index,
                    seen: tx.clone(),
                }));
            }
        });
        Self {
            addr,
            accepts,
            seen: SeenLog(seen),
        }
    }

    /// A keep-alive server: on every connection, answers each request with `respond(request)`
    /// until the client closes.
    async fn respond<F>(respond: F) -> Self
    where
        F: Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
    {
        let respond = Arc::new(respond);
        Self::start(move |mut conn| {
            let respond = Arc::clone(&respond);
            async move { conn.answer_each(|request| respond(request)).await }
        })
        .await
    }

    /// Answers the first request on each connection with `first(request)`, and any later one on
    /// it with `500 Reused`, keeping the socket open: only the client's own reading of the first
    /// answer keeps it from sending another request on that connection.
    async fn answer_first_refuse_reuse<F>(first: F) -> Self
    where
        F: Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
    {
        let first = Arc::new(first);
        Self::start(move |mut conn| {
            let first = Arc::clone(&first);
            async move {
                let mut answered = false;
                while let Some(request) = conn.read_request().await {
                    if answered {
                        conn.write(b"HTTP/1.1 500 Reused\r\ncontent-length: 6\r\n\r\nreused")
                            .await;
                    } else {
                        conn.write(&first(&request)).await;
                        answered = true;
                    }
                }
            }
        })
        .await
    }

    /// Answers the first request on each connection with `response`, then closes it.
    async fn answer_once(response: &'static [u8]) -> Self {
        Self::start(move |mut conn| async move {
            if conn.read_request().await.is_some() {
                conn.write(response).await;
            }
            conn.close().await;
        })
        .await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The next request the server read.
    async fn next(&mut self) -> Seen {
        self.seen.next().await
    }

    /// The connection index of every request read so far (after the ones taken with `next`).
    fn drain_conns(&mut self) -> Vec<(usize, String)> {
        self.seen.drain_conns()
    }
}

// ---------------------------------------------------------------------------------------------
// 1-3, 5: connection reuse

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    bounded(async {
        let mut server = RawServer::respond(echo_target).await;
        let upstream = upstream!(server);
        for path in ["/one", "/two", "/three"] {
            let (status, body) = fetch(&upstream, get(path)).await;
            assert_eq!(status, 200);
            assert_eq!(body, path[1..]);
        }
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (0, "/two".into()), (0, "/three".into())],
            "every request should come on the first connection"
        );
        assert_eq!(
            server.accepts(),
            1,
            "sequential requests should share one connection"
        );
    })
    .await;
}

#[tokio::test]
async fn connection_close_response_is_not_reused() {
    bounded(async {
        // Answers `Connection: close` but keeps the socket open: only the client's own handling
        // of the header keeps it from sending the next request on this connection.
        let mut server = RawServer::answer_first_refuse_reuse(|request| {
            let body = request.target.trim_start_matches('/');
            format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        let upstream = upstream!(server);
        for path in ["/one", "/two"] {
            let (status, body) = fetch(&upstream, get(path)).await;
            assert_eq!(
                status, 200,
                "{path}: sent on a connection the server closed: {body:?}"
            );
            assert_eq!(body, path[1..]);
        }
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (1, "/two".into())]
        );
        assert_eq!(server.accepts(), 2);
    })
    .await;
}

#[tokio::test]
async fn http10_response_without_keep_alive_is_not_reused() {
    bounded(async {
        // HTTP/1.0 means close unless the server says keep-alive; the socket stays open anyway.
        let mut server = RawServer::answer_first_refuse_reuse(|_| {
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
        })
        .await;
        let upstream = upstream!(server);
        for path in ["/one", "/two"] {
            let (status, body) = fetch(&upstream, get(path)).await;
            assert_eq!(
                status, 200,
                "{path}: sent on a closed HTTP/1.0 connection: {body:?}"
            );
            assert_eq!(body, "ok");
        }
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (1, "/two".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn idle_connection_closed_by_the_server_is_replaced() {
    bounded(async {
        let mut server = RawServer::start(|mut conn| async move {
            if conn.index == 0 {
                // Answer one request as keep-alive, then close the idle connection.
                if let Some(request) = conn.read_request().await {
                    conn.write(&echo_target(&request)).await;
                }
                conn.close().await;
            } else {
                while let Some(request) = conn.read_request().await {
                    conn.write(&echo_target(&request)).await;
                }
            }
        })
        .await;
        let upstream = upstream!(server);
        let (status, body) = fetch(&upstream, get("/one")).await;
        assert_eq!((status, &body[..]), (200, &b"one"[..]));
        // Let the FIN arrive while the connection is idle in the pool.
        sleep(Duration::from_millis(100)).await;
        let (status, body) = fetch(&upstream, get("/two")).await;
        assert_eq!((status, &body[..]), (200, &b"two"[..]));
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (1, "/two".into())]
        );
        assert_eq!(server.accepts(), 2);
    })
    .await;
}

#[tokio::test]
async fn close_delimited_body_ends_at_close_and_is_not_reused() {
    bounded(async {
        let mut server = RawServer::start(|mut conn| async move {
            if conn.index == 0 {
                if conn.read_request().await.is_some() {
                    conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
                        .await;
                    sleep(Duration::from_millis(20)).await;
                    conn.write(b"part two\r\n\r\nHTTP/1.1 200 OK\r\n").await;
                }
                conn.close().await;
            } else {
                while let Some(request) = conn.read_request().await {
                    conn.write(&echo_target(&request)).await;
                }
            }
        })
        .await;
        let upstream = upstream!(server);
        let (status, body) = fetch(&upstream, get("/one")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "part one, part two\r\n\r\nHTTP/1.1 200 OK\r\n");
        let (status, body) = fetch(&upstream, get("/two")).await;
        assert_eq!((status, &body[..]), (200, &b"two"[..]));
        assert_eq!(
            server.drain_conns(),
            [(0, "/one".into()), (1, "/two".into())]
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4: chunked responses

#[tokio::test]
async fn chunked_response_with_extensions_trailers_and_slow_writes() {
    const TRAILERS: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n\
        6;a=b;c=\"d;e\"\r\n world\r\n\
        A\r\n0123456789\r\n\
        0000000001\r\n!\r\n\
        0\r\nx-trailer: y\r\nx-other: z\r\n\r\n";
    const SLOW: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        1a\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        3\r\n123\r\n\
        10\r\n0123456789abcdef\r\n\
        0\r\n\r\n";
    bounded(async {
        let mut server = RawServer::start(|mut conn| async move {
            while let Some(request) = conn.read_request().await {
                match request.target.as_str() {
                    "/trailers" => conn.write(TRAILERS).await,
                    "/slow" => conn.write_slowly(SLOW, 3).await,
                    _ => conn.write(&echo_target(&request)).await,
                }
            }
        })
        .await;
        let upstream = upstream!(server);

        let (status, body) = fetch(&upstream, get("/trailers")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "hello world0123456789!");

        let (status, body) = fetch(&upstream, get("/slow")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "abcdefghijklmnopqrstuvwxyz1230123456789abcdef");

        let (status, body) = fetch(&upstream, get("/after")).await;
        assert_eq!((status, &body[..]), (200, &b"after"[..]));
        assert_eq!(
            server.drain_conns(),
            [
                (0, "/trailers".into()),
                (0, "/slow".into()),
                (0, "/after".into())
            ],
            "a fully read chunked response leaves the connection reusable"
        );
    })
    .await;
}

#[tokio::test]
async fn chunked_response_streams_chunk_by_chunk() {
    bounded(async {
        let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        let server = RawServer::start(move |mut conn| {
            let release_rx = Arc::clone(&release_rx);
            async move {
                if conn.read_request().await.is_some() {
                    conn.write(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n",
                    )
                    .await;
                    // The rest waits until the client has seen the first chunk.
                    let _ = release_rx.lock().await.recv().await;
                    conn.write(b"7\r\nsecond\n\r\n0\r\n\r\n").await;
                }
                while conn.read_request().await.is_some() {}
            }
        })
        .await;
        let upstream = upstream!(server);
        let response = send(&upstream, get("/stream")).await.unwrap();
        let mut body = response.into_body();
        let mut first = Vec::new();
        while first.len() < 6 {
            let frame = body.frame().await.expect("body ended early").unwrap();
            if let Ok(data) = frame.into_data() {
                first.extend_from_slice(&data);
            }
        }
        assert_eq!(
            first, b"first\n",
            "the first chunk should arrive before the rest is sent"
        );
        release_tx.send(()).unwrap();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second\n");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6: interim responses

#[tokio::test]
async fn interim_100_continue_is_skipped() {
    bounded(async {
        let mut server = RawServer::respond(|request| {
            let mut response = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
            response.extend_from_slice(&echo_target(request));
            response
        })
        .await;
        let upstream = upstream!(server);
        for path in ["/final", "/again"] {
            let (status, body) = fetch(&upstream, get(path)).await;
            assert_eq!(status, 200, "the caller should see the final response");
            assert_eq!(body, path[1..]);
        }
        assert_eq!(
            server.drain_conns(),
            [(0, "/final".into()), (0, "/again".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn interim_103_early_hints_with_headers_is_skipped() {
    bounded(async {
        let server = RawServer::respond(|_| {
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nfinal"
                .to_vec()
        })
        .await;
        let upstream = upstream!(server);
        let response = send(&upstream, get("/x")).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["x-final"], "yes");
        assert!(
            response.headers().get("link").is_none(),
            "interim headers leaked into the final response"
        );
        assert_eq!(body_of(response).await, "final");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7: responses without a body

#[tokio::test]
async fn head_204_and_304_have_no_body_and_keep_the_connection() {
    bounded(async {
        let mut server = RawServer::respond(|request| match request.target.as_str() {
            "/head" => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n"
                    .to_vec()
            }
            "/204" => b"HTTP/1.1 204 No Content\r\nx-kind: none\r\n\r\n".to_vec(),
            "/304" => {
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\netag: \"e\"\r\n\r\n".to_vec()
            }
            _ => echo_target(request),
        })
        .await;
        let upstream = upstream!(server);

        let head = Request::head("/head").body(empty()).unwrap();
        let response = send(&upstream, head).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("content-length")
                .map(|v| v.as_bytes()),
            Some(&b"1234"[..]),
            "a HEAD response keeps its content-length"
        );
        assert_eq!(body_of(response).await, "", "a HEAD response has no body");

        let (status, body) = fetch(&upstream, get("/204")).await;
        assert_eq!((status, &body[..]), (204, &b""[..]));
        let (status, body) = fetch(&upstream, get("/304")).await;
        assert_eq!((status, &body[..]), (304, &b""[..]));
        let (status, body) = fetch(&upstream, get("/after")).await;
        assert_eq!((status, &body[..]), (200, &b"after"[..]));

        let seen = server.drain_conns();
        assert_eq!(
            seen,
            [
                (0, "/head".into()),
                (0, "/204".into()),
                (0, "/304".into()),
                (0, "/after".into())
            ],
            "bodiless responses should leave the connection reusable"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8-10: broken responses

/// Sends a request carrying a secret to `server` and returns the error chain, asserting it is
/// an error, not empty, and free of anything from the request.
async fn expect_request_error(server: &RawServer) -> String {
    let upstream = upstream!(server);
    let request = Request::post("/secret-path?key=secret-query")
        .header("api-key", "secret-value")
        .header("authorization", "Bearer secret-token")
        .body(full("secret-body"))
        .unwrap();
    let outcome = match send(&upstream, request).await {
        Err(error) => Err(chain(&*error)),
        // The error may surface from the body instead, for a response head that parsed.
        Ok(response) => {
            let status = response.status();
            match response.into_body().collect().await {
                Ok(body) => Ok((status, body.to_bytes())),
                Err(error) => Err(format!("{error:?}")),
            }
        }
    };
    let shown = match outcome {
        Err(shown) => shown,
        Ok((status, body)) => panic!("expected an error, got {status} with body {body:?}"),
    };
    assert!(!shown.trim().is_empty(), "empty error message");
    assert!(
        !shown.contains("secret"),
        "the error shows the request: {shown}"
    );
    shown
}

#[tokio::test]
async fn garbage_response_is_an_error() {
    bounded(async {
        let server = RawServer::answer_once(b"HELLO\r\n\r\n").await;
        expect_request_error(&server).await;
    })
    .await;
}

/// Each of `responses`, answered to one request and followed by an open, then closed,
/// connection, fails the request with an error.
async fn each_is_a_request_error(responses: &[&'static [u8]]) {
    for &response in responses {
        bounded(async {
            let server = RawServer::start(move |mut conn| async move {
                if conn.read_request().await.is_some() {
                    conn.write(response).await;
                }
                // Keep the connection open: a client that waits for more must not hang forever
                // only because the server closes; it is the framing that is wrong.
                sleep(Duration::from_millis(300)).await;
                conn.close().await;
            })
            .await;
            let shown = expect_request_error(&server).await;
            assert!(!shown.is_empty(), "{:?}", String::from_utf8_lossy(response));
        })
        .await;
    }
}

#[tokio::test]
async fn malformed_status_lines_are_errors() {
    each_is_a_request_error(&[
        &b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\ncontent-length: 0\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    ])
    .await;
}

#[tokio::test]
async fn invalid_response_framing_is_an_error() {
    each_is_a_request_error(&[
        &b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn server_closing_without_answering_is_an_error() {
    bounded(async {
        // Reads the request, then closes.
        let server = RawServer::start(|mut conn| async move {
            conn.read_request().await;
            conn.drop_now();
        })
        .await;
        expect_request_error(&server).await;
        // Closes at once, before the request arrives.
        let server = RawServer::start(|conn| async move { conn.drop_now() }).await;
        expect_request_error(&server).await;
        // Sends half a status line, then closes.
        let server = RawServer::answer_once(b"HTTP/1.1 200 O").await;
        expect_request_error(&server).await;
    })
    .await;
}

#[tokio::test]
async fn response_head_over_one_mebibyte_is_an_error() {
    bounded(async {
        // Many headers, 2 MiB in all, then a valid end of head.
        let server = RawServer::start(|mut conn| async move {
            if conn.read_request().await.is_some() {
                conn.write(b"HTTP/1.1 200 OK\r\n").await;
                let line = format!("x-filler: {}\r\n", "a".repeat(1000));
                for _ in 0..2 * 1024 {
                    conn.write(line.as_bytes()).await;
                }
                conn.write(b"content-length: 0\r\n\r\n").await;
            }
            conn.close().await;
        })
        .await;
        expect_request_error(&server).await;

        // One header line of 2 MiB.
        let server = RawServer::start(|mut conn| async move {
            if conn.read_request().await.is_some() {
                conn.write(b"HTTP/1.1 200 OK\r\nx-huge: ").await;
                let piece = "b".repeat(64 * 1024);
                for _ in 0..32 {
                    conn.write(piece.as_bytes()).await;
                }
                conn.write(b"\r\ncontent-length: 0\r\n\r\n").await;
            }
            conn.close().await;
        })
        .await;
        expect_request_error(&server).await;
    })
    .await;
}

#[tokio::test]
async fn body_shorter_than_content_length_is_a_body_error() {
    bounded(async {
        let server =
            RawServer::answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd").await;
        let upstream = upstream!(server);
        let response = send(&upstream, get("/x")).await.unwrap();
        assert_eq!(response.status(), 200);
        let result = response.into_body().collect().await;
        assert!(
            result.is_err(),
            "a body cut short of its content-length must fail, got {:?}",
            result.map(|c| c.to_bytes())
        );
    })
    .await;
}

#[tokio::test]
async fn truncated_chunked_body_is_a_body_error() {
    for response in [
        // Cut inside a chunk.
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\nabcd"[..],
        // Cut before the last chunk.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n",
        // Cut inside the trailers.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\nx-t: y\r\n",
    ] {
        bounded(async {
            let server = RawServer::answer_once(response).await;
            let upstream = upstream!(server);
            let shown = String::from_utf8_lossy(response);
            let result = match send(&upstream, get("/x")).await {
                Ok(response) => response
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .map_err(|e| format!("{e:?}")),
                Err(error) => Err(chain(&*error)),
            };
            assert!(
                result.is_err(),
                "{shown:?}: a truncated chunked body must fail, got {result:?}"
            );
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// 11: request framing

#[tokio::test]
async fn full_request_body_is_sent_with_its_content_length() {
    bounded(async {
        const SIZE: usize = 100_000;
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let mut server = RawServer::respond(echo_target).await;
        let upstream = upstream!(server);
        let request = Request::post("/full").body(full(data.clone())).unwrap();
        let (status, _) = fetch(&upstream, request).await;
        assert_eq!(status, 200);
        let seen = server.next().await;
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.framing, Framing::Length(SIZE));
        assert_eq!(
            seen.header("content-length"),
            Some(SIZE.to_string().as_str())
        );
        assert_eq!(seen.header_count("content-length"), 1);
        assert_eq!(seen.header("transfer-encoding"), None);
        assert!(seen.body == data, "request body differs");

        assert_next_request_parses_on_the_same_connection(&upstream, &mut server).await;
    })
    .await;
}

/// The connection stayed in sync after a request: the next one, to an echoing server, goes out
/// on the first connection and is answered.
async fn assert_next_request_parses_on_the_same_connection(
    upstream: &Upstream,
    server: &mut RawServer,
) {
    let (status, body) = fetch(upstream, get("/next")).await;
    assert_eq!((status, &body[..]), (200, &b"next"[..]));
    assert_eq!(server.next().await.conn, 0);
}

#[tokio::test]
async fn streaming_request_body_is_framed() {
    bounded(async {
        let mut server = RawServer::respond(echo_target).await;
        let upstream = upstream!(server);
        let (tx, body) = channel_body(1);
        let chunks: Vec<Bytes> = vec![
            Bytes::from_static(b"first "),
            Bytes::new(),
            Bytes::from_static(b"second\r\n0\r\n\r\n "),
            Bytes::from(vec![b'x'; 70_000]),
            Bytes::from_static(b" last"),
        ];
        let expected: Vec<u8> = chunks.concat();
        tokio::spawn(async move {
            for chunk in chunks {
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                sleep(Duration::from_millis(5)).await;
            }
        });
        let request = Request::post("/stream").body(body).unwrap();
        let (status, _) = fetch(&upstream, request).await;
        assert_eq!(status, 200);
        let seen = server.next().await;
        match seen.framing {
            Framing::Chunked => {
                assert_eq!(seen.header("content-length"), None, "both TE and CL sent");
            }
            Framing::Length(n) => assert_eq!(n, expected.len()),
            Framing::None => panic!("a streaming body was sent without framing"),
        }
        assert_eq!(seen.body.len(), expected.len());
        assert!(seen.body == expected, "request body differs");

        assert_next_request_parses_on_the_same_connection(&upstream, &mut server).await;
    })
    .await;
}

#[tokio::test]
async fn empty_streaming_request_body_is_framed() {
    bounded(async {
        let mut server = RawServer::respond(echo_target).await;
        let upstream = upstream!(server);
        let (tx, body) = channel_body(1);
        drop(tx);
        let request = Request::post("/empty-stream").body(body).unwrap();
        let (status, _) = fetch(&upstream, request).await;
        assert_eq!(status, 200);
        let seen = server.next().await;
        assert!(
            matches!(seen.framing, Framing::Chunked | Framing::Length(0)),
            "a POST with an empty body should still be framed: {:?}",
            seen.headers
        );
        assert!(seen.body.is_empty());
        let (status, _) = fetch(&upstream, get("/next")).await;
        assert_eq!(status, 200);
        assert_eq!(server.next().await.conn, 0);
    })
    .await;
}

#[tokio::test]
async fn get_without_body_sends_no_body() {
    bounded(async {
        let mut server = RawServer::respond(echo_target).await;
        let upstream = upstream!(server);
        for path in ["/one", "/two"] {
            let (status, body) = fetch(&upstream, get(path)).await;
            assert_eq!((status, &body[..]), (200, &path.as_bytes()[1..]));
            let seen = server.next().await;
            assert_eq!(seen.method, "GET");
            assert_eq!(seen.target, path);
            assert_eq!(seen.conn, 0, "{path}");
            assert_eq!(seen.header("transfer-encoding"), None, "{:?}", seen.headers);
            assert!(
                matches!(seen.header("content-length"), None | Some("0")),
                "{:?}",
                seen.headers
            );
            assert!(seen.body.is_empty());
            assert_eq!(seen.header("host"), Some(server.addr.to_string().as_str()));
        }
        // Nothing beyond the two heads arrived on the connection (a stray body would have been
        // read as a request of its own).
        assert!(server.drain_conns().is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 12: response headers

#[tokio::test]
async fn response_headers_keep_repeats_and_drop_framing() {
    bounded(async {
        let mut server = RawServer::respond(|_| {
            b"HTTP/1.1 200 OK\r\n\
              Set-Cookie: a=1\r\n\
              X-Mixed-Case: mixed\r\n\
              set-cookie: b=2\r\n\
              Transfer-Encoding: chunked\r\n\
              Connection: keep-alive\r\n\
              SET-COOKIE: c=3\r\n\
              x-opaque: caf\xe9\r\n\
              x-empty:\r\n\
              \r\n\
              3\r\nabc\r\n0\r\n\r\n"
                .to_vec()
        })
        .await;
        let upstream = upstream!(server);
        let response = send(&upstream, get("/x")).await.unwrap();
        let headers = response.headers().clone();
        let cookies: Vec<&[u8]> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(
            cookies,
            [&b"a=1"[..], b"b=2", b"c=3"],
            "repeated headers in order"
        );
        assert_eq!(headers["x-mixed-case"], "mixed");
        assert_eq!(headers["x-opaque"].as_bytes(), b"caf\xe9");
        assert_eq!(headers["x-empty"], "");
        assert!(
            headers.get("transfer-encoding").is_none(),
            "transfer-encoding reached the caller"
        );
        assert!(
            headers.get("connection").is_none(),
            "connection reached the caller"
        );
        assert_eq!(headers.len(), 6, "{headers:?}");
        assert_eq!(body_of(response).await, "abc");

        // `Connection: keep-alive` keeps the connection.
        let (status, _) = fetch(&upstream, get("/y")).await;
        assert_eq!(status, 200);
        assert_eq!(server.drain_conns(), [(0, "/x".into()), (0, "/y".into())]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 13: concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_their_own_responses() {
    bounded(async {
        let server = RawServer::start(|mut conn| async move {
            while let Some(request) = conn.read_request().await {
                let id = request.header("x-request-id").unwrap_or("none").to_owned();
                // Answer out of order: later ids answer sooner.
                let delay = 40 - id.parse::<u64>().unwrap_or(0) % 40;
                sleep(Duration::from_millis(delay)).await;
                let body = format!("response for {id}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nx-echo: {id}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                conn.write(response.as_bytes()).await;
                // Headers and body in separate writes, to tempt a client that mixes them up.
                sleep(Duration::from_millis(1)).await;
                conn.write(body.as_bytes()).await;
            }
        })
        .await;
        let upstream = upstream!(server);
        for round in 0..2 {
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let id = round * 20 + i;
                    let upstream = upstream.clone();
                    let request = Request::post(format!("/r/{id}"))
                        .header("x-request-id", id.to_string())
                        .body(full(format!("body {id}")))
                        .unwrap();
                    (id, spawn_exchange(upstream, request))
                })
                .collect();
            for (id, task) in tasks {
                let (headers, body) = task
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("request {id}: {e}"));
                let echo = headers["x-echo"].to_str().unwrap();
                assert_eq!(echo, id.to_string(), "response headers swapped");
                assert_eq!(body, format!("response for {id}"), "response body swapped");
            }
        }
        assert!(server.accepts() >= 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A backend that answers before it has read the request

/// A backend refusing a large body answers at once and stops reading; the client must return
/// that answer, not block on a socket nobody drains, nor turn it into a write error.
#[tokio::test]
async fn early_answer_to_a_large_body_is_returned() {
    bounded(async {
        let (held_tx, mut held_rx) = mpsc::unbounded_channel();
        let server = RawServer::start(move |mut conn| {
            let held_tx = held_tx.clone();
            async move {
                // The head only; the body stays unread in the socket.
                while find(&conn.buf, b"\r\n\r\n").is_none() {
                    assert!(conn.fill().await, "client closed mid-head");
                }
                conn.write(
                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!",
                )
                .await;
                // Keep the connection open without reading, until the test is done.
                let _ = held_tx.send(conn);
            }
        })
        .await;
        let upstream = upstream!(server);
        // Far more than the loopback socket buffers hold.
        let body = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
        let request = Request::post("/upload").body(full(body)).unwrap();
        let (status, answer) = fetch(&upstream, request).await;
        assert_eq!((status, &answer[..]), (413, &b"too big!"[..]));
        // The connection, left mid-request, is not used again.
        assert_eq!(fetch(&upstream, get("/next")).await.0, 413);
        assert_eq!(server.accepts(), 2);
        held_rx.close();
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What a request holds while its answer is awaited

/// Tells, by a flag, that it was dropped.
#[derive(Clone)]
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The request's head (its fields and extensions) is freed once it has been sent, while the
/// backend works on the answer, not once the answer has come, while the caller waits for it.
#[tokio::test]
async fn a_request_head_is_freed_once_sent_before_the_answer_comes() {
    bounded(async {
        let freed = Arc::new(AtomicBool::new(false));
        let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel();
        let seen_freed = Arc::clone(&freed);
        let server = RawServer::start(move |mut conn| {
            let seen_freed = Arc::clone(&seen_freed);
            let outcome_tx = outcome_tx.clone();
            async move {
                conn.read_request().await.expect("a request");
                // Up to a second for the client to free what it sent; answering ends the wait
                // either way.
                for _ in 0..100 {
                    if seen_freed.load(Ordering::SeqCst) {
                        break;
                    }
                    sleep(Duration::from_millis(10)).await;
                }
                let _ = outcome_tx.send(seen_freed.load(Ordering::SeqCst));
                conn.write(&ok("answered")).await;
            }
        })
        .await;
        let upstream = upstream!(server);
        let mut request = get("/held");
        request
            .extensions_mut()
            .insert(DropFlag(Arc::clone(&freed)));
        let (status, body) = fetch(&upstream, request).await;
        assert_eq!((status, &body[..]), (200, &b"answered"[..]));
        let freed_before_answering = outcome_rx.recv().await.expect("the backend's outcome");
        assert!(
            freed_before_answering,
            "the request's head should be freed once it was sent, before the backend answered"
        );
    })
    .await;
}
