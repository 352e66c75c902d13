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
