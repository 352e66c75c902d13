//! The token cache shared by every backend that authenticates with the same credential and scope.

use std::{
    fmt,
    future::Future,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use azure_core::{
    credentials::{AccessToken, TokenCredential},
    time::OffsetDateTime,
};
use bytes::Bytes;
use http::HeaderValue;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::error::TokenUnavailable;

/// The scope of Azure OpenAI (Azure AI services), used unless another one is set.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// How long one attempt to fetch a token may take before it is abandoned as failed, unless
/// [`TokenCache::with_fetch_timeout`] sets another time.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request that finds no valid token cached waits for one before it fails with
/// [`TokenUnavailable`], unless [`TokenCache::with_token_wait`] sets another time.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(3);

/// Long-lived tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Tokens that live less than this are refreshed at half their lifetime instead.
const SHORT_LIVED: Duration = Duration::from_secs(10 * 60);
/// The first pause after a failed attempt; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// After a failed attempt, a request that needs a token starts the next one at once, but never
/// sooner than this after the last one started: requests cut the backoff short without hammering
/// a token endpoint that fails fast.
const MIN_SPACING: Duration = Duration::from_secs(1);

/// The `Authorization: Bearer` header for one credential and scope, fetched once and shared.
///
/// Every [`AzureAuth`](crate::AzureAuth) built from the same cache (clones included) sends the
/// same cached token, so several backends that use one identity cost one token fetch. Cloning a
/// `TokenCache` is cheap and shares the cache.
///
/// # Fetches
///
/// The credential is asked for a token by a task spawned on the Tokio runtime, one attempt at a
/// time for the whole cache, never by a request itself. Each attempt is bounded by the fetch
/// timeout ([`DEFAULT_FETCH_TIMEOUT`], 5 s; [`with_fetch_timeout`](Self::with_fetch_timeout)):
/// a token endpoint that refuses connections, one that answers an error, and one that accepts
/// and never answers all end the attempt as failed within that time. A failed attempt is retried
/// in the background after 1 s, doubling up to 5 s, until one succeeds; a request that needs a
/// token cuts that pause short and starts the next attempt at once (at most one attempt start per
/// second), so requests get a token within about a second of the endpoint's return.
///
/// The cache retries; the credential should not. Give the credential a short retry policy or
/// none (for example `ClientOptions { retry: RetryOptions::none(), .. }` in
/// `azure_identity::ManagedIdentityCredentialOptions`): otherwise `azure_core`'s default policy
/// (8 retries with backoff, over a minute against a refusing endpoint) runs inside one attempt,
/// which the fetch timeout then cuts off. (`azure_identity` 1.0's IMDS credential, on Azure VMs,
/// sets its own retry policy whatever the options say; the fetch timeout bounds it.)
///
/// # What a request waits for, and what it gets
///
/// - A valid token is cached: the request never waits. The ready header value is cloned out of
///   the cache (a reference count increment). When the token has 5 minutes left (half its
///   lifetime for tokens that live less than 10 minutes), the request that notices it starts a
///   background refresh; the old token stays in use until the new one arrives, and a failed
///   refresh is logged as a warning (the reason only, never a token) and retried as above.
/// - No valid token is cached (the first request, after expiry, or after a 401): the request
///   waits for the running attempt, or starts one, for at most the token wait
///   ([`DEFAULT_TOKEN_WAIT`], 3 s; [`with_token_wait`](Self::with_token_wait)). It gets the
///   token as soon as that attempt succeeds; if the attempt fails, it gets
///   [`TokenUnavailable`] at once with the attempt's reason; if the wait runs out first, it gets
///   [`TokenUnavailable`] then, with the last failed attempt's reason. Either way the error's
///   [`retry_after`](TokenUnavailable::retry_after) says when a new request gets a fresh
///   attempt (at least 1 s). Concurrent waiters share one attempt. So a caller waits at most
///   the token wait, whatever the token endpoint does.
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
    /// How long a request of this handle waits for a token when none is cached.
    token_wait: Duration,
}

struct Shared {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    /// The token requests use: read by every request, written once per fetch or 401.
    current: RwLock<Option<Cached>>,
    /// The fetcher's state; never held across an `await`.
    state: Mutex<State>,
    /// Mirrors `State::fetcher`, so that requests with a valid token check it without the lock.
    fetching: AtomicBool,
    /// Counts finished attempts, successful or not; bumped under the `state` lock. Requests
    /// waiting for a token wait for it to pass the count they saw.
    finished: watch::Sender<u64>,
    /// Wakes the fetcher from its backoff pause when a request has brought the next attempt
    /// forward.
    kick: Arc<Notify>,
}

