//! Reading usage from a body's bytes as they pass: a bounded copy of a JSON answer, or the
//! events of a server-sent event stream.

use std::mem;

use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};

use crate::include::find_line_end;
use crate::usage::{Document, read_document};

/// What a body is read as, chosen from its response's headers.
#[derive(Debug)]
pub(crate) enum Scan {
    /// Neither JSON nor an event stream, or encoded (gzip, ...): its bytes are not looked at.
    Skip,
    Json(JsonScan),
    Sse(SseScan),
}

const EVENT_STREAM: &[u8] = b"text/event-stream";

/// The media type of `headers`' `Content-Type`, its parameters left out (`text/event-stream`
/// of `text/event-stream; charset=utf-8`).
fn media_type(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(CONTENT_TYPE)?.as_bytes();
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    Some(value[..end].trim_ascii())
}

/// Whether an answer with `headers` is a stream of server-sent events (`Content-Type:
/// text/event-stream`, in any letter case, parameters aside): the answers read event by event.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|essence| essence.eq_ignore_ascii_case(EVENT_STREAM))
}

impl Scan {
    pub(crate) fn for_headers(headers: &HeaderMap, limit: usize) -> Self {
        if let Some(encoding) = headers.get(CONTENT_ENCODING)
            && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Self::Skip;
        }
        let Some(essence) = media_type(headers) else {
            return Self::Skip;
        };
        if essence.eq_ignore_ascii_case(b"application/json") {
            let too_long = headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .is_some_and(|len| len > limit as u64);
            Self::Json(JsonScan {
                buf: Vec::new(),
                limit,
                overflow: too_long,
            })
        } else if essence.eq_ignore_ascii_case(EVENT_STREAM) {
            Self::Sse(SseScan::new(limit))
        } else {
            Self::Skip
        }
    }

    /// Whether bytes fed would be looked at.
    pub(crate) fn wants_bytes(&self) -> bool {
        match self {
            Self::Skip => false,
            Self::Json(json) => !json.overflow,
            Self::Sse(_) => true,
        }
    }

    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        match self {
            Self::Skip => {}
            Self::Json(json) => json.feed(bytes),
            Self::Sse(sse) => sse.feed(bytes),
        }
    }

    /// Gives up on this body (bytes that could not be seen).
    pub(crate) fn abandon(&mut self) {
        *self = Self::Skip;
    }

    /// The usage once the body has ended (`complete`), or else as far as it was read: a JSON
    /// answer is parsed as far as it came, which succeeds only if it was whole; a stream counts
    /// the events it completed.
    pub(crate) fn finish(self, complete: bool) -> Option<Document> {
        match self {
            Self::Skip => None,
            Self::Json(json) => json.finish(),
            Self::Sse(sse) if complete => sse.finish(),
            Self::Sse(sse) => sse.read,
        }
    }
}

/// A copy of a JSON answer, up to `limit` bytes, parsed at its end.
#[derive(Debug)]
pub(crate) struct JsonScan {
    buf: Vec<u8>,
    limit: usize,
    /// The answer is longer than `limit`: it is not parsed.
    overflow: bool,
}

