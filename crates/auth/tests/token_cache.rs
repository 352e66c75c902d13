//! The token cache's timing, single flight and 401 handling, driven by a fake credential over an
//! in-memory backend with Tokio's clock paused, so every duration is exact and nothing waits.

mod support {
    pub(crate) mod capture;
}

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use aoai_auth::{
    AzureAuthLayer, DEFAULT_FETCH_TIMEOUT, DEFAULT_SCOPE, DEFAULT_TOKEN_WAIT, TokenCache,
    error::TokenUnavailable,
};
use azure_core::{
    credentials::{AccessToken, TokenCredential, TokenRequestOptions},
    error::ErrorKind,
    http::StatusCode as AzureStatus,
    time::OffsetDateTime,
};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use support::capture::Capture;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn, util::BoxCloneSyncService};

const HOUR: Duration = Duration::from_secs(3600);

/// A credential that hands out `fake-token-1`, `fake-token-2`, ... and records each call.
#[derive(Debug)]
struct FakeCredential(Mutex<Fake>);

#[derive(Debug)]
struct Fake {
    lifetime: Duration,
    delay: Duration,
    failing: bool,
    /// Fail at once as a refused connection does.
    refusing: bool,
    /// Never answer: a token endpoint that accepts and hangs.
    hanging: bool,
    /// Calls running now, and the most that ever ran together.
    in_flight: usize,
    max_in_flight: usize,
    /// When set, every call waits for a permit: a token endpoint that hangs until released.
    gate: Option<Arc<Semaphore>>,
    /// Hands out this value instead of a numbered token.
    value: Option<&'static str>,
    started: Vec<Instant>,
    scopes: Vec<String>,
    issued: usize,
}

impl FakeCredential {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Fake {
            lifetime,
            delay: Duration::ZERO,
            failing: false,
            refusing: false,
            hanging: false,
            in_flight: 0,
            max_in_flight: 0,
            gate: None,
            value: None,
            started: Vec::new(),
            scopes: Vec::new(),
            issued: 0,
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    fn calls(&self) -> usize {
        self.with(|fake| fake.started.len())
    }

    fn close_gate(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.with(|fake| fake.gate = Some(gate.clone()));
        gate
    }
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let (delay, gate, hanging) = self.with(|fake| {
            fake.started.push(Instant::now());
            fake.scopes.push(scopes.join(" "));
            fake.in_flight += 1;
            fake.max_in_flight = fake.max_in_flight.max(fake.in_flight);
            (fake.delay, fake.gate.clone(), fake.hanging)
        });
        // Counts the call out however it ends, dropped by the cache's timeout included.
        let _running = InFlight(self);
        if hanging {
            std::future::pending::<()>().await;
        }
        if let Some(gate) = gate {
            gate.acquire()
                .await
                .expect("the gate is never closed")
                .forget();
        }
        tokio::time::sleep(delay).await;
        self.with(|fake| {
            if fake.refusing {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Connection,
                    "connection refused: secret-in-error",
                ));
            }
            if fake.failing {
                return Err(azure_core::Error::with_message(
                    ErrorKind::HttpResponse {
                        status: AzureStatus::InternalServerError,
                        error_code: None,
                        raw_response: None,
                    },
                    "the token endpoint said: secret-in-error",
                ));
            }
            fake.issued += 1;
            let token = match fake.value {
                Some(value) => value.to_owned(),
                None => format!("fake-token-{}", fake.issued),
            };
            Ok(AccessToken::new(
                token,
                OffsetDateTime::now_utc() + fake.lifetime,
            ))
        })
    }
}

struct InFlight<'a>(&'a FakeCredential);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.with(|fake| fake.in_flight -= 1);
    }
}

/// What the in-memory backend saw.
#[derive(Debug)]
struct Seen {
    authorization: Vec<String>,
    sensitive: bool,
    /// Where the `Authorization` value's bytes live: equal addresses mean no copy was made.
    address: usize,
}

