//! Retry on the next backend, end to end: emulated Azure OpenAI instances on loopback behind a
//! real gateway, driven by a real HTTP client. What is retried and what is not, `Retry-After`
//! honoured through cooldowns, bodies replayed byte for byte, attempts and timeouts bounded.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aoai_sim::{Fault, SimConfig, SimHandle};
use aoai_tower::{Gateway, GatewayBuilder};
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use support::{
    BOUND, CHAT, assert_azure_error, builder_over, chat, chat_body, client, serve, serve_gateway,
    served_by, sims,
};
use tokio::sync::Semaphore;

// ---- helpers ----

/// Builds the gateway and serves it; returns it (for its health) and its base URL.
async fn start(builder: GatewayBuilder) -> (Gateway, String) {
    let gateway = builder.build().unwrap();
    let base = serve_gateway(gateway.clone()).await;
    (gateway, base)
}

/// How many requests each instance received.
fn counts(sims: &[SimHandle]) -> Vec<usize> {
    sims.iter().map(SimHandle::request_count).collect()
}

/// How long the backend at `index` still takes no chat for `gpt-4o` (the deployment of
/// [`CHAT`]), per the gateway's health: the instance's own cooldown, or its 429 cooldown for
/// that deployment, whichever ends later.
fn cooling(gateway: &Gateway, index: usize) -> Option<Duration> {
    let backend = &gateway.health().snapshot()[index];
    let deployment = backend
        .deployment_cooldowns
        .iter()
        .find(|(name, _)| &**name == "gpt-4o")
        .map(|(_, left)| *left);
    backend.cooling_down_for.max(deployment)
}

/// Waits (bounded) until the backend at `index` takes traffic again.
async fn wait_until_available(gateway: &Gateway, index: usize) {
    tokio::time::timeout(BOUND, async {
        while cooling(gateway, index).is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the backend never left its cooldown");
}

/// A header of a response, as text.
fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

/// An Azure-shaped error body.
fn azure_body(code: &str, message: &str) -> String {
    json!({ "error": { "code": code, "message": message } }).to_string()
}

/// A scripted answer: exactly this status, a JSON content type and this body.
fn respond(status: u16, body: &str) -> Fault {
    respond_with(status, &[], body)
}

fn respond_with(status: u16, headers: &[(&str, &str)], body: &str) -> Fault {
    let mut all = vec![("content-type".to_owned(), "application/json".to_owned())];
    all.extend(
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
    );
    Fault::Respond {
        status: StatusCode::from_u16(status).unwrap(),
        headers: all,
        body: body.to_owned(),
    }
}

/// The URL of a loopback port nothing listens on (bound, then released).
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// `len` deterministic pseudo-random bytes (xorshift): every byte value, no structure.
fn noise(len: usize) -> Bytes {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[5]
        })
        .collect::<Vec<u8>>()
        .into()
}

/// An HTTP-date (IMF-fixdate, RFC 9110), as `Retry-After` may carry.
fn http_date(time: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = i64::try_from(secs / 86_400).unwrap();
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[usize::try_from(days % 7).unwrap()],
        MONTHS[usize::try_from(month - 1).unwrap()],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[test]
fn http_date_formats_imf_fixdate() {
    let at = |secs| http_date(UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    assert_eq!(at(1_445_412_480), "Wed, 21 Oct 2015 07:28:00 GMT");
}

// ---- what is retried, and what is not ----

#[tokio::test]
async fn retryable_statuses_are_retried_on_the_other_backend() {
    for status in [408, 429, 500, 502, 503, 504] {
        let sims = sims(2).await;
        sims[0].push_fault(respond(
            status,
            &azure_body(&status.to_string(), "scripted"),
        ));
        let (_gateway, base) = start(builder_over(&sims)).await;

        let response = chat(&client(), &base).await;
        assert_eq!(response.status(), 200, "{status}");
        assert_eq!(served_by(&response), "b", "{status}");
        let reply: Value = response.json().await.unwrap();
        let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.starts_with("Hello from b "), "{status}: {text}");
        assert_eq!(counts(&sims), [1, 1], "{status}: one call each");
    }
}

#[tokio::test]
async fn a_content_filter_400_makes_one_call_and_reaches_the_caller_unchanged() {
    // Azure's own bytes, straight from an instance.
    let reference = aoai_sim::start(SimConfig::new("reference")).await;
    reference.push_fault(Fault::ContentFilter);
    let expected = client()
        .post(format!("{}{CHAT}", reference.url()))
        .json(&chat_body())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    let sims = sims(2).await;
    sims[0].push_fault(Fault::ContentFilter);
    let (_gateway, base) = start(builder_over(&sims)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 400);
    assert_eq!(served_by(&response), "a");
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body = response.bytes().await.unwrap();
    assert_eq!(body, expected);
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["error"]["code"], "content_filter");
    assert_eq!(counts(&sims), [1, 0]);
}

