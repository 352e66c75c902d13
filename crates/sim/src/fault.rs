//! [`Fault`]: a scripted misbehaviour for one request.

use std::time::Duration;

use http::StatusCode;

/// A scripted misbehaviour: pushed with [`SimHandle::push_fault`](crate::SimHandle::push_fault),
/// taken by the next request that arrives.
///
/// A fault replaces the normal answer, credential check included (a [`Fault::Delay`] only
/// postpones it). Every error body has Azure's shape, `{"error":{"code":..,"message":..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// 429 with Azure's token-rate-limit body ("... have exceeded token rate limit ... Please
    /// retry after N seconds ..."), `retry-after: <secs>` and `retry-after-ms: <ms>` when given
    /// (either, both or neither), `x-ratelimit-remaining-tokens: 0`, and, with a wait,
    /// `x-ratelimit-reset-tokens` in whole seconds.
    Throttle {
        /// The `retry-after` header, in whole seconds.
        retry_after_secs: Option<u64>,
        /// The `retry-after-ms` header, in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// Exactly this status, these headers and this body (for example a 429 with an HTTP-date
    /// `retry-after`). The given headers replace the emulator's own of the same name.
    Respond {
        /// The status code.
        status: StatusCode,
        /// Headers, as (name, value); repeat a name to send it several times.
        headers: Vec<(String, String)>,
        /// The body, sent as is.
        body: String,
    },
    /// 500 with Azure's `InternalServerError` body.
    InternalError,
    /// 503 with Azure's `ServiceUnavailable` body.
    ServiceUnavailable,
    /// 400 with Azure's content-filter body: code `content_filter`, `innererror.code`
    /// `ResponsibleAIPolicyViolation` and a `content_filter_result` that flags violence.
    ContentFilter,
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Never answer; the connection stays open until the client gives up or the emulator shuts
    /// down.
    Hang,
    /// Send 200 and its headers, part of the body (the first SSE events for a streaming request,
    /// half a JSON document otherwise), then drop the connection: the client's body read fails.
    DropMidBody,
}

impl Fault {
    /// A [`Fault::Throttle`] with `retry-after: <secs>` and the matching `retry-after-ms`.
    pub const fn throttle(secs: u64) -> Self {
        Self::Throttle {
            retry_after_secs: Some(secs),
            retry_after_ms: Some(secs * 1000),
        }
    }
}
