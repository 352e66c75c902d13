//! `TokenLimit` in front of an in-memory instance, on tokio's paused clock: nothing moves time
//! but `tokio::time::advance`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aoai_usage::{
    Caller, CallerLimits, LimitExceeded, LimitKind, TokenLimit, TokenLimitLayer, TokenLimiter,
};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{BoxError, Layer, Service, ServiceExt};

type Calls = Arc<AtomicUsize>;

/// The header telling the instance how many tokens its answer used; without it, the answer
/// carries no usage.
const USAGE: &str = "x-test-usage";

fn caller(name: &str, tokens_per_minute: Option<u64>, requests_per_minute: Option<u64>) -> Caller {
    Caller::new(name).with_limits(CallerLimits {
        tokens_per_minute,
        requests_per_minute,
    })
}

/// A request from `caller` whose prompt is estimated at `estimate` tokens, answered with `used`.
fn request(caller: Option<&Caller>, estimate: u64, used: Option<u64>) -> Request<String> {
    let mut request = Request::new("x".repeat(usize::try_from(estimate * 4).unwrap()));
    if let Some(caller) = caller {
        request.extensions_mut().insert(caller.clone());
    }
    if let Some(used) = used {
        request.headers_mut().insert(USAGE, used.into());
    }
    request
}

fn used(request: &Request<String>) -> Option<u64> {
    let value = request.headers().get(USAGE)?;
    value.to_str().ok()?.parse().ok()
}

/// A JSON instance: its usage totals the request's `x-test-usage`; it counts its calls in
/// `calls`.
fn json_instance(
    limiter: &TokenLimiter,
    calls: &Calls,
) -> TokenLimit<
    impl Service<Request<String>, Response = Response<Full<Bytes>>, Error = Infallible> + use<>,
