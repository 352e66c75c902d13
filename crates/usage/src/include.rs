//! Forcing usage reporting on streamed chat completions without the caller noticing:
//! [`ask_for_usage`] adds `stream_options.include_usage` to the request, [`StripUsage`] removes
//! what that adds from the answer.

use std::fmt;
use std::mem;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::{Map, Value};

/// The longest incomplete event [`StripUsage`] holds back: 1 MiB. An event that grows past it
/// before its blank line arrives is forwarded unchanged, as it comes, up to its end.
pub const STRIP_HOLD_LIMIT: usize = 1 << 20;

/// Asks a streamed Chat Completions request for its usage: `body` with
/// `stream_options.include_usage` set to `true`, or `None` when there is nothing to change.
///
/// `None` when `body` is not a JSON object, when `stream` is not `true`, when
/// `stream_options.include_usage` is already `true` (the caller asked: it keeps what it asked
/// for), and when `stream_options` is neither an object nor `null` (the instance will refuse the
/// request as it is). Every other field, and the other fields of `stream_options`, are kept; the
/// body is written anew, compact, its keys in another order.
///
/// When this returns `Some`, wrap the streamed answer in [`StripUsage`] so the caller receives
/// what it would have without the change. The legacy Completions API takes the same option and
/// streams the same way.
///
/// ```
/// use aoai_usage::ask_for_usage;
///
/// let asked = ask_for_usage(br#"{"messages":[],"stream":true}"#).unwrap();
/// let asked: serde_json::Value = serde_json::from_slice(&asked).unwrap();
/// assert_eq!(asked["stream_options"]["include_usage"], true);
///
/// // Not streamed, or asked for already: nothing to change.
/// assert_eq!(ask_for_usage(br#"{"messages":[]}"#), None);
/// assert_eq!(
///     ask_for_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
///     None
/// );
/// ```
pub fn ask_for_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut request: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if request.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = request
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if options.is_null() {
        *options = Value::Object(Map::new());
    }
    let options = options.as_object_mut()?;
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".to_owned(), Value::Bool(true));
    serde_json::to_vec(&request).ok()
}

