//! The documents the emulator answers with have the shape of the real service's.

use aoai_sim::SimConfig;
use serde_json::json;

use crate::support::{
    assert_same_shape, chat_url, client, fixture, header, hello, json_of, post, url,
};

#[tokio::test]
async fn chat_completion_has_azures_shape() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let response = post(&chat_url(&sim), &hello()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("chat_completion.json"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "gpt-4o-2024-08-06");
    let choice = &body["choices"][0];
    assert_eq!(
        choice["message"]["content"],
        "Hello from eastus lorem ipsum"
    );
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["content_filter_results"]["hate"]["severity"], "safe");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 5
    );
}

#[tokio::test]
async fn v1_chat_route_takes_the_model_in_the_body() {
    let sim = aoai_sim::start(SimConfig::new("westus").model("gpt-4.1-2025-04-14")).await;
    let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hi"}]});
    let response = post(&url(&sim, "/openai/v1/chat/completions"), &body).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("chat_completion.json"));
    assert_eq!(body["model"], "gpt-4.1-2025-04-14");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from westus lorem ipsum"
    );
}

#[tokio::test]
async fn max_tokens_cuts_the_reply_short() {
    let sim = aoai_sim::start(SimConfig::new("eastus").reply_tokens(10)).await;
    let mut request = hello();
    request["max_tokens"] = json!(3);
    let body = json_of(post(&chat_url(&sim), &request).await).await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from eastus"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    let mut request = hello();
    request["max_completion_tokens"] = json!(100);
    let body = json_of(post(&chat_url(&sim), &request).await).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn legacy_completion_has_azures_shape() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let path = "/openai/deployments/instruct/completions?api-version=2024-10-21";
    let response = post(&url(&sim, path), &json!({"prompt": "Say hello"})).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("completion.json"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "Hello from eastus lorem ipsum");
}

#[tokio::test]
async fn embeddings_have_azures_shape_and_are_deterministic_unit_vectors() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let path = "/openai/deployments/embed/embeddings?api-version=2024-10-21";
    let request = json!({"input": ["first", "second", "first"], "dimensions": 64});
    let response = post(&url(&sim, path), &request).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("embeddings.json"));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let vectors: Vec<Vec<f64>> = data
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            let vector: Vec<f64> = item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(vector.len(), 64);
            let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
            vector
        })
        .collect();
    assert_eq!(vectors[0], vectors[2]);
    assert_ne!(vectors[0], vectors[1]);

    // One string is one input; the default size is 1536.
    let body = json_of(post(&url(&sim, path), &json!({"input": "one"})).await).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 1536);
}

#[tokio::test]
async fn embeddings_in_base64_are_little_endian_floats() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let request =
        json!({"input": "hi", "dimensions": 8, "encoding_format": "base64", "model": "e"});
    let body = json_of(post(&url(&sim, "/openai/v1/embeddings"), &request).await).await;
    let encoded = body["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    // 8 floats of 4 bytes: 32 bytes, 44 base64 characters with one `=`.
    assert_eq!(encoded.len(), 44);
    assert!(encoded.ends_with('=') && !encoded.ends_with("=="));
    assert!(
        encoded
            .trim_end_matches('=')
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
    );
}

#[tokio::test]
async fn responses_have_the_responses_api_shape_on_both_routes() {
    let sim = aoai_sim::start(SimConfig::new("swedencentral")).await;
    for path in [
        "/openai/responses?api-version=2025-04-01-preview",
        "/openai/v1/responses",
    ] {
        let request = json!({"model": "gpt-4o", "input": "Say hello"});
        let response = post(&url(&sim, path), &request).await;
        assert_eq!(response.status(), 200, "{path}");
        let body = json_of(response).await;
        assert_same_shape(&body, &fixture("responses.json"));
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "completed");
        assert!(body["id"].as_str().unwrap().starts_with("resp_"));
        assert_eq!(
            body["output"][0]["content"][0]["text"],
            "Hello from swedencentral lorem ipsum"
        );
        assert_eq!(body["usage"]["output_tokens"], 5);
    }
}