struct Cached {
    header: HeaderValue,
    generation: u64,
    refresh_at: Instant,
    expires_at: Instant,
}

struct State {
    fetch_timeout: Duration,
    /// The generation of the last token fetched; 401s name the token they saw by it.
    generation: u64,
    /// True while the fetcher task exists: from the first attempt until one succeeds.
    fetcher: bool,
    /// The deadline of the attempt running now, if one is.
    attempt_deadline: Option<Instant>,
    /// When the last attempt started.
    last_start: Option<Instant>,
    /// When the fetcher, pausing after a failure, makes its next attempt.
    next_attempt: Instant,
    /// The pause after the next failure.
    backoff: Duration,
    /// Why the last attempt failed; `None` once one succeeds.
    last_error: Option<TokenUnavailable>,
}

/// A cached token as one request uses it.
pub(crate) struct Bearer {
    pub(crate) header: HeaderValue,
    pub(crate) generation: u64,
}

/// Waits for a token when none is cached. Boxed; requests that find a valid token never create
/// one.
pub(crate) type TokenFuture =
    Pin<Box<dyn Future<Output = Result<Bearer, TokenUnavailable>> + Send>>;

/// What a request that needs a token found.
enum Demand {
    Ready(Bearer),
    /// Wait for the finished-attempt count to pass this.
    Wait(u64),
}

