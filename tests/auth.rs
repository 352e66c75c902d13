//! Authentication through the whole gateway: Entra ID tokens and api-keys reach the backends,
//! the caller's credentials never do, a backend's 401 refreshes the token once, a token
//! endpoint that is down gives 503, and no secret reaches the logs.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_tower::auth::AzureAuthLayer;
use aoai_tower::{Gateway, RequireClientKeyLayer};
use aoai_usage::Caller;
use axum::Router;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::time::OffsetDateTime;
use serde_json::Value;
use support::{CHAT, chat, chat_body, client, serve, serve_gateway, served_by, sims_with};

/// A credential handing out `token-1`, `token-2`, ... (or failing), counting its calls.
#[derive(Debug, Default)]
struct CountingCredential {
    issued: Mutex<usize>,
    failing: Mutex<bool>,
}

impl CountingCredential {
    fn calls(&self) -> usize {
        *self.issued.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl TokenCredential for CountingCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        if *self.failing.lock().unwrap() {
            return Err(azure_core::Error::with_message(
                ErrorKind::Credential,
                "token endpoint unreachable",
            ));
        }
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        Ok(AccessToken::new(
            format!("token-{issued}"),
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
}

/// A gateway over `sims`, every backend authenticated with one token cache over `credential`.
fn authenticated(sims: &[aoai_sim::SimHandle], credential: &Arc<CountingCredential>) -> Gateway {
    let auth = AzureAuthLayer::from_credential(credential.clone());
    sims.iter()
        .fold(Gateway::builder(), |builder, sim| {
            builder.backend_with_auth(sim.name(), sim.url(), auth.clone())
        })
        .build()
        .unwrap()
}

/// A chat request carrying the caller's own `api-key` and bearer token, which no backend may
/// receive.
async fn chat_with_callers_credentials(client: &reqwest::Client, base: &str) -> reqwest::Response {
    client
        .post(format!("{base}{CHAT}"))
        .header("api-key", "caller-key")
        .header("authorization", "Bearer caller-token")
        .json(&chat_body())
        .send()
        .await
        .unwrap()
}

fn authorization(sim: &aoai_sim::SimHandle, request: usize) -> Vec<String> {
    sim.requests()[request]
        .headers
        .get_all("authorization")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn backends_receive_the_bearer_token_and_never_the_callers_credentials() {
    let sims = sims_with(2, |c| c.expect_bearer("token-1")).await;
    let credential = Arc::new(CountingCredential::default());
    let base = serve_gateway(authenticated(&sims, &credential)).await;
    let client = client();
    for _ in 0..20 {
        let response = chat_with_callers_credentials(&client, &base).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(credential.calls(), 1, "one token fetch for every request");
    for sim in &sims {
        assert_eq!(sim.request_count(), 10);
        for (i, request) in sim.requests().iter().enumerate() {
            assert_eq!(authorization(sim, i), ["Bearer token-1"]);
            assert!(request.headers.get("api-key").is_none());
        }
    }
}

#[tokio::test]
async fn a_backend_401_refreshes_the_token_once_and_the_retry_succeeds() {
    let sims = sims_with(2, |c| c.expect_bearer("token-2")).await;
    let credential = Arc::new(CountingCredential::default());
    let base = serve_gateway(authenticated(&sims, &credential)).await;

    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
    assert_eq!(authorization(&sims[0], 0), ["Bearer token-1"]);
    assert_eq!(authorization(&sims[1], 0), ["Bearer token-2"]);
    assert_eq!(credential.calls(), 2);

    // The fresh token stays cached: the next requests need no fetch.
    for _ in 0..4 {
        assert_eq!(chat(&client(), &base).await.status(), 200);
    }
    assert_eq!(credential.calls(), 2);
}

#[tokio::test]
async fn a_401_that_persists_is_retried_once_then_passed_to_the_caller() {
    let sims = sims_with(3, |c| c.expect_bearer("never-issued")).await;
    let credential = Arc::new(CountingCredential::default());
    let base = serve_gateway(authenticated(&sims, &credential)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 401);
    let calls: usize = sims.iter().map(|s| s.request_count()).sum();
    assert_eq!(calls, 2, "the first attempt and one retry");
}

#[tokio::test]
async fn a_token_endpoint_that_is_down_gives_503_and_contacts_no_backend() {
    let sims = sims_with(2, |c| c).await;
    let credential = Arc::new(CountingCredential::default());
    *credential.failing.lock().unwrap() = true;
    let base = serve_gateway(authenticated(&sims, &credential)).await;

    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    assert!(response.headers().contains_key("retry-after-ms"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not obtain an access token"),
        "{message}"
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);

    // The endpoint comes back: so does the gateway.
    *credential.failing.lock().unwrap() = false;
    assert_eq!(chat(&client(), &base).await.status(), 200);
}

#[tokio::test]
async fn api_key_mode_sets_each_backends_own_key_once() {
    let sims = [
        aoai_sim::start(aoai_sim::SimConfig::new("a").expect_api_key("key-a")).await,
        aoai_sim::start(aoai_sim::SimConfig::new("b").expect_api_key("key-b")).await,
    ];
    let gateway = Gateway::builder()
        .backend_with_auth(
            "a",
            sims[0].url(),
            AzureAuthLayer::from_api_key("key-a").unwrap(),
        )
        .backend_with_auth(
            "b",
            sims[1].url(),
            AzureAuthLayer::from_api_key("key-b").unwrap(),
        )
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    for _ in 0..2 {
        let response = chat_with_callers_credentials(&client(), &base).await;
        assert_eq!(response.status(), 200);
    }
    for (sim, key) in sims.iter().zip(["key-a", "key-b"]) {
        let request = &sim.requests()[0];
        let keys: Vec<_> = request.headers.get_all("api-key").iter().collect();
        assert_eq!(keys, [key]);
        assert!(request.headers.get("authorization").is_none());
    }
}

#[tokio::test]
async fn client_keys_are_required_and_never_forwarded() {
    let sims = sims_with(1, |c| c).await;
    let gateway = support::builder_over(&sims).build().unwrap();
    let app = Router::new()
        .nest_service("/openai", gateway)
        .layer(RequireClientKeyLayer::new(["k1", "k2"]));
    let base = serve(app).await;
    let client = client();
    let send = |headers: &'static [(&'static str, &'static str)]| {
        let mut request = client.post(format!("{base}{CHAT}")).json(&chat_body());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    for refused in [
        &[][..],
        &[("api-key", "wrong")],
        &[("authorization", "Bearer nope")],
    ] {
        let response = send(refused).await.unwrap();
        assert_eq!(response.status(), 401, "{refused:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "401");
    }
    assert_eq!(sims[0].request_count(), 0);

    for accepted in [&[("api-key", "k1")][..], &[("authorization", "Bearer k2")]] {
        assert_eq!(send(accepted).await.unwrap().status(), 200, "{accepted:?}");
    }
    for request in sims[0].requests() {
        assert!(request.headers.get("api-key").is_none());
        assert!(request.headers.get("authorization").is_none());
    }
    let debug = format!("{:?}", RequireClientKeyLayer::new(["k1-secret"]));
    assert!(!debug.contains("k1-secret"), "{debug}");
    // Named clients show their names, never their keys.
    let named = RequireClientKeyLayer::new(["k1-secret"])
        .client(Caller::new("search-team"), "k2-secret")
        .clients([(Caller::new("batch"), "k3-secret")]);
    let debug = format!("{named:?}");
    assert!(!debug.contains("secret"), "{debug}");
    assert!(
        debug.contains("search-team") && debug.contains("batch"),
        "{debug}"
    );
}

/// A writer that appends to a shared buffer, for capturing tracing output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime: every task (server, gateway, client) runs on this thread, under the
// capturing subscriber.
#[tokio::test(flavor = "current_thread")]
async fn the_tracing_output_of_a_whole_run_contains_no_token_or_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sims = sims_with(2, |c| c.expect_bearer("token-2")).await;
    let key_sim =
        aoai_sim::start(aoai_sim::SimConfig::new("k").expect_api_key("backend-key")).await;
    let credential = Arc::new(CountingCredential::default());
    let auth = AzureAuthLayer::from_credential(credential);
    let gateway = Gateway::builder()
        .backend_with_auth("a", sims[0].url(), auth.clone())
        .backend_with_auth("b", sims[1].url(), auth)
        .backend_with_auth(
            "k",
            key_sim.url(),
            AzureAuthLayer::from_api_key("backend-key").unwrap(),
        )
        .build()
        .unwrap();
    let debug = format!("{gateway:?}");
    let base = serve_gateway(gateway).await;
    for _ in 0..6 {
        let response = client()
            .post(format!("{base}{CHAT}"))
            .header("api-key", "caller-key")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        output.contains("request"),
        "the capture saw the run:\n{output}"
    );
    assert!(
        output.contains("retrying"),
        "the 401 retry was logged:\n{output}"
    );
    for secret in ["token-1", "token-2", "backend-key", "caller-key"] {
        assert!(
            !output.contains(secret),
            "{secret} leaked into the logs:\n{output}"
        );
        assert!(
            !debug.contains(secret),
            "{secret} leaked into Debug: {debug}"
        );
    }
}

/// A credential that takes `delay` to hand out each token.
#[derive(Debug)]
struct SlowCredential {
    delay: Duration,
}

#[async_trait::async_trait]
impl TokenCredential for SlowCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        tokio::time::sleep(self.delay).await;
        Ok(AccessToken::new(
            "slow-token",
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
}

/// The attempt timeout counts from the send to the instance: a request that first waits
/// longer than it for a token is served, not answered 504, and no instance cools down.
#[tokio::test]
async fn the_wait_for_a_token_does_not_count_against_the_attempt_timeout() {
    let sims = sims_with(1, |c| c).await;
    let auth = AzureAuthLayer::from_credential(Arc::new(SlowCredential {
        delay: Duration::from_millis(600),
    }));
    let gateway = Gateway::builder()
        .backend_with_auth(sims[0].name(), sims[0].url(), auth)
        .attempt_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let health = gateway.health().clone();
    let base = serve_gateway(gateway).await;

    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(sims[0].request_count(), 1);
    assert!(health.snapshot()[0].cooling_down_for.is_none());
}

/// A token that cannot be had is no instance's failure: with one credential for every
/// instance, the caller gets its 503 from the first attempt and no instance cools down.
#[tokio::test]
async fn with_one_credential_a_token_outage_is_a_503_that_cools_no_instance() {
    let sims = sims_with(2, |c| c).await;
    let credential = Arc::new(CountingCredential::default());
    *credential.failing.lock().unwrap() = true;
    let gateway = authenticated(&sims, &credential);
    let health = gateway.health().clone();
    let base = serve_gateway(gateway).await;

    for _ in 0..4 {
        assert_eq!(chat(&client(), &base).await.status(), 503);
    }
    for backend in health.snapshot() {
        assert_eq!(backend.state.to_string(), "available", "{backend:?}");
        assert_eq!(backend.attempts, 0, "{backend:?}");
    }
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
}

/// With instances on different credentials, a request whose first instance's token cannot be
/// had goes on to the other instance at once, and the first is not marked cooling.
#[tokio::test]
async fn with_two_credentials_a_request_goes_on_to_the_instance_whose_credential_works() {
    let sims = sims_with(2, |c| c).await;
    let down = Arc::new(CountingCredential::default());
    *down.failing.lock().unwrap() = true;
    let up = Arc::new(CountingCredential::default());
    let gateway = Gateway::builder()
        .backend_with_auth("a", sims[0].url(), AzureAuthLayer::from_credential(down))
        .backend_with_auth("b", sims[1].url(), AzureAuthLayer::from_credential(up))
        .build()
        .unwrap();
    let health = gateway.health().clone();
    let base = serve_gateway(gateway).await;

    for _ in 0..4 {
        let response = chat(&client(), &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "b");
    }
    assert_eq!(sims[0].request_count(), 0);
    assert_eq!(sims[1].request_count(), 4);
    let a = &health.snapshot()[0];
    assert_eq!(a.state.to_string(), "available", "{a:?}");
    assert!(a.cooling_down_for.is_none());
}
