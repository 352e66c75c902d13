//! Errors produced by [`AzureAuth`](crate::AzureAuth) and its constructors.

use std::{borrow::Cow, error::Error as StdError, fmt, time::Duration};

use azure_core::error::ErrorKind;
use http::StatusCode;

/// No valid access token was cached and none could be had within the request's token wait.
///
/// [`AzureAuth`](crate::AzureAuth) returns this error (boxed) instead of calling the backend. A
/// gateway answers it with `503 Service Unavailable` (see [`TokenUnavailable::status`]) and a
/// `Retry-After` of [`TokenUnavailable::retry_after`]. A request gets it either when the fetch
/// attempt it waited for failed (at once, with that attempt's reason) or when its token wait
/// ran out first (with the last failed attempt's reason, or "the token endpoint has not answered
/// yet"); see [`TokenCache`](crate::TokenCache).
///
/// The reason is a fixed summary of what failed (for example "the token endpoint answered HTTP
/// 500"), never the credential's own message: that message may quote the token endpoint's
/// response body, so it is not kept, and [`source`](StdError::source) is `None`. The details are
/// in the credential's own logs.
#[derive(Debug, Clone)]
pub struct TokenUnavailable {
    reason: Cow<'static, str>,
    retry_after: Duration,
}

/// The least [`TokenUnavailable::retry_after`].
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

impl TokenUnavailable {
    pub(crate) fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
            retry_after: MIN_RETRY_AFTER,
        }
    }

    /// The same error, telling the caller to try again after `retry_after` (at least 1 s).
    pub(crate) fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after.max(MIN_RETRY_AFTER);
        self
    }

    /// Summarizes a credential error by its kind alone: the kinds down the source chain say where
    /// it failed without quoting anything the token endpoint or the credential wrote.
    pub(crate) fn from_credential_error(error: &azure_core::Error) -> Self {
        let mut reason = "the credential failed";
        let mut next: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(error) = next {
            if let Some(error) = error.downcast_ref::<azure_core::Error>() {
                match error.kind() {
                    ErrorKind::HttpResponse { status, .. } => {
                        return Self::new(format!("the token endpoint answered HTTP {status}"));
                    }
                    ErrorKind::Connection => reason = "could not connect to the token endpoint",
                    ErrorKind::Io => reason = "an I/O error occurred while obtaining the token",
                    ErrorKind::DataConversion => {
                        reason = "the token endpoint's answer could not be read";
                    }
                    _ => {}
                }
            }
            next = error.source();
        }
        Self::new(reason)
    }

    /// Why no token could be obtained, without any secret.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How long the caller should wait before trying again: until the token cache's next fetch
    /// attempt is due for a request arriving then (the running attempt's deadline, or 1 s after
    /// the last attempt started), never less than 1 s.
    ///
    /// A gateway sends it as `Retry-After` (rounded up to whole seconds) with its 503.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The status a gateway answers this error with: `503 Service Unavailable`.
    pub fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

impl fmt::Display for TokenUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not obtain an access token for Azure OpenAI: {}",
            self.reason
        )
    }
}

impl StdError for TokenUnavailable {}

/// The api-key given to [`AzureAuthLayer::from_api_key`](crate::AzureAuthLayer::from_api_key) is
/// not a valid HTTP header value.
///
/// Neither `Debug` nor `Display` shows the key.
#[derive(Debug)]
pub struct InvalidApiKey(pub(crate) ());

impl fmt::Display for InvalidApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the api-key is not a valid HTTP header value")
    }
}

impl StdError for InvalidApiKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::StatusCode as AzureStatus;

    #[test]
    fn reason_names_the_http_status_found_down_the_chain() {
        let inner = azure_core::Error::with_message(
            ErrorKind::HttpResponse {
                status: AzureStatus::InternalServerError,
                error_code: Some("body-secret".to_owned()),
                raw_response: None,
            },
            "The request failed: body-secret",
        );
        let outer = azure_core::Error::with_error(
            ErrorKind::Credential,
            inner,
            "ManagedIdentityCredential authentication failed. body-secret",
        );
        let error = TokenUnavailable::from_credential_error(&outer);
        assert_eq!(error.reason(), "the token endpoint answered HTTP 500");
        assert!(!error.to_string().contains("body-secret"));
    }

    #[test]
    fn reason_keeps_the_deepest_known_kind() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "io-secret");
        let inner = azure_core::Error::with_error(ErrorKind::Connection, io, "connect-secret");
        let outer = azure_core::Error::with_error(ErrorKind::Credential, inner, "outer-secret");
        let error = TokenUnavailable::from_credential_error(&outer);
        assert_eq!(error.reason(), "could not connect to the token endpoint");
        assert_eq!(
            error.to_string(),
            "could not obtain an access token for Azure OpenAI: could not connect to the token endpoint"
        );
        assert!(!format!("{error:?}").contains("secret"));
    }

    #[test]
    fn reason_of_an_opaque_credential_error_is_generic() {
        let error = azure_core::Error::with_message(ErrorKind::Credential, "password=hunter2");
        let error = TokenUnavailable::from_credential_error(&error);
        assert_eq!(error.reason(), "the credential failed");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn retry_after_is_at_least_a_second() {
        let error = TokenUnavailable::new("x");
        assert_eq!(error.retry_after(), Duration::from_secs(1));
        let error = error.with_retry_after(Duration::from_millis(200));
        assert_eq!(error.retry_after(), Duration::from_secs(1));
        let error = error.with_retry_after(Duration::from_millis(2500));
        assert_eq!(error.retry_after(), Duration::from_millis(2500));
    }
}

/// Marks a `401 Unauthorized` that no token refresh can mend, in the response's extensions:
/// the instance refused the api-key [`AzureAuth`](crate::AzureAuth) sent. A balancer can take
/// the instance out of rotation at once (the `aoai-tower` gateway's classifier does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialRejected;
