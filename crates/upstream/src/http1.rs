//! HTTP/1.1 on the wire: the request head, the response head, and the response body's framing
//! (RFC 9112).

use std::{io, mem::MaybeUninit};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use crate::headers::{
    FieldRole, connection_named, connection_options, field_name, is_forwarded_request_field,
};

/// Most response header fields accepted (hyper's default too); Azure OpenAI sends about 25.
const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size line or trailer section accepted.
const MAX_LINE_BYTES: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// `Content-Length: n`, or no header for an empty body of a method without body semantics.
    Length(u64),
    /// `Transfer-Encoding: chunked`, for a body of unknown length.
    Chunked,
}

impl RequestFraming {
    /// The framing for a body with this exact size, if known.
    pub(crate) fn for_body(exact: Option<u64>) -> Self {
        exact.map_or(Self::Chunked, Self::Length)
    }
}

/// Writes `METHOD prefix+target HTTP/1.1`, `Host`, the request's end-to-end headers, and the
/// framing header into `out`.
///
/// Hop-by-hop fields, and the request's own `Host`, `Content-Length` and `Transfer-Encoding`,
/// are not written: the framing written here is the only one, so a caller's header can never
/// disagree with the body sent.
pub(crate) fn encode_request_head(
    method: &Method,
    prefix: &str,
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    framing: RequestFraming,
    out: &mut BytesMut,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    // One pass writes the end-to-end fields. Rarely, a `Connection` field names more fields not
    // to forward, which may stand before it: then the fields are written again without them.
    let fields_start = out.len();
    let mut connection = false;
    for (name, value) in headers {
        match FieldRole::of(name.as_str().as_bytes()) {
            FieldRole::EndToEnd => write_field(out, name, value),
            FieldRole::Connection => connection = true,
            _ => {}
        }
    }
    if connection && let Some(named) = connection_named(headers) {
        out.truncate(fields_start);
        for (name, value) in headers {
            if is_forwarded_request_field(name, Some(&named)) {
                write_field(out, name, value);
            }
        }
    }
    match framing {
        RequestFraming::Length(0) if !has_body_semantics(method) => {}
        RequestFraming::Length(length) => write_content_length(out, length),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the field line `name: value`.
pub(crate) fn write_field(out: &mut impl BufMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

/// Writes the field line `content-length: length`.
pub(crate) fn write_content_length(out: &mut impl BufMut, length: u64) {
    out.put_slice(b"content-length: ");
    out.put_slice(itoa(length, &mut [0; 20]));
    out.put_slice(b"\r\n");
}

/// Whether an empty body still needs `Content-Length: 0` (RFC 9110, 8.6).
fn has_body_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

pub(crate) fn itoa(mut value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buf[start..];
        }
    }
}

/// A parsed response head.
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once this body is read.
    pub(crate) keep_alive: bool,
}

/// Parses the next final response head from the front of `buf`, skipping interim (1xx)
/// responses, and removes it from `buf`. `None` when more bytes are needed.
pub(crate) fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> io::Result<Option<ResponseHead>> {
    loop {
        // Uninitialized: httparse fills what it parses, and nothing is zeroed per response.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(invalid("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(invalid("more than 100 response header fields"));
            }
            Err(e) => return Err(invalid(&format!("invalid response head: {e}"))),
        };
        let code = response.code.unwrap_or_default();
        let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid(
                "backend switched protocols; upgrades are not forwarded",
            ));
        }
        if status.is_informational() {
            buf.advance(length);
            continue;
        }
        let version = if response.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // One pass over the fields reads the framing and connection fields and leaves out the
        // hop-by-hop ones.
        let base = buf.as_ptr() as usize;
        let mut spans = [FieldSpan::default(); MAX_HEADERS];
        let mut kept = 0;
        let mut scan = FramingFields::default();
        for field in response.headers.iter() {
            let name = field.name.as_bytes();
            let role = FieldRole::of(name);
            scan.read(role, field.value);
            if matches!(
                role,
                FieldRole::EndToEnd | FieldRole::Host | FieldRole::ContentLength
            ) {
                spans[kept] = FieldSpan::of(base, name, field.value);
                kept += 1;
            }
        }
        let framing = scan.framing(method, status)?;
        // Both `Transfer-Encoding` and `Content-Length` is how responses are smuggled: the
        // coding wins, and the connection is not used again (RFC 9112, 6.3).
        let ambiguous = scan.coding.is_some() && scan.content_length.is_some();
        let keep_alive = framing != Framing::Close
            && !ambiguous
            && if version == Version::HTTP_11 {
                !scan.close
            } else {
                scan.keep_alive
            };
        let named = scan.named;
        let head = buf.split_to(length).freeze();
        // Room for the headers that middleware adds on the way back (`x-served-by`, ...).
        let mut headers = header_map(&head, &spans[..kept], 2).map_err(|e| match e {
            InvalidField::Name => invalid("invalid response header name"),
            InvalidField::Value => invalid("invalid response header value"),
        })?;
        // Rare: `Connection` names more fields not to forward.
        for name in named {
            headers.remove(name);
        }
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// What the framing and connection fields of a response head say.
#[derive(Default)]
struct FramingFields<'h> {
    /// The last coding of the last `Transfer-Encoding` field, if there is one.
    coding: Option<&'h [u8]>,
    /// Present once a `Content-Length` field is: the length all its values agree on, or what is
    /// wrong with them.
    content_length: Option<Result<u64, &'static str>>,
    /// `Connection: close` was sent.
    close: bool,
    /// `Connection: keep-alive` was sent.
    keep_alive: bool,
    /// The fields `Connection` names, which are not forwarded.
    named: Vec<HeaderName>,
}