#[tokio::test]
async fn other_client_errors_are_never_retried() {
    for status in [404, 413, 422] {
        let sims = sims(2).await;
        let body = azure_body(&status.to_string(), &format!("scripted {status}"));
        sims[0].push_fault(respond(status, &body));
        let (_gateway, base) = start(builder_over(&sims)).await;

        let response = chat(&client(), &base).await;
        assert_eq!(response.status(), status);
        assert_eq!(served_by(&response), "a", "{status}");
        assert_eq!(response.text().await.unwrap(), body, "{status}");
        assert_eq!(counts(&sims), [1, 0], "{status}: one call");
    }
}

#[tokio::test]
async fn a_401_is_retried_once() {
    let a = aoai_sim::start(SimConfig::new("a").expect_api_key("key-a")).await;
    let b = aoai_sim::start(SimConfig::new("b")).await;
    let sims = [a, b];
    let (_gateway, base) = start(builder_over(&sims)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
    assert_eq!(counts(&sims), [1, 1]);

    // Every instance refuses: one retry, not one per backend.
    let mut sims = Vec::new();
    for name in ["a", "b", "c"] {
        sims.push(aoai_sim::start(SimConfig::new(name).expect_api_key("key")).await);
    }
    let (_gateway, base) = start(builder_over(&sims).max_attempts(3)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 401);
    assert_eq!(served_by(&response), "b");
    assert_azure_error(&response.text().await.unwrap(), "401");
    assert_eq!(counts(&sims), [1, 1, 0], "exactly two calls");
}

/// An instance that refuses the gateway's api-key is taken out of rotation after its first
/// 401 (no token refresh can mend a key), for the credential cooldown, and says why; every
/// caller is served by the other instance. Without a credential to blame, two 401s in a row
/// take an instance out (the first may be a stale token).
#[tokio::test]
async fn an_instance_refusing_the_gateways_credential_is_taken_out_of_rotation() {
    let a = aoai_sim::start(SimConfig::new("a").expect_api_key("key-a")).await;
    let b = aoai_sim::start(SimConfig::new("b")).await;
    let sims = [a, b];
    let wrong_key = aoai_tower::auth::AzureAuthLayer::from_api_key("not-key-a").unwrap();
    let builder = Gateway::builder()
        .backend_with_auth("a", sims[0].url(), wrong_key)
        .backend("b", sims[1].url());
    let (gateway, base) = start(builder).await;
    let client = client();
    for _ in 0..10 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "b");
    }
    assert_eq!(sims[0].request_count(), 1, "one 401, then nothing");
    let a = &gateway.health().snapshot()[0];
    assert_eq!(a.state.to_string(), "cooling", "{a:?}");
    assert_eq!(a.cooling_reason, Some("credential"), "{a:?}");
    assert!(
        a.cooling_down_for
            .is_some_and(|left| left > Duration::from_secs(200))
    );

    // No credential of the gateway's: the second 401 in a row takes it out.
    let a = aoai_sim::start(SimConfig::new("a").expect_api_key("key-a")).await;
    let b = aoai_sim::start(SimConfig::new("b")).await;
    let sims = [a, b];
    let (_gateway, base) = start(builder_over(&sims)).await;
    for _ in 0..10 {
        assert_eq!(served_by(&chat(&client, &base).await), "b");
    }
    assert_eq!(sims[0].request_count(), 2, "two 401s, then nothing");
}

/// A 403 (a missing role assignment) goes on to the other instance, and takes the refusing one
/// out of rotation at once.
#[tokio::test]
async fn a_403_goes_on_to_the_other_instance_and_cools_the_refusing_one() {
    let sims = sims(2).await;
    let body = azure_body(
        "PermissionDenied",
        "The principal lacks the required data action",
    );
    sims[0].push_fault(respond(403, &body));
    let (gateway, base) = start(builder_over(&sims)).await;
    let client = client();
    for _ in 0..3 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "b");
    }
    assert_eq!(counts(&sims), [1, 3]);
    let a = &gateway.health().snapshot()[0];
    assert_eq!(a.cooling_reason, Some("credential"), "{a:?}");
}

