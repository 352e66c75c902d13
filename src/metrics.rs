//! [`GatewayMetrics`]: what the gateway counts, for Prometheus, in OpenTelemetry's GenAI
//! semantic conventions.

use std::fmt;
use std::sync::{Arc, RwLock};
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

/// `gen_ai.provider.name` for every instance: Azure OpenAI.
const PROVIDER: &str = "azure.ai.openai";

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
///
/// The GenAI names are OpenTelemetry's (`gen_ai.client.token.usage`, ...) translated as its
/// Prometheus exporter does: dots to underscores, the unit as a suffix. The `gen_ai_*` metrics
/// cover chat completions and the Responses API (`chat`), completions (`text_completion`) and
/// embeddings (`embeddings`); `aoai_gateway_requests_total` counts every request.
/// `gen_ai_request_model` is the deployment the caller asked for; a caller is its name (or
/// empty), never its key.
#[derive(Clone)]
pub struct GatewayMetrics {
    inner: Arc<Instruments>,
}

struct Instruments {
    token_usage: Family<TokenUsageLabels, Histogram>,
    operation_duration: Family<OperationLabels, Histogram>,
    time_to_first_token: Family<OperationLabels, Histogram>,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    streams_in_flight: Gauge,
    health: Arc<HealthCollector>,
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
        }
    }

    /// Reports the backends of `health` from now on (a gateway built with these metrics does
    /// this; a rebuilt one, after a reload, replaces its predecessor's).
    pub(crate) fn watch(&self, health: BalanceHealth) {
        *self
            .inner
            .health
            .health
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(health);
    }

    pub(crate) fn stream_started(&self) {
        self.inner.streams_in_flight.inc();
    }

    pub(crate) fn stream_ended(&self) {
        self.inner.streams_in_flight.dec();
    }

    /// Records one finished request.
    pub(crate) fn record(&self, finished: Finished) {
        let metrics = &self.inner;
        metrics
            .requests
            .get_or_create(&RequestLabels {
                instance: finished.instance.clone(),
                deployment: finished.deployment.clone(),
                caller: finished.caller.clone(),
                status: finished.status,
            })
            .inc();
        if let Some(usage) = finished.usage {
            for (token_type, count) in [
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ] {
                metrics
                    .tokens
                    .get_or_create(&TokenLabels {
                        instance: finished.instance.clone(),
                        deployment: finished.deployment.clone(),
                        caller: finished.caller.clone(),
                        gen_ai_token_type: token_type,
                    })
                    .inc_by(count);
            }
        }
        let Some(operation) = finished.operation else {
            return;
        };
        if let Some(usage) = finished.usage {
            for (token_type, count) in [
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
            ] {
                metrics
                    .token_usage
                    .get_or_create(&TokenUsageLabels {
                        gen_ai_operation_name: operation,
                        gen_ai_provider_name: PROVIDER,
                        gen_ai_token_type: token_type,
                        gen_ai_request_model: finished.deployment.clone(),
                        gen_ai_response_model: finished.response_model.clone(),
                    })
                    .observe(count as f64);
            }
        }
        let mut labels = OperationLabels {
            gen_ai_operation_name: operation,
            gen_ai_provider_name: PROVIDER,
            gen_ai_request_model: finished.deployment,
            gen_ai_response_model: finished.response_model,
            error_type: (finished.status >= 400).then_some(finished.status),
        };
        metrics
            .operation_duration
            .get_or_create(&labels)
            .observe(finished.duration.as_secs_f64());
        if let Some(first) = finished.time_to_first_token {
            labels.error_type = None;
            metrics
                .time_to_first_token
                .get_or_create(&labels)
                .observe(first.as_secs_f64());
        }
    }
}

impl fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayMetrics")
            .field("streams_in_flight", &self.inner.streams_in_flight.get())
            .finish_non_exhaustive()
    }
}

/// The backends' counters, read from their health at each scrape.
#[derive(Debug, Default)]
struct HealthCollector {
    health: RwLock<Option<BalanceHealth>>,
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
        let snapshots = match &*self
            .health
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            Some(health) => health.snapshot(),
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
        Ok(())
    }
}