/// An in-memory backend answering 401 to the `Authorization` values in `rejected`, after 10 ms
/// (virtual), so that concurrent requests are all in flight together.
fn backend(rejected: Arc<Mutex<HashSet<String>>>) -> Backend {
    BoxCloneSyncService::new(service_fn(move |request: Request<()>| {
        let rejected = rejected.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let values = request.headers().get_all(AUTHORIZATION);
            let seen = Seen {
                authorization: values
                    .iter()
                    .map(|value| value.to_str().unwrap().to_owned())
                    .collect(),
                sensitive: values.iter().all(|value| value.is_sensitive()),
                address: values
                    .iter()
                    .next()
                    .map_or(0, |value| value.as_bytes().as_ptr() as usize),
            };
            let rejected = seen
                .authorization
                .iter()
                .any(|value| rejected.lock().unwrap().contains(value));
            let mut response = Response::new(seen);
            if rejected {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, Infallible>(response)
        }
    }))
}

type Backend = BoxCloneSyncService<Request<()>, Response<Seen>, Infallible>;

fn no_rejections() -> Arc<Mutex<HashSet<String>>> {
    Arc::default()
}

async fn send<S>(service: &S) -> Result<Response<Seen>, BoxError>
where
    S: Service<Request<()>, Response = Response<Seen>, Error = BoxError> + Clone,
{
    service.clone().oneshot(Request::new(())).await
}

/// The one `Authorization` value the backend received.
async fn token_sent<S>(service: &S) -> String
where
    S: Service<Request<()>, Response = Response<Seen>, Error = BoxError> + Clone,
{
    let response = send(service).await.expect("the request succeeds");
    let [value] = response.body().authorization.as_slice() else {
        panic!("expected one Authorization header, got {response:?}");
    };
    value.clone()
}