impl TokenCache {
    /// Creates an empty cache of tokens for `scope` from `credential`, with the default fetch
    /// timeout and token wait ([`DEFAULT_FETCH_TIMEOUT`], [`DEFAULT_TOKEN_WAIT`]).
    ///
    /// Nothing is fetched until the first request. Use [`DEFAULT_SCOPE`] for Azure OpenAI.
    pub fn new(credential: Arc<dyn TokenCredential>, scope: impl Into<String>) -> Self {
        let (finished, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                credential,
                scope: scope.into(),
                current: RwLock::new(None),
                state: Mutex::new(State {
                    fetch_timeout: DEFAULT_FETCH_TIMEOUT,
                    generation: 0,
                    fetcher: false,
                    attempt_deadline: None,
                    last_start: None,
                    next_attempt: Instant::now(),
                    backoff: FIRST_RETRY,
                    last_error: None,
                }),
                fetching: AtomicBool::new(false),
                finished,
                kick: Arc::new(Notify::new()),
            }),
            token_wait: DEFAULT_TOKEN_WAIT,
        }
    }

    /// Whether `self` and `other` are the same cache (clones of one `TokenCache`): a token one
    /// cannot get, the other cannot either.
    pub fn is_shared_with(&self, other: &TokenCache) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Bounds each attempt to fetch a token to `timeout` (default [`DEFAULT_FETCH_TIMEOUT`],
    /// 5 s): an attempt still running then is dropped and counts as failed.
    ///
    /// This is a setting of the cache itself, shared by every clone, made before and after.
    pub fn with_fetch_timeout(self, timeout: Duration) -> Self {
        self.shared.lock().fetch_timeout = timeout;
        self
    }

    /// Makes requests through this handle wait at most `wait` for a token when none is cached
    /// (default [`DEFAULT_TOKEN_WAIT`], 3 s), then fail with [`TokenUnavailable`].
    /// `Duration::ZERO` never waits (a request still starts an attempt for the ones after it).
    ///
    /// This is a setting of this handle and of the clones made from it afterwards; other
    /// handles of the same cache keep theirs.
    pub fn with_token_wait(mut self, wait: Duration) -> Self {
        self.token_wait = wait;
        self
    }

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        &self.shared.scope
    }

    /// How long one fetch attempt may take.
    pub fn fetch_timeout(&self) -> Duration {
        self.shared.lock().fetch_timeout
    }

    /// How long a request through this handle waits for a token when none is cached.
    pub fn token_wait(&self) -> Duration {
        self.token_wait
    }

    /// A new, empty cache for `scope` with the same credential and settings.
    pub(crate) fn for_scope(&self, scope: impl Into<String>) -> Self {
        Self::new(self.shared.credential.clone(), scope)
            .with_fetch_timeout(self.fetch_timeout())
            .with_token_wait(self.token_wait)
    }

    /// The cached token if it is valid, starting a background refresh when one is due.
    ///
    /// This is the hot path: one read lock and a reference count increment.
    pub(crate) fn current(&self) -> Option<Bearer> {
        let (bearer, refresh_due) = self.valid()?;
        if refresh_due && !self.shared.fetching.load(Ordering::Acquire) {
            let mut state = self.shared.lock();
            if !state.fetcher
                && let Err(error) = self.start_fetcher(&mut state)
            {
                tracing::debug!(
                    scope = %self.shared.scope,
                    reason = error.reason(),
                    "the token is not refreshed in the background; it is fetched again when it expires"
                );
            }
        }
        Some(bearer)
    }

    /// Waits for a valid token, at most the token wait.
    pub(crate) fn acquire(&self) -> TokenFuture {
        let cache = self.clone();
        Box::pin(async move { cache.wait_for_token().await })
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

    /// The cached token if it is valid, and whether its refresh is due.
    fn valid(&self) -> Option<(Bearer, bool)> {
        let now = Instant::now();
        self.shared.valid_with(now, |cached| {
            let bearer = Bearer {
                header: cached.header.clone(),
                generation: cached.generation,
            };
            (bearer, now >= cached.refresh_at)
        })
    }

    async fn wait_for_token(&self) -> Result<Bearer, TokenUnavailable> {
        let deadline = Instant::now() + self.token_wait;
        let mut finished = self.shared.finished.subscribe();
        loop {
            let seen = match self.demand()? {
                Demand::Ready(bearer) => return Ok(bearer),
                Demand::Wait(seen) => seen,
            };
            // The watch borrow is dropped here, before the state lock is taken.
            let timed_out =
                tokio::time::timeout_at(deadline, finished.wait_for(|count| *count > seen))
                    .await
                    .is_err();
            if let Some(bearer) = self.current() {
                return Ok(bearer);
            }
            let state = self.shared.lock();
            // The wait ran out, or the attempt this request waited for failed. Otherwise it
            // succeeded, but a 401 dropped its token already: wait for the next one.
            if timed_out || state.last_error.is_some() {
                return Err(self.unavailable(&state));
            }
        }
    }

    /// The cached token, or else the count of finished attempts to wait past, making sure an
    /// attempt is running or about to start.
    fn demand(&self) -> Result<Demand, TokenUnavailable> {
        let mut state = self.shared.lock();
        // Under the lock, so that an attempt cannot finish unseen between the two reads.
        let seen = *self.shared.finished.borrow();
        if let Some((bearer, refresh_due)) = self.valid() {
            if refresh_due && !state.fetcher {
                // Best effort, as in `current`.
                let _ = self.start_fetcher(&mut state);
            }
            return Ok(Demand::Ready(bearer));
        }
        if !state.fetcher {
            self.start_fetcher(&mut state)?;
        } else if state.attempt_deadline.is_none() {
            // The fetcher is pausing after a failure: bring its next attempt forward.
            let now = Instant::now();
            let earliest = state
                .last_start
                .map_or(now, |start| start + MIN_SPACING)
                .max(now);
            if earliest < state.next_attempt {
                state.next_attempt = earliest;
                self.shared.kick.notify_one();
            }
        }
        Ok(Demand::Wait(seen))
    }

    /// The error for a request that got no token, with when to try again.
    fn unavailable(&self, state: &State) -> TokenUnavailable {
        let now = Instant::now();
        let error = state.last_error.clone().unwrap_or_else(|| {
            TokenUnavailable::new(format!(
                "the token endpoint has not answered yet (the request waited {:?})",
                self.token_wait
            ))
        });
        // When a request arriving from now on gets a fresh attempt.
        let next = match state.attempt_deadline {
            Some(deadline) => deadline,
            None => state.last_start.map_or(now, |start| start + MIN_SPACING),
        };
        error.with_retry_after(next.saturating_duration_since(now))
    }

    /// Spawns the fetcher task, which makes its first attempt at once.
    fn start_fetcher(&self, state: &mut State) -> Result<(), TokenUnavailable> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TokenUnavailable::new("no Tokio runtime to fetch the token on"))?;
        state.fetcher = true;
        self.shared.fetching.store(true, Ordering::Release);
        runtime.spawn(fetch(
            Arc::downgrade(&self.shared),
            self.shared.kick.clone(),
        ));
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `f` of the cached token, if it is valid at `now`.
    fn valid_with<T>(&self, now: Instant, f: impl FnOnce(&Cached) -> T) -> Option<T> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|cached| now < cached.expires_at)
            .map(f)
    }

    /// One attempt: asks the credential for a token, within the fetch timeout.
    async fn attempt(&self, timeout: Duration) -> Result<Issued, TokenUnavailable> {
        let scopes = [self.scope.as_str()];
        match tokio::time::timeout(timeout, self.credential.get_token(&scopes, None)).await {
            Ok(Ok(token)) => Issued::new(&token),
            Ok(Err(error)) => Err(TokenUnavailable::from_credential_error(&error)),
            Err(_) => Err(TokenUnavailable::new(format!(
                "the token endpoint did not answer within {timeout:?}"
            ))),
        }
    }

    /// Caches a fetched token and ends the fetcher.
    fn succeeded(&self, issued: Issued) {
        let mut state = self.lock();
        state.generation += 1;
        let now = Instant::now();
        let refresh_after = refresh_after(issued.lifetime);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
            header: issued.header,
            generation: state.generation,
            refresh_at: now + refresh_after,
            expires_at: now + issued.lifetime,
        });
        state.attempt_deadline = None;
        state.last_error = None;
        state.backoff = FIRST_RETRY;
        state.fetcher = false;
        self.fetching.store(false, Ordering::Release);
        self.finished.send_modify(|count| *count += 1);
        drop(state);
        tracing::debug!(
            scope = %self.scope,
            lifetime = ?issued.lifetime,
            refresh_in = ?refresh_after,
            "obtained an access token"
        );
    }

    /// Records a failed attempt and schedules the next one.
    fn failed(&self, error: TokenUnavailable) {
        let mut state = self.lock();
        let now = Instant::now();
        let retry_in = state.backoff;
        state.attempt_deadline = None;
        state.next_attempt = now + retry_in;
        state.backoff = (retry_in * 2).min(MAX_RETRY);
        state.last_error = Some(error.clone());
        self.finished.send_modify(|count| *count += 1);
        drop(state);
        if self.valid_with(now, |_| ()).is_some() {
            tracing::warn!(
                scope = %self.scope,
                reason = error.reason(),
                retry_in = ?retry_in,
                "refreshing the Azure OpenAI access token failed; the cached token stays in use until it expires"
            );
        } else {
            tracing::warn!(
                scope = %self.scope,
                reason = error.reason(),
                retry_in = ?retry_in,
                "obtaining an Azure OpenAI access token failed; requests that need one fail until an attempt succeeds"
            );
        }
    }
}

