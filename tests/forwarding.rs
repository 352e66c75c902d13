//! What a backend receives through the gateway (path, query, body, headers), what it never
//! receives (hop-by-hop headers, the caller's credentials, paths climbing out of the base), and
//! what the caller gets back.

mod support;

use aoai_tower::Gateway;
use http::HeaderMap;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use support::{
    BOUND, CHAT, assert_azure_error, builder_over, chat, chat_body, client, serve, serve_gateway,
    served_by, sims,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use aoai_sim::Fault;

/// Sends `head` (request line and headers, without the blank line) and `body` as raw bytes on
/// a fresh connection, so nothing normalizes the path; returns the status and the body.
async fn raw_request(base: &str, head: &str, body: &str) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{head}\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    };
    let response = tokio::time::timeout(BOUND, exchange)
        .await
        .expect("raw request got no complete answer");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

#[tokio::test]
async fn path_query_body_and_headers_arrive_exactly_as_sent() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let body = r#"{"messages":[{"role":"user","content":"Bonjour \u00e9 \"quoted\""}],"temperature":0.25,"n":1}"#;

    let response = client()
        .post(format!(
            "{base}/openai/deployments/my-gpt-4o/chat/completions?api-version=2024-10-21&x=a%20b&flag"
        ))
        .header("content-type", "application/json")
        .header("user-agent", "AzureOpenAI/Python 1.54.0")
        .header("x-custom", "Custom Value, with comma")
        .header("x-ms-client-request-id", "c0ffee00-0000-4000-8000-000000000001")
        .header("x-multi", "first")
        .header("x-Multi", "second")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");

    let received = sims[0].requests();
    assert_eq!(received.len(), 1);
    let received = &received[0];
    assert_eq!(received.method, "POST");
    assert_eq!(
        received.path,
        "/openai/deployments/my-gpt-4o/chat/completions"
    );
    assert_eq!(
        received.query.as_deref(),
        Some("api-version=2024-10-21&x=a%20b&flag")
    );
    assert_eq!(received.body, body.as_bytes());

    // Every header, exactly: what was sent, the backend's own Host, and nothing else.
    let mut expected = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json"),
        ("user-agent", "AzureOpenAI/Python 1.54.0"),
        ("x-custom", "Custom Value, with comma"),
        (
            "x-ms-client-request-id",
            "c0ffee00-0000-4000-8000-000000000001",
        ),
        ("x-multi", "first"),
        ("x-multi", "second"),
        ("accept", "*/*"),
    ] {
        expected.append(name, value.parse().unwrap());
    }
    expected.insert("content-length", body.len().into());
    expected.insert("host", sims[0].addr().to_string().parse().unwrap());
    assert_eq!(received.headers, expected);
}

#[tokio::test]
async fn a_ten_mib_body_arrives_byte_for_byte() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    // A valid chat request padded to 10 MiB with bytes that vary, so a reordered or truncated
    // copy cannot match.
    let target = 10 * 1024 * 1024;
    let prefix = r#"{"messages":[{"role":"user","content":""#;
    let suffix = r#""}]}"#;
    let filler: String = (0..target - prefix.len() - suffix.len())
        .map(|i| char::from(b'a' + u8::try_from(i * 7 % 26).unwrap()))
        .collect();
    let body = format!("{prefix}{filler}{suffix}");
    assert_eq!(body.len(), target);

    let response = client()
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let received = sims[0].requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.len(), target);
    assert!(received[0].body == body.as_bytes(), "the body differs");
    assert_eq!(
        received[0].header("content-length"),
        Some(target.to_string().as_str())
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_host_is_the_backend() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;

    let response = client()
        .post(format!("{base}{CHAT}"))
        .json(&chat_body())
        .header("connection", "x-drop-me, keep-alive")
        .header("x-drop-me", "connection-specific")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("proxy-connection", "keep-alive")
        .header("x-keep-me", "end-to-end")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let received = &sims[0].requests()[0];
    for name in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(
            received.header(name),
            None,
            "hop-by-hop header {name} reached the backend"
        );
    }
    assert_eq!(received.header("x-keep-me"), Some("end-to-end"));
    // The backend's authority, not the gateway's.
    let gateway_authority = base.trim_start_matches("http://");
    assert_eq!(
        received.header("host"),
        Some(sims[0].addr().to_string().as_str())
    );
    assert_ne!(received.header("host"), Some(gateway_authority));
}

