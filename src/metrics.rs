//! [`GatewayMetrics`]: what the gateway counts, for Prometheus, in OpenTelemetry's GenAI
//! semantic conventions.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use aoai_balance::BalanceHealth;
use aoai_usage::Usage;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::realtime::Sessions;

#[cfg(feature = "otlp")]
mod otel;

/// `gen_ai.provider.name` for every instance: Azure OpenAI.
const PROVIDER: &str = "azure.ai.openai";

/// How many deployment names, and how many model names, label the metrics; the names after
/// these are recorded as [`OTHER`].
const MAX_NAMES: usize = 256;

/// The label value of a deployment or model name past the first [`MAX_NAMES`].
const OTHER: &str = "_other";

/// Bucket boundaries OpenTelemetry's GenAI conventions advise for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// ... for `gen_ai.client.operation.duration`, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// ... for `gen_ai.server.time_to_first_token`, in seconds.
const FIRST_TOKEN_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The gateway's metrics, registered in a `prometheus-client` [`Registry`]; give a clone to
/// [`GatewayBuilder::metrics`](crate::GatewayBuilder::metrics) and serve the registry's text
/// (`prometheus_client::encoding::text::encode`) on `GET /metrics`.
///
/// | metric | type | labels |
/// | --- | --- | --- |
/// | `gen_ai_client_token_usage` | histogram | `gen_ai_operation_name`, `gen_ai_provider_name`, `gen_ai_token_type` (`input`, `output`), `gen_ai_request_model`, `gen_ai_response_model` |
/// | `gen_ai_client_operation_duration_seconds` | histogram | `gen_ai_operation_name`, `gen_ai_provider_name`, `gen_ai_request_model`, `gen_ai_response_model`, `error_type` |
/// | `gen_ai_server_time_to_first_token_seconds` | histogram (streams) | as the duration, without `error_type` |
/// | `aoai_gateway_requests_total` | counter | `instance`, `deployment`, `caller`, `status` |
/// | `aoai_gateway_tokens_total` | counter | `instance`, `deployment`, `caller`, `gen_ai_token_type` |
/// | `aoai_gateway_streams_in_flight` | gauge | |
/// | `aoai_gateway_attempts_total` | counter | `instance` |
/// | `aoai_gateway_retries_total` | counter | `instance`: attempts that retried a request another instance failed |
/// | `aoai_gateway_cooldowns_total` | counter | `instance`, `reason` (`throttled`, `failed`, `timeout`, `connect`, `credential`) |
/// | `aoai_gateway_backend_available` | gauge | `instance`: 1 while it takes traffic |
/// | `aoai_gateway_realtime_sessions` | gauge | Realtime (WebSocket) sessions being relayed |
///
/// The GenAI names are OpenTelemetry's (`gen_ai.client.token.usage`, ...) translated as its
/// Prometheus exporter does: dots to underscores, the unit as a suffix. The `gen_ai_*` metrics
/// cover chat completions and the Responses API (`chat`), completions (`text_completion`) and
/// embeddings (`embeddings`); `aoai_gateway_requests_total` counts every request.
/// `gen_ai_request_model` is the deployment the caller asked for; a caller is its name (or
/// empty), never its key.
///
/// Deployment names come from callers and model names from the instances' answers, so they
/// are bounded: the first 256 distinct deployments (and the first 256 models) seen label the
/// metrics, and any later one is recorded as `_other`, so a caller sending made-up deployment
/// names cannot grow the metrics without end.
///
/// With the `otlp` feature, `with_meter` records the same requests into
/// OpenTelemetry instruments as well, for an OTLP exporter.
#[derive(Clone)]
pub struct GatewayMetrics {
    inner: Arc<Instruments>,
    #[cfg(feature = "otlp")]
    otel: Option<Arc<otel::Instruments>>,
}

struct Instruments {
    token_usage: Family<TokenUsageLabels, Histogram>,
    operation_duration: Family<OperationLabels, Histogram>,
    time_to_first_token: Family<OperationLabels, Histogram>,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    streams_in_flight: Gauge,
    health: Arc<HealthCollector>,
    deployments: Names,
    models: Names,
}

/// The distinct names seen for one label, up to [`MAX_NAMES`].
struct Names {
    seen: RwLock<HashSet<Arc<str>>>,
    /// [`OTHER`], made once: the label value of every name past the first [`MAX_NAMES`].
    other: Arc<str>,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            seen: RwLock::default(),
            other: Arc::from(OTHER),
        }
    }
}