#[tokio::test]
async fn max_attempts_is_respected_exactly() {
    let sims_of_three = || async {
        let sims = sims(3).await;
        for sim in &sims {
            sim.push_fault(Fault::ServiceUnavailable);
        }
        sims
    };

    let sims = sims_of_three().await;
    let (_gateway, base) = start(builder_over(&sims).max_attempts(2)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 503);
    assert_eq!(served_by(&response), "b");
    assert_azure_error(&response.text().await.unwrap(), "ServiceUnavailable");
    assert_eq!(counts(&sims), [1, 1, 0], "exactly two calls");

    // The default: three.
    let sims = sims_of_three().await;
    let (_gateway, base) = start(builder_over(&sims)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 503);
    assert_eq!(served_by(&response), "c");
    assert_azure_error(&response.text().await.unwrap(), "ServiceUnavailable");
    assert_eq!(counts(&sims), [1, 1, 1], "exactly three calls");
}

// ---- where a retry goes ----

/// A backend `a` that records each request's `x-test-id`, holds it until the gate lets it go,
/// then answers 503.
#[derive(Debug, Clone)]
struct GatedFailure {
    seen: Arc<Mutex<Vec<String>>>,
    gate: Arc<Semaphore>,
}

async fn gated_503(State(backend): State<GatedFailure>, headers: HeaderMap) -> Response {
    let id = headers
        .get("x-test-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    backend.seen.lock().unwrap().push(id.to_owned());
    backend.gate.acquire().await.unwrap().forget();
    let body = azure_body("ServiceUnavailable", "scripted");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

#[tokio::test]
async fn a_retry_goes_to_an_untried_backend_never_the_one_that_just_failed() {
    let a = GatedFailure {
        seen: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let a_url = serve(Router::new().fallback(gated_503).with_state(a.clone())).await;
    let b = aoai_sim::start(SimConfig::new("b")).await;
    let c = aoai_sim::start(SimConfig::new("c")).await;
    let (_gateway, base) = start(
        Gateway::builder()
            .backend("a", a_url)
            .backend("b", b.url())
            .backend("c", c.url()),
    )
    .await;
    let client = client();
    let send = |id: &'static str| {
        client
            .post(format!("{base}{CHAT}"))
            .header("x-test-id", id)
            .json(&chat_body())
            .send()
    };

    // The first request goes to a, which holds it.
    let first = tokio::spawn(send("first"));
    tokio::time::timeout(BOUND, async {
        while a.seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a never received the first request");
    // Two more requests move the rotation round: the next pick starts at a again.
    let second = send("second").await.unwrap();
    let third = send("third").await.unwrap();
    assert_eq!(
        (served_by(&second), served_by(&third)),
        ("b".into(), "c".into())
    );

    // a fails; the retry skips a (tried) although the rotation points at it.
    a.gate.add_permits(10);
    let first = tokio::time::timeout(BOUND, first)
        .await
        .expect("the first request never finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(served_by(&first), "b");
    assert_eq!(*a.seen.lock().unwrap(), ["first"], "a is never retried");
    assert_eq!((b.request_count(), c.request_count()), (2, 1));
}

#[tokio::test]
async fn after_a_503_the_retry_goes_to_another_of_three() {
    let sims = sims(3).await;
    sims[0].push_fault(Fault::ServiceUnavailable);
    let (_gateway, base) = start(builder_over(&sims)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_ne!(served_by(&response), "a");
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(counts(&sims).iter().sum::<usize>(), 2);
}

// ---- Retry-After ----

#[tokio::test]
async fn a_throttled_backend_gets_nothing_during_its_retry_after_then_serves_again() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::Throttle {
        retry_after_secs: None,
        retry_after_ms: Some(1000),
    });
    let (gateway, base) = start(builder_over(&sims)).await;
    let client = client();

    let first = chat(&client, &base).await;
    assert_eq!(first.status(), 200);
    assert_eq!(served_by(&first), "b");
    assert_eq!(counts(&sims), [1, 1]);

    let mut while_cooling = 0;
    for _ in 0..6 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        // a cools until a fixed instant: cooling after the answer means cooling throughout.
        if cooling(&gateway, 0).is_some() {
            assert_eq!(served_by(&response), "b");
            assert_eq!(sims[0].request_count(), 1, "a got traffic while cooling");
            while_cooling += 1;
        }
    }
    assert!(while_cooling > 0, "no request was sent during a's cooldown");

    wait_until_available(&gateway, 0).await;
    let mut served = Vec::new();
    for _ in 0..2 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        served.push(served_by(&response));
    }
    assert!(served.contains(&"a".to_owned()), "{served:?}");
    assert_eq!(sims[0].request_count(), 2);
}

#[tokio::test]
async fn retry_after_ms_is_preferred_over_retry_after() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::Throttle {
        retry_after_secs: Some(60),
        retry_after_ms: Some(5000),
    });
    let (gateway, base) = start(builder_over(&sims)).await;
    assert_eq!(served_by(&chat(&client(), &base).await), "b");
    let cooling = cooling(&gateway, 0).expect("a cools down");
    assert!(cooling <= Duration::from_secs(5), "{cooling:?}");
    assert_eq!(gateway.health().snapshot()[0].throttled, 1);
}

