//! What reading usage, and stripping it, add to an answer, measured in one run so the figures
//! compare:
//!
//! - `stream/*`: a chat stream of 200 Azure-shaped chunks (490 bytes each, with their content
//!   filter results and `"usage":null`) and the usage chunk, one chunk per frame, through a
//!   `service_fn` (`bare`), the same behind a `UsageLayer` (`usage`), and its body in
//!   `StripUsage` (`strip`). Each iteration is one request: the per-chunk cost is the difference
//!   to `bare`, divided by 201.
//! - `json/*`: a 1.2 KB chat completion answer, bare and behind a `UsageLayer`.
//!
//! Bodies are polled by hand with a no-op waker: no runtime, only the layer and the body.
//!
//! ```text
//! cargo bench -p aoai-usage --bench usage -- --warm-up-time 1 --measurement-time 3
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use aoai_usage::{StripUsage, UsageLayer, UsageReport};
use bytes::{Buf, Bytes};
use criterion::{Criterion, Throughput};
use http::{Request, Response, header};
use http_body::{Body, Frame};
use tower::{Layer, Service, service_fn};

const CHUNKS: usize = 200;

/// A body that yields its frames, all ready.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// The stream's frames: `CHUNKS` content chunks, the usage chunk, `[DONE]`.
fn stream() -> Vec<Bytes> {
    let chunk = |token: usize| {
        format!(
            r#"data: {{"choices":[{{"content_filter_results":{{"hate":{{"filtered":false,"severity":"safe"}},"self_harm":{{"filtered":false,"severity":"safe"}},"sexual":{{"filtered":false,"severity":"safe"}},"violence":{{"filtered":false,"severity":"safe"}}}},"delta":{{"content":" token{token}"}},"finish_reason":null,"index":0,"logprobs":null}}],"created":1733000000,"id":"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz123","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ee1d74bde0","usage":null}}"#
        ) + "\n\n"
    };
    let mut frames: Vec<Bytes> = (0..CHUNKS).map(|i| chunk(i).into()).collect();
    frames.push(Bytes::from_static(
        br#"data: {"choices":[],"created":1733000000,"id":"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz123","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ee1d74bde0","usage":{"completion_tokens":200,"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":212}}

"#,
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// A 1.2 KB chat completion answer.
fn json() -> Bytes {
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(10);
    format!(
        r#"{{"choices":[{{"content_filter_results":{{"hate":{{"filtered":false,"severity":"safe"}},"self_harm":{{"filtered":false,"severity":"safe"}},"sexual":{{"filtered":false,"severity":"safe"}},"violence":{{"filtered":false,"severity":"safe"}}}},"finish_reason":"stop","index":0,"logprobs":null,"message":{{"annotations":[],"content":"{content}","refusal":null,"role":"assistant"}}}}],"created":1733000000,"id":"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz123","model":"gpt-4o-2024-11-20","object":"chat.completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{{}}}}],"system_fingerprint":"fp_ee1d74bde0","usage":{{"completion_tokens":100,"completion_tokens_details":{{"reasoning_tokens":0}},"prompt_tokens":12,"prompt_tokens_details":{{"cached_tokens":0}},"total_tokens":112}}}}"#
    )
    .into()
}

/// An instance answering every request with `frames`, as `content_type`.
fn instance(
    content_type: &'static str,
    frames: Vec<Bytes>,
) -> impl Service<Request<()>, Response = Response<Frames>, Error = Infallible> {
    service_fn(move |_request: Request<()>| {
        let response = Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(Frames(frames.iter().cloned().collect()))
            .unwrap();
        async move { Ok::<_, Infallible>(response) }
    })
}

/// One request through `service`, its body read to the end; returns the bytes read.
fn serve<S, B>(service: &mut S) -> usize
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + Unpin,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let Poll::Ready(response) = pin!(service.call(Request::new(()))).poll(&mut cx) else {
        panic!("the answer is ready");
    };
    read(response.unwrap().into_body())
}

fn read<B: Body<Data = Bytes> + Unpin>(mut body: B) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut read = 0;
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(frame) = frame
            && let Some(data) = frame.data_ref()
        {
            read += data.remaining();
        }
    }
    read
}

fn count_usage() -> UsageLayer<impl Fn(&Request<()>) -> fn(UsageReport) + Clone> {
    UsageLayer::new(|_request: &Request<()>| {
        (|report: UsageReport| {
            black_box(report);
        }) as fn(UsageReport)
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Elements(CHUNKS as u64 + 1));
    let mut bare = instance("text/event-stream", stream());
    group.bench_function("bare", |b| b.iter(|| serve(&mut bare)));
    let mut usage = count_usage().layer(instance("text/event-stream", stream()));
    group.bench_function("usage", |b| b.iter(|| serve(&mut usage)));
    let mut bare = instance("text/event-stream", stream());
    group.bench_function("strip", |b| {
        b.iter(|| {
            let mut cx = Context::from_waker(Waker::noop());
            let Poll::Ready(Ok(response)) = pin!(bare.call(Request::new(()))).poll(&mut cx) else {
                panic!("the answer is ready");
            };
            read(StripUsage::new(response.into_body()))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("json");
    group.throughput(Throughput::Elements(1));
    let mut bare = instance("application/json", vec![json()]);
    group.bench_function("bare", |b| b.iter(|| serve(&mut bare)));
    let mut usage = count_usage().layer(instance("application/json", vec![json()]));
    group.bench_function("usage", |b| b.iter(|| serve(&mut usage)));
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
