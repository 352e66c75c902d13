//! `StripUsage` over scripted bodies, polled by hand: what comes out of each poll, not only in
//! the end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use aoai_usage::{STRIP_HOLD_LIMIT, StripUsage};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};

/// One step of a scripted inner body.
enum Step {
    Data(Bytes),
    /// Not ready this time (ready again at once).
    Pending,
    Trailers,
    Error,
}

/// An inner body that plays its steps, one per poll.
struct Script(VecDeque<Step>);

impl Body for Script {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        Poll::Ready(match self.0.pop_front() {
            None => None,
            Some(Step::Data(data)) => Some(Ok(Frame::data(data))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(Step::Trailers) => Some(Ok(Frame::trailers(HeaderMap::new()))),
            Some(Step::Error) => Some(Err("reset")),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// A step that yields `bytes`.
fn data(bytes: &'static [u8]) -> Step {
    Step::Data(Bytes::from_static(bytes))
}

type Polled = Poll<Option<Result<Frame<Bytes>, &'static str>>>;

fn strip(steps: impl IntoIterator<Item = Step>) -> StripUsage<Script> {
    StripUsage::new(Script(steps.into_iter().collect()))
}

fn poll(body: &mut StripUsage<Script>) -> Polled {
    Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
}

/// The data of a frame that must be ready now.
fn ready_data(body: &mut StripUsage<Script>) -> Bytes {
    match poll(body) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().expect("a data frame"),
        _ => panic!("a data frame is ready"),
    }
}

/// Everything that comes out of `frames`, each sent as one inner frame.
fn stripped(frames: &[&[u8]]) -> Vec<u8> {
    let mut body = strip(
        frames
            .iter()
            .map(|frame| Step::Data(Bytes::copy_from_slice(frame))),
    );
    let mut out = Vec::new();
    loop {
        match poll(&mut body) {
            Poll::Ready(Some(Ok(frame))) => out.extend_from_slice(&frame.into_data().unwrap()),
            Poll::Ready(None) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(body.is_end_stream());
    out
}

const FILTER: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

/// A chat completion stream as Azure writes it, with `"usage":null` on every chunk and the usage
/// chunk when `include_usage`, lines ended by `eol`.
fn azure_stream(include_usage: bool, eol: &str) -> Vec<u8> {
    let usage_null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |choices: &str, usage: &str| {
        format!(
            r#"{{"choices":{choices},"created":1733000000,"id":"chatcmpl-AbCdEf","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ee1d74bde0"{usage}}}"#
        )
    };
    let choice = |delta: &str, finish: &str, filter: &str| {
        format!(
            r#"[{{"content_filter_results":{filter},"delta":{delta},"finish_reason":{finish},"index":0,"logprobs":null}}]"#
        )
    };
    let mut events = vec![
        // Azure's first chunk: no choices, the prompt's filter results.
        format!(
            r#"{{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{FILTER}}}]{usage_null}}}"#
        ),
        chunk(
            &choice(
                r#"{"content":"","refusal":null,"role":"assistant"}"#,
                "null",
                "{}",
            ),
            usage_null,
        ),
    ];
    for token in ["Hello", " \"usage\":null", ",\\", " world"] {
        let delta = serde_json::json!({ "content": token }).to_string();
        events.push(chunk(&choice(&delta, "null", FILTER), usage_null));
    }
    events.push(chunk(&choice("{}", r#""stop""#, "{}"), usage_null));
    if include_usage {
        events.push(chunk(
            "[]",
            r#","usage":{"completion_tokens":4,"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":16}"#,
        ));
    }
    events.push("[DONE]".to_owned());
    events
        .iter()
        .map(|data| format!("data: {data}{eol}{eol}"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn stripped_stream_is_the_stream_without_include_usage() {
    for eol in ["\n", "\r\n", "\r"] {
        let with = azure_stream(true, eol);
        let without = azure_stream(false, eol);
        assert_ne!(with, without);
        assert_eq!(stripped(&[&with]), without, "one frame, {eol:?}");
        // Every split point: a line end, a `\r\n`, the member, the usage chunk cut in two.
        for at in 0..with.len() {
            let (a, b) = with.split_at(at);
            assert_eq!(stripped(&[a, b]), without, "split at {at}, {eol:?}");
        }
        let bytes: Vec<&[u8]> = with.chunks(1).collect();
        assert_eq!(stripped(&bytes), without, "byte by byte, {eol:?}");
    }
}

#[test]
fn one_event_per_frame_as_instances_send() {
    let with = azure_stream(true, "\n");
    let frames: Vec<&[u8]> = with.split_inclusive(|&b| b == b'\n').collect();
    assert_eq!(stripped(&frames), azure_stream(false, "\n"));
}

#[test]
fn whole_events_come_out_at_once() {
    let events = Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
          data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n",
    );
    let mut body = strip([Step::Data(events), Step::Pending]);
    assert_eq!(
        ready_data(&mut body),
        &b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
           data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"[..]
    );
    assert!(poll(&mut body).is_pending());
}

#[test]
fn an_unchanged_frame_is_the_same_bytes() {
    let events = Bytes::from_static(b": keep-alive\n\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n");
    let mut body = strip([Step::Data(events.clone()), Step::Pending]);
    let out = ready_data(&mut body);
    assert_eq!(out, events);
    assert_eq!(out.as_ptr(), events.as_ptr(), "not copied");
}

#[test]
fn a_partial_event_is_held_until_its_end() {
    let mut body = strip([
        data(b"data: {\"choices\":[],\"x\":1,\"usage\":null}\n\ndata: {\"choi"),
        Step::Pending,
        data(b"ces\":[{}],\"usage\":null}\n"),
        Step::Pending,
        data(b"\ndata: [DO"),
        Step::Pending,
        data(b"NE]\n\n"),
        Step::Pending,
    ]);
    // The whole event goes at once, the partial one waits.
    assert_eq!(
        ready_data(&mut body),
        &b"data: {\"choices\":[],\"x\":1}\n\n"[..]
    );
    assert!(poll(&mut body).is_pending());
    // Its line ended, but not the event: no blank line yet.
    assert!(poll(&mut body).is_pending());
    assert_eq!(ready_data(&mut body), &b"data: {\"choices\":[{}]}\n\n"[..]);
    assert!(poll(&mut body).is_pending());
    assert_eq!(ready_data(&mut body), &b"data: [DONE]\n\n"[..]);
    assert!(poll(&mut body).is_pending());
    assert!(matches!(poll(&mut body), Poll::Ready(None)));
}

#[test]
fn the_usage_chunk_alone_gives_no_frame() {
    let mut body = strip([
        data(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n"),
        Step::Pending,
        data(b"data: [DONE]\n\n"),
    ]);
    assert!(poll(&mut body).is_pending());
    assert_eq!(ready_data(&mut body), &b"data: [DONE]\n\n"[..]);
    assert!(body.is_end_stream());
}

#[test]
fn members_and_events_left_alone() {
    let kept: [&[u8]; 8] = [
        // Azure's first chunk: `"choices":[]`, no usage.
        b"data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n",
        // A nested `usage`, in an object and in a string.
        b"data: {\"choices\":[{\"delta\":{\"usage\":null}}]}\n\n",
        b"data: {\"choices\":[{\"delta\":{\"content\":\",\\\"usage\\\":null\"}}]}\n\n",
        b"data: {\"a\":{\"choices\":[],\"usage\":{\"total_tokens\":1}}}\n\n",
        // Usage with choices: not the extra chunk.
        b"data: {\"choices\":[{\"index\":0}],\"usage\":{\"total_tokens\":1}}\n\n",
        // Two data lines, or no JSON object.
        b"data: {\"choices\":[],\ndata: \"usage\":null}\n\n",
        b"event: usage\ndata: \"usage\":null\n\n",
        // Comments and other fields.
        b": \"usage\":null\nid: 7\nretry: 10\n\n",
    ];
    for event in kept {
        assert_eq!(
            stripped(&[event]),
            event,
            "{}",
            String::from_utf8_lossy(event)
        );
    }
}

#[test]
fn usage_null_anywhere_among_the_members() {
    for (event, want) in [
        (
            &b"data: {\"usage\":null,\"choices\":[]}\n\n"[..],
            &b"data: {\"choices\":[]}\n\n"[..],
        ),
        // OpenAI's `obfuscation` after the usage.
        (
            b"data: {\"choices\":[],\"usage\":null,\"obfuscation\":\"x\"}\n\n",
            b"data: {\"choices\":[],\"obfuscation\":\"x\"}\n\n",
        ),
        (b"data: {\"usage\":null}\n\n", b"data: {}\n\n"),
        // `data:` without its space, other fields beside.
        (
            b"id: 1\ndata:{\"a\":1,\"usage\":null}\nevent: chunk\n\n",
            b"id: 1\ndata:{\"a\":1}\nevent: chunk\n\n",
        ),
        // The usage chunk goes with its other fields.
        (
            b"event: x\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":1}}\n\ndata: [DONE]\n\n",
            b"data: [DONE]\n\n",
        ),
    ] {
        assert_eq!(
            stripped(&[event]),
            want,
            "{}",
            String::from_utf8_lossy(event)
        );
    }
}

#[test]
fn an_oversized_event_passes_unchanged() {
    let big = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}],\"usage\":null}}\n\n",
        "x".repeat(2 * STRIP_HOLD_LIMIT)
    );
    let big = Bytes::from(big);
    let quarter = STRIP_HOLD_LIMIT / 4;
    let mut steps = Vec::new();
    for piece in big.chunks(quarter) {
        steps.push(Step::Data(Bytes::copy_from_slice(piece)));
        steps.push(Step::Pending);
    }
    steps.push(data(b"data: {\"choices\":[],\"usage\":null}\n\n"));
    let pieces = big.len().div_ceil(quarter);
    let mut body = strip(steps);
    let mut out = Vec::new();
    // Held up to the limit, ...
    for _ in 0..4 {
        assert!(poll(&mut body).is_pending());
    }
    // ... then forwarded, and from then on as it comes.
    out.extend_from_slice(&ready_data(&mut body));
    assert_eq!(out.len(), 5 * quarter);
    for _ in 5..pieces {
        assert!(poll(&mut body).is_pending());
        out.extend_from_slice(&ready_data(&mut body));
    }
    assert_eq!(out, big);
    assert!(poll(&mut body).is_pending());
    // The next event is stripped again.
    assert_eq!(ready_data(&mut body), &b"data: {\"choices\":[]}\n\n"[..]);
}

#[test]
fn an_error_passes_after_what_is_held() {
    let mut body = strip([
        data(b"data: {\"a\":1,\"usage\":null}\n\ndata: {\"a\":"),
        Step::Error,
    ]);
    assert_eq!(ready_data(&mut body), &b"data: {\"a\":1}\n\n"[..]);
    assert_eq!(ready_data(&mut body), &b"data: {\"a\":"[..]);
    assert!(matches!(poll(&mut body), Poll::Ready(Some(Err("reset")))));

    let mut body = strip([Step::Error]);
    assert!(matches!(poll(&mut body), Poll::Ready(Some(Err("reset")))));
}

#[test]
fn trailers_pass_after_what_is_held() {
    let mut body = strip([
        data(b"data: {\"a\":1,\"usage\":null}"),
        Step::Pending,
        Step::Trailers,
    ]);
    assert!(poll(&mut body).is_pending());
    assert!(!body.is_end_stream());
    assert_eq!(
        ready_data(&mut body),
        &b"data: {\"a\":1,\"usage\":null}"[..]
    );
    assert!(!body.is_end_stream());
    match poll(&mut body) {
        Poll::Ready(Some(Ok(frame))) => assert!(frame.is_trailers()),
        other => panic!("trailers expected, got {other:?}"),
    }
    assert!(body.is_end_stream());
}

#[test]
fn the_last_frame_flushes_what_is_held() {
    // Ends without its blank line: forwarded as it is with the last frame.
    let mut body = strip([data(b"data: {\"a\":1,\"usage\":null}\n\ndata: x")]);
    assert_eq!(ready_data(&mut body), &b"data: {\"a\":1}\n\ndata: x"[..]);
    assert!(body.is_end_stream());
    assert!(matches!(poll(&mut body), Poll::Ready(None)));
}

#[tokio::test]
async fn end_and_size_hint() {
    let empty = StripUsage::new(Full::new(Bytes::new()));
    assert!(empty.is_end_stream());
    assert_eq!(empty.size_hint().exact(), Some(0));

    let stream = azure_stream(true, "\n");
    let body = StripUsage::new(Full::new(Bytes::from(stream.clone())));
    assert!(!body.is_end_stream());
    // Bytes may be taken out: no exact length, at most the inner's.
    let hint = body.size_hint();
    assert_eq!((hint.lower(), hint.upper()), (0, Some(stream.len() as u64)));
    let out = body.collect().await.unwrap().to_bytes();
    assert_eq!(out, azure_stream(false, "\n"));
}