/// Lets spawned tasks (the background refresh) run up to their next wait.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn token_unavailable(error: &BoxError) -> &TokenUnavailable {
    error
        .downcast_ref::<TokenUnavailable>()
        .unwrap_or_else(|| panic!("expected TokenUnavailable, got {error:?}"))
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_share_one_fetch() {
    let credential = FakeCredential::new(HOUR);
    credential.with(|fake| fake.delay = Duration::from_secs(1));
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    let mut requests = JoinSet::new();
    for _ in 0..100 {
        let service = service.clone();
        requests.spawn(async move { token_sent(&service).await });
    }
    while let Some(token) = requests.join_next().await {
        assert_eq!(token.unwrap(), "Bearer fake-token-1");
    }
    assert_eq!(credential.calls(), 1);
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    assert_eq!(credential.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn cached_header_is_shared_not_copied() {
    let credential = FakeCredential::new(HOUR);
    let service = AzureAuthLayer::from_credential(credential).layer(backend(no_rejections()));

    let first = send(&service).await.unwrap();
    let second = send(&service).await.unwrap();
    assert!(first.body().sensitive && second.body().sensitive);
    assert_ne!(first.body().address, 0);
    assert_eq!(first.body().address, second.body().address);
}

#[tokio::test(start_paused = true)]
async fn long_lived_token_is_refreshed_in_the_background_five_minutes_before_expiry() {
    let credential = FakeCredential::new(HOUR);
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    tokio::time::advance(Duration::from_secs(55 * 60 - 1)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    settle().await;
    assert_eq!(credential.calls(), 1, "not due yet");

    // The token endpoint hangs from now on until the gate opens.
    let gate = credential.close_gate();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    settle().await;
    assert_eq!(credential.calls(), 2, "the refresh started");

    // Requests keep flowing with the old token: with the endpoint hanging, any request that
    // waited on it would hit this timeout.
    for _ in 0..50 {
        let token = tokio::time::timeout(Duration::from_secs(1), token_sent(&service)).await;
        assert_eq!(token.expect("no request waits"), "Bearer fake-token-1");
    }

    gate.add_permits(1);
    settle().await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
    assert_eq!(credential.calls(), 2, "one refresh at a time");
    let started = credential.with(|fake| fake.started.clone());
    assert!(started[1] - started[0] >= Duration::from_secs(55 * 60));
}

#[tokio::test(start_paused = true)]
async fn short_lived_token_is_refreshed_at_half_its_lifetime() {
    let credential = FakeCredential::new(Duration::from_secs(8 * 60));
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    tokio::time::advance(Duration::from_secs(4 * 60 - 1)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    settle().await;
    assert_eq!(credential.calls(), 1, "not due yet");

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    settle().await;
    assert_eq!(credential.calls(), 2);
    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
}

#[tokio::test(start_paused = true)]
async fn failed_background_refresh_keeps_the_token_and_backs_off_until_expiry() {
    let capture = Capture::default();
    // Other tests of this binary hit the same log callsites at the same time on other threads,
    // without a subscriber. While a single dispatcher is registered, tracing-core computes the
    // interest of a callsite registered on such a thread from that thread's default alone
    // ("never") and caches it; a second registered dispatcher makes it ask every dispatcher.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(capture.subscriber());
    let credential = FakeCredential::new(HOUR);
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    credential.with(|fake| fake.failing = true);
    tokio::time::advance(Duration::from_secs(55 * 60 + 1)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");

    // Let the retries run until just before expiry; requests still get the cached token.
    tokio::time::sleep(Duration::from_secs(298)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");

    let started = credential.with(|fake| fake.started.clone());
    let pauses: Vec<u64> = started[1..]
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).as_secs())
        .collect();
    assert_eq!(pauses[..3], [1, 2, 4]);
    assert!(pauses[3..].iter().all(|&pause| pause == 5), "{pauses:?}");
    assert_eq!(pauses.len(), 61, "{pauses:?}");

    // Expired: the next request starts an attempt at once (the last one started over a second
    // ago) and gets its failure without waiting for the backoff.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let error = send(&service).await.unwrap_err();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    let error = token_unavailable(&error);
    assert_eq!(
        error.to_string(),
        "could not obtain an access token for Azure OpenAI: the token endpoint answered HTTP 500"
    );
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.retry_after(), Duration::from_secs(1));
    assert_eq!(credential.calls(), started.len() + 1);

    // The endpoint is back: a request a second later gets a new token at once.
    credential.with(|fake| fake.failing = false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
    assert_eq!(
        asked.elapsed(),
        Duration::from_millis(10),
        "the backend's own 10 ms"
    );

    let logs = capture.text();
    assert!(
        logs.contains("refreshing the Azure OpenAI access token failed")
            && logs.contains("obtaining an Azure OpenAI access token failed")
            && logs.contains("retry_in=1s")
            && logs.contains("retry_in=5s"),
        "{logs}"
    );
    assert!(!logs.contains("fake-token"), "{logs}");
    assert!(!logs.contains("secret-in-error"), "{logs}");
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_on_a_failed_fetch_share_its_error() {
    let credential = FakeCredential::new(HOUR);
    credential.with(|fake| {
        fake.delay = Duration::from_secs(1);
        fake.failing = true;
    });
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let service = service.clone();
        requests.spawn(async move { send(&service).await });
    }
    while let Some(result) = requests.join_next().await {
        let error = result.unwrap().unwrap_err();
        assert!(!token_unavailable(&error).to_string().contains("secret"));
    }
    assert_eq!(credential.calls(), 1);

    // No failure is cached: the next request asks again, and recovers.
    credential.with(|fake| fake.failing = false);
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    assert_eq!(credential.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_401s_cause_one_new_fetch() {
    let credential = FakeCredential::new(HOUR);
    credential.with(|fake| fake.delay = Duration::from_secs(1));
    let rejected = Arc::new(Mutex::new(HashSet::from(
        ["Bearer fake-token-1".to_owned()],
    )));
    let service = AzureAuthLayer::from_credential(credential.clone()).layer(backend(rejected));

    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let service = service.clone();
        requests.spawn(async move { send(&service).await });
    }
    while let Some(response) = requests.join_next().await {
        let response = response.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.body().authorization, ["Bearer fake-token-1"]);
    }
    assert_eq!(credential.calls(), 1, "the 401 itself is not retried");

    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
    assert_eq!(credential.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_late_401_for_an_old_token_keeps_the_new_one() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let credential = FakeCredential::new(HOUR);
    // The mock panics when a clone that was not made ready is called, which checks that a
    // request waiting for its token calls the inner service `poll_ready` prepared.
    let mut service = AzureAuthLayer::from_credential(credential.clone()).layer(mock);
    let answer = |status| {
        let mut response = Response::new(());
        *response.status_mut() = status;
        response
    };
    let authorization = |request: &Request<()>| request.headers()[AUTHORIZATION].clone();

    // First request: no token yet, it waits for one.
    let first = tokio::spawn(service.ready().await.unwrap().call(Request::new(())));
    let (request, first_reply) = handle.next_request().await.unwrap();
    assert_eq!(authorization(&request), "Bearer fake-token-1");

    // Second request, same token, answered 401: the token is dropped.
    let second = tokio::spawn(service.ready().await.unwrap().call(Request::new(())));
    let (request, reply) = handle.next_request().await.unwrap();
    assert_eq!(authorization(&request), "Bearer fake-token-1");
    reply.send_response(answer(StatusCode::UNAUTHORIZED));
    assert_eq!(second.await.unwrap().unwrap().status(), 401);

    // Third request fetches a new token.
    let third = tokio::spawn(service.ready().await.unwrap().call(Request::new(())));
    let (request, reply) = handle.next_request().await.unwrap();
    assert_eq!(authorization(&request), "Bearer fake-token-2");
    reply.send_response(answer(StatusCode::OK));
    assert_eq!(third.await.unwrap().unwrap().status(), 200);

    // The first request's 401 arrives late: it names token 1, so token 2 stays.
    first_reply.send_response(answer(StatusCode::UNAUTHORIZED));
    assert_eq!(first.await.unwrap().unwrap().status(), 401);

    let fourth = tokio::spawn(service.ready().await.unwrap().call(Request::new(())));
    let (request, reply) = handle.next_request().await.unwrap();
    assert_eq!(authorization(&request), "Bearer fake-token-2");
    reply.send_response(answer(StatusCode::OK));
    assert_eq!(fourth.await.unwrap().unwrap().status(), 200);
    assert_eq!(credential.calls(), 2);
}

#[tokio::test]
async fn poll_ready_is_the_inner_services() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut service = AzureAuthLayer::from_credential(FakeCredential::new(HOUR)).layer(mock);
    let mut cx = Context::from_waker(Waker::noop());
    let mut poll_ready = || Service::<Request<()>>::poll_ready(&mut service, &mut cx);

    handle.allow(0);
    assert!(poll_ready().is_pending());
    handle.allow(1);
    assert!(matches!(poll_ready(), Poll::Ready(Ok(()))));
    handle.send_error("inner service failed");
    match poll_ready() {
        Poll::Ready(Err(error)) => assert_eq!(error.to_string(), "inner service failed"),
        other => panic!("expected the inner error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn backends_built_from_one_cache_share_its_token() {
    let credential = FakeCredential::new(HOUR);
    let cache = TokenCache::new(credential.clone(), "api://custom/.default");
    assert_eq!(cache.scope(), "api://custom/.default");
    let first = AzureAuthLayer::from_cache(cache.clone()).layer(backend(no_rejections()));
    let second = AzureAuthLayer::from_cache(cache).layer(backend(no_rejections()));

    assert_eq!(token_sent(&first).await, "Bearer fake-token-1");
    assert_eq!(token_sent(&second).await, "Bearer fake-token-1");
    assert_eq!(credential.calls(), 1);

    let default =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));
    assert_eq!(token_sent(&default).await, "Bearer fake-token-2");
    let other = AzureAuthLayer::from_credential(credential.clone())
        .with_scope("https://other.example/.default")
        .layer(backend(no_rejections()));
    assert_eq!(token_sent(&other).await, "Bearer fake-token-3");

    let scopes = credential.with(|fake| fake.scopes.clone());
    assert_eq!(
        scopes,
        [
            "api://custom/.default",
            DEFAULT_SCOPE,
            "https://other.example/.default"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn unusable_tokens_are_refused() {
    let credential = FakeCredential::new(Duration::ZERO);
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));
    let error = send(&service).await.unwrap_err();
    assert_eq!(
        token_unavailable(&error).reason(),
        "the credential returned a token that has already expired"
    );

    credential.with(|fake| {
        fake.lifetime = HOUR;
        fake.value = Some("line\nbreak");
    });
    let error = send(&service).await.unwrap_err();
    assert_eq!(
        token_unavailable(&error).reason(),
        "the credential returned a token that is not a valid header value"
    );
    assert!(!format!("{error:?}").contains("line"));
}

#[test]
fn settings_have_documented_defaults() {
    let cache = TokenCache::new(FakeCredential::new(HOUR), DEFAULT_SCOPE);
    assert_eq!(cache.token_wait(), Duration::from_secs(3));
    assert_eq!(cache.fetch_timeout(), Duration::from_secs(5));
    assert_eq!(DEFAULT_TOKEN_WAIT, Duration::from_secs(3));
    assert_eq!(DEFAULT_FETCH_TIMEOUT, Duration::from_secs(5));

    let tuned = cache
        .clone()
        .with_token_wait(Duration::from_millis(500))
        .with_fetch_timeout(Duration::from_secs(2));
    assert_eq!(tuned.token_wait(), Duration::from_millis(500));
    assert_eq!(
        cache.token_wait(),
        DEFAULT_TOKEN_WAIT,
        "the wait is the handle's"
    );
    assert_eq!(
        cache.fetch_timeout(),
        Duration::from_secs(2),
        "the fetch timeout is the cache's"
    );
}

/// How the token endpoint fails during an outage.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outage {
    /// Refuses connections: the credential fails at once.
    Refusing,
    /// Accepts and never answers.
    Hanging,
    /// Answers 500.
    Failing,
}

impl Outage {
    fn set(self, fake: &mut Fake, on: bool) {
        match self {
            Self::Refusing => fake.refusing = on,
            Self::Hanging => fake.hanging = on,
            Self::Failing => fake.failing = on,
        }
    }

    /// The reason callers are given once an attempt has failed this way.
    fn reason(self, fetch_timeout: Duration) -> String {
        match self {
            Self::Refusing => "could not connect to the token endpoint".to_owned(),
            Self::Hanging => format!("the token endpoint did not answer within {fetch_timeout:?}"),
            Self::Failing => "the token endpoint answered HTTP 500".to_owned(),
        }
    }
}

/// A short-lived token, then an outage of the token endpoint that outlasts it, then its return:
/// while the token is valid nothing waits; once it has expired every caller gets
/// `TokenUnavailable` within the token wait, with a `retry_after`; after the endpoint's return
/// the first request gets a token within a second (or, when an attempt was hanging, once that
/// attempt's timeout ends it); and the credential is never asked twice at once.
async fn ride_out(outage: Outage) {
    const LIFETIME: Duration = Duration::from_secs(60);
    const WAIT: Duration = Duration::from_secs(2);
    const FETCH_TIMEOUT: Duration = Duration::from_secs(4);
    /// What the in-memory backend adds to every request that reaches it.
    const BACKEND: Duration = Duration::from_millis(10);

    let credential = FakeCredential::new(LIFETIME);
    let service = AzureAuthLayer::from_credential(credential.clone())
        .with_token_wait(WAIT)
        .with_fetch_timeout(FETCH_TIMEOUT)
        .layer(backend(no_rejections()));
    let fetched = Instant::now();
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");

    // The endpoint goes down. The token (refreshed from 30 s on) still serves every request at
    // once while the background refresh fails.
    credential.with(|fake| outage.set(fake, true));
    tokio::time::sleep_until(fetched + LIFETIME / 2 + Duration::from_millis(1)).await;
    while fetched.elapsed() < LIFETIME - Duration::from_millis(200) {
        let asked = Instant::now();
        assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
        assert_eq!(
            asked.elapsed(),
            BACKEND,
            "a request waited with a valid token cached"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refreshes = credential.calls() - 1;
    assert!(refreshes >= 5, "the refresh was retried: {refreshes}");

    // Expired: a burst of callers, then steady traffic for 15 s, all failing within the wait.
    tokio::time::sleep_until(fetched + LIFETIME).await;
    let outage_started = Instant::now();
    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let service = service.clone();
        requests.spawn(async move {
            let asked = Instant::now();
            (send(&service).await.map(|_| ()), asked.elapsed())
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = requests.join_next().await {
        failures.push(result.unwrap());
    }
    while outage_started.elapsed() < Duration::from_secs(15) {
        let asked = Instant::now();
        failures.push((send(&service).await.map(|_| ()), asked.elapsed()));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (result, waited) in &failures {
        let error = result.as_ref().expect_err("no token during the outage");
        let error = token_unavailable(error);
        assert!(*waited <= WAIT, "{outage:?}: waited {waited:?}");
        assert!(
            error.retry_after() >= Duration::from_secs(1) && error.retry_after() <= FETCH_TIMEOUT,
            "{outage:?}: {:?}",
            error.retry_after()
        );
        assert_eq!(error.reason(), outage.reason(FETCH_TIMEOUT), "{outage:?}");
        assert!(!format!("{error} {error:?}").contains("secret"));
        if outage != Outage::Hanging {
            // Nobody waits for the wait to run out: a request gets the outcome of the next
            // attempt, which starts at once or within a second of the last one.
            assert!(
                *waited <= Duration::from_secs(1),
                "{outage:?}: waited {waited:?}"
            );
        }
    }

    // Attempts never overlap, and requests start them no more than once a second.
    let started = credential.with(|fake| {
        assert_eq!(fake.max_in_flight, 1, "{outage:?}: overlapping fetches");
        fake.started.clone()
    });
    for pair in started[1..].windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_secs(1), "{started:?}");
    }

    // The endpoint is back.
    credential.with(|fake| outage.set(fake, false));
    let back = Instant::now();
    let recovered = loop {
        match send(&service).await {
            Ok(response) => break response,
            Err(error) => {
                assert_eq!(outage, Outage::Hanging, "{error}");
                token_unavailable(&error);
            }
        }
    };
    assert_eq!(recovered.body().authorization, ["Bearer fake-token-2"]);
    let recovery = back.elapsed();
    let bound = match outage {
        // An attempt that was hanging when the endpoint came back ends at its own deadline.
        Outage::Hanging => FETCH_TIMEOUT + Duration::from_secs(1) + BACKEND,
        Outage::Refusing | Outage::Failing => Duration::from_secs(1) + BACKEND,
    };
    assert!(
        recovery <= bound,
        "{outage:?}: recovered after {recovery:?}"
    );
    assert_eq!(token_sent(&service).await, "Bearer fake-token-2");
    assert_eq!(credential.with(|fake| fake.max_in_flight), 1);
}

#[tokio::test(start_paused = true)]
async fn refusing_token_endpoint_after_expiry_is_answered_within_the_wait_and_recovers() {
    ride_out(Outage::Refusing).await;
}

#[tokio::test(start_paused = true)]
async fn hanging_token_endpoint_after_expiry_is_answered_within_the_wait_and_recovers() {
    ride_out(Outage::Hanging).await;
}

#[tokio::test(start_paused = true)]
async fn failing_token_endpoint_after_expiry_is_answered_within_the_wait_and_recovers() {
    ride_out(Outage::Failing).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_at_most_the_token_wait_for_a_hanging_first_fetch() {
    let credential = FakeCredential::new(HOUR);
    let gate = credential.close_gate();
    let service =
        AzureAuthLayer::from_credential(credential.clone()).layer(backend(no_rejections()));

    let asked = Instant::now();
    let error = send(&service).await.unwrap_err();
    assert_eq!(asked.elapsed(), DEFAULT_TOKEN_WAIT);
    let error = token_unavailable(&error);
    assert_eq!(
        error.reason(),
        "the token endpoint has not answered yet (the request waited 3s)"
    );
    // The attempt's deadline is 5 s after it started: 2 s from now.
    assert_eq!(error.retry_after(), Duration::from_secs(2));

    // The endpoint answers at last, within the attempt's deadline: the token is cached and the
    // next request is served at once.
    gate.add_permits(1);
    settle().await;
    let asked = Instant::now();
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    assert_eq!(asked.elapsed(), Duration::from_millis(10));
    assert_eq!(credential.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_zero_token_wait_fails_at_once_and_the_fetch_serves_the_next_request() {
    let credential = FakeCredential::new(HOUR);
    credential.with(|fake| fake.delay = Duration::from_millis(100));
    let service = AzureAuthLayer::from_credential(credential.clone())
        .with_token_wait(Duration::ZERO)
        .layer(backend(no_rejections()));

    let asked = Instant::now();
    let error = send(&service).await.unwrap_err();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    token_unavailable(&error);
    tokio::time::sleep(Duration::from_millis(101)).await;
    assert_eq!(token_sent(&service).await, "Bearer fake-token-1");
    assert_eq!(credential.calls(), 1);
}
