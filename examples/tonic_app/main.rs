//! A tonic gRPC service and the gateway on one port, as a tonic user adds it: the service's
//! `tonic::service::Routes` and `nest_service("/openai", gateway)` in one axum `Router`, served
//! by `axum::serve`. Its hyper-util server speaks HTTP/1.1 (what the OpenAI SDKs send) and
//! HTTP/2 with prior knowledge (what gRPC clients send) on the same listener.
//!
//! The gRPC service is `aoai.tower.demo.Greeter` (`greeter.proto`); its Rust code is checked
//! in as `generated.rs`, so the build needs no protoc and no build script. In an app of your
//! own, turn on axum's `http2` feature so that `axum::serve` accepts HTTP/2 (here the
//! workspace's hyper-util features already do).
//!
//! ```text
//! cargo run --example tonic_app
//! curl 'http://127.0.0.1:3000/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21' \
//!     -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"Hi"}]}'
//! # SayHello { name: "world" } without a gRPC tool: one gRPC frame (uncompressed, 7 bytes) over
//! # h2c; the answer is a frame holding "Hello, world!".
//! printf '\0\0\0\0\7\n\5world' | curl --http2-prior-knowledge --data-binary @- -o - \
//!     -H 'content-type: application/grpc' -H 'te: trailers' \
//!     http://127.0.0.1:3000/aoai.tower.demo.Greeter/SayHello
//! ```

use aoai_sim::SimConfig;
use aoai_tower::Gateway;
use axum::Router;
use axum::serve::ListenerExt;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use proto::greeter_server::{Greeter, GreeterServer};
use proto::{HelloReply, HelloRequest};

/// The messages, client and server tonic-prost-build made from `greeter.proto`.
pub mod proto {
    include!("generated.rs");
}

/// The gRPC service: answers a greeting by the caller's name.
#[derive(Debug, Default)]
pub struct HelloGreeter;

#[tonic::async_trait]
impl Greeter for HelloGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}!"),
        }))
    }
}

/// The gateway under `/openai` and the gRPC service beside it, in one router.
///
/// `Routes::from` an axum router keeps that router's fallback: a path neither serves gets
/// axum's 404, which a gRPC client reads as `Unimplemented` (`Routes::new` would answer
/// HTTP callers with a gRPC status instead).
pub fn app(gateway: Gateway) -> Router {
    let openai = Router::new().nest_service("/openai", gateway);
    Routes::from(openai)
        .add_service(GreeterServer::new(HelloGreeter))
        .into_axum_router()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = aoai_sim::start(SimConfig::new("a")).await;
    let b = aoai_sim::start(SimConfig::new("b")).await;
    let gateway = Gateway::builder()
        .backend("a", a.url())
        .backend("b", b.url())
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("gRPC and /openai on http://{}", listener.local_addr()?);
    // TCP_NODELAY on accepted connections, so stream chunks and gRPC frames leave at once.
    let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
    axum::serve(listener, app(gateway))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
