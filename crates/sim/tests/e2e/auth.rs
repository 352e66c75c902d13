//! Credential checks: `api-key`, `Authorization: Bearer`, both, neither.

use aoai_sim::{Fault, SimConfig, SimHandle};

use crate::support::{assert_same_shape, chat_url, client, fixture, hello, json_of};

async fn status_with(sim: &SimHandle, headers: &[(&str, &str)]) -> u16 {
    let mut request = client().post(chat_url(sim)).json(&hello());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn api_key_is_required_when_expected() {
    let sim = aoai_sim::start(SimConfig::new("eastus").expect_api_key("key-1")).await;
    assert_eq!(status_with(&sim, &[("api-key", "key-1")]).await, 200);
    assert_eq!(status_with(&sim, &[("api-key", "key-2")]).await, 401);
    assert_eq!(status_with(&sim, &[]).await, 401);
    assert_eq!(
        status_with(&sim, &[("authorization", "Bearer key-1")]).await,
        401
    );

    let response = client()
        .post(chat_url(&sim))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("error_401.json"));
    assert_eq!(body, fixture("error_401.json"));
}

#[tokio::test]
async fn bearer_token_is_required_when_expected() {
    let sim = aoai_sim::start(SimConfig::new("eastus").expect_bearer("tok")).await;
    assert_eq!(
        status_with(&sim, &[("authorization", "Bearer tok")]).await,
        200
    );
    assert_eq!(
        status_with(&sim, &[("authorization", "bearer tok")]).await,
        200
    );
    assert_eq!(
        status_with(&sim, &[("authorization", "Bearer other")]).await,
        401
    );
    assert_eq!(
        status_with(&sim, &[("authorization", "Basic tok")]).await,
        401
    );
    assert_eq!(status_with(&sim, &[("api-key", "tok")]).await, 401);

    let response = client()
        .post(chat_url(&sim))
        .bearer_auth("expired")
        .json(&hello())
        .send()
        .await
        .unwrap();
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("error_401.json"));
    assert_eq!(body["error"]["code"], "401");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Access token is missing, invalid")
    );
}

#[tokio::test]
async fn either_credential_is_accepted_when_both_are_expected() {
    let config = SimConfig::new("eastus")
        .expect_api_key("key-1")
        .expect_bearer("tok");
    let sim = aoai_sim::start(config).await;
    assert_eq!(status_with(&sim, &[("api-key", "key-1")]).await, 200);
    assert_eq!(
        status_with(&sim, &[("authorization", "Bearer tok")]).await,
        200
    );
    assert_eq!(
        status_with(
            &sim,
            &[("api-key", "nope"), ("authorization", "Bearer tok")]
        )
        .await,
        200
    );
    assert_eq!(status_with(&sim, &[("api-key", "tok")]).await, 401);
    assert_eq!(status_with(&sim, &[]).await, 401);
}

#[tokio::test]
async fn nothing_is_checked_when_nothing_is_expected() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    assert_eq!(status_with(&sim, &[]).await, 200);
    assert_eq!(status_with(&sim, &[("api-key", "anything")]).await, 200);
}

#[tokio::test]
async fn refused_requests_are_recorded_and_faults_come_first() {
    let sim = aoai_sim::start(SimConfig::new("eastus").expect_api_key("key-1")).await;
    assert_eq!(status_with(&sim, &[("api-key", "wrong")]).await, 401);
    sim.push_fault(Fault::ServiceUnavailable);
    assert_eq!(status_with(&sim, &[]).await, 503);
    let recorded = sim.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].header("api-key"), Some("wrong"));
}

#[tokio::test]
async fn config_debug_hides_credentials() {
    let config = SimConfig::new("eastus")
        .expect_api_key("super-secret-key")
        .expect_bearer("super-secret-token");
    let debug = format!("{config:?}");
    assert!(!debug.contains("super-secret"), "{debug}");
    assert!(debug.contains("eastus"));
}
