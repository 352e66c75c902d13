//! Each scripted fault, and the queue they wait in.

use std::time::{Duration, Instant};

use aoai_sim::{Fault, SimConfig};
use http::StatusCode;
use serde_json::json;

use crate::support::{
    PATIENCE, SseReader, assert_same_shape, chat_url, client, fixture, header, hello, json_of, post,
};

#[tokio::test]
async fn throttle_answers_azures_429_then_the_queue_is_empty() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::Throttle {
        retry_after_secs: Some(3),
        retry_after_ms: Some(2500),
    });
    let response = post(&chat_url(&sim), &hello()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), Some("3"));
    assert_eq!(header(&response, "retry-after-ms"), Some("2500"));
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), Some("0"));
    assert!(header(&response, "apim-request-id").is_some());
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("error_429.json"));
    assert_eq!(body["error"]["code"], "429");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version \
             2024-10-21 have exceeded token rate limit"
        ),
        "{message}"
    );
    assert!(
        message.contains("Please retry after 3 seconds."),
        "{message}"
    );

    assert_eq!(post(&chat_url(&sim), &hello()).await.status(), 200);
}

#[tokio::test]
async fn throttle_sends_only_the_retry_headers_it_is_given() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::Throttle {
        retry_after_secs: None,
        retry_after_ms: None,
    });
    sim.push_fault(Fault::Throttle {
        retry_after_secs: None,
        retry_after_ms: Some(1500),
    });
    let bare = post(&chat_url(&sim), &hello()).await;
    assert_eq!(bare.status(), 429);
    assert_eq!(header(&bare, "retry-after"), None);
    assert_eq!(header(&bare, "retry-after-ms"), None);
    let message = json_of(bare).await["error"]["message"].to_string();
    assert!(!message.contains("retry after"), "{message}");

    let ms_only = post(&chat_url(&sim), &hello()).await;
    assert_eq!(header(&ms_only, "retry-after"), None);
    assert_eq!(header(&ms_only, "retry-after-ms"), Some("1500"));
    let message = json_of(ms_only).await["error"]["message"].to_string();
    assert!(
        message.contains("Please retry after 2 seconds."),
        "{message}"
    );
}

#[tokio::test]
async fn respond_sends_exactly_what_it_is_given() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::Respond {
        status: StatusCode::TOO_MANY_REQUESTS,
        headers: vec![
            ("retry-after".into(), "Wed, 21 Oct 2015 07:28:00 GMT".into()),
            ("x-ratelimit-reset-requests".into(), "7s".into()),
            ("x-ratelimit-remaining-requests".into(), "0".into()),
            ("x-custom".into(), "a".into()),
            ("x-custom".into(), "b".into()),
        ],
        body: "slow down".into(),
    });
    let response = post(&chat_url(&sim), &hello()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "retry-after"),
        Some("Wed, 21 Oct 2015 07:28:00 GMT")
    );
    assert_eq!(header(&response, "x-ratelimit-reset-requests"), Some("7s"));
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    let custom: Vec<&str> = response
        .headers()
        .get_all("x-custom")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(custom, ["a", "b"]);
    assert_eq!(header(&response, "content-type"), None);
    assert_eq!(response.text().await.unwrap(), "slow down");
}

#[tokio::test]
async fn server_errors_have_azures_shape() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::InternalError);
    sim.push_fault(Fault::ServiceUnavailable);
    for (status, code) in [(500, "InternalServerError"), (503, "ServiceUnavailable")] {
        let response = post(&chat_url(&sim), &hello()).await;
        assert_eq!(response.status(), status);
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        let body = json_of(response).await;
        assert_same_shape(&body, &fixture("error_404.json"));
        assert_eq!(body["error"]["code"], code);
    }
}

#[tokio::test]
async fn content_filter_answers_azures_400() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::ContentFilter);
    let response = post(&chat_url(&sim), &hello()).await;
    assert_eq!(response.status(), 400);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("error_content_filter.json"));
    assert_eq!(body["error"]["code"], "content_filter");
    assert_eq!(
        body["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
    let flagged: Vec<&String> = body["error"]["innererror"]["content_filter_result"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, result)| result["filtered"] == true)
        .map(|(category, _)| category)
        .collect();
    assert_eq!(flagged, ["violence"]);
}

#[tokio::test]
async fn delay_waits_then_answers_normally() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    let response = post(&chat_url(&sim), &hello()).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from eastus lorem ipsum"
    );
}

#[tokio::test]
async fn hang_never_answers() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::Hang);
    let result = client()
        .post(chat_url(&sim))
        .json(&hello())
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(result.expect_err("no answer").is_timeout());
    // The next request is served.
    assert_eq!(post(&chat_url(&sim), &hello()).await.status(), 200);
    assert_eq!(sim.request_count(), 2);
}

#[tokio::test]
async fn drop_mid_body_breaks_a_json_answer() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::DropMidBody);
    let response = post(&chat_url(&sim), &hello()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let error = response.bytes().await.expect_err("the body breaks");
    assert!(error.is_body() || error.is_decode(), "{error:?}");
}

#[tokio::test]
async fn drop_mid_body_breaks_a_stream_after_its_first_events() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::DropMidBody);
    let request = json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true});
    let response = post(&chat_url(&sim), &request).await;
    assert_eq!(response.status(), 200);
    let mut reader = SseReader::new(response);
    let first = reader.next().await.expect("the prompt filter chunk");
    assert!(first.json()["prompt_filter_results"].is_array());
    let role = reader.next().await.expect("the role chunk");
    assert_eq!(role.json()["choices"][0]["delta"]["role"], "assistant");
    let end = tokio::time::timeout(PATIENCE, reader.try_next())
        .await
        .unwrap();
    assert!(end.is_err(), "the body breaks instead of ending: {end:?}");
}

#[tokio::test]
async fn faults_are_taken_in_order_one_per_request() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_faults(Fault::ServiceUnavailable, 2);
    sim.push_fault(Fault::throttle(1));
    sim.push_fault(Fault::InternalError);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post(&chat_url(&sim), &hello()).await.status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 429, 500, 200]);
}

#[tokio::test]
async fn a_fault_is_taken_by_any_route_even_unknown_ones() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_fault(Fault::InternalError);
    let response = post(&crate::support::url(&sim, "/nope"), &hello()).await;
    assert_eq!(response.status(), 500);
    let response = post(&crate::support::url(&sim, "/nope"), &hello()).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn clear_drops_queued_faults() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    sim.push_faults(Fault::InternalError, 3);
    sim.clear();
    assert_eq!(post(&chat_url(&sim), &hello()).await.status(), 200);
}
