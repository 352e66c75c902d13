//! Reloading the pool on `SIGHUP`: the configuration file is read again and a new gateway
//! built from it takes the requests that come after; requests in flight (streams included)
//! finish on the gateway they started on, and the backends that stayed keep their health.

use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use aoai_tower::{Gateway, GatewayFuture};
use axum::body::Body;
use http::{Request, Response};
use tower::Service;

/// The gateway requests go to, replaceable while serving.
#[derive(Clone)]
pub(crate) struct Reloadable {
    current: Arc<RwLock<Gateway>>,
}

impl Reloadable {
    pub(crate) fn new(gateway: Gateway) -> Self {
        Self {
            current: Arc::new(RwLock::new(gateway)),
        }
    }

    /// The gateway new requests go to.
    pub(crate) fn current(&self) -> Gateway {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends the requests that come after to `next`, which takes over the health of the
    /// backends it shares with the gateway it replaces.
    pub(crate) fn replace(&self, next: Gateway) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        next.health().carry_over_from(current.health());
        *current = next;
    }
}

impl Service<Request<Body>> for Reloadable {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = GatewayFuture<Body>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The gateway is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.current().call(request)
    }
}

/// On each `SIGHUP`, rebuilds the gateway with `build` and, if that works, puts it in place;
/// if not (a file that does not parse, a backend that is not a URL), keeps the running one and
/// logs why.
#[cfg(unix)]
pub(crate) async fn on_sighup(
    gateway: Reloadable,
    build: impl Fn() -> Result<Gateway, String> + Send + 'static,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match build() {
            Ok(next) => {
                gateway.replace(next);
                tracing::info!("configuration reloaded");
            }
            Err(error) => tracing::warn!(%error, "configuration not reloaded"),
        }
    }
}
