use std::{sync::Arc, time::Duration};

use azure_core::credentials::TokenCredential;
use bytes::Bytes;
use http::HeaderValue;
use tower::Layer;

use crate::{AzureAuth, Credentials, DEFAULT_SCOPE, TokenCache, error::InvalidApiKey};

/// Applies [`AzureAuth`] to a service: sets a bearer token or an api-key on every request.
///
/// The layer holds configuration only: a [`TokenCache`] handle (shared by every service the
/// layer builds) or the api-key. Its `Debug` output never shows a token or a key.
#[derive(Debug, Clone)]
pub struct AzureAuthLayer {
    credentials: Credentials,
}

impl AzureAuthLayer {
    /// Authenticates with `Authorization: Bearer <token>` from `credential`, for
    /// [`DEFAULT_SCOPE`] (Azure OpenAI) unless [`with_scope`](Self::with_scope) sets another.
    ///
    /// Creates one [`TokenCache`], shared by every service this layer (or a clone of it) builds.
    pub fn from_credential(credential: Arc<dyn TokenCredential>) -> Self {
        Self::from_cache(TokenCache::new(credential, DEFAULT_SCOPE))
    }

    /// Authenticates with `Authorization: Bearer <token>` from `cache`.
    ///
    /// Give several layers (one per backend) clones of the same cache to fetch one token for all
    /// of them.
    pub fn from_cache(cache: TokenCache) -> Self {
        Self {
            credentials: Credentials::Bearer(cache),
        }
    }

    /// Authenticates with the `api-key` header instead of a token.
    ///
    /// # Errors
    ///
    /// [`InvalidApiKey`] if `key` is not a valid HTTP header value.
    ///
    /// # Example
    ///
    /// ```
    /// use aoai_auth::AzureAuthLayer;
    ///
    /// let layer = AzureAuthLayer::from_api_key("0123456789abcdef")?;
    /// assert!(!format!("{layer:?}").contains("0123456789abcdef"));
    /// # Ok::<_, aoai_auth::error::InvalidApiKey>(())
    /// ```
    pub fn from_api_key(key: &str) -> Result<Self, InvalidApiKey> {
        let mut key = HeaderValue::from_maybe_shared(Bytes::from_owner(key.to_owned()))
            .map_err(|_| InvalidApiKey(()))?;
        key.set_sensitive(true);
        Ok(Self {
            credentials: Credentials::ApiKey(key),
        })
    }

    /// Makes requests wait at most `wait` for a token when none is cached (default
    /// [`DEFAULT_TOKEN_WAIT`](crate::DEFAULT_TOKEN_WAIT), 3 s); then they fail with
    /// [`TokenUnavailable`](crate::error::TokenUnavailable). See
    /// [`TokenCache::with_token_wait`]; it applies to the services this layer builds from now on.
    /// An api-key layer is returned unchanged.
    pub fn with_token_wait(self, wait: Duration) -> Self {
        match self.credentials {
            Credentials::Bearer(cache) => Self::from_cache(cache.with_token_wait(wait)),
            Credentials::ApiKey(_) => self,
        }
    }

    /// Bounds each attempt to fetch a token to `timeout` (default
    /// [`DEFAULT_FETCH_TIMEOUT`](crate::DEFAULT_FETCH_TIMEOUT), 5 s). See
    /// [`TokenCache::with_fetch_timeout`]: it is a setting of the cache, shared by every layer
    /// built from it. An api-key layer is returned unchanged.
    pub fn with_fetch_timeout(self, timeout: Duration) -> Self {
        match self.credentials {
            Credentials::Bearer(cache) => Self::from_cache(cache.with_fetch_timeout(timeout)),
            Credentials::ApiKey(_) => self,
        }
    }

    /// Requests tokens for `scope` instead of [`DEFAULT_SCOPE`].
    ///
    /// This starts a new [`TokenCache`] for the same credential, with the same settings: build
    /// the layer with [`from_cache`](Self::from_cache) to share a cache for another scope. An
    /// api-key layer is returned unchanged.
    pub fn with_scope(self, scope: impl Into<String>) -> Self {
        match self.credentials {
            Credentials::Bearer(cache) => Self::from_cache(cache.for_scope(scope)),
            Credentials::ApiKey(_) => self,
        }
    }
}

impl AzureAuthLayer {
    /// The token cache of a bearer-token layer; `None` for an api-key layer (a key is always at
    /// hand). Two layers with the same cache fail to get a token together.
    pub fn token_cache(&self) -> Option<&TokenCache> {
        match &self.credentials {
            Credentials::Bearer(cache) => Some(cache),
            Credentials::ApiKey(_) => None,
        }
    }
}

impl<S> Layer<S> for AzureAuthLayer {
    type Service = AzureAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AzureAuth::new(inner, self.credentials.clone())
    }
}