impl Names {
    /// `name` as a label value: itself while it is one of the first [`MAX_NAMES`] seen, else
    /// [`OTHER`].
    fn label(&self, name: Option<Arc<str>>) -> Option<Arc<str>> {
        let name = name?;
        let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&name) {
            return Some(name);
        }
        drop(seen);
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        // Another request may have added it since the read lock was let go.
        if seen.contains(&name) || seen.len() < MAX_NAMES {
            seen.insert(name.clone());
            return Some(name);
        }
        Some(self.other.clone())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenUsageLabels {
    gen_ai_operation_name: &'static str,
    gen_ai_provider_name: &'static str,
    gen_ai_token_type: &'static str,
    gen_ai_request_model: Option<Arc<str>>,
    gen_ai_response_model: Option<Arc<str>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    gen_ai_operation_name: &'static str,
    gen_ai_provider_name: &'static str,
    gen_ai_request_model: Option<Arc<str>>,
    gen_ai_response_model: Option<Arc<str>>,
    error_type: Option<u16>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    instance: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    caller: Option<Arc<str>>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    instance: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    caller: Option<Arc<str>>,
    gen_ai_token_type: &'static str,
}

/// One request, finished: what its metrics record.
#[derive(Debug)]
pub(crate) struct Finished {
    /// `gen_ai.operation.name`, for the GenAI operations.
    pub(crate) operation: Option<&'static str>,
    pub(crate) caller: Option<Arc<str>>,
    pub(crate) instance: Option<Arc<str>>,
    pub(crate) deployment: Option<Arc<str>>,
    pub(crate) response_model: Option<Arc<str>>,
    pub(crate) status: u16,
    pub(crate) usage: Option<Usage>,
    pub(crate) duration: Duration,
    pub(crate) time_to_first_token: Option<Duration>,
}

impl GatewayMetrics {
    /// Registers the gateway's metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let instruments = Instruments {
            token_usage: Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS)),
            operation_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            time_to_first_token: Family::new_with_constructor(|| {
                Histogram::new(FIRST_TOKEN_BUCKETS)
            }),
            requests: Family::default(),
            tokens: Family::default(),
            streams_in_flight: Gauge::default(),
            health: Arc::default(),
            deployments: Names::default(),
            models: Names::default(),
        };
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per GenAI operation, as the instance reported them",
            instruments.token_usage.clone(),
        );
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "Duration of GenAI operations through the gateway, to the end of the answer",
            Unit::Seconds,
            instruments.operation_duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time from the request to the first chunk of a streamed answer",
            Unit::Seconds,
            instruments.time_to_first_token.clone(),
        );
        registry.register(
            "aoai_gateway_requests",
            "Requests answered, by instance, deployment, caller and status",
            instruments.requests.clone(),
        );
        registry.register(
            "aoai_gateway_tokens",
            "Tokens the instances reported, by instance, deployment, caller and token type",
            instruments.tokens.clone(),
        );
        registry.register(
            "aoai_gateway_streams_in_flight",
            "Streamed answers being relayed",
            instruments.streams_in_flight.clone(),
        );
        registry.register_collector(Box::new(instruments.health.clone()));
        Self {
            inner: Arc::new(instruments),
            #[cfg(feature = "otlp")]
            otel: None,
        }
    }

    /// Records into OpenTelemetry instruments created from `meter` as well as into the
    /// Prometheus registry: give it the meter of an `SdkMeterProvider` whose reader exports
    /// over OTLP. Call it before handing out clones (they keep what they were) and before the
    /// gateway serves (`aoai_gateway.streams_in_flight` counts from zero).
    ///
    /// The instruments carry OpenTelemetry's own names, units and attribute keys; the
    /// Prometheus names above are their translation:
    ///
    /// | instrument | kind | unit | attributes |
    /// | --- | --- | --- | --- |
    /// | `gen_ai.client.token.usage` | histogram | `{token}` | `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.token.type`, `gen_ai.request.model`, `gen_ai.response.model` |
    /// | `gen_ai.client.operation.duration` | histogram | `s` | `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`, `error.type` |
    /// | `gen_ai.server.time_to_first_token` | histogram (streams) | `s` | as the duration, without `error.type` |
    /// | `aoai_gateway.requests` | counter | `{request}` | `aoai.instance`, `aoai.deployment`, `aoai.caller`, `http.response.status_code` |
    /// | `aoai_gateway.tokens` | counter | `{token}` | `aoai.instance`, `aoai.deployment`, `aoai.caller`, `gen_ai.token.type` |
    /// | `aoai_gateway.streams_in_flight` | up-down counter | `{stream}` | |
    ///
    /// The histograms advise the bucket boundaries of the GenAI conventions, as the Prometheus
    /// ones use. An attribute whose Prometheus label would be empty is left out; `error.type`
    /// is the status code, as a string. The per-backend counters read from the balancer's
    /// health (`aoai_gateway_attempts_total`, `_retries_total`, `_cooldowns_total`,
    /// `_backend_available`) stay Prometheus-only.
    #[cfg(feature = "otlp")]
    pub fn with_meter(mut self, meter: &opentelemetry::metrics::Meter) -> Self {
        self.otel = Some(Arc::new(otel::Instruments::new(meter)));
        self
    }

    /// The Prometheus families, then the OpenTelemetry instruments if there are some.
    fn sinks(&self) -> impl Iterator<Item = &dyn Sink> {
        let sinks = std::iter::once(&*self.inner as &dyn Sink);
        #[cfg(feature = "otlp")]
        let sinks = sinks.chain(self.otel.as_deref().map(|otel| otel as &dyn Sink));
        sinks
    }

    /// Reports the backends of `health` from now on (a gateway built with these metrics does
    /// this; a rebuilt one, after a reload, replaces its predecessor's).
    pub(crate) fn watch(&self, health: BalanceHealth, sessions: Sessions) {
        *self
            .inner
            .health
            .health
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((health, sessions));
    }

    pub(crate) fn stream_started(&self) {
        self.sinks().for_each(|sink| sink.streams_in_flight(1));
    }

    pub(crate) fn stream_ended(&self) {
        self.sinks().for_each(|sink| sink.streams_in_flight(-1));
    }

    /// Records one finished request.
    pub(crate) fn record(&self, finished: Finished) {
        let finished = self.bounded(finished);
        self.sinks().for_each(|sink| record(sink, &finished));
    }

    /// `finished` with its deployment and model names as label values (see [`Names`]).
    fn bounded(&self, finished: Finished) -> Finished {
        Finished {
            deployment: self.inner.deployments.label(finished.deployment),
            response_model: self.inner.models.label(finished.response_model),
            ..finished
        }
    }

    /// Records the tokens one response of a Realtime session used (its `response.done`):
    /// `aoai_gateway_tokens_total`, and `gen_ai_client_token_usage` as a `chat` operation.
    pub(crate) fn record_tokens(
        &self,
        caller: Option<Arc<str>>,
        instance: Option<Arc<str>>,
        deployment: Option<Arc<str>>,
        usage: &Usage,
    ) {
        let finished = self.bounded(Finished {
            operation: Some("chat"),
            caller,
            instance,
            deployment,
            response_model: None,
            status: 0,
            usage: Some(*usage),
            duration: Duration::ZERO,
            time_to_first_token: None,
        });
        for sink in self.sinks() {
            record_usage(sink, &finished);
        }
    }
}

