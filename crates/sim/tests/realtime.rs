//! End-to-end tests of the Realtime endpoint: real instances on `127.0.0.1:0`, a real WebSocket
//! client (tokio-tungstenite).

use std::time::Duration;

use aoai_sim::{Fault, SimConfig, SimHandle};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Every test waits at most this long for anything.
const PATIENCE: Duration = Duration::from_secs(5);

const PREVIEW: &str =
    "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o-realtime-preview";
const GA: &str = "/openai/v1/realtime?model=gpt-realtime";

/// Open a WebSocket on `path_and_query`, with these headers; the handshake's answer if refused.
async fn try_connect(
    sim: &SimHandle,
    path_and_query: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, tungstenite::http::Response<Option<Vec<u8>>>> {
    let url = format!("ws://{}{path_and_query}", sim.addr());
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
    {
        Ok((socket, response)) => {
            assert_eq!(response.status(), 101);
            Ok(socket)
        }
        Err(tungstenite::Error::Http(response)) => Err(*response),
        Err(error) => panic!("handshake failed: {error}"),
    }
}

/// Open a session and read its `session.created`.
async fn connect(sim: &SimHandle, path_and_query: &str) -> (Socket, Value) {
    let mut socket = try_connect(sim, path_and_query, &[])
        .await
        .expect("upgraded");
    let created = next_event(&mut socket).await;
    assert_eq!(created["type"], "session.created", "{created}");
    (socket, created)
}

async fn next_message(socket: &mut Socket) -> Message {
    tokio::time::timeout(PATIENCE, socket.next())
        .await
        .expect("a message in time")
        .expect("the socket is open")
        .expect("a message")
}

/// The next text frame, parsed; every server event has a `type` and an `event_...` id.
async fn next_event(socket: &mut Socket) -> Value {
    let message = next_message(socket).await;
    let Message::Text(text) = message else {
        panic!("expected a text frame, got {message:?}");
    };
    let event: Value = serde_json::from_str(text.as_str()).expect("JSON event");
    assert!(event["type"].is_string(), "{event}");
    let id = event["event_id"].as_str().expect("event_id");
    assert!(id.starts_with("event_") && id.len() > 10, "{id}");
    event
}

async fn send(socket: &mut Socket, event: Value) {
    socket
        .send(Message::text(event.to_string()))
        .await
        .expect("send");
}

/// Read events up to and including `response.done`.
async fn response_events(socket: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next_event(socket).await;
        let done = event["type"] == "response.done";
        events.push(event);
        if done {
            return events;
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event["type"].as_str().unwrap_or_default())
        .collect()
}

fn deltas(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .map(|event| event["delta"].as_str().expect("delta"))
        .collect()
}

/// The close frame that ends the stream.
async fn close_frame(socket: &mut Socket) -> CloseFrame {
    loop {
        match next_message(socket).await {
            Message::Close(Some(frame)) => return frame,
            Message::Close(None) => panic!("a close frame without a code"),
            _ => {}
        }
    }
}

/// Wait until the instance counts `n` open sessions.
async fn until_sessions(sim: &SimHandle, n: usize) {
    tokio::time::timeout(PATIENCE, async {
        while sim.realtime_sessions() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} sessions, expected {n}", sim.realtime_sessions()));
}

fn user_text(text: &str) -> Value {
    json!({
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    })
}

/// Send `event` and read the event that answers it.
async fn ask(socket: &mut Socket, event: Value) -> Value {
    send(socket, event).await;
    next_event(socket).await
}

/// Send `event` and read the `error` event that refuses it, with this code and param.
async fn refused(socket: &mut Socket, event: Value, code: &str, param: &str) -> Value {
    let error = ask(socket, event).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["code"], code);
    assert_eq!(error["error"]["param"], param);
    error
}

/// Send a `response.create` and read the response through; its events include `including`.
async fn respond(socket: &mut Socket, create: Value, including: &str) -> Vec<Value> {
    send(socket, create).await;
    let events = response_events(socket).await;
    assert!(types(&events).contains(&including), "{:?}", types(&events));
    events
}

/// A route and the names its events go by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Preview,
    Ga,
}

