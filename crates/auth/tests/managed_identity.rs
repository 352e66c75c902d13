//! End to end with the real `azure_identity::ManagedIdentityCredential`: an App Service-style
//! identity endpoint and a backend on 127.0.0.1, requests forwarded over real sockets.
//!
//! Each test starts the identity endpoint and runs its scenario (the ignored test of the same
//! name in `child`) in a child process whose environment points the credential at the endpoint;
//! see `support/identity.rs` for why.

mod support {
    pub(crate) mod backend;
    pub(crate) mod capture;
    pub(crate) mod identity;
}

use support::identity::run_in_child;

#[tokio::test]
async fn one_fetch_serves_a_thousand_requests() {
    run_in_child("child::one_fetch_serves_a_thousand_requests").await;
}

#[tokio::test]
async fn callers_credentials_are_replaced() {
    run_in_child("child::callers_credentials_are_replaced").await;
}

#[tokio::test]
async fn endpoint_down_at_start_is_a_503_until_it_recovers() {
    run_in_child("child::endpoint_down_at_start_is_a_503_until_it_recovers").await;
}

#[tokio::test]
async fn endpoint_down_later_keeps_the_cached_token_working() {
    run_in_child("child::endpoint_down_later_keeps_the_cached_token_working").await;
}

#[tokio::test]
async fn backend_401_invalidates_the_token_once() {
    run_in_child("child::backend_401_invalidates_the_token_once").await;
}

#[tokio::test]
async fn token_is_refreshed_in_the_background_while_requests_flow() {
    run_in_child("child::token_is_refreshed_in_the_background_while_requests_flow").await;
}

#[tokio::test]
async fn logs_and_debug_output_hold_no_secret() {
    run_in_child("child::logs_and_debug_output_hold_no_secret").await;
}

#[tokio::test]
async fn refusing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once() {
    run_in_child("child::refusing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once")
        .await;
}

#[tokio::test]
async fn hanging_endpoint_after_expiry_is_a_503_within_the_wait_and_recovers() {
    run_in_child("child::hanging_endpoint_after_expiry_is_a_503_within_the_wait_and_recovers")
        .await;
}

#[tokio::test]
async fn failing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once() {
    run_in_child("child::failing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once").await;
}

/// The scenarios, run only in a child process by the tests above.
mod child {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use aoai_auth::{AzureAuth, AzureAuthLayer, TokenCache, error::TokenUnavailable};
    use axum::{
        Json, Router,
        body::Body,
        extract::{Request, State},
        response::IntoResponse,
    };
    use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
    use http::StatusCode;
    use serde_json::{Value, json};
    use tokio::{net::TcpListener, task::JoinSet, time::Instant};
    use tower::{BoxError, Layer, Service as _, ServiceExt};

    use crate::support::{
        backend::{Backend, Forward, Seen, forward, request_with_caller_credentials},
        capture::Capture,
        identity::{BODY_SECRET, Config, Control, IDENTITY_SECRET, credential},
    };

    type Service = AzureAuth<Forward>;

    /// A backend, the parent's identity endpoint, and `AzureAuth` with the real credential.
    struct Rig {
        control: Control,
        backend: Backend,
        service: Service,
    }

    impl Rig {
        /// `None` outside a child process: the scenario is then skipped.
        async fn start() -> Option<Self> {
            let control = Control::from_env()?;
            let backend = Backend::start().await;
            let service =
                AzureAuthLayer::from_credential(credential()).layer(forward(backend.base()));
            Some(Self {
                control,
                backend,
                service,
            })
        }

        async fn send(&self) -> Result<http::Response<String>, BoxError> {
            self.service
                .clone()
                .oneshot(request_with_caller_credentials())
                .await
        }

        /// Sends `count` requests, `concurrency` at a time; all must succeed.
        async fn send_many(&self, count: usize, concurrency: usize) {
            let mut requests = JoinSet::new();
            for sent in 0..count {
                if sent >= concurrency {
                    requests.join_next().await.unwrap().unwrap();
                }
                let service = self.service.clone();
                requests.spawn(async move {
                    let response = service
                        .oneshot(request_with_caller_credentials())
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                });
            }
            while let Some(done) = requests.join_next().await {
                done.unwrap();
            }
        }

        async fn fetch_count(&self) -> usize {
            self.control.fetches().await.len()
        }

        /// The `Authorization` value of the last request the backend saw, checking that it was
        /// the only credential on it.
        fn last_token(&self) -> String {
            let seen = self.backend.seen();
            only_our_token(seen.last().expect("the backend saw a request"))
        }
    }

