//! An Azure OpenAI emulator on loopback, for tests, demos and benchmarks.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use aoai_sim::{Fault, SimConfig};
//!
//! # #[tokio::main] async fn main() {
//! let sim = aoai_sim::start(SimConfig::new("eastus").expect_api_key("key-1")).await;
//! sim.push_fault(Fault::throttle(2));
//!
//! let url = format!(
//!     "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
//!     sim.url()
//! );
//! let client = reqwest::Client::new();
//! let send = || {
//!     client
//!         .post(&url)
//!         .header("api-key", "key-1")
//!         .json(&serde_json::json!({"messages": [{"role": "user", "content": "Hi"}]}))
//!         .send()
//! };
//! assert_eq!(send().await.unwrap().status(), 429); // the scripted fault
//! let reply: serde_json::Value = send().await.unwrap().json().await.unwrap();
//! assert_eq!(reply["choices"][0]["message"]["content"], "Hello from eastus lorem ipsum");
//! assert_eq!(sim.request_count(), 2);
//! sim.shutdown().await;
//! # }
//! ```
//!
//! # What it emulates
//!
//! Each instance ([`start`], or [`router`] inside your own app) answers the chat completions,
//! legacy completions, embeddings and Responses operations, on the deployment routes
//! (`/openai/deployments/{deployment}/...?api-version=...`) and the v1 routes (`/openai/v1/...`),
//! with the documents, headers and errors the real service sends:
//!
//! - JSON answers with Azure's fields (`prompt_filter_results`, `content_filter_results`,
//!   `system_fingerprint`, `usage`), and `text/event-stream` answers for `"stream": true` that
//!   start with Azure's `prompt_filter_results` chunk and end with `data: [DONE]`.
//! - `apim-request-id`, `x-request-id`, `x-ms-region` and `x-ratelimit-remaining-*` on every
//!   answer.
//! - Azure's 401 for missing credentials ([`SimConfig::expect_api_key`],
//!   [`SimConfig::expect_bearer`]), 404 for unknown routes, 400 for bodies that are not JSON, 429
//!   with `retry-after` over a quota ([`SimConfig::tokens_per_minute`]).
//!
//! The reply says who answered: `"Hello from <name> ..."`, one token per SSE content chunk,
//! paced by [`SimConfig::time_to_first_token`] and [`SimConfig::chunk_delay`].
//!
//! # Scripting
//!
//! - [`SimHandle::push_fault`] queues a [`Fault`] (throttle, 5xx, content filter, delay, hang,
//!   dropped connection, any response); each request takes the next one.
//! - [`SimHandle::requests`] returns every request received, fault or not, bodies of any size.
//! - [`SimHandle::hold_chunks`] and [`SimHandle::release_chunk`] step a stream chunk by chunk,
//!   to prove a proxy forwards SSE without buffering.

#![forbid(unsafe_code)]

mod config;
mod fault;
mod ids;
mod server;
mod service;
mod shapes;
mod state;

pub use config::SimConfig;
pub use fault::Fault;
pub use server::{SimHandle, start};
pub use service::router;
pub use state::{RecordedRequest, SimState};
