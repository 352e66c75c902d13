//! Per-request overhead of each layer, and of the whole stack, over an in-memory backend (no
//! I/O): time with criterion, heap allocations with a counting global allocator.
//!
//! ```text
//! cargo bench --bench stack
//! ```
//!
//! Before the timings it prints a table of allocations per request for each stack.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use aoai_tower::auth::AzureAuthLayer;
use aoai_tower::balance::Balance;
use aoai_tower::retry::{ReplayBody, RetryNextBackendLayer};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;
use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A credential whose token never needs refreshing during a run.
#[derive(Debug)]
struct StaticCredential;

#[async_trait::async_trait]
impl TokenCredential for StaticCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            "bench-token",
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
}

/// The in-memory backend: answers at once, allocating nothing.
fn backend() -> impl Service<
    Request<ReplayBody>,
    Response = Response<ReplayBody>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<ReplayBody>, Infallible>>,
> + Clone {
    service_fn(|_req: Request<ReplayBody>| {
        std::future::ready(Ok(Response::new(ReplayBody::default())))
    })
}

/// A request as a caller sends it: a path, a few headers, a JSON body.
fn request(body: &Bytes) -> Request<ReplayBody> {
    Request::post("/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("user-agent", "AzureOpenAI/Python 1.54.0")
        .header("api-key", "caller-key")
        .body(ReplayBody::new(body.clone()))
        .unwrap()
}

/// Allocations per request of `service`, over `n` requests after a warm-up one.
fn allocations_per_request<S>(rt: &tokio::runtime::Runtime, service: S, body: &Bytes, n: u64) -> f64
where
    S: Service<Request<ReplayBody>> + Clone,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        service.clone().oneshot(request(body)).await.unwrap();
        let region = Region::new(GLOBAL);
        for _ in 0..n {
            service.clone().oneshot(request(body)).await.unwrap();
        }
        region.change().allocations as f64 / n as f64
    })
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from_static(br#"{"messages":[{"role":"user","content":"Hello"}]}"#);
    let _runtime = rt.enter();

    let auth = AzureAuthLayer::from_credential(Arc::new(StaticCredential));
    let balance = Balance::new([("a", backend()), ("b", backend())]);
    let authed = auth.layer(backend());
    let retry = RetryNextBackendLayer::new(balance.health()).layer(balance.clone());
    let per_backend = || {
        ServiceBuilder::new()
            .timeout(Duration::from_secs(300))
            .layer(auth.clone())
            .service(backend())
    };
    let stacked = Balance::new([("a", per_backend()), ("b", per_backend())]);
    // As the gateway composes it: a deadline that knows the attempt timeout.
    let whole = RetryNextBackendLayer::new(stacked.health())
        .deadline(Duration::from_secs(900), Some(Duration::from_secs(300)))
        .layer(stacked);

    let n = 10_000;
    println!("allocations per request (in-memory backend):");
    println!(
        "  backend alone   {:>5.2}",
        allocations_per_request(&rt, backend(), &body, n)
    );
    println!(
        "  Balance         {:>5.2}",
        allocations_per_request(&rt, balance.clone(), &body, n)
    );
    println!(
        "  AzureAuth       {:>5.2}",
        allocations_per_request(&rt, authed.clone(), &body, n)
    );
    println!(
        "  RetryNextBackend + Balance {:>5.2}",
        allocations_per_request(&rt, retry.clone(), &body, n)
    );
    println!(
        "  whole stack     {:>5.2}",
        allocations_per_request(&rt, whole.clone(), &body, n)
    );

    let mut group = c.benchmark_group("per_request");
    group.bench_function("backend_alone", |b| {
        b.to_async(&rt).iter(|| backend().oneshot(request(&body)))
    });
    group.bench_function("balance", |b| {
        b.to_async(&rt)
            .iter(|| balance.clone().oneshot(request(&body)))
    });
    group.bench_function("azure_auth", |b| {
        b.to_async(&rt)
            .iter(|| authed.clone().oneshot(request(&body)))
    });
    group.bench_function("retry_balance", |b| {
        b.to_async(&rt)
            .iter(|| retry.clone().oneshot(request(&body)))
    });
    group.bench_function("whole_stack", |b| {
        b.to_async(&rt)
            .iter(|| whole.clone().oneshot(request(&body)))
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
}
