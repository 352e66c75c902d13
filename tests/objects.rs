//! Objects that live on one instance (stored responses, files, batches) through the gateway:
//! follow-ups reach the instance that holds them, after a restart too, unknown ids get the
//! instances' own answers, and a request creating one is never repeated where the instance may
//! have acted.

mod support;

use std::time::Duration;

use aoai_sim::{Fault, ObjectKind, SimHandle};
use aoai_tower::Gateway;
use serde_json::{Value, json};
use support::{builder_over, client, serve_gateway, served_by, sims};

const RESPONSES: &str = "/openai/v1/responses";

async fn post(base: &str, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get(base: &str, path: &str) -> reqwest::Response {
    client().get(format!("{base}{path}")).send().await.unwrap()
}

/// The `id` of the object an answer holds.
async fn id_of(answer: reqwest::Response) -> String {
    let object: Value = answer.json().await.unwrap();
    object["id"].as_str().unwrap().to_owned()
}

/// Uploads `content` as a batch input file through `base`, the way the SDKs do (multipart).
async fn upload(base: &str, content: &str) -> reqwest::Response {
    let boundary = "aoai-tower-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    client()
        .post(format!("{base}/openai/files?api-version=2024-10-21"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
}

const BATCH_LINE: &str = r#"{"custom_id":"1","method":"POST","url":"/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}}"#;

fn batch(file_id: &str) -> Value {
    json!({ "input_file_id": file_id, "endpoint": "/chat/completions", "completion_window": "24h" })
}

fn count(sims: &[SimHandle], kind: ObjectKind) -> Vec<usize> {
    sims.iter().map(|sim| sim.object_count(kind)).collect()
}

/// A response stored through a gateway over `sims` that is gone after: the instance that holds
/// it, and its id.
async fn stored_response(sims: &[SimHandle]) -> (String, String) {
    let before = serve_gateway(builder_over(sims).build().unwrap()).await;
    let first = post(
        &before,
        RESPONSES,
        &json!({ "model": "gpt-4o", "input": "Hi" }),
    )
    .await;
    assert_eq!(first.status(), 200);
    let home = served_by(&first);
    let id = id_of(first).await;
    (home, id)
}

#[tokio::test]
async fn a_responses_conversation_stays_on_the_instance_of_its_first_turn() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;

    let first = post(
        &base,
        RESPONSES,
        &json!({ "model": "gpt-4o", "input": "Hi" }),
    )
    .await;
    assert_eq!(first.status(), 200);
    let home = served_by(&first);
    let mut previous = id_of(first).await;
    for turn in 2..=5 {
        let body =
            json!({ "model": "gpt-4o", "input": "And then?", "previous_response_id": previous });
        let answer = post(&base, RESPONSES, &body).await;
        assert_eq!(answer.status(), 200, "turn {turn}");
        assert_eq!(served_by(&answer), home, "turn {turn}");
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["previous_response_id"], previous.as_str());
        assert!(
            answer.to_string().contains(&format!("(turn {turn})")),
            "{answer}"
        );
        previous = answer["id"].as_str().unwrap().to_owned();
    }
    // Learnt from each answer: no turn was sent to the other instance first.
    let elsewhere = sims.iter().find(|sim| sim.name() != home).unwrap();
    assert_eq!(elsewhere.request_count(), 0);
    assert_eq!(count(&sims, ObjectKind::Response).iter().sum::<usize>(), 5);
}

/// A conversation (the Conversations API) and the responses that name it stay on the
/// instance that created it, through the gateway that learnt it and after a restart, which
/// finds it by asking.
#[tokio::test]
async fn responses_naming_a_conversation_go_to_its_instance_before_and_after_a_restart() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    // Two conversations, one on each instance; the second, on b, is the one continued: a
    // restarted gateway's first pick for the deployment is a, which does not hold it.
    let mut created = Vec::new();
    for _ in 0..2 {
        let answer = post(&base, "/openai/v1/conversations", &json!({})).await;
        assert_eq!(answer.status(), 200);
        created.push((served_by(&answer), answer.json::<Value>().await.unwrap()));
    }
    let (home, conversation) = created.pop().unwrap();
    assert_eq!(home, "b");
    let id = conversation["id"].as_str().unwrap().to_owned();

    let restarted = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let asked_before = sims[0].request_count();
    for (turn, gateway) in [
        (1, &base),
        (2, &base),
        (3, &base),
        (4, &restarted),
        (5, &restarted),
    ] {
        let body =
            json!({ "model": "gpt-4o", "input": format!("turn {turn}"), "conversation": id });
        let answer = post(gateway, RESPONSES, &body).await;
        assert_eq!(answer.status(), 200, "turn {turn}");
        assert_eq!(served_by(&answer), home, "turn {turn}");
        let answer: Value = answer.json().await.unwrap();
        assert!(
            answer.to_string().contains(&format!("(turn {turn})")),
            "{answer}"
        );
    }
    let items = get(&restarted, &format!("/openai/v1/conversations/{id}/items")).await;
    assert_eq!(items.status(), 200);
    assert_eq!(served_by(&items), home);
    let items: Value = items.json().await.unwrap();
    assert_eq!(items["data"].as_array().unwrap().len(), 10, "{items}");
    assert_eq!(
        sims[0].request_count(),
        asked_before + 1,
        "a was asked once, then learnt"
    );
    assert_eq!(count(&sims, ObjectKind::Conversation), [1, 1]);
}

