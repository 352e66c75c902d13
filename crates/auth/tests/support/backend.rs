//! A backend on 127.0.0.1 that records the credentials it receives, and a service that forwards
//! requests to it over HTTP, as `aoai-upstream` does in the gateway.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State};
use http::{HeaderMap, Request, Response, StatusCode, header::AUTHORIZATION};
use tokio::net::TcpListener;
use tower::{service_fn, util::BoxCloneSyncService};

/// The credentials one request carried to the backend.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) authorization: Vec<String>,
    pub(crate) api_key: Vec<String>,
}

#[derive(Default)]
struct Recorded {
    seen: Mutex<Vec<Seen>>,
    rejected: Mutex<HashSet<String>>,
}

pub(crate) struct Backend {
    address: SocketAddr,
    recorded: Arc<Recorded>,
}

impl Backend {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let recorded = Arc::new(Recorded::default());
        let app = Router::new().fallback(record).with_state(recorded.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { address, recorded }
    }

    pub(crate) fn base(&self) -> String {
        format!("http://{}", self.address)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.recorded.seen.lock().unwrap().clone()
    }

    /// Answers 401 to requests carrying this `Authorization` or `api-key` value from now on.
    pub(crate) fn reject(&self, credential: &str) {
        self.recorded
            .rejected
            .lock()
            .unwrap()
            .insert(credential.to_owned());
    }
}

async fn record(State(recorded): State<Arc<Recorded>>, headers: HeaderMap) -> StatusCode {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let seen = Seen {
        authorization: values(AUTHORIZATION.as_str()),
        api_key: values("api-key"),
    };
    let rejected = {
        let rejected = recorded.rejected.lock().unwrap();
        seen.authorization
            .iter()
            .chain(&seen.api_key)
            .any(|value| rejected.contains(value))
    };
    recorded.seen.lock().unwrap().push(seen);
    if rejected {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    }
}

/// Its error is `reqwest::Error`, a concrete type like `aoai-upstream`'s. (With `BoxError` here,
/// awaiting `AzureAuth<Forward>` inside a spawned async block trips rust-lang/rust#64552; see the
/// `AzureAuth` docs.)
pub(crate) type Forward = BoxCloneSyncService<Request<String>, Response<String>, reqwest::Error>;

/// Sends each request to `base` (keeping its path, method, headers and body) with reqwest.
pub(crate) fn forward(base: String) -> Forward {
    let client = reqwest::Client::new();
    BoxCloneSyncService::new(service_fn(move |request: Request<String>| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let (parts, body) = request.into_parts();
            let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
            let response = client
                .request(parts.method, format!("{base}{path}"))
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let mut response = Response::new(response.text().await?);
            *response.status_mut() = status;
            Ok::<_, reqwest::Error>(response)
        }
    }))
}

/// A request carrying the caller's own credentials, which must never reach the backend.
pub(crate) fn request_with_caller_credentials() -> Request<String> {
    Request::post("/openai/v1/chat/completions")
        .header(AUTHORIZATION, "Bearer caller-token-secret")
        .header(AUTHORIZATION, "Basic caller-basic-secret")
        .header("api-key", "caller-key-secret")
        .header("api-key", "caller-key-secret-2")
        .body(r#"{"messages":[]}"#.to_owned())
        .unwrap()
}
