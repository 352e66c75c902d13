//! `CountUsage` over real streaming bodies: `StreamBody` fed by a channel, frames sent one by one.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_usage::{DEFAULT_PARSE_LIMIT, Usage, UsageBody, UsageLayer, UsageReport};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};

type Chunk = Result<Frame<Bytes>, Infallible>;
/// Polls the channel's receiver (boxed only to name the body's type in these tests).
type Recv = Box<dyn FnMut(&mut Context<'_>) -> Poll<Option<Chunk>> + Send + Unpin>;
type Channel = StreamBody<futures_util::stream::PollFn<Recv>>;
type Reports = Arc<Mutex<Vec<UsageReport>>>;

/// A body fed frame by frame through `tx`.
fn channel_body() -> (mpsc::Sender<Chunk>, Channel) {
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let poll: Recv = Box::new(move |cx| rx.poll_recv(cx));
    (tx, StreamBody::new(futures_util::stream::poll_fn(poll)))
}

/// A request's callback: pushes its report to [`Reports`] (boxed only to name its type here).
type Record = Box<dyn FnOnce(UsageReport) + Send>;

/// A layer whose callbacks push their reports to the list it returns beside it.
fn recording_layer() -> (
    UsageLayer<impl FnMut(&Request<()>) -> Record + Clone>,
    Reports,
) {
    let reports: Reports = Arc::default();
    let sink = reports.clone();
    let layer = UsageLayer::new(move |_request: &Request<()>| -> Record {
        let sink = sink.clone();
        Box::new(move |report: UsageReport| sink.lock().unwrap().push(report))
    });
    (layer, reports)
}

/// Sends a request through a recording layer to a service that answers with `content_type` and
/// the channel body; returns the body, the sender and where the reports land.
async fn answer(content_type: &str) -> (UsageBody<Channel, Record>, mpsc::Sender<Chunk>, Reports) {
    answer_parsing_up_to(content_type, DEFAULT_PARSE_LIMIT).await
}

/// [`answer`], from a layer that parses answers up to `parse_limit` bytes.
async fn answer_parsing_up_to(
    content_type: &str,
    parse_limit: usize,
) -> (UsageBody<Channel, Record>, mpsc::Sender<Chunk>, Reports) {
    let (layer, reports) = recording_layer();
    let (tx, body) = channel_body();
    let response = Response::builder()
        .header("content-type", content_type)
        .body(body)
        .unwrap();
    let mut slot = Some(response);
    let inner = tower::service_fn(move |_request: Request<()>| {
        let response = slot.take().expect("one request");
        async move { Ok::<_, Infallible>(response) }
    });
    let service = layer.parse_up_to(parse_limit).layer(inner);
    let response = service.oneshot(Request::new(())).await.unwrap();
    (response.into_body(), tx, reports)
}

/// The next frame's data, failing (not hanging) if the body holds it back.
async fn next_data<B>(body: &mut B) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Unpin,
{
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the body yields a frame as soon as it arrives")?;
    Some(frame.unwrap().into_data().unwrap())
}

/// Sends each chunk, and reads it back before sending the next.
async fn pass<B>(body: &mut B, tx: &mpsc::Sender<Chunk>, chunks: &[&[u8]])
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Unpin,
{
    for chunk in chunks {
        let chunk = Bytes::copy_from_slice(chunk);
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        assert_eq!(next_data(body).await, Some(chunk));
    }
}

fn one_report(reports: &Reports) -> UsageReport {
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1, "the callback is called exactly once");
    // When the first data passed is checked by its own test; the model and id only where they
    // are named.
    UsageReport {
        first_data_at: None,
        model: None,
        id: None,
        ..reports[0].clone()
    }
}

async fn whole_json(content_type: &str, chunks: &[&[u8]]) -> UsageReport {
    let (mut body, tx, reports) = answer(content_type).await;
    pass(&mut body, &tx, chunks).await;
    assert!(reports.lock().unwrap().is_empty(), "not before the end");
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
    drop(body);
    one_report(&reports)
}

#[tokio::test]
async fn chat_json_answer_usage() {
    let report = whole_json(
        "application/json",
        &[
            br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"}}],"#,
            br#""usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3},"#,
            br#""completion_tokens_details":{"reasoning_tokens":2}}}"#,
        ],
    )
    .await;
    assert_eq!(
        report,
        UsageReport {
            usage: Some(Usage {
                input_tokens: 19,
                output_tokens: 10,
                total_tokens: 29,
                cached_tokens: 3,
                reasoning_tokens: 2,
            }),
            complete: true,
            ..UsageReport::default()
        }
    );
}