impl Dialect {
    fn path(self) -> &'static str {
        match self {
            Self::Preview => PREVIEW,
            Self::Ga => GA,
        }
    }

    /// The field that names a session's or a response's modalities.
    fn modalities(self) -> &'static str {
        match self {
            Self::Preview => "modalities",
            Self::Ga => "output_modalities",
        }
    }

    /// The event a new conversation item is announced with.
    fn item_added(self) -> &'static str {
        match self {
            Self::Preview => "conversation.item.created",
            Self::Ga => "conversation.item.added",
        }
    }

    /// A response's output event: `text.delta` is the preview's `response.text.delta`, GA's
    /// `response.output_text.delta`.
    fn output(self, event: &str) -> String {
        match self {
            Self::Preview => format!("response.{event}"),
            Self::Ga => format!("response.output_{event}"),
        }
    }

    /// The types of a response's events, in order: `tokens` text deltas, or `tokens` pairs of a
    /// transcript delta and an audio delta; GA's `conversation.item.done` before the
    /// `response.done`.
    fn response_types(self, tokens: usize, audio: bool) -> Vec<String> {
        let mut types: Vec<String> = vec![
            "response.created".into(),
            "response.output_item.added".into(),
            self.item_added().into(),
            "response.content_part.added".into(),
        ];
        for _ in 0..tokens {
            if audio {
                types.push(self.output("audio_transcript.delta"));
                types.push(self.output("audio.delta"));
            } else {
                types.push(self.output("text.delta"));
            }
        }
        if audio {
            types.push(self.output("audio.done"));
            types.push(self.output("audio_transcript.done"));
        } else {
            types.push(self.output("text.done"));
        }
        types.push("response.content_part.done".into());
        types.push("response.output_item.done".into());
        if self == Self::Ga {
            types.push("conversation.item.done".into());
        }
        types.push("response.done".into());
        types
    }

    /// Read a new item's events: its `item_added`, and on GA a `conversation.item.done` for the
    /// same item. The first.
    async fn item_events(self, socket: &mut Socket) -> Value {
        let added = next_event(socket).await;
        assert_eq!(added["type"], self.item_added(), "{added}");
        if self == Self::Ga {
            let done = next_event(socket).await;
            assert_eq!(done["type"], "conversation.item.done");
            assert_eq!(done["item"]["id"], added["item"]["id"]);
        }
        added
    }
}

/// Add a user's text item; the event that announced it.
async fn add_user_text(socket: &mut Socket, dialect: Dialect, text: &str) -> Value {
    send(socket, user_text(text)).await;
    let added = dialect.item_events(socket).await;
    assert_eq!(added["previous_item_id"], Value::Null);
    let id = added["item"]["id"].as_str().unwrap();
    assert!(id.starts_with("item_"), "{id}");
    assert_eq!(added["item"]["role"], "user");
    added
}

/// Append 100 ms of pcm16 silence and commit it: `input_audio_buffer.committed`, then the new
/// item's events.
async fn commit_audio(socket: &mut Socket, dialect: Dialect) {
    let audio = "AAAA".repeat(1600);
    send(
        socket,
        json!({"type": "input_audio_buffer.append", "audio": audio}),
    )
    .await;
    let committed = ask(socket, json!({"type": "input_audio_buffer.commit"})).await;
    assert_eq!(committed["type"], "input_audio_buffer.committed");
    let added = dialect.item_events(socket).await;
    assert_eq!(added["item"]["id"], committed["item_id"]);
    assert_eq!(added["item"]["content"][0]["type"], "input_audio");
}

