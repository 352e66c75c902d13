//! The Realtime API: `GET /openai/realtime?api-version=...&deployment=...` (preview) and
//! `GET /openai/v1/realtime?model=...` (GA), upgraded to a WebSocket that answers the client's
//! events with the server events of Azure's Realtime API. The path chooses the [`Dialect`]: the
//! preview path speaks the preview (beta) events and session, the GA path the GA ones.
//!
//! The handshake goes through the `front` middleware like any request: it is recorded, takes
//! the next queued fault, and gets Azure's 401 without credentials (here an `api-key` query
//! parameter counts too, as it does for browsers). `front` rebuilds the request from its parts,
//! so hyper's `OnUpgrade` extension reaches [`WebSocketUpgrade`] intact.
//!
//! One task per session reads the client's events and, at the same time, sends the paced events
//! of the response in progress, so a `response.cancel` or a close is seen mid-response.

use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, StreamExt};
use http::{StatusCode, Uri};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::objects::openai_error;
use crate::service::{Pace, paced, reply};
use crate::{SimState, ids};

/// The preview path; the deployment is the `deployment` query parameter.
pub(crate) const PATH: &str = "/openai/realtime";
/// The GA path; the deployment is the `model` query parameter.
pub(crate) const V1_PATH: &str = "/openai/v1/realtime";

/// How long a session closed by the emulator (`sim.close`) waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// pcm16 at 24 kHz: 48 bytes of audio per millisecond.
const AUDIO_BYTES_PER_MS: usize = 48;

/// The audio of one `response.audio.delta`: 1 ms of pcm16 silence (48 zero bytes), base64.
const SILENCE: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The start of the real service's default instructions.
const DEFAULT_INSTRUCTIONS: &str = "Your knowledge cutoff is 2023-10. You are a helpful, witty, \
     and friendly AI.";

/// The client events the emulator answers, as the real service lists them in its error.
const CLIENT_EVENTS: &str = "'session.update', 'input_audio_buffer.append', \
     'input_audio_buffer.commit', 'input_audio_buffer.clear', 'conversation.item.create', \
     'conversation.item.truncate', 'conversation.item.delete', 'response.create', and \
     'response.cancel'";

// ---- the dialects ----

/// Which version of the Realtime protocol a session speaks, chosen by the path it was opened on.
/// One code path serves both: the dialect names the events and shapes the session, the
/// response and the items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// `/openai/realtime?api-version=...`: the preview (beta) protocol.
    Preview,
    /// `/openai/v1/realtime`: the GA protocol (`gpt-realtime`), the same as OpenAI's GA
    /// Realtime API.
    Ga,
}

/// The server events the GA protocol renamed, from their preview names.
///
/// Sources: Microsoft Learn, "Migration from Preview to GA version of Realtime API"
/// (learn.microsoft.com/azure/foundry/openai/how-to/realtime-audio-preview-api-migration-guide)
/// for the three `.delta` renames, the new `conversation.item.added` and `conversation.item.done`
/// events, the `output_text`/`output_audio` content types of assistant messages and
/// `session.type`; the GA types of openai-python (`src/openai/types/realtime/`, which the guide
/// names as the reference SDK) for `response.output_text.done`,
/// `response.output_audio_transcript.done`, the GA session (`audio.input`/`audio.output`,
/// `output_modalities`, `max_output_tokens`) and the GA response object. `response.audio.done`
/// becomes `response.output_audio.done` like its `.delta`, as GA clients expect it.
const GA_NAMES: [(&str, &str); 7] = [
    ("conversation.item.created", "conversation.item.added"),
    ("response.text.delta", "response.output_text.delta"),
    ("response.text.done", "response.output_text.done"),
    ("response.audio.delta", "response.output_audio.delta"),
    ("response.audio.done", "response.output_audio.done"),
    (
        "response.audio_transcript.delta",
        "response.output_audio_transcript.delta",
    ),
    (
        "response.audio_transcript.done",
        "response.output_audio_transcript.done",
    ),
];

/// The preview session fields the GA session moved or dropped (`voice`, the formats, the
/// transcription, noise reduction, turn detection and speed went under `audio.input` or
/// `audio.output`; `modalities` is `output_modalities`, `max_response_output_tokens` is
/// `max_output_tokens`; `temperature` is gone). GA answers them with `unknown_parameter`.
const PREVIEW_SESSION_FIELDS: [&str; 10] = [
    "modalities",
    "voice",
    "input_audio_format",
    "output_audio_format",
    "input_audio_transcription",
    "input_audio_noise_reduction",
    "turn_detection",
    "temperature",
    "max_response_output_tokens",
    "speed",
];

/// The preview `response.create` options the GA one has not (it has `output_modalities`,
/// `audio.output.voice` and `audio.output.format`).
const PREVIEW_RESPONSE_FIELDS: [&str; 5] = [
    "modalities",
    "voice",
    "output_audio_format",
    "temperature",
    "max_response_output_tokens",
];