#[tokio::test]
async fn an_upgrade_header_is_not_forwarded() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;

    let response = client()
        .post(format!("{base}{CHAT}"))
        .json(&chat_body())
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = &sims[0].requests()[0];
    assert_eq!(received.header("upgrade"), None);
}

#[tokio::test]
async fn the_callers_credentials_never_reach_a_backend() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    for (name, value) in [
        ("api-key", "caller-secret-key"),
        ("authorization", "Bearer caller-secret-token"),
        ("Authorization", "Basic Y2FsbGVyOnNlY3JldA=="),
    ] {
        let response = client
            .post(format!("{base}{CHAT}"))
            .json(&chat_body())
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "with {name}");
    }
    let both = client
        .post(format!("{base}{CHAT}"))
        .json(&chat_body())
        .header("api-key", "caller-secret-key")
        .header("authorization", "Bearer caller-secret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 200);

    let received: Vec<_> = sims.iter().flat_map(|s| s.requests()).collect();
    assert_eq!(received.len(), 4);
    for request in &received {
        assert_eq!(request.header("api-key"), None);
        assert_eq!(request.header("authorization"), None);
        for value in request.headers.values() {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains("caller-secret"),
                "credential leaked: {value}"
            );
        }
    }
}

#[tokio::test]
async fn dot_dot_paths_are_refused_without_contacting_a_backend() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let body = r#"{"messages":[{"role":"user","content":"Hi"}]}"#;

    // Sent raw: an HTTP client would normalize these away before sending.
    for path in [
        "/openai/deployments/../../x",
        "/openai/../admin",
        "/openai/deployments/gpt-4o/%2e%2e/%2E%2E/x?api-version=2024-10-21",
        "/openai/deployments/gpt-4o/..%2f..%2fx",
        "/openai/deployments/gpt-4o/%252e%252e/x",
        "/openai/deployments/..;/x",
    ] {
        let (status, answer) = raw_request(&base, &format!("POST {path} HTTP/1.1"), body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_azure_error(&answer, "invalid_path");
    }
    for sim in &sims {
        assert_eq!(sim.request_count(), 0, "{} was contacted", sim.name());
    }

    // The same raw client gets a normal answer for a normal path.
    let (status, answer) = raw_request(&base, &format!("POST {CHAT} HTTP/1.1"), body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(sims.iter().map(|s| s.request_count()).sum::<usize>(), 1);
}

#[tokio::test]
async fn v1_routes_and_embeddings_are_forwarded() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    let v1_chat = client
        .post(format!("{base}/openai/v1/chat/completions"))
        .json(&json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "Hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(v1_chat.status(), 200);
    let v1_chat: Value = v1_chat.json().await.unwrap();
    assert_eq!(v1_chat["object"], "chat.completion");

    let embeddings = client
        .post(format!(
            "{base}/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
        ))
        .json(&json!({ "input": ["one", "two"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 200);
    let embeddings: Value = embeddings.json().await.unwrap();
    assert_eq!(embeddings["object"], "list");
    assert_eq!(embeddings["data"].as_array().map(Vec::len), Some(2));
    assert!(embeddings["data"][0]["embedding"].is_array());

    let v1_embeddings = client
        .post(format!("{base}/openai/v1/embeddings"))
        .json(&json!({ "model": "text-embedding-3-small", "input": "one" }))
        .send()
        .await
        .unwrap();
    assert_eq!(v1_embeddings.status(), 200);
    let v1_embeddings: Value = v1_embeddings.json().await.unwrap();
    assert_eq!(v1_embeddings["data"].as_array().map(Vec::len), Some(1));

    let paths: Vec<(String, Option<String>)> = sims[0]
        .requests()
        .into_iter()
        .map(|r| (r.path, r.query))
        .collect();
    assert_eq!(
        paths,
        [
            ("/openai/v1/chat/completions".to_owned(), None),
            (
                "/openai/deployments/text-embedding-3-small/embeddings".to_owned(),
                Some("api-version=2024-10-21".to_owned())
            ),
            ("/openai/v1/embeddings".to_owned(), None),
        ]
    );
}

#[tokio::test]
async fn the_backends_azure_headers_reach_the_caller() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    // The emulator's own headers on a normal answer.
    let response = chat(&client, &base).await;
    assert_eq!(response.status(), 200);
    for name in [
        "x-ms-region",
        "apim-request-id",
        "x-request-id",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(response.headers().contains_key(name), "{name} missing");
    }
    assert_eq!(response.headers()["x-ms-region"], "East US");

    // Exact values, scripted on the backend, pass through unchanged; hop-by-hop ones do not.
    sims[0].push_fault(Fault::Respond {
        status: reqwest::StatusCode::OK,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            (
                "apim-request-id".into(),
                "3f0c2a4e-1111-4222-8333-444455556666".into(),
            ),
            ("x-ms-region".into(), "Sweden Central".into()),
            ("x-ratelimit-remaining-tokens".into(), "12345".into()),
            ("x-ratelimit-remaining-requests".into(), "67".into()),
            ("azureml-model-session".into(), "d123-20250101".into()),
            ("connection".into(), "x-backend-hop".into()),
            ("x-backend-hop".into(), "1".into()),
        ],
        body: r#"{"scripted":true}"#.into(),
    });
    let response = chat(&client, &base).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        header("apim-request-id"),
        Some("3f0c2a4e-1111-4222-8333-444455556666")
    );
    assert_eq!(header("x-ms-region"), Some("Sweden Central"));
    assert_eq!(header("x-ratelimit-remaining-tokens"), Some("12345"));
    assert_eq!(header("x-ratelimit-remaining-requests"), Some("67"));
    assert_eq!(header("azureml-model-session"), Some("d123-20250101"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("x-backend-hop"), None);
    assert_eq!(header("x-served-by"), Some("a"));
    assert_eq!(response.text().await.unwrap(), r#"{"scripted":true}"#);
}

#[tokio::test]
async fn final_backend_errors_pass_through_unchanged() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    sims[0].push_fault(Fault::ContentFilter);
    let response = chat(&client, &base).await;
    assert_eq!(response.status(), 400);
    assert_eq!(served_by(&response), "a");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_filter");
    // Not retried elsewhere.
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 0);

    let response = client
        .post(format!("{base}/openai/no/such/route"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // A request that names no deployment has its own rotation, which starts at a.
    assert_eq!(served_by(&response), "a");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "404");
    assert_eq!(sims[0].requests()[1].path, "/openai/no/such/route");
}

#[tokio::test]
async fn the_served_by_header_can_be_turned_off() {
    let sims = sims(2).await;
    let gateway = builder_over(&sims).served_by_header(false).build().unwrap();
    let base = serve_gateway(gateway).await;
    let client = client();

    for _ in 0..2 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("x-served-by"));
    }
    // Still balanced, still served.
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 1);
}