#[tokio::test]
async fn responses_cut_short_are_incomplete() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let request = json!({"input": "Say hello", "max_output_tokens": 2});
    let body = json_of(post(&url(&sim, "/openai/v1/responses"), &request).await).await;
    assert_eq!(body["status"], "incomplete");
    assert_eq!(body["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(body["output"][0]["content"][0]["text"], "Hello from");
}

#[tokio::test]
async fn unknown_routes_get_azures_404() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let unknown = post(&url(&sim, "/openai/deployments/x/images/edits"), &hello()).await;
    let wrong_method = client().get(chat_url(&sim)).send().await.unwrap();
    let root = client().get(sim.url()).send().await.unwrap();
    for response in [unknown, wrong_method, root] {
        assert_eq!(response.status(), 404);
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        let body = json_of(response).await;
        assert_same_shape(&body, &fixture("error_404.json"));
        assert_eq!(body, fixture("error_404.json"));
    }
}

#[tokio::test]
async fn bodies_that_are_not_json_get_a_400() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    for body in ["{not json", "[1, 2]", ""] {
        let response = client()
            .post(chat_url(&sim))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body:?}");
        assert_same_shape(
            &json_of(response).await,
            &fixture("error_invalid_request.json"),
        );
    }
    let response = post(&chat_url(&sim), &json!({"model": "gpt-4o"})).await;
    assert_eq!(response.status(), 400);
    let body = json_of(response).await;
    assert_same_shape(&body, &fixture("error_invalid_request.json"));
    assert_eq!(
        body["error"]["message"],
        "'messages' is a required property"
    );
}

#[tokio::test]
async fn every_answer_carries_azures_headers() {
    let sim = aoai_sim::start(SimConfig::new("eastus").region("Sweden Central")).await;
    sim.push_fault(aoai_sim::Fault::InternalError);
    let responses = [
        post(&chat_url(&sim), &hello()).await,
        post(&chat_url(&sim), &hello()).await,
        post(&url(&sim, "/nope"), &hello()).await,
    ];
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [500, 200, 404]);
    let mut ids = Vec::new();
    for response in &responses {
        assert_eq!(header(response, "x-ms-region"), Some("Sweden Central"));
        for name in [
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
        ] {
            let value = header(response, name).unwrap_or_else(|| panic!("{name}"));
            value.parse::<u64>().expect("a number");
        }
        for name in ["apim-request-id", "x-request-id"] {
            let id = header(response, name).unwrap_or_else(|| panic!("{name}"));
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            ids.push(id.to_owned());
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "request ids are unique");
}

/// Where each `"key":` first appears in `raw`, which must be in the order given.
fn assert_key_order(raw: &str, keys: &[&str]) {
    let positions: Vec<usize> = keys
        .iter()
        .map(|key| {
            raw.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing from {raw}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "keys out of order {keys:?} at {positions:?} in {raw}"
    );
}

#[tokio::test]
async fn fields_come_in_azures_order() {
    let sim = aoai_sim::start(SimConfig::new("eastus")).await;
    let raw = post(&chat_url(&sim), &hello()).await.text().await.unwrap();
    assert_key_order(
        &raw,
        &[
            "choices",
            "created",
            "id",
            "model",
            "object",
            "prompt_filter_results",
            "system_fingerprint",
            "usage",
        ],
    );
    assert!(raw.contains(
        r#""prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":"#
    ));

    // The first event of a stream is always the same, byte for byte as Azure sends it.
    let mut request = hello();
    request["stream"] = json!(true);
    let raw = post(&chat_url(&sim), &request).await.text().await.unwrap();
    let first = raw.split("\n\n").next().unwrap();
    assert_eq!(
        first,
        concat!(
            r#"data: {"choices":[],"created":0,"id":"","model":"","object":"","#,
            r#""prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"#,
            r#""hate":{"filtered":false,"severity":"safe"},"#,
            r#""jailbreak":{"filtered":false,"detected":false},"#,
            r#""self_harm":{"filtered":false,"severity":"safe"},"#,
            r#""sexual":{"filtered":false,"severity":"safe"},"#,
            r#""violence":{"filtered":false,"severity":"safe"}}}]}"#,
        )
    );
}