impl Dialect {
    /// The dialect of a Realtime path: GA on [`V1_PATH`], else preview.
    fn of(path: &str) -> Self {
        if path == V1_PATH {
            Self::Ga
        } else {
            Self::Preview
        }
    }

    /// This dialect's name for the server event named `preview` in the preview protocol.
    fn name(self, preview: &'static str) -> &'static str {
        match self {
            Self::Preview => preview,
            Self::Ga => GA_NAMES
                .iter()
                .find(|(from, _)| *from == preview)
                .map_or(preview, |(_, to)| to),
        }
    }

    /// The content type of an assistant message's text or audio (`kind` is `text` or `audio`).
    /// The parts of `response.content_part.*` keep `text` and `audio` in both dialects.
    fn output_content(self, kind: &'static str) -> &'static str {
        match (self, kind) {
            (Self::Ga, "text") => "output_text",
            (Self::Ga, "audio") => "output_audio",
            _ => kind,
        }
    }
}

/// pcm16 at 24 kHz, in the GA session's shape.
fn pcm_format() -> Value {
    json!({"type": "audio/pcm", "rate": 24000})
}

// ---- the instance's sessions ----

/// The Realtime sessions of one instance: how many are open, and the signal that ends them.
#[derive(Debug)]
pub(crate) struct Sessions {
    open: AtomicUsize,
    stop: watch::Sender<bool>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            stop: watch::Sender::new(false),
        }
    }
}

impl Sessions {
    /// How many sessions are open: upgraded, and not yet closed by either side.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Drop every open session's connection, without a close frame (the instance shuts down).
    pub(crate) fn end_all(&self) {
        // `send_replace` updates the value even when no session is listening.
        self.stop.send_replace(true);
    }
}

/// One open session in [`Sessions::open`], counted out once: when either side sends its close
/// frame, or when the task ends whichever way.
struct Counted {
    state: SimState,
    counted: bool,
}

impl Counted {
    fn new(state: &SimState) -> Self {
        state.realtime().open.fetch_add(1, Ordering::SeqCst);
        Self {
            state: state.clone(),
            counted: true,
        }
    }

    fn end(&mut self) {
        if mem::take(&mut self.counted) {
            self.state.realtime().open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.end();
    }
}

// ---- the handshake ----

/// Whether the request's `api-key` query parameter is the expected key, on a Realtime path
/// (browsers cannot set headers on a WebSocket handshake).
pub(crate) fn key_in_query(state: &SimState, uri: &Uri) -> bool {
    matches!(uri.path(), PATH | V1_PATH)
        && state
            .config()
            .api_key
            .as_deref()
            .zip(query_param(uri, "api-key"))
            .is_some_and(|(want, got)| got == want)
}

/// `GET` on a Realtime path: 400 without a deployment, else the upgrade.
pub(crate) async fn realtime(
    State(state): State<SimState>,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let dialect = Dialect::of(uri.path());
    let Some(model) = query_param(&uri, "deployment")
        .or_else(|| query_param(&uri, "model"))
        .filter(|model| !model.is_empty())
    else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Missing required query parameter: 'deployment' (or 'model').".to_owned(),
            None,
            Some("missing_required_parameter"),
        )
        .into_response();
    };
    match upgrade {
        // Browsers offer the `realtime` subprotocol; take it when offered.
        Ok(upgrade) => upgrade
            .protocols(["realtime"])
            .on_upgrade(move |socket| run(state, socket, model, dialect)),
        Err(rejection) => openai_error(
            rejection.status(),
            rejection.body_text(),
            None,
            Some("websocket_upgrade_required"),
        )
        .into_response(),
    }
}

/// The first value of query parameter `name`, form-decoded by axum's [`Query`] (`+` is a
/// space; a malformed escape is kept as it is).
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri).ok()?;
    pairs
        .into_iter()
        .find_map(|(key, value)| (key == name).then_some(value))
}

// ---- the session ----

/// Serve one session until either side closes it or the instance shuts down.
async fn run(state: SimState, mut socket: WebSocket, model: String, dialect: Dialect) {
    let mut counted = Counted::new(&state);
    let mut stop = state.realtime().stop.subscribe();
    let mut session = Session::new(state, &model, dialect);
    let mut active: Option<Active> = None;
    if send(&mut socket, &session.created()).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            // The sender lives in the state this task holds: `wait_for` only returns when told to
            // stop. The connection is dropped, like every other one at shutdown.
            () = stopped(&mut stop) => return,
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => match session.handle(text.as_str(), &mut active) {
                    Handled::Reply(events) => {
                        for event in &events {
                            if send(&mut socket, event).await.is_err() {
                                return;
                            }
                        }
                    }
                    Handled::Close(frame) => {
                        counted.end();
                        if socket.send(Message::Close(Some(frame))).await.is_ok() {
                            // Read on until the client's close frame ends the stream.
                            let drain = async { while let Some(Ok(_)) = socket.recv().await {} };
                            let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
                        }
                        return;
                    }
                },
                // The test hook: binary frames come back unchanged.
                Some(Ok(Message::Binary(bytes))) => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // The WebSocket layer echoes the frame (code and reason) on the next read,
                    // which then ends the stream.
                    counted.end();
                    active = None;
                }
                // Pings are answered by the WebSocket layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                None | Some(Err(_)) => return,
            },
            event = next_event(&mut active) => match event {
                Some(event) => {
                    if send(&mut socket, &event).await.is_err() {
                        return;
                    }
                }
                None => active = None,
            },
        }
    }
}

