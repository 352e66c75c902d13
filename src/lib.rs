//! Tower middleware that spreads Azure OpenAI traffic over several Azure OpenAI instances
//! behind one endpoint: round-robin, retry on the next instance, Entra ID auth.
//!
//! This facade re-exports the crates ([`balance`], [`retry`], [`auth`], [`rebase`],
//! [`upstream`]) and composes the standard stack in [`Gateway`], ready to mount in an axum app.
//!
//! # Example
//!
//! ```no_run
//! use aoai_tower::Gateway;
//! use aoai_tower::auth::AzureAuthLayer;
//! use azure_identity::ManagedIdentityCredential;
//! use axum::{Router, routing::get, serve::ListenerExt};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let credential = ManagedIdentityCredential::new(None)?;
//! let auth = AzureAuthLayer::from_credential(credential);
//! let gateway = Gateway::builder()
//!     .backend_with_auth("eastus", "https://eastus.openai.azure.com", auth.clone())
//!     .backend_with_auth("swedencentral", "https://swedencentral.openai.azure.com", auth)
//!     .build()?;
//!
//! let app = Router::new()
//!     .route("/healthz", get(|| async { "ok" }))
//!     .nest_service("/openai", gateway);
//! // TCP_NODELAY on accepted connections, so stream chunks leave at once.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080")
//!     .await?
//!     .tap_io(|tcp| drop(tcp.set_nodelay(true)));
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # The stack, outer to inner
//!
//! ```text
//! Gateway                 Host check (HTTP/1.1), the caller's token limit, the caller's
//!                         credentials removed, upgrades bridged (WebSocket: message by
//!                         message, Realtime sessions counted and limited), errors ->
//!                         Azure-shaped responses, `x-served-by`; usage read as the answer
//!                         passes, then one log line and the metrics
//!   RetryNextBackend      read the body once (limit -> 413), retry on the next backend,
//!                         overall deadline
//!     IncludeUsageLayer   streamed chat completions asked for their usage (if configured)
//!     PinLayer            a request naming an object (a stored response, a file) to the
//!                         instance holding it, or asking each; creations never repeated
//!                         where the instance may have acted
//!     DeploymentLayer     names the request's deployment (path, or a v1 body's `model`)
//!     Balance             tiers, weighted round-robin, skip tried and cooling backends
//!                         (per deployment for a 429), one trial after a cooldown
//!       per backend:
//!       MapDeployment     the deployment under the instance's own name, if it has one
//!       AzureAuth         bearer token or api-key; the caller's credentials removed
//!       Timeout           tower's, per attempt, from the send to the response headers
//!       Rebase            onto the backend's base URL, `..` refused, hop-by-hop headers dropped
//!       client            hyper's (`UpstreamClient`: HTTP/2 by ALPN, rustls), or your own
//! ```
//!
//! Each piece is a plain tower layer or service: compose your own stack from the crates when
//! `Gateway` does not fit, and turn errors into responses with [`error_response`].

#![forbid(unsafe_code)]

mod classify;
mod client_key;
mod deployment;
mod error;
mod gateway;
mod include_usage;
mod metrics;
mod pinning;
mod realtime;
mod record;
mod upgrade;

pub use aoai_auth as auth;
pub use aoai_balance as balance;
pub use aoai_rebase as rebase;
pub use aoai_retry as retry;
pub use aoai_upstream as upstream;
pub use aoai_usage as usage;

pub use crate::classify::GatewayClassifier;
pub use crate::client_key::{RequireClientKey, RequireClientKeyLayer};
pub use crate::deployment::{DeploymentLayer, MapDeployment, SetDeployment};
pub use crate::error::{azure_error, error_response};
pub use crate::gateway::{
    Backend, DefaultClient, Gateway, GatewayBuilder, GatewayError, GatewayFuture,
};
pub use crate::include_usage::{IncludeUsage, IncludeUsageFuture, IncludeUsageLayer, UsageAdded};
pub use crate::metrics::GatewayMetrics;
pub use crate::pinning::{MayHaveActed, NotHere, ObjectMap, PinFuture, PinLayer, PinToObject};
pub use crate::realtime::Sessions;
pub use tower::BoxError;

/// The README's examples, compiled as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The examples of docs/composing.md, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/composing.md")]
pub struct ComposingDoctests;
