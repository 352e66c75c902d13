//! The wire rules a security review holds a proxy to, sent as raw bytes: hyper frames every
//! byte both ways, and the gateway checks what hyper leaves to the application (`Host`). Each
//! case is one of the defects the hand-written HTTP/1.1 code once had; none may come back.
//! Also: a caller that writes its whole over-limit body before reading reads its 413.

mod support;
#[path = "support/wire.rs"]
mod wire;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{BOUND, CHAT, builder_over, serve_gateway, sims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::RawClient;

/// The address (`host:port`) of a gateway base URL.
fn addr_of(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// A backend that reads a request head and answers `reply`, then closes. Returns its URL.
async fn raw_backend(reply: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while wire::find(&head, b"\r\n\r\n").is_none() {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = socket.write_all(&reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    url
}

/// A chat request with `fields` (each ending in CRLF) and a `Content-Length` body.
fn chat_request(fields: &str, body: &str) -> String {
    format!(
        "POST {CHAT} HTTP/1.1\r\n{fields}content-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

const BODY: &str = r#"{"messages":[{"role":"user","content":"Hello"}]}"#;

/// A chat request, as raw bytes, through a gateway whose one instance answers `reply`.
async fn chat_through_gateway_to(reply: Vec<u8>) -> wire::Answer {
    let backend = raw_backend(reply).await;
    let gateway = aoai_tower::Gateway::builder()
        .backend("raw", backend)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let mut caller = RawClient::connect(addr_of(&base)).await;
    caller.ask(chat_request("host: gateway\r\n", BODY)).await
}

#[tokio::test]
async fn a_backend_answer_with_both_chunked_and_content_length_reaches_the_caller_whole() {
    let body = r#"{"pid":"the whole answer, not its first five bytes"}"#;
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\
         content-length: 5\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let answer = chat_through_gateway_to(reply.into_bytes()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), body);
    assert_ne!(answer.header("content-length"), Some("5"), "{answer:?}");
}

#[tokio::test]
async fn a_backend_answer_head_over_64_kib_in_one_write_is_a_502() {
    let mut reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    for i in 0..1000 {
        reply.extend_from_slice(format!("x-filler-{i}: {}\r\n", "f".repeat(100)).as_bytes());
    }
    reply.extend_from_slice(b"\r\n{}");
    assert!(reply.len() > 100_000);
    let answer = chat_through_gateway_to(reply).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    support::assert_azure_error(answer.text(), "bad_gateway");
}

/// Sends `request` raw and asserts the caller gets a 400 and no instance was contacted.
async fn assert_refused_400(request: &[u8]) {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let mut caller = RawClient::connect(addr_of(&base)).await;
    caller.send(request).await;
    let answer = caller.read_head().await;
    assert_eq!(answer.status, 400, "{:?}", String::from_utf8_lossy(request));
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn chunk_size_lines_with_a_bare_lf_or_junk_are_refused() {
    for body in [
        "2;\nxx\r\n45\r\n0\r\n\r\n",
        "2\nxx\r\n0\r\n\r\n",
        "2\rxx\r\n0\r\n\r\n",
        "2 x\r\nxx\r\n0\r\n\r\n",
        "zz\r\nxx\r\n0\r\n\r\n",
    ] {
        let request = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        );
        assert_refused_400(request.as_bytes()).await;
    }
}

#[tokio::test]
async fn an_empty_transfer_encoding_is_refused_not_framed_by_content_length() {
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding:\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    assert_refused_400(request.as_bytes()).await;
}

#[tokio::test]
async fn an_http11_request_without_exactly_one_valid_host_is_refused() {
    for fields in [
        "",
        "host: a\r\nhost: b\r\n",
        "host: a b\r\n",
        "host: user@gateway\r\n",
    ] {
        let sims = sims(1).await;
        let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
        let mut caller = RawClient::connect(addr_of(&base)).await;
        let answer = caller.ask(chat_request(fields, BODY)).await;
        assert_eq!(answer.status, 400, "{fields:?}: {answer:?}");
        support::assert_azure_error(answer.text(), "invalid_host");
        assert_eq!(sims[0].request_count(), 0, "{fields:?}");
    }
    // One valid Host is served.
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let mut caller = RawClient::connect(addr_of(&base)).await;
    let answer = caller
        .ask(chat_request("host: gateway:8080\r\n", BODY))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

const LIMIT: usize = 64 * 1024;
/// What an over-limit caller writes: far more than the limit, as a 40 MiB upload would be.
const OVER: usize = 4 * 1024 * 1024;

#[tokio::test]
async fn an_http11_caller_writing_its_whole_over_limit_body_first_reads_the_413() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).body_limit(LIMIT).build().unwrap()).await;
    for declared in [true, false] {
        let mut stream = TcpStream::connect(addr_of(&base)).await.unwrap();
        let framing = if declared {
            format!("content-length: {OVER}\r\n")
        } else {
            "transfer-encoding: chunked\r\n".to_owned()
        };
        let head = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n{framing}\r\n"
        );
        let mut request = head.into_bytes();
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..OVER / piece.len() {
            if !declared {
                request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            }
            request.extend_from_slice(&piece);
            if !declared {
                request.extend_from_slice(b"\r\n");
            }
        }
        if !declared {
            request.extend_from_slice(b"0\r\n\r\n");
        }
        // Everything is written before a byte is read, as Python's urllib does.
        tokio::time::timeout(BOUND, stream.write_all(&request))
            .await
            .expect("the gateway stopped reading the body")
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while wire::find(&answer, b"request_body_too_large").is_none() {
            let read = tokio::time::timeout(BOUND, stream.read(&mut buffer))
                .await
                .expect("no answer")
                .unwrap_or_else(|e| panic!("declared {declared}: {e}"));
            assert_ne!(read, 0, "closed before the 413: {answer:?}");
            answer.extend_from_slice(&buffer[..read]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 413 "), "declared {declared}");
    }
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn an_http2_caller_sending_its_whole_over_limit_body_first_reads_the_413() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).body_limit(LIMIT).build().unwrap()).await;
    let tcp = TcpStream::connect(addr_of(&base)).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let (frames, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let body = StreamBody::new(tokio_stream_of(receiver));
    let request = http::Request::post(format!("http://gateway{CHAT}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let response = sender.send_request(request);
    let response = tokio::spawn(response);
    // Every frame is handed over before the answer is looked at.
    let piece = Bytes::from(vec![b'x'; 64 * 1024]);
    for _ in 0..OVER / piece.len() {
        tokio::time::timeout(BOUND, frames.send(Ok(Frame::data(piece.clone()))))
            .await
            .expect("the gateway stopped reading the body")
            .ok();
    }
    drop(frames);
    let response = tokio::time::timeout(BOUND, response)
        .await
        .expect("no answer")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 413);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    support::assert_azure_error(
        std::str::from_utf8(&text).unwrap(),
        "request_body_too_large",
    );
    assert_eq!(sims[0].request_count(), 0);
}

/// The frames of `receiver` as a stream, ending when its sender is dropped.
fn tokio_stream_of<T>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}