#[tokio::test]
async fn an_http_date_retry_after_is_honoured() {
    let sims = sims(2).await;
    let date = http_date(SystemTime::now() + Duration::from_secs(30));
    sims[0].push_fault(respond_with(
        429,
        &[("retry-after", &date)],
        &azure_body("429", "Rate limit is exceeded."),
    ));
    let (gateway, base) = start(builder_over(&sims)).await;
    assert_eq!(served_by(&chat(&client(), &base).await), "b");
    let cooling = cooling(&gateway, 0).expect("a cools down");
    assert!(
        cooling > Duration::from_secs(20) && cooling <= Duration::from_secs(31),
        "{date}: {cooling:?}"
    );
}

#[tokio::test]
async fn a_huge_retry_after_is_capped_by_max_cooldown() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::throttle(86_400));
    let (gateway, base) = start(builder_over(&sims)).await;
    assert_eq!(served_by(&chat(&client(), &base).await), "b");
    let cooled = cooling(&gateway, 0).expect("a cools down");
    assert!(
        cooled > Duration::from_secs(250) && cooled <= Duration::from_secs(300),
        "default cap of 5 minutes: {cooled:?}"
    );

    for sim in &sims {
        sim.clear();
    }
    sims[0].push_fault(Fault::throttle(86_400));
    let capped = builder_over(&sims).max_cooldown(Duration::from_secs(10));
    let (gateway, base) = start(capped).await;
    assert_eq!(served_by(&chat(&client(), &base).await), "b");
    let cooled = cooling(&gateway, 0).expect("a cools down");
    assert!(
        cooled > Duration::from_secs(5) && cooled <= Duration::from_secs(10),
        "{cooled:?}"
    );
}

#[tokio::test]
async fn when_every_backend_cools_the_caller_gets_429_with_the_soonest_recovery() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::throttle(30));
    sims[1].push_fault(Fault::throttle(60));
    let (_gateway, base) = start(builder_over(&sims)).await;
    let client = client();

    let started = Instant::now();
    let response = chat(&client, &base).await;
    assert!(started.elapsed() < Duration::from_secs(5), "did not wait");
    assert_eq!(response.status(), 429);
    assert_eq!(served_by(&response), "b");
    // b asked for 60 s; the caller is told when the first backend (a) is back.
    let ms: u64 = header(&response, "retry-after-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 20_000 && ms <= 30_000, "retry-after-ms {ms}");
    let secs = ms.div_ceil(1000).to_string();
    assert_eq!(header(&response, "retry-after"), Some(secs.as_str()));
    // b's own window (60 s) would disagree with the wait the caller is given: removed.
    assert_eq!(header(&response, "x-ratelimit-reset-tokens"), None);
    assert_eq!(header(&response, "x-ratelimit-reset-requests"), None);
    assert_azure_error(&response.text().await.unwrap(), "429");
    assert_eq!(counts(&sims), [1, 1]);

    // Now no backend is contacted at all.
    let started = Instant::now();
    let response = chat(&client, &base).await;
    assert!(started.elapsed() < Duration::from_secs(5), "did not wait");
    assert_eq!(response.status(), 429);
    let again: u64 = header(&response, "retry-after-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        again > 20_000 && again <= ms,
        "retry-after-ms {again} after {ms}"
    );
    let secs = again.div_ceil(1000).to_string();
    assert_eq!(header(&response, "retry-after"), Some(secs.as_str()));
    assert_eq!(header(&response, "x-served-by"), None);
    assert_azure_error(&response.text().await.unwrap(), "429");
    assert_eq!(counts(&sims), [1, 1], "no backend contacted");
}

// ---- broken backends ----

