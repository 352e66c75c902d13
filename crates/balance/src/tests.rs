use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceExt, service_fn};

use super::*;
use crate::health::{Admission, Attempt};

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

// Trial re-admission (half-open).

/// What a [`Fake`] backend does with each request.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Answer this status at once (429s ask for `retry-after: 20`).
    Status(u16),
    /// Answer 429 asking for this many seconds.
    Throttle(u64),
    /// Fail as a refused connection.
    Connect,
    /// Never answer.
    Hang,
    /// Answer this status once the test adds a permit to `release`.
    Held(u16),
}

/// An in-memory backend whose behaviour a test changes, counting the requests it gets.
#[derive(Clone)]
struct Fake {
    mode: Arc<std::sync::Mutex<Mode>>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Fake {
    fn new() -> Self {
        Self {
            mode: Arc::new(std::sync::Mutex::new(Mode::Status(200))),
            calls: Arc::default(),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(&self) -> FakeService {
        let fake = self.clone();
        FakeService::new(service_fn(move |_req: Request<()>| {
            fake.calls.fetch_add(1, Ordering::SeqCst);
            let mode = *fake.mode.lock().unwrap();
            let release = fake.release.clone();
            async move {
                let status = match mode {
                    Mode::Status(status) => status,
                    Mode::Throttle(secs) => {
                        let mut response = Response::new(());
                        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        response
                            .headers_mut()
                            .insert("retry-after", http::HeaderValue::from(secs));
                        return Ok(response);
                    }
                    Mode::Connect => {
                        return Err(Box::new(std::io::Error::from(
                            std::io::ErrorKind::ConnectionRefused,
                        )) as BoxError);
                    }
                    Mode::Hang => std::future::pending().await,
                    Mode::Held(status) => {
                        release.acquire().await.unwrap().forget();
                        status
                    }
                };
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                if status == 429 {
                    response
                        .headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static("20"));
                }
                Ok(response)
            }
        }))
    }
}

type FakeService = tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>;

/// A balance over `n` fakes, each behind an attempt timeout of `timeout` if given.
fn fakes(
    n: usize,
    policy: HealthPolicy,
    timeout: Option<Duration>,
) -> (Vec<Fake>, Balance<FakeService>) {
    let fakes: Vec<Fake> = (0..n).map(|_| Fake::new()).collect();
    let balance = Balance::with_policy(
        fakes.iter().enumerate().map(|(i, fake)| {
            let service = match timeout {
                Some(timeout) => {
                    FakeService::new(tower::timeout::Timeout::new(fake.service(), timeout))
                }
                None => fake.service(),
            };
            (format!("b{i}"), service)
        }),
        policy,
        AzureOpenAiClassifier,
    );
    (fakes, balance)
}

/// Starts `n` requests at once, each on a task of its own, and lets them reach their backend.
async fn burst(
    balance: &Balance<FakeService>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<Response<()>, BoxError>>> {
    let tasks = (0..n)
        .map(|_| tokio::spawn(balance.clone().oneshot(Request::new(()))))
        .collect();
    settle().await;
    tasks
}

/// Lets every spawned task run until it waits (no time passes).
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

async fn served_by_fake(balance: &Balance<FakeService>) -> Result<String, BoxError> {
    let response = balance.clone().oneshot(Request::new(())).await?;
    Ok(response
        .extensions()
        .get::<ServedBy>()
        .unwrap()
        .name()
        .to_owned())
}

#[tokio::test(start_paused = true)]
async fn after_its_cooldown_a_failed_backend_gets_one_trial_among_8_concurrent_callers() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    f[0].set(Mode::Connect);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(balance.snapshot()[0].state, BackendState::Cooling);
    assert_eq!(f[0].calls(), 1);

    tokio::time::advance(Duration::from_secs(10)).await;
    f[0].set(Mode::Held(200));
    let trial_and_others = burst(&balance, 8).await;
    assert_eq!(f[0].calls(), 2, "exactly one trial");
    assert_eq!(f[1].calls(), 7);
    assert_eq!(
        balance.snapshot()[0].state,
        BackendState::Trial { in_flight: true }
    );
    // More callers while the trial is in flight: none reaches b0.
    let more = burst(&balance, 8).await;
    assert_eq!(f[0].calls(), 2);
    assert_eq!(f[1].calls(), 15);

    f[0].release.add_permits(1);
    for task in trial_and_others.into_iter().chain(more) {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(balance.snapshot()[0].state, BackendState::Available);

    // Re-admitted: its round-robin share again, concurrently too.
    f[0].set(Mode::Status(200));
    for task in burst(&balance, 8).await {
        task.await.unwrap().unwrap();
    }
    assert_eq!(f[0].calls(), 2 + 4);
    assert_eq!(f[1].calls(), 15 + 4);
}

#[tokio::test(start_paused = true)]
async fn a_hung_backend_gets_one_request_per_readmission() {
    let attempt_timeout = Duration::from_secs(2);
    let (f, balance) = fakes(2, HealthPolicy::new(), Some(attempt_timeout));
    f[0].set(Mode::Hang);
    // A burst finds it hung: the first 4 requests to it time out together.
    let first = burst(&balance, 8).await;
    assert_eq!(f[0].calls(), 4);
    for task in first {
        task.await.unwrap().ok();
    }
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.state, BackendState::Cooling);
    assert_eq!(snapshot.cooling_reason, Some("timeout"));
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(10)));

    // Each re-admission: 8 callers every 100 ms through the trial's 2 s; b0 gets only the
    // trial, which times out and cools it again, for twice as long each time.
    for failed_trials in 1..=4u32 {
        let calls = f[0].calls();
        let left = balance.snapshot()[0].cooling_down_for.unwrap();
        tokio::time::sleep(left).await;
        let mut tasks = Vec::new();
        for _ in 0..19 {
            tasks.extend(burst(&balance, 8).await);
            assert_eq!(
                balance.snapshot()[0].state,
                BackendState::Trial { in_flight: true }
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for task in tasks {
            task.await.unwrap().ok();
        }
        assert_eq!(f[0].calls(), calls + 1, "re-admission {failed_trials}");
        let snapshot = &balance.snapshot()[0];
        assert_eq!(snapshot.state, BackendState::Cooling);
        assert_eq!(snapshot.cooling_reason, Some("timeout"));
        assert_eq!(snapshot.failed_trials, failed_trials);
        assert_eq!(
            snapshot.cooling_down_for,
            Some(Duration::from_secs(10 << failed_trials))
        );
    }
    // Every other request went to b1.
    assert_eq!(f[1].calls(), 4 + 4 * (19 * 8 - 1));
}

/// Sleeps until backend `index` of `balance` is done cooling down.
async fn until_cooled(balance: &Balance<FakeService>, index: usize) {
    let left = balance.snapshot()[index]
        .cooling_down_for
        .expect("cooling down");
    tokio::time::sleep(left).await;
}

#[tokio::test(start_paused = true)]
async fn a_successful_trial_readmits_the_backend_and_resets_its_cooldown() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    f[0].set(Mode::Connect);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    until_cooled(&balance, 0).await;
    // A failed trial: 20 s.
    while f[0].calls() < 2 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(20)));
    assert_eq!(
        (snapshot.failed_trials, snapshot.consecutive_failures),
        (1, 2)
    );

    until_cooled(&balance, 0).await;
    f[0].set(Mode::Status(200));
    let mut names = Vec::new();
    for _ in 0..8 {
        names.push(served_by_fake(&balance).await.unwrap());
    }
    // The trial, then its round-robin share.
    assert_eq!(names.iter().filter(|n| *n == "b0").count(), 4, "{names:?}");
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.state, BackendState::Available);
    assert_eq!(
        (snapshot.failed_trials, snapshot.consecutive_failures),
        (0, 0)
    );
    assert_eq!(snapshot.cooling_reason, None);

    // Re-admitted, it starts over: the next failure cools it for the base 10 s.
    f[0].set(Mode::Connect);
    while f[0].calls() < 7 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    assert_eq!(
        balance.snapshot()[0].cooling_down_for,
        Some(Duration::from_secs(10))
    );
}

