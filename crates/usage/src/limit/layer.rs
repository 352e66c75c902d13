use tower::Layer;

use super::{TokenLimit, TokenLimiter};
use crate::DEFAULT_PARSE_LIMIT;

/// Applies [`TokenLimit`] to a service: holds each request's [`Caller`](crate::Caller) to its
/// limits in a [`TokenLimiter`] shared by every service this layer makes.
#[derive(Clone, Debug)]
pub struct TokenLimitLayer {
    limiter: TokenLimiter,
    parse_limit: usize,
}

impl TokenLimitLayer {
    /// A layer that counts in `limiter`; JSON answers up to [`DEFAULT_PARSE_LIMIT`] bytes are
    /// read for their usage.
    pub const fn new(limiter: TokenLimiter) -> Self {
        Self {
            limiter,
            parse_limit: DEFAULT_PARSE_LIMIT,
        }
    }

    /// Reads the usage of JSON answers (and single stream events) up to `bytes` long; longer
    /// ones are charged their estimate. This much is copied per answer while it passes.
    pub const fn parse_up_to(mut self, bytes: usize) -> Self {
        self.parse_limit = bytes;
        self
    }
}

impl<S> Layer<S> for TokenLimitLayer {
    type Service = TokenLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenLimit::new(inner, self.limiter.clone()).parse_up_to(self.parse_limit)
    }
}
