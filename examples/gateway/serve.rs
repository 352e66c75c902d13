//! Serving callers with hyper-util's auto server (HTTP/1.1 and h2c on one port), graceful
//! shutdown (Realtime sessions included), and the caller-side limits: hyper's header read
//! timeout, tower-http's request body timeout, and a write timeout on the socket
//! (tokio-io-timeout).

use std::future::Future;
use std::time::Duration;

use aoai_tower::Sessions;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// How long a caller's connection may wait on its caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// For a whole HTTP/1.1 request head, from the connection's opening and after each answer
    /// (hyper's header read timeout: the connection is closed).
    pub(crate) head: Duration,
    /// For the next bytes of a request body still arriving (tower-http's request body timeout:
    /// the caller gets 408).
    pub(crate) body: Duration,
    /// For the caller's socket to take more of an answer (a write timeout on the socket: the
    /// connection is closed, and the backend's stream dropped).
    pub(crate) send: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits for the
/// requests in flight (streams included) to finish, and meanwhile for the Realtime `sessions`
/// to end, for up to `grace`: those still open then are closed with 1001.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
    sessions: &Sessions,
    grace: Duration,
) {
    let app = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(timeouts.body))
        .service(app);
    let service = TowerToHyperService::new(app);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.head);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Stream chunks leave at once.
        let _ = tcp.set_nodelay(true);
        let builder = builder.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        let head_timeout = timeouts.head;
        let send_timeout = timeouts.send;
        tokio::spawn(async move {
            if !tells_its_version_within(&tcp, head_timeout).await {
                return;
            }
            let mut io = TimeoutStream::new(tcp);
            io.set_write_timeout(Some(send_timeout));
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(Box::pin(io)), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "connection ended");
            }
        });
    }
    drop(listener);
    // hyper's graceful shutdown lets a connection go once it is upgraded: it does not wait for
    // the sessions, which would be cut without a close frame when the runtime stops.
    let open = sessions.count();
    if open > 0 {
        tracing::info!(
            sessions = open,
            ?grace,
            "waiting for Realtime sessions to end"
        );
    }
    let ((), closed) = tokio::join!(graceful.shutdown(), sessions.close_all(grace));
    if closed > 0 {
        tracing::info!(
            sessions = closed,
            "closed Realtime sessions still open after the grace period"
        );
    }
}

/// The auto server reads a caller's first bytes, to tell HTTP/1.1 from HTTP/2, before hyper's
/// header read timeout starts, and waits for them as long as it takes. This waits for them
/// itself, at most `limit`, without reading them: until they depart from the HTTP/2 preface
/// (HTTP/1.1) or hold it whole. A caller that sends nothing, or a part of the preface, within
/// `limit` is let go.
async fn tells_its_version_within(tcp: &TcpStream, limit: Duration) -> bool {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let peeked = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 24];
        loop {
            let n = tcp.peek(&mut buf).await?;
            if n == 0 || n == PREFACE.len() || buf[..n] != PREFACE[..n] {
                return Ok::<_, std::io::Error>(n > 0);
            }
            // A part of the preface: a peek would return it again at once. Real clients send
            // the preface in one segment; this is for those that trickle it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    matches!(peeked, Ok(Ok(true)))
}