pin_project! {
    /// The `text/event-stream` answer to a request that [`ask_for_usage`] changed, with what that
    /// change added taken out: the caller receives, byte for byte, the stream it asked for.
    ///
    /// Two things are taken out, and nothing else is touched (other events, comments,
    /// `data: [DONE]`, line ends):
    ///
    /// - the event whose data is a chunk with a non-null `usage` and `"choices":[]`, the extra
    ///   last chunk, with its blank line. The first chunk of an Azure stream also has
    ///   `"choices":[]` (it carries `prompt_filter_results`) and stays: it has no usage. A
    ///   chunk with usage and choices (not sent by OpenAI or Azure) stays whole.
    /// - the `"usage":null` member of every other chunk, as the instances write it: compact,
    ///   a member of the chunk itself (nested objects are left alone).
    ///
    /// An event is looked at once its blank line has arrived, and only when it has a single
    /// `data` line holding a JSON object. Each complete event is forwarded as soon as that blank
    /// line arrives; the whole events of one inner frame go out in one frame, the same `Bytes`
    /// when none changed. Only the incomplete tail of a frame is held back (an SSE client cannot
    /// dispatch a partial event anyway), up to [`STRIP_HOLD_LIMIT`]: a longer event is forwarded
    /// unchanged as it comes. When the inner body ends, fails, or sends trailers, what is held is
    /// forwarded first, as it is.
    ///
    /// The length changes: remove the answer's `Content-Length` if it has one (streamed answers
    /// usually have none). Put this outside [`CountUsage`](crate::CountUsage), so that the usage
    /// is read before it is removed.
    ///
    /// # Example
    ///
    /// A gateway asks for the usage of every streamed chat request and strips it from the
    /// answers of the requests it changed:
    ///
    /// ```
    /// use std::convert::Infallible;
    ///
    /// use aoai_usage::{StripUsage, ask_for_usage};
    /// use bytes::Bytes;
    /// use http::{Request, Response, header};
    /// use http_body_util::{BodyExt, Either, Full};
    ///
    /// // The instance: it honours `include_usage`.
    /// async fn instance(request: Request<Bytes>) -> Result<Response<Full<Bytes>>, Infallible> {
    ///     let asked = request.body().windows(20).any(|w| w == b"\"include_usage\":true");
    ///     let usage = if asked { r#","usage":null"# } else { "" };
    ///     let mut stream = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}]{usage}}}\n\n");
    ///     if asked {
    ///         stream += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n";
    ///     }
    ///     stream += "data: [DONE]\n\n";
    ///     Ok(Response::builder()
    ///         .header(header::CONTENT_TYPE, "text/event-stream")
    ///         .body(Full::new(Bytes::from(stream)))
    ///         .unwrap())
    /// }
    ///
    /// async fn gateway(
    ///     request: Request<Bytes>,
    /// ) -> Result<Response<Either<StripUsage<Full<Bytes>>, Full<Bytes>>>, Infallible> {
    ///     let (parts, body) = request.into_parts();
    ///     let changed = ask_for_usage(&body);
    ///     let strip = changed.is_some();
    ///     let body = changed.map_or(body, Bytes::from);
    ///     let response = instance(Request::from_parts(parts, body)).await?;
    ///     let stream = response
    ///         .headers()
    ///         .get(header::CONTENT_TYPE)
    ///         .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    ///     Ok(if strip && stream {
    ///         response.map(|body| Either::Left(StripUsage::new(body)))
    ///     } else {
    ///         response.map(Either::Right)
    ///     })
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let request = Request::new(Bytes::from_static(br#"{"messages":[],"stream":true}"#));
    /// let answer = gateway(request).await.unwrap().into_body().collect().await.unwrap();
    /// assert_eq!(
    ///     answer.to_bytes(),
    ///     "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"
    /// );
    /// # }
    /// ```
    pub struct StripUsage<B>
    where
        B: Body,
    {
        #[pin]
        inner: B,
        strip: Strip,
        // A trailers frame or an error, waiting behind the held bytes forwarded before it.
        queued: Option<Result<Frame<Bytes>, B::Error>>,
        // The inner body returned `None`.
        inner_done: bool,
    }
}

impl<B> StripUsage<B>
where
    B: Body<Data = Bytes>,
{
    /// Wraps the streamed answer to a request that [`ask_for_usage`] changed.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            strip: Strip::default(),
            queued: None,
            inner_done: false,
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for StripUsage<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(queued) = this.queued.take() {
            return Poll::Ready(Some(queued));
        }
        loop {
            if *this.inner_done {
                return Poll::Ready(None);
            }
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    return Poll::Ready(Some(this.strip.flush_before(Err(error), this.queued)));
                }
                None => {
                    *this.inner_done = true;
                    let held = this.strip.flush();
                    return Poll::Ready((!held.is_empty()).then(|| Ok(Frame::data(held))));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    // hyper stops polling a body that says it has ended: flush what is held with
                    // its last frame.
                    let out = this.strip.push(data, this.inner.is_end_stream());
                    // Nothing complete to forward (an event still partial, or the dropped usage
                    // chunk): wait for the next frame.
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(trailers) => {
                    return Poll::Ready(Some(this.strip.flush_before(Ok(trailers), this.queued)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.queued.is_none()
            && self.strip.held.is_empty()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        // Bytes may be taken out: no lower bound, and at most what is held and still to come.
        let mut hint = SizeHint::new();
        if self.inner_done {
            hint.set_upper(self.strip.held.len() as u64);
        } else if let Some(upper) = self.inner.size_hint().upper() {
            hint.set_upper(upper.saturating_add(self.strip.held.len() as u64));
        }
        hint
    }
}

impl<B> fmt::Debug for StripUsage<B>
where
    B: Body + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripUsage")
            .field("inner", &self.inner)
            .field("held", &self.strip.held.len())
            .field("inner_done", &self.inner_done)
            .finish()
    }
}

/// The stream's state between frames: the held tail and where its scan stands.
#[derive(Default)]
struct Strip {
    /// The incomplete tail: the start of an event whose blank line has not arrived.
    held: BytesMut,
    events: Events,
    /// The byte ranges of the current input to take out; kept to reuse its allocation.
    removed: Vec<Range<usize>>,
}

impl Strip {
    /// Takes `frame`; returns what can be forwarded now. With `end`, everything is.
    fn push(&mut self, mut frame: Bytes, end: bool) -> Bytes {
        self.removed.clear();
        if self.held.is_empty() {
            // The usual case: the frame holds whole events, read in place.
            let done = self.events.scan(&frame, 0, end, &mut self.removed);
            let tail = frame.split_off(done);
            self.held.extend_from_slice(&tail);
            cut(frame, &self.removed)
        } else {
            let from = self.held.len();
            self.held.extend_from_slice(&frame);
            let done = self.events.scan(&self.held, from, end, &mut self.removed);
            cut(self.held.split_to(done).freeze(), &self.removed)
        }
    }

    /// Everything held, as it is; the rest of its event will pass unchanged.
    fn flush(&mut self) -> Bytes {
        if !self.held.is_empty() {
            self.events.passthrough = true;
        }
        self.held.split().freeze()
    }

    /// Returns the held bytes and queues `item` behind them, or returns `item` when none are.
    fn flush_before<E>(
        &mut self,
        item: Result<Frame<Bytes>, E>,
        queued: &mut Option<Result<Frame<Bytes>, E>>,
    ) -> Result<Frame<Bytes>, E> {
        let held = self.flush();
        if held.is_empty() {
            return item;
        }
        *queued = Some(item);
        Ok(Frame::data(held))
    }
}

/// `bytes` without the sorted, disjoint `removed` ranges. No copy when none is removed, or only
/// a range at either end.
fn cut(bytes: Bytes, removed: &[Range<usize>]) -> Bytes {
    match removed {
        [] => return bytes,
        [only] if only.start == 0 => return bytes.slice(only.end..),
        [only] if only.end == bytes.len() => return bytes.slice(..only.start),
        _ => {}
    }
    let gone: usize = removed.iter().map(ExactSizeIterator::len).sum();
    let mut out = BytesMut::with_capacity(bytes.len() - gone);
    let mut from = 0;
    for range in removed {
        out.extend_from_slice(&bytes[from..range.start]);
        from = range.end;
    }
    out.extend_from_slice(&bytes[from..]);
    out.freeze()
}

/// Splits a stream into lines and events (the SSE grammar: lines end in `\r\n`, `\n` or `\r`; a
/// blank line ends an event), carrying its state from one input to the next.
struct Events {
    /// No byte of the current line has been seen.
    line_empty: bool,
    cr: Cr,
    /// Where the current line starts, from the start of the current event.
    line_start: usize,
    /// The current event's `data` lines.
    data: DataLine,
    /// The current event outgrew [`STRIP_HOLD_LIMIT`]: it passes unchanged up to its end.
    passthrough: bool,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            line_empty: true,
            cr: Cr::No,
            line_start: 0,
            data: DataLine::None,
            passthrough: false,
        }
    }
}

/// Whether the last byte seen was a `\r` ending a line, so that a `\n` next belongs to it.
#[derive(Clone, Copy)]
enum Cr {
    No,
    /// It ended a line within an event.
    InLine,
    /// It ended the blank line of an event, which was `dropped` or not: a `\n` next goes with it.
    AfterEvent {
        dropped: bool,
    },
}

/// The `data` lines of an event seen so far.
#[derive(Default)]
enum DataLine {
    #[default]
    None,
    /// One, its value at this range from the start of the event.
    One(Range<usize>),
    /// Several: the event is left as it is.
    Many,
}

impl Events {
    /// Reads `buf`, whose bytes before `from` were read already and which starts at the start of
    /// an event (or within an event passing through). Pushes to `removed` what to take out of the
    /// complete events, and returns where the incomplete tail starts, or the end of `buf` when the
    /// tail passes through: it outgrew [`STRIP_HOLD_LIMIT`], or the stream ends (`end`).
    fn scan(
        &mut self,
        buf: &[u8],
        from: usize,
        end: bool,
        removed: &mut Vec<Range<usize>>,
    ) -> usize {
        let mut pos = from;
        let mut event = 0;
        let mut line = self.line_start;
        while let Some(offset) = find_line_end(&buf[pos..]) {
            let at = pos + offset;
            if offset > 0 {
                self.line_empty = false;
                self.cr = Cr::No;
            }
            let byte = buf[at];
            pos = at + 1;
            if byte == b'\n' {
                match mem::replace(&mut self.cr, Cr::No) {
                    Cr::No => {}
                    Cr::InLine => {
                        line = pos;
                        continue;
                    }
                    Cr::AfterEvent { dropped } => {
                        if dropped {
                            removed.push(at..pos);
                        }
                        event = pos;
                        line = pos;
                        continue;
                    }
                }
            }
            if !self.line_empty {
                if !self.passthrough {
                    self.data.see(&buf[line..at], line - event);
                }
                self.line_empty = true;
                self.cr = if byte == b'\r' { Cr::InLine } else { Cr::No };
                line = pos;
                continue;
            }
            // A blank line: the event `event..pos` is complete.
            let data = mem::take(&mut self.data);
            let dropped =
                !mem::take(&mut self.passthrough) && edit(&buf[event..pos], event, data, removed);
            self.cr = if byte == b'\r' {
                Cr::AfterEvent { dropped }
            } else {
                Cr::No
            };
            event = pos;
            line = pos;
        }
        if pos < buf.len() {
            self.line_empty = false;
            self.cr = Cr::No;
        }
        if event < buf.len() && (end || self.passthrough || buf.len() - event > STRIP_HOLD_LIMIT) {
            self.passthrough = true;
            return buf.len();
        }
        self.line_start = line - event;
        event
    }
}

impl DataLine {
    /// Notes `line` (without its end), `offset` bytes from the start of its event, if it is a
    /// `data` line.
    fn see(&mut self, line: &[u8], offset: usize) {
        let Some(rest) = line.strip_prefix(b"data") else {
            return;
        };
        let skip = match rest {
            [] => 0,
            [b':', b' ', ..] => 2,
            [b':', ..] => 1,
            _ => return,
        };
        let value = offset + 4 + skip..offset + line.len();
        *self = match self {
            Self::None => Self::One(value),
            _ => Self::Many,
        };
    }
}

/// Decides what happens to the complete `event`, which starts at `base` in the input: pushes the
/// range of its `"usage":null` member to `removed`, or the whole event when it is the usage chunk
/// (then returns `true`).
fn edit(event: &[u8], base: usize, data: DataLine, removed: &mut Vec<Range<usize>>) -> bool {
    let DataLine::One(value) = data else {
        return false;
    };
    let json = &event[value.clone()];
    let Some(at) = top_level(json, USAGE, Search::Last) else {
        return false;
    };
    let after = at + USAGE.len();
    match &json[after..] {
        [b'n', b'u', b'l', b'l', next @ (b',' | b'}'), ..] => {
            let end = after + 4;
            let member = if json[at - 1] == b',' {
                at - 1..end
            } else if *next == b',' {
                at..end + 1
            } else {
                at..end
            };
            let start = base + value.start;
            removed.push(start + member.start..start + member.end);
            false
        }
        [b'{', ..] if top_level(json, NO_CHOICES, Search::First).is_some() => {
            removed.push(base..base + event.len());
            true
        }
        _ => false,
    }
}

const USAGE: &[u8] = b"\"usage\":";
const NO_CHOICES: &[u8] = b"\"choices\":[]";

/// Which occurrence [`top_level`] looks at first. `usage` is the last member of the chunks
/// OpenAI and Azure send, or close to it: searched from the end, it is found in a few bytes.
#[derive(Clone, Copy)]
enum Search {
    First,
    Last,
}

/// Where the member opening with `key` (`"name":`) of the object `json` is: a member of `json`
/// itself, not of an object nested in it.
///
/// An occurrence of `"name":` right after `,` or `{` is a key (a `"` after `,` or `{` opens a
/// string; one closing a string cannot be followed by a letter), so it is outside any string.
/// It belongs to `json` itself when the rest of `json` from there closes one level more than it
/// opens, at its very end.
fn top_level(json: &[u8], key: &[u8], search: Search) -> Option<usize> {
    if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
        return None;
    }
    // `key` opens with `"`, so no match is at 0, where `{` is.
    let hit = |&at: &usize| matches!(json[at - 1], b',' | b'{') && closes_at_end(&json[at..]);
    match search {
        Search::First => memchr::memmem::find_iter(json, key).find(hit),
        Search::Last => memchr::memmem::rfind_iter(json, key).find(hit),
    }
}