impl<'h> FramingFields<'h> {
    fn read(&mut self, role: FieldRole, value: &'h [u8]) {
        match role {
            FieldRole::TransferEncoding => {
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                self.coding = Some(last.trim_ascii());
            }
            FieldRole::ContentLength => {
                // The first problem found stands.
                self.content_length = Some(match self.content_length.take() {
                    Some(Err(problem)) => Err(problem),
                    seen => agreed_length(value, seen.and_then(Result::ok)).map_err(|e| match e {
                        LengthError::Invalid => "invalid content-length",
                        LengthError::Conflicting => "conflicting content-length values",
                    }),
                });
            }
            FieldRole::Connection => {
                for option in connection_options(value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if let Ok(name) = HeaderName::from_bytes(option) {
                        self.named.push(name);
                    }
                }
            }
            FieldRole::EndToEnd | FieldRole::Host | FieldRole::HopByHop => {}
        }
    }

    /// The body length rules of RFC 9112, section 6.3.
    fn framing(&self, method: &Method, status: StatusCode) -> io::Result<Framing> {
        if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Length(0));
        }
        if let Some(coding) = self.coding {
            return Ok(if coding.eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::Close
            });
        }
        match self.content_length {
            None => Ok(Framing::Close),
            Some(Ok(length)) => Ok(Framing::Length(length)),
            Some(Err(problem)) => Err(invalid(problem)),
        }
    }
}

/// `len` in hex followed by CRLF.
pub(crate) fn chunk_size_line(mut len: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len() - 2;
    buf[start..].copy_from_slice(b"\r\n");
    loop {
        start -= 1;
        buf[start] = b"0123456789abcdef"[len % 16];
        len /= 16;
        if len == 0 {
            return &buf[start..];
        }
    }
}

/// Where a field's name and value lie in a head, as offsets from the head's first byte.
///
/// Offsets fit in `u32`: a head is at most 64 KiB, and the buffer it is parsed in holds at most
/// one read more.
#[derive(Clone, Copy, Default)]
pub(crate) struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl FieldSpan {
    /// The span of `name` and `value`, slices of a head whose first byte is at address `base`.
    pub(crate) fn of(base: usize, name: &[u8], value: &[u8]) -> Self {
        let range = |part: &[u8]| {
            let start = (part.as_ptr() as usize - base) as u32;
            (start, start + part.len() as u32)
        };
        Self {
            name: range(name),
            value: range(value),
        }
    }
}

/// Which part of a field a [`header_map`] could not take.
pub(crate) enum InvalidField {
    Name,
    Value,
}

/// The fields at `spans` of the parsed `head`, with room for `room` more (those middleware
/// adds). Values are slices of `head`, shared rather than copied; names the OpenAI and Azure
/// traffic uses take a constant ([`field_name`]).
pub(crate) fn header_map(
    head: &Bytes,
    spans: &[FieldSpan],
    room: usize,
) -> Result<HeaderMap, InvalidField> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    for span in spans {
        let (name_start, name_end) = span.name;
        let (value_start, value_end) = span.value;
        let name = field_name(&head[name_start as usize..name_end as usize])
            .map_err(|_| InvalidField::Name)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| InvalidField::Value)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What is wrong with a message's `Content-Length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LengthError {
    /// A value that is not a decimal number.
    Invalid,
    /// Values that disagree.
    Conflicting,
}

