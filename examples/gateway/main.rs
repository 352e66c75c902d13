//! The aoai-tower gateway: one endpoint in front of several Azure OpenAI instances.
//!
//! ```text
//! cargo run --example gateway                     # two emulated instances, on loopback
//! cargo run --example gateway -- \
//!     --backend https://eastus.openai.azure.com \
//!     --backend https://swedencentral.openai.azure.com \
//!     --auth managed-identity
//! ```
//!
//! Callers use the gateway as if it were one Azure OpenAI endpoint: `/openai/...` maps 1:1 onto
//! each backend's `/openai/...`. `GET /admin/backends` shows each backend's health as JSON.

mod h2_limits;
mod serve;
mod settings;

// mimalloc (its v2 line) replaces the C allocator, `malloc` and `free`, in this binary (the
// crate's `override` feature), and Rust allocates through it as the system allocator. In the
// load benchmark, a proxied request's dozen allocations cost about 4% fewer instructions than
// with glibc's malloc, whose larger blocks (a backend exchange, a read buffer) miss its
// per-thread cache; and about 1% fewer than through `mimalloc::MiMalloc` as the global
// allocator, which takes mimalloc's aligned-allocation path for every block.
use mimalloc as _;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use aoai_tower::auth::AzureAuthLayer;
use aoai_tower::{Gateway, GatewayFuture, RequireClientKeyLayer};
use axum::body::Body;
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::{BoxError, Json, Router};
use azure_core::credentials::TokenCredential;
use bytes::Bytes;
use clap::Parser;
use futures_util::future::Either;
use http::{Request, Response};
use serde_json::json;
use tower::{Layer, Service};

use crate::serve::{Serving, serve_per_core};
use crate::settings::{AuthMode, Backend, Flags, Settings, is_loopback_url};

fn main() {
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => fail(
            e.to_string()
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: "),
        ),
    };
    let settings = Settings::from_flags(flags).unwrap_or_else(|e| fail(&e));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&e.to_string()));
    if let Err(e) = runtime.block_on(run(settings)) {
        fail(&e);
    }
}

/// Prints a one-line error and exits with status 2.
fn fail(message: &str) -> ! {
    eprintln!("gateway: error: {message}");
    std::process::exit(2)
}

async fn run(mut settings: Settings) -> Result<(), String> {
    let mut emulators = Vec::new();
    if settings.backends.is_empty() {
        for name in ["sim-a", "sim-b"] {
            let sim = aoai_sim::start(aoai_sim::SimConfig::new(name)).await;
            settings.backends.push(Backend {
                name: name.to_owned(),
                url: sim.url(),
            });
            emulators.push(sim);
        }
    }
    let client_keys = match &settings.client_keys_env {
        Some(var) => {
            let keys = std::env::var(var).map_err(|_| {
                format!("environment variable {var} (--client-keys-env) is not set")
            })?;
            let layer = RequireClientKeyLayer::new(keys.split(','));
            if layer.is_empty() {
                return Err(format!("environment variable {var} holds no client key"));
            }
            Some(layer)
        }
        None if settings.listen.ip().is_loopback() => None,
        None => {
            return Err(format!(
                "refusing to listen on {} without client keys: set --client-keys-env",
                settings.listen
            ));
        }
    };

    let gateway = build_gateway(&settings)?;
    let health = gateway.health().clone();
    let admin = Router::new().route(
        "/admin/backends",
        get(move || {
            let health = health.clone();
            async move { Json(backends_json(&health)) }
        }),
    );
    let app = OpenAiFirst {
        gateway,
        rest: admin,
    };

    let serving = Serving {
        listen: settings.listen,
        timeouts: settings.timeouts,
        workers: settings.workers,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (addr, workers) = match client_keys {
        Some(keys) => serve_per_core(&serving, keys.layer(app), &stopped)?,
        None => serve_per_core(&serving, app, &stopped)?,
    };
    let names: Vec<&str> = settings.backends.iter().map(|b| b.name.as_str()).collect();
    tracing::info!(%addr, backends = ?names, "gateway listening");
    if !emulators.is_empty() {
        println!(
            "No --backend given: serving two emulated Azure OpenAI instances ({}).",
            names.join(", ")
        );
        println!("Try:");
        println!(
            "  curl -i http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\\n    \
             -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
        );
    }
    shutdown_signal().await;
    // Stop accepting, let requests in flight finish, then wait for every worker.
    let _ = stop.send(true);
    tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join())))
        .await
        .map_err(|e| e.to_string())?;
    for sim in emulators {
        sim.shutdown().await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Sends `/openai` and everything below it straight to the gateway, and every other request
/// to the router (`/admin/backends`, and 404s).
///
/// The gateway is an ordinary tower service: `Router::nest_service("/openai", gateway)` mounts it
/// as well (see the `existing_app` example). Matching the prefix here first spares each proxied
/// request the router's work: path matching, URI rewriting for the nested path, and its request
/// extensions, about 13 heap allocations per request (README, Performance).
#[derive(Clone)]
struct OpenAiFirst {
    gateway: Gateway,
    rest: Router,
}

impl<B> Service<Request<B>> for OpenAiFirst
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<GatewayFuture<B>, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path == "/openai" || path.starts_with("/openai/") {
            Either::Left(self.gateway.call(request))
        } else {
            Either::Right(self.rest.call(request.map(Body::new)))
        }
    }
}

