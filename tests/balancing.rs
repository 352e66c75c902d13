//! Round-robin over real emulated instances: strict alternation for sequential callers, and an
//! exact split under many concurrent callers.

mod support;

use std::collections::HashMap;

use serde_json::Value;
use support::{BOUND, builder_over, chat, client, serve_gateway, served_by, sims};

/// The reply text the emulator puts in a chat completion: `"Hello from <name> ..."`.
async fn reply_text(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn sequential_requests_alternate_a_b_a_b() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    let mut order = Vec::new();
    for _ in 0..4 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        let name = served_by(&response);
        // The header tells the truth: the instance it names wrote the reply.
        let text = reply_text(response).await;
        assert!(
            text.starts_with(&format!("Hello from {name} ")),
            "x-served-by {name:?} but the reply is {text:?}"
        );
        order.push(name);
    }

    assert_eq!(order, ["a", "b", "a", "b"]);
    assert_eq!(sims[0].request_count(), 2);
    assert_eq!(sims[1].request_count(), 2);
}

#[tokio::test]
async fn sequential_requests_cycle_over_three_backends() {
    let sims = sims(3).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    let mut order = Vec::new();
    for i in 0..6 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        order.push(served_by(&response));
        // After each request exactly the backend it names has one more request.
        let counts: Vec<usize> = sims.iter().map(|s| s.request_count()).collect();
        let expected: Vec<usize> = (0..3).map(|b| (i + 3 - b) / 3).collect();
        assert_eq!(counts, expected, "after request {i}");
    }
    assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_are_split_evenly() {
    const CALLERS: usize = 64;
    const PER_CALLER: usize = 10;
    let sims = sims(3).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = reqwest::Client::builder()
        .timeout(BOUND)
        .pool_max_idle_per_host(CALLERS)
        .build()
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let client = client.clone();
        let base = base.clone();
        tasks.spawn(async move {
            let mut seen = Vec::with_capacity(PER_CALLER);
            for _ in 0..PER_CALLER {
                let response = chat(&client, &base).await;
                assert_eq!(response.status(), 200);
                seen.push(served_by(&response));
                // Read the body so the connection goes back to the pool.
                response.bytes().await.unwrap();
            }
            seen
        });
    }
    let mut by_header: HashMap<String, usize> = HashMap::new();
    let all = tokio::time::timeout(BOUND * 3, tasks.join_all())
        .await
        .expect("640 requests did not finish in time");
    for name in all.into_iter().flatten() {
        *by_header.entry(name).or_default() += 1;
    }

    let total = CALLERS * PER_CALLER;
    let counts: Vec<usize> = sims.iter().map(|s| s.request_count()).collect();
    assert_eq!(counts.iter().sum::<usize>(), total, "counts {counts:?}");
    let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
    assert!(
        max - min <= 1,
        "uneven split over 3 backends: {counts:?} (expected each {} or {})",
        total / 3,
        total / 3 + 1
    );
    // What the callers were told matches what each instance received.
    for sim in &sims {
        assert_eq!(
            by_header.get(sim.name()).copied().unwrap_or_default(),
            sim.request_count(),
            "x-served-by tally for {}",
            sim.name()
        );
    }
}
