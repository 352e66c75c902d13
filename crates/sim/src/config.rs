//! [`SimConfig`]: how one emulated Azure OpenAI instance behaves.

use std::fmt;
use std::time::Duration;

/// How one emulated Azure OpenAI instance behaves: its name, region, credentials, pacing and
/// quota.
///
/// Built with chained setters, each taking and returning the config:
///
/// ```
/// use std::time::Duration;
/// use aoai_sim::SimConfig;
///
/// let config = SimConfig::new("eastus")
///     .region("East US")
///     .expect_api_key("secret")
///     .time_to_first_token(Duration::from_millis(20))
///     .chunk_delay(Duration::from_millis(5))
///     .tokens_per_minute(10_000);
/// assert_eq!(config.name(), "eastus");
/// ```
///
/// The `Debug` output never shows the expected key or token.
#[derive(Clone)]
pub struct SimConfig {
    pub(crate) name: String,
    pub(crate) region: String,
    pub(crate) model: String,
    pub(crate) api_key: Option<String>,
    pub(crate) bearer: Option<String>,
    pub(crate) time_to_first_token: Duration,
    pub(crate) chunk_delay: Duration,
    pub(crate) reply_tokens: u64,
    pub(crate) tokens_per_minute: Option<u64>,
    pub(crate) requests_per_minute: Option<u64>,
    pub(crate) record_requests: bool,
}

impl SimConfig {
    /// A config for the instance called `name` (for example `"eastus"`), with no auth check, no
    /// delays and no quota.
    ///
    /// The name appears in every reply (`"Hello from eastus ..."`), so tests can see which
    /// instance answered.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            region: "East US".to_owned(),
            model: "gpt-4o-2024-08-06".to_owned(),
            api_key: None,
            bearer: None,
            time_to_first_token: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            reply_tokens: 5,
            tokens_per_minute: None,
            requests_per_minute: None,
            record_requests: true,
        }
    }

    /// The `x-ms-region` header value sent with every answer (default `"East US"`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// The `model` reported in chat, completion and Responses answers (default
    /// `"gpt-4o-2024-08-06"`; Azure reports the model behind the deployment, not its name).
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Require `api-key: <key>`; other requests get Azure's 401.
    ///
    /// When [`expect_bearer`](Self::expect_bearer) is set too, either credential is accepted.
    /// With neither, no credential is checked.
    pub fn expect_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Require `Authorization: Bearer <token>`; other requests get Azure's 401.
    ///
    /// When [`expect_api_key`](Self::expect_api_key) is set too, either credential is accepted.
    pub fn expect_bearer(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// Wait this long before the first generated token (default zero).
    ///
    /// A stream sends its response headers and the `prompt_filter_results` chunk at once, then
    /// waits this long before the first content chunk. A non-streaming answer waits this long
    /// (plus the chunk delays of its other tokens) before answering at all.
    pub fn time_to_first_token(mut self, delay: Duration) -> Self {
        self.time_to_first_token = delay;
        self
    }

    /// Wait this long between two generated tokens (default zero): between SSE content chunks
    /// when streaming, and added up into the answer time when not.
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// How many tokens a reply has (default 5, at least 1): each token is one SSE content chunk.
    ///
    /// The reply starts `"Hello from <name>"` and goes on with filler words. A request whose
    /// `max_tokens` (or `max_completion_tokens`, `max_output_tokens`) is smaller gets that many
    /// tokens and `finish_reason: "length"`, as from the real service.
    pub fn reply_tokens(mut self, tokens: u64) -> Self {
        self.reply_tokens = tokens.max(1);
        self
    }

    /// Enforce a tokens-per-minute quota like Azure's: a request that would take the tokens
    /// used in the current fixed 60 s window over `tpm` gets Azure's 429, with `retry-after`,
    /// `retry-after-ms` (the time left in the window) and `x-ratelimit-*` headers.
    ///
    /// A request costs its prompt estimate (about one token per four characters of prompt text)
    /// plus its `max_tokens`, or [`reply_tokens`](Self::reply_tokens) when it sets none. Only
    /// model calls (chat, completions, embeddings, responses) count.
    pub fn tokens_per_minute(mut self, tpm: u64) -> Self {
        self.tokens_per_minute = Some(tpm);
        self
    }

    /// Enforce a requests-per-minute quota in the same 60 s window: the request after the
    /// `rpm`-th gets Azure's 429 ("exceeded call rate limit").
    pub fn requests_per_minute(mut self, rpm: u64) -> Self {
        self.requests_per_minute = Some(rpm);
        self
    }

    /// Keep every request received (default `true`). Turn it off for load tests: requests are
    /// then only counted, and memory stays flat.
    pub fn record_requests(mut self, record: bool) -> Self {
        self.record_requests = record;
        self
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("time_to_first_token", &self.time_to_first_token)
            .field("chunk_delay", &self.chunk_delay)
            .field("reply_tokens", &self.reply_tokens)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("record_requests", &self.record_requests)
            .finish()
    }
}
