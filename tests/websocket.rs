//! A WebSocket session (the Realtime API's transport) through the gateway, with a real
//! WebSocket client and server (tokio-tungstenite): the handshake goes to one instance with the
//! gateway's credential, a handshake refused before its `101` is tried on the next instance, and
//! after the `101` messages pass both ways unchanged, in order, until a side closes; the idle
//! limit, the lifetime and `Sessions::close_all` close both sides with 1001.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_tower::auth::AzureAuthLayer;
use aoai_tower::{Gateway, GatewayBuilder, RequireClientKeyLayer, Sessions};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use support::{BOUND, serve, serve_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const REALTIME: &str = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime";

type Session = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What an echo instance saw: each handshake's URI and headers, the close frame it received,
/// and the pings and pongs.
#[derive(Default)]
struct Seen {
    handshakes: Vec<(http::Uri, http::HeaderMap)>,
    close: Option<(u16, String)>,
    pings: Vec<Bytes>,
    pongs: Vec<Bytes>,
}

/// A WebSocket instance that echoes every data frame, except two commands: the text
/// `close CODE REASON` closes the session with that code and reason, and `ping PAYLOAD` sends a
/// ping. Returns its URL and what it saw.
async fn echo_instance() -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let seen = Arc::clone(&recorder);
            tokio::spawn(async move {
                // tungstenite's callback type: its error is a whole HTTP response.
                #[allow(clippy::result_large_err)]
                let record = |request: &Request, mut response: Response| {
                    seen.lock()
                        .unwrap()
                        .handshakes
                        .push((request.uri().clone(), request.headers().clone()));
                    // The Realtime API's subprotocol, when offered.
                    let offered = request.headers().get("sec-websocket-protocol");
                    if offered.is_some_and(|p| p.to_str().unwrap().contains("realtime")) {
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", "realtime".parse().unwrap());
                    }
                    Ok(response)
                };
                let Ok(mut session) = tokio_tungstenite::accept_hdr_async(socket, record).await
                else {
                    return;
                };
                while let Some(Ok(message)) = session.next().await {
                    let reply = match message {
                        Message::Text(ref text) if text.starts_with("close ") => {
                            let (code, reason) = text[6..].split_once(' ').unwrap();
                            Message::Close(Some(CloseFrame {
                                code: CloseCode::from(code.parse::<u16>().unwrap()),
                                reason: reason.to_owned().into(),
                            }))
                        }
                        Message::Text(ref text) if text.starts_with("ping ") => {
                            Message::Ping(Bytes::from(text[5..].to_owned()))
                        }
                        Message::Text(_) | Message::Binary(_) => message,
                        Message::Ping(payload) => {
                            seen.lock().unwrap().pings.push(payload);
                            continue;
                        }
                        Message::Pong(payload) => {
                            seen.lock().unwrap().pongs.push(payload);
                            continue;
                        }
                        Message::Close(frame) => {
                            seen.lock().unwrap().close =
                                frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                            continue;
                        }
                        Message::Frame(_) => continue,
                    };
                    if session.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// An instance that answers every request `503` and counts them.
async fn refusing_instance() -> (String, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            *counter.lock().unwrap() += 1;
            let mut buffer = [0u8; 4096];
            let _ = socket.read(&mut buffer).await;
            let _ = socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    (url, count)
}

/// One echo instance `rt` behind a gateway configured by `configure`, with the gateway's own
/// api-key; returns the gateway (a clone of the one served), its base URL and what the
/// instance saw.
async fn gateway_over_echo(
    configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
) -> (Gateway, String, Arc<Mutex<Seen>>) {
    let (url, seen) = echo_instance().await;
    let auth = AzureAuthLayer::from_api_key("the-gateways-key").unwrap();
    let gateway = configure(Gateway::builder().backend_with_auth("rt", url, auth))
        .build()
        .unwrap();
    let base = serve_gateway(gateway.clone()).await;
    (gateway, base, seen)
}

/// Opens a session through the gateway at `base` with [`caller_request`].
async fn connect(
    base: &str,
) -> (
    Session,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    connect_with(caller_request(base)).await
}

async fn connect_with(
    request: http::Request<()>,
) -> (
    Session,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap()
}

/// A handshake carrying the caller's own `api-key`, which must reach no instance.
fn caller_request(base: &str) -> http::Request<()> {
    let mut request = format!("{}{REALTIME}", base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("api-key", "the-callers-own-key".parse().unwrap());
    request
}

/// A handshake carrying the caller's own keys, in an `api-key` header and an `api-key` query
/// parameter: neither may reach an instance.
fn caller_request_with_query_key(base: &str) -> http::Request<()> {
    let url = format!(
        "{}{REALTIME}&api-key=the-callers-query-key",
        base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("api-key", "the-callers-header-key".parse().unwrap());
    request
}

/// The next message of `session`, within [`BOUND`].
async fn next(session: &mut Session) -> Message {
    tokio::time::timeout(BOUND, session.next())
        .await
        .expect("a message within the bound")
        .expect("the session is open")
        .expect("a message, not an error")
}

/// Reads `session` to its end (within [`BOUND`]), and returns the close frame it received.
async fn close_received(session: &mut Session) -> Option<(u16, String)> {
    let mut close = None;
    while let Some(Ok(message)) = tokio::time::timeout(BOUND, session.next()).await.unwrap() {
        if let Message::Close(frame) = message {
            close = Some(frame.map_or((1005, String::new()), |f| {
                (u16::from(f.code), f.reason.to_string())
            }));
        }
    }
    close
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `gateway` no longer counts the session.
async fn session_ends(gateway: &Gateway) {
    eventually("the session is no longer counted", || {
        gateway.sessions().count() == 0
    })
    .await;
}

/// The close frame the instance received, once it has (bounded).
async fn instance_close(seen: &Arc<Mutex<Seen>>) -> (u16, String) {
    eventually("the instance receives a close frame", || {
        seen.lock().unwrap().close.is_some()
    })
    .await;
    seen.lock().unwrap().close.clone().unwrap()
}

#[tokio::test]
async fn frames_pass_both_ways_unchanged_and_the_close_code_reaches_the_instance() {
    let (gateway, base, seen) = gateway_over_echo(|builder| builder).await;

    let (mut session, response) = connect(&base).await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-served-by"], "rt");
    assert_eq!(gateway.sessions().count(), 1);

    let text = Message::text(r#"{"type":"session.update","session":{"voice":"alloy"}}"#);
    let binary = Message::binary(Bytes::from_static(&[0, 1, 2, 254, 255]));
    for message in [text.clone(), binary.clone(), text, binary] {
        session.send(message.clone()).await.unwrap();
        assert_eq!(next(&mut session).await, message);
    }
    session
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "caller done".into(),
        }))
        .await
        .unwrap();
    // The gateway answers the close; the caller's session then ends.
    close_received(&mut session).await;

    assert_eq!(
        instance_close(&seen).await,
        (4001, "caller done".to_owned())
    );
    session_ends(&gateway).await;
    let seen = seen.lock().unwrap();
    let (_, handshake) = &seen.handshakes[0];
    assert_eq!(handshake["api-key"], "the-gateways-key");
    assert!(handshake.get("authorization").is_none());
    assert_eq!(
        handshake["upgrade"].to_str().unwrap().to_lowercase(),
        "websocket"
    );
}

/// The `n`th frame of [`many_frames_pass_in_order_both_ways`]: text and binary in turn.
fn frame(n: usize) -> Message {
    match n % 2 {
        0 => Message::text(format!(r#"{{"type":"input_audio_buffer.append","n":{n}}}"#)),
        _ => Message::binary(Bytes::from(n.to_be_bytes().to_vec())),
    }
}

#[tokio::test]
async fn many_frames_pass_in_order_both_ways() {
    let (_gateway, base, _seen) = gateway_over_echo(|builder| builder).await;
    let (session, _) = connect(&base).await;
    let (mut sink, mut stream) = session.split();
    const FRAMES: usize = 2_000;
    // Sent all at once while the echoes come back: both directions busy together.
    let sender = tokio::spawn(async move {
        for n in 0..FRAMES {
            sink.feed(frame(n)).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    for n in 0..FRAMES {
        let message = tokio::time::timeout(BOUND, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(message, frame(n), "frame {n}");
    }
    drop(sender.await.unwrap());
}

#[tokio::test]
async fn the_instances_close_code_and_reason_reach_the_caller() {
    let (gateway, base, seen) = gateway_over_echo(|builder| builder).await;
    let (mut session, _) = connect(&base).await;
    let binary = Message::binary(Bytes::from_static(b"\x00audio\xff"));
    session.send(binary.clone()).await.unwrap();
    assert_eq!(next(&mut session).await, binary);

    session
        .send(Message::text("close 4001 instance done"))
        .await
        .unwrap();
    assert_eq!(
        close_received(&mut session).await,
        Some((4001, "instance done".to_owned()))
    );
    // The caller's answer to the close reached the instance, with the same code.
    assert_eq!(
        instance_close(&seen).await,
        (4001, "instance done".to_owned())
    );
    session_ends(&gateway).await;
}

#[tokio::test]
async fn pings_and_pongs_pass_both_ways() {
    let (_gateway, base, seen) = gateway_over_echo(|builder| builder).await;
    let (mut session, _) = connect(&base).await;

    session
        .send(Message::Ping(Bytes::from_static(b"from the caller")))
        .await
        .unwrap();
    // The caller's ping is answered (by the gateway at once, and by the instance through it)
    // and reaches the instance.
    assert_eq!(
        next(&mut session).await,
        Message::Pong(Bytes::from_static(b"from the caller"))
    );
    eventually("the instance receives the caller's ping", || {
        seen.lock().unwrap().pings == [Bytes::from_static(b"from the caller")]
    })
    .await;

    session
        .send(Message::text("ping from the instance"))
        .await
        .unwrap();
    loop {
        // Pongs to the caller's ping may come twice: the gateway's and the instance's.
        match next(&mut session).await {
            Message::Pong(_) => continue,
            message => {
                assert_eq!(
                    message,
                    Message::Ping(Bytes::from_static(b"from the instance"))
                );
                break;
            }
        }
    }
    // tungstenite answers the ping as the caller reads on; the pong reaches the instance.
    session.send(Message::text("still here")).await.unwrap();
    eventually("the instance receives the caller's pong", || {
        seen.lock()
            .unwrap()
            .pongs
            .contains(&Bytes::from_static(b"from the instance"))
    })
    .await;
}

#[tokio::test]
async fn the_instance_gets_the_gateways_key_never_the_callers_nor_extensions() {
    let (_gateway, base, seen) = gateway_over_echo(|builder| builder).await;
    let mut request = caller_request_with_query_key(&base);
    // What a browser offers; tungstenite cannot read compressed frames.
    request.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    // Where OpenAI's browser clients put the key.
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "realtime, openai-insecure-api-key.the-callers-protocol-key"
            .parse()
            .unwrap(),
    );
    let (mut session, response) = connect_with(request).await;
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    session.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut session).await, Message::text("hello"));

    let seen = seen.lock().unwrap();
    let (uri, headers) = &seen.handshakes[0];
    assert_eq!(headers["api-key"], "the-gateways-key");
    assert!(headers.get("sec-websocket-extensions").is_none());
    assert_eq!(headers["sec-websocket-protocol"], "realtime");
    assert_eq!(
        uri.query(),
        Some("api-version=2025-04-01-preview&deployment=gpt-4o-realtime")
    );
    let everything = format!("{uri} {headers:?}");
    assert!(!everything.contains("the-callers"), "{everything}");
}

#[tokio::test]
async fn a_client_key_in_the_query_opens_a_session_but_does_not_do_for_a_post() {
    let (url, seen) = echo_instance().await;
    let gateway = Gateway::builder().backend("rt", url).build().unwrap();
    let app = Router::new()
        .nest_service("/openai", gateway)
        .layer(RequireClientKeyLayer::new(["a-client-key"]));
    let base = serve(app).await;
    let ws_base = base.replace("http://", "ws://");

    // A browser's handshake: the key in the query, no header.
    let request = format!("{ws_base}{REALTIME}&api-key=a-client-key")
        .into_client_request()
        .unwrap();
    let (mut session, response) = connect_with(request).await;
    assert_eq!(response.status(), 101);
    session.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut session).await, Message::text("hello"));
    let (uri, _) = seen.lock().unwrap().handshakes[0].clone();
    assert!(!uri.to_string().contains("a-client-key"), "{uri}");

    // A wrong key in the query: refused before any instance.
    let request = format!("{ws_base}{REALTIME}&api-key=another-key")
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }

    // Not a handshake: the query key is not taken.
    let response = support::client()
        .post(format!(
            "{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&api-key=a-client-key"
        ))
        .json(&support::chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(seen.lock().unwrap().handshakes.len(), 1);
}

/// OpenAI's browser clients send the key as a subprotocol: it opens a session, and no instance
/// sees it; the `realtime` subprotocol is agreed with the instance as offered.
#[tokio::test]
async fn a_client_key_in_the_insecure_api_key_subprotocol_opens_a_session() {
    let (url, seen) = echo_instance().await;
    let gateway = Gateway::builder().backend("rt", url).build().unwrap();
    let app = Router::new()
        .nest_service("/openai", gateway)
        .layer(RequireClientKeyLayer::new(["a-client-key"]));
    let ws_base = serve(app).await.replace("http://", "ws://");
    let handshake = |protocols: &str| {
        let mut request = format!("{ws_base}{REALTIME}")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        request
    };

    let (mut session, response) =
        connect_with(handshake("realtime, openai-insecure-api-key.a-client-key")).await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    session.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut session).await, Message::text("hello"));
    let (uri, headers) = seen.lock().unwrap().handshakes[0].clone();
    assert_eq!(headers["sec-websocket-protocol"], "realtime");
    let everything = format!("{uri} {headers:?}");
    assert!(!everything.contains("a-client-key"), "{everything}");

    match tokio_tungstenite::connect_async(handshake("realtime, openai-insecure-api-key.other"))
        .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().handshakes.len(), 1);
}

#[tokio::test]
async fn an_idle_session_is_closed_on_both_sides_with_1001() {
    let limit = Duration::from_millis(200);
    let (gateway, base, seen) = gateway_over_echo(|b| b.session_idle_limit(limit)).await;
    let (mut session, _) = connect(&base).await;
    // Busy for longer than the limit: not idle.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        session.send(Message::text("still talking")).await.unwrap();
        assert_eq!(next(&mut session).await, Message::text("still talking"));
    }
    let quiet = Instant::now();
    let expected = Some((1001, "idle for 0.2 s".to_owned()));
    assert_eq!(close_received(&mut session).await, expected);
    assert!(quiet.elapsed() >= limit, "{:?}", quiet.elapsed());
    assert_eq!(Some(instance_close(&seen).await), expected);
    session_ends(&gateway).await;
}

#[tokio::test]
async fn a_session_past_its_lifetime_is_closed_on_both_sides_with_1001() {
    let lifetime = Duration::from_millis(300);
    let (gateway, base, seen) = gateway_over_echo(|b| {
        b.session_lifetime(lifetime)
            .session_idle_limit(Duration::from_secs(60))
    })
    .await;
    let opened = Instant::now();
    let (mut session, _) = connect(&base).await;
    let expected = (1001, "session lifetime of 0.3 s reached".to_owned());
    // Busy all along: the lifetime ends it all the same.
    let close = loop {
        session.send(Message::text("talking")).await.unwrap();
        match next(&mut session).await {
            Message::Text(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Message::Close(frame) => {
                break frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, Some(expected.clone()));
    assert!(opened.elapsed() >= lifetime, "{:?}", opened.elapsed());
    // Reading on answers the close (tungstenite sends its answer as the caller reads).
    assert_eq!(close_received(&mut session).await, None);
    assert_eq!(instance_close(&seen).await, expected);
    session_ends(&gateway).await;
}

#[tokio::test]
async fn close_all_waits_out_the_grace_then_closes_open_sessions_with_1001() {
    // None open: at once.
    let sessions = Sessions::new();
    let started = Instant::now();
    assert_eq!(sessions.close_all(Duration::from_secs(30)).await, 0);
    assert!(started.elapsed() < Duration::from_secs(1));

    // A handle given to the builder (as to each gateway a reload builds) counts its sessions.
    let sessions = Sessions::new();
    let (gateway, base, seen) = gateway_over_echo(|b| b.sessions(sessions.clone())).await;
    let (mut session, _) = connect(&base).await;
    assert_eq!(sessions.count(), 1);
    assert_eq!(gateway.sessions().count(), 1);
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    let closing = tokio::spawn({
        let sessions = sessions.clone();
        async move { sessions.close_all(grace).await }
    });
    // Within the grace period the session goes on.
    session
        .send(Message::text("during the grace"))
        .await
        .unwrap();
    assert_eq!(next(&mut session).await, Message::text("during the grace"));
    let expected = (1001, "gateway shutting down".to_owned());
    assert_eq!(close_received(&mut session).await, Some(expected.clone()));
    assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
    assert_eq!(instance_close(&seen).await, expected);
    assert_eq!(
        tokio::time::timeout(BOUND, closing).await.unwrap().unwrap(),
        1
    );
    assert_eq!(sessions.count(), 0);
}

#[tokio::test]
async fn a_handshake_refused_before_its_101_is_tried_on_the_next_instance() {
    let (refusing, refused) = refusing_instance().await;
    let (url, seen) = echo_instance().await;
    let gateway = Gateway::builder()
        .backend("refusing", refusing)
        .backend("rt", url)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;

    let (mut session, response) = connect(&base).await;
    assert_eq!(response.headers()["x-served-by"], "rt");
    assert_eq!(*refused.lock().unwrap(), 1);
    session.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut session).await, Message::text("hello"));
    // The caller's own key reached no instance.
    assert!(
        seen.lock().unwrap().handshakes[0]
            .1
            .get("api-key")
            .is_none()
    );
}

/// The next text frame of `session`, parsed as a Realtime event.
async fn next_event(session: &mut Session) -> serde_json::Value {
    match next(session).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected an event, got {other:?}"),
    }
}

/// A text conversation with the emulator's Realtime endpoint through the gateway: the first
/// instance throttles the handshake, so the second takes it, with the gateway's key and
/// neither of the caller's; the session speaks Azure's events both ways; the instance's close
/// code reaches the caller, and both count the session out.
#[tokio::test]
async fn a_text_conversation_with_the_emulator_through_the_gateway() {
    let sims = support::sims_with(2, |config| config.expect_api_key("the-gateways-key")).await;
    sims[0].push_fault(aoai_sim::Fault::Throttle {
        retry_after_secs: Some(10),
        retry_after_ms: None,
    });
    let auth = AzureAuthLayer::from_api_key("the-gateways-key").unwrap();
    let gateway = Gateway::builder()
        .backend_with_auth("a", sims[0].url(), auth.clone())
        .backend_with_auth("b", sims[1].url(), auth)
        .build()
        .unwrap();
    let base = serve_gateway(gateway.clone()).await;
    let request = caller_request_with_query_key(&base);
    let (mut session, response) = connect_with(request).await;
    assert_eq!(response.headers()["x-served-by"], "b");

    let created = next_event(&mut session).await;
    assert_eq!(created["type"], "session.created", "{created}");
    assert_eq!(created["session"]["model"], "gpt-4o-realtime");
    let user_text = serde_json::json!({
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{ "type": "input_text", "text": "Say hello" }],
        },
    });
    session
        .send(Message::text(user_text.to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut session).await["type"],
        "conversation.item.created"
    );
    let create =
        serde_json::json!({ "type": "response.create", "response": { "modalities": ["text"] } });
    session
        .send(Message::text(create.to_string()))
        .await
        .unwrap();
    let mut text = String::new();
    loop {
        let event = next_event(&mut session).await;
        match event["type"].as_str().unwrap() {
            "response.text.delta" => text.push_str(event["delta"].as_str().unwrap()),
            "response.done" => {
                assert_eq!(event["response"]["status"], "completed", "{event}");
                break;
            }
            _ => {}
        }
    }
    assert!(text.starts_with("Hello from b"), "{text}");
    assert_eq!(sims[1].realtime_sessions(), 1);
    assert_eq!(gateway.sessions().count(), 1);

    let close = serde_json::json!({ "type": "sim.close", "code": 4001, "reason": "that is all" });
    session
        .send(Message::text(close.to_string()))
        .await
        .unwrap();
    assert_eq!(
        close_received(&mut session).await,
        Some((4001, "that is all".to_owned()))
    );
    eventually("both count the session out", || {
        sims[1].realtime_sessions() == 0 && gateway.sessions().count() == 0
    })
    .await;

    let handshakes: Vec<_> = sims.iter().flat_map(|sim| sim.requests()).collect();
    assert_eq!(handshakes.len(), 2, "one refused, one taken");
    for handshake in &handshakes {
        assert_eq!(handshake.header("api-key"), Some("the-gateways-key"));
        let everything = format!("{:?} {:?}", handshake.query, handshake.headers);
        assert!(!everything.contains("the-callers"), "{everything}");
    }
}