fn build_gateway(settings: &Settings) -> Result<Gateway, String> {
    let all_loopback = settings.backends.iter().all(|b| is_loopback_url(&b.url));
    let mode = settings.auth.clone().unwrap_or(if all_loopback {
        AuthMode::None
    } else {
        AuthMode::ManagedIdentity(None)
    });
    let shared = credential(&mode)?.map(AzureAuthLayer::from_credential);
    // `OpenAiFirst` hands the gateway the whole path, `/openai` included.
    let mut builder = Gateway::builder()
        .backend_path("")
        .served_by_header(settings.served_by_header);
    if let Some(attempts) = settings.max_attempts {
        builder = builder.max_attempts(attempts);
    }
    if let Some(bytes) = settings.body_limit {
        builder = builder.body_limit(bytes);
    }
    if let Some(timeout) = settings.attempt_timeout {
        builder = builder.attempt_timeout(timeout);
    }
    if let Some(cap) = settings.cooldown_cap {
        builder = builder.max_cooldown(cap);
    }
    for backend in &settings.backends {
        let auth = match (&mode, &shared) {
            (AuthMode::ApiKey, _) => Some(api_key_layer(&backend.name)?),
            (_, Some(shared)) => Some(shared.clone()),
            (_, None) => None,
        };
        builder = match auth {
            Some(auth) => builder.backend_with_auth(&backend.name, &backend.url, auth),
            None => builder.backend(&backend.name, &backend.url),
        };
    }
    builder.build().map_err(|e| e.to_string())
}

/// The credential for an Entra ID mode; `None` for `api-key` and `none`.
fn credential(mode: &AuthMode) -> Result<Option<Arc<dyn TokenCredential>>, String> {
    use azure_identity::{
        ClientSecretCredential, DeveloperToolsCredential, ManagedIdentityCredential,
        ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    };
    let failed = |e: azure_core::Error| format!("cannot create the {mode:?} credential: {e}");
    Ok(Some(match mode {
        AuthMode::ManagedIdentity(client_id) => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            };
            ManagedIdentityCredential::new(Some(options)).map_err(failed)?
        }
        AuthMode::WorkloadIdentity => WorkloadIdentityCredential::new(None).map_err(failed)?,
        AuthMode::DeveloperTools => DeveloperToolsCredential::new(None).map_err(failed)?,
        AuthMode::ClientSecret => {
            let var = |name: &str| {
                std::env::var(name).map_err(|_| format!("--auth client-secret needs {name}"))
            };
            ClientSecretCredential::new(
                &var("AZURE_TENANT_ID")?,
                var("AZURE_CLIENT_ID")?,
                var("AZURE_CLIENT_SECRET")?.into(),
                None,
            )
            .map_err(failed)?
        }
        AuthMode::ApiKey | AuthMode::None => return Ok(None),
    }))
}

/// The api-key layer for a backend, from `AOAI_KEY_<NAME>` (upper case, `_` for other
/// characters).
fn api_key_layer(name: &str) -> Result<AzureAuthLayer, String> {
    let var: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let var = format!("AOAI_KEY_{var}");
    let key = std::env::var(&var)
        .map_err(|_| format!("--auth api-key: environment variable {var} is not set"))?;
    AzureAuthLayer::from_api_key(&key).map_err(|e| format!("{var}: {e}"))
}

fn backends_json(health: &aoai_tower::balance::BalanceHealth) -> serde_json::Value {
    let backends: Vec<_> = health
        .snapshot()
        .into_iter()
        .map(|b| {
            json!({
                "name": &*b.name,
                "index": b.index,
                "available": b.cooling_down_for.is_none(),
                "cooling_down_ms": b.cooling_down_for.map(|d| d.as_millis() as u64),
                "consecutive_failures": b.consecutive_failures,
                "attempts": b.attempts,
                "throttled": b.throttled,
                "failed": b.failed,
            })
        })
        .collect();
    json!({ "backends": backends })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
