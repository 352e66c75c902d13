//! The `gateway` example built with the `otlp` feature pushes its metrics to a collector: a
//! loopback server stands for one and receives the OTLP/HTTP protobuf posts.
//!
//! Compiled only with the feature (`required-features` in Cargo.toml). The example binary must
//! have been built with it too (`cargo test --example` would build it as a test instead), so
//! `.ci/run` runs: `cargo build --features otlp --example gateway && cargo test --features otlp
//! --test otlp`.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::json;
use support::{BOUND, CHAT, client, sims};
use tokio::sync::mpsc;

/// The caller's key: it must never reach the collector; its name does.
const KEY: &str = "otlp-test-key-4f1c9e";

/// A collector on loopback: each body posted to `/v1/metrics`, with its content type, is sent
/// on the channel. Returns the endpoint URL.
async fn collector() -> (String, mpsc::UnboundedReceiver<(String, Bytes)>) {
    let (posts, received) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/v1/metrics",
            post(
                |State(posts): State<mpsc::UnboundedSender<(String, Bytes)>>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let _ = posts.send((content_type, body));
                    // An empty `ExportMetricsServiceResponse`: everything accepted.
                    StatusCode::OK
                },
            ),
        )
        .with_state(posts);
    let base = support::serve(app).await;
    (format!("{base}/v1/metrics"), received)
}

/// The gateway process, killed on drop.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the gateway over one emulated instance, with a named client (`search-team`, whose
/// key is [`KEY`]) in the config file `name` and `flags`; sends one streamed chat completion
/// through it once it answers, and reads it to the end.
async fn gateway_after_one_chat(
    name: &str,
    flags: &[&str],
) -> (Gateway, aoai_sim::SimHandle, PathBuf) {
    let sim = sims(1).await.remove(0);
    let config = std::env::temp_dir().join(format!(
        "aoai-tower-otlp-{}-{name}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        "[[clients]]\nname = \"search-team\"\nkey_env = \"AOAI_OTLP_TEST_KEY\"\n",
    )
    .unwrap();
    let addr = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let backend = format!("{}={}", sim.name(), sim.url());
    let child = Command::new(support::gateway_binary(
        "cargo build --features otlp --example gateway",
    ))
    .args(["--listen", &addr, "--backend", &backend])
    .args(["--config", config.to_str().unwrap()])
    .args(flags)
    .env("AOAI_OTLP_TEST_KEY", KEY)
    .env_remove("RUST_LOG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut gateway = Gateway(child);
    let client = client();
    let deadline = tokio::time::Instant::now() + BOUND;
    let response = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            panic!("the gateway exited with {status} (built without `--features otlp`?)");
        }
        let sent = client
            .post(format!("http://{addr}{CHAT}"))
            .header("api-key", KEY)
            .json(&json!({
                "messages": [{ "role": "user", "content": "Hello" }],
                "stream": true,
            }))
            .send()
            .await;
        if let Ok(response) = sent {
            break response;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(response.status(), 200);
    let answer = response.text().await.unwrap();
    assert!(answer.trim_end().ends_with("data: [DONE]"), "{answer}");
    (gateway, sim, config)
}

/// Waits (bounded) for the next post that holds the token usage; returns its body.
async fn next_with_usage(received: &mut mpsc::UnboundedReceiver<(String, Bytes)>) -> Bytes {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let (content_type, body) = tokio::time::timeout_at(deadline, received.recv())
            .await
            .expect("no export with the token usage reached the collector")
            .unwrap();
        assert_eq!(content_type, "application/x-protobuf");
        if find(&body, b"gen_ai.client.token.usage") {
            return body;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Every name and attribute key an OTLP backend shows is in the post, with the caller's name;
/// its key is not.
fn assert_metrics(body: &[u8]) {
    for expected in [
        "service.name",
        "aoai-gateway",
        "gen_ai.client.token.usage",
        "{token}",
        "gen_ai.client.operation.duration",
        "gen_ai.server.time_to_first_token",
        "aoai_gateway.requests",
        "aoai_gateway.tokens",
        "aoai_gateway.streams_in_flight",
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "azure.ai.openai",
        "gen_ai.token.type",
        "gen_ai.request.model",
        "http.response.status_code",
        "aoai.instance",
        "aoai.caller",
        "search-team",
    ] {
        assert!(
            find(body, expected.as_bytes()),
            "{expected} is not in the export"
        );
    }
    assert!(!find(body, KEY.as_bytes()), "the client key was exported");
}

#[tokio::test]
async fn the_gateway_exports_its_metrics_each_interval() {
    let (endpoint, mut received) = collector().await;
    let (_gateway, _sim, config) = gateway_after_one_chat(
        "interval",
        &["--otlp-endpoint", &endpoint, "--otlp-interval", "1"],
    )
    .await;
    let body = next_with_usage(&mut received).await;
    assert_metrics(&body);
    let _ = std::fs::remove_file(config);
}

/// On SIGTERM the gateway exports what it recorded before it exits, long before an interval.
#[tokio::test]
async fn the_gateway_exports_its_metrics_on_shutdown() {
    let (endpoint, mut received) = collector().await;
    let (mut gateway, _sim, config) = gateway_after_one_chat(
        "shutdown",
        &["--otlp-endpoint", &endpoint, "--otlp-interval", "3600"],
    )
    .await;
    let terminated = Command::new("kill")
        .args(["-TERM", &gateway.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let body = next_with_usage(&mut received).await;
    assert_metrics(&body);
    let deadline = tokio::time::Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_file(config);
}