#[tokio::test]
async fn after_a_restart_the_gateway_finds_the_instance_by_asking_without_harm_to_the_others() {
    let sims = sims(2).await;
    let (home, id) = stored_response(&sims).await;

    // A new gateway (a restart, or another replica) knows nothing of it. Several follow-ups,
    // so that round-robin sends at least one to the other instance first.
    let gateway = builder_over(&sims).build().unwrap();
    let health = gateway.health().clone();
    let after = serve_gateway(gateway).await;
    for _ in 0..2 {
        let body =
            json!({ "model": "gpt-4o", "input": "Still there?", "previous_response_id": id });
        let answer = post(&after, RESPONSES, &body).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(served_by(&answer), home);
        let got = get(&after, &format!("{RESPONSES}/{id}")).await;
        assert_eq!(got.status(), 200);
        assert_eq!(served_by(&got), home);
    }
    for backend in health.snapshot() {
        assert_eq!(backend.cooling_down_for, None, "{backend:?}");
        assert_eq!(backend.failed, 0, "{backend:?}");
    }
}

#[tokio::test]
async fn a_file_uploaded_then_used_by_a_batch_before_and_after_a_restart() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let uploaded = upload(&base, BATCH_LINE).await;
    assert_eq!(uploaded.status(), 200);
    let home = served_by(&uploaded);
    let file_id = id_of(uploaded).await;
    for _ in 0..2 {
        let created = post(
            &base,
            "/openai/batches?api-version=2024-10-21",
            &batch(&file_id),
        )
        .await;
        assert_eq!(created.status(), 200);
        assert_eq!(served_by(&created), home);
        let batch_id = id_of(created).await;
        let read = get(
            &base,
            &format!("/openai/batches/{batch_id}?api-version=2024-10-21"),
        )
        .await;
        assert_eq!(read.status(), 200);
        assert_eq!(served_by(&read), home);
    }

    let restarted = serve_gateway(builder_over(&sims).build().unwrap()).await;
    for _ in 0..2 {
        let created = post(
            &restarted,
            "/openai/batches?api-version=2024-10-21",
            &batch(&file_id),
        )
        .await;
        assert_eq!(created.status(), 200);
        assert_eq!(served_by(&created), home);
    }
    let batches = count(&sims, ObjectKind::Batch);
    assert_eq!(batches.iter().sum::<usize>(), 4, "{batches:?}");
    assert_eq!(count(&sims, ObjectKind::File).iter().sum::<usize>(), 1);
}

