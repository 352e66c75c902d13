use std::fmt;

use tower::Layer;

use crate::{CountUsage, DEFAULT_PARSE_LIMIT};

/// Applies [`CountUsage`] to a service: reads the token usage of each answer and hands it to a
/// callback made per request by `M` (a [`MakeUsageCallback`](crate::MakeUsageCallback)).
#[derive(Clone)]
pub struct UsageLayer<M> {
    make: M,
    limit: usize,
}

impl<M> UsageLayer<M> {
    /// A layer that makes each request's callback with `make`; JSON answers up to
    /// [`DEFAULT_PARSE_LIMIT`] bytes are parsed.
    pub const fn new(make: M) -> Self {
        Self {
            make,
            limit: DEFAULT_PARSE_LIMIT,
        }
    }

    /// Parses JSON answers (and single stream events) up to `bytes` long; longer ones report
    /// `usage: None`. This much is copied per answer while it passes.
    pub const fn parse_up_to(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }
}

impl<S, M: Clone> Layer<S> for UsageLayer<M> {
    type Service = CountUsage<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CountUsage::new(inner, self.make.clone()).parse_up_to(self.limit)
    }
}

impl<M> fmt::Debug for UsageLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageLayer")
            .field("make", &std::any::type_name::<M>())
            .field("limit", &self.limit)
            .finish()
    }
}
