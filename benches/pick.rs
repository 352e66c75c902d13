//! The cost of `Balance`'s pick: one `call` on a `Balance` over in-memory backends that answer
//! at once, polled to completion (one poll), with 2, 8 and 32 backends in 3 priority tiers.
//!
//! ```text
//! cargo bench --bench pick
//! ```
//!
//! - `weighted/N`: tier `i % 3 + 1`, weight `i % 4 + 1` (smooth weighted round-robin); tier 1
//!   serves. Every tier's rotations are behind a mutex.
//! - `uniform/N`: the same tiers, every weight 1 (plain round-robin).
//! - `deployment/N`: uniform, each request naming its deployment as the gateway's do (a
//!   [`Deployment`] extension, inserted in the loop: one allocation), which has its own
//!   rotation.
//! - `spill/N`: weighted, with every backend of tier 1 cooling down: each pick looks at tier 1
//!   (reading the clock once), then picks in tier 2.
//! - `backend_alone`: the in-memory backend called directly, for reference: the pick's own cost
//!   is the difference.
//!
//! Before the timings it prints the heap allocations per call of each (the balance's own: the
//! `ServedBy` response extension).

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use aoai_tower::balance::{
    AzureOpenAiClassifier, BackendSpec, BackendState, Balance, Deployment, HealthPolicy,
};
use criterion::{BenchmarkId, Criterion};
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{Service, service_fn};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A backend answering at once with the status in `status` (429s ask for an hour).
fn backend(
    status: Arc<AtomicU16>,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<()>, Infallible>>,
> + Clone {
    service_fn(move |_req: Request<()>| {
        let status = status.load(Ordering::Relaxed);
        std::future::ready(Ok({
            let mut response = Response::new(());
            if status != 200 {
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static("3600"));
            }
            response
        }))
    })
}

/// Polls `future` once: the backends answer at once, so it is done.
fn poll_once<F: Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("the in-memory backend answers at once")
}

/// `n` backends in 3 tiers, weighted or not, with their statuses.
// The backend's type is an `impl Service`, which a type alias cannot name.
#[allow(clippy::type_complexity)]
fn balance(
    n: usize,
    weighted: bool,
) -> (
    Vec<Arc<AtomicU16>>,
    Balance<impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone>,
) {
    let statuses: Vec<Arc<AtomicU16>> = (0..n).map(|_| Arc::new(AtomicU16::new(200))).collect();
    let balance = Balance::with_backends(
        statuses.iter().enumerate().map(|(i, status)| {
            let weight = if weighted { i as u32 % 4 + 1 } else { 1 };
            BackendSpec::new(format!("b{i}"), backend(status.clone()))
                .priority(i as u32 % 3 + 1)
                .weight(weight)
        }),
        HealthPolicy::new(),
        AzureOpenAiClassifier,
    );
    (statuses, balance)
}

fn allocations_per_call<S, F>(mut call: S, n: u64) -> f64
where
    S: FnMut() -> F,
    F: Future,
{
    poll_once(call());
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        poll_once(call());
    }
    region.change().allocations as f64 / n as f64
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    let mut alone = backend(Arc::new(AtomicU16::new(200)));
    println!("allocations per call (in-memory backends):");
    println!(
        "  backend_alone {:>5.2}",
        allocations_per_call(|| alone.call(Request::new(())), 10_000)
    );
    group.bench_function("backend_alone", |b| {
        b.iter(|| poll_once(alone.call(Request::new(()))).unwrap())
    });
    for n in [2, 8, 32] {
        for (name, weighted) in [("weighted", true), ("uniform", false)] {
            let (_statuses, mut balance) = balance(n, weighted);
            println!(
                "  {name}/{n:<2}   {:>5.2}",
                allocations_per_call(|| balance.call(Request::new(())), 10_000)
            );
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| poll_once(balance.call(Request::new(()))).unwrap())
            });
        }

        let (_statuses, mut per_deployment) = balance(n, false);
        let deployment = Deployment::new("gpt-4o");
        let request = || {
            let mut request = Request::new(());
            request.extensions_mut().insert(deployment.clone());
            request
        };
        println!(
            "  deployment/{n:<2} {:>5.2}",
            allocations_per_call(|| per_deployment.call(request()), 10_000)
        );
        group.bench_with_input(BenchmarkId::new("deployment", n), &n, |b, _| {
            b.iter(|| poll_once(per_deployment.call(request())).unwrap())
        });

        // Tier 1 (backends 0, 3, 6, ...) cooling down for an hour: every pick spills to tier 2.
        let (statuses, mut balance) = balance(n, true);
        for status in statuses.iter().step_by(3) {
            status.store(429, Ordering::Relaxed);
        }
        while balance
            .snapshot()
            .iter()
            .any(|b| b.priority == 1 && b.state != BackendState::Cooling)
        {
            poll_once(balance.call(Request::new(()))).unwrap();
        }
        for status in &statuses {
            status.store(200, Ordering::Relaxed);
        }
        println!(
            "  spill/{n:<2}      {:>5.2}",
            allocations_per_call(|| balance.call(Request::new(())), 10_000)
        );
        group.bench_with_input(BenchmarkId::new("spill", n), &n, |b, _| {
            b.iter(|| {
                let response = poll_once(balance.call(Request::new(()))).unwrap();
                debug_assert!(response.status().is_success());
                response
            })
        });
        assert!(
            balance
                .snapshot()
                .iter()
                .all(|b| (b.priority == 1) == (b.state == BackendState::Cooling)),
            "tier 1 cooled the whole run, the others served"
        );
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
}
