//! The load-balancing walkthrough as a program: two emulated Azure OpenAI instances behind the
//! gateway, a dozen requests and who served each, then a completion streamed chunk by chunk.
//!
//! ```text
//! cargo run --example demo
//! ```

use std::time::{Duration, Instant};

use aoai_sim::SimConfig;
use aoai_tower::Gateway;
use axum::Router;
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use serde_json::json;

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Streams from eastus pause between chunks, so they visibly arrive one by one.
    let east = aoai_sim::start(
        SimConfig::new("eastus")
            .region("East US")
            .time_to_first_token(Duration::from_millis(300))
            .chunk_delay(Duration::from_millis(150)),
    )
    .await;
    let west = aoai_sim::start(SimConfig::new("westus").region("West US")).await;
    let gateway = Gateway::builder()
        .backend("eastus", east.url())
        .backend("westus", west.url())
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
    let server = tokio::spawn(async move {
        axum::serve(listener, Router::new().nest_service("/openai", gateway)).await
    });
    println!(
        "gateway on {base}, backends eastus ({}) and westus ({})\n",
        east.url(),
        west.url()
    );

    let client = reqwest::Client::new();
    println!(
        "{:>3}  {:<8}  {:>6}  {:<10}  reply",
        "#", "served by", "status", "region"
    );
    for i in 1..=12 {
        let response = client
            .post(format!("{base}{CHAT}"))
            .json(&json!({ "messages": [{ "role": "user", "content": "Hello" }] }))
            .send()
            .await?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (served_by, region) = (header("x-served-by"), header("x-ms-region"));
        let body: serde_json::Value = response.json().await?;
        let reply = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        println!(
            "{i:>3}  {served_by:<9}  {:>6}  {region:<10}  {reply}",
            status.as_u16()
        );
    }

    println!("\nA streamed completion (the gateway forwards each chunk as it arrives):");
    // Twelve requests alternated; the thirteenth goes to eastus again.
    let started = Instant::now();
    let response = client
        .post(format!("{base}{CHAT}"))
        .json(&json!({ "messages": [{ "role": "user", "content": "Hello" }], "stream": true }))
        .send()
        .await?;
    let served_by = response.headers().get("x-served-by").cloned();
    println!("served by {served_by:?}");
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        for line in String::from_utf8_lossy(&chunk)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let shown: String = line.chars().take(100).collect();
            println!("{:>6} ms  {shown}", started.elapsed().as_millis());
        }
    }

    server.abort();
    east.shutdown().await;
    west.shutdown().await;
    Ok(())
}