    fn only_our_token(seen: &Seen) -> String {
        assert!(seen.api_key.is_empty(), "{seen:?}");
        let [token] = seen.authorization.as_slice() else {
            panic!("expected one Authorization header: {seen:?}");
        };
        assert!(token.starts_with("Bearer mi-token-"), "{seen:?}");
        token.clone()
    }

    /// Polls `check` every 10 ms until it holds, for at most 5 s.
    async fn eventually(mut check: impl AsyncFnMut() -> bool) {
        for _ in 0..500 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 5 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn one_fetch_serves_a_thousand_requests() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        // The first 50 arrive together, before any token exists: they share one fetch.
        rig.send_many(1000, 50).await;

        let fetches = rig.control.fetches().await;
        assert_eq!(fetches.len(), 1, "{fetches:?}");
        let fetch = &fetches[0];
        assert_eq!(
            fetch.resource.as_deref(),
            Some("https://cognitiveservices.azure.com")
        );
        assert_eq!(fetch.api_version.as_deref(), Some("2019-08-01"));
        assert!(fetch.secret_ok);

        let seen = rig.backend.seen();
        assert_eq!(seen.len(), 1000);
        for seen in &seen {
            assert_eq!(only_our_token(seen), "Bearer mi-token-1-a71f3e");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn callers_credentials_are_replaced() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        // Cold (waiting for the token) and warm (cached token) paths alike.
        rig.send().await.unwrap();
        rig.send().await.unwrap();
        let seen = rig.backend.seen();
        assert_eq!(seen.len(), 2);
        for seen in &seen {
            assert_eq!(seen.authorization, ["Bearer mi-token-1-a71f3e"]);
            assert!(seen.api_key.is_empty());
        }
    }

    /// The gateway's edge in small: every error becomes an Azure-shaped response.
    async fn front(State(service): State<Service>, request: Request) -> axum::response::Response {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let request = http::Request::from_parts(parts, String::from_utf8(body.to_vec()).unwrap());
        match service.oneshot(request).await {
            Ok(response) => response.map(Body::from),
            Err(error) => {
                let unavailable = error
                    .downcast_ref::<TokenUnavailable>()
                    .expect("the only error here");
                let body = json!({"error": {"code": "TokenUnavailable", "message": unavailable.to_string()}});
                (unavailable.status(), Json(body)).into_response()
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn endpoint_down_at_start_is_a_503_until_it_recovers() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/openai/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let app = Router::new()
            .fallback(front)
            .with_state(rig.service.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::new();
        let call = || {
            client
                .post(&url)
                .header("api-key", "caller-key-secret")
                .body("{}")
                .send()
        };

        rig.control
            .configure(Config {
                down: true,
                ..Config::default()
            })
            .await;
        for attempt in 1..=2 {
            let response = call().await.unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["error"]["message"],
                "could not obtain an access token for Azure OpenAI: the token endpoint answered HTTP 500"
            );
            assert!(!body.to_string().contains(BODY_SECRET));
            assert_eq!(rig.fetch_count().await, attempt, "no failure is cached");
        }
        assert!(rig.backend.seen().is_empty(), "no backend was contacted");

        rig.control.configure(Config::default()).await;
        let response = call().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(rig.last_token(), "Bearer mi-token-1-a71f3e");
        assert_eq!(rig.fetch_count().await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn endpoint_down_later_keeps_the_cached_token_working() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        rig.send().await.unwrap();
        rig.control
            .configure(Config {
                down: true,
                ..Config::default()
            })
            .await;
        rig.send_many(100, 10).await;
        for seen in &rig.backend.seen() {
            assert_eq!(only_our_token(seen), "Bearer mi-token-1-a71f3e");
        }
        assert_eq!(rig.fetch_count().await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn backend_401_invalidates_the_token_once() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        rig.send().await.unwrap();
        rig.backend.reject("Bearer mi-token-1-a71f3e");

        // Concurrent 401s for the same token: a request takes its token when it is called, so
        // calling all 20 before running any makes them all carry token 1...
        let mut called = Vec::new();
        for _ in 0..20 {
            let mut service = rig.service.clone();
            let service = service.ready().await.unwrap();
            called.push(service.call(request_with_caller_credentials()));
        }
        let mut requests = JoinSet::new();
        for request in called {
            requests.spawn(request);
        }
        while let Some(response) = requests.join_next().await {
            assert_eq!(
                response.unwrap().unwrap().status(),
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(rig.fetch_count().await, 1, "the 401 is not retried here");

        // ...make the next request wait for one fresh token.
        assert_eq!(rig.send().await.unwrap().status(), StatusCode::OK);
        assert_eq!(rig.last_token(), "Bearer mi-token-2-a71f3e");
        rig.send_many(20, 10).await;
        assert_eq!(rig.last_token(), "Bearer mi-token-2-a71f3e");
        assert_eq!(rig.fetch_count().await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn token_is_refreshed_in_the_background_while_requests_flow() {
        let Some(rig) = Rig::start().await else {
            return;
        };
        // A 6 s token is refreshed after at most 3 s and stays valid at least 5 s.
        rig.control
            .configure(Config {
                lifetime_secs: 6,
                ..Config::default()
            })
            .await;
        rig.send().await.unwrap();
        rig.control
            .configure(Config {
                hold: true,
                ..Config::default()
            })
            .await;
        tokio::time::sleep(Duration::from_millis(3100)).await;

        // This request starts the refresh, which the endpoint holds.
        rig.send().await.unwrap();
        eventually(async || rig.fetch_count().await == 2).await;

        // Meanwhile requests keep flowing with the old token, without waiting on the endpoint.
        for _ in 0..20 {
            let response = tokio::time::timeout(Duration::from_secs(1), rig.send()).await;
            assert_eq!(response.expect("did not wait").unwrap().status(), 200);
            assert_eq!(rig.last_token(), "Bearer mi-token-1-a71f3e");
        }

        rig.control.release().await;
        eventually(async || {
            rig.send().await.unwrap();
            rig.last_token() == "Bearer mi-token-2-a71f3e"
        })
        .await;
        assert_eq!(rig.fetch_count().await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn logs_and_debug_output_hold_no_secret() {
        let capture = Capture::default();
        tracing::subscriber::set_global_default(capture.subscriber()).unwrap();
        let Some(rig) = Rig::start().await else {
            return;
        };

        // Bearer mode: a fetch, cached use, a 401 and a new fetch, then a failed fetch.
        let cache = TokenCache::new(credential(), aoai_auth::DEFAULT_SCOPE);
        let layer = AzureAuthLayer::from_cache(cache.clone());
        let service = layer.layer(forward(rig.backend.base()));
        for _ in 0..3 {
            service
                .clone()
                .oneshot(request_with_caller_credentials())
                .await
                .unwrap();
        }
        let first = rig.last_token();
        let debug = format!("{layer:?} {service:?} {cache:?}");
        rig.backend.reject(&first);
        service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap();
        service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap();
        let second = rig.last_token();
        assert_ne!(first, second);
        rig.backend.reject(&second);
        rig.control
            .configure(Config {
                down: true,
                ..Config::default()
            })
            .await;
        service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap();
        let error = service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap_err();

        // Api-key mode.
        let key = "api-key-secret-9f2e41";
        let api_key = AzureAuthLayer::from_api_key(key).unwrap();
        let api_key_service = api_key.layer(forward(rig.backend.base()));
        api_key_service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap();
        let seen = rig.backend.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.api_key, [key]);
        assert!(last.authorization.is_empty());
        let debug = format!("{debug} {api_key:?} {api_key_service:?} {error:?} {error}");

        let logs = capture.text();
        assert!(logs.contains("obtained an access token"), "{logs}");
        assert!(logs.contains("a backend answered 401"), "{logs}");
        assert!(debug.contains("<redacted>"), "{debug}");
        for secret in [
            first.trim_start_matches("Bearer "),
            second.trim_start_matches("Bearer "),
            "mi-token-",
            key,
            IDENTITY_SECRET,
            BODY_SECRET,
            "caller-token-secret",
            "caller-basic-secret",
            "caller-key-secret",
        ] {
            assert!(!logs.contains(secret), "{secret} logged:\n{logs}");
            assert!(
                !debug.contains(secret),
                "{secret} in Debug output:\n{debug}"
            );
        }
    }

    /// Wraps the real credential to count its concurrent calls: the cache must never overlap
    /// two attempts.
    #[derive(Debug)]
    struct Counting {
        inner: std::sync::Arc<azure_identity::ManagedIdentityCredential>,
        running: AtomicUsize,
        most: AtomicUsize,
    }

    struct Running<'a>(&'a AtomicUsize);

    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl TokenCredential for Counting {
        async fn get_token(
            &self,
            scopes: &[&str],
            options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let _running = Running(&self.running);
            self.inner.get_token(scopes, options).await
        }
    }

    /// How the token endpoint fails during the outage.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Outage {
        Refusing,
        Hanging,
        Failing,
    }

    /// A 3 s token, then the endpoint fails until the token has expired and 4 s more, then it
    /// comes back. Real time, so the bounds carry some slack for a busy machine.
    async fn ride_out(outage: Outage) {
        const WAIT: Duration = Duration::from_millis(1000);
        const FETCH_TIMEOUT: Duration = Duration::from_millis(2000);
        const SLACK: Duration = Duration::from_millis(700);
        let Some(control) = Control::from_env() else {
            return;
        };
        let backend = Backend::start().await;
        let credential = std::sync::Arc::new(Counting {
            inner: credential(),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let service = AzureAuthLayer::from_credential(credential.clone())
            .with_token_wait(WAIT)
            .with_fetch_timeout(FETCH_TIMEOUT)
            .layer(forward(backend.base()));
        let send = || service.clone().oneshot(request_with_caller_credentials());

        control
            .configure(Config {
                lifetime_secs: 3,
                ..Config::default()
            })
            .await;
        send().await.unwrap();
        let outage_config = match outage {
            Outage::Refusing => Config {
                refuse: true,
                ..Config::default()
            },
            Outage::Hanging => Config {
                hold: true,
                ..Config::default()
            },
            Outage::Failing => Config {
                down: true,
                ..Config::default()
            },
        };
        control.configure(outage_config).await;

        // Until the token expires, requests are served with it without waiting.
        let mut served = 0;
        let expired = loop {
            let asked = Instant::now();
            match send().await {
                Ok(response) => {
                    assert_eq!(response.status(), StatusCode::OK);
                    assert!(asked.elapsed() < SLACK, "{outage:?}: {:?}", asked.elapsed());
                    served += 1;
                }
                Err(error) => break error,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(served >= 5, "{outage:?}: {served}");

        // After expiry, every caller gets TokenUnavailable within the wait.
        let mut errors = vec![(expired, Duration::ZERO)];
        let outage_started = Instant::now();
        while outage_started.elapsed() < Duration::from_secs(4) {
            let asked = Instant::now();
            let error = send().await.expect_err("no token during the outage");
            errors.push((error, asked.elapsed()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected = match outage {
            Outage::Refusing => "could not connect to the token endpoint",
            Outage::Hanging => "the token endpoint did not answer within 2s",
            Outage::Failing => "the token endpoint answered HTTP 500",
        };
        for (error, waited) in &errors {
            let error = error
                .downcast_ref::<TokenUnavailable>()
                .unwrap_or_else(|| panic!("{outage:?}: {error:?}"));
            assert!(*waited <= WAIT + SLACK, "{outage:?}: waited {waited:?}");
            assert!(error.retry_after() >= Duration::from_secs(1));
            assert!(
                error.retry_after() <= FETCH_TIMEOUT,
                "{:?}",
                error.retry_after()
            );
            let text = format!("{error} {error:?}");
            assert!(!text.contains(BODY_SECRET) && !text.contains(IDENTITY_SECRET));
            if outage == Outage::Hanging {
                // The first failures may predate the first timed-out attempt.
                assert!(
                    error.reason() == expected
                        || error
                            .reason()
                            .starts_with("the token endpoint has not answered yet"),
                    "{outage:?}: {}",
                    error.reason()
                );
            } else {
                assert_eq!(error.reason(), expected, "{outage:?}");
            }
        }
        assert!(
            errors
                .iter()
                .any(|(error, _)| error.to_string().contains(expected)),
            "{outage:?}"
        );
        assert!(errors.len() >= 3, "{outage:?}: {}", errors.len());

        // The endpoint comes back.
        control.configure(Config::default()).await;
        let back = Instant::now();
        let bound = match outage {
            Outage::Hanging => FETCH_TIMEOUT + Duration::from_secs(1) + SLACK,
            Outage::Refusing | Outage::Failing => Duration::from_secs(1) + SLACK,
        };
        loop {
            match send().await {
                Ok(response) => {
                    assert_eq!(response.status(), StatusCode::OK);
                    break;
                }
                Err(error) => {
                    assert_eq!(outage, Outage::Hanging, "{error}");
                    assert!(back.elapsed() < bound, "{outage:?}: {error}");
                }
            }
        }
        let recovery = back.elapsed();
        assert!(
            recovery <= bound,
            "{outage:?}: recovered after {recovery:?}"
        );
        let seen = backend.seen();
        let last = seen.last().unwrap();
        assert_ne!(last.authorization, seen[0].authorization, "a new token");
        assert_eq!(
            credential.most.load(Ordering::SeqCst),
            1,
            "overlapping fetches"
        );
        eprintln!(
            "{outage:?}: {} errors, recovered after {recovery:?}",
            errors.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn refusing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once() {
        ride_out(Outage::Refusing).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn hanging_endpoint_after_expiry_is_a_503_within_the_wait_and_recovers() {
        ride_out(Outage::Hanging).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs in a child process started by the test of the same name"]
    async fn failing_endpoint_after_expiry_is_a_prompt_503_and_recovers_at_once() {
        ride_out(Outage::Failing).await;
    }
}
