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
//! each backend's `/openai/...`. `GET /admin/backends` shows each backend's health, and the
//! Realtime sessions open, as JSON.

#[cfg(feature = "otlp")]
mod otlp;
mod reload;
mod serve;
mod settings;

use std::sync::Arc;

use aoai_tower::auth::AzureAuthLayer;
use aoai_tower::balance::BackendState;
use aoai_tower::upstream::{UpstreamClient, UpstreamClientBuilder};
use aoai_tower::usage::TokenLimiter;
use aoai_tower::{Gateway, GatewayMetrics, ObjectMap, RequireClientKeyLayer, Sessions};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use azure_core::credentials::TokenCredential;
use clap::Parser;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::reload::Reloadable;
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = settings.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime
        .thread_name("gateway-worker")
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
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
            settings
                .backends
                .push(Backend::new(name.to_owned(), sim.url()));
            emulators.push(sim);
        }
    }
    let unnamed = match &settings.client_keys_env {
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
        None => None,
    };
    let client_keys = match unnamed {
        Some(layer) => Some(layer.clients(settings.clients.iter().cloned())),
        None if !settings.clients.is_empty() => Some(RequireClientKeyLayer::with_clients(
            settings.clients.iter().cloned(),
        )),
        None if settings.listen.ip().is_loopback() => None,
        None => {
            return Err(format!(
                "refusing to listen on {} without client keys: set --client-keys-env or \
                 [[clients]]",
                settings.listen
            ));
        }
    };

    // Kept across reloads: the counters, and what each caller has used this minute.
    let mut registry = Registry::default();
    let metrics = GatewayMetrics::new(&mut registry);
    // Pushed over OTLP as well when asked (read at start, as the listen address).
    #[cfg(feature = "otlp")]
    let (metrics, meter_provider) = match &settings.otlp {
        Some(otlp) => {
            // A collector over https trusts the roots the instances do.
            let provider = otlp::meter_provider(otlp, upstream_client(&settings)?.tls_config())?;
            let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "aoai-tower");
            tracing::info!(endpoint = %otlp.endpoint, interval = ?otlp.interval, "exporting metrics over OTLP");
            (metrics.with_meter(&meter), Some(provider))
        }
        None => (metrics, None),
    };
    let kept = Kept {
        metrics,
        limiter: TokenLimiter::new(),
        sessions: Sessions::new(),
        objects: ObjectMap::new(),
    };
    let sessions = kept.sessions.clone();
    let registry = Arc::new(registry);
    let gateway = Reloadable::new(build_gateway(&settings, &kept)?);
    if settings.config.is_some() {
        // The file is read again on SIGHUP; the backends the emulators stand for are kept.
        let backends = settings.backends.clone();
        #[cfg(unix)]
        tokio::spawn(reload::on_sighup(gateway.clone(), move || {
            let mut settings = Settings::from_flags(Flags::parse())?;
            if settings.backends.is_empty() {
                settings.backends = backends.clone();
            }
            build_gateway(&settings, &kept)
        }));
    }
    let admin = gateway.clone();
    let mut app = Router::new()
        .route(
            "/admin/backends",
            get(move || {
                let gateway = admin.current();
                let mut json = backends_json(gateway.health());
                // Those of every gateway a reload replaced, too: they share one handle.
                json["realtime_sessions"] = gateway.sessions().count().into();
                async move { Json(json) }
            }),
        )
        .route("/metrics", get(move || metrics_text(registry.clone())))
        .nest_service("/openai", gateway);
    if let Some(keys) = client_keys {
        app = app.layer(keys);
    }

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
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
    // On SIGTERM or Ctrl-C: stop accepting, let requests in flight finish, and Realtime
    // sessions for up to the grace period.
    let grace = settings.sessions.shutdown_grace;
    serve::serve(
        listener,
        app,
        settings.timeouts,
        shutdown_signal(),
        &sessions,
        grace,
    )
    .await;
    #[cfg(feature = "otlp")]
    if let Some(provider) = meter_provider {
        otlp::shutdown(provider).await;
    }
    for sim in emulators {
        sim.shutdown().await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// What every gateway built from the settings shares, the first and each one a reload builds.
#[derive(Clone)]
struct Kept {
    metrics: GatewayMetrics,
    limiter: TokenLimiter,
    /// The Realtime sessions, so that those still on a replaced gateway are counted and closed
    /// at shutdown.
    sessions: Sessions,
    /// Where objects (stored responses, files, ...) were seen to live.
    objects: ObjectMap,
}

/// The instances' client, trusting `--ca-file`'s roots besides the platform's.
fn upstream_client(settings: &Settings) -> Result<UpstreamClientBuilder, String> {
    let client = UpstreamClient::builder();
    let Some(path) = &settings.ca_file else {
        return Ok(client);
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    client
        .add_root_certificates_pem(&pem)
        .map_err(|e| format!("CA file {}: {e}", path.display()))
}

fn build_gateway(settings: &Settings, kept: &Kept) -> Result<Gateway, String> {
    let all_loopback = settings.backends.iter().all(|b| is_loopback_url(&b.url));
    let mode = settings.auth.clone().unwrap_or(if all_loopback {
        AuthMode::None
    } else {
        AuthMode::ManagedIdentity(None)
    });
    // One token cache per Entra ID mode, shared by every backend that uses it.
    let mut shared: Vec<(AuthMode, Option<AzureAuthLayer>)> = Vec::new();
    let mut entra_layer = |mode: &AuthMode| -> Result<Option<AzureAuthLayer>, String> {
        if let Some((_, layer)) = shared.iter().find(|(known, _)| known == mode) {
            return Ok(layer.clone());
        }
        let layer = credential(mode)?.map(|credential| {
            let layer = AzureAuthLayer::from_credential(credential);
            match settings.token_wait {
                Some(wait) => layer.with_token_wait(wait),
                None => layer,
            }
        });
        shared.push((mode.clone(), layer.clone()));
        Ok(layer)
    };
    let mut builder = Gateway::builder()
        .client(upstream_client(settings)?.build())
        .served_by_header(settings.served_by_header)
        .include_usage(settings.include_usage)
        .metrics(kept.metrics.clone())
        .token_limiter(kept.limiter.clone())
        .objects(kept.objects.clone())
        .sessions(kept.sessions.clone());
    if let Some(limit) = settings.sessions.idle_limit {
        builder = builder.session_idle_limit(limit);
    }
    if let Some(lifetime) = settings.sessions.lifetime {
        builder = builder.session_lifetime(lifetime);
    }
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
        let auth = match backend.auth.as_ref().unwrap_or(&mode) {
            AuthMode::ApiKey => Some(api_key_layer(&backend.name)?),
            mode => entra_layer(mode)?,
        };
        let mut spec = aoai_tower::Backend::new(&backend.name, &backend.url)
            .priority(backend.priority)
            .weight(backend.weight);
        if let Some(auth) = auth {
            spec = spec.auth(auth);
        }
        if let Some(names) = &backend.deployments {
            spec = spec.deployments(names.iter().map(|(a, o)| (a.as_str(), o.as_str())));
        }
        builder = builder.add_backend(spec);
    }
    builder.build().map_err(|e| e.to_string())
}

/// The credential for an Entra ID mode; `None` for `api-key` and `none`.
fn credential(mode: &AuthMode) -> Result<Option<Arc<dyn TokenCredential>>, String> {
    use azure_core::http::{ClientOptions, RetryOptions};
    use azure_identity::{
        ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
        DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
        UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
    };
    let failed = |e: azure_core::Error| format!("cannot create the {mode:?} credential: {e}");
    // The token cache bounds each fetch and retries on its own (aoai-auth): the credential's
    // own retries (8, about 81 s against a refusing endpoint) would only hold callers.
    let client_options = || ClientOptions {
        retry: RetryOptions::none(),
        ..Default::default()
    };
    Ok(Some(match mode {
        AuthMode::ManagedIdentity(client_id) => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options: client_options(),
            };
            ManagedIdentityCredential::new(Some(options)).map_err(failed)?
        }
        AuthMode::WorkloadIdentity => {
            let options = WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: client_options(),
                },
                ..Default::default()
            };
            WorkloadIdentityCredential::new(Some(options)).map_err(failed)?
        }
        AuthMode::DeveloperTools => DeveloperToolsCredential::new(None).map_err(failed)?,
        AuthMode::ClientSecret => {
            let var = |name: &str| {
                std::env::var(name).map_err(|_| format!("--auth client-secret needs {name}"))
            };
            ClientSecretCredential::new(
                &var("AZURE_TENANT_ID")?,
                var("AZURE_CLIENT_ID")?,
                var("AZURE_CLIENT_SECRET")?.into(),
                Some(ClientSecretCredentialOptions {
                    client_options: client_options(),
                }),
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
                "priority": b.priority,
                "weight": b.weight,
                "state": b.state.to_string(),
                "available": b.state == BackendState::Available,
                "trial_in_flight": b.state == BackendState::Trial { in_flight: true },
                "cooling_reason": b.cooling_reason,
                "cooling_down_ms": b.cooling_down_for.map(|d| d.as_millis() as u64),
                "failed_trials": b.failed_trials,
                "deployments": b
                    .deployments
                    .as_ref()
                    .map(|names| names.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
                "deployment_cooldowns_ms": b
                    .deployment_cooldowns
                    .iter()
                    .map(|(name, left)| (name.to_string(), left.as_millis() as u64))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "consecutive_failures": b.consecutive_failures,
                "attempts": b.attempts,
                "throttled": b.throttled,
                "failed": b.failed,
            })
        })
        .collect();
    json!({ "backends": backends })
}

/// `GET /metrics`: the registry in the OpenMetrics text format, which Prometheus scrapes.
async fn metrics_text(registry: Arc<Registry>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            [(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
