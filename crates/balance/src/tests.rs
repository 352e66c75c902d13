use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceExt, service_fn};

use super::*;

/// A backend answering with the status stored in `status` (shared so a test can change it).
fn backend(
    status: Arc<AtomicU16>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send> + Clone
{
    service_fn(move |_req: Request<()>| {
        let status = StatusCode::from_u16(status.load(Ordering::Relaxed)).unwrap();
        async move {
            let mut response = Response::new(());
            *response.status_mut() = status;
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("20"));
            }
            Ok(response)
        }
    })
}

fn statuses(n: usize) -> Vec<Arc<AtomicU16>> {
    (0..n).map(|_| Arc::new(AtomicU16::new(200))).collect()
}

fn balance_of(
    statuses: &[Arc<AtomicU16>],
) -> Balance<
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send> + Clone,
> {
    Balance::new(
        statuses
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("b{i}"), backend(s.clone()))),
    )
}

async fn served_by<S>(balance: &Balance<S>, request: Request<()>) -> Result<String, BoxError>
where
    Balance<S>: Service<Request<()>, Response = Response<()>, Error = BoxError>,
{
    let response = balance.clone().oneshot(request).await?;
    Ok(response
        .extensions()
        .get::<ServedBy>()
        .unwrap()
        .name()
        .to_owned())
}

#[tokio::test]
async fn sequential_requests_alternate_strictly() {
    let s = statuses(3);
    let balance = balance_of(&s);
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(served_by(&balance, Request::new(())).await.unwrap());
    }
    assert_eq!(names, ["b0", "b1", "b2", "b0", "b1", "b2"]);
}

#[tokio::test]
async fn tried_backends_are_skipped_while_another_is_available() {
    let s = statuses(3);
    let balance = balance_of(&s);
    for _ in 0..9 {
        let mut tried = TriedBackends::new();
        tried.insert(0);
        tried.insert(1);
        let mut request = Request::new(());
        request.extensions_mut().insert(tried);
        assert_eq!(served_by(&balance, request).await.unwrap(), "b2");
    }
}

#[tokio::test]
async fn when_all_were_tried_rotation_goes_on_after_the_last() {
    let s = statuses(3);
    let balance = balance_of(&s);
    let mut tried = TriedBackends::new();
    tried.insert(0);
    tried.insert(2);
    tried.insert(1);
    let mut request = Request::new(());
    request.extensions_mut().insert(tried);
    assert_eq!(served_by(&balance, request).await.unwrap(), "b2");
}

#[tokio::test(start_paused = true)]
async fn a_throttled_backend_cools_down_for_its_retry_after() {
    let s = statuses(2);
    let balance = balance_of(&s);
    s[0].store(429, Ordering::Relaxed);
    let first = balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    s[0].store(200, Ordering::Relaxed);

    let snapshot = balance.snapshot();
    assert_eq!(snapshot[0].cooling_down_for, Some(Duration::from_secs(20)));
    assert_eq!(snapshot[0].throttled, 1);
    for _ in 0..4 {
        assert_eq!(served_by(&balance, Request::new(())).await.unwrap(), "b1");
    }
    tokio::time::advance(Duration::from_secs(20)).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(served_by(&balance, Request::new(())).await.unwrap());
    }
    assert_eq!(names.iter().filter(|n| *n == "b0").count(), 2, "{names:?}");
}

#[tokio::test(start_paused = true)]
async fn all_cooling_fails_at_once_with_the_soonest_recovery() {
    let s = statuses(2);
    let balance = Balance::with_policy(
        s.iter()
            .enumerate()
            .map(|(i, s)| (format!("b{i}"), backend(s.clone()))),
        HealthPolicy {
            max_cooldown: Duration::from_secs(15),
            ..HealthPolicy::new()
        },
        AzureOpenAiClassifier,
    );
    s[0].store(429, Ordering::Relaxed);
    s[1].store(429, Ordering::Relaxed);
    balance.clone().oneshot(Request::new(())).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    balance.clone().oneshot(Request::new(())).await.unwrap();

    let error = balance.clone().oneshot(Request::new(())).await.unwrap_err();
    let cooling = error
        .downcast_ref::<AllCoolingDown>()
        .expect("AllCoolingDown");
    // b0 was capped at 15 s and has 10 s left; b1 has 15 s left.
    assert_eq!(cooling.retry_after(), Duration::from_secs(10));
    assert_eq!(
        balance.snapshot().iter().map(|b| b.attempts).sum::<u64>(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn server_errors_cool_down_after_the_threshold_and_success_resets() {
    let s = statuses(1);
    let balance = balance_of(&s);
    s[0].store(500, Ordering::Relaxed);
    for _ in 0..2 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(balance.snapshot()[0].cooling_down_for, None);
    assert_eq!(balance.snapshot()[0].consecutive_failures, 2);
    s[0].store(200, Ordering::Relaxed);
    balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(balance.snapshot()[0].consecutive_failures, 0);
    s[0].store(503, Ordering::Relaxed);
    for _ in 0..3 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    assert_eq!(
        balance.snapshot()[0].cooling_down_for,
        Some(Duration::from_secs(10))
    );
}

#[tokio::test(start_paused = true)]
async fn errors_name_their_backend_and_timeouts_cool_down_at_once() {
    let failing = service_fn(|_req: Request<()>| async {
        Err::<Response<()>, BoxError>(Box::new(tower::timeout::error::Elapsed::new()))
    });
    let balance = Balance::new([("slow", failing)]);
    let error = balance.clone().oneshot(Request::new(())).await.unwrap_err();
    let backend_error = error.downcast_ref::<BackendError>().expect("BackendError");
    assert_eq!(backend_error.served_by().name(), "slow");
    assert_eq!(error.to_string(), "backend slow: request timed out");
    assert_eq!(
        balance.snapshot()[0].cooling_down_for,
        Some(Duration::from_secs(10))
    );
}

#[tokio::test]
async fn no_backends_is_an_error_not_a_panic() {
    let balance: Balance<tower::util::BoxCloneService<Request<()>, Response<()>, Infallible>> =
        Balance::new(Vec::<(String, _)>::new());
    let error = balance.oneshot(Request::new(())).await.unwrap_err();
    assert!(error.is::<NoBackends>());
}

#[tokio::test]
async fn readiness_is_driven_per_call_with_tower_test_mocks() {
    let (mock_a, mut handle_a) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let (mock_b, mut handle_b) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut balance = Balance::new([("a", mock_a), ("b", mock_b)]);
    handle_b.allow(0);
    let a = tokio::spawn(balance.call(Request::new(())));
    let (_, send) = handle_a.next_request().await.unwrap();
    send.send_response(Response::new(()));
    assert_eq!(
        a.await
            .unwrap()
            .unwrap()
            .extensions()
            .get::<ServedBy>()
            .unwrap()
            .name(),
        "a"
    );
    let b = tokio::spawn(balance.call(Request::new(())));
    handle_b.allow(1);
    let (_, send) = handle_b.next_request().await.unwrap();
    send.send_response(Response::new(()));
    assert_eq!(
        b.await
            .unwrap()
            .unwrap()
            .extensions()
            .get::<ServedBy>()
            .unwrap()
            .index(),
        1
    );
}
