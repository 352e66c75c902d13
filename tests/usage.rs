//! Token usage through the gateway: counted on every answer (streams included), the caller's
//! stream exactly what it asked for when the gateway asks for usage itself, per-caller token
//! limits, and the Prometheus metrics.

mod support;

use std::sync::Arc;
use std::time::Duration;

use aoai_tower::GatewayMetrics;
use aoai_tower::usage::{Caller, CallerLimits, TokenLimiter};
use axum::Router;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use support::{BOUND, CHAT, assert_azure_error, builder_over, client, serve, sims_with};

const EMBEDDINGS: &str = "/openai/deployments/ada/embeddings?api-version=2024-10-21";
const RESPONSES: &str = "/openai/v1/responses";

/// A gateway with metrics over `sims`, served with `GET /metrics` beside it.
async fn gateway_with_metrics(sims: &[aoai_sim::SimHandle], include_usage: bool) -> String {
    let mut registry = Registry::default();
    let metrics = GatewayMetrics::new(&mut registry);
    let gateway = builder_over(sims)
        .include_usage(include_usage)
        .metrics(metrics)
        .build()
        .unwrap();
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
                    text
                }
            }),
        )
        .nest_service("/openai", gateway);
    serve(app).await
}

/// POSTs `body` as JSON to `url`; the answer's text.
async fn post_text(client: &reqwest::Client, url: impl reqwest::IntoUrl, body: &Value) -> String {
    let response = client.post(url).json(body).send().await.unwrap();
    response.text().await.unwrap()
}

/// POSTs `body` as JSON to `url`; the answer, parsed.
async fn post_json(client: &reqwest::Client, url: impl reqwest::IntoUrl, body: &Value) -> Value {
    let response = client.post(url).json(body).send().await.unwrap();
    response.json().await.unwrap()
}

/// `(input, output)` tokens of a usage object, in either API's names.
fn tokens(usage: &Value) -> (u64, u64) {
    let count = |a: &str, b: &str| usage[a].as_u64().or(usage[b].as_u64()).unwrap();
    (
        count("prompt_tokens", "input_tokens"),
        count("completion_tokens", "output_tokens"),
    )
}

/// The `data:` payloads of an event stream.
fn events(stream: &str) -> Vec<&str> {
    stream
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .collect()
}

