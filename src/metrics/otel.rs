//! The OpenTelemetry side of [`GatewayMetrics`](super::GatewayMetrics): the same label sets,
//! under OpenTelemetry's names, units and attribute keys.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};

use super::{
    DURATION_BUCKETS, FIRST_TOKEN_BUCKETS, OperationLabels, RequestLabels, Sink, TOKEN_BUCKETS,
    TokenLabels, TokenUsageLabels,
};

pub(super) struct Instruments {
    token_usage: Histogram<u64>,
    operation_duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    requests: Counter<u64>,
    tokens: Counter<u64>,
    streams_in_flight: UpDownCounter<i64>,
}

impl Instruments {
    pub(super) fn new(meter: &Meter) -> Self {
        Self {
            token_usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per GenAI operation, as the instance reported them")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            operation_duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description(
                    "Duration of GenAI operations through the gateway, to the end of the answer",
                )
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            time_to_first_token: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time from the request to the first chunk of a streamed answer")
                .with_boundaries(FIRST_TOKEN_BUCKETS.to_vec())
                .build(),
            requests: meter
                .u64_counter("aoai_gateway.requests")
                .with_unit("{request}")
                .with_description("Requests answered, by instance, deployment, caller and status")
                .build(),
            tokens: meter
                .u64_counter("aoai_gateway.tokens")
                .with_unit("{token}")
                .with_description(
                    "Tokens the instances reported, by instance, deployment, caller and token type",
                )
                .build(),
            streams_in_flight: meter
                .i64_up_down_counter("aoai_gateway.streams_in_flight")
                .with_unit("{stream}")
                .with_description("Streamed answers being relayed")
                .build(),
        }
    }
}

impl Sink for Instruments {
    fn request(&self, labels: &RequestLabels) {
        let mut attributes = Vec::with_capacity(4);
        optional(&mut attributes, "aoai.instance", &labels.instance);
        optional(&mut attributes, "aoai.deployment", &labels.deployment);
        optional(&mut attributes, "aoai.caller", &labels.caller);
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(labels.status),
        ));
        self.requests.add(1, &attributes);
    }

    fn tokens(&self, labels: &TokenLabels, count: u64) {
        let mut attributes = Vec::with_capacity(4);
        optional(&mut attributes, "aoai.instance", &labels.instance);
        optional(&mut attributes, "aoai.deployment", &labels.deployment);
        optional(&mut attributes, "aoai.caller", &labels.caller);
        attributes.push(KeyValue::new("gen_ai.token.type", labels.gen_ai_token_type));
        self.tokens.add(count, &attributes);
    }

    fn token_usage(&self, labels: &TokenUsageLabels, count: u64) {
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", labels.gen_ai_operation_name),
            KeyValue::new("gen_ai.provider.name", labels.gen_ai_provider_name),
            KeyValue::new("gen_ai.token.type", labels.gen_ai_token_type),
        ];
        models(
            &mut attributes,
            &labels.gen_ai_request_model,
            &labels.gen_ai_response_model,
        );
        self.token_usage.record(count, &attributes);
    }

    fn operation_duration(&self, labels: &OperationLabels, seconds: f64) {
        self.operation_duration
            .record(seconds, &operation_attributes(labels));
    }

    fn time_to_first_token(&self, labels: &OperationLabels, seconds: f64) {
        self.time_to_first_token
            .record(seconds, &operation_attributes(labels));
    }

    fn streams_in_flight(&self, delta: i64) {
        self.streams_in_flight.add(delta, &[]);
    }
}

/// `gen_ai.request.model` and `gen_ai.response.model`, those that are known.
fn models(attributes: &mut Vec<KeyValue>, request: &Option<Arc<str>>, response: &Option<Arc<str>>) {
    optional(attributes, "gen_ai.request.model", request);
    optional(attributes, "gen_ai.response.model", response);
}

fn operation_attributes(labels: &OperationLabels) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", labels.gen_ai_operation_name),
        KeyValue::new("gen_ai.provider.name", labels.gen_ai_provider_name),
    ];
    models(
        &mut attributes,
        &labels.gen_ai_request_model,
        &labels.gen_ai_response_model,
    );
    if let Some(status) = labels.error_type {
        // `error.type` is a string; for an HTTP failure, the conventions' value is the status.
        attributes.push(KeyValue::new("error.type", status.to_string()));
    }
    attributes
}

/// Adds `key` when there is a value: the attribute Prometheus would show as an empty label.
fn optional(attributes: &mut Vec<KeyValue>, key: &'static str, value: &Option<Arc<str>>) {
    if let Some(value) = value {
        attributes.push(KeyValue::new(key, value.clone()));
    }
}
