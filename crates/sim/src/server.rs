//! [`start`] and [`SimHandle`]: one emulated instance on its own loopback port.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::{Fault, ObjectKind, RecordedRequest, SimConfig, SimState, router};

/// Start an emulated instance on `127.0.0.1`, on a free port, served by a background task of the
/// current tokio runtime.
///
/// It serves HTTP/1.1 and HTTP/2 (prior knowledge) until [`SimHandle::shutdown`], or until the
/// last clone of its handle is dropped.
///
/// # Panics
///
/// When no port can be bound on `127.0.0.1`, or outside a tokio runtime.
pub async fn start(config: SimConfig) -> SimHandle {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("aoai-sim: bind 127.0.0.1:0");
    let addr = listener
        .local_addr()
        .expect("aoai-sim: local address of a bound listener");
    let state = SimState::new(config);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(listener, router(state.clone()), stopped));
    SimHandle {
        state,
        addr,
        server: Arc::new(Server {
            stop,
            task: Mutex::new(Some(task)),
        }),
    }
}

/// Accept connections until told to stop (or until every handle is gone), then drop every open
/// connection, so requests still hanging or streaming end with it.
async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A value sent, or the sender dropped with the last handle: either way, stop.
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Latency over throughput, like the real service behind a load balancer;
                    // failure only costs a little latency.
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(app.clone());
                    connections.spawn(async move {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        if let Err(error) = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%error, "aoai-sim: connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors, most likely: let some connections finish.
                    tracing::warn!(%error, "aoai-sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// A running emulated instance: its address, and the controls tests drive it with.
///
/// Cheap to clone; every clone controls the same instance. The instance stops when
/// [`shutdown`](Self::shutdown) is called on any clone, or when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SimHandle {
    state: SimState,
    addr: SocketAddr,
    server: Arc<Server>,
}

#[derive(Debug)]
struct Server {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SimHandle {
    /// The socket address it listens on (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint as the Azure portal shows it, without a trailing slash:
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        self.state.name()
    }

    /// The shared state, the same the router serves from.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    /// Queue a fault for the next request; see [`SimState::push_fault`].
    pub fn push_fault(&self, fault: Fault) {
        self.state.push_fault(fault);
    }

    /// Queue the same fault for the next `n` requests.
    pub fn push_faults(&self, fault: Fault, n: usize) {
        self.state.push_faults(fault, n);
    }

    /// Every request received so far, in arrival order, including those answered with a fault.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.state.request_count()
    }

    /// How many objects of `kind` requests created; see [`SimState::object_count`].
    pub fn object_count(&self, kind: ObjectKind) -> usize {
        self.state.object_count(kind)
    }

    /// How many Realtime sessions are open; see [`SimState::realtime_sessions`].
    pub fn realtime_sessions(&self) -> usize {
        self.state.realtime_sessions()
    }

    /// Forget the recorded requests and drop the queued faults.
    pub fn clear(&self) {
        self.state.clear();
    }

    /// Hold streams back; see [`SimState::hold_chunks`].
    pub fn hold_chunks(&self) {
        self.state.hold_chunks();
    }

    /// Let exactly one more held chunk out; see [`SimState::release_chunk`].
    pub fn release_chunk(&self) {
        self.state.release_chunk();
    }

    /// Stop serving: close the listener and drop every open connection (hanging and streaming
    /// requests and Realtime sessions end too), then return. Stops the instance for every clone
    /// of the handle.
    pub async fn shutdown(self) {
        // Upgraded connections left hyper's connection tasks: end them through the state.
        self.state.realtime().end_all();
        // Err only when the server task is gone already.
        let _ = self.server.stop.send(true);
        let task = self
            .server
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The task never panics; an Err would only report that.
            let _ = task.await;
        }
    }
}
