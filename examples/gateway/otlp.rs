//! The OTLP exporter (the `otlp` feature): the gateway's metrics pushed to a collector.

use std::time::Duration;

use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::runtime::Tokio;

use crate::settings::Otlp;

/// A meter provider exporting every `interval` to `endpoint` over HTTP/protobuf. Call it on the
/// runtime: the reader's task is spawned there, and the exporter's hyper client needs it (the
/// SDK's default reader exports from a thread of its own, without one).
pub(crate) fn meter_provider(otlp: &Otlp) -> Result<SdkMeterProvider, String> {
    let exporter = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&otlp.endpoint)
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    // An export (the exporter's tries included) is cut after 10 s rather than the SDK's 30:
    // the last one, on shutdown, then holds the exit at most that long.
    let reader = PeriodicReader::builder(exporter, Tokio)
        .with_interval(otlp.interval)
        .with_timeout(Duration::from_secs(10))
        .build();
    Ok(SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(
            Resource::builder()
                .with_service_name("aoai-gateway")
                .build(),
        )
        .build())
}

/// Exports what was recorded since the last export, then stops the reader.
pub(crate) async fn shutdown(provider: SdkMeterProvider) {
    // `shutdown` blocks until the reader's task, on this runtime, has exported: off the workers.
    match tokio::task::spawn_blocking(move || provider.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the last OTLP export failed"),
        Err(e) => tracing::warn!(error = %e, "the OTLP shutdown panicked"),
    }
}