#[tokio::test(start_paused = true)]
async fn failed_trials_double_the_cooldown_up_to_the_cap() {
    let policy = HealthPolicy {
        max_cooldown: Duration::from_secs(45),
        ..HealthPolicy::new()
    };
    let (f, balance) = fakes(1, policy, None);
    f[0].set(Mode::Status(503));
    // Three 503s in a row cool it down...
    for _ in 0..3 {
        balance.clone().oneshot(Request::new(())).await.unwrap();
    }
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(10)));
    assert_eq!(snapshot.cooling_reason, Some("failed"));
    // ... and one failed trial (a single 503) cools it again at once, twice as long each time.
    for (failed_trials, cooldown) in [(1, 20), (2, 40), (3, 45), (4, 45)] {
        let error = balance.clone().oneshot(Request::new(())).await.unwrap_err();
        assert!(error.is::<AllCoolingDown>(), "{error}");
        until_cooled(&balance, 0).await;
        let response = balance.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let snapshot = &balance.snapshot()[0];
        assert_eq!(snapshot.state, BackendState::Cooling);
        assert_eq!(snapshot.failed_trials, failed_trials);
        assert_eq!(
            snapshot.cooling_down_for,
            Some(Duration::from_secs(cooldown))
        );
    }
    assert_eq!(f[0].calls(), 3 + 4);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_trial_keeps_its_retry_after() {
    let (f, balance) = fakes(1, HealthPolicy::new(), None);
    f[0].set(Mode::Throttle(7));
    balance.clone().oneshot(Request::new(())).await.unwrap();
    let cooling = |b: &Balance<FakeService>| b.snapshot()[0].cooling_down_for;
    assert_eq!(cooling(&balance), Some(Duration::from_secs(7)));
    assert_eq!(balance.snapshot()[0].cooling_reason, Some("throttled"));

    // A 429 trial: the same 7 s, not doubled.
    until_cooled(&balance, 0).await;
    balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(cooling(&balance), Some(Duration::from_secs(7)));
    assert_eq!(balance.snapshot()[0].failed_trials, 0);

    // A failed trial doubles the failure cooldown; a 429 trial after it keeps its own wait
    // (capped at `max_cooldown`), and leaves the count of failed trials alone.
    until_cooled(&balance, 0).await;
    f[0].set(Mode::Connect);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(cooling(&balance), Some(Duration::from_secs(20)));
    until_cooled(&balance, 0).await;
    f[0].set(Mode::Throttle(3));
    balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(cooling(&balance), Some(Duration::from_secs(3)));
    until_cooled(&balance, 0).await;
    f[0].set(Mode::Throttle(86400));
    balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(cooling(&balance), Some(Duration::from_secs(300)));
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.failed_trials, 1);
    assert_eq!(snapshot.cooling_reason, Some("throttled"));
    assert_eq!(f[0].calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_trial_releases_its_slot() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    f[0].set(Mode::Connect);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    until_cooled(&balance, 0).await;
    f[0].set(Mode::Hang);
    let state = |b: &Balance<FakeService>| b.snapshot()[0].state;

    // A trial whose caller goes away while b0 hangs.
    let mut trial = None;
    while trial.is_none() {
        let task = tokio::spawn(balance.clone().oneshot(Request::new(())));
        settle().await;
        if task.is_finished() {
            task.await.unwrap().unwrap();
        } else {
            trial = Some(task);
        }
    }
    assert_eq!(f[0].calls(), 2);
    assert_eq!(state(&balance), BackendState::Trial { in_flight: true });
    trial.unwrap().abort();
    settle().await;
    assert_eq!(state(&balance), BackendState::Trial { in_flight: false });

    // A trial claimed by `call` and dropped unpolled (two calls: one of them is b0's).
    let mut service = balance.clone();
    let mut claimed = 0;
    for _ in 0..2 {
        let call = service.call(Request::new(()));
        if state(&balance) == (BackendState::Trial { in_flight: true }) {
            claimed += 1;
        }
        drop(call);
        assert_eq!(state(&balance), BackendState::Trial { in_flight: false });
    }
    assert_eq!(claimed, 1);
    assert_eq!(f[0].calls(), 2, "an unpolled call sends nothing");

    // The next request to b0 is the trial, and re-admits it.
    f[0].set(Mode::Status(200));
    while f[0].calls() < 3 {
        served_by_fake(&balance).await.unwrap();
    }
    assert_eq!(state(&balance), BackendState::Available);
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_each_state() {
    let policy = HealthPolicy {
        failure_threshold: 1,
        ..HealthPolicy::new()
    };
    let (f, balance) = fakes(5, policy, Some(Duration::from_secs(2)));
    f[0].set(Mode::Connect);
    f[1].set(Mode::Status(429));
    f[2].set(Mode::Status(500));
    f[3].set(Mode::Hang);
    let snapshot = balance.snapshot();
    assert!(snapshot.iter().all(|b| b.state == BackendState::Available
        && b.cooling_reason.is_none()
        && b.cooling_down_for.is_none()));
    assert_eq!(snapshot[0].state.to_string(), "available");

    // One request each; b3's times out after 2 s.
    for task in burst(&balance, 5).await {
        let _ = task.await.unwrap();
    }
    let view = |b: &Balance<FakeService>| {
        b.snapshot()
            .into_iter()
            .map(|b| {
                (
                    b.state,
                    b.cooling_reason,
                    b.cooling_down_for.map(|d| d.as_secs()),
                )
            })
            .collect::<Vec<_>>()
    };
    let cooling = BackendState::Cooling;
    assert_eq!(
        view(&balance),
        [
            (cooling, Some("connect"), Some(8)),
            (cooling, Some("throttled"), Some(18)),
            (cooling, Some("failed"), Some(8)),
            (cooling, Some("timeout"), Some(10)),
            (BackendState::Available, None, None),
        ]
    );
    assert_eq!(cooling.to_string(), "cooling");

    tokio::time::advance(Duration::from_secs(8)).await;
    let waiting = BackendState::Trial { in_flight: false };
    assert_eq!(view(&balance)[0], (waiting, Some("connect"), None));
    assert_eq!(view(&balance)[2], (waiting, Some("failed"), None));
    assert_eq!(waiting.to_string(), "trial");

    // b0's trial is held; b2's succeeds.
    f[0].set(Mode::Held(200));
    f[2].set(Mode::Status(200));
    let tasks = burst(&balance, 5).await;
    let in_flight = BackendState::Trial { in_flight: true };
    assert_eq!(
        view(&balance),
        [
            (in_flight, Some("connect"), None),
            (cooling, Some("throttled"), Some(10)),
            (BackendState::Available, None, None),
            (cooling, Some("timeout"), Some(2)),
            (BackendState::Available, None, None),
        ]
    );
    assert_eq!(in_flight.to_string(), "trial");
    f[0].release.add_permits(1);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(view(&balance)[0], (BackendState::Available, None, None));
}

#[tokio::test(start_paused = true)]
async fn with_every_other_backend_cooling_a_trial_in_flight_answers_at_once_with_a_short_wait() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    let health = balance.health();
    f[0].set(Mode::Connect);
    f[1].set(Mode::Throttle(60));
    for _ in 0..2 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    let error = balance.clone().oneshot(Request::new(())).await.unwrap_err();
    let cooling = error.downcast_ref::<AllCoolingDown>().unwrap();
    assert_eq!(cooling.retry_after(), Duration::from_secs(10));
    assert_eq!(health.soonest_recovery(), Some(Duration::from_secs(10)));

    // On trial, no trial in flight: it takes a request.
    tokio::time::advance(Duration::from_secs(10)).await;
    let mut tried = TriedBackends::new();
    assert_eq!(health.soonest_recovery(), None);
    assert!(health.has_untried_available(&tried));
    tried.insert(0);
    assert!(!health.has_untried_available(&tried));

    // Its trial in flight: nothing takes a request; callers are answered at once, told to come
    // back in `TRIAL_RETRY_AFTER`, and the backend gets nothing more.
    f[0].set(Mode::Held(200));
    let trial = burst(&balance, 1).await;
    assert_eq!(health.soonest_recovery(), Some(TRIAL_RETRY_AFTER));
    assert!(!health.has_untried_available(&TriedBackends::new()));
    for _ in 0..4 {
        let error = balance.clone().oneshot(Request::new(())).await.unwrap_err();
        let cooling = error.downcast_ref::<AllCoolingDown>().unwrap();
        assert_eq!(cooling.retry_after(), TRIAL_RETRY_AFTER);
    }
    assert_eq!((f[0].calls(), f[1].calls()), (2, 1));

    // A cooling backend that recovers sooner than that is the one named.
    tokio::time::advance(Duration::from_millis(49_500)).await;
    assert_eq!(health.soonest_recovery(), Some(Duration::from_millis(500)));

    f[0].set(Mode::Status(200));
    f[0].release.add_permits(1);
    for task in trial {
        task.await.unwrap().unwrap();
    }
    assert_eq!(health.soonest_recovery(), None);
    assert_eq!(served_by_fake(&balance).await.unwrap(), "b0");
}

