//! The token cache shared by every backend that authenticates with the same credential and scope.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use azure_core::{
    credentials::{AccessToken, TokenCredential},
    time::OffsetDateTime,
};
use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use crate::error::TokenUnavailable;

/// The scope of Azure OpenAI (Azure AI services), used unless another one is set.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// Long-lived tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Tokens that live less than this are refreshed at half their lifetime instead.
const SHORT_LIVED: Duration = Duration::from_secs(10 * 60);
/// The first pause after a failed background refresh; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The `Authorization: Bearer` header for one credential and scope, fetched once and shared.
///
/// Every [`AzureAuth`](crate::AzureAuth) built from the same cache (clones included) sends the
/// same cached token, so several backends that use one identity cost one token fetch. Cloning a
/// `TokenCache` is cheap and shares the cache.
///
/// - The first request, and any request made while no valid token is cached, waits for the
///   credential. Concurrent waiters share one fetch; if that fetch fails, they all get
///   [`TokenUnavailable`] and the next request tries again.
/// - Once a token is cached, requests never wait: the ready header value is cloned out of the
///   cache (a reference count increment). When the token has 5 minutes left (half its lifetime
///   for tokens that live less than 10 minutes), the request that notices it spawns a background
///   refresh on the Tokio runtime; one refresh runs at a time and the old token stays in use
///   until the new one arrives.
/// - A failed background refresh is logged as a warning (the reason only, never a token) and
///   retried after 1 s, doubling up to 30 s, until it succeeds or the token expires.
/// - A `401 Unauthorized` from a backend drops the token that request carried, if it is still
///   the cached one, so the next request fetches a new one (see the crate docs, "401 contract").
///
/// A token counts as valid until the expiry the credential reported. The cache asks the
/// credential for a token whenever it needs one; credentials that cache tokens themselves (as
/// `azure_identity`'s do, while a token has more than 5 minutes left) may answer from their own
/// cache.
#[derive(Clone)]
pub struct TokenCache {
    shared: Arc<Shared>,
}

struct Shared {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    /// The token requests use: read by every request, written once per fetch or 401.
    current: RwLock<Option<Cached>>,
    /// Held while the credential is asked for a token, so there is one fetch at a time.
    fetch: tokio::sync::Mutex<FetchState>,
    /// Counts finished fetches, successful or not. Read without the `fetch` lock, it tells a
    /// request that waited for the lock whether a fetch finished meanwhile.
    fetches: AtomicU64,
    /// True while a background refresh task exists.
    refreshing: AtomicBool,
}

struct Cached {
    header: HeaderValue,
    generation: u64,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Default)]
struct FetchState {
    /// The generation of the last token fetched; 401s name the token they saw by it.
    generation: u64,
    /// Why the last fetch failed, for the requests that waited on it.
    last_error: Option<TokenUnavailable>,
}

/// A cached token as one request uses it.
pub(crate) struct Bearer {
    pub(crate) header: HeaderValue,
    pub(crate) generation: u64,
}

/// Waits for a token when none is cached. Boxed like the credential's own future; requests that
/// find a valid token never create one.
pub(crate) type TokenFuture =
    Pin<Box<dyn Future<Output = Result<Bearer, TokenUnavailable>> + Send>>;

impl TokenCache {
    /// Creates an empty cache of tokens for `scope` from `credential`.
    ///
    /// Nothing is fetched until the first request. Use [`DEFAULT_SCOPE`] for Azure OpenAI.
    pub fn new(credential: Arc<dyn TokenCredential>, scope: impl Into<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                credential,
                scope: scope.into(),
                current: RwLock::new(None),
                fetch: tokio::sync::Mutex::new(FetchState::default()),
                fetches: AtomicU64::new(0),
                refreshing: AtomicBool::new(false),
            }),
        }
    }

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        &self.shared.scope
    }

    pub(crate) fn credential(&self) -> &Arc<dyn TokenCredential> {
        &self.shared.credential
    }

    /// The cached token if it is valid, starting a background refresh when one is due.
    ///
    /// This is the hot path: one read lock and a reference count increment.
    pub(crate) fn current(&self) -> Option<Bearer> {
        let now = Instant::now();
        let (bearer, refresh_due) = self.valid_with(now, |cached| {
            let bearer = Bearer {
                header: cached.header.clone(),
                generation: cached.generation,
            };
            (bearer, now >= cached.refresh_at)
        })?;
        if refresh_due {
            self.start_refresh(bearer.generation);
        }
        Some(bearer)
    }

    /// Waits for a valid token: the cached one if another request fetched it meanwhile, else a
    /// new one from the credential.
    pub(crate) fn acquire(&self) -> TokenFuture {
        let cache = self.clone();
        Box::pin(async move { cache.fetch_unless_valid().await })
    }

    /// Drops the cached token if it is still the one of `generation` (compare-and-invalidate), so
    /// that many requests that failed with the same token cause one new fetch.
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut current = self
            .shared
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current
            .as_ref()
            .is_some_and(|cached| cached.generation == generation)
        {
            *current = None;
            drop(current);
            tracing::debug!(
                scope = %self.shared.scope,
                "a backend answered 401; the cached token was dropped and the next request fetches a new one"
            );
        }
    }

    fn valid_with<T>(&self, now: Instant, f: impl FnOnce(&Cached) -> T) -> Option<T> {
        let current = self
            .shared
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|cached| now < cached.expires_at)
            .map(f)
    }

    async fn fetch_unless_valid(&self) -> Result<Bearer, TokenUnavailable> {
        let finished = self.shared.fetches.load(Ordering::Acquire);
        let mut state = self.shared.fetch.lock().await;
        if let Some(bearer) = self.current() {
            return Ok(bearer);
        }
        if self.shared.fetches.load(Ordering::Acquire) != finished {
            // A fetch finished while this request waited for the lock and left no valid token:
            // share its failure rather than asking the credential again at once.
            if let Some(error) = &state.last_error {
                return Err(error.clone());
            }
        }
        self.fetch_locked(&mut state).await
    }

    /// Asks the credential for a token and caches it. The caller holds the `fetch` lock.
    async fn fetch_locked(&self, state: &mut FetchState) -> Result<Bearer, TokenUnavailable> {
        let scopes = [self.shared.scope.as_str()];
        let fetched = match self.shared.credential.get_token(&scopes, None).await {
            Ok(token) => Issued::new(&token),
            Err(error) => Err(TokenUnavailable::from_credential_error(&error)),
        };
        let result = match fetched {
            Ok(issued) => {
                state.generation += 1;
                state.last_error = None;
                let now = Instant::now();
                let refresh_after = refresh_after(issued.lifetime);
                let bearer = Bearer {
                    header: issued.header.clone(),
                    generation: state.generation,
                };
                *self
                    .shared
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Cached {
                    header: issued.header,
                    generation: state.generation,
                    refresh_at: now + refresh_after,
                    expires_at: now + issued.lifetime,
                });
                tracing::debug!(
                    scope = %self.shared.scope,
                    lifetime = ?issued.lifetime,
                    refresh_in = ?refresh_after,
                    "obtained an access token"
                );
                Ok(bearer)
            }
            Err(error) => {
                state.last_error = Some(error.clone());
                Err(error)
            }
        };
        self.shared.fetches.fetch_add(1, Ordering::Release);
        result
    }

    fn start_refresh(&self, generation: u64) {
        if self
            .shared
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let refresh = Refresh(self.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(refresh.run(generation));
            }
            // Dropping `refresh` clears the flag, so a later request tries again.
            Err(_) => {
                tracing::debug!(
                    scope = %self.shared.scope,
                    "no Tokio runtime to refresh the token in the background; it is fetched again when it expires"
                );
            }
        }
    }
}