/// `GET /metrics` at `base` once `requests` requests are counted (or [`BOUND`] has passed).
/// The counters are written as each answer ends, before the caller has read all of it; a
/// scrape right after the last answer may come first, so it polls briefly.
async fn scrape_after(client: &reqwest::Client, base: &str, requests: u32) -> String {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if sum(&metrics, "aoai_gateway_requests_total", &[]) == f64::from(requests)
            || tokio::time::Instant::now() > deadline
        {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of the samples of `metric` whose labels contain every one of `labels`.
fn sum(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn the_token_counters_equal_the_usage_the_instances_reported() {
    let sims = sims_with(2, |config| config.reply_tokens(7)).await;
    let base = gateway_with_metrics(&sims, true).await;
    let direct = sims[0].url();
    let client = client();
    let mut want = (0, 0);
    let mut add = |(input, output): (u64, u64)| {
        want.0 += input;
        want.1 += output;
    };

    // A chat completion: its usage is in the answer.
    let answer: Value = post_json(
        &client,
        format!("{base}{CHAT}"),
        &json!({ "messages": [{ "role": "user", "content": "Hello there" }] }),
    )
    .await;
    add(tokens(&answer["usage"]));

    // A streamed chat completion that asks for its usage: the last chunk carries it.
    let asked = json!({
        "messages": [{ "role": "user", "content": "Tell me more" }],
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let stream = post_text(&client, format!("{base}{CHAT}"), &asked).await;
    let last: Value = serde_json::from_str(events(&stream).iter().rev().nth(1).unwrap()).unwrap();
    add(tokens(&last["usage"]));

    // One that does not ask: the caller sees no usage; the instance reports the same usage it
    // reports when asked directly.
    let not_asked = json!({ "messages": [{ "role": "user", "content": "Go on" }], "stream": true });
    let stream = post_text(&client, format!("{base}{CHAT}"), &not_asked).await;
    assert!(!stream.contains("\"usage\""), "{stream}");
    let mut direct_asked = not_asked.clone();
    direct_asked["stream_options"] = json!({ "include_usage": true });
    let direct_stream = post_text(
        &client,
        format!("{direct}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
        &direct_asked,
    )
    .await;
    let last: Value =
        serde_json::from_str(events(&direct_stream).iter().rev().nth(1).unwrap()).unwrap();
    add(tokens(&last["usage"]));

    // Embeddings: prompt tokens only.
    let answer: Value = post_json(
        &client,
        format!("{base}{EMBEDDINGS}"),
        &json!({ "input": ["one", "two words"] }),
    )
    .await;
    let usage = &answer["usage"];
    add((usage["prompt_tokens"].as_u64().unwrap(), 0));

    // The Responses API, whole and streamed (`response.completed` carries the usage).
    let answer: Value = post_json(
        &client,
        format!("{base}{RESPONSES}"),
        &json!({ "model": "gpt-4o", "input": "Hi" }),
    )
    .await;
    add(tokens(&answer["usage"]));
    let stream = post_text(
        &client,
        format!("{base}{RESPONSES}"),
        &json!({ "model": "gpt-4o", "input": "Hi again", "stream": true }),
    )
    .await;
    let completed = events(&stream)
        .into_iter()
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .find(|event| event["type"] == "response.completed")
        .unwrap();
    add(tokens(&completed["response"]["usage"]));

    let metrics = scrape_after(&client, &base, 6).await;
    let input = r#"gen_ai_token_type="input""#;
    let output = r#"gen_ai_token_type="output""#;
    assert_eq!(
        sum(&metrics, "aoai_gateway_tokens_total", &[input]),
        want.0 as f64,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "aoai_gateway_tokens_total", &[output]),
        want.1 as f64,
        "{metrics}"
    );
    assert_eq!(
        sum(&metrics, "gen_ai_client_token_usage_sum", &[input]),
        want.0 as f64
    );
    assert_eq!(
        sum(&metrics, "gen_ai_client_token_usage_sum", &[output]),
        want.1 as f64
    );
    assert_eq!(sum(&metrics, "aoai_gateway_requests_total", &[]), 6.0);
    assert_eq!(
        sum(
            &metrics,
            "gen_ai_client_operation_duration_seconds_count",
            &[r#"gen_ai_operation_name="embeddings""#]
        ),
        1.0
    );
    // Three streams, each with its time to first token.
    assert_eq!(
        sum(
            &metrics,
            "gen_ai_server_time_to_first_token_seconds_count",
            &[]
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(sum(&metrics, "aoai_gateway_streams_in_flight", &[]), 0.0);
    assert!(
        metrics.contains("aoai_gateway_realtime_sessions 0"),
        "{metrics}"
    );
    assert_eq!(sum(&metrics, "aoai_gateway_attempts_total", &[]), 6.0);
}

/// Deployment names come from callers: past the first 256, made-up ones are counted as
/// `_other`, so they cannot grow the metrics without end; every request is still counted.
#[tokio::test]
async fn made_up_deployment_names_past_256_are_counted_as_other() {
    let sims = sims_with(1, |config| config).await;
    let base = gateway_with_metrics(&sims, false).await;
    let client = client();
    for i in 0..300 {
        let answer = client
            .post(format!(
                "{base}/openai/deployments/made-up-{i}/chat/completions?api-version=2024-10-21"
            ))
            .json(&json!({ "messages": [{ "role": "user", "content": "Hi" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap();
    }
    let metrics = scrape_after(&client, &base, 300).await;
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("aoai_gateway_requests_total{"))
        .collect();
    let named = requests
        .iter()
        .filter(|line| line.contains("deployment=\"made-up-"))
        .count();
    assert_eq!(named, 256, "distinct deployment labels");
    assert!(
        !metrics.contains("made-up-256\""),
        "the 257th name is not a label"
    );
    assert_eq!(
        sum(
            &metrics,
            "aoai_gateway_requests_total",
            &["deployment=\"_other\""]
        ),
        44.0
    );
    assert_eq!(sum(&metrics, "aoai_gateway_requests_total", &[]), 300.0);
    assert_eq!(
        sum(
            &metrics,
            "gen_ai_client_operation_duration_seconds_count",
            &["gen_ai_request_model=\"_other\""]
        ),
        44.0
    );
}

/// A stream with its per-call parts (`id`, `created`) replaced, to compare two calls.
fn normalized(stream: &str) -> String {
    let mut out = String::with_capacity(stream.len());
    let mut rest = stream;
    while let Some(at) = rest.find("\"id\":\"") {
        out.push_str(&rest[..at + 6]);
        rest = &rest[at + 6..];
        let end = rest.find('"').unwrap();
        out.push_str("ID");
        rest = &rest[end..];
    }
    out.push_str(rest);
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("\"created\":") {
        result.push_str(&rest[..at + 10]);
        rest = &rest[at + 10..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
        result.push('0');
        rest = &rest[end..];
    }
    result.push_str(rest);
    result
}

#[tokio::test]
async fn the_caller_gets_exactly_the_stream_it_asked_for() {
    let sims = sims_with(1, |config| config.reply_tokens(5).record_requests(true)).await;
    let base = gateway_with_metrics(&sims, true).await;
    let direct = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        sims[0].url()
    );
    let client = client();
    let body = json!({ "messages": [{ "role": "user", "content": "Hello" }], "stream": true });

    let through = post_text(&client, format!("{base}{CHAT}"), &body).await;
    // The instance was asked for the usage...
    let sent: Value = serde_json::from_slice(&sims[0].requests()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // ... and the caller's stream is byte for byte what the instance sends without it.
    let without = post_text(&client, &direct, &body).await;
    assert!(through.contains("[DONE]") && through.contains("prompt_filter_results"));
    assert_eq!(normalized(&through), normalized(&without));

    // A caller that asked for the usage keeps it, as the instance sends it.
    let mut asked = body.clone();
    asked["stream_options"] = json!({ "include_usage": true });
    let through = post_text(&client, format!("{base}{CHAT}"), &asked).await;
    let with = post_text(&client, &direct, &asked).await;
    assert!(through.contains("\"usage\":{"));
    assert_eq!(normalized(&through), normalized(&with));
}

/// A gateway holding callers to their limits; the caller is named by an `x-team` header, as
/// an app's own auth would set the [`Caller`] extension.
async fn limited_gateway(sims: &[aoai_sim::SimHandle], tokens_per_minute: u64) -> String {
    let gateway = builder_over(sims)
        .token_limiter(TokenLimiter::new())
        .build()
        .unwrap();
    let app = Router::new()
        .nest_service("/openai", gateway)
        .layer(axum::middleware::map_request(
            move |mut request: axum::extract::Request| async move {
                let team = request
                    .headers()
                    .get("x-team")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if let Some(team) = team {
                    request
                        .extensions_mut()
                        .insert(Caller::new(team).with_limits(CallerLimits {
                            tokens_per_minute: Some(tokens_per_minute),
                            requests_per_minute: None,
                        }));
                }
                request
            },
        ));
    serve(app).await
}

#[tokio::test]
async fn a_caller_over_its_tokens_per_minute_waits_as_told_and_others_go_on() {
    // Each answer is 900 tokens long: most of a minute of 1,000.
    let sims = sims_with(2, |config| config.reply_tokens(900).record_requests(true)).await;
    let base = limited_gateway(&sims, 1_000).await;
    let client = client();
    let send = |team: &'static str, body: Value| {
        let request = client
            .post(format!("{base}{CHAT}"))
            .header("x-team", team)
            .json(&body);
        async move { request.send().await.unwrap() }
    };

    let first = send("search", support::chat_body()).await;
    assert_eq!(first.status(), 200);
    let used = first.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    assert!(used > 900 && used < 1_000, "{used}");

    // A request whose prompt alone would take the caller past its minute.
    let left = 1_000 - used;
    let big =
        json!({ "messages": [{ "role": "user", "content": "x".repeat(4 * left as usize + 120) }] });
    let before = sims[0].request_count() + sims[1].request_count();
    let refused = send("search", big.clone()).await;
    assert_eq!(refused.status(), 429);
    let retry_after_ms: u64 = refused.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, retry_after_ms.div_ceil(1000));
    assert!((1..=10_000).contains(&retry_after_ms), "{retry_after_ms}");
    let body = refused.text().await.unwrap();
    let error = assert_azure_error(&body, "429");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("search"),
        "{body}"
    );
    assert_eq!(
        sims[0].request_count() + sims[1].request_count(),
        before,
        "no instance is contacted"
    );

    // Another caller is not held back.
    let other = send("billing", support::chat_body()).await;
    assert_eq!(other.status(), 200);

    // Honouring the Retry-After lets the same request through.
    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
    let again = send("search", big).await;
    assert_eq!(again.status(), 200, "{}", again.text().await.unwrap());
}