#[tokio::test]
async fn a_request_header_named_x_served_by_does_not_confuse_the_answer() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let response = client()
        .post(format!("{base}{CHAT}"))
        .json(&chat_body())
        .header(
            HeaderName::from_static("x-served-by"),
            HeaderValue::from_static("b"),
        )
        .send()
        .await
        .unwrap();
    // Chosen by configuration and rotation, never by the request.
    assert_eq!(served_by(&response), "a");
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_without_contacting_a_backend() {
    const LIMIT: usize = 4096;
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).body_limit(LIMIT).build().unwrap()).await;
    let client = client();
    // A valid chat request of exactly `len` bytes.
    let body_of = |len: usize| {
        let prefix = r#"{"messages":[{"role":"user","content":""#;
        let suffix = r#""}]}"#;
        format!(
            "{prefix}{}{suffix}",
            "x".repeat(len - prefix.len() - suffix.len())
        )
    };

    let over = client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(body_of(LIMIT + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 413);
    let answer = over.text().await.unwrap();
    assert_azure_error(&answer, "request_body_too_large");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);

    let at_limit = client
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(body_of(LIMIT))
        .send()
        .await
        .unwrap();
    assert_eq!(at_limit.status(), 200);
    assert_eq!(sims[0].requests()[0].body.len(), LIMIT);
}

