//! The `gateway` example built with the `otlp` feature pushes its metrics to a collector: a
//! loopback server stands for one and receives the OTLP/HTTP protobuf posts, over http or over
//! https with a certificate of a private CA.
//!
//! Compiled only with the feature (`required-features` in Cargo.toml). The example binary must
//! have been built with it too (`cargo test --example` would build it as a test instead), so
//! `.ci/run` runs: `cargo build --features otlp --example gateway && cargo test --features otlp
//! --test otlp`.

mod support;
#[path = "support/tls.rs"]
mod tls;

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use support::{BOUND, CHAT, client, sims};
use tokio::sync::mpsc;

/// The caller's key: it must never reach the collector; its name does.
const KEY: &str = "otlp-test-key-4f1c9e";

/// One export as the collector received it.
struct Post {
    content_type: String,
    authorization: Option<String>,
    body: Bytes,
}

/// A collector on loopback: each post to `/v1/metrics` is sent on the channel. Over https with
/// a certificate for `localhost` that `pki` signed, when given. Returns the endpoint URL.
async fn collector(pki: Option<&tls::Pki>) -> (String, mpsc::UnboundedReceiver<Post>) {
    let (posts, received) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/v1/metrics",
            post(
                |State(posts): State<mpsc::UnboundedSender<Post>>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let _ = posts.send(Post {
                        content_type: header("content-type").unwrap_or_default(),
                        authorization: header("authorization"),
                        body,
                    });
                    // An empty `ExportMetricsServiceResponse`: everything accepted.
                    StatusCode::OK
                },
            ),
        )
        .with_state(posts);
    let Some(pki) = pki else {
        let base = support::serve(app).await;
        return (format!("{base}/v1/metrics"), received);
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server());
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}/v1/metrics"), received)
}

