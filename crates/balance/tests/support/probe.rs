//! A probed backend and concurrent callers, for the tower-contract tests of aoai-balance and
//! aoai-retry (which includes this file by path).

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_balance::ServedBy;
use http::{Request, Response};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt, service_fn};

/// How many callers call at once.
pub const CALLERS: usize = 8;

/// One backend's record of its calls: how many are in flight, the most ever in flight, and when
/// each started.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<Instant>>>,
}

impl Probe {
    /// The backend itself: answers 200 after 50 ms, recording the call.
    pub fn service<B: Send + 'static>(
        &self,
    ) -> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + use<B> {
        let probe = self.clone();
        service_fn(move |_request: Request<B>| {
            let probe = probe.clone();
            async move {
                let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                probe.most_in_flight.fetch_max(now, Ordering::SeqCst);
                probe.starts.lock().unwrap().push(Instant::now());
                tokio::time::sleep(Duration::from_millis(50)).await;
                probe.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(Response::new(()))
            }
        })
    }

    pub fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> usize {
        self.starts.lock().unwrap().len()
    }

    /// The most calls that started within `window` of one another.
    pub fn most_calls_within(&self, window: Duration) -> usize {
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

/// `callers` calls at once, each of a `request()`, through clones of `service`; waits (at most
/// 10 s) for every one to complete, and returns which backend served each.
pub async fn call_at_once<S, B>(
    service: S,
    callers: usize,
    request: impl Fn() -> Request<B>,
) -> Vec<usize>
where
    S: Service<Request<B>, Response = Response<()>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let calls: Vec<_> = (0..callers)
        .map(|_| tokio::spawn(service.clone().oneshot(request())))
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

/// Every one of `callers` calls was served, each of the two backends took half of them, and
/// neither ever had more than one in flight.
pub fn assert_served_one_at_a_time(probes: &[Probe; 2], served: &[usize], callers: usize) {
    assert_eq!(served.len(), callers);
    for probe in probes {
        assert_eq!(probe.calls(), callers / 2);
        assert_eq!(probe.most_in_flight(), 1);
    }
}