/// Say hello, then ask for a text response: what both routes answer alike. The user item's
/// event and the response's events, for each route's own checks.
async fn text_conversation(dialect: Dialect) -> (Value, Vec<Value>) {
    const TEXT: &str = "Hello from eastus lorem ipsum";
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, dialect.path()).await;
    let added = add_user_text(&mut socket, dialect, "Say hello").await;

    send(
        &mut socket,
        json!({"type": "response.create", "response": {dialect.modalities(): ["text"]}}),
    )
    .await;
    let events = response_events(&mut socket).await;
    assert_eq!(types(&events), dialect.response_types(5, false));
    assert_eq!(deltas(&events, &dialect.output("text.delta")), TEXT);
    assert_eq!(events[9]["text"], TEXT);
    assert_eq!(events[2]["previous_item_id"], added["item"]["id"]);

    let response = &events.last().unwrap()["response"];
    assert_eq!(response["object"], "realtime.response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["id"], events[0]["response"]["id"]);
    assert_eq!(response["output"][0]["content"][0]["text"], TEXT);
    let usage = &response["usage"];
    assert_eq!(usage["output_tokens"], 5);
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + 5)
    );
    (added, events)
}

/// A response in the session's default modalities, audio with its transcript, of three
/// tokens: what both routes answer alike. Its events, for each route's own checks.
async fn audio_response(dialect: Dialect) -> Vec<Value> {
    let sim = aoai_sim::start(SimConfig::new("westus").reply_tokens(3)).await;
    let (mut socket, _) = connect(&sim, dialect.path()).await;
    send(&mut socket, json!({"type": "response.create"})).await;
    let events = response_events(&mut socket).await;
    assert_eq!(types(&events), dialect.response_types(3, true));
    assert_eq!(
        deltas(&events, &dialect.output("audio_transcript.delta")),
        "Hello from westus"
    );
    let audio_delta = dialect.output("audio.delta");
    for audio in events.iter().filter(|e| e["type"] == audio_delta.as_str()) {
        let delta = audio["delta"].as_str().unwrap();
        assert!(!delta.is_empty() && delta.chars().all(|c| c == 'A' || c == '='));
    }
    assert_eq!(events[11]["transcript"], "Hello from westus");
    assert_eq!(events[12]["part"]["type"], "audio");
    let usage = &events.last().unwrap()["response"]["usage"];
    assert_eq!(usage["output_token_details"]["audio_tokens"], 3);
    assert_eq!(usage["output_token_details"]["text_tokens"], 3);
    assert_eq!(usage["output_tokens"], 6);
    events
}

#[tokio::test]
async fn session_created_on_connect() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (_socket, created) = connect(&sim, PREVIEW).await;
    let session = &created["session"];
    assert!(session["id"].as_str().unwrap().starts_with("sess_"));
    assert_eq!(session["object"], "realtime.session");
    assert_eq!(session["model"], "gpt-4o-realtime-preview");
    assert_eq!(session["modalities"], json!(["text", "audio"]));
    assert_eq!(session["input_audio_format"], "pcm16");
    assert_eq!(session["output_audio_format"], "pcm16");
    assert!(session["voice"].is_string());
    assert!(session["instructions"].is_string());
    assert_eq!(session["turn_detection"]["type"], "server_vad");
}

#[tokio::test]
async fn the_ga_path_takes_the_model_parameter() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (_socket, created) = connect(&sim, GA).await;
    assert_eq!(created["session"]["model"], "gpt-realtime");
    let request = &sim.requests()[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, "/openai/v1/realtime");
    assert_eq!(request.query.as_deref(), Some("model=gpt-realtime"));
}

#[tokio::test]
async fn a_deployment_is_required() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let refused = try_connect(&sim, "/openai/realtime?api-version=2024-10-01-preview", &[])
        .await
        .expect_err("refused");
    assert_eq!(refused.status(), 400);
}

#[tokio::test]
async fn a_text_conversation() {
    text_conversation(Dialect::Preview).await;
}

