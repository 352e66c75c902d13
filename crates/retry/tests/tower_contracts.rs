//! Tower's contracts through `RetryNextBackend` over `Balance`: limits inside each backend's
//! stack (`ConcurrencyLimit`, `Buffer`, `Timeout`, `RateLimit`) hold under concurrent callers,
//! and every call completes. On tokio's paused clock; every wait is bounded.

#[path = "../../balance/tests/support/probe.rs"]
mod probe;

use std::time::Duration;

use aoai_balance::Balance;
use aoai_retry::RetryNextBackendLayer;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use probe::{CALLERS, Probe, assert_served_one_at_a_time};
use tower::{Layer, ServiceBuilder};

/// Two probed backends, each behind the stack `stack` builds, under one `Balance`, under the
/// retry layer.
fn retry_over_balance<S>(
    stack: impl Fn(&Probe) -> S,
) -> ([Probe; 2], aoai_retry::RetryNextBackendService<Balance<S>>) {
    let probes = [Probe::default(), Probe::default()];
    let balance = Balance::new([("b0", stack(&probes[0])), ("b1", stack(&probes[1]))]);
    let service = RetryNextBackendLayer::new(balance.health()).layer(balance);
    (probes, service)
}

/// A chat request with a small body, as callers send.
fn chat() -> Request<Full<Bytes>> {
    Request::post("/openai/deployments/gpt-4o/chat/completions")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// [`probe::call_at_once`] with chat requests.
async fn call_at_once<S>(service: S, callers: usize) -> Vec<usize>
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<()>, Error = tower::BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    probe::call_at_once(service, callers, chat).await
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_in_each_backend_holds_and_every_call_completes() {
    let (probes, service) = retry_over_balance(|probe| {
        ServiceBuilder::new()
            .concurrency_limit(1)
            .service(probe.service())
    });
    let served = call_at_once(service, CALLERS).await;
    assert_served_one_at_a_time(&probes, &served, CALLERS);
}

#[tokio::test(start_paused = true)]
async fn a_buffer_in_front_of_the_limit_holds_it_and_every_call_completes() {
    let (probes, service) = retry_over_balance(|probe| {
        ServiceBuilder::new()
            .buffer(CALLERS)
            .concurrency_limit(1)
            .service(probe.service())
    });
    let served = call_at_once(service, CALLERS).await;
    assert_served_one_at_a_time(&probes, &served, CALLERS);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_over_the_limit_times_only_the_call_and_every_call_completes() {
    // The calls queue for 150 ms at most before the limit lets them in; each takes 50 ms, well
    // within the timeout, which starts when the backend is called, not while it is awaited. A
    // timeout would show as a retry: more calls than callers.
    let (probes, service) = retry_over_balance(|probe| {
        ServiceBuilder::new()
            .timeout(Duration::from_millis(100))
            .concurrency_limit(1)
            .service(probe.service())
    });
    let served = call_at_once(service, CALLERS).await;
    assert_served_one_at_a_time(&probes, &served, CALLERS);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_in_each_backend_holds_and_every_call_completes() {
    // `RateLimit` is not `Clone`: a `Buffer` in front shares one among the clones `Balance`
    // calls.
    let (probes, service) = retry_over_balance(|probe| {
        ServiceBuilder::new()
            .buffer(2 * CALLERS)
            .rate_limit(2, Duration::from_millis(100))
            .service(probe.service())
    });
    let served = call_at_once(service, 2 * CALLERS).await;
    assert_eq!(served.len(), 2 * CALLERS);
    for probe in &probes {
        assert_eq!(probe.calls(), CALLERS);
        assert_eq!(probe.most_calls_within(Duration::from_millis(100)), 2);
    }
}