/// Wait for [`Sessions::end_all`]. The guard `wait_for` returns is dropped here: it is not
/// `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn send(socket: &mut WebSocket, event: &Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(event.to_string().into())).await
}

/// The next event of the response in progress; `None` when it is over; never without one.
async fn next_event(active: &mut Option<Active>) -> Option<Value> {
    match active {
        Some(active) => active.events.next().await,
        None => std::future::pending().await,
    }
}

/// The response in progress: its paced events, and the `response.done` a cancel sends instead.
struct Active {
    id: String,
    events: BoxStream<'static, Value>,
    cancelled: Value,
}

/// What a client event gets.
enum Handled {
    /// These events, at once (none for `input_audio_buffer.append`).
    Reply(Vec<Value>),
    /// `sim.close`: close the session with this frame.
    Close(CloseFrame),
}

/// One conversation item, for `previous_item_id` and the input token count.
struct Item {
    id: String,
    text_chars: usize,
    audio_bytes: usize,
}

/// What one session remembers: its dialect, the session object, the conversation and the audio
/// buffer.
struct Session {
    state: SimState,
    dialect: Dialect,
    session: Map<String, Value>,
    conversation_id: String,
    items: Vec<Item>,
    buffered_audio: usize,
}

/// A client event refused with an `error` event; the session goes on.
struct Problem {
    code: &'static str,
    message: String,
    param: Option<String>,
}

impl Problem {
    fn missing(param: &str) -> Self {
        Self {
            code: "missing_required_parameter",
            message: format!("Missing required parameter: '{param}'."),
            param: Some(param.to_owned()),
        }
    }

    fn invalid(param: &str, message: String) -> Self {
        Self {
            code: "invalid_value",
            message,
            param: Some(param.to_owned()),
        }
    }

    /// A field the dialect does not know (GA, for the preview fields it renamed).
    fn unknown(param: &str) -> Self {
        Self {
            code: "unknown_parameter",
            message: format!("Unknown parameter: '{param}'."),
            param: Some(param.to_owned()),
        }
    }

    fn event(self, client_event_id: Option<&str>) -> Value {
        event(
            "error",
            json!({"error": {
                "type": "invalid_request_error",
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "event_id": client_event_id,
            }}),
        )
    }
}

/// A server event: `type`, a fresh `event_id`, and the fields of `body`.
fn event(kind: &str, body: Value) -> Value {
    let mut event = Map::new();
    event.insert("type".to_owned(), kind.into());
    event.insert("event_id".to_owned(), ids::id("event_", 21).into());
    if let Value::Object(fields) = body {
        event.extend(fields);
    }
    Value::Object(event)
}

/// The object fields of `base` and `extra` together.
fn merged(base: &Value, extra: Value) -> Value {
    let mut base = base.clone();
    if let (Value::Object(base), Value::Object(extra)) = (&mut base, extra) {
        base.extend(extra);
    }
    base
}

/// Characters of text in message content parts (`text` and `transcript` fields).
fn content_chars(item: &Map<String, Value>) -> usize {
    item.get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|part| ["text", "transcript"].map(|key| part.get(key)))
        .flatten()
        .filter_map(Value::as_str)
        .map(|text| text.chars().count())
        .sum()
}

/// Whether `modalities` is an array of `text` and `audio`; in GA, exactly one of them (GA
/// answers with audio and its transcript, or with text, never both).
fn valid_modalities(dialect: Dialect, modalities: &Value) -> bool {
    modalities.as_array().is_some_and(|modalities| {
        modalities.iter().all(|m| m == "text" || m == "audio")
            && (dialect == Dialect::Preview || modalities.len() == 1)
    })
}

/// `output_modalities`, when `fields` (the `session` of a GA `session.update`, or the `response`
/// of a GA `response.create`, named `parent`) has it, must be `["text"]` or `["audio"]`.
fn check_ga_modalities(fields: &Map<String, Value>, parent: &str) -> Result<(), Problem> {
    match fields.get("output_modalities") {
        Some(modalities) if !valid_modalities(Dialect::Ga, modalities) => Err(Problem::invalid(
            &format!("{parent}.output_modalities"),
            "Invalid 'output_modalities': expected ['text'] or ['audio'].".to_owned(),
        )),
        _ => Ok(()),
    }
}

