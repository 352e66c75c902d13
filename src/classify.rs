//! [`GatewayClassifier`]: Azure OpenAI's rules, with credential failures told apart.

use std::error::Error as StdError;

use aoai_auth::error::{CredentialRejected, TokenUnavailable};
use aoai_balance::{AzureOpenAiClassifier, Classify, Outcome};
use http::{HeaderMap, StatusCode};

use crate::error::find;
use crate::pinning::{MayHaveActed, MayHaveActedAnswer, NotHere};

/// Azure OpenAI's rules ([`AzureOpenAiClassifier`]), and one of its own: a token that could not
/// be had ([`TokenUnavailable`]) never counts against a backend's health, and is retried only
/// where it can help. It is [`Outcome::CredentialUnavailable`]:
///
/// - with backends that authenticate in more than one way (several token caches, or an api-key
///   beside a token), retried at once on a backend not tried yet, whose credential may work;
/// - with one credential for every backend, not retried: another backend would wait for the
///   same token, so the caller gets its 503 at once.
///
/// [`Gateway`](crate::Gateway) sets it up from its backends; give it to `Balance` and
/// `RetryNextBackendLayer` alike when composing the layers yourself.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayClassifier {
    several_credentials: bool,
}

impl GatewayClassifier {
    /// For backends that authenticate in more than one way (`true`), or all with one
    /// credential (`false`).
    pub fn new(several_credentials: bool) -> Self {
        Self {
            several_credentials,
        }
    }
}

impl Classify for GatewayClassifier {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        AzureOpenAiClassifier.classify_response(status, headers)
    }

    /// A 401 that no token refresh can mend (an api-key the instance refused, marked by
    /// `AzureAuth`) is [`Outcome::Forbidden`]: the instance is out of rotation at once, and the
    /// request goes on to another.
    ///
    /// An answer [`PinLayer`](crate::PinLayer) marked is [`Outcome::NotHere`] (the instance
    /// does not hold the object the request names: ask the next) or [`Outcome::Final`] (a
    /// request creating an object failed where the instance may have acted: never repeated).
    fn classify_answer<B>(&self, response: &http::Response<B>) -> Outcome {
        let extensions = response.extensions();
        if response.status() == StatusCode::UNAUTHORIZED
            && extensions.get::<CredentialRejected>().is_some()
        {
            return Outcome::Forbidden;
        }
        if extensions.get::<NotHere>().is_some() {
            return Outcome::NotHere;
        }
        if extensions.get::<MayHaveActedAnswer>().is_some() {
            return Outcome::Final;
        }
        self.classify_response(response.status(), response.headers())
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        if find::<MayHaveActed>(error).is_some() {
            return Outcome::Final;
        }
        match find::<TokenUnavailable>(error) {
            Some(_) => Outcome::CredentialUnavailable {
                retry_elsewhere: self.several_credentials,
            },
            None => AzureOpenAiClassifier.classify_error(error),
        }
    }
}