#[tokio::test]
async fn a_chunked_request_body_arrives_whole() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let parts = [
        r#"{"messages":[{"role":"user","#,
        r#""content":"sent in "#,
        r#"several chunks"}]}"#,
    ];
    let stream = futures_util::stream::iter(
        parts.map(|part| Ok::<_, std::io::Error>(bytes::Bytes::from_static(part.as_bytes()))),
    );

    let response = client()
        .post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = &sims[0].requests()[0];
    assert_eq!(received.body, parts.concat().as_bytes());
    assert_eq!(
        received.json().unwrap()["messages"][0]["content"],
        "sent in several chunks"
    );
}

/// `GatewayBuilder::client` swaps hyper's client for any tower service: it receives each
/// attempt with the instance's absolute URI and the gateway's credential, and what it answers
/// is what the caller gets.
#[tokio::test]
async fn a_client_of_your_own_receives_each_attempt_with_the_instances_uri() {
    use std::sync::{Arc, Mutex};
    /// Each attempt's URI and `api-key`.
    type Attempts = Arc<Mutex<Vec<(String, Option<String>)>>>;
    let seen = Attempts::default();
    let recorder = Arc::clone(&seen);
    let client = tower::service_fn(
        move |request: http::Request<aoai_tower::retry::ReplayBody>| {
            let recorder = Arc::clone(&recorder);
            async move {
                let key = request
                    .headers()
                    .get("api-key")
                    .map(|v| v.to_str().unwrap().to_owned());
                recorder
                    .lock()
                    .unwrap()
                    .push((request.uri().to_string(), key));
                let status = if request.uri().host() == Some("east.openai.azure.com") {
                    503
                } else {
                    200
                };
                let mut response = http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"{\"choices\":[]}"),
                ));
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        },
    );
    let key = |k: &str| aoai_tower::auth::AzureAuthLayer::from_api_key(k).unwrap();
    let gateway = Gateway::builder()
        .client(client)
        .backend_with_auth("east", "https://east.openai.azure.com", key("east-key"))
        .backend_with_auth("west", "https://west.openai.azure.com/", key("west-key"))
        .build()
        .unwrap();
    let base = serve(axum::Router::new().nest_service("/openai", gateway)).await;

    let response = client_with_key(&base, "the-callers-key").await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "west");
    assert_eq!(response.text().await.unwrap(), r#"{"choices":[]}"#);
    let seen = seen.lock().unwrap();
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    assert_eq!(
        *seen,
        [
            (
                format!("https://east.openai.azure.com{path}"),
                Some("east-key".to_owned())
            ),
            (
                format!("https://west.openai.azure.com{path}"),
                Some("west-key".to_owned())
            ),
        ]
    );
}

/// A chat completion sent with `api-key: key`.
async fn client_with_key(base: &str, key: &str) -> reqwest::Response {
    client()
        .post(format!("{base}{CHAT}"))
        .header("api-key", key)
        .json(&chat_body())
        .send()
        .await
        .unwrap()
}

/// A caller's key in the query (as browsers' WebSocket clients send it) never reaches an
/// instance; the rest of the query does, unchanged.
#[tokio::test]
async fn the_callers_api_key_in_the_query_never_reaches_a_backend() {
    let sims = sims(1).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let response = client()
        .post(format!(
            "{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&api-key=callers-s3cret"
        ))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = &sims[0].requests()[0];
    assert_eq!(received.query.as_deref(), Some("api-version=2024-10-21"));
}