impl Session {
    fn new(state: SimState, model: &str, dialect: Dialect) -> Self {
        let turn_detection = json!({
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 200,
            "create_response": true,
            "interrupt_response": true,
        });
        let session = match dialect {
            Dialect::Preview => json!({
                "id": ids::id("sess_", 21),
                "object": "realtime.session",
                "model": model,
                "expires_at": ids::unix_now() + 30 * 60,
                "modalities": ["text", "audio"],
                "instructions": DEFAULT_INSTRUCTIONS,
                "voice": "alloy",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": null,
                "turn_detection": turn_detection,
                "tools": [],
                "tool_choice": "auto",
                "temperature": 0.8,
                "max_response_output_tokens": "inf",
            }),
            // GA's session (openai-python's `RealtimeSessionCreateResponse`): `type`, the audio
            // settings under `audio.input` and `audio.output`, and `output_modalities`, which
            // defaults to `["audio"]` (audio and its transcript).
            Dialect::Ga => json!({
                "type": "realtime",
                "id": ids::id("sess_", 21),
                "object": "realtime.session",
                "model": model,
                "expires_at": ids::unix_now() + 30 * 60,
                "output_modalities": ["audio"],
                "instructions": DEFAULT_INSTRUCTIONS,
                "audio": {
                    "input": {
                        "format": pcm_format(),
                        "transcription": null,
                        "noise_reduction": null,
                        "turn_detection": merged(&turn_detection, json!({"idle_timeout_ms": null})),
                    },
                    "output": {
                        "format": pcm_format(),
                        "voice": "alloy",
                        "speed": 1.0,
                    },
                },
                "tools": [],
                "tool_choice": "auto",
                "max_output_tokens": "inf",
                "tracing": null,
                "truncation": "auto",
                "prompt": null,
                "include": null,
            }),
        };
        let Value::Object(session) = session else {
            unreachable!("a JSON object literal")
        };
        Self {
            state,
            dialect,
            session,
            conversation_id: ids::id("conv_", 21),
            items: Vec::new(),
            buffered_audio: 0,
        }
    }

    fn created(&self) -> Value {
        event("session.created", json!({"session": self.session}))
    }

    fn last_item(&self) -> Option<String> {
        self.items.last().map(|item| item.id.clone())
    }