/// A Realtime session's responses are counted as their `response.done` events pass: in the
/// metrics, by caller, and against the caller's tokens per minute, so that a caller that spent
/// its minute in a session is refused its next request.
#[tokio::test]
async fn a_sessions_usage_is_counted_and_charged_to_its_caller() {
    use aoai_tower::GatewayMetrics;
    use aoai_tower::usage::{Caller, CallerLimits, TokenLimiter};

    let sims = support::sims_with(1, |config| config.reply_tokens(40)).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let gateway = support::builder_over(&sims)
        .metrics(GatewayMetrics::new(&mut registry))
        .token_limiter(TokenLimiter::new())
        .build()
        .unwrap();
    // The app's own auth names the caller: 30 tokens a minute.
    let app = Router::new()
        .nest_service("/openai", gateway)
        .layer(axum::middleware::map_request(
            |mut request: axum::extract::Request| async move {
                let limits = CallerLimits {
                    tokens_per_minute: Some(30),
                    requests_per_minute: None,
                };
                request
                    .extensions_mut()
                    .insert(Caller::new("voice-team").with_limits(limits));
                request
            },
        ));
    let base = serve(app).await;
    let (mut session, _) = connect(&base).await;
    assert_eq!(next_event(&mut session).await["type"], "session.created");
    let create =
        serde_json::json!({ "type": "response.create", "response": { "modalities": ["text"] } });
    session
        .send(Message::text(create.to_string()))
        .await
        .unwrap();
    let usage = loop {
        let event = next_event(&mut session).await;
        if event["type"] == "response.done" {
            break event["response"]["usage"].clone();
        }
    };
    let output = usage["output_tokens"].as_u64().unwrap();
    assert!(output >= 40, "{usage}");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = format!(
        r#"aoai_gateway_tokens_total{{instance="a",deployment="gpt-4o-realtime",caller="voice-team",gen_ai_token_type="output"}} {output}"#
    );
    assert!(text.contains(&line), "no {line} in {text}");

    // The minute is spent: the next request of this caller is refused, no instance asked.
    let before = sims[0].request_count();
    let refused = support::chat(&support::client(), &base).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(sims[0].request_count(), before);
    session.close(None).await.unwrap();
}