/// Whether `json`, read from outside any string, closes more than it opens first at its last
/// byte.
fn closes_at_end(json: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &byte) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return i == json.len() - 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
    }
    false
}

/// Where the first `\n` or `\r` is. Every byte of a stream goes through here.
pub(crate) fn find_line_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', bytes)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Positions the tests try, across the 16-byte blocks a vector search reads at once.
    const BLOCK: usize = 16;

    fn asked(body: Value) -> Option<Value> {
        let changed = ask_for_usage(body.to_string().as_bytes())?;
        Some(serde_json::from_slice(&changed).unwrap())
    }

    #[test]
    fn adds_include_usage_to_a_stream_without_options() {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": true, "temperature": 0.5});
        let mut want = body.clone();
        want["stream_options"] = json!({"include_usage": true});
        assert_eq!(asked(body), Some(want));
    }

    #[test]
    fn keeps_the_other_stream_options() {
        let body = json!({"stream": true, "stream_options": {"continuous_usage_stats": false}});
        assert_eq!(
            asked(body).unwrap()["stream_options"],
            json!({"continuous_usage_stats": false, "include_usage": true})
        );
    }

    #[test]
    fn turns_include_usage_false_or_null_options_on() {
        let body = json!({"stream": true, "stream_options": {"include_usage": false}});
        assert_eq!(
            asked(body).unwrap()["stream_options"],
            json!({"include_usage": true})
        );
        let body = json!({"stream": true, "stream_options": null});
        assert_eq!(
            asked(body).unwrap()["stream_options"],
            json!({"include_usage": true})
        );
    }

    #[test]
    fn none_when_already_asked() {
        let body = json!({"stream": true, "stream_options": {"include_usage": true}});
        assert_eq!(asked(body), None);
    }

    #[test]
    fn none_when_not_streamed() {
        assert_eq!(asked(json!({"messages": []})), None);
        assert_eq!(asked(json!({"messages": [], "stream": false})), None);
        // Only the boolean `true` streams.
        assert_eq!(asked(json!({"messages": [], "stream": "true"})), None);
    }

    #[test]
    fn none_when_not_a_json_object() {
        assert_eq!(ask_for_usage(b"not json"), None);
        assert_eq!(ask_for_usage(b""), None);
        assert_eq!(ask_for_usage(br#"[{"stream":true}]"#), None);
        assert_eq!(ask_for_usage(br#"{"stream":true"#), None);
    }

    #[test]
    fn none_when_stream_options_is_not_an_object() {
        assert_eq!(asked(json!({"stream": true, "stream_options": "x"})), None);
    }

    #[test]
    fn finds_top_level_members_only() {
        let json = br#"{"a":{"usage":null},"b":"\"usage\":null","usage":null}"#;
        assert_eq!(top_level(json, USAGE, Search::Last), Some(json.len() - 13));
        assert_eq!(top_level(json, USAGE, Search::First), Some(json.len() - 13));
        assert_eq!(
            top_level(br#"{"a":{"usage":null}}"#, USAGE, Search::Last),
            None
        );
        assert_eq!(
            top_level(br#"{"a":"x\\","usage":1}"#, USAGE, Search::Last),
            Some(11)
        );
        assert_eq!(top_level(br#"[{"usage":null}]"#, USAGE, Search::Last), None);
    }

    #[test]
    fn finds_keys_across_search_blocks() {
        // The key at every offset from the start and from the end of a block.
        for pad in 0..3 * BLOCK {
            let json = format!(
                r#"{{"a":"{}","usage":null,"b":"{}"}}"#,
                "x".repeat(pad),
                "y".repeat(pad % 7)
            );
            let at = json.find(r#""usage""#).unwrap();
            for search in [Search::First, Search::Last] {
                assert_eq!(
                    top_level(json.as_bytes(), USAGE, search),
                    Some(at),
                    "pad {pad}"
                );
            }
            let json = format!(r#"{{"a":"{}"}}"#, "x".repeat(pad));
            assert_eq!(top_level(json.as_bytes(), USAGE, Search::Last), None);
        }
        assert_eq!(top_level(br#"{"usage":1}"#, USAGE, Search::First), Some(1));
        assert_eq!(top_level(b"{}", USAGE, Search::First), None);
    }

    #[test]
    fn finds_line_ends_across_blocks() {
        for at in 0..3 * BLOCK {
            for end in [b'\n', b'\r'] {
                let mut bytes = vec![b'x'; 3 * BLOCK];
                bytes[at] = end;
                assert_eq!(find_line_end(&bytes), Some(at));
                assert_eq!(find_line_end(&bytes[..at]), None);
            }
        }
    }
}