/// The fetcher task: attempts until one succeeds, pausing with backoff after each failure. It
/// holds the cache weakly while it pauses, and ends when the cache is dropped.
async fn fetch(cache: Weak<Shared>, kick: Arc<Notify>) {
    let mut guard = FetcherGuard(Some(cache.clone()));
    loop {
        let Some(shared) = cache.upgrade() else {
            return;
        };
        let timeout = {
            let mut state = shared.lock();
            let now = Instant::now();
            state.last_start = Some(now);
            state.attempt_deadline = Some(now + state.fetch_timeout);
            state.fetch_timeout
        };
        match shared.attempt(timeout).await {
            Ok(issued) => {
                guard.0 = None;
                shared.succeeded(issued);
                return;
            }
            Err(error) => shared.failed(error),
        }
        drop(shared);
        // Pause until the next attempt is due; a request may bring it forward.
        loop {
            let mut kicked = pin!(kick.notified());
            kicked.as_mut().enable();
            let Some(due) = cache.upgrade().map(|shared| shared.lock().next_attempt) else {
                return;
            };
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = kicked => {}
            }
        }
    }
}

/// Clears the fetcher flag if the fetcher task is dropped before an attempt succeeds (its
/// runtime shut down), so that the next request starts another.
struct FetcherGuard(Option<Weak<Shared>>);

impl Drop for FetcherGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take().and_then(|cache| cache.upgrade()) {
            let mut state = shared.lock();
            state.fetcher = false;
            state.attempt_deadline = None;
            shared.fetching.store(false, Ordering::Release);
        }
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
        let token = match self.shared.valid_with(Instant::now(), |_| ()) {
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