#[tokio::test]
async fn an_audio_response() {
    audio_response(Dialect::Preview).await;
}

#[tokio::test]
async fn session_update_merges() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, created) = connect(&sim, PREVIEW).await;
    let updated = ask(
        &mut socket,
        json!({"type": "session.update", "session": {
            "instructions": "Be brief.",
            "voice": "verse",
            "modalities": ["text"],
        }}),
    )
    .await;
    assert_eq!(updated["type"], "session.updated");
    let session = &updated["session"];
    assert_eq!(session["instructions"], "Be brief.");
    assert_eq!(session["voice"], "verse");
    assert_eq!(session["id"], created["session"]["id"]);
    assert_eq!(session["model"], "gpt-4o-realtime-preview");
    assert_eq!(session["input_audio_format"], "pcm16");

    // The session's modalities now apply: a text response.
    let create = json!({"type": "response.create"});
    respond(&mut socket, create.clone(), "response.text.delta").await;

    // The preview path takes the GA name too.
    let updated = ask(
        &mut socket,
        json!({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}}),
    )
    .await;
    assert_eq!(updated["session"]["modalities"], json!(["audio"]));
    respond(&mut socket, create, "response.audio.delta").await;
}

#[tokio::test]
async fn audio_buffer_commit() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    let empty = ask(&mut socket, json!({"type": "input_audio_buffer.commit"})).await;
    assert_eq!(empty["type"], "error");
    assert_eq!(empty["error"]["code"], "input_audio_buffer_commit_empty");
    commit_audio(&mut socket, Dialect::Preview).await;
}

#[tokio::test]
async fn junk_gets_an_error_and_the_session_goes_on() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;

    socket.send(Message::text("not json")).await.unwrap();
    let error = next_event(&mut socket).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["code"].is_string());
    assert!(error["error"]["message"].is_string());

    let error = refused(
        &mut socket,
        json!({"type": "no.such.event", "event_id": "evt_1"}),
        "invalid_value",
        "type",
    )
    .await;
    assert_eq!(error["error"]["event_id"], "evt_1");

    let error = ask(&mut socket, json!({"type": "conversation.item.create"})).await;
    assert_eq!(error["error"]["code"], "missing_required_parameter");

    let error = ask(&mut socket, json!({"type": "response.cancel"})).await;
    assert_eq!(error["error"]["code"], "response_cancel_not_active");

    send(&mut socket, user_text("Still there?")).await;
    assert_eq!(
        next_event(&mut socket).await["type"],
        "conversation.item.created"
    );
}

#[tokio::test]
async fn binary_frames_come_back_and_pings_get_pongs() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    let payload = vec![0_u8, 1, 2, 254, 255];
    socket.send(Message::binary(payload.clone())).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::binary(payload));
    socket.send(Message::Ping(b"hi"[..].into())).await.unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Message::Pong(b"hi"[..].into())
    );
}

#[tokio::test]
async fn a_close_is_echoed_and_the_session_counted_out() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    assert_eq!(sim.realtime_sessions(), 0);
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    assert_eq!(sim.realtime_sessions(), 1);
    let (mut other, _) = connect(&sim, GA).await;
    assert_eq!(sim.realtime_sessions(), 2);

    socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Library(4000),
            reason: "done here".into(),
        })))
        .await
        .unwrap();
    let frame = close_frame(&mut socket).await;
    assert_eq!(frame.code, CloseCode::Library(4000));
    assert_eq!(frame.reason.as_str(), "done here");
    // Counted out before the echo left.
    assert_eq!(sim.realtime_sessions(), 1);
    assert!(socket.next().await.is_none_or(|end| end.is_err()));

    // A client that just goes away is counted out too.
    drop(other.close(None).await);
    drop(other);
    until_sessions(&sim, 0).await;
}