#[tokio::test]
async fn embeddings_answer_usage() {
    let report = whole_json(
        "application/json; charset=utf-8",
        &[
            br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"#,
            br#""model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        ],
    )
    .await;
    assert!(report.complete);
    assert_eq!(
        report.usage,
        Some(Usage {
            input_tokens: 8,
            total_tokens: 8,
            ..Usage::default()
        })
    );
}

#[tokio::test]
async fn responses_answer_usage() {
    let report = whole_json(
        "application/json",
        &[
            br#"{"id":"resp_1","object":"response","status":"completed","output":[],"#,
            br#""usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}"#,
        ],
    )
    .await;
    assert_eq!(
        report.usage,
        Some(Usage {
            input_tokens: 36,
            output_tokens: 87,
            total_tokens: 123,
            cached_tokens: 0,
            reasoning_tokens: 64,
        })
    );
}

#[tokio::test]
async fn chat_stream_usage_split_across_frames() {
    let (mut body, tx, reports) = answer("text/event-stream").await;
    // Each frame is read back before the next is sent: nothing is held back.
    pass(
        &mut body,
        &tx,
        &[
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"compl",
            b"etion_tokens\":4,\"total_tokens\":15}}\n",
            b"\ndata: [DONE]\n\n",
        ],
    )
    .await;
    assert!(reports.lock().unwrap().is_empty());
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
    let report = one_report(&reports);
    assert!(report.complete);
    assert_eq!(
        report.usage,
        Some(Usage {
            input_tokens: 11,
            output_tokens: 4,
            total_tokens: 15,
            ..Usage::default()
        })
    );
    drop(body);
    one_report(&reports);
}

#[tokio::test]
async fn responses_stream_completed_event() {
    let (mut body, tx, reports) = answer("text/event-stream").await;
    pass(
        &mut body,
        &tx,
        &[
            b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n",
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}\n\n",
            b"event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",",
            b"\"usage\":{\"input_tokens\":7,\"output_tokens\":21,\"total_tokens\":28,\"output_tokens_details\":{\"reasoning_tokens\":5}}}}\r\n\r\n",
        ],
    )
    .await;
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(
        one_report(&reports),
        UsageReport {
            usage: Some(Usage {
                input_tokens: 7,
                output_tokens: 21,
                total_tokens: 28,
                cached_tokens: 0,
                reasoning_tokens: 5,
            }),
            complete: true,
            ..UsageReport::default()
        }
    );
}

#[tokio::test]
async fn stream_dropped_early_reports_incomplete() {
    let (mut body, tx, reports) = answer("text/event-stream").await;
    pass(
        &mut body,
        &tx,
        &[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            b"data: {\"cho",
        ],
    )
    .await;
    assert!(reports.lock().unwrap().is_empty());
    // The caller goes away while the instance is still streaming.
    drop(body);
    assert_eq!(
        one_report(&reports),
        UsageReport {
            usage: None,
            complete: false,
            ..UsageReport::default()
        }
    );
    drop(tx);
    one_report(&reports);
}

#[tokio::test]
async fn stream_dropped_after_usage_keeps_it() {
    let (mut body, tx, reports) = answer("text/event-stream").await;
    pass(
        &mut body,
        &tx,
        &[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1,\"total_tokens\":3}}\n\n"],
    )
    .await;
    drop(body);
    let report = one_report(&reports);
    assert!(!report.complete);
    assert_eq!(report.usage.map(|u| u.total_tokens), Some(3));
    drop(tx);
}

#[tokio::test]
async fn non_json_body_reports_none() {
    let report = whole_json("text/plain", &[b"{\"usage\":{\"prompt_tokens\":1}}"]).await;
    assert_eq!(
        report,
        UsageReport {
            usage: None,
            complete: true,
            ..UsageReport::default()
        }
    );
    // Declared JSON, but is not.
    let report = whole_json("application/json", &[b"<html>bad gateway</html>"]).await;
    assert_eq!(report.usage, None);
    assert!(report.complete);
}

#[tokio::test]
async fn oversized_json_reports_none_and_passes_whole() {
    let (mut body, tx, reports) = answer_parsing_up_to("application/json", 64).await;
    let padding = format!("{{\"pad\":\"{}\",", "x".repeat(100));
    pass(
        &mut body,
        &tx,
        &[
            padding.as_bytes(),
            br#""usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
        ],
    )
    .await;
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(
        one_report(&reports),
        UsageReport {
            usage: None,
            complete: true,
            ..UsageReport::default()
        }
    );
}

#[tokio::test]
async fn inner_error_and_dropped_future_report_once() {
    let (layer, reports) = recording_layer();
    let failing = layer.layer(tower::service_fn(|_request: Request<()>| async {
        Err::<Response<http_body_util::Empty<Bytes>>, _>("instance unreachable")
    }));
    assert!(failing.oneshot(Request::new(())).await.is_err());
    assert_eq!(
        one_report(&reports),
        UsageReport {
            usage: None,
            complete: false,
            ..UsageReport::default()
        }
    );

    reports.lock().unwrap().clear();
    let mut pending = layer.layer(tower::service_fn(|_request: Request<()>| {
        std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, Infallible>>()
    }));
    let future = pending.call(Request::new(()));
    drop(future);
    assert!(!one_report(&reports).complete);
}

#[tokio::test]
async fn empty_body_is_complete_at_once() {
    let (layer, reports) = recording_layer();
    let service = layer.layer(tower::service_fn(|_request: Request<()>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(204)
                .header("content-type", "application/json")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
    }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    // hyper would not poll a body that is already at its end.
    drop(response);
    assert_eq!(
        one_report(&reports),
        UsageReport {
            usage: None,
            complete: true,
            ..UsageReport::default()
        }
    );
}

#[tokio::test]
async fn first_data_time_and_model_are_reported() {
    let (mut body, tx, reports) = answer("text/event-stream").await;
    let before = std::time::Instant::now();
    pass(
        &mut body,
        &tx,
        &[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"model\":\"gpt-4o-mini-2024-07-18\",\"usage\":{\"total_tokens\":4}}\n\n",
        ],
    )
    .await;
    drop(tx);
    assert_eq!(next_data(&mut body).await, None);
    let report = reports.lock().unwrap()[0].clone();
    assert!(report.first_data_at.is_some_and(|at| at >= before));
    assert_eq!(report.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(report.usage.map(|u| u.total_tokens), Some(4));
}
