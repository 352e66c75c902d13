//! Tokens-per-minute and requests-per-minute quotas answer like Azure's.

use aoai_sim::SimConfig;
use serde_json::{Value, json};

use crate::support::{assert_same_shape, chat_url, fixture, header, json_of, post, url};

fn asking(max_tokens: u64) -> Value {
    // 24 characters of prompt text ("user" and the content): 6 tokens.
    json!({"messages": [{"role": "user", "content": "twenty characters..."}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn requests_over_the_token_quota_get_azures_429() {
    let sim = aoai_sim::start(SimConfig::new("eastus").tokens_per_minute(100)).await;
    let first = post(&chat_url(&sim), &asking(40)).await;
    assert_eq!(first.status(), 200);
    let remaining: u64 = header(&first, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 100 - 40, "{remaining}");

    let second = post(&chat_url(&sim), &asking(40)).await;
    assert_eq!(second.status(), 200);
    let third = post(&chat_url(&sim), &asking(40)).await;
    assert_eq!(third.status(), 429);
    let secs: u64 = header(&third, "retry-after").unwrap().parse().unwrap();
    let ms: u64 = header(&third, "retry-after-ms").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert!(ms <= 60_000 && ms.div_ceil(1000) == secs, "{ms} {secs}");
    assert!(header(&third, "x-ratelimit-remaining-requests").is_some());
    assert!(header(&third, "x-ratelimit-remaining-tokens").is_some());
    let body = json_of(third).await;
    assert_same_shape(&body, &fixture("error_429.json"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("exceeded token rate limit"), "{message}");
    assert!(
        message.contains(&format!("Please retry after {secs} seconds")),
        "{message}"
    );

    // A smaller request still fits.
    assert_eq!(post(&chat_url(&sim), &asking(1)).await.status(), 200);
}

#[tokio::test]
async fn without_max_tokens_a_request_costs_its_reply_length() {
    let config = SimConfig::new("eastus")
        .reply_tokens(20)
        .tokens_per_minute(60);
    let sim = aoai_sim::start(config).await;
    let request = json!({"messages": [{"role": "user", "content": "twenty characters..."}]});
    // 6 + 20 tokens each: two fit in 60, the third does not.
    assert_eq!(post(&chat_url(&sim), &request).await.status(), 200);
    assert_eq!(post(&chat_url(&sim), &request).await.status(), 200);
    assert_eq!(post(&chat_url(&sim), &request).await.status(), 429);
}

#[tokio::test]
async fn embeddings_count_against_the_quota() {
    let sim = aoai_sim::start(SimConfig::new("eastus").tokens_per_minute(10)).await;
    let request = json!({"input": "forty characters of text to embed here.."});
    let path = "/openai/deployments/e/embeddings?api-version=2024-10-21";
    assert_eq!(post(&url(&sim, path), &request).await.status(), 200);
    let refused = post(&url(&sim, path), &request).await;
    assert_eq!(refused.status(), 429);
    let message = json_of(refused).await["error"]["message"].to_string();
    assert!(message.contains("Embeddings_Create"), "{message}");
}

#[tokio::test]
async fn requests_over_the_request_quota_get_azures_429() {
    let sim = aoai_sim::start(SimConfig::new("eastus").requests_per_minute(2)).await;
    let hello = crate::support::hello();
    let first = post(&chat_url(&sim), &hello).await;
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(post(&chat_url(&sim), &hello).await.status(), 200);
    let refused = post(&chat_url(&sim), &hello).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        header(&refused, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    assert!(header(&refused, "retry-after").is_some());
    let message = json_of(refused).await["error"]["message"].to_string();
    assert!(message.contains("exceeded call rate limit"), "{message}");
}

#[tokio::test]
async fn remaining_headers_count_down_without_a_quota() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let hello = crate::support::hello();
    let remaining = |response: &reqwest::Response| -> (u64, u64) {
        let get = |name| header(response, name).unwrap().parse::<u64>().unwrap();
        (
            get("x-ratelimit-remaining-requests"),
            get("x-ratelimit-remaining-tokens"),
        )
    };
    let first = remaining(&post(&chat_url(&sim), &hello).await);
    let second = remaining(&post(&chat_url(&sim), &hello).await);
    assert_eq!(second.0, first.0 - 1);
    assert!(second.1 < first.1);
}