#[tokio::test]
async fn sim_close_closes_with_the_code_and_reason() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    send(
        &mut socket,
        json!({"type": "sim.close", "code": 4001, "reason": "instance going away"}),
    )
    .await;
    let frame = close_frame(&mut socket).await;
    assert_eq!(frame.code, CloseCode::Library(4001));
    assert_eq!(frame.reason.as_str(), "instance going away");
    assert_eq!(sim.realtime_sessions(), 0);
    // tungstenite replied to the close; the instance then ends the connection.
    assert!(socket.next().await.is_none_or(|end| end.is_err()));

    // A code an endpoint may not send is refused, and the session goes on.
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    let error = ask(&mut socket, json!({"type": "sim.close", "code": 1005})).await;
    assert_eq!(error["error"]["param"], "code");
}

#[tokio::test]
async fn credentials_are_checked_on_the_handshake() {
    let sim = aoai_sim::start(SimConfig::new("eastus").expect_api_key("key-1")).await;

    let refused = try_connect(&sim, PREVIEW, &[]).await.expect_err("401");
    assert_eq!(refused.status(), 401);
    let body: Value = serde_json::from_slice(refused.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "401");
    let refused = try_connect(&sim, PREVIEW, &[("api-key", "wrong")])
        .await
        .expect_err("401");
    assert_eq!(refused.status(), 401);
    let wrong_query = format!("{GA}&api-key=wrong");
    let refused = try_connect(&sim, &wrong_query, &[]).await.expect_err("401");
    assert_eq!(refused.status(), 401);
    assert_eq!(sim.realtime_sessions(), 0);

    try_connect(&sim, PREVIEW, &[("api-key", "key-1")])
        .await
        .expect("the header");
    let query = format!("{GA}&api-key=key-1");
    try_connect(&sim, &query, &[]).await.expect("the query");

    let requests = sim.requests();
    assert_eq!(requests.len(), 5);
    assert_eq!(requests[3].header("api-key"), Some("key-1"));
    assert_eq!(
        requests[4].query.as_deref(),
        Some("model=gpt-realtime&api-key=key-1")
    );
    assert_eq!(requests[4].header("upgrade"), Some("websocket"));
}

#[tokio::test]
async fn a_bearer_token_is_accepted() {
    let sim = aoai_sim::start(SimConfig::new("eastus").expect_bearer("token-1")).await;
    try_connect(&sim, GA, &[("authorization", "Bearer token-1")])
        .await
        .expect("upgraded");
    let refused = try_connect(&sim, GA, &[]).await.expect_err("401");
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn a_queued_fault_refuses_the_handshake() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::throttle(3));
    sim.push_fault(Fault::ServiceUnavailable);
    let refused = try_connect(&sim, PREVIEW, &[]).await.expect_err("429");
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap(),
        "3"
    );
    let refused = try_connect(&sim, PREVIEW, &[]).await.expect_err("503");
    assert_eq!(refused.status(), 503);
    assert_eq!(sim.realtime_sessions(), 0);

    // The queue is empty: the next handshake goes through, Azure's headers on the 101.
    connect(&sim, PREVIEW).await;
    assert_eq!(sim.request_count(), 3);

    // A delay only postpones the upgrade.
    sim.push_fault(Fault::Delay(Duration::from_millis(50)));
    connect(&sim, GA).await;
}

#[tokio::test]
async fn responses_are_paced_and_can_be_cancelled() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    sim.hold_chunks();
    send(
        &mut socket,
        json!({"type": "response.create", "response": {"modalities": ["text"]}}),
    )
    .await;
    let mut events = Vec::new();
    while events
        .last()
        .is_none_or(|e: &Value| e["type"] != "response.text.delta")
    {
        events.push(next_event(&mut socket).await);
    }
    // The second token is held back.
    let held = tokio::time::timeout(Duration::from_millis(100), socket.next()).await;
    assert!(held.is_err(), "{held:?}");
    sim.release_chunk();
    let second = next_event(&mut socket).await;
    assert_eq!(second["type"], "response.text.delta");
    assert_eq!(second["delta"], " from");

    // A second response while one is in progress is refused; a cancel ends it.
    let error = ask(&mut socket, json!({"type": "response.create"})).await;
    assert_eq!(
        error["error"]["code"],
        "conversation_already_has_active_response"
    );
    let done = ask(&mut socket, json!({"type": "response.cancel"})).await;
    assert_eq!(done["type"], "response.done");
    assert_eq!(done["response"]["status"], "cancelled");
    assert_eq!(done["response"]["id"], events[0]["response"]["id"]);
}

