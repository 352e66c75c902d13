//! [`Caller`]: who a request is from, as a request extension.

use std::sync::Arc;

/// Who a request is from, and what it may use: a request extension your own auth sets (the
/// gateway's `RequireClientKeyLayer` sets it for named client keys), read by
/// the token limit layer and by the gateway's log line and metrics.
///
/// The name is what logs and metric labels show: give each caller a name, never its key.
///
/// ```
/// use aoai_usage::{Caller, CallerLimits};
///
/// let caller = Caller::new("search-team").with_limits(CallerLimits {
///     tokens_per_minute: Some(50_000),
///     requests_per_minute: Some(300),
/// });
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(caller);
/// assert_eq!(request.extensions().get::<Caller>().map(Caller::name), Some("search-team"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    name: Arc<str>,
    limits: CallerLimits,
}

/// What one [`Caller`] may use per minute; `None`: no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CallerLimits {
    /// Tokens (prompt and completion) per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
}

impl CallerLimits {
    /// Whether neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.tokens_per_minute.is_none() && self.requests_per_minute.is_none()
    }
}

impl Caller {
    /// A caller named `name`, without limits.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            limits: CallerLimits::default(),
        }
    }

    /// The same caller, held to `limits`.
    pub fn with_limits(mut self, limits: CallerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Its name, as logs and metrics show it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its name, shared.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its limits.
    pub fn limits(&self) -> CallerLimits {
        self.limits
    }
}
