//! Shared helpers for the end-to-end tests: emulated instances, a gateway in front of them on
//! a loopback port, and a real HTTP client.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use aoai_sim::{SimConfig, SimHandle};
use aoai_tower::{Gateway, GatewayBuilder};
use axum::Router;
use axum::serve::ListenerExt;
use serde_json::{Value, json};

/// The chat completions path a caller of the gateway uses.
pub const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

/// Every wait in a test is bounded by this.
pub const BOUND: Duration = Duration::from_secs(10);

/// Starts `n` emulated instances named `a`, `b`, `c`, ...
pub async fn sims(n: usize) -> Vec<SimHandle> {
    sims_with(n, |config| config).await
}

/// Starts `n` emulated instances named `a`, `b`, `c`, ..., each configured by `configure`.
pub async fn sims_with(n: usize, configure: impl Fn(SimConfig) -> SimConfig) -> Vec<SimHandle> {
    let mut sims = Vec::with_capacity(n);
    for i in 0..n {
        let name = char::from(b'a' + u8::try_from(i).unwrap()).to_string();
        sims.push(aoai_sim::start(configure(SimConfig::new(name))).await);
    }
    sims
}

/// A builder with one backend per emulated instance, named after it.
pub fn builder_over(sims: &[SimHandle]) -> GatewayBuilder {
    sims.iter().fold(Gateway::builder(), |builder, sim| {
        builder.backend(sim.name(), sim.url())
    })
}

/// Serves `app` on 127.0.0.1:0 in the background; returns its base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Serves `gateway` mounted at `/openai`; returns the base URL.
pub async fn serve_gateway(gateway: Gateway) -> String {
    serve(Router::new().nest_service("/openai", gateway)).await
}

/// A real HTTP client with a bounded timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(BOUND).build().unwrap()
}

/// A small chat completions request body.
pub fn chat_body() -> Value {
    json!({ "messages": [{ "role": "user", "content": "Hello" }] })
}

/// Sends a chat completion to the gateway at `base`.
pub async fn chat(client: &reqwest::Client, base: &str) -> reqwest::Response {
    client
        .post(format!("{base}{CHAT}"))
        .json(&chat_body())
        .send()
        .await
        .unwrap()
}

/// The `x-served-by` header of a response.
pub fn served_by(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Parses `body` and asserts it is an Azure-shaped error (`{"error":{"code":..,"message":..}}`)
/// with `code`.
pub fn assert_azure_error(body: &str, code: &str) -> Value {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(value["error"]["code"], code, "{body}");
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "not Azure-shaped: {body}"
    );
    value
}

/// The gateway example's binary, found from the test binary (`target/<profile>/deps/...`);
/// `build` says how to build it when it is missing.
pub fn gateway_binary(build: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: run `{build}`",
        binary.display()
    );
    binary
}

/// Waits for `child` to exit, without blocking the runtime (the emulated instances and the
/// gateway may answer on this very task), at most `bound`; then kills it and panics with
/// `what()`, which says what it was and what it printed.
pub async fn exit_within(
    child: &mut Child,
    bound: Duration,
    what: impl Fn() -> String,
) -> ExitStatus {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{} did not exit within {bound:?}", what());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