/// What one finished request adds to a sink: the label sets are built here, for both.
fn record(sink: &dyn Sink, finished: &Finished) {
    sink.request(&RequestLabels {
        instance: finished.instance.clone(),
        deployment: finished.deployment.clone(),
        caller: finished.caller.clone(),
        status: finished.status,
    });
    let Some(operation) = record_usage(sink, finished) else {
        return;
    };
    let mut labels = OperationLabels {
        gen_ai_operation_name: operation,
        gen_ai_provider_name: PROVIDER,
        gen_ai_request_model: finished.deployment.clone(),
        gen_ai_response_model: finished.response_model.clone(),
        error_type: (finished.status >= 400).then_some(finished.status),
    };
    sink.operation_duration(&labels, finished.duration.as_secs_f64());
    if let Some(first) = finished.time_to_first_token {
        labels.error_type = None;
        sink.time_to_first_token(&labels, first.as_secs_f64());
    }
}

/// The tokens of `finished`, by caller and instance and, for a GenAI operation, in
/// `gen_ai_client_token_usage`; its operation, if it is one.
fn record_usage(sink: &dyn Sink, finished: &Finished) -> Option<&'static str> {
    let tokens = finished.usage.map(|usage| {
        [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ]
    });
    for (token_type, count) in tokens.into_iter().flatten() {
        let labels = TokenLabels {
            instance: finished.instance.clone(),
            deployment: finished.deployment.clone(),
            caller: finished.caller.clone(),
            gen_ai_token_type: token_type,
        };
        sink.tokens(&labels, count);
    }
    let operation = finished.operation?;
    for (token_type, count) in tokens.into_iter().flatten() {
        let labels = TokenUsageLabels {
            gen_ai_operation_name: operation,
            gen_ai_provider_name: PROVIDER,
            gen_ai_token_type: token_type,
            gen_ai_request_model: finished.deployment.clone(),
            gen_ai_response_model: finished.response_model.clone(),
        };
        sink.token_usage(&labels, count);
    }
    Some(operation)
}

