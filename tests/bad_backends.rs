//! Backends that misbehave below HTTP: one answering garbage bytes, one closing the connection
//! without an answer, one never answering; and a caller whose body stops arriving. The caller
//! gets a clear Azure-shaped 502 or 504, or the answer of a healthy backend the request was
//! retried on.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{builder_over, chat, client, serve_gateway, served_by, sims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback server that hands each connection to `serve`. Returns its URL.
async fn loopback_backend<F, Fut>(serve: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket));
        }
    });
    url
}

/// A loopback server that reads each request's first bytes and answers `reply` (maybe empty),
/// then closes the connection. Returns its URL.
async fn raw_backend(reply: &'static [u8]) -> String {
    loopback_backend(move |mut socket| async move {
        let mut buffer = [0u8; 1024];
        let _ = socket.read(&mut buffer).await;
        let _ = socket.write_all(reply).await;
    })
    .await
}

/// The status, the Azure error code and message of a response.
async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let text = |field: &str| body["error"][field].as_str().unwrap().to_owned();
    (status, text("code"), text("message"))
}

#[tokio::test]
async fn a_backend_answering_garbage_gives_a_502_naming_it() {
    let garbage = raw_backend(b"this is not HTTP\r\n\r\n").await;
    let gateway = aoai_tower::Gateway::builder()
        .backend("garbage", garbage)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let response = chat(&client(), &base).await;
    assert_eq!(served_by(&response), "garbage");
    let (status, code, message) = error_of(response).await;
    assert_eq!((status, code.as_str()), (502, "bad_gateway"));
    assert!(message.starts_with("backend garbage: "), "{message}");
}

#[tokio::test]
async fn a_backend_closing_without_an_answer_gives_a_502() {
    let silent = raw_backend(b"").await;
    let gateway = aoai_tower::Gateway::builder()
        .backend("silent", silent)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let (status, code, _) = error_of(chat(&client(), &base).await).await;
    assert_eq!((status, code.as_str()), (502, "bad_gateway"));
}

#[tokio::test]
async fn a_request_to_a_garbage_backend_is_retried_on_a_healthy_one() {
    let healthy = sims(1).await;
    let garbage = raw_backend(b"HTTP/9.9 banana\r\n\r\n").await;
    let gateway = builder_over(&healthy)
        .backend("garbage", garbage)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let client = client();
    for _ in 0..4 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "a");
    }
    assert_eq!(healthy[0].request_count(), 4);
}

/// A loopback server that accepts connections and reads, but never answers (for at most
/// `BOUND`). Returns its URL.
async fn hung_backend() -> String {
    loopback_backend(|mut socket| async move {
        let mut buffer = [0u8; 1024];
        let _ = tokio::time::timeout(support::BOUND, async {
            while socket.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn a_backend_that_never_answers_meets_the_deadline_with_a_504() {
    let gateway = aoai_tower::Gateway::builder()
        .backend("hung", hung_backend().await)
        .attempt_timeout(Duration::from_secs(60))
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let started = Instant::now();
    let (status, code, message) = error_of(chat(&client(), &base).await).await;
    assert_eq!((status, code.as_str()), (504, "timeout"));
    assert!(message.contains("deadline"), "{message}");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_meets_the_deadline_before_any_backend() {
    let healthy = sims(1).await;
    let gateway = builder_over(&healthy)
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;
    let mut caller = TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    // Announces 100 bytes of body, sends 10, then waits.
    caller
        .write_all(
            b"POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n\
              host: gateway\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n\
              {\"messages",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(support::BOUND, async {
        let mut buffer = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = caller.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within {:?}", support::BOUND);
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert_eq!(healthy[0].request_count(), 0);
}

/// A hung instance is re-admitted with one trial request: after each cooldown it gets exactly
/// one request, which times out and cools it again (for twice as long), while every caller is
/// served by the healthy instance. Real sockets, short timeouts: about two seconds.
#[tokio::test]
async fn a_hung_instance_gets_one_trial_request_per_readmission() {
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&requests);
    let hung = loopback_backend(move |mut socket| {
        let seen = std::sync::Arc::clone(&seen);
        async move {
            let mut buffer = [0u8; 4096];
            while let Ok(Ok(read)) =
                tokio::time::timeout(support::BOUND, socket.read(&mut buffer)).await
            {
                if read == 0 {
                    return;
                }
                if buffer[..read].starts_with(b"POST ") {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
        }
    })
    .await;
    let sims = sims(1).await;
    let policy = aoai_tower::balance::HealthPolicy {
        failure_cooldown: Duration::from_millis(200),
        ..aoai_tower::balance::HealthPolicy::new()
    };
    let gateway = aoai_tower::Gateway::builder()
        .backend("hung", hung)
        .backend("a", sims[0].url())
        .attempt_timeout(Duration::from_millis(150))
        .health_policy(policy)
        .build()
        .unwrap();
    let base = serve_gateway(gateway).await;

    let started = Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                while started.elapsed() < Duration::from_secs(2) {
                    statuses.push(chat(&client, &base).await.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    for caller in callers {
        let statuses = caller.await.unwrap();
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    // Before its first timeout, the hung instance took its round-robin share of the callers'
    // first requests; after it, one trial per re-admission, each at least a (doubling)
    // cooldown after the one before.
    let requests = requests.lock().unwrap();
    let first_timeout = requests[0] + Duration::from_millis(150);
    let trials: Vec<Instant> = requests
        .iter()
        .copied()
        .filter(|&at| at > first_timeout)
        .collect();
    assert!(trials.len() >= 2, "{} trials", trials.len());
    for pair in trials.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(150 + 200),
            "two requests {:?} apart",
            pair[1] - pair[0]
        );
    }
}