> {
    let counted = calls.clone();
    let instance = tower::service_fn(move |request: Request<String>| {
        counted.fetch_add(1, Ordering::SeqCst);
        let json = match used(&request) {
            Some(total) => format!(r#"{{"choices":[],"usage":{{"total_tokens":{total}}}}}"#),
            None => r#"{"choices":[]}"#.to_owned(),
        };
        let response = Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    TokenLimitLayer::new(limiter.clone()).layer(instance)
}

type Events =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A streaming instance: a content chunk, the usage chunk (`x-test-usage`), `[DONE]`.
fn stream_instance(
    limiter: &TokenLimiter,
) -> TokenLimit<impl Service<Request<String>, Response = Response<Events>, Error = Infallible>> {
    let instance = tower::service_fn(|request: Request<String>| {
        let total = used(&request).unwrap();
        let events = [
            r#"data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#.to_owned(),
            format!(r#"data: {{"choices":[],"usage":{{"total_tokens":{total}}}}}"#),
            "data: [DONE]".to_owned(),
        ];
        let frames: Vec<_> = events
            .into_iter()
            .map(|event| Ok(Frame::data(Bytes::from(event + "\n\n"))))
            .collect();
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    TokenLimitLayer::new(limiter.clone()).layer(instance)
}

/// Sends `request` and reads the whole answer (which settles its admission).
async fn send<S, B>(service: &mut S, request: Request<String>) -> Result<Bytes, BoxError>
where
    S: Service<Request<String>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes, Error = Infallible>,
{
    let response = service.ready().await?.call(request).await?;
    Ok(response.into_body().collect().await?.to_bytes())
}

/// [`send`], for a request that must be admitted: the whole answer.
async fn send_admitted<S, B>(service: &mut S, request: Request<String>) -> Bytes
where
    S: Service<Request<String>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes, Error = Infallible>,
{
    send(service, request).await.expect("admitted")
}

fn refusal(result: Result<Bytes, BoxError>) -> LimitExceeded {
    *result
        .expect_err("over the limit")
        .downcast::<LimitExceeded>()
        .expect("a LimitExceeded")
}

/// Asserts that `caller` has exactly `tokens` left: that much is admitted, one more is not.
fn assert_left(limiter: &TokenLimiter, caller: &Caller, tokens: u64) {
    let _all = limiter
        .admit(caller, tokens)
        .expect("what is left is admitted");
    assert!(
        limiter.admit(caller, 1).is_err(),
        "more than {tokens} were left"
    );
}

#[tokio::test(start_paused = true)]
async fn the_request_that_would_exceed_the_minute_waits_its_retry_after() {
    let limiter = TokenLimiter::new();
    let calls = Calls::default();
    let mut service = json_instance(&limiter, &calls);
    let search = caller("search-team", Some(1_000), None);

    // Estimated at 100 tokens, it used 900: 100 are left.
    send_admitted(&mut service, request(Some(&search), 100, Some(900))).await;
    let refused = refusal(send(&mut service, request(Some(&search), 150, Some(150))).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no instance contacted");
    assert_eq!(refused.kind(), LimitKind::Tokens);
    assert_eq!(refused.caller(), "search-team");
    assert_eq!(refused.per_minute(), 1_000);
    // 50 tokens more, at one every 60 ms.
    assert_eq!(refused.retry_after(), Duration::from_secs(3));

    // Another caller is unaffected.
    let other = caller("other-team", Some(1_000), None);
    send_admitted(&mut service, request(Some(&other), 150, Some(150))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    tokio::time::advance(refused.retry_after() - Duration::from_millis(1)).await;
    let again = refusal(send(&mut service, request(Some(&search), 150, Some(150))).await);
    assert_eq!(again.retry_after(), Duration::from_millis(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    tokio::time::advance(Duration::from_millis(1)).await;
    send_admitted(&mut service, request(Some(&search), 150, Some(150))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_rounded_up_to_the_millisecond() {
    let limiter = TokenLimiter::new();
    let odd = caller("odd", Some(7), None);
    let _minute = limiter.admit(&odd, 7).unwrap();
    // One token refills in 60/7 s: 8571.43 ms.
    let refused = limiter.admit(&odd, 1).unwrap_err();
    assert_eq!(refused.retry_after(), Duration::from_millis(8_572));
    tokio::time::advance(Duration::from_millis(8_571)).await;
    assert!(limiter.admit(&odd, 1).is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(limiter.admit(&odd, 1).is_ok());
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute() {
    let limiter = TokenLimiter::new();
    let calls = Calls::default();
    let mut service = json_instance(&limiter, &calls);
    let batch = caller("batch", None, Some(2));
    for _ in 0..2 {
        send_admitted(&mut service, request(Some(&batch), 10, Some(10))).await;
    }
    let refused = refusal(send(&mut service, request(Some(&batch), 10, Some(10))).await);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(refused.kind(), LimitKind::Requests);
    assert_eq!(refused.retry_after(), Duration::from_secs(30));
    assert_eq!(
        refused.to_string(),
        r#"caller "batch" is over its 2 requests per minute; retry after 30.0 s"#
    );
    tokio::time::advance(refused.retry_after()).await;
    send_admitted(&mut service, request(Some(&batch), 10, Some(10))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn both_limits_the_later_one_is_reported() {
    let limiter = TokenLimiter::new();
    let team = caller("team", Some(600), Some(6));
    let _first = limiter.admit(&team, 600).unwrap();
    // Tokens: one in 100 ms; requests: one in 10 s.
    let refused = limiter.admit(&team, 1).unwrap_err();
    assert_eq!(refused.kind(), LimitKind::Tokens);
    assert_eq!(refused.retry_after(), Duration::from_millis(100));
    for _ in 1..6 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let _next = limiter.admit(&team, 1).unwrap();
    }
    let refused = limiter.admit(&team, 1).unwrap_err();
    assert_eq!(refused.kind(), LimitKind::Requests);
    assert_eq!(refused.retry_after(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_charged_its_usage_when_it_ends() {
    let limiter = TokenLimiter::new();
    let mut service = stream_instance(&limiter);
    let chat = caller("chat", Some(1_000), None);

    let body = send_admitted(&mut service, request(Some(&chat), 100, Some(600))).await;
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    assert_left(&limiter, &chat, 400);
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_before_its_usage_is_charged_its_estimate() {
    let limiter = TokenLimiter::new();
    let mut service = stream_instance(&limiter);
    let chat = caller("chat", Some(1_000), None);

    let response = service
        .ready()
        .await
        .unwrap()
        .call(request(Some(&chat), 100, Some(600)))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {\"choices\":[{\"delta\""));
    drop(body);
    assert_left(&limiter, &chat, 900);
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_usage_is_charged_its_estimate() {
    let limiter = TokenLimiter::new();
    let mut service = json_instance(&limiter, &Calls::default());
    let team = caller("team", Some(1_000), None);
    send_admitted(&mut service, request(Some(&team), 100, None)).await;
    assert_left(&limiter, &team, 900);
}

#[tokio::test(start_paused = true)]
async fn what_the_estimate_took_too_much_is_given_back() {
    let limiter = TokenLimiter::new();
    let mut service = json_instance(&limiter, &Calls::default());
    let team = caller("team", Some(1_000), None);
    send_admitted(&mut service, request(Some(&team), 500, Some(50))).await;
    assert_left(&limiter, &team, 950);
}

#[tokio::test(start_paused = true)]
async fn a_prompt_larger_than_the_minute_goes_when_the_bucket_is_full() {
    let limiter = TokenLimiter::new();
    let calls = Calls::default();
    let mut service = json_instance(&limiter, &calls);
    let team = caller("team", Some(1_000), None);

    // Estimated at 5,000 and using 3,000: admitted on a full bucket, which it leaves 2,000 short.
    send_admitted(&mut service, request(Some(&team), 5_000, Some(3_000))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let refused = refusal(send(&mut service, request(Some(&team), 5_000, Some(10))).await);
    // The debt, then a full minute (the most an estimate holds out for).
    assert_eq!(refused.retry_after(), Duration::from_secs(180));

    tokio::time::advance(refused.retry_after()).await;
    send_admitted(&mut service, request(Some(&team), 5_000, Some(10))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_caller_passes() {
    let limiter = TokenLimiter::new();
    let calls = Calls::default();
    let mut service = json_instance(&limiter, &calls);
    for _ in 0..3 {
        let body = send_admitted(&mut service, request(None, 100_000, Some(100_000))).await;
        assert!(body.starts_with(b"{\"choices\""));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // So does a caller without limits, and neither is remembered.
    let free = caller("free", None, None);
    send_admitted(&mut service, request(Some(&free), 100_000, Some(100_000))).await;
    assert_eq!(format!("{limiter:?}"), "TokenLimiter { callers: 0 }");
}

#[tokio::test(start_paused = true)]
async fn the_estimate_is_read_from_content_length() {
    let limiter = TokenLimiter::new();
    let calls = Calls::default();
    let mut service = json_instance(&limiter, &calls);
    let team = caller("team", Some(1_000), None);
    send_admitted(&mut service, request(Some(&team), 100, Some(900))).await;

    // An empty body that says it is 800 bytes long: 200 tokens, over the 100 left.
    let mut long = request(Some(&team), 0, Some(0));
    long.headers_mut()
        .insert(http::header::CONTENT_LENGTH, 800.into());
    let refused = refusal(send(&mut service, long).await);
    assert_eq!(refused.retry_after(), Duration::from_secs(6));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn new_limits_apply_from_the_next_request() {
    let limiter = TokenLimiter::new();
    let small = caller("growing", Some(100), None);
    let _minute = limiter.admit(&small, 100).unwrap();
    assert_eq!(
        limiter.admit(&small, 1).unwrap_err().retry_after(),
        Duration::from_millis(600)
    );
    // Ten times the limit: the bucket, still empty, refills ten times faster.
    let large = caller("growing", Some(1_000), None);
    assert_eq!(
        limiter.admit(&large, 1).unwrap_err().retry_after(),
        Duration::from_millis(60)
    );
    let unlimited = caller("growing", None, None);
    let _free = limiter.admit(&unlimited, 1_000_000).unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_error_names_the_caller_and_nothing_else_about_it() {
    let limiter = TokenLimiter::new();
    let mut service = json_instance(&limiter, &Calls::default());
    let search = caller("search-team", Some(1_000), None);
    let with_key = |estimate, used| {
        let mut request = request(Some(&search), estimate, Some(used));
        request
            .headers_mut()
            .insert("api-key", "secret-key-7f3a".parse().unwrap());
        request
    };
    send_admitted(&mut service, with_key(100, 1_000)).await;
    // 103 tokens at one every 60 ms: 6.18 s.
    let refused = refusal(send(&mut service, with_key(103, 103)).await);
    assert_eq!(
        refused.to_string(),
        r#"caller "search-team" is over its 1000 tokens per minute; retry after 6.2 s"#
    );
    let debug = format!("{refused:?}");
    assert!(debug.contains("search-team"), "{debug}");
    assert!(!debug.contains("secret"), "{debug}");
    assert!(!refused.to_string().contains("secret"));
}

#[tokio::test(start_paused = true)]
async fn tokens_charged_outside_an_answer_count_against_the_minute() {
    let limiter = TokenLimiter::new();
    let team = caller("realtime-team", Some(1_000), None);
    // A Realtime session's responses, as each reports its usage.
    limiter.charge(&team, 600);
    limiter.charge(&team, 300);
    let refused = limiter.admit(&team, 150).unwrap_err();
    assert_eq!(refused.retry_after(), Duration::from_secs(3));
    tokio::time::advance(Duration::from_secs(3)).await;
    drop(limiter.admit(&team, 150).unwrap());
    // No limit, no charge: nothing remembered.
    let free = caller("free", None, None);
    limiter.charge(&free, 1_000_000);
    drop(limiter.admit(&free, 1_000_000).unwrap());
}