/// The length one `Content-Length` field gives, `seen` being what the fields before it gave, if
/// any: `5, 5` and repeated fields are one length if they all agree (RFC 9110, 8.6).
pub(crate) fn agreed_length(value: &[u8], mut seen: Option<u64>) -> Result<u64, LengthError> {
    for part in value.split(|&b| b == b',') {
        let length = parse_decimal(part.trim_ascii()).ok_or(LengthError::Invalid)?;
        if seen.is_some_and(|seen| seen != length) {
            return Err(LengthError::Conflicting);
        }
        seen = Some(length);
    }
    seen.ok_or(LengthError::Invalid)
}

pub(crate) fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// An `InvalidData` error saying `message`.
pub(crate) fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// How the response body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunked),
    /// Everything until the backend closes the connection.
    Close,
}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers seen so far.
    Trailers(usize),
    /// Complete.
    Done,
}

/// What [`Framing::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The body is complete.
    End,
    /// The buffer holds no complete piece; read more.
    NeedMore,
}

impl Framing {
    /// Whether the body is complete.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Self::Length(0) | Self::Chunked(Chunked::Done))
    }

    /// Takes the next piece of body data from the front of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
        match self {
            Self::Length(0) => Ok(Decoded::End),
            Self::Length(remaining) => Ok(match take(buf, remaining) {
                Some(data) => Decoded::Data(data),
                None => Decoded::NeedMore,
            }),
            Self::Close if buf.is_empty() => Ok(Decoded::NeedMore),
            Self::Close => Ok(Decoded::Data(buf.split().freeze())),
            Self::Chunked(state) => decode_chunked(state, buf),
        }
    }

    /// What the backend closing the connection now means: the end of the body, or an error.
    pub(crate) fn at_eof(&self) -> io::Result<()> {
        if matches!(self, Self::Close) || self.is_done() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed the connection before the response body was complete",
            ))
        }
    }
}

/// Up to `remaining` bytes from the front of `buf`, or `None` when it is empty.
fn take(buf: &mut BytesMut, remaining: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
    *remaining -= n as u64;
    Some(buf.split_to(n).freeze())
}

fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> io::Result<Decoded> {
    loop {
        match state {
            Chunked::Size => {
                let Some(line) = take_line(buf, MAX_LINE_BYTES)? else {
                    return Ok(Decoded::NeedMore);
                };
                let size = parse_chunk_size(&line)?;
                *state = if size == 0 {
                    Chunked::Trailers(0)
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(remaining) => {
                let Some(data) = take(buf, remaining) else {
                    return Ok(Decoded::NeedMore);
                };
                if *remaining == 0 {
                    *state = Chunked::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers(seen) => {
                let Some(line) = take_line(buf, MAX_LINE_BYTES)? else {
                    return Ok(Decoded::NeedMore);
                };
                if line.is_empty() {
                    *state = Chunked::Done;
                    return Ok(Decoded::End);
                }
                *seen += line.len() + 2;
                if *seen > MAX_TRAILER_BYTES {
                    return Err(invalid("chunked trailers larger than 16 KiB"));
                }
            }
            Chunked::Done => return Ok(Decoded::End),
        }
    }
}

/// The next CRLF-terminated line, without its CRLF; `None` until it is complete.
fn take_line(buf: &mut BytesMut, max: usize) -> io::Result<Option<BytesMut>> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = buf.split_to(end);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > max => Err(invalid("chunked framing line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;extensions`.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits_end..].trim_ascii_start();
    if digits_end == 0 || digits_end > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid("invalid chunk size"));
    }
    Ok(line[..digits_end].iter().fold(0, |n, &d| {
        let digit = (d as char).to_digit(16).unwrap_or_default();
        n * 16 + u64::from(digit)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], method: &Method) -> io::Result<Option<ResponseHead>> {
        parse_response_head(&mut BytesMut::from(bytes), method)
    }

    fn complete_head(bytes: &[u8], method: &Method) -> ResponseHead {
        head(bytes, method)
            .expect("a valid head")
            .expect("a complete head")
    }

    fn decode_all(mut framing: Framing, bytes: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut buf = BytesMut::from(bytes);
        let mut body = Vec::new();
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => return Ok((body, true)),
                Decoded::NeedMore => return Ok((body, false)),
            }
        }
    }

    #[test]
    fn request_head_has_one_framing_header() {
        let host = HeaderValue::from_static("x");
        let headers = HeaderMap::new();
        let cases: [(Method, RequestFraming, &[u8]); 4] = [
            (
                Method::POST,
                RequestFraming::Length(12),
                b"POST /base/a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 12\r\n\r\n",
            ),
            (
                Method::GET,
                RequestFraming::Length(0),
                b"GET /base/a?b=1 HTTP/1.1\r\nhost: x\r\n\r\n",
            ),
            (
                Method::POST,
                RequestFraming::Length(0),
                b"POST /base/a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                Method::PUT,
                RequestFraming::Chunked,
                b"PUT /base/a?b=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
        ];
        for (method, framing, expected) in cases {
            let mut out = BytesMut::new();
            encode_request_head(
                &method, "/base", "/a?b=1", &host, &headers, framing, &mut out,
            );
            assert_eq!(&out[..], expected, "{method} {framing:?}");
        }
    }

    #[test]
    fn request_head_leaves_out_the_callers_host_framing_and_hop_by_hop_fields() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "caller.example"),
            ("content-length", "99"),
            ("transfer-encoding", "gzip, chunked"),
            ("connection", "keep-alive, X-Drop"),
            ("x-drop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("content-type", "application/json"),
            ("x-keep", "a"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        headers.append("x-keep", HeaderValue::from_static("b"));
        let mut out = BytesMut::new();
        let host = HeaderValue::from_static("backend:8443");
        let framing = RequestFraming::Length(2);
        encode_request_head(&Method::POST, "", "/", &host, &headers, framing, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST / HTTP/1.1\r\nhost: backend:8443\r\ncontent-type: application/json\r\n\
             x-keep: a\r\nx-keep: b\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn response_head_framing_and_keep_alive() {
        let parsed = complete_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
            &Method::POST,
        );
        assert_eq!(parsed.status, 200);
        assert_eq!(parsed.framing, Framing::Length(5));
        assert!(parsed.keep_alive);
        let values: Vec<_> = parsed.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);

        let chunked = complete_head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(chunked.framing, Framing::Chunked(Chunked::Size));
        // Both framings at once: the coding wins, and the connection is not reused.
        assert!(!chunked.keep_alive);
        let only_chunked = complete_head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            &Method::GET,
        );
        assert!(only_chunked.keep_alive);

        let close = complete_head(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(!close.keep_alive);
        let until_close = complete_head(b"HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert_eq!(until_close.framing, Framing::Close);
        assert!(!until_close.keep_alive);
        let old = complete_head(
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(!old.keep_alive);
        let head_request = complete_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(head_request.framing, Framing::Length(0));
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let parsed = parse_response_head(&mut buf, &Method::POST)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.status, 201);
        assert!(buf.is_empty());
        assert!(
            head(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_heads_are_errors() {
        for bad in [
            &b"HELLO\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                head(bad, &Method::GET).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = [
            b"HTTP/1.1 200 OK\r\nx: ".as_slice(),
            &[b'a'; MAX_HEAD_BYTES],
        ]
        .concat();
        assert!(head(&huge, &Method::GET).is_err());
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: y\r\n\r\n";
        let (body, done) = decode_all(Framing::Chunked(Chunked::Size), wire).unwrap();
        assert_eq!(body, b"hello world");
        assert!(done);
        // Fed one byte at a time, the same body.
        let mut framing = Framing::Chunked(Chunked::Size);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for &byte in wire {
            buf.extend_from_slice(&[byte]);
            while let Decoded::Data(data) = framing.decode(&mut buf).unwrap() {
                body.extend_from_slice(&data);
            }
        }
        assert_eq!(body, b"hello world");
        assert!(framing.is_done());
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"10000000000000000\r\n"] {
            assert!(decode_all(Framing::Chunked(Chunked::Size), bad).is_err());
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut framing = Framing::Length(3);
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(
            framing.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"def");
        assert!(Framing::Length(1).at_eof().is_err());
        assert!(Framing::Close.at_eof().is_ok());
    }
}
