//! Serving: shutdown, dropping the handle, HTTP/2, and the router inside another app.

use std::time::Duration;

use aoai_sim::{Fault, SimConfig, SimState};
use tokio::net::TcpStream;

use crate::support::{PATIENCE, SseReader, chat_url, client, hello, json_of, post};

#[tokio::test]
async fn url_and_name_describe_the_instance() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    assert_eq!(sim.name(), "eastus");
    assert!(sim.addr().ip().is_loopback());
    assert_eq!(sim.url(), format!("http://127.0.0.1:{}", sim.addr().port()));
    assert!(!sim.url().ends_with('/'));
    assert_eq!(sim.state().config().name(), "eastus");
}

#[tokio::test]
async fn shutdown_ends_hanging_requests_and_refuses_new_ones() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let addr = sim.addr();
    sim.push_fault(Fault::Hang);
    let url = chat_url(&sim);
    let hanging = tokio::spawn(async move { client().post(url).json(&hello()).send().await });
    while sim.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(PATIENCE, sim.shutdown())
        .await
        .expect("shutdown returns");
    let result = tokio::time::timeout(PATIENCE, hanging)
        .await
        .unwrap()
        .unwrap();
    let error = result.expect_err("the hanging request fails");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the port is closed"
    );
}

#[tokio::test]
async fn shutdown_ends_held_streams() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.hold_chunks();
    let request = serde_json::json!({"messages": [], "stream": true});
    let mut reader = SseReader::new(post(&chat_url(&sim), &request).await);
    for _ in 0..3 {
        reader.next().await.unwrap();
    }
    sim.clone().shutdown().await;
    let end = tokio::time::timeout(PATIENCE, reader.try_next())
        .await
        .unwrap();
    assert!(end.is_err(), "the held stream breaks: {end:?}");
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let addr = sim.addr();
    let clone = sim.clone();
    drop(sim);
    assert_eq!(post(&chat_url(&clone), &hello()).await.status(), 200);
    drop(clone);
    let refused = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, refused)
        .await
        .expect("the port closes");
}

#[tokio::test]
async fn serves_http2_with_prior_knowledge() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let response = h2.post(chat_url(&sim)).json(&hello()).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from eastus lorem ipsum"
    );
}

#[tokio::test]
async fn router_serves_inside_another_app() {
    let state = SimState::new(SimConfig::new("embedded"));
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .merge(aoai_sim::router(state.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    state.push_fault(Fault::ServiceUnavailable);
    let url = format!("{base}/openai/v1/chat/completions");
    let body = serde_json::json!({"model": "m", "messages": []});
    assert_eq!(post(&url, &body).await.status(), 503);
    let reply = json_of(post(&url, &body).await).await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Hello from embedded lorem ipsum"
    );
    assert_eq!(state.request_count(), 2);
    let health = client().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.text().await.unwrap(), "ok");
    server.abort();
}
