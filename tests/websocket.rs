//! A WebSocket session (the Realtime API's transport) through the gateway, with a real
//! WebSocket client and server (tokio-tungstenite): the handshake goes to one instance with the
//! gateway's credential, a handshake refused before its `101` is tried on the next instance, and
//! after the `101` frames pass both ways unchanged until a side closes.

mod support;

use std::sync::{Arc, Mutex};

use aoai_tower::Gateway;
use aoai_tower::auth::AzureAuthLayer;
use futures_util::{SinkExt, StreamExt};
use support::{BOUND, serve_gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

const REALTIME: &str = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime";

/// What an echo instance saw: each handshake's headers, and the close frame it received.
#[derive(Default)]
struct Seen {
    handshakes: Vec<http::HeaderMap>,
    close: Option<(u16, String)>,
}

/// A WebSocket instance that echoes every data frame. Returns its URL and what it saw.
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
                let record = |request: &Request, response: Response| {
                    seen.lock()
                        .unwrap()
                        .handshakes
                        .push(request.headers().clone());
                    Ok(response)
                };
                let Ok(mut session) = tokio_tungstenite::accept_hdr_async(socket, record).await
                else {
                    return;
                };
                while let Some(Ok(message)) = session.next().await {
                    let echo = match message {
                        Message::Text(_) | Message::Binary(_) => message,
                        Message::Close(frame) => {
                            seen.lock().unwrap().close =
                                frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                            continue;
                        }
                        _ => continue,
                    };
                    if session.send(echo).await.is_err() {
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

/// Opens a session through the gateway at `base` with [`caller_request`].
async fn connect(
    base: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    tokio::time::timeout(
        BOUND,
        tokio_tungstenite::connect_async(caller_request(base)),
    )
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

#[tokio::test]
async fn frames_pass_both_ways_unchanged_and_the_close_code_reaches_the_instance() {
    let (url, seen) = echo_instance().await;
    let auth = AzureAuthLayer::from_api_key("the-gateways-key").unwrap();
    let gateway = Gateway::builder()
        .backend_with_auth("rt", url, auth)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;

    let (mut session, response) = connect(&base).await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-served-by"], "rt");

    let text = Message::text(r#"{"type":"session.update","session":{"voice":"alloy"}}"#);
    let binary = Message::binary(Bytes::from_static(&[0, 1, 2, 254, 255]));
    for message in [text.clone(), binary.clone(), text, binary] {
        session.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(BOUND, session.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, message);
    }
    session
        .close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "caller done".into(),
        }))
        .await
        .unwrap();
    // The instance answers the close; the caller's session then ends.
    while let Some(Ok(_)) = tokio::time::timeout(BOUND, session.next()).await.unwrap() {}

    let seen = seen.lock().unwrap();
    assert_eq!(seen.close, Some((4001, "caller done".to_owned())));
    let handshake = &seen.handshakes[0];
    assert_eq!(handshake["api-key"], "the-gateways-key");
    assert!(handshake.get("authorization").is_none());
    assert_eq!(
        handshake["upgrade"].to_str().unwrap().to_lowercase(),
        "websocket"
    );
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
    let echoed = tokio::time::timeout(BOUND, session.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("hello"));
    // The caller's own key reached no instance.
    assert!(seen.lock().unwrap().handshakes[0].get("api-key").is_none());
}
