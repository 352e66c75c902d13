//! The OTLP exporter (the `otlp` feature): the gateway's metrics pushed to a collector.

use std::time::Duration;

use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::runtime::Tokio;

use crate::settings::Otlp;

/// An export (the exporter's tries included) is cut after this long, rather than the SDK's 30 s:
/// the last one, on shutdown, then holds the exit at most that long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A meter provider exporting every `interval` to `endpoint` over HTTP/protobuf, `https`
/// endpoints trusted by `tls`. Call it on the runtime: the reader's task is spawned there, and
/// the exporter's hyper client needs it (the SDK's default reader exports from a thread of its
/// own, without one).
pub(crate) fn meter_provider(
    otlp: &Otlp,
    tls: rustls::ClientConfig,
) -> Result<SdkMeterProvider, String> {
    let mut tcp = HttpConnector::new();
    // `https` URLs too reach the TCP connector, under the TLS one.
    tcp.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    let exporter = MetricExporter::builder()
        .with_http()
        .with_http_client(HyperClient::new(connector, EXPORT_TIMEOUT, None))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&otlp.endpoint)
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let reader = PeriodicReader::builder(exporter, Tokio)
        .with_interval(otlp.interval)
        .with_timeout(EXPORT_TIMEOUT)
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