/// A batch input file over the default 16 MiB body limit gets 413 and reaches no instance; with
/// the limit raised, it arrives whole and a batch made from it is on the same instance.
#[tokio::test]
async fn a_file_over_the_body_limit_gets_413_and_goes_through_once_the_limit_is_raised() {
    let sims = sims(2).await;
    let content: String = std::iter::repeat_n(format!("{BATCH_LINE}\n"), 150_000).collect();
    assert!(content.len() > 16 << 20, "{}", content.len());

    let default = serve_gateway(builder_over(&sims).build().unwrap()).await;
    let refused = upload(&default, &content).await;
    assert_eq!(refused.status(), 413);
    let error = refused.json::<Value>().await.unwrap();
    assert_eq!(error["error"]["code"], "request_body_too_large", "{error}");
    assert_eq!(sims.iter().map(SimHandle::request_count).sum::<usize>(), 0);

    let raised = builder_over(&sims).body_limit(64 << 20).build().unwrap();
    let base = serve_gateway(raised).await;
    let uploaded = upload(&base, &content).await;
    assert_eq!(uploaded.status(), 200);
    let home = served_by(&uploaded);
    let file = uploaded.json::<Value>().await.unwrap();
    assert_eq!(file["bytes"], content.len(), "{file}");
    let created = post(
        &base,
        "/openai/batches?api-version=2024-10-21",
        &batch(file["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(created.status(), 200);
    assert_eq!(served_by(&created), home);
}

#[tokio::test]
async fn an_unknown_id_gets_the_instances_own_answer_after_each_was_asked() {
    let sims = sims(2).await;
    let base = serve_gateway(builder_over(&sims).build().unwrap()).await;

    let missing = get(&base, &format!("{RESPONSES}/resp_nowhere")).await;
    assert_eq!(missing.status(), 404);
    assert!(!served_by(&missing).is_empty());
    let body: Value = missing.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Response with id 'resp_nowhere' not found."
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 2);

    let follow_up =
        json!({ "model": "gpt-4o", "input": "Hi", "previous_response_id": "resp_nowhere" });
    let refused = post(&base, RESPONSES, &follow_up).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "previous_response_not_found");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 4);
}

/// A gateway whose attempts time out after 300 ms.
fn impatient(sims: &[SimHandle]) -> Gateway {
    builder_over(sims)
        .attempt_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_creation_is_not_repeated_after_a_timeout_or_a_500() {
    let sims = sims(2).await;
    let base = serve_gateway(impatient(&sims)).await;
    let uploads = || {
        sims.iter()
            .flat_map(|sim| sim.requests())
            .filter(|r| r.path.ends_with("/files"))
            .count()
    };

    // The instance takes longer than the attempt timeout: it may yet create the file (Azure
    // would), so a retry could make a second one. No other instance is asked.
    for sim in &sims {
        sim.push_fault(Fault::Delay(Duration::from_millis(800)));
    }
    let timed_out = upload(&base, BATCH_LINE).await;
    assert_eq!(timed_out.status(), 504);
    assert_eq!(uploads(), 1);

    for sim in &sims {
        sim.clear();
        sim.push_fault(Fault::InternalError);
    }
    let failed = upload(&base, BATCH_LINE).await;
    assert_eq!(failed.status(), 500);
    assert_eq!(uploads(), 1);

    // A chat completion keeps its retries.
    let chat = support::chat(&client(), &base).await;
    assert_eq!(chat.status(), 200);
}

#[tokio::test]
async fn a_creation_refused_with_429_or_503_is_made_once_elsewhere() {
    for fault in [Fault::throttle(1), Fault::ServiceUnavailable] {
        let sims = sims(2).await;
        // A new gateway's first request goes to the first instance.
        let base = serve_gateway(builder_over(&sims).build().unwrap()).await;
        sims[0].push_fault(fault.clone());
        let created = upload(&base, BATCH_LINE).await;
        assert_eq!(created.status(), 200, "{fault:?}");
        assert_eq!(served_by(&created), "b", "{fault:?}");
        assert_eq!(count(&sims, ObjectKind::File), [0, 1], "{fault:?}");
    }
}

#[tokio::test]
async fn an_object_on_a_cooling_instance_is_still_asked_for_there() {
    let sims = sims(2).await;
    let (home_name, id) = stored_response(&sims).await;
    let home = sims.iter().find(|sim| sim.name() == home_name).unwrap();

    // A new gateway, whose first requests cool the home instance down for gpt-4o (a 429 asking
    // for a minute), the other instance answering them.
    let gateway = builder_over(&sims).build().unwrap();
    let health = gateway.health().clone();
    let after = serve_gateway(gateway).await;
    home.push_fault(Fault::throttle(60));
    while health
        .snapshot()
        .iter()
        .all(|backend| backend.deployment_cooldowns.is_empty())
    {
        let fresh = post(
            &after,
            RESPONSES,
            &json!({ "model": "gpt-4o", "input": "Hi" }),
        )
        .await;
        assert_eq!(fresh.status(), 200);
    }

    // The follow-up: the other instance does not have it; the cooling one, asked next, does.
    let body = json!({ "model": "gpt-4o", "input": "Go on", "previous_response_id": id });
    let answer = post(&after, RESPONSES, &body).await;
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(served_by(&answer), home_name);
}
