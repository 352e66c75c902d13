//! Errors produced by [`RetryNextBackendService`](crate::RetryNextBackendService).

use std::error::Error as StdError;
use std::fmt;

use crate::BoxError;

/// The request body is larger than the configured limit; no backend was contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge {
    limit: usize,
}

impl BodyTooLarge {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit }
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request body is larger than the limit of {} bytes",
            self.limit
        )
    }
}

impl StdError for BodyTooLarge {}

/// The caller's request body could not be read (the caller went away, or its body failed).
#[derive(Debug)]
pub struct BodyReadError {
    source: BoxError,
}

impl BodyReadError {
    pub(crate) fn new(source: BoxError) -> Self {
        Self { source }
    }
}

impl fmt::Display for BodyReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("failed to read the request body")
    }
}

impl StdError for BodyReadError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// The request's deadline passed before a backend's response head arrived: while its body was
/// read, during an attempt, or during a backoff (see [`RetryNextBackendLayer::deadline`]).
///
/// [`RetryNextBackendLayer::deadline`]: crate::RetryNextBackendLayer::deadline
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineElapsed {
    deadline: std::time::Duration,
}

impl DeadlineElapsed {
    pub(crate) fn new(deadline: std::time::Duration) -> Self {
        Self { deadline }
    }

    /// The deadline that passed.
    pub fn deadline(&self) -> std::time::Duration {
        self.deadline
    }
}

impl fmt::Display for DeadlineElapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no backend answered within the request deadline of {:?}",
            self.deadline
        )
    }
}

impl StdError for DeadlineElapsed {}
