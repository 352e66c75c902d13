//! Turning the stack's errors into the responses callers see, in Azure's error shape.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::io;

use aoai_auth::error::TokenUnavailable;
use aoai_balance::{
    AllCoolingDown, AzureOpenAiClassifier, Classify, Failure, NoBackends, Outcome,
    UnknownDeployment,
};
use aoai_rebase::InvalidPath;
use aoai_retry::{BodyReadError, BodyTooLarge, DeadlineElapsed};
use aoai_usage::LimitExceeded;
use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};
use tower_http::timeout::TimeoutError;

/// The response for an error of the stack, shaped like Azure's own errors
/// (`{"error":{"code":"...","message":"..."}}`) so the OpenAI and Azure SDKs parse them.
///
/// | error | status |
/// | --- | --- |
/// | [`BodyTooLarge`] | 413 |
/// | [`BodyReadError`], a refused request path | 400 |
/// | [`BodyReadError`] of a body that stopped arriving (tower-http's [`TimeoutError`], or an [`io::Error`] of kind `TimedOut`) | 408 |
/// | [`AllCoolingDown`] | 429, with `Retry-After` and `retry-after-ms` |
/// | [`LimitExceeded`] (a caller over its tokens or requests per minute) | 429, with `Retry-After` and `retry-after-ms`: when it may go on |
/// | [`TokenUnavailable`] | 503, with `Retry-After` and `retry-after-ms`: when a fresh token fetch is due |
/// | [`NoBackends`] | 503 |
/// | [`UnknownDeployment`] (no instance serves the deployment asked for) | 404 `DeploymentNotFound` |
/// | a timeout (attempt or deadline) | 504 |
/// | a backend that cannot be reached, or any other error | 502 |
///
/// The message is the error's chain of `Display`s, which the crates keep free of secrets.
pub fn error_response(error: &(dyn StdError + 'static)) -> Response<Body> {
    error_response_with(error, &message(error))
}

/// [`error_response`] with the message already made (the gateway logs it too).
pub(crate) fn error_response_with(
    error: &(dyn StdError + 'static),
    message: &str,
) -> Response<Body> {
    let (status, code) = classify(error);
    let mut response = azure_error(status, code, message);
    if let Some(cooling) = find::<AllCoolingDown>(error) {
        aoai_retry::set_retry_after(&mut response, cooling.retry_after());
    } else if let Some(exceeded) = find::<LimitExceeded>(error) {
        aoai_retry::set_retry_after(&mut response, exceeded.retry_after());
    } else if let Some(unavailable) = find::<TokenUnavailable>(error) {
        aoai_retry::set_retry_after(&mut response, unavailable.retry_after());
    }
    response
}

/// A response with Azure's error shape.
pub fn azure_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn classify(error: &(dyn StdError + 'static)) -> (StatusCode, &'static str) {
    if find::<BodyTooLarge>(error).is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "request_body_too_large")
    } else if find::<BodyReadError>(error).is_some() {
        if find::<TimeoutError>(error).is_some()
            || find::<io::Error>(error).is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
        {
            (StatusCode::REQUEST_TIMEOUT, "request_body_timeout")
        } else {
            (StatusCode::BAD_REQUEST, "invalid_request_body")
        }
    } else if find::<AllCoolingDown>(error).is_some() || find::<LimitExceeded>(error).is_some() {
        (StatusCode::TOO_MANY_REQUESTS, "429")
    } else if find::<TokenUnavailable>(error).is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable")
    } else if find::<UnknownDeployment>(error).is_some() {
        (StatusCode::NOT_FOUND, "DeploymentNotFound")
    } else if find::<NoBackends>(error).is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "no_backends")
    } else if find::<InvalidPath>(error).is_some() {
        (StatusCode::BAD_REQUEST, "invalid_path")
    } else if find::<tower::timeout::error::Elapsed>(error).is_some()
        || find::<DeadlineElapsed>(error).is_some()
    {
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    } else if AzureOpenAiClassifier.classify_error(error) == Outcome::Failed(Failure::Connect) {
        (StatusCode::BAD_GATEWAY, "backend_unreachable")
    } else {
        (StatusCode::BAD_GATEWAY, "bad_gateway")
    }
}

/// The first error of type `E` in the source chain of `error`.
pub(crate) fn find<'a, E: StdError + 'static>(
    error: &'a (dyn StdError + 'static),
) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// The `Display`s of the chain, joined with ": ", skipping a source whose text its parent
/// already shows.
pub(crate) fn message(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(err) = current {
        let part = err.to_string();
        if !text.contains(&part) {
            let _ = write!(text, ": {part}");
        }
        current = err.source();
    }
    text
}
