//! An App Service-style managed identity endpoint on 127.0.0.1, and the child-process harness
//! that points `azure_identity::ManagedIdentityCredential` at it.
//!
//! The credential reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` from the process environment.
//! Setting them at run time takes `unsafe` (`std::env::set_var`) under edition 2024, which this
//! workspace forbids, so each scenario runs in a child process of the test binary, started with
//! both variables set. The endpoint lives in the parent; the child drives it over HTTP through
//! `/control/*`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use azure_core::http::{ClientOptions, RetryOptions};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot},
    task::JoinHandle,
};

/// The `IDENTITY_HEADER` secret the endpoint expects in `X-IDENTITY-HEADER`.
pub(crate) const IDENTITY_SECRET: &str = "identity-header-secret-5b1d0c";
/// Text in the endpoint's error body, which must never reach an error message or a log.
pub(crate) const BODY_SECRET: &str = "secret-in-error-body";
/// Tells a child test where the endpoint's control routes are; absent outside a child.
const CONTROL: &str = "AOAI_AUTH_TEST_CONTROL";

/// How the endpoint answers token requests from now on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Config {
    /// Answer 500.
    pub(crate) down: bool,
    /// Refuse connections: the token listener is closed (and its connections with it) until a
    /// configuration without `refuse` opens it again on the same port.
    #[serde(default)]
    pub(crate) refuse: bool,
    /// Hold each token request until `/control/release`.
    pub(crate) hold: bool,
    /// Lifetime of the tokens handed out, in seconds. At most 300, so that the credential's own
    /// cache (which keeps tokens while they have more than 5 minutes left) never answers for the
    /// endpoint: every cached token the tests see is in our cache.
    pub(crate) lifetime_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            down: false,
            refuse: false,
            hold: false,
            lifetime_secs: 240,
        }
    }
}

/// One token request the endpoint received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Fetch {
    pub(crate) resource: Option<String>,
    pub(crate) api_version: Option<String>,
    pub(crate) secret_ok: bool,
}

struct Endpoint {
    config: Mutex<Config>,
    /// Where token requests are served, on a listener of its own so that it can refuse them.
    token_address: SocketAddr,
    /// The running token server: its shutdown signal and task. `None` while refusing.
    token_server: tokio::sync::Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
    fetches: Mutex<Vec<Fetch>>,
    issued: Mutex<usize>,
    release: Semaphore,
}

async fn token(
    State(endpoint): State<Arc<Endpoint>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    endpoint.fetches.lock().unwrap().push(Fetch {
        resource: query.get("resource").cloned(),
        api_version: query.get("api-version").cloned(),
        secret_ok: headers
            .get("x-identity-header")
            .is_some_and(|value| value == IDENTITY_SECRET),
    });
    let hold = endpoint.config.lock().unwrap().hold;
    if hold {
        endpoint.release.acquire().await.unwrap().forget();
    }
    let config = endpoint.config.lock().unwrap().clone();
    if config.down {
        let body = format!("identity endpoint down; {BODY_SECRET}");
        return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
    }
    let issued = {
        let mut issued = endpoint.issued.lock().unwrap();
        *issued += 1;
        *issued
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Json(json!({
        "access_token": format!("mi-token-{issued}-a71f3e"),
        "expires_on": (now.as_secs() + config.lifetime_secs).to_string(),
        "resource": query.get("resource"),
        "token_type": "Bearer",
        "client_id": "00000000-0000-0000-0000-000000000000",
    }))
    .into_response()
}

async fn configure(State(endpoint): State<Arc<Endpoint>>, Json(config): Json<Config>) {
    let refuse = config.refuse;
    *endpoint.config.lock().unwrap() = config;
    let mut server = endpoint.token_server.lock().await;
    match (refuse, server.take()) {
        (true, Some((stop, task))) => {
            // Stops accepting, closes idle keep-alive connections, and returns once every
            // connection is closed.
            let _ = stop.send(());
            task.await.unwrap();
        }
        (false, None) => {
            *server = Some(serve_tokens(endpoint.clone(), endpoint.token_address).await)
        }
        (_, running) => *server = running,
    }
}

/// Serves token requests on `address` until the returned sender fires.
async fn serve_tokens(
    endpoint: Arc<Endpoint>,
    address: SocketAddr,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind(address).await.unwrap();
    serve_tokens_on(endpoint, listener)
}

fn serve_tokens_on(
    endpoint: Arc<Endpoint>,
    listener: TcpListener,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let app = Router::new()
        .route("/msi/token", get(token))
        .with_state(endpoint);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, task)
}

async fn fetches(State(endpoint): State<Arc<Endpoint>>) -> Json<Vec<Fetch>> {
    Json(endpoint.fetches.lock().unwrap().clone())
}

async fn release(State(endpoint): State<Arc<Endpoint>>) {
    endpoint.release.add_permits(1);
}

/// Starts the endpoint: the control routes' address, and the token route's.
async fn start_endpoint() -> (SocketAddr, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let tokens = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_address = tokens.local_addr().unwrap();
    let endpoint = Arc::new(Endpoint {
        config: Mutex::default(),
        token_address,
        token_server: tokio::sync::Mutex::default(),
        fetches: Mutex::default(),
        issued: Mutex::default(),
        release: Semaphore::new(0),
    });
    *endpoint.token_server.lock().await = Some(serve_tokens_on(endpoint.clone(), tokens));
    let app = Router::new()
        .route("/control/config", post(configure))
        .route("/control/fetches", get(fetches))
        .route("/control/release", post(release))
        .with_state(endpoint);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, token_address)
}

/// Starts an identity endpoint and runs the ignored test `name` of this binary in a child
/// process whose environment points `ManagedIdentityCredential` at it.
pub(crate) async fn run_in_child(name: &str) {
    let (address, token_address) = start_endpoint().await;
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "IDENTITY_ENDPOINT",
            format!("http://{token_address}/msi/token"),
        )
        .env("IDENTITY_HEADER", IDENTITY_SECRET)
        .env(CONTROL, format!("http://{address}"))
        .env_remove("IDENTITY_SERVER_THUMBPRINT")
        .env_remove("IMDS_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within 60 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} failed in its child process:\n{stdout}\n{stderr}"
    );
}

/// The child's handle on the parent's identity endpoint.
pub(crate) struct Control {
    base: String,
    client: reqwest::Client,
}

impl Control {
    /// `None` outside a child process started by [`run_in_child`].
    pub(crate) fn from_env() -> Option<Self> {
        let base = std::env::var(CONTROL).ok()?;
        Some(Self {
            base,
            client: reqwest::Client::new(),
        })
    }

    pub(crate) async fn configure(&self, config: Config) {
        self.client
            .post(format!("{}/control/config", self.base))
            .json(&config)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    pub(crate) async fn fetches(&self) -> Vec<Fetch> {
        self.client
            .get(format!("{}/control/fetches", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Lets one held token request answer.
    pub(crate) async fn release(&self) {
        self.client
            .post(format!("{}/control/release", self.base))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }
}

/// The real managed identity credential, reading the environment the parent set. Its own
/// retries are off, so each token request it makes is one fetch at the endpoint.
pub(crate) fn credential() -> Arc<ManagedIdentityCredential> {
    ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        client_options: ClientOptions {
            retry: RetryOptions::none(),
            ..ClientOptions::default()
        },
        ..Default::default()
    }))
    .unwrap()
}
