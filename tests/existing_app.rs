//! The gateway inside an existing axum app (the `existing_app` example's own `app`): the app's
//! routes and middleware behave as before, and the gateway serves under its prefix.

mod support;

// The example's `app` function, exactly as users read it; its `main` is not used here.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/existing_app.rs"]
mod existing_app;

use aoai_sim::SimHandle;
use serde_json::{Value, json};
use support::{builder_over, chat_body, client, serve, served_by, sims};

const PREFIXED_CHAT: &str =
    "/llm/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

/// Two emulated instances and the example app in front of them; returns them and its base URL.
async fn start() -> (Vec<SimHandle>, String) {
    let sims = sims(2).await;
    let app = existing_app::app(builder_over(&sims).build().unwrap());
    let base = serve(app).await;
    (sims, base)
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn the_apps_own_routes_answer_as_before() {
    let (sims, base) = start().await;
    let client = client();

    let hello = client
        .get(format!("{base}/api/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(hello.status(), 200);
    assert_eq!(
        header(&hello, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(&hello, "x-served-by"), None);
    // The app's request-id middleware still runs: an id is made and sent back.
    let made = header(&hello, "x-request-id").expect("x-request-id made by the app");
    assert!(!made.is_empty());
    assert_eq!(
        hello.json::<Value>().await.unwrap(),
        json!({ "hello": "world" })
    );

    // A caller's own id is kept and propagated.
    let healthz = client
        .get(format!("{base}/healthz"))
        .header("x-request-id", "caller-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    assert_eq!(
        header(&healthz, "x-request-id").as_deref(),
        Some("caller-id-42")
    );
    assert_eq!(healthz.text().await.unwrap(), "ok");

    // The app's method handling is its own too.
    let wrong_method = client
        .post(format!("{base}/api/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);

    for sim in &sims {
        assert_eq!(sim.request_count(), 0, "{} was contacted", sim.name());
    }
}

#[tokio::test]
async fn unknown_routes_are_still_the_apps_404() {
    let (sims, base) = start().await;
    let client = client();

    for path in [
        "/nope",
        "/llm",
        "/llm/other",
        "/openai/deployments/gpt-4o/chat/completions",
    ] {
        let response = client
            .post(format!("{base}{path}"))
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(header(&response, "x-served-by"), None, "{path}");
        assert!(header(&response, "x-request-id").is_some(), "{path}");
        // axum's own empty 404, not an answer from a backend.
        assert_eq!(response.text().await.unwrap(), "", "{path}");
    }
    for sim in &sims {
        assert_eq!(sim.request_count(), 0, "{} was contacted", sim.name());
    }
}

#[tokio::test]
async fn the_gateway_serves_under_the_prefix() {
    let (sims, base) = start().await;
    let client = client();

    let mut order = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(format!("{base}{PREFIXED_CHAT}"))
            .header("x-request-id", "caller-id-7")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let name = served_by(&response);
        assert!(header(&response, "x-request-id").is_some());
        let body: Value = response.json().await.unwrap();
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.starts_with(&format!("Hello from {name} ")), "{text}");
        order.push(name);
    }
    assert_eq!(order, ["a", "b"]);

    // The prefix is the app's: each backend sees Azure's own path, and the caller's request id.
    for sim in &sims {
        let received = sim.requests();
        assert_eq!(received.len(), 1, "{}", sim.name());
        assert_eq!(
            received[0].path,
            "/openai/deployments/gpt-4o/chat/completions"
        );
        assert_eq!(received[0].query.as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(received[0].header("x-request-id"), Some("caller-id-7"));
    }

    // Anything under the prefix belongs to the gateway: the backend's own 404 comes back.
    let unknown = client
        .post(format!("{base}/llm/openai/not/a/route"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(served_by(&unknown), "a");
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "404");
    assert_eq!(sims[0].requests()[1].path, "/openai/not/a/route");
}