#[test]
fn one_of_many_threads_claims_the_trial() {
    for _ in 0..200 {
        let health = BackendHealth::new("b0".into(), 1, 1, None);
        let clock = Clock::new();
        let policy = HealthPolicy {
            failure_cooldown: Duration::ZERO,
            ..HealthPolicy::new()
        };
        health.observe(
            0,
            &Outcome::Failed(Failure::Connect),
            &policy,
            &clock,
            Attempt::default(),
        );
        let barrier = std::sync::Barrier::new(8);
        let trials = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        (0..100)
                            .filter(|_| health.admit(|| clock.now()) == Admission::Trial)
                            .count()
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(trials, 1);
        assert!(!health.is_available(|| clock.now()));
        health.release_trial();
        assert!(health.is_available(|| clock.now()));
    }
}

// Priority tiers and weights.

/// A balance over fakes given as `(priority, weight)`, named b0, b1, ...
fn tiered(specs: &[(u32, u32)], policy: HealthPolicy) -> (Vec<Fake>, Balance<FakeService>) {
    let fakes: Vec<Fake> = specs.iter().map(|_| Fake::new()).collect();
    let balance = Balance::with_backends(
        fakes
            .iter()
            .zip(specs)
            .enumerate()
            .map(|(i, (fake, &(p, w)))| {
                BackendSpec::new(format!("b{i}"), fake.service())
                    .priority(p)
                    .weight(w)
            }),
        policy,
        AzureOpenAiClassifier,
    );
    (fakes, balance)
}

fn calls(fakes: &[Fake]) -> Vec<usize> {
    fakes.iter().map(Fake::calls).collect()
}

async fn sequence(balance: &Balance<FakeService>, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(served_by_fake(balance).await.unwrap());
    }
    names
}

