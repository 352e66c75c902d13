//! Backends that misbehave below HTTP: one answering garbage bytes, one closing the connection
//! without an answer. The caller gets a clear Azure-shaped 502, or the answer of a healthy
//! backend the request was retried on.

mod support;

use serde_json::Value;
use support::{builder_over, chat, client, serve_gateway, served_by, sims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A loopback server that reads each request's first bytes and answers `reply` (maybe empty),
/// then closes the connection. Returns its URL.
async fn raw_backend(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.write_all(reply).await;
            });
        }
    });
    url
}

/// The status, the Azure error code and message of a response.
async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let text = |field: &str| body["error"][field].as_str().unwrap().to_owned();
    (status, text("code"), text("message"))
}

#[tokio::test]
async fn a_backend_answering_garbage_gives_a_502_naming_it() {
    let garbage = raw_backend(b"this is not HTTP\r\n\r\n").await;
    let gateway = aoai_tower::Gateway::builder()
        .backend("garbage", garbage)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let response = chat(&client(), &base).await;
    assert_eq!(served_by(&response), "garbage");
    let (status, code, message) = error_of(response).await;
    assert_eq!((status, code.as_str()), (502, "bad_gateway"));
    assert!(message.starts_with("backend garbage: "), "{message}");
}

#[tokio::test]
async fn a_backend_closing_without_an_answer_gives_a_502() {
    let silent = raw_backend(b"").await;
    let gateway = aoai_tower::Gateway::builder()
        .backend("silent", silent)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let (status, code, _) = error_of(chat(&client(), &base).await).await;
    assert_eq!((status, code.as_str()), (502, "bad_gateway"));
}

#[tokio::test]
async fn a_request_to_a_garbage_backend_is_retried_on_a_healthy_one() {
    let healthy = sims(1).await;
    let garbage = raw_backend(b"HTTP/9.9 banana\r\n\r\n").await;
    let gateway = builder_over(&healthy)
        .backend("garbage", garbage)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let client = client();
    for _ in 0..4 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "a");
    }
    assert_eq!(healthy[0].request_count(), 4);
}
