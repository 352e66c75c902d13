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

/// The instances of `sims`, each with its priority and weight.
fn pool(sims: &[aoai_sim::SimHandle], tiers: &[(u32, u32)]) -> aoai_tower::Gateway {
    sims.iter()
        .zip(tiers)
        .fold(
            aoai_tower::Gateway::builder(),
            |builder, (sim, &(priority, weight))| {
                builder.add_backend(
                    aoai_tower::Backend::new(sim.name(), sim.url())
                        .priority(priority)
                        .weight(weight),
                )
            },
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn weights_3_to_1_give_75_25_interleaved() {
    let sims = sims(2).await;
    let base = serve_gateway(pool(&sims, &[(1, 3), (1, 1)])).await;
    let client = client();

    let mut order = Vec::new();
    for _ in 0..400 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        order.push(served_by(&response));
    }
    assert_eq!(order[..8], ["a", "a", "b", "a", "a", "a", "b", "a"]);
    assert_eq!(sims[0].request_count(), 300);
    assert_eq!(sims[1].request_count(), 100);
}

#[tokio::test]
async fn the_first_tier_takes_everything_until_it_throttles_then_the_next_serves_until_it_recovers()
{
    let sims = sims(3).await;
    let gateway = pool(&sims, &[(1, 1), (2, 1), (2, 1)]);
    let base = serve_gateway(gateway).await;
    let client = client();

    for _ in 0..6 {
        assert_eq!(served_by(&chat(&client, &base).await), "a");
    }
    // a throttles for a second: the request goes on to tier 2, and so do the next ones.
    sims[0].push_fault(aoai_sim::Fault::throttle(1));
    let mut spilled = Vec::new();
    for _ in 0..4 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        spilled.push(served_by(&response));
    }
    assert_eq!(spilled, ["b", "c", "b", "c"]);
    assert_eq!(sims[0].request_count(), 7);
    // Once a's cooldown is over, its trial brings traffic back.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(served_by(&chat(&client, &base).await), "a");
    }
}

/// A chat completion for `deployment`, by its path.
async fn chat_for(client: &reqwest::Client, base: &str, deployment: &str) -> reqwest::Response {
    client
        .post(format!(
            "{base}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        ))
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "Hi" }] }))
        .send()
        .await
        .unwrap()
}

/// Quotas are per deployment: a 429 from b for `gpt` sends `gpt` to a for b's Retry-After,
/// while b keeps serving `tiny`.
#[tokio::test]
async fn a_429_for_one_deployment_leaves_the_instances_other_deployments_flowing() {
    let sims = sims(2).await;
    let gateway = builder_over(&sims).build().unwrap();
    let health = gateway.health().clone();
    let base = serve_gateway(gateway).await;
    let client = client();

    assert_eq!(served_by(&chat_for(&client, &base, "gpt").await), "a");
    sims[1].push_fault(aoai_sim::Fault::throttle(30));
    let throttled = chat_for(&client, &base, "gpt").await;
    assert_eq!(throttled.status(), 200);
    assert_eq!(served_by(&throttled), "a", "retried on a");
    for _ in 0..4 {
        assert_eq!(served_by(&chat_for(&client, &base, "gpt").await), "a");
    }
    let tiny: Vec<String> = {
        let mut served = Vec::new();
        for _ in 0..4 {
            served.push(served_by(&chat_for(&client, &base, "tiny").await));
        }
        served
    };
    assert!(tiny.iter().any(|name| name == "b"), "{tiny:?}");
    let b = &health.snapshot()[1];
    assert_eq!(b.state.to_string(), "available", "{b:?}");
    assert_eq!(b.deployment_cooldowns.len(), 1, "{b:?}");
    assert_eq!(&*b.deployment_cooldowns[0].0, "gpt");
}

/// Each deployment has its own rotation: a caller that embeds its question and then asks the
/// chat deployment, in turn, gets both from both instances (one rotation for all would send
/// every embedding to a and every chat completion to b).
#[tokio::test]
async fn an_embedding_then_a_chat_in_turn_each_alternate_over_both_instances() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let client = client();

    let (mut embeddings, mut chats) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let embedding = client
            .post(format!(
                "{base}/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
            ))
            .json(&serde_json::json!({ "input": "Which instance?" }))
            .send()
            .await
            .unwrap();
        assert_eq!(embedding.status(), 200);
        embeddings.push(served_by(&embedding));
        chats.push(served_by(&chat_for(&client, &base, "gpt-4o").await));
    }
    assert_eq!(embeddings, ["a", "b", "a", "b"]);
    assert_eq!(chats, ["a", "b", "a", "b"]);
}

/// An instance serves only the deployments it lists, under its own names: the caller's
/// `gpt-4o` reaches it as `gpt4o-ptu` (in the path, and in a v1 body's `model`), a deployment
/// it does not list never reaches it, and one no instance lists is a 404 that contacts none.
#[tokio::test]
async fn deployments_are_renamed_per_instance_and_unknown_ones_are_a_404() {
    let sims = sims(2).await;
    let gateway = aoai_tower::Gateway::builder()
        .add_backend(
            aoai_tower::Backend::new("a", sims[0].url()).deployments([("gpt-4o", "gpt4o-ptu")]),
        )
        .add_backend(
            aoai_tower::Backend::new("b", sims[1].url())
                .deployments([("gpt-4o", "gpt-4o"), ("tiny", "tiny")]),
        )
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let client = client();

    for _ in 0..2 {
        assert_eq!(chat_for(&client, &base, "gpt-4o").await.status(), 200);
    }
    assert_eq!(
        sims[0].requests()[0].path,
        "/openai/deployments/gpt4o-ptu/chat/completions"
    );
    assert_eq!(
        sims[1].requests()[0].path,
        "/openai/deployments/gpt-4o/chat/completions"
    );
    for _ in 0..3 {
        assert_eq!(served_by(&chat_for(&client, &base, "tiny").await), "b");
    }
    assert_eq!(sims[0].request_count(), 1);

    let v1 = |model: &str| {
        client
            .post(format!("{base}/openai/v1/chat/completions"))
            .json(&serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "Hi" }] }))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(v1("gpt-4o").await.unwrap().status(), 200);
    }
    let renamed = sims[0].requests().last().unwrap().json().unwrap();
    assert_eq!(renamed["model"], "gpt4o-ptu");

    let before = sims[0].request_count() + sims[1].request_count();
    let unknown = chat_for(&client, &base, "nobody-serves-this").await;
    assert_eq!(unknown.status(), 404);
    let text = unknown.text().await.unwrap();
    support::assert_azure_error(&text, "DeploymentNotFound");
    assert!(text.contains("nobody-serves-this"), "{text}");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), before);
}