    fn handle(&mut self, text: &str, active: &mut Option<Active>) -> Handled {
        let event = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(event)) => event,
            Ok(_) => {
                let problem = Problem {
                    code: "invalid_value",
                    message: "Invalid event: expected a JSON object with a 'type'.".to_owned(),
                    param: None,
                };
                return Handled::Reply(vec![problem.event(None)]);
            }
            Err(error) => {
                let problem = Problem {
                    code: "invalid_json",
                    message: format!("The event is not valid JSON: {error}."),
                    param: None,
                };
                return Handled::Reply(vec![problem.event(None)]);
            }
        };
        let client_event_id = event.get("event_id").and_then(Value::as_str);
        let answered = match event.get("type").and_then(Value::as_str) {
            Some("session.update") => self.update(&event),
            Some("conversation.item.create") => self.create_item(&event),
            Some("conversation.item.delete") => self.delete_item(&event),
            Some("conversation.item.truncate") => self.truncate_item(&event),
            Some("input_audio_buffer.append") => self.append(&event),
            Some("input_audio_buffer.commit") => self.commit(),
            Some("input_audio_buffer.clear") => {
                self.buffered_audio = 0;
                Ok(vec![self::event("input_audio_buffer.cleared", json!({}))])
            }
            Some("response.create") => self.respond(&event, active),
            Some("response.cancel") => self.cancel(active),
            Some("sim.close") => match close_frame(&event) {
                Ok(frame) => return Handled::Close(frame),
                Err(problem) => Err(problem),
            },
            Some(other) => Err(Problem::invalid(
                "type",
                format!("Invalid value: '{other}'. Supported values are: {CLIENT_EVENTS}."),
            )),
            None => Err(Problem::missing("type")),
        };
        Handled::Reply(answered.unwrap_or_else(|problem| vec![problem.event(client_event_id)]))
    }

    /// `session.update`: merge the fields sent into the session (its `id`, `object` and
    /// `expires_at` stay), as the dialect shapes them.
    fn update(&mut self, event: &Map<String, Value>) -> Result<Vec<Value>, Problem> {
        let Some(Value::Object(update)) = event.get("session") else {
            return Err(Problem::missing("session"));
        };
        match self.dialect {
            Dialect::Preview => self.update_preview(update)?,
            Dialect::Ga => self.update_ga(update)?,
        }
        Ok(vec![self::event(
            "session.updated",
            json!({"session": self.session}),
        )])
    }

    /// Set the session's fields to those of `update`, but for `id`, `object` and `expires_at`,
    /// which stay, and `skipped`.
    fn merge(&mut self, update: &Map<String, Value>, skipped: &[&str]) {
        for (key, value) in update {
            if !matches!(key.as_str(), "id" | "object" | "expires_at")
                && !skipped.contains(&key.as_str())
            {
                self.session.insert(key.clone(), value.clone());
            }
        }
    }

    /// A preview `session.update`. The GA name `output_modalities` sets `modalities` too.
    fn update_preview(&mut self, update: &Map<String, Value>) -> Result<(), Problem> {
        for key in ["modalities", "output_modalities"] {
            let valid = update
                .get(key)
                .is_none_or(|m| valid_modalities(Dialect::Preview, m));
            if !valid {
                return Err(Problem::invalid(
                    &format!("session.{key}"),
                    format!("Invalid '{key}': expected an array of 'text' and 'audio'."),
                ));
            }
        }
        self.merge(update, &[]);
        if let Some(modalities) = update.get("output_modalities")
            && !update.contains_key("modalities")
        {
            self.session
                .insert("modalities".to_owned(), modalities.clone());
        }
        Ok(())
    }

    /// A GA `session.update`: `type` is required (`realtime`: the emulator has no transcription
    /// sessions), the preview fields GA moved are unknown, and `audio.input` and `audio.output`
    /// are merged field by field.
    fn update_ga(&mut self, update: &Map<String, Value>) -> Result<(), Problem> {
        match update.get("type") {
            None => return Err(Problem::missing("session.type")),
            Some(kind) if kind == "realtime" => {}
            Some(kind) => {
                let kind = kind
                    .as_str()
                    .map_or_else(|| kind.to_string(), str::to_owned);
                return Err(Problem::invalid(
                    "session.type",
                    format!("Invalid value: '{kind}'. Supported values are: 'realtime'."),
                ));
            }
        }
        if let Some(field) = PREVIEW_SESSION_FIELDS
            .iter()
            .find(|field| update.contains_key(**field))
        {
            return Err(Problem::unknown(&format!("session.{field}")));
        }
        check_ga_modalities(update, "session")?;
        let audio = match update.get("audio") {
            None => None,
            Some(Value::Object(audio)) => {
                for (direction, fields) in audio {
                    if !matches!(direction.as_str(), "input" | "output") {
                        return Err(Problem::unknown(&format!("session.audio.{direction}")));
                    }
                    if !fields.is_object() {
                        return Err(Problem::invalid(
                            &format!("session.audio.{direction}"),
                            format!("Invalid 'audio.{direction}': expected an object."),
                        ));
                    }
                }
                Some(audio)
            }
            Some(_) => {
                return Err(Problem::invalid(
                    "session.audio",
                    "Invalid 'audio': expected an object.".to_owned(),
                ));
            }
        };
        self.merge(update, &["type", "audio"]);
        // The session's `audio` is always an object: a GA update only ever merges into it.
        if let Some(audio) = audio
            && let Some(Value::Object(current)) = self.session.get_mut("audio")
        {
            for (direction, fields) in audio {
                match (current.get_mut(direction), fields) {
                    (Some(Value::Object(current)), Value::Object(fields)) => {
                        current.extend(fields.clone());
                    }
                    _ => {
                        current.insert(direction.clone(), fields.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// The events that say an item joined the conversation: preview's
    /// `conversation.item.created`; GA's `conversation.item.added`, then
    /// `conversation.item.done` (the item is complete).
    fn item_added(&self, previous: Option<String>, item: &Value) -> Vec<Value> {
        let body = json!({"previous_item_id": previous, "item": item});
        let added = event(self.dialect.name("conversation.item.created"), body.clone());
        match self.dialect {
            Dialect::Preview => vec![added],
            Dialect::Ga => vec![added, event("conversation.item.done", body)],
        }
    }

    /// A `response.create` option, else the session's setting, under `audio.output` (GA).
    fn audio_output(&self, options: &Map<String, Value>, key: &str) -> Value {
        let pointer = format!("/output/{key}");
        [options.get("audio"), self.session.get("audio")]
            .into_iter()
            .flatten()
            .find_map(|audio| audio.pointer(&pointer))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Where an item goes: after `previous_item_id` (`"root"`: first), else last.
    fn position(&self, event: &Map<String, Value>) -> Result<usize, Problem> {
        match event.get("previous_item_id").and_then(Value::as_str) {
            None => Ok(self.items.len()),
            Some("root") => Ok(0),
            Some(previous) => self
                .items
                .iter()
                .position(|item| item.id == previous)
                .map(|i| i + 1)
                .ok_or_else(|| {
                    Problem::invalid(
                        "previous_item_id",
                        format!("Previous item with id '{previous}' not found."),
                    )
                }),
        }
    }

    fn create_item(&mut self, event: &Map<String, Value>) -> Result<Vec<Value>, Problem> {
        let Some(Value::Object(item)) = event.get("item") else {
            return Err(Problem::missing("item"));
        };
        let mut item = item.clone();
        let kind = item
            .entry("type")
            .or_insert_with(|| "message".into())
            .clone();
        if kind == "message" && !item.get("role").is_some_and(Value::is_string) {
            return Err(Problem::missing("item.role"));
        }
        let id = match item.get("id").and_then(Value::as_str) {
            Some(id) if self.items.iter().any(|known| known.id == id) => {
                return Err(Problem::invalid(
                    "item.id",
                    format!("Item with id '{id}' already exists."),
                ));
            }
            Some(id) => id.to_owned(),
            None => ids::id("item_", 21),
        };
        let at = self.position(event)?;
        item.insert("id".to_owned(), id.clone().into());
        item.insert("object".to_owned(), "realtime.item".into());
        item.insert("status".to_owned(), "completed".into());
        let previous = at.checked_sub(1).map(|i| self.items[i].id.clone());
        self.items.insert(
            at,
            Item {
                id,
                text_chars: content_chars(&item),
                audio_bytes: 0,
            },
        );
        Ok(self.item_added(previous, &Value::Object(item)))
    }

    fn item_index(&self, event: &Map<String, Value>, code: &'static str) -> Result<usize, Problem> {
        let Some(id) = event.get("item_id").and_then(Value::as_str) else {
            return Err(Problem::missing("item_id"));
        };
        self.items
            .iter()
            .position(|item| item.id == id)
            .ok_or_else(|| Problem {
                code,
                message: format!("Item with item_id not found: {id}"),
                param: Some("item_id".to_owned()),
            })
    }

    fn delete_item(&mut self, event: &Map<String, Value>) -> Result<Vec<Value>, Problem> {
        let index = self.item_index(event, "item_delete_invalid_item_id")?;
        let item = self.items.remove(index);
        Ok(vec![self::event(
            "conversation.item.deleted",
            json!({"item_id": item.id}),
        )])
    }

    fn truncate_item(&mut self, event: &Map<String, Value>) -> Result<Vec<Value>, Problem> {
        let index = self.item_index(event, "item_truncate_invalid_item_id")?;
        let audio_end_ms = event
            .get("audio_end_ms")
            .and_then(Value::as_u64)
            .ok_or_else(|| Problem::missing("audio_end_ms"))?;
        let content_index = event
            .get("content_index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(vec![self::event(
            "conversation.item.truncated",
            json!({
                "item_id": self.items[index].id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }),
        )])
    }

    /// `input_audio_buffer.append`: keep (the length of) the audio; no answer.
    fn append(&mut self, event: &Map<String, Value>) -> Result<Vec<Value>, Problem> {
        let Some(audio) = event.get("audio").and_then(Value::as_str) else {
            return Err(Problem::missing("audio"));
        };
        let padding = audio.bytes().rev().take_while(|&b| b == b'=').count();
        self.buffered_audio += (audio.len() / 4 * 3).saturating_sub(padding);
        Ok(Vec::new())
    }

    /// `input_audio_buffer.commit`: the buffer becomes a user message item. The emulator has no
    /// voice activity detection: the buffer is only committed when the client says so.
    fn commit(&mut self) -> Result<Vec<Value>, Problem> {
        if self.buffered_audio == 0 {
            return Err(Problem {
                code: "input_audio_buffer_commit_empty",
                message: "Error committing input audio buffer: buffer too small. Expected at \
                          least 100ms of audio, but buffer only has 0.00ms of audio."
                    .to_owned(),
                param: None,
            });
        }
        let previous = self.last_item();
        let id = ids::id("item_", 21);
        self.items.push(Item {
            id: id.clone(),
            text_chars: 0,
            audio_bytes: mem::take(&mut self.buffered_audio),
        });
        let item = json!({
            "id": id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": null}],
        });
        let committed = event(
            "input_audio_buffer.committed",
            json!({"previous_item_id": previous, "item_id": id}),
        );
        let mut events = vec![committed];
        events.extend(self.item_added(previous, &item));
        Ok(events)
    }

    /// A `response.create` option, else the session's setting.
    fn setting(&self, options: &Map<String, Value>, keys: &[&str]) -> Value {
        keys.iter()
            .find_map(|key| options.get(*key))
            .or_else(|| keys.iter().find_map(|key| self.session.get(*key)))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// `response.create`: the whole response, built now and sent at its pace by the session
    /// task.
    fn respond(
        &mut self,
        event: &Map<String, Value>,
        active: &mut Option<Active>,
    ) -> Result<Vec<Value>, Problem> {
        if let Some(active) = active {
            return Err(Problem {
                code: "conversation_already_has_active_response",
                message: format!(
                    "Conversation already has an active response in progress: {}. Wait until \
                     the response is finished before creating a new one.",
                    active.id
                ),
                param: None,
            });
        }
        let no_options = Map::new();
        let options = match event.get("response") {
            None | Some(Value::Null) => &no_options,
            Some(Value::Object(options)) => options,
            Some(_) => {
                return Err(Problem::invalid(
                    "response",
                    "Invalid 'response': expected an object.".to_owned(),
                ));
            }
        };
        let dialect = self.dialect;
        let (modalities, max_tokens) = match dialect {
            Dialect::Preview => (
                self.setting(options, &["modalities", "output_modalities"]),
                self.setting(
                    options,
                    &["max_output_tokens", "max_response_output_tokens"],
                ),
            ),
            Dialect::Ga => {
                if let Some(field) = PREVIEW_RESPONSE_FIELDS
                    .iter()
                    .find(|field| options.contains_key(**field))
                {
                    return Err(Problem::unknown(&format!("response.{field}")));
                }
                check_ga_modalities(options, "response")?;
                (
                    self.setting(options, &["output_modalities"]),
                    self.setting(options, &["max_output_tokens"]),
                )
            }
        };
        let modalities = match (modalities, dialect) {
            (Value::Null, Dialect::Preview) => json!(["text", "audio"]),
            (Value::Null, Dialect::Ga) => json!(["audio"]),
            (modalities, _) => modalities,
        };
        let audio = modalities
            .as_array()
            .is_some_and(|modalities| modalities.iter().any(|m| m == "audio"));
        let max_tokens = max_tokens.as_u64();
        let reply = reply(&self.state, max_tokens);
        let text = reply.text();

        // The prompt: the instructions and the conversation so far.
        let instructions = self.setting(options, &["instructions"]);
        let text_chars = instructions.as_str().map_or(0, |s| s.chars().count())
            + self.items.iter().map(|item| item.text_chars).sum::<usize>();
        let audio_bytes: usize = self.items.iter().map(|item| item.audio_bytes).sum();
        let input_text = (text_chars as u64).div_ceil(4).max(1);
        // About one token per 100 ms of audio.
        let input_audio = (audio_bytes / (100 * AUDIO_BYTES_PER_MS)) as u64;
        let output_text = reply.len();
        let output_audio = if audio { reply.len() } else { 0 };
        let usage = |output_text: u64, output_audio: u64| {
            json!({
                "total_tokens": input_text + input_audio + output_text + output_audio,
                "input_tokens": input_text + input_audio,
                "output_tokens": output_text + output_audio,
                "input_token_details": {
                    "cached_tokens": 0,
                    "text_tokens": input_text,
                    "audio_tokens": input_audio,
                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0},
                },
                "output_token_details": {"text_tokens": output_text, "audio_tokens": output_audio},
            })
        };

        let response_id = ids::id("resp_", 21);
        let item_id = ids::id("item_", 21);
        let previous = self.last_item();
        self.items.push(Item {
            id: item_id.clone(),
            text_chars: text.chars().count(),
            audio_bytes: 0,
        });
        // The response's settings: preview's flat fields, or GA's `output_modalities` and
        // `audio.output` (openai-python's GA `RealtimeResponse`, which has no `temperature`).
        let settings = match dialect {
            Dialect::Preview => json!({
                "modalities": modalities,
                "voice": self.setting(options, &["voice"]),
                "output_audio_format": self.setting(options, &["output_audio_format"]),
                "temperature": self.setting(options, &["temperature"]),
            }),
            Dialect::Ga => json!({
                "output_modalities": modalities,
                "audio": {"output": {
                    "format": self.audio_output(options, "format"),
                    "voice": self.audio_output(options, "voice"),
                }},
            }),
        };
        let response = |status: &str, details: Value, output: Value, usage: Value| {
            let response = json!({
                "object": "realtime.response",
                "id": response_id,
                "status": status,
                "status_details": details,
                "output": output,
                "usage": usage,
                "conversation_id": self.conversation_id,
                "max_output_tokens": max_tokens.map_or_else(|| "inf".into(), Value::from),
                "metadata": options.get("metadata").cloned().unwrap_or(Value::Null),
            });
            merged(&response, settings.clone())
        };
        let item = |status: &str, content: Value| {
            json!({
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            })
        };
        // The content part of `response.content_part.*` is `text` or `audio` in both dialects;
        // the assistant message's content is `output_text` or `output_audio` in GA.
        let (kind, field) = if audio {
            ("audio", "transcript")
        } else {
            ("text", "text")
        };
        let empty_part = json!({"type": kind, field: ""});
        let part = json!({"type": kind, field: text});
        let content = json!({"type": dialect.output_content(kind), field: text});
        let at_part = json!({
            "response_id": response_id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
        });
        let (status, details) = if reply.truncated {
            (
                "incomplete",
                json!({"type": "incomplete", "reason": "max_output_tokens"}),
            )
        } else {
            ("completed", Value::Null)
        };

        // Every event of the response, named in the session's dialect.
        let named = |kind: &'static str, body: Value| self::event(dialect.name(kind), body);
        let mut events = vec![
            (
                Pace::Now,
                named(
                    "response.created",
                    json!({"response": response("in_progress", Value::Null, json!([]), Value::Null)}),
                ),
            ),
            (
                Pace::FirstToken,
                named(
                    "response.output_item.added",
                    json!({
                        "response_id": response_id,
                        "output_index": 0,
                        "item": item("in_progress", json!([])),
                    }),
                ),
            ),
            (
                Pace::Now,
                named(
                    "conversation.item.created",
                    json!({"previous_item_id": previous, "item": item("in_progress", json!([]))}),
                ),
            ),
            (
                Pace::Now,
                named(
                    "response.content_part.added",
                    merged(&at_part, json!({"part": empty_part})),
                ),
            ),
        ];
        for (i, token) in reply.tokens.iter().enumerate() {
            let pace = if i == 0 { Pace::Now } else { Pace::NextToken };
            let delta = merged(&at_part, json!({"delta": token}));
            if audio {
                events.push((pace, named("response.audio_transcript.delta", delta)));
                let audio = merged(&at_part, json!({"delta": SILENCE}));
                events.push((Pace::Now, named("response.audio.delta", audio)));
            } else {
                events.push((pace, named("response.text.delta", delta)));
            }
        }
        if audio {
            events.push((Pace::Now, named("response.audio.done", at_part.clone())));
            events.push((
                Pace::Now,
                named(
                    "response.audio_transcript.done",
                    merged(&at_part, json!({"transcript": text})),
                ),
            ));
        } else {
            events.push((
                Pace::Now,
                named(
                    "response.text.done",
                    merged(&at_part, json!({"text": text})),
                ),
            ));
        }
        events.push((
            Pace::Now,
            named(
                "response.content_part.done",
                merged(&at_part, json!({"part": part})),
            ),
        ));
        let done_item = item(status, json!([content]));
        events.push((
            Pace::Now,
            named(
                "response.output_item.done",
                json!({"response_id": response_id, "output_index": 0, "item": done_item}),
            ),
        ));
        if dialect == Dialect::Ga {
            events.push((
                Pace::Now,
                named(
                    "conversation.item.done",
                    json!({"previous_item_id": previous, "item": done_item}),
                ),
            ));
        }
        events.push((
            Pace::Now,
            named(
                "response.done",
                json!({"response": response(
                    status,
                    details,
                    json!([done_item]),
                    usage(output_text, output_audio),
                )}),
            ),
        ));
        let cancelled = json!({"response": response(
            "cancelled",
            json!({"type": "cancelled", "reason": "client_cancelled"}),
            json!([]),
            usage(0, 0),
        )});

        *active = Some(Active {
            id: response_id.clone(),
            events: paced(&self.state, events),
            cancelled,
        });
        Ok(Vec::new())
    }

    /// `response.cancel`: stop the response in progress and say it was cancelled.
    fn cancel(&mut self, active: &mut Option<Active>) -> Result<Vec<Value>, Problem> {
        let Some(cancelled) = active.take() else {
            return Err(Problem {
                code: "response_cancel_not_active",
                message: "Cancellation failed: no active response found".to_owned(),
                param: None,
            });
        };
        Ok(vec![event("response.done", cancelled.cancelled)])
    }
}

/// The frame of `{"type":"sim.close","code":4001,"reason":"..."}`.
fn close_frame(event: &Map<String, Value>) -> Result<CloseFrame, Problem> {
    let code = event
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|code| u16::try_from(code).ok())
        // The codes an endpoint may send (RFC 6455, 7.4): not 1004-1006 nor 1015.
        .filter(|code| matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999))
        .ok_or_else(|| {
            Problem::invalid(
                "code",
                "Invalid 'code': expected a close code to send (1000-1003, 1007-1014 or \
                 3000-4999)."
                    .to_owned(),
            )
        })?;
    let reason = event.get("reason").and_then(Value::as_str).unwrap_or("");
    if reason.len() > 123 {
        return Err(Problem::invalid(
            "reason",
            "Invalid 'reason': at most 123 bytes.".to_owned(),
        ));
    }
    Ok(CloseFrame {
        code,
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let uri: Uri = "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt%2D4o+rt\
                        &api-key=a%3Db&x=100%&y=%zz%41"
            .parse()
            .unwrap();
        assert_eq!(
            query_param(&uri, "deployment").as_deref(),
            Some("gpt-4o rt")
        );
        assert_eq!(query_param(&uri, "api-key").as_deref(), Some("a=b"));
        assert_eq!(query_param(&uri, "model"), None);
        assert_eq!(query_param(&uri, "x").as_deref(), Some("100%"));
        assert_eq!(query_param(&uri, "y").as_deref(), Some("%zzA"));
    }

    #[test]
    fn the_dialects_name_the_events() {
        assert_eq!(Dialect::of(PATH), Dialect::Preview);
        assert_eq!(Dialect::of(V1_PATH), Dialect::Ga);
        for (preview, ga) in GA_NAMES {
            assert_eq!(Dialect::Preview.name(preview), preview);
            assert_eq!(Dialect::Ga.name(preview), ga);
        }
        assert_eq!(Dialect::Ga.name("response.done"), "response.done");
        assert_eq!(Dialect::Ga.output_content("text"), "output_text");
        assert_eq!(Dialect::Preview.output_content("audio"), "audio");
    }

    #[test]
    fn silence_is_48_zero_bytes() {
        assert_eq!(SILENCE, ids::base64(&[0; AUDIO_BYTES_PER_MS]));
    }
}