/// A unique path in the temporary directory, for this process's file `what`.
fn temp_path(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "aoai-tower-otlp-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The gateway process with its files (its config, CA and output); killed, and the files
/// removed, on drop.
struct Gateway {
    child: Child,
    files: Vec<PathBuf>,
    output: PathBuf,
}

impl Gateway {
    /// Starts the gateway with `args` and `env` (without `RUST_LOG`), its stdout and stderr
    /// both to one file.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let output = temp_path("output");
        let stdout = File::create(&output).unwrap();
        let stderr = stdout.try_clone().unwrap();
        let child = Command::new(support::gateway_binary(
            "cargo build --features otlp --example gateway",
        ))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
        Self {
            child,
            files: Vec::new(),
            output,
        }
    }

    /// What the gateway printed so far.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit.
    async fn exit(&mut self) -> ExitStatus {
        let output = &self.output;
        support::exit_within(&mut self.child, BOUND, || {
            let printed = std::fs::read_to_string(output).unwrap_or_default();
            format!("the gateway (it printed: {printed})")
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in self.files.iter().chain([&self.output]) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Starts the gateway over one emulated instance, with a named client (`search-team`, whose
/// key is [`KEY`]) in its config file, `flags` and `env`; sends one streamed chat completion
/// through it once it answers, and reads it to the end.
async fn gateway_after_one_chat(
    flags: &[&str],
    env: &[(&str, &str)],
) -> (Gateway, aoai_sim::SimHandle) {
    let sim = sims(1).await.remove(0);
    let config = temp_path("config.toml");
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
    let mut args = vec!["--listen", &addr, "--backend", &backend];
    args.extend(["--config", config.to_str().unwrap()]);
    args.extend(flags);
    let mut env = env.to_vec();
    env.push(("AOAI_OTLP_TEST_KEY", KEY));
    let mut gateway = Gateway::spawn(&args, &env);
    gateway.files.push(config);
    let client = client();
    let deadline = tokio::time::Instant::now() + BOUND;
    let response = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            panic!(
                "the gateway exited with {status} (built without `--features otlp`?): {}",
                gateway.output()
            );
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
    (gateway, sim)
}

/// Waits (bounded) for the next post from `gateway` that holds the token usage.
async fn next_with_usage(received: &mut mpsc::UnboundedReceiver<Post>, gateway: &Gateway) -> Post {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let Ok(post) = tokio::time::timeout_at(deadline, received.recv()).await else {
            panic!(
                "no export with the token usage reached the collector; the gateway printed: {}",
                gateway.output()
            );
        };
        let post = post.unwrap();
        assert_eq!(post.content_type, "application/x-protobuf");
        if find(&post.body, b"gen_ai.client.token.usage") {
            return post;
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
    let (endpoint, mut received) = collector(None).await;
    let (gateway, _sim) =
        gateway_after_one_chat(&["--otlp-endpoint", &endpoint, "--otlp-interval", "1"], &[]).await;
    let post = next_with_usage(&mut received, &gateway).await;
    assert_metrics(&post.body);
    assert_eq!(post.authorization, None);
}

/// On SIGTERM the gateway exports what it recorded before it exits, long before an interval.
#[tokio::test]
async fn the_gateway_exports_its_metrics_on_shutdown() {
    let (endpoint, mut received) = collector(None).await;
    let (mut gateway, _sim) = gateway_after_one_chat(
        &["--otlp-endpoint", &endpoint, "--otlp-interval", "3600"],
        &[],
    )
    .await;
    let terminated = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let post = next_with_usage(&mut received, &gateway).await;
    assert_metrics(&post.body);
    let status = gateway.exit().await;
    assert!(status.success(), "{status}");
}

/// A collector over https, whose certificate a private CA signed, gets the exports once
/// `--ca-file` names that CA (the roots the instances trust), with the headers
/// `OTEL_EXPORTER_OTLP_HEADERS` gives; the header's secret is in no line the gateway prints,
/// even at debug level.
#[tokio::test]
async fn an_https_collector_gets_the_exports_with_the_headers_given_and_no_line_has_them() {
    const SECRET: &str = "otlp-collector-secret-8d2e";
    let pki = tls::Pki::new();
    let (endpoint, mut received) = collector(Some(&pki)).await;
    let ca = temp_path("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let headers = format!("authorization=Bearer {SECRET}");
    let (mut gateway, _sim) = gateway_after_one_chat(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-interval",
            "1",
            "--ca-file",
            ca.to_str().unwrap(),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_HEADERS", &headers),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    gateway.files.push(ca);
    let post = next_with_usage(&mut received, &gateway).await;
    assert_metrics(&post.body);
    assert_eq!(
        post.authorization.as_deref(),
        Some(&*format!("Bearer {SECRET}"))
    );
    let output = gateway.output();
    assert!(output.contains("exporting metrics over OTLP"), "{output}");
    assert!(
        !output.contains(SECRET),
        "the collector's secret was printed"
    );
}

/// A bad OTLP setting stops the gateway at start, exit code 2, with a line naming the problem.
#[tokio::test]
async fn malformed_otlp_settings_are_refused_naming_the_problem() {
    for (flags, problem) in [
        (
            &["--otlp-endpoint", "ftp://127.0.0.1/v1/metrics"][..],
            "speaks http or https",
        ),
        (&["--otlp-endpoint", "not a url"], "invalid OTLP endpoint"),
        (&["--otlp-interval", "5"], "needs an OTLP endpoint"),
        (
            &[
                "--otlp-endpoint",
                "http://127.0.0.1:4318/v1/metrics",
                "--otlp-interval",
                "0",
            ],
            "at least 1 second",
        ),
    ] {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend(flags);
        let mut gateway = Gateway::spawn(&args, &[]);
        let status = gateway.exit().await;
        let output = gateway.output();
        assert_eq!(status.code(), Some(2), "{flags:?}: {output}");
        assert!(output.contains(problem), "{flags:?}: {output}");
    }
}
