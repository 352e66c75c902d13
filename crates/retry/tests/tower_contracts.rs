//! Tower's contracts through `RetryNextBackend` over `Balance`: limits inside each backend's
//! stack (`ConcurrencyLimit`, `Buffer`, `Timeout`, `RateLimit`) hold under concurrent callers,
//! and every call completes. On tokio's paused clock; every wait is bounded.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_balance::{Balance, ServedBy};
use aoai_retry::{ReplayBody, RetryNextBackendLayer};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// How many callers call at once.
const CALLERS: usize = 8;

/// One backend's record of its calls: how many are in flight, the most ever in flight, and when
/// each started.
#[derive(Debug, Clone, Default)]
struct Probe {
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<Instant>>>,
}

impl Probe {
    /// The backend itself: reads the body, answers 200 after 50 ms, recording the call.
    fn service(
        &self,
    ) -> impl Service<Request<ReplayBody>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + use<> {
        let probe = self.clone();
        service_fn(move |request: Request<ReplayBody>| {
            let probe = probe.clone();
            async move {
                let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                probe.most_in_flight.fetch_max(now, Ordering::SeqCst);
                probe.starts.lock().unwrap().push(Instant::now());
                let Ok(body) = request.into_body().collect().await;
                assert_eq!(body.to_bytes(), "{}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                probe.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(Response::new(()))
            }
        })
    }

    fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    fn calls(&self) -> usize {
        self.starts.lock().unwrap().len()
    }

    /// The most calls that started within `window` of one another.
    fn most_calls_within(&self, window: Duration) -> usize {
        let starts = self.starts.lock().unwrap();
        starts
            .iter()
            .map(|&from| {
                starts
                    .iter()
                    .filter(|&&at| at >= from && at < from + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

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

/// `callers` calls at once through clones of `service`; waits (at most 10 s) for every one to
/// complete, and returns which backend served each.
async fn call_at_once<S>(service: S, callers: usize) -> Vec<usize>
where
    S: Service<Request<Full<Bytes>>, Response = Response<()>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let calls: Vec<_> = (0..callers)
        .map(|_| {
            let request = Request::post("/openai/deployments/gpt-4o/chat/completions")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            tokio::spawn(service.clone().oneshot(request))
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut served = Vec::new();
        for call in calls {
            let response = call.await.unwrap().expect("every call succeeds");
            served.push(response.extensions().get::<ServedBy>().unwrap().index());
        }
        served
    })
    .await
    .expect("every call completes within 10 s")
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_in_each_backend_holds_and_every_call_completes() {
    let (probes, service) = retry_over_balance(|probe| {
        ServiceBuilder::new()
            .concurrency_limit(1)
            .service(probe.service())
    });
    let served = call_at_once(service, CALLERS).await;
    assert_eq!(served.len(), CALLERS);
    for probe in &probes {
        assert_eq!(probe.calls(), CALLERS / 2);
        assert_eq!(probe.most_in_flight(), 1);
    }
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
    assert_eq!(served.len(), CALLERS);
    for probe in &probes {
        assert_eq!(probe.calls(), CALLERS / 2);
        assert_eq!(probe.most_in_flight(), 1);
    }
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
    assert_eq!(served.len(), CALLERS);
    for probe in &probes {
        assert_eq!(probe.calls(), CALLERS / 2);
        assert_eq!(probe.most_in_flight(), 1);
    }
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