/// Where [`record`] puts what a request showed: the Prometheus families, and the
/// OpenTelemetry instruments of [`GatewayMetrics::with_meter`], each spelling the labels its
/// own way.
trait Sink {
    fn request(&self, labels: &RequestLabels);
    fn tokens(&self, labels: &TokenLabels, count: u64);
    fn token_usage(&self, labels: &TokenUsageLabels, count: u64);
    fn operation_duration(&self, labels: &OperationLabels, seconds: f64);
    fn time_to_first_token(&self, labels: &OperationLabels, seconds: f64);
    fn streams_in_flight(&self, delta: i64);
}

impl Sink for Instruments {
    fn request(&self, labels: &RequestLabels) {
        self.requests.get_or_create(labels).inc();
    }

    fn tokens(&self, labels: &TokenLabels, count: u64) {
        self.tokens.get_or_create(labels).inc_by(count);
    }

    fn token_usage(&self, labels: &TokenUsageLabels, count: u64) {
        self.token_usage.get_or_create(labels).observe(count as f64);
    }

    fn operation_duration(&self, labels: &OperationLabels, seconds: f64) {
        self.operation_duration
            .get_or_create(labels)
            .observe(seconds);
    }

    fn time_to_first_token(&self, labels: &OperationLabels, seconds: f64) {
        self.time_to_first_token
            .get_or_create(labels)
            .observe(seconds);
    }

    fn streams_in_flight(&self, delta: i64) {
        self.streams_in_flight.inc_by(delta);
    }
}

impl fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("GatewayMetrics");
        f.field("streams_in_flight", &self.inner.streams_in_flight.get());
        #[cfg(feature = "otlp")]
        f.field("otel", &self.otel.is_some());
        f.finish_non_exhaustive()
    }
}

/// The backends' counters, read from their health at each scrape.
#[derive(Debug, Default)]
struct HealthCollector {
    health: RwLock<Option<(BalanceHealth, Sessions)>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CooldownLabels {
    instance: Arc<str>,
    reason: &'static str,
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let (snapshots, sessions) = match &*self
            .health
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            Some((health, sessions)) => (health.snapshot(), sessions.count()),
            None => return Ok(()),
        };
        let counter = |encoder: &mut DescriptorEncoder<'_>,
                       name: &str,
                       help: &str,
                       value: &dyn Fn(&aoai_balance::BackendSnapshot) -> u64|
         -> Result<(), fmt::Error> {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for backend in &snapshots {
                let labels = InstanceLabels {
                    instance: backend.name.clone(),
                };
                ConstCounter::new(value(backend)).encode(metric.encode_family(&labels)?)?;
            }
            Ok(())
        };
        counter(
            &mut encoder,
            "aoai_gateway_attempts",
            "Attempts sent to each instance, retries included",
            &|b| b.attempts,
        )?;
        counter(
            &mut encoder,
            "aoai_gateway_retries",
            "Attempts that retried, on this instance, a request another instance failed",
            &|b| b.retries,
        )?;
        let mut metric = encoder.encode_descriptor(
            "aoai_gateway_cooldowns",
            "Cooldowns each instance entered, by reason",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for backend in &snapshots {
            for (reason, count) in backend.cooldowns.by_reason() {
                let labels = CooldownLabels {
                    instance: backend.name.clone(),
                    reason,
                };
                ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "aoai_gateway_backend_available",
            "1 while the instance takes traffic (available or on trial), 0 while it cools down",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for backend in &snapshots {
            let labels = InstanceLabels {
                instance: backend.name.clone(),
            };
            let up = i64::from(backend.cooling_down_for.is_none());
            ConstGauge::new(up).encode(metric.encode_family(&labels)?)?;
        }
        let sessions = ConstGauge::new(i64::try_from(sessions).unwrap_or(i64::MAX));
        sessions.encode(encoder.encode_descriptor(
            "aoai_gateway_realtime_sessions",
            "Realtime (WebSocket) sessions being relayed",
            None,
            sessions.metric_type(),
        )?)?;
        Ok(())
    }
}