#[tokio::test]
async fn max_output_tokens_makes_an_incomplete_response() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    send(
        &mut socket,
        json!({"type": "response.create", "response": {
            "modalities": ["text"],
            "max_output_tokens": 2,
        }}),
    )
    .await;
    let events = response_events(&mut socket).await;
    assert_eq!(deltas(&events, "response.text.delta"), "Hello from");
    let response = &events.last().unwrap()["response"];
    assert_eq!(response["status"], "incomplete");
    assert_eq!(response["status_details"]["reason"], "max_output_tokens");
}

#[tokio::test]
async fn shutdown_ends_the_sessions() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, PREVIEW).await;
    sim.clone().shutdown().await;
    let end = tokio::time::timeout(PATIENCE, socket.next())
        .await
        .expect("the end in time");
    assert!(end.as_ref().is_none_or(Result::is_err), "{end:?}");
    until_sessions(&sim, 0).await;
}

// ---- the GA path: the GA events and session ----

/// The GA audio format: pcm16 at 24 kHz.
fn pcm() -> Value {
    json!({"type": "audio/pcm", "rate": 24000})
}

#[tokio::test]
async fn ga_session_created_has_the_ga_shape() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (_socket, created) = connect(&sim, GA).await;
    let session = &created["session"];
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["object"], "realtime.session");
    assert!(session["id"].as_str().unwrap().starts_with("sess_"));
    assert_eq!(session["model"], "gpt-realtime");
    assert_eq!(session["output_modalities"], json!(["audio"]));
    assert_eq!(session["audio"]["input"]["format"], pcm());
    assert_eq!(session["audio"]["output"]["format"], pcm());
    assert_eq!(session["audio"]["output"]["voice"], "alloy");
    assert_eq!(
        session["audio"]["input"]["turn_detection"]["type"],
        "server_vad"
    );
    assert_eq!(session["max_output_tokens"], "inf");
    assert!(session["instructions"].is_string());
    // None of the preview fields.
    for field in [
        "modalities",
        "voice",
        "input_audio_format",
        "output_audio_format",
        "turn_detection",
        "temperature",
        "max_response_output_tokens",
    ] {
        assert!(session.get(field).is_none(), "{field} in {session}");
    }
}

#[tokio::test]
async fn ga_text_response() {
    let (added, events) = text_conversation(Dialect::Ga).await;
    // A client's item is added, then done.
    assert_eq!(added["item"]["object"], "realtime.item");
    assert_eq!(added["item"]["content"][0]["type"], "input_text");
    let user_item = &added["item"]["id"];

    assert_eq!(events[2]["item"]["status"], "in_progress");
    assert_eq!(events[10]["part"]["type"], "text");
    // The assistant message's content is `output_text`, in every event that carries it.
    for event in [&events[11], &events[12]] {
        let content = &event["item"]["content"][0];
        assert_eq!(content["type"], "output_text", "{event}");
        assert_eq!(content["text"], "Hello from eastus lorem ipsum");
    }
    assert_eq!(events[12]["item"]["status"], "completed");
    assert_eq!(&events[12]["previous_item_id"], user_item);

    let response = &events[13]["response"];
    assert_eq!(response["output_modalities"], json!(["text"]));
    assert!(response.get("modalities").is_none(), "{response}");
    assert_eq!(response["output"][0]["content"][0]["type"], "output_text");
    let usage = &response["usage"];
    assert_eq!(usage["output_token_details"]["text_tokens"], 5);
    assert_eq!(usage["output_token_details"]["audio_tokens"], 0);
}

