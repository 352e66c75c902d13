//! Shared by the wire-level tests (`http1.rs`, `tls.rs`, `server.rs`): bounded waits, request
//! bodies, the raw server side, which reads each request off the wire itself, and (in `wire`)
//! the raw client side.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    time::timeout,
};

/// The request body type. Its error is a concrete type with no lifetime in it: a `dyn Error`
/// there would make spawned request futures trip a higher-ranked `Send` limitation of the
/// compiler.
pub type TestBody = UnsyncBoxBody<Bytes, std::io::Error>;

pub mod wire;

/// A body fed by a channel of `capacity` messages: each message is one data frame (or an
/// error), a closed channel ends the body. Its size hint is never exact, so its length is never
/// known up front.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Result<Bytes, std::io::Error>>, TestBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody(rx).boxed_unsync())
}

struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|message| message.map(|frame| frame.map(http_body::Frame::data)))
    }
}

pub use wire::{WAIT, find};

pub async fn bounded<F: Future>(future: F) -> F::Output {
    timeout(WAIT, future).await.expect("timed out")
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

pub fn get(path: &str) -> Request<TestBody> {
    Request::get(path).body(empty()).unwrap()
}

/// An error's message followed by those of its sources.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut shown = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        shown.push_str(": ");
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    shown
}

/// `200 OK` with a `content-length` body.
pub fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The request target with its leading slash removed, as a body for `ok`.
pub fn echo_target(request: &Seen) -> Vec<u8> {
    ok(request.target.trim_start_matches('/'))
}

/// How a request body was framed on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Neither `content-length` nor `transfer-encoding`.
    None,
    Length(usize),
    Chunked,
}

/// One request as a raw server read it off the wire.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which accepted connection it came on, from 0.
    pub conn: usize,
    pub method: String,
    pub target: String,
    /// Names lowercased, values trimmed, in wire order.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        wire::field(&self.headers, name)
    }

    pub fn header_count(&self, name: &str) -> usize {
        wire::field_count(&self.headers, name)
    }
}

/// One accepted connection of a raw server, plain TCP or TLS.
pub struct Conn<S> {
    pub stream: S,
    pub buf: Vec<u8>,
    /// Which accepted connection it is, from 0.
    pub index: usize,
    pub seen: mpsc::UnboundedSender<Seen>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads more bytes into the buffer; `false` on end of stream or error.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "client closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// One line without its CRLF.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line = self.buf.drain(..end + 2).collect::<Vec<u8>>();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await, "client closed mid-line");
        }
    }

    /// The next request on this connection, body included, or `None` if the client closed the
    /// connection (or sent nothing more) before starting one. Panics on malformed framing.
    pub async fn read_request(&mut self) -> Option<Seen> {
        let head_end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "client closed mid-head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        };
        let head = self.buf.drain(..head_end + 4).collect::<Vec<u8>>();
        let head = String::from_utf8_lossy(&head[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap();
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap().to_owned();
        let target = parts.next().expect("request target").to_owned();
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "request line {request_line:?}"
        );
        let headers = wire::parse_fields(lines);
        let mut seen = Seen {
            conn: self.index,
            method,
            target,
            headers,
            framing: Framing::None,
            body: Vec::new(),
        };
        let chunked = seen
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            seen.framing = Framing::Chunked;
            loop {
                let size_line = self.line().await;
                let size = size_line.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("chunk size line {size_line:?}"));
                if size == 0 {
                    // Trailers, up to an empty line.
                    while !self.line().await.is_empty() {}
                    break;
                }
                let data = self.take(size).await;
                seen.body.extend_from_slice(&data);
                assert_eq!(self.take(2).await, b"\r\n", "chunk not followed by CRLF");
            }
        } else if let Some(length) = seen.header("content-length") {
            let length = length
                .parse()
                .unwrap_or_else(|_| panic!("content-length {length:?}"));
            seen.framing = Framing::Length(length);
            seen.body = self.take(length).await;
        }
        let _ = self.seen.send(seen.clone());
        Some(seen)
    }

    /// Answers each request on this connection with `respond(request)` until the client
    /// closes it.
    pub async fn answer_each(&mut self, respond: impl Fn(&Seen) -> Vec<u8>) {
        while let Some(request) = self.read_request().await {
            let response = respond(&request);
            self.write(&response).await;
        }
    }

    /// Writes `bytes` and flushes them (out of rustls, for TLS), ignoring errors (the client
    /// may have given up, which its test checks).
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }
}

/// The requests a raw server read, in the order read.
pub struct SeenLog(pub mpsc::UnboundedReceiver<Seen>);

impl SeenLog {
    /// The next request the server read.
    pub async fn next(&mut self) -> Seen {
        self.0.recv().await.expect("server gone")
    }

    /// The connection index and target of every request read so far (after the ones taken
    /// with `next`).
    pub fn drain_conns(&mut self) -> Vec<(usize, String)> {
        let mut conns = Vec::new();
        while let Ok(seen) = self.0.try_recv() {
            conns.push((seen.conn, seen.target));
        }
        conns
    }
}
