//! Api-key mode end to end: a backend on 127.0.0.1, requests forwarded over real sockets.

mod support {
    pub(crate) mod backend;
    pub(crate) mod capture;
}

use aoai_auth::{AzureAuthLayer, error::InvalidApiKey};
use http::StatusCode;
use tower::{Layer, ServiceExt};

use support::{
    backend::{Backend, forward, request_with_caller_credentials},
    capture::Capture,
};

const KEY: &str = "api-key-secret-0c9d27";

#[tokio::test]
async fn api_key_replaces_the_callers_credentials() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber());
    let backend = Backend::start().await;
    let layer = AzureAuthLayer::from_api_key(KEY).unwrap();
    let service = layer.layer(forward(backend.base()));

    for _ in 0..3 {
        let response = service
            .clone()
            .oneshot(request_with_caller_credentials())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    for seen in &seen {
        assert_eq!(seen.api_key, [KEY]);
        assert!(seen.authorization.is_empty(), "{seen:?}");
    }

    // A 401 in api-key mode is passed through as it is.
    backend.reject(KEY);
    let response = service
        .clone()
        .oneshot(request_with_caller_credentials())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let debug = format!("{layer:?} {service:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    let logs = capture.text();
    assert!(!logs.is_empty());
    for secret in [KEY, "caller-key-secret", "caller-token-secret"] {
        assert!(!debug.contains(secret), "{debug}");
        assert!(!logs.contains(secret), "{logs}");
    }
}

#[test]
fn an_invalid_api_key_is_refused_without_showing_it() {
    let error: InvalidApiKey = AzureAuthLayer::from_api_key("key\nsecret").unwrap_err();
    assert_eq!(
        error.to_string(),
        "the api-key is not a valid HTTP header value"
    );
    assert!(!format!("{error:?}").contains("secret"));
}