#[tokio::test]
async fn ga_audio_response() {
    // The session's default, `["audio"]`: audio and its transcript.
    let events = audio_response(Dialect::Ga).await;
    assert_eq!(events[12]["part"]["transcript"], "Hello from westus");
    let content = &events[13]["item"]["content"][0];
    assert_eq!(content["type"], "output_audio");
    assert_eq!(content["transcript"], "Hello from westus");

    let response = &events[15]["response"];
    assert_eq!(response["output_modalities"], json!(["audio"]));
    assert_eq!(response["audio"]["output"]["voice"], "alloy");
    assert_eq!(response["audio"]["output"]["format"], pcm());
}

#[tokio::test]
async fn ga_session_update_takes_the_ga_shape() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, created) = connect(&sim, GA).await;
    let updated = ask(
        &mut socket,
        json!({"type": "session.update", "session": {
            "type": "realtime",
            "instructions": "Be brief.",
            "output_modalities": ["text"],
            "audio": {"output": {"voice": "marin"}},
        }}),
    )
    .await;
    assert_eq!(updated["type"], "session.updated", "{updated}");
    let session = &updated["session"];
    assert_eq!(session["type"], "realtime");
    assert_eq!(session["id"], created["session"]["id"]);
    assert_eq!(session["instructions"], "Be brief.");
    assert_eq!(session["output_modalities"], json!(["text"]));
    assert!(session.get("modalities").is_none(), "{session}");
    // `audio.output` is merged: the voice changes, the format stays.
    assert_eq!(session["audio"]["output"]["voice"], "marin");
    assert_eq!(session["audio"]["output"]["format"], pcm());
    assert_eq!(session["audio"]["input"]["format"], pcm());

    // The session's modalities now apply: a text response.
    let create = json!({"type": "response.create"});
    let events = respond(&mut socket, create.clone(), "response.output_text.delta").await;
    let response = &events.last().unwrap()["response"];
    assert_eq!(response["output_modalities"], json!(["text"]));
    assert_eq!(response["audio"]["output"]["voice"], "marin");

    // The preview shape is refused, field by field; the session goes on.
    for (event, code, param) in [
        (
            json!({"type": "session.update", "session": {"type": "realtime", "modalities": ["text"]}}),
            "unknown_parameter",
            "session.modalities",
        ),
        (
            json!({"type": "session.update", "session": {"output_modalities": ["audio"]}}),
            "missing_required_parameter",
            "session.type",
        ),
        (
            json!({"type": "session.update", "session": {
                "type": "realtime",
                "output_modalities": ["text", "audio"],
            }}),
            "invalid_value",
            "session.output_modalities",
        ),
        (
            json!({"type": "response.create", "response": {"modalities": ["text"]}}),
            "unknown_parameter",
            "response.modalities",
        ),
    ] {
        refused(&mut socket, event, code, param).await;
    }

    // Back to audio, the GA way; a response's own `output_modalities` wins over the session's.
    let updated = ask(
        &mut socket,
        json!({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}}),
    )
    .await;
    assert_eq!(updated["session"]["output_modalities"], json!(["audio"]));
    assert_eq!(updated["session"]["instructions"], "Be brief.");
    respond(&mut socket, create, "response.output_audio.delta").await;
    respond(
        &mut socket,
        json!({"type": "response.create", "response": {"output_modalities": ["text"]}}),
        "response.output_text.delta",
    )
    .await;
}

#[tokio::test]
async fn ga_audio_buffer_commit_adds_the_item() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let (mut socket, _) = connect(&sim, GA).await;
    commit_audio(&mut socket, Dialect::Ga).await;
}
