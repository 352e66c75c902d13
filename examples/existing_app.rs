//! An existing axum app, with its own routes and middleware (tower-http trace and request id),
//! that mounts the aoai-tower stack under a prefix. Its other routes behave as before.
//!
//! ```text
//! cargo run --example existing_app
//! curl http://127.0.0.1:3000/api/hello
//! curl http://127.0.0.1:3000/llm/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \
//!     -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"Hi"}]}'
//! ```

use aoai_sim::SimConfig;
use aoai_tower::Gateway;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The app as it was before aoai-tower, plus one `nest_service` line.
///
/// The caller's `x-request-id` reaches Azure; on responses from Azure, Azure's own
/// `x-request-id` (the id its support asks for) is kept: `PropagateRequestIdLayer` only sets
/// the header when the response has none.
pub fn app(gateway: Gateway) -> Router {
    Router::new()
        .route(
            "/api/hello",
            get(|| async { Json(json!({ "hello": "world" })) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .nest_service("/llm/openai", gateway)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http())
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .init();
    let east = aoai_sim::start(SimConfig::new("eastus")).await;
    let west = aoai_sim::start(SimConfig::new("westus")).await;
    let gateway = Gateway::builder()
        .backend("eastus", east.url())
        .backend("westus", west.url())
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!(addr = %listener.local_addr()?, "existing app listening");
    // TCP_NODELAY on accepted connections, so stream chunks leave at once.
    let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
    axum::serve(listener, app(gateway))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