#[tokio::test(start_paused = true)]
async fn tier_one_takes_everything_until_it_cools_then_tier_two_serves_then_tier_one_again() {
    let (f, balance) = tiered(&[(1, 1), (1, 1), (2, 1), (3, 1)], HealthPolicy::new());
    assert_eq!(
        sequence(&balance, 8).await,
        ["b0", "b1", "b0", "b1", "b0", "b1", "b0", "b1"]
    );
    // Concurrent callers too.
    for task in burst(&balance, 8).await {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls(&f), [8, 8, 0, 0]);

    // Tier 1 throttles: once both cool, tier 2 takes everything; tier 3 nothing.
    f[0].set(Mode::Throttle(10));
    f[1].set(Mode::Throttle(10));
    for _ in 0..2 {
        let response = balance.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(
        balance.snapshot()[..2]
            .iter()
            .all(|b| b.state == BackendState::Cooling)
    );
    assert!(sequence(&balance, 8).await.iter().all(|n| n == "b2"));
    for task in burst(&balance, 8).await {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls(&f), [9, 9, 16, 0]);

    // Tier 1 recovers: its trials are the next two requests, then it takes everything again.
    tokio::time::advance(Duration::from_secs(10)).await;
    f[0].set(Mode::Status(200));
    f[1].set(Mode::Status(200));
    let names = sequence(&balance, 8).await;
    assert!(names.iter().all(|n| n == "b0" || n == "b1"), "{names:?}");
    assert_eq!(calls(&f), [13, 13, 16, 0]);
    assert!(
        balance.snapshot()[..2]
            .iter()
            .all(|b| b.state == BackendState::Available)
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_never_goes_to_tier_two_while_tier_one_can_take_it() {
    let (f, balance) = tiered(&[(1, 1), (2, 1)], HealthPolicy::new());
    f[0].set(Mode::Connect);
    balance.clone().oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(sequence(&balance, 4).await, ["b1"; 4]);

    // On trial with no trial in flight, b0 takes the request: the trial, held.
    tokio::time::advance(Duration::from_secs(10)).await;
    f[0].set(Mode::Held(200));
    let trial = burst(&balance, 1).await;
    assert_eq!(calls(&f), [2, 4]);
    // Its trial in flight, b0 takes nothing: tier 2 serves.
    for task in burst(&balance, 8).await {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls(&f), [2, 12]);
    f[0].release.add_permits(1);
    for task in trial {
        task.await.unwrap().unwrap();
    }
    // Re-admitted: tier 1 only, sequential and concurrent.
    f[0].set(Mode::Status(200));
    assert_eq!(sequence(&balance, 4).await, ["b0"; 4]);
    for task in burst(&balance, 8).await {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls(&f), [14, 12]);

    // A backend of tier 1 that failed without cooling (one 500 of 3) still takes requests.
    f[0].set(Mode::Status(500));
    balance.clone().oneshot(Request::new(())).await.unwrap();
    f[0].set(Mode::Status(200));
    assert_eq!(sequence(&balance, 2).await, ["b0"; 2]);
    assert_eq!(calls(&f), [17, 12]);
}

#[tokio::test]
async fn retries_take_untried_backends_in_priority_order() {
    let (_f, balance) = tiered(&[(2, 1), (1, 1), (2, 1), (1, 1)], HealthPolicy::new());
    let with_tried = |indices: &[usize]| {
        let mut tried = TriedBackends::new();
        for &i in indices {
            tried.insert(i);
        }
        let mut request = Request::new(());
        request.extensions_mut().insert(tried);
        request
    };
    // Tier 1 is b1 and b3.
    assert_eq!(
        sequence(&balance, 4).await,
        ["b1", "b3", "b1", "b3"],
        "tier 1 only"
    );
    for _ in 0..4 {
        let name = served_by_fake_with(&balance, with_tried(&[1])).await;
        assert_eq!(name, "b3");
        let name = served_by_fake_with(&balance, with_tried(&[3, 1])).await;
        assert!(name == "b0" || name == "b2", "{name}");
        let name = served_by_fake_with(&balance, with_tried(&[1, 3, 0])).await;
        assert_eq!(name, "b2");
        // Every backend tried: tier 1 again, after the last one tried if it is of tier 1.
        let name = served_by_fake_with(&balance, with_tried(&[0, 2, 3, 1])).await;
        assert_eq!(name, "b3");
        let name = served_by_fake_with(&balance, with_tried(&[0, 1, 3, 2])).await;
        assert!(name == "b1" || name == "b3", "{name}");
    }
}

async fn served_by_fake_with(balance: &Balance<FakeService>, request: Request<()>) -> String {
    let response = balance.clone().oneshot(request).await.unwrap();
    response
        .extensions()
        .get::<ServedBy>()
        .unwrap()
        .name()
        .to_owned()
}

#[tokio::test]
async fn weights_3_to_1_interleave_and_split_exactly() {
    let (f, balance) = tiered(&[(1, 3), (1, 1)], HealthPolicy::new());
    let names = sequence(&balance, 400).await;
    let letters: Vec<&str> = names
        .iter()
        .map(|n| if n == "b0" { "a" } else { "b" })
        .collect();
    assert_eq!(letters[..8], ["a", "a", "b", "a", "a", "a", "b", "a"]);
    assert_eq!(calls(&f), [300, 100]);
    assert!(
        letters.windows(4).all(|w| w.contains(&"b")),
        "never 4 a's in a row"
    );
}

#[tokio::test(start_paused = true)]
async fn a_weighted_backend_that_cannot_take_a_request_is_skipped() {
    let (f, balance) = tiered(&[(1, 2), (1, 1), (1, 1), (2, 5)], HealthPolicy::new());
    assert_eq!(
        sequence(&balance, 8).await,
        ["b0", "b1", "b2", "b0", "b0", "b1", "b2", "b0"]
    );
    f[0].set(Mode::Connect);
    while balance.snapshot()[0].state != BackendState::Cooling {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    let names = sequence(&balance, 8).await;
    assert_eq!(names.iter().filter(|n| *n == "b1").count(), 4, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "b2").count(), 4, "{names:?}");
    assert_eq!(f[3].calls(), 0);
}

// Credentials that fail.

#[tokio::test(start_paused = true)]
async fn a_second_401_in_a_row_cools_the_backend_for_the_credential_cooldown() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    f[0].set(Mode::Status(401));
    // The first 401 is the token-refresh case: b0 stays in rotation.
    assert_eq!(sequence(&balance, 2).await, ["b0", "b1"]);
    assert_eq!(balance.snapshot()[0].state, BackendState::Available);
    // The second, with no success between: out for 5 minutes, reason `credential`.
    assert_eq!(sequence(&balance, 1).await, ["b0"]);
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.state, BackendState::Cooling);
    assert_eq!(snapshot.cooling_reason, Some("credential"));
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(300)));
    assert_eq!(sequence(&balance, 8).await, ["b1"; 8]);
    tokio::time::advance(Duration::from_secs(299)).await;
    assert_eq!(sequence(&balance, 8).await, ["b1"; 8]);
    assert_eq!(f[0].calls(), 2);

    // Its trial answered 401: the credential is still wrong, out again for 5 minutes.
    tokio::time::advance(Duration::from_secs(1)).await;
    while f[0].calls() < 3 {
        sequence(&balance, 1).await;
    }
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.cooling_reason, Some("credential"));
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(300)));
    assert_eq!(snapshot.failed_trials, 0);

    // Fixed: the trial re-admits it.
    tokio::time::advance(Duration::from_secs(300)).await;
    f[0].set(Mode::Status(200));
    let names = sequence(&balance, 4).await;
    assert_eq!(names.iter().filter(|n| *n == "b0").count(), 2, "{names:?}");
    assert_eq!(balance.snapshot()[0].state, BackendState::Available);

    // A success between two 401s resets the count.
    f[0].set(Mode::Status(401));
    sequence(&balance, 2).await;
    f[0].set(Mode::Status(200));
    sequence(&balance, 2).await;
    f[0].set(Mode::Status(401));
    sequence(&balance, 2).await;
    assert_eq!(balance.snapshot()[0].state, BackendState::Available);
    assert_eq!(f[0].calls(), 3 + 2 + 3);
}

#[tokio::test(start_paused = true)]
async fn a_403_cools_the_backend_at_once_for_the_credential_cooldown() {
    let policy = HealthPolicy {
        credential_cooldown: Duration::from_secs(600),
        ..HealthPolicy::new()
    };
    let (f, balance) = tiered(&[(1, 1), (2, 3)], policy);
    f[0].set(Mode::Status(403));
    // The caller sees the 403 (no retry layer here); the backend is out at once.
    let response = balance.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let snapshot = balance.snapshot();
    assert_eq!(snapshot[0].state, BackendState::Cooling);
    assert_eq!(snapshot[0].cooling_reason, Some("credential"));
    assert_eq!(
        snapshot[0].cooling_down_for,
        Some(Duration::from_secs(600)),
        "not capped by max_cooldown"
    );
    assert_eq!(sequence(&balance, 4).await, ["b1"; 4]);
    assert_eq!(calls(&f), [1, 4]);
}