/// A background refresh; clears the `refreshing` flag when it ends or is dropped.
struct Refresh(TokenCache);

impl Refresh {
    /// Replaces the token of `generation`, retrying with backoff while it stays valid.
    async fn run(self, generation: u64) {
        let cache = &self.0;
        let mut retry_in = FIRST_RETRY;
        loop {
            let result = {
                let mut state = cache.shared.fetch.lock().await;
                // A request may have replaced the token meanwhile (after a 401, or after it
                // expired): then there is nothing left to refresh here.
                if cache.valid_with(Instant::now(), |cached| cached.generation) != Some(generation)
                {
                    return;
                }
                cache.fetch_locked(&mut state).await
            };
            let Err(error) = result else {
                return;
            };
            let now = Instant::now();
            let Some(expires_at) = cache
                .valid_with(now, |cached| {
                    (cached.generation == generation).then_some(cached.expires_at)
                })
                .flatten()
            else {
                return;
            };
            let pause = retry_in.min(expires_at - now);
            tracing::warn!(
                scope = %cache.shared.scope,
                reason = error.reason(),
                retry_in = ?pause,
                "refreshing the Azure OpenAI access token failed; the cached token stays in use until it expires"
            );
            tokio::time::sleep(pause).await;
            retry_in = (retry_in * 2).min(MAX_RETRY);
        }
    }
}

impl Drop for Refresh {
    fn drop(&mut self) {
        self.0.shared.refreshing.store(false, Ordering::Release);
    }
}

/// A token turned into a ready header value.
struct Issued {
    header: HeaderValue,
    lifetime: Duration,
}

impl Issued {
    fn new(token: &AccessToken) -> Result<Self, TokenUnavailable> {
        let remaining = token.expires_on - OffsetDateTime::now_utc();
        if !remaining.is_positive() {
            return Err(TokenUnavailable::new(
                "the credential returned a token that has already expired",
            ));
        }
        // `Bytes::from_owner` makes every clone of the header a reference count increment.
        let bearer = format!("Bearer {}", token.token.secret()).into_bytes();
        let mut header =
            HeaderValue::from_maybe_shared(Bytes::from_owner(bearer)).map_err(|_| {
                TokenUnavailable::new(
                    "the credential returned a token that is not a valid header value",
                )
            })?;
        header.set_sensitive(true);
        Ok(Self {
            header,
            lifetime: remaining.unsigned_abs(),
        })
    }
}

/// How long after its fetch a token of `lifetime` is refreshed.
fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime < SHORT_LIVED {
        lifetime / 2
    } else {
        lifetime - REFRESH_MARGIN
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match self.valid_with(Instant::now(), |_| ()) {
            Some(()) => "<redacted>",
            None => "<none>",
        };
        f.debug_struct("TokenCache")
            .field("scope", &self.shared.scope)
            .field("token", &format_args!("{token}"))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lived_tokens_refresh_five_minutes_before_expiry() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_after(hour), Duration::from_secs(55 * 60));
        assert_eq!(refresh_after(SHORT_LIVED), Duration::from_secs(5 * 60));
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_their_lifetime() {
        assert_eq!(
            refresh_after(Duration::from_secs(8 * 60)),
            Duration::from_secs(4 * 60)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(240)),
            Duration::from_secs(120)
        );
    }
}
