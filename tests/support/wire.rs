//! A raw HTTP/1.1 client for wire tests: it writes exact bytes and parses the answers itself,
//! so a test controls a request's framing and sees an answer's framing exactly (the tests
//! include this file by path). Every wait is bounded by [`WAIT`]; a reset fails the test.

#![allow(dead_code, unreachable_pub)]

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream, ToSocketAddrs,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    time::{sleep, timeout},
};

/// Upper bound for one wait; a hang fails the test instead of blocking it.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future` for at most [`WAIT`], naming `what` if it times out.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A head's field lines as (lowercased name, trimmed value) pairs, in wire order.
pub fn parse_fields<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("field line {line:?}"));
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect()
}

/// The first value of the field `name` (lowercase) among `fields`.
pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// How many `name` fields there are among `fields`.
pub fn field_count(fields: &[(String, String)], name: &str) -> usize {
    fields.iter().filter(|(n, _)| n == name).count()
}

/// An answer as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status_line: String,
    pub status: u16,
    /// Names lowercased, values trimmed, in wire order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of the field `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }

    /// How many `name` fields the answer has.
    pub fn header_count(&self, name: &str) -> usize {
        field_count(&self.headers, name)
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    }

    /// The answer carries `connection: close` (and no other `connection` field).
    pub fn says_close(&self) -> bool {
        self.header_count("connection") == 1 && self.header("connection") == Some("close")
    }
}

/// A raw HTTP/1.1 client connection.
pub struct RawClient {
    reader: OwnedReadHalf,
    /// Taken by a test that writes from a task of its own.
    pub writer: Option<OwnedWriteHalf>,
    /// Read and not yet parsed.
    pub buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: impl ToSocketAddrs) -> Self {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        Self {
            reader,
            writer: Some(writer),
            buf: Vec::new(),
        }
    }

    /// Another handle on the connection's socket, non-blocking as tokio keeps it: for a test
    /// that looks, from elsewhere, at what has arrived (`peek`), without reading it.
    pub fn socket(&self) -> std::net::TcpStream {
        use std::os::fd::AsFd;
        let fd = self.reader.as_ref().as_fd().try_clone_to_owned().unwrap();
        std::net::TcpStream::from(fd)
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let writer = self.writer.as_mut().expect("writer taken");
        within("write", writer.write_all(bytes.as_ref()))
            .await
            .unwrap_or_else(|e| panic!("write failed: {e}"));
    }

    /// Writes `bytes`, then pauses so that the server reads them before whatever comes next.
    pub async fn send_alone(&mut self, bytes: impl AsRef<[u8]>) {
        self.send(bytes).await;
        sleep(Duration::from_millis(20)).await;
    }

    /// Writes `bytes` and reads the answer.
    pub async fn ask(&mut self, bytes: impl AsRef<[u8]>) -> Answer {
        self.send(bytes).await;
        self.read_answer().await
    }

    /// Writes each piece on its own, with a short pause after each, so the server reads them
    /// one by one.
    pub async fn send_in_pieces(&mut self, pieces: &[&[u8]]) {
        for piece in pieces {
            self.send(piece).await;
            sleep(Duration::from_millis(15)).await;
        }
    }

    /// One read into the buffer; `false` at the end of the stream. A reset fails the test.
    pub async fn fill(&mut self) -> bool {
        self.buf.reserve(16 * 1024);
        let read = within("read", self.reader.read_buf(&mut self.buf))
            .await
            .unwrap_or_else(|e| panic!("read failed: {e} (after {:?})", self.shown()));
        read > 0
    }

    /// What was read and not yet parsed, as text.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The status line and fields of the next answer.
    pub async fn read_head(&mut self) -> Answer {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            assert!(
                self.fill().await,
                "closed before an answer's head; got {:?}",
                self.shown()
            );
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let head = String::from_utf8(head[..end].to_vec()).expect("a UTF-8 head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "status line {status_line:?}"
        );
        let status = status_line[9..12].parse().expect("a status code");
        let headers = parse_fields(lines);
        Answer {
            status_line,
            status,
            headers,
            body: Vec::new(),
        }
    }

    /// The next answer, body included, framed as its head says (no body for 1xx, 204 and
    /// 304; an answer with neither length nor chunking runs to the end of the stream).
    pub async fn read_answer(&mut self) -> Answer {
        let mut answer = self.read_head().await;
        if answer.status < 200 || answer.status == 204 || answer.status == 304 {
            return answer;
        }
        answer.body = if answer.is_chunked() {
            self.read_chunked().await
        } else if let Some(length) = answer.header("content-length") {
            let length = length.parse().expect("a decimal content-length");
            self.read_exact(length).await
        } else {
            self.read_to_end().await
        };
        answer
    }

    /// The answer to a `HEAD` request: its head only.
    pub async fn read_head_answer(&mut self) -> Answer {
        self.read_head().await
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "closed after {} of {n} body bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Everything until the server closes the connection.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    pub async fn read_line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await, "closed mid-line: {:?}", self.shown());
        }
    }

    /// The next chunk's data, or `None` at the last chunk (its trailers read too).
    pub async fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let line = self.read_line().await;
        let size = line.split(';').next().unwrap().trim();
        let size =
            usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk size line {line:?}"));
        if size == 0 {
            while !self.read_line().await.is_empty() {}
            return None;
        }
        let data = self.read_exact(size).await;
        assert_eq!(self.read_exact(2).await, b"\r\n", "chunk without its CRLF");
        Some(data)
    }

    pub async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(chunk) = self.read_chunk().await {
            body.extend_from_slice(&chunk);
        }
        body
    }

    /// The server closes the connection (cleanly) with nothing more sent.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before the close: {:?}",
            self.shown()
        );
        assert!(
            !self.fill().await,
            "expected the connection closed, got {:?}",
            self.shown()
        );
    }

    /// `answer` says `connection: close`, and the server closes the connection after it.
    pub async fn expect_close(&mut self, answer: &Answer) {
        assert!(answer.says_close(), "{answer:?}");
        self.expect_closed().await;
    }
}
