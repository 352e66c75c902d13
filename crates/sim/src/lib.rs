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
//! legacy completions, embeddings and Responses operations (and holds the objects below), on
//! the deployment routes
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
//! # Objects
//!
//! Each instance holds its own objects, in memory, and no other instance knows them: a
//! follow-up sent to the wrong instance fails there as it would on another Azure resource.
//!
//! - Responses are stored unless `"store": false`: `GET` and `DELETE /responses/{id}`,
//!   `GET /responses/{id}/input_items`, `POST /responses/{id}/cancel`. A request with a
//!   `previous_response_id` this instance holds continues that chain: the answer names it and
//!   its reply says the turn, `"Hello from <name> (turn 3) ..."`; one it does not hold gets
//!   Azure's 400 `previous_response_not_found`.
//! - Conversations (`POST /conversations`, with `items` if any; `GET`, `DELETE`, `GET` and
//!   `POST /conversations/{id}/items`). A response whose `conversation` names one this instance
//!   holds adds its input and answer to it, and its reply says the turn; one it does not hold
//!   gets a 404.
//! - Files (`POST /files`, `multipart/form-data` with `purpose` and `file`; `GET`, `DELETE`,
//!   `/content`, the list) and batches over them (`POST /batches` needs the input file on the
//!   same instance; the first read after creation finds the batch `completed` with an output
//!   file of chat completions).
//! - Assistants threads, their messages and runs (a run completes at once and adds the reply).
//! - Unknown ids get the instance's 404, in the shape Azure uses for that kind of object.
//!
//! [`SimState::object_count`] says how many objects of an [`ObjectKind`] requests created, so a
//! test can check that a retried request left exactly one behind. Each kind keeps at most
//! 10,000 objects and 256 MiB, dropping the oldest first.
//!
//! # Realtime
//!
//! `GET /openai/realtime?api-version=...&deployment=...` and `GET /openai/v1/realtime?model=...`
//! upgrade to a WebSocket that speaks the Realtime events (JSON text frames, each with `type` and
//! `event_id`). The handshake is recorded, takes queued faults and is checked for credentials
//! like any request; an `api-key` query parameter is accepted too, as from a browser.
//!
//! - `session.created` on connect (the session's `model` is the deployment asked for);
//!   `session.update` answers `session.updated` with the fields sent merged in.
//! - `conversation.item.create` (`.delete`, `.truncate`) answers `conversation.item.created`
//!   (`.deleted`, `.truncated`); `input_audio_buffer.append` keeps the audio,
//!   `input_audio_buffer.commit` answers `input_audio_buffer.committed` and the user item. There
//!   is no voice activity detection: nothing happens until the client commits.
//! - `response.create` answers `response.created`, `response.output_item.added`,
//!   `conversation.item.created`, `response.content_part.added`, one `response.text.delta` per
//!   reply token (with audio in the modalities, the default: `response.audio_transcript.delta`
//!   and `response.audio.delta`, 1 ms of silence), then `response.text.done` (or
//!   `response.audio.done` and `response.audio_transcript.done`),
//!   `response.content_part.done`, `response.output_item.done` and `response.done` with `usage`.
//!   Paced and held like SSE chunks; `response.cancel` ends it with a cancelled `response.done`.
//! - Those are the preview names, on `/openai/realtime`. `/openai/v1/realtime` speaks GA:
//!   `response.output_text.delta`/`.done`, `response.output_audio.delta`/`.done`,
//!   `response.output_audio_transcript.delta`/`.done`, `conversation.item.added` then
//!   `conversation.item.done` for `conversation.item.created`, assistant content `output_text`
//!   or `output_audio`; its session has `type: "realtime"`, `output_modalities` and
//!   `audio.input`/`audio.output` (`format`, `voice`), and `session.update` takes that shape
//!   (the preview fields get `unknown_parameter`).
//! - Unknown or malformed events get an `error` event; the session goes on.
//! - Binary frames come back unchanged, pings get pongs, and a close frame is echoed with its
//!   code and reason.
//! - Emulator only: `{"type":"sim.close","code":4001,"reason":"..."}` makes the instance close
//!   the session with that code and reason.
//!
//! [`SimHandle::realtime_sessions`] counts the sessions open on the instance.
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
mod objects;
mod realtime;
mod server;
mod service;
mod shapes;
mod state;

pub use config::SimConfig;
pub use fault::Fault;
pub use objects::ObjectKind;
pub use server::{SimHandle, start};
pub use service::router;
pub use state::{RecordedRequest, SimState};