impl JsonScan {
    fn feed(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + bytes.len() > self.limit {
            self.overflow = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn finish(self) -> Option<Document> {
        if self.overflow {
            return None;
        }
        read_document(&self.buf)
    }
}

/// Server-sent events, split into lines and events as chunks arrive. Only the incomplete tail (a
/// partial line, the data of the current event) is kept between chunks.
#[derive(Debug)]
pub(crate) struct SseScan {
    /// The line begun in an earlier chunk and not yet ended.
    line: Vec<u8>,
    /// The current event's `data` (its lines joined by `\n`).
    data: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` opening the next one belongs to that line end.
    after_cr: bool,
    /// The current line outgrew `limit`: the rest of it is ignored.
    line_overflow: bool,
    /// The current event outgrew `limit`: it is not parsed.
    event_overflow: bool,
    limit: usize,
    /// The last usage an event carried.
    read: Option<Document>,
}

impl SseScan {
    fn new(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            data: Vec::new(),
            after_cr: false,
            line_overflow: false,
            event_overflow: false,
            limit,
            read: None,
        }
    }

    fn feed(&mut self, mut chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
            chunk = &chunk[1..];
        }
        // Lines end in `\r\n`, `\n` or `\r` (the SSE grammar).
        while let Some(end) = find_line_end(chunk) {
            let ended_in_cr = chunk[end] == b'\r';
            let line = &chunk[..end];
            chunk = &chunk[end + 1..];
            if self.line.is_empty() && !self.line_overflow {
                // The common case: the whole line is in this chunk, read in place.
                self.on_line(line);
            } else {
                self.push_partial(line);
                let whole = mem::take(&mut self.line);
                if !mem::take(&mut self.line_overflow) {
                    self.on_line(&whole);
                }
                // Keep the allocation for the next partial line.
                self.line = whole;
                self.line.clear();
            }
            if ended_in_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.push_partial(chunk);
    }

    /// Keeps the start of a line that continues in the next chunk.
    fn push_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.limit {
            self.line_overflow = true;
            self.event_overflow = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn on_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        // `field: value`, `field:value`, or `field` alone; a line opening with `:` is a comment.
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field != b"data" || self.event_overflow {
            return;
        }
        let joined = if self.data.is_empty() { 0 } else { 1 };
        if self.data.len() + joined + value.len() > self.limit {
            self.event_overflow = true;
            self.data = Vec::new();
            return;
        }
        if joined == 1 {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
    }

    /// The end of an event (a blank line): parses its data if it may carry usage.
    fn dispatch(&mut self) {
        if !mem::take(&mut self.event_overflow)
            && self.data != b"[DONE]"
            && has_usage_object(&self.data)
            && let Some(read) = read_document(&self.data)
            && read.usage.is_some()
        {
            self.read = Some(read);
        }
        self.data.clear();
    }

    fn finish(mut self) -> Option<Document> {
        // A stream that ends without the blank line after its last event still counts that event.
        if !self.line.is_empty() && !self.line_overflow {
            let line = mem::take(&mut self.line);
            self.on_line(&line);
        }
        self.dispatch();
        self.read
    }
}

/// Whether `data` has a `"usage"` whose value is an object: only such events are parsed, not
/// the chunks that carry `"usage":null` (every chunk but the last once `include_usage` is on).
/// Searched from the end, where chat chunks carry it.
fn has_usage_object(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = data.len();
    while let Some(at) = data[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        if let Some(value) = data[at + KEY.len()..].trim_ascii_start().strip_prefix(b":")
            && value.trim_ascii_start().starts_with(b"{")
        {
            return true;
        }
        end = at + KEY.len() - 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Usage;

    fn sse(chunks: &[&[u8]]) -> Option<Usage> {
        let mut scan = SseScan::new(1 << 20);
        for chunk in chunks {
            scan.feed(chunk);
        }
        scan.finish().and_then(|read| read.usage)
    }

    const USAGE: &[u8] =
        br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

    #[test]
    fn sse_line_ends_and_splits() {
        let want = Some(Usage {
            input_tokens: 1,
            output_tokens: 2,
            total_tokens: 3,
            ..Usage::default()
        });
        for end in [&b"\n"[..], b"\r\n", b"\r"] {
            let stream = [
                &b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}"[..],
                end,
                end,
                b"data: ",
                USAGE,
                end,
                end,
                b"data: [DONE]",
                end,
                end,
            ]
            .concat();
            // Every split point, so a line end, a `\r\n` or the JSON is cut in two.
            for at in 0..stream.len() {
                let (a, b) = stream.split_at(at);
                assert_eq!(sse(&[a, b]), want, "split at {at} with {end:?}");
            }
            // Byte by byte.
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(sse(&bytes), want);
        }
    }

    #[test]
    fn sse_multi_line_data_and_comments() {
        let stream = b": keep-alive\nevent: x\ndata: {\"usage\":\ndata: {\"input_tokens\":4}}\n\n";
        assert_eq!(sse(&[stream]).map(|u| u.input_tokens), Some(4));
    }

    #[test]
    fn sse_oversized_event_is_skipped_and_the_next_read() {
        let mut scan = SseScan::new(64);
        scan.feed(b"data: ");
        scan.feed(&[b'x'; 100]);
        scan.feed(b"\n\ndata: {\"usage\":{\"total_tokens\":9}}\n\n");
        assert_eq!(
            scan.finish().and_then(|r| r.usage).map(|u| u.total_tokens),
            Some(9)
        );
    }

    #[test]
    fn only_events_with_a_usage_object_are_parsed() {
        assert!(has_usage_object(
            br#"{"choices":[],"usage":{"total_tokens":3}}"#
        ));
        assert!(has_usage_object(
            br#"{"usage" : {"total_tokens":3},"x":"\"usage\":null"}"#
        ));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{}}],"usage":null}"#
        ));
        assert!(!has_usage_object(
            br#"{"type":"response.created","response":{"usage":null}}"#
        ));
        assert!(!has_usage_object(b"\"usage\""));
    }

    #[test]
    fn json_over_the_limit_is_not_parsed() {
        let mut scan = JsonScan {
            buf: Vec::new(),
            limit: 8,
            overflow: false,
        };
        scan.feed(USAGE);
        assert!(scan.finish().is_none());
    }

    #[test]
    fn headers_choose_the_scan() {
        let scan = |pairs: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                headers.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            Scan::for_headers(&headers, 100)
        };
        assert!(matches!(
            scan(&[("content-type", "application/json; charset=utf-8")]),
            Scan::Json(_)
        ));
        assert!(matches!(
            scan(&[("content-type", "Text/Event-Stream")]),
            Scan::Sse(_)
        ));
        assert!(matches!(
            scan(&[("content-type", "text/plain")]),
            Scan::Skip
        ));
        assert!(matches!(scan(&[]), Scan::Skip));
        assert!(matches!(
            scan(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ]),
            Scan::Skip
        ));
        assert!(
            !scan(&[
                ("content-type", "application/json"),
                ("content-length", "101")
            ])
            .wants_bytes()
        );
    }
}
