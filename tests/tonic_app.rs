//! The `tonic_app` example's own `app` on a real port: a gRPC call (tonic's client, HTTP/2) and
//! chat completions (reqwest, HTTP/1.1) share it.

mod support;

// The example's `app` and generated code, exactly as users read them; its `main` is not used.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/tonic_app/main.rs"]
mod tonic_app;

use std::future::Future;

use http::uri::PathAndQuery;
use reqwest::Version;
use serde_json::Value;
use support::{BOUND, builder_over, chat, client, serve, served_by, sims};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_app::proto::greeter_client::GreeterClient;
use tonic_app::proto::{HelloReply, HelloRequest};
use tonic_prost::ProstCodec;

/// Awaits `future`, failing the test if it takes longer than [`BOUND`].
async fn bounded<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("no answer in time")
}

#[tokio::test]
async fn grpc_and_chat_completions_share_the_port() {
    let sims = sims(2).await;
    let base = serve(tonic_app::app(builder_over(&sims).build().unwrap())).await;

    // gRPC: tonic's channel speaks HTTP/2 with prior knowledge over plain TCP.
    let mut greeter = bounded(GreeterClient::connect(base.clone())).await.unwrap();
    let reply = bounded(greeter.say_hello(HelloRequest {
        name: "tonic".into(),
    }))
    .await
    .unwrap();
    assert_eq!(reply.into_inner().message, "Hello, tonic!");
    for sim in &sims {
        assert_eq!(sim.request_count(), 0, "{} was contacted", sim.name());
    }

    // Chat completions over HTTP/1.1, as the OpenAI SDKs send them, on the same port.
    let client = client();
    let mut order = Vec::new();
    for _ in 0..2 {
        let response = bounded(chat(&client, &base)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), Version::HTTP_11);
        let name = served_by(&response);
        let body: Value = bounded(response.json()).await.unwrap();
        assert!(
            body["choices"].as_array().is_some_and(|c| !c.is_empty()),
            "{body}"
        );
        order.push(name);
    }
    order.sort();
    assert_eq!(order, ["a", "b"], "the two chats went to both instances");
    for sim in &sims {
        assert_eq!(sim.request_count(), 1, "{}", sim.name());
    }

    // The gRPC connection is still good after the HTTP/1.1 traffic.
    let again = bounded(greeter.say_hello(HelloRequest {
        name: "again".into(),
    }))
    .await
    .unwrap();
    assert_eq!(again.into_inner().message, "Hello, again!");
}

#[tokio::test]
async fn paths_neither_serves_are_404_and_unimplemented() {
    let sims = sims(2).await;
    let base = serve(tonic_app::app(builder_over(&sims).build().unwrap())).await;

    let response = bounded(client().get(format!("{base}/nope")).send())
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // A method the service lacks gets the service's own `Unimplemented`; a service the app
    // lacks gets axum's 404, which tonic's client reads as `Unimplemented` too.
    let channel = bounded(Endpoint::from_shared(base).unwrap().connect())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for path in [
        "/aoai.tower.demo.Greeter/SayGoodbye",
        "/aoai.tower.demo.Farewell/SayGoodbye",
    ] {
        bounded(grpc.ready()).await.unwrap();
        let request = tonic::Request::new(HelloRequest {
            name: "nobody".into(),
        });
        let codec = ProstCodec::<HelloRequest, HelloReply>::default();
        let status = bounded(grpc.unary(request, PathAndQuery::from_static(path), codec))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status}");
    }

    for sim in &sims {
        assert_eq!(sim.request_count(), 0, "{} was contacted", sim.name());
    }
}