#[test]
fn a_403_is_retryable_elsewhere_only() {
    let outcome =
        AzureOpenAiClassifier.classify_response(StatusCode::FORBIDDEN, &Default::default());
    assert_eq!(outcome, Outcome::Forbidden);
    assert!(!outcome.is_retryable());
    assert!(outcome.is_retryable_elsewhere());
    assert_eq!(outcome.reason(), "forbidden");
    assert!(Outcome::Unauthorized.is_retryable_elsewhere());
    assert!(!Outcome::Final.is_retryable_elsewhere());
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_priority_weight_and_reason() {
    let (f, balance) = tiered(&[(1, 3), (1, 1), (2, 1)], HealthPolicy::new());
    f[1].set(Mode::Status(403));
    let view = |b: &Balance<FakeService>| {
        b.snapshot()
            .into_iter()
            .map(|b| (b.name.to_string(), b.priority, b.weight, b.cooling_reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        view(&balance),
        [
            ("b0".to_owned(), 1, 3, None),
            ("b1".to_owned(), 1, 1, None),
            ("b2".to_owned(), 2, 1, None),
        ]
    );
    sequence(&balance, 3).await;
    assert_eq!(
        view(&balance)[1],
        ("b1".to_owned(), 1, 1, Some("credential"))
    );
    assert_eq!(f[1].calls(), 1);
    let debug = format!("{balance:?}");
    assert!(debug.contains("tiers"), "{debug}");
}

// Per-deployment health and offered deployments.

/// An in-memory backend whose behaviour a test sets per deployment (200 unless set), recording
/// the deployment of each request it gets (`-` for none).
#[derive(Clone, Default)]
struct DFake {
    modes: Arc<std::sync::Mutex<Vec<(String, Mode)>>>,
    calls: Arc<std::sync::Mutex<Vec<String>>>,
}

impl DFake {
    /// Sets the mode for requests for `deployment` (`*`: for every deployment).
    fn set(&self, deployment: &str, mode: Mode) {
        let mut modes = self.modes.lock().unwrap();
        modes.retain(|(d, _)| d != deployment);
        modes.push((deployment.to_owned(), mode));
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn service(&self) -> FakeService {
        let fake = self.clone();
        FakeService::new(service_fn(move |req: Request<()>| {
            let deployment = req
                .extensions()
                .get::<Deployment>()
                .map_or("-".to_owned(), |d| d.as_str().to_owned());
            fake.calls.lock().unwrap().push(deployment.clone());
            let mode = {
                let modes = fake.modes.lock().unwrap();
                let find = |name: &str| modes.iter().find(|(d, _)| d == name).map(|&(_, m)| m);
                find(&deployment)
                    .or_else(|| find("*"))
                    .unwrap_or(Mode::Status(200))
            };
            async move {
                match mode {
                    Mode::Throttle(secs) => {
                        let mut response = Response::new(());
                        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        response
                            .headers_mut()
                            .insert("retry-after", http::HeaderValue::from(secs));
                        Ok(response)
                    }
                    Mode::Connect => Err(Box::new(std::io::Error::from(
                        std::io::ErrorKind::ConnectionRefused,
                    )) as BoxError),
                    Mode::Status(status) => {
                        let mut response = Response::new(());
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok(response)
                    }
                    Mode::Hang | Mode::Held(_) => std::future::pending().await,
                }
            }
        }))
    }
}

/// A balance over backends `a` and `b`, each offering the deployments given (`None`: all).
fn deployed(offers: [Option<&[&str]>; 2]) -> (Vec<DFake>, Balance<FakeService>) {
    let fakes = vec![DFake::default(), DFake::default()];
    let specs = ["a", "b"]
        .into_iter()
        .zip(offers)
        .zip(&fakes)
        .map(|((name, offers), fake)| {
            let spec = BackendSpec::new(name, fake.service());
            match offers {
                Some(offers) => spec.deployments(offers.iter().copied()),
                None => spec,
            }
        });
    let balance = Balance::with_backends(specs, HealthPolicy::new(), AzureOpenAiClassifier);
    (fakes, balance)
}

fn for_deployment(deployment: &str) -> Request<()> {
    let mut request = Request::new(());
    request.extensions_mut().insert(Deployment::new(deployment));
    request
}

/// Which backend served a request for `deployment` (or the error).
async fn serve(balance: &Balance<FakeService>, deployment: &str) -> Result<String, BoxError> {
    let response = balance.clone().oneshot(for_deployment(deployment)).await?;
    Ok(response
        .extensions()
        .get::<ServedBy>()
        .unwrap()
        .name()
        .to_owned())
}

/// Sends requests for `deployment` until backend `b` has answered one (at most 4).
async fn until_b_answers(balance: &Balance<FakeService>, deployment: &str) {
    until_answers(balance, "b", deployment).await;
}

/// Sends requests for `deployment` until backend `backend` has answered one (at most 4).
async fn until_answers(balance: &Balance<FakeService>, backend: &str, deployment: &str) {
    for _ in 0..4 {
        let response = balance.clone().oneshot(for_deployment(deployment)).await;
        let served_by = match &response {
            Ok(response) => response.extensions().get::<ServedBy>().unwrap().clone(),
            Err(error) => error
                .downcast_ref::<BackendError>()
                .unwrap()
                .served_by()
                .clone(),
        };
        if served_by.name() == backend {
            return;
        }
    }
    panic!("{backend} never got a request for {deployment}");
}

#[tokio::test(start_paused = true)]
async fn a_429_on_b_gpt_leaves_b_tiny_flowing_while_gpt_goes_to_a() {
    let (fakes, balance) = deployed([None, None]);
    fakes[1].set("gpt", Mode::Throttle(20));
    until_b_answers(&balance, "gpt").await;
    assert_eq!(fakes[1].calls(), ["gpt"]);

    let mut gpt = Vec::new();
    for _ in 0..4 {
        gpt.push(serve(&balance, "gpt").await.unwrap());
    }
    assert_eq!(gpt, ["a"; 4]);
    let mut tiny = Vec::new();
    for _ in 0..4 {
        tiny.push(serve(&balance, "tiny").await.unwrap());
    }
    assert_eq!(tiny.iter().filter(|n| *n == "b").count(), 2, "{tiny:?}");
    assert_eq!(fakes[1].calls(), ["gpt", "tiny", "tiny"]);
    // B itself stays available; only the pair cools.
    let b = &balance.snapshot()[1];
    assert_eq!(b.state, BackendState::Available);
    assert_eq!(b.cooling_down_for, None);
    assert_eq!(b.throttled, 1);
    // A request for any deployment is not held back by a deployment's cooldown.
    let mut any = Vec::new();
    for _ in 0..2 {
        any.push(served_by_fake(&balance).await.unwrap());
    }
    assert!(any.contains(&"b".to_owned()), "{any:?}");
}

#[tokio::test(start_paused = true)]
async fn the_429s_retry_after_is_honoured_for_the_pair() {
    let (fakes, balance) = deployed([None, None]);
    fakes[1].set("gpt", Mode::Throttle(7));
    until_b_answers(&balance, "gpt").await;
    fakes[1].set("gpt", Mode::Status(200));

    tokio::time::advance(Duration::from_millis(6_900)).await;
    for _ in 0..3 {
        assert_eq!(serve(&balance, "gpt").await.unwrap(), "a");
    }
    tokio::time::advance(Duration::from_millis(100)).await;
    let mut gpt = Vec::new();
    for _ in 0..4 {
        gpt.push(serve(&balance, "gpt").await.unwrap());
    }
    assert_eq!(gpt.iter().filter(|n| *n == "b").count(), 2, "{gpt:?}");
    assert!(balance.snapshot()[1].deployment_cooldowns.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_connect_error_still_cools_b_for_every_deployment() {
    let (fakes, balance) = deployed([None, None]);
    fakes[1].set("*", Mode::Connect);
    until_b_answers(&balance, "gpt").await;
    for _ in 0..3 {
        assert_eq!(serve(&balance, "gpt").await.unwrap(), "a");
        assert_eq!(serve(&balance, "tiny").await.unwrap(), "a");
        assert_eq!(served_by_fake(&balance).await.unwrap(), "a");
    }
    let b = &balance.snapshot()[1];
    assert_eq!(b.state, BackendState::Cooling);
    assert_eq!(b.cooling_reason, Some("connect"));
    assert!(b.deployment_cooldowns.is_empty());
    assert_eq!(fakes[1].calls(), ["gpt"]);
}

/// Quotas are per deployment, and so is the rotation: a caller that sends an embedding then a
/// chat completion, in turn, gets each from both backends (one rotation for all would send
/// every embedding to `a` and every chat completion to `b`).
#[tokio::test]
async fn deployments_requested_in_turn_each_rotate_over_every_backend() {
    let (_fakes, balance) = deployed([None, None]);
    let (mut embeddings, mut chats) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        embeddings.push(serve(&balance, "embedding").await.unwrap());
        chats.push(serve(&balance, "gpt").await.unwrap());
    }
    assert_eq!(embeddings, ["a", "b", "a", "b"]);
    assert_eq!(chats, ["a", "b", "a", "b"]);
}

#[tokio::test]
async fn weighted_deployments_requested_in_turn_each_split_by_the_weights() {
    let (_fakes, balance) = tiered(&[(1, 3), (1, 1)], HealthPolicy::new());
    let (mut embeddings, mut chats) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        for (deployment, served) in [("embedding", &mut embeddings), ("gpt", &mut chats)] {
            served.push(served_by_fake_with(&balance, for_deployment(deployment)).await);
        }
    }
    let interleaved = ["b0", "b0", "b1", "b0", "b0", "b0", "b1", "b0"];
    assert_eq!(embeddings, interleaved);
    assert_eq!(chats, interleaved);
}

/// Deployment names come from callers, so the rotations kept are bounded: past 1,024
/// deployments they start over rather than grow.
#[tokio::test]
async fn past_1024_deployments_the_rotations_start_over() {
    let (_fakes, balance) = deployed([None, None]);
    assert_eq!(serve(&balance, "gpt").await.unwrap(), "a");
    for i in 1..1024 {
        serve(&balance, &format!("d{i}")).await.unwrap();
    }
    assert_eq!(
        serve(&balance, "gpt").await.unwrap(),
        "b",
        "1,024 kept: gpt's went on"
    );
    serve(&balance, "d1024").await.unwrap();
    assert_eq!(serve(&balance, "gpt").await.unwrap(), "a", "started over");
}

#[tokio::test(start_paused = true)]
async fn a_deployment_only_a_offers_never_goes_to_b() {
    let (fakes, balance) = deployed([Some(&["gpt", "tiny"]), Some(&["tiny"])]);
    for _ in 0..6 {
        assert_eq!(serve(&balance, "gpt").await.unwrap(), "a");
    }
    // A retry that has tried A goes back to A, not to B.
    let mut tried = TriedBackends::new();
    tried.insert(0);
    let mut retry = for_deployment("gpt");
    retry.extensions_mut().insert(tried);
    assert_eq!(served_by_fake_with(&balance, retry).await, "a");
    let mut tiny = Vec::new();
    for _ in 0..4 {
        tiny.push(serve(&balance, "tiny").await.unwrap());
    }
    assert_eq!(tiny.iter().filter(|n| *n == "b").count(), 2, "{tiny:?}");
    // With A cooling, a request for gpt has nowhere to go: it is not sent to B.
    fakes[0].set("*", Mode::Connect);
    serve(&balance, "gpt").await.unwrap_err();
    let error = serve(&balance, "gpt").await.unwrap_err();
    let cooling = error.downcast_ref::<AllCoolingDown>().expect("all cooling");
    assert_eq!(cooling.retry_after(), HealthPolicy::new().failure_cooldown);
    assert!(!fakes[1].calls().contains(&"gpt".to_owned()));
    assert_eq!(serve(&balance, "tiny").await.unwrap(), "b");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_deployment_fails_at_once_and_no_backend_is_called() {
    let (fakes, balance) = deployed([Some(&["gpt"]), Some(&["gpt", "tiny"])]);
    let error = serve(&balance, "x").await.unwrap_err();
    let unknown = error
        .downcast_ref::<UnknownDeployment>()
        .expect("unknown deployment");
    assert_eq!(unknown.deployment(), &Deployment::new("x"));
    assert_eq!(error.to_string(), "no backend serves deployment `x`");
    // Also for a retry, and whatever the health.
    let mut retry = for_deployment("x");
    let mut tried = TriedBackends::new();
    tried.insert(1);
    retry.extensions_mut().insert(tried);
    let error = balance.clone().oneshot(retry).await.unwrap_err();
    assert!(error.is::<UnknownDeployment>());
    assert!(fakes[0].calls().is_empty());
    assert!(fakes[1].calls().is_empty());
    // A request for no deployment in particular goes anywhere, as before.
    assert_eq!(served_by_fake(&balance).await.unwrap(), "a");
    assert_eq!(served_by_fake(&balance).await.unwrap(), "b");
}

#[tokio::test(start_paused = true)]
async fn all_cooling_is_per_deployment() {
    let (fakes, balance) = deployed([None, None]);
    let health = balance.health();
    fakes[0].set("gpt", Mode::Throttle(30));
    fakes[1].set("gpt", Mode::Throttle(20));
    serve(&balance, "gpt").await.unwrap();
    serve(&balance, "gpt").await.unwrap();
    assert_eq!(fakes[0].calls(), ["gpt"]);
    assert_eq!(fakes[1].calls(), ["gpt"]);

    let gpt = Deployment::new("gpt");
    let tiny = Deployment::new("tiny");
    tokio::time::advance(Duration::from_secs(5)).await;
    let error = serve(&balance, "gpt").await.unwrap_err();
    let cooling = error.downcast_ref::<AllCoolingDown>().expect("all cooling");
    assert_eq!(cooling.retry_after(), Duration::from_secs(15));
    assert_eq!(
        health.soonest_recovery_for(Some(&gpt)),
        Some(Duration::from_secs(15))
    );
    assert!(!health.has_untried_available_for(&TriedBackends::new(), Some(&gpt)));
    // tiny (and any deployment) is served meanwhile.
    assert_eq!(health.soonest_recovery_for(Some(&tiny)), None);
    assert!(health.has_untried_available_for(&TriedBackends::new(), Some(&tiny)));
    assert_eq!(health.soonest_recovery(), None);
    assert!(health.has_untried_available(&TriedBackends::new()));
    let mut served = Vec::new();
    for _ in 0..2 {
        served.push(serve(&balance, "tiny").await.unwrap());
    }
    served.sort();
    assert_eq!(served, ["a", "b"]);
    assert_eq!(fakes[0].calls().len() + fakes[1].calls().len(), 4);

    // A backend cooling as a whole counts too: the later of its two recoveries.
    fakes[0].set("*", Mode::Connect);
    until_answers(&balance, "a", "tiny").await;
    assert_eq!(balance.snapshot()[0].cooling_reason, Some("connect"));
    // gpt: a recovers in 25 s (its own 10 s, gpt's 25 s), b in 15 s.
    assert_eq!(
        health.soonest_recovery_for(Some(&gpt)),
        Some(Duration::from_secs(15))
    );
    tokio::time::advance(Duration::from_secs(15)).await;
    assert_eq!(serve(&balance, "gpt").await.unwrap(), "b");
    // B was tried for tiny; A, whose own cooldown is over, takes its trial.
    let mut tried = TriedBackends::new();
    tried.insert(1);
    assert!(
        health.has_untried_available_for(&tried, Some(&tiny)),
        "a's trial is due"
    );
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_the_pairs_cooldown_and_the_offered_deployments() {
    let (fakes, balance) = deployed([None, Some(&["gpt", "tiny"])]);
    fakes[1].set("gpt", Mode::Throttle(20));
    until_b_answers(&balance, "gpt").await;
    tokio::time::advance(Duration::from_secs(4)).await;

    let snapshot = balance.snapshot();
    assert_eq!(snapshot[0].deployments, None);
    assert!(snapshot[0].deployment_cooldowns.is_empty());
    let b = &snapshot[1];
    assert_eq!(
        b.deployments,
        Some(vec![Arc::<str>::from("gpt"), Arc::from("tiny")])
    );
    assert_eq!(
        b.deployment_cooldowns,
        [(Arc::<str>::from("gpt"), Duration::from_secs(16))]
    );
    assert_eq!(b.state, BackendState::Available);
    assert_eq!(b.cooling_reason, None);

    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(balance.snapshot()[1].deployment_cooldowns.is_empty());
    // Expired entries go at the next pick that looks, and the flag with them.
    fakes[1].set("gpt", Mode::Status(200));
    serve(&balance, "gpt").await.unwrap();
    serve(&balance, "gpt").await.unwrap();
    assert!(!balance.inner.shared.backends[1].cools_any_deployment());
}

#[tokio::test(start_paused = true)]
async fn a_trial_answered_429_for_a_deployment_readmits_the_backend_and_cools_the_pair() {
    let (fakes, balance) = deployed([None, None]);
    fakes[1].set("*", Mode::Connect);
    until_b_answers(&balance, "tiny").await;
    assert_eq!(balance.snapshot()[1].state, BackendState::Cooling);
    fakes[1].set("*", Mode::Status(200));
    fakes[1].set("gpt", Mode::Throttle(20));
    tokio::time::advance(HealthPolicy::new().failure_cooldown).await;
    // The trial, for gpt: B answers (429), so it is back, and cools for gpt only.
    until_b_answers(&balance, "gpt").await;
    let b = &balance.snapshot()[1];
    assert_eq!(b.state, BackendState::Available);
    assert_eq!(b.deployment_cooldowns.len(), 1);
    for _ in 0..3 {
        assert_eq!(serve(&balance, "gpt").await.unwrap(), "a");
    }
    let mut tiny = Vec::new();
    for _ in 0..4 {
        tiny.push(serve(&balance, "tiny").await.unwrap());
    }
    assert_eq!(tiny.iter().filter(|n| *n == "b").count(), 2, "{tiny:?}");
}

#[test]
fn a_deployment_is_a_cheap_named_extension() {
    let d = Deployment::new("gpt-4o");
    assert_eq!(d.as_str(), "gpt-4o");
    assert_eq!(d, Deployment::from("gpt-4o"));
    assert_eq!(format!("{d:?}"), "Deployment(\"gpt-4o\")");
    assert_eq!(d.to_string(), "gpt-4o");
    let spec = BackendSpec::new("a", ()).deployments(["gpt-4o", "tiny"]);
    assert_eq!(spec.offered_deployments().unwrap().len(), 2);
    assert_eq!(BackendSpec::new("a", ()).offered_deployments(), None);
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_replaces_another_carries_over_the_backends_that_stayed() {
    let s = statuses(2);
    let old = balance_of(&s);
    // A retry (b1 tried already) goes to b0.
    let mut retry = Request::new(());
    retry.extensions_mut().insert(tried_one(1));
    assert_eq!(served_by(&old, retry).await.unwrap(), "b0");
    assert_eq!(served_by(&old, Request::new(())).await.unwrap(), "b1");
    s[0].store(429, Ordering::Relaxed);
    old.clone().oneshot(Request::new(())).await.unwrap();
    s[0].store(200, Ordering::Relaxed);
    tokio::time::advance(Duration::from_secs(5)).await;

    // The new pool: b0 stays, b1 goes, b2 comes.
    let t = statuses(3);
    let new = Balance::new([("b0", backend(t[0].clone())), ("b2", backend(t[2].clone()))]);
    new.health().carry_over_from(&old.health());
    let snapshot = new.snapshot();
    assert_eq!(snapshot[0].cooling_down_for, Some(Duration::from_secs(15)));
    assert_eq!(snapshot[0].throttled, 1);
    assert_eq!(snapshot[0].cooling_reason, Some("throttled"));
    // The counters go on from where they were (they are exported as counters).
    assert_eq!(snapshot[0].attempts, 2);
    assert_eq!(snapshot[0].retries, 1);
    assert_eq!(snapshot[0].cooldowns.throttled, 1);
    assert_eq!(snapshot[0].cooldowns.total(), 1);
    assert_eq!(snapshot[1].state, BackendState::Available);
    assert_eq!(snapshot[1].attempts, 0);
    assert_eq!(snapshot[1].retries, 0);
    assert_eq!(snapshot[1].cooldowns, CooldownCounts::default());
    for _ in 0..3 {
        assert_eq!(served_by(&new, Request::new(())).await.unwrap(), "b2");
    }
    tokio::time::advance(Duration::from_secs(15)).await;
    let mut names = Vec::new();
    for _ in 0..2 {
        names.push(served_by(&new, Request::new(())).await.unwrap());
    }
    assert!(names.contains(&"b0".to_owned()), "its trial: {names:?}");
}

// Counters for metrics: retries and cooldowns by reason.

/// A `TriedBackends` holding backend `index`.
fn tried_one(index: usize) -> TriedBackends {
    let mut tried = TriedBackends::new();
    tried.insert(index);
    tried
}

#[tokio::test]
async fn an_attempt_that_carries_tried_backends_counts_as_a_retry() {
    let (_f, balance) = fakes(2, HealthPolicy::new(), None);
    let retries = |b: &Balance<FakeService>| {
        b.snapshot()
            .iter()
            .map(|b| (b.attempts, b.retries))
            .collect::<Vec<_>>()
    };
    // A first attempt: no extension, or an empty one (no backend recorded yet).
    served_by_fake(&balance).await.unwrap();
    let mut request = Request::new(());
    request.extensions_mut().insert(TriedBackends::new());
    assert_eq!(served_by_fake_with(&balance, request).await, "b1");
    assert_eq!(retries(&balance), [(1, 0), (1, 0)]);

    // Retries of a request b0 failed go to b1, and count there.
    for _ in 0..3 {
        let mut request = Request::new(());
        request.extensions_mut().insert(tried_one(0));
        assert_eq!(served_by_fake_with(&balance, request).await, "b1");
    }
    assert_eq!(retries(&balance), [(1, 0), (4, 3)]);
}

#[tokio::test(start_paused = true)]
async fn each_cooldown_is_counted_by_its_reason() {
    // Behind a 5 s attempt timeout: b0 throttles, b1 fails (500), b2 hangs, b3 refuses
    // connections, b4 refuses our credential (403).
    let (f, balance) = fakes(5, HealthPolicy::new(), Some(Duration::from_secs(5)));
    f[0].set(Mode::Throttle(20));
    f[1].set(Mode::Status(500));
    f[2].set(Mode::Hang);
    f[3].set(Mode::Connect);
    f[4].set(Mode::Status(403));
    // One round cools b0, b2, b3 and b4; b1 takes the next two requests (its third 500 in a
    // row cools it); then nothing takes a request.
    for _ in 0..7 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    assert_eq!(calls(&f), [1, 3, 1, 1, 1]);
    let counts = |b: &Balance<FakeService>| {
        b.snapshot()
            .iter()
            .map(|b| {
                let c = b.cooldowns;
                [c.throttled, c.failed, c.timeout, c.connect, c.credential]
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&balance),
        [
            [1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    );
    let snapshot = balance.snapshot();
    assert_eq!(
        snapshot[3].cooldowns.by_reason(),
        [
            ("throttled", 0),
            ("failed", 0),
            ("timeout", 0),
            ("connect", 1),
            ("credential", 0),
        ]
    );
    // The names are those of `cooling_reason`.
    for b in &snapshot {
        let (reason, _) = b
            .cooldowns
            .by_reason()
            .into_iter()
            .find(|&(_, n)| n == 1)
            .unwrap();
        assert_eq!(b.cooling_reason, Some(reason));
    }

    // b3's failed trial is a cooldown of its own.
    tokio::time::advance(HealthPolicy::new().failure_cooldown).await;
    while f[3].calls() < 2 {
        let _ = balance.clone().oneshot(Request::new(())).await;
    }
    assert_eq!(balance.snapshot()[3].cooldowns.connect, 2);
    assert_eq!(balance.snapshot()[3].failed_trials, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_lengthened_by_an_answer_in_flight_is_counted_once() {
    let (f, balance) = fakes(2, HealthPolicy::new(), None);
    f[0].set(Mode::Held(429));
    // b0, b1, b0: two requests held by b0.
    let tasks = burst(&balance, 3).await;
    assert_eq!(calls(&f), [2, 1]);
    f[0].release.add_permits(1);
    settle().await;
    assert_eq!(balance.snapshot()[0].state, BackendState::Cooling);
    // The second 429 comes a second later: it lengthens the cooldown, starts none.
    tokio::time::advance(Duration::from_secs(1)).await;
    f[0].release.add_permits(1);
    settle().await;
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let snapshot = &balance.snapshot()[0];
    assert_eq!(snapshot.cooling_down_for, Some(Duration::from_secs(20)));
    assert_eq!(snapshot.throttled, 2);
    assert_eq!(snapshot.cooldowns.throttled, 1);
    assert_eq!(snapshot.cooldowns.total(), 1);

    // Once it is over (the backend on trial), a 429 starts a new one.
    tokio::time::advance(Duration::from_secs(20)).await;
    f[0].set(Mode::Status(429));
    while f[0].calls() < 3 {
        served_by_fake(&balance).await.unwrap();
    }
    assert_eq!(balance.snapshot()[0].cooldowns.throttled, 2);
}

#[tokio::test(start_paused = true)]
async fn a_429_for_a_deployment_counts_as_a_throttled_cooldown() {
    let (fakes, balance) = deployed([None, None]);
    fakes[1].set("gpt", Mode::Throttle(20));
    until_b_answers(&balance, "gpt").await;
    let b = &balance.snapshot()[1];
    assert_eq!(b.state, BackendState::Available);
    assert_eq!(b.deployment_cooldowns.len(), 1);
    assert_eq!(b.cooldowns.throttled, 1);
    assert_eq!(b.cooldowns.total(), 1);
    // Requests for another deployment, answered: nothing more.
    for _ in 0..4 {
        serve(&balance, "tiny").await.unwrap();
    }
    assert_eq!(balance.snapshot()[1].cooldowns.throttled, 1);

    // Over (its entry not removed yet): the next 429 for gpt starts another one.
    tokio::time::advance(Duration::from_secs(20)).await;
    until_b_answers(&balance, "gpt").await;
    let b = &balance.snapshot()[1];
    assert_eq!(b.cooldowns.throttled, 2);
    assert_eq!(b.throttled, 2);
    assert_eq!(balance.snapshot()[0].cooldowns, CooldownCounts::default());
}

#[tokio::test(start_paused = true)]
async fn a_pinned_request_goes_to_its_backend_whatever_its_health_and_an_unknown_pin_is_ignored() {
    let s = statuses(3);
    let balance = balance_of(&s);
    let pinned = |name: &str| {
        let mut request = Request::new(());
        request.extensions_mut().insert(PinnedTo::new(name));
        request
    };
    for _ in 0..4 {
        assert_eq!(served_by(&balance, pinned("b1")).await.unwrap(), "b1");
    }
    // b1 cools down after a 429; what lives there is still asked for there.
    s[1].store(429, Ordering::Relaxed);
    let throttled = balance.clone().oneshot(pinned("b1")).await.unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    s[1].store(200, Ordering::Relaxed);
    assert!(balance.snapshot()[1].cooling_down_for.is_some());
    assert_eq!(served_by(&balance, pinned("b1")).await.unwrap(), "b1");
    // Even when it was tried already.
    let mut request = pinned("b1");
    let mut tried = TriedBackends::new();
    tried.insert(1);
    request.extensions_mut().insert(tried);
    assert_eq!(served_by(&balance, request).await.unwrap(), "b1");
    // A backend that is not in the pool: the request is picked as any other, skipping b1.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(served_by(&balance, pinned("gone")).await.unwrap());
    }
    assert!(!names.contains(&"b1".to_owned()), "{names:?}");
}
