//! Error types of [`TokenLimit`](super::TokenLimit).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A caller is over one of its limits: its request was not sent.
///
/// Carries the caller's name (never anything else about it or its request), which limit, and
/// when the request may go on. At the edge it becomes Azure's answer to a throttled request: a
/// 429 with `Retry-After` (whole seconds, rounded up) and `retry-after-ms`.
#[derive(Clone, Debug)]
pub struct LimitExceeded {
    caller: Arc<str>,
    kind: LimitKind,
    per_minute: u64,
    retry_after: Duration,
}

/// Which of a caller's limits a request is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// [`tokens_per_minute`](crate::CallerLimits::tokens_per_minute).
    Tokens,
    /// [`requests_per_minute`](crate::CallerLimits::requests_per_minute).
    Requests,
}

impl LimitExceeded {
    pub(crate) fn new(caller: Arc<str>, kind: LimitKind, per_minute: u64, wait: Duration) -> Self {
        // Whole milliseconds, rounded up (`retry-after-ms` has no finer unit), and never zero.
        let millis = wait.as_nanos().div_ceil(1_000_000).max(1);
        Self {
            caller,
            kind,
            per_minute,
            retry_after: Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX)),
        }
    }

    /// How long until the same request would be admitted, if the caller sends nothing else
    /// meanwhile: whole milliseconds, at least one.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// Which limit the request is over (the one that frees up last, if both).
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// That limit: tokens or requests per minute.
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    /// The caller's name.
    pub fn caller(&self) -> &str {
        &self.caller
    }
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.kind {
            LimitKind::Tokens => "tokens",
            LimitKind::Requests => "requests",
        };
        // Tenths of a second, rounded up: "retry after 0.0 s" would be wrong.
        let tenths = self.retry_after.as_millis().div_ceil(100);
        write!(
            f,
            "caller {:?} is over its {} {unit} per minute; retry after {}.{} s",
            self.caller,
            self.per_minute,
            tenths / 10,
            tenths % 10,
        )
    }
}

impl std::error::Error for LimitExceeded {}