#[tokio::test]
async fn a_backend_that_is_down_costs_the_callers_nothing() {
    let live = aoai_sim::start(SimConfig::new("live").record_requests(false)).await;
    let (gateway, base) = start(
        Gateway::builder()
            .backend("down", closed_port_url())
            .backend("live", live.url()),
    )
    .await;
    let client = client();

    const WORKERS: usize = 8;
    const EACH: usize = 125;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (client, base) = (client.clone(), base.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..EACH {
                match client
                    .post(format!("{base}{CHAT}"))
                    .json(&chat_body())
                    .send()
                    .await
                {
                    Ok(response) if response.status() == 200 && served_by(&response) == "live" => {
                        response.bytes().await.unwrap();
                    }
                    Ok(response) => failures.push(format!(
                        "{} from {:?}",
                        response.status(),
                        served_by(&response)
                    )),
                    Err(error) => failures.push(error.to_string()),
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} errors: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(live.request_count(), WORKERS * EACH);
    let down = &gateway.health().snapshot()[0];
    assert!(
        down.failed >= 1 && down.cooling_down_for.is_some(),
        "{down:?}"
    );
}

#[tokio::test]
async fn a_hung_backend_times_out_and_the_next_one_serves() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::Hang);
    let (gateway, base) =
        start(builder_over(&sims).attempt_timeout(Duration::from_millis(300))).await;

    let started = Instant::now();
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(counts(&sims), [1, 1]);
    assert!(cooling(&gateway, 0).is_some(), "a timed out: it cools down");
}

#[tokio::test]
async fn a_connection_dropped_mid_body_is_not_retried_and_the_caller_sees_a_broken_body() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::DropMidBody);
    let (_gateway, base) = start(builder_over(&sims)).await;
    let client = client();

    let response = chat(&client, &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");
    let read = tokio::time::timeout(Duration::from_secs(5), response.bytes())
        .await
        .expect("the broken body hung instead of failing");
    let error = read.expect_err("the body should be broken");
    assert!(!error.is_timeout(), "{error}");
    assert_eq!(counts(&sims), [1, 0], "not retried");

    // The gateway goes on serving.
    let next = chat(&client, &base).await;
    assert_eq!(next.status(), 200);
    next.bytes().await.unwrap();
}

// ---- the body ----

#[tokio::test]
async fn the_body_is_replayed_byte_for_byte() {
    let sims = sims(2).await;
    sims[0].push_fault(Fault::InternalError);
    sims[1].push_fault(respond(200, r#"{"ok":true}"#));
    let (_gateway, base) = start(builder_over(&sims)).await;
    let payload = noise(1024 * 1024);

    let response = client()
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
    assert_eq!(response.text().await.unwrap(), r#"{"ok":true}"#);
    for sim in &sims {
        let requests = sim.requests();
        assert_eq!(requests.len(), 1, "{}", sim.name());
        assert!(
            requests[0].body == payload,
            "{} got other bytes",
            sim.name()
        );
        assert_eq!(
            requests[0].path,
            "/openai/deployments/gpt-4o/chat/completions"
        );
        assert_eq!(requests[0].query.as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(
            requests[0].header("content-type"),
            Some("application/octet-stream")
        );
    }
}

#[tokio::test]
async fn three_failing_backends_receive_three_identical_bodies() {
    let sims = sims(3).await;
    for sim in &sims {
        sim.push_fault(Fault::ServiceUnavailable);
    }
    let (_gateway, base) = start(builder_over(&sims)).await;
    let payload = noise(256 * 1024);

    let response = client()
        .post(format!("{base}{CHAT}"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let bodies: Vec<Bytes> = sims
        .iter()
        .flat_map(|sim| sim.requests())
        .map(|request| request.body)
        .collect();
    assert_eq!(bodies.len(), 3);
    assert!(bodies.iter().all(|body| *body == payload), "a body differs");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_and_nothing_is_sent() {
    let sims = sims(2).await;
    let (_gateway, base) = start(builder_over(&sims).body_limit(1024)).await;
    let client = client();
    let url = format!("{base}{CHAT}");

    // With a content-length.
    let response = client
        .post(&url)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_azure_error(&response.text().await.unwrap(), "request_body_too_large");
    assert_eq!(counts(&sims), [0, 0]);

    // Chunked, with no length declared.
    let chunks = futures_util::stream::iter(
        [vec![b'y'; 1024], vec![b'z'; 1024]]
            .map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))),
    );
    let response = client
        .post(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_azure_error(&response.text().await.unwrap(), "request_body_too_large");
    assert_eq!(counts(&sims), [0, 0]);

    // Exactly the limit goes through.
    let mut body = serde_json::to_vec(&chat_body()).unwrap();
    body.resize(1024, b' ');
    let response = client.post(&url).body(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(counts(&sims), [1, 0]);
}
