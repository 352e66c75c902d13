//! Serving: one single-threaded runtime per worker (one per core by default), each with its own
//! `SO_REUSEPORT` listener and accept loop; HTTP/1.1 callers served by aoai-upstream's lean
//! server, HTTP/2 callers by hyper's; head, body and send timeouts (over HTTP/2 as an idle limit,
//! a body timeout and a send limit: `h2_limits`); graceful shutdown.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use aoai_tower::upstream::server::{self as lean, RequestBody};
use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pin_project_lite::pin_project;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::Service;

use crate::h2_limits::{self, CountedIo, H2Limits, OpenBody, OpenFuture, Streams};

/// Where and how the gateway serves its callers.
pub(crate) struct Serving {
    pub(crate) listen: SocketAddr,
    pub(crate) timeouts: Timeouts,
    /// Worker threads; `None`: one per core.
    pub(crate) workers: Option<usize>,
}

/// How long a caller's connection may wait on its caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// For a whole request head (its first bytes included), and, over HTTP/2, with no stream
    /// open.
    pub(crate) head: Duration,
    /// For the next bytes of a request body still arriving.
    pub(crate) body: Duration,
    /// For the caller to take more of an answer (room in its socket, or its HTTP/2 window).
    pub(crate) send: Duration,
}

/// Serves `app` as `serving` says with one single-threaded runtime per worker (one per core by
/// default), each accepting on its own `SO_REUSEPORT` socket, the way nginx runs one event loop
/// per worker: a request, its backend connection and their tasks stay on one thread, with no
/// cross-thread wake-ups. Returns the bound address and the worker threads, which stop when
/// `stopped` turns true, once their requests in flight have finished.
///
/// `app` must always be ready (as axum's `Router`, the `Gateway` and the client-key layer over
/// them are): it is called without `poll_ready`.
pub(crate) fn serve_per_core<S>(
    serving: &Serving,
    app: S,
    stopped: &watch::Receiver<bool>,
) -> Result<(SocketAddr, Vec<std::thread::JoinHandle<()>>), String>
where
    S: Service<Request<h2_limits::RequestBody>, Response = Response<Body>, Error = Infallible>,
    S: Service<Request<RequestBody>, Response = Response<Body>, Error = Infallible>,
    <S as Service<Request<h2_limits::RequestBody>>>::Future: Send + 'static,
    <S as Service<Request<RequestBody>>>::Future: Send + 'static,
    S: Clone + Send + 'static,
{
    let count = serving
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut addr = serving.listen;
    let timeouts = serving.timeouts;
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let app = app.clone();
        let stopped = stopped.clone();
        let worker = std::thread::Builder::new()
            .name(format!("gateway-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return drop(bound_tx.send(Err(e.to_string()))),
                };
                runtime.block_on(async move {
                    let listener = match reuseport_listener(addr) {
                        Ok(listener) => listener,
                        Err(e) => {
                            return drop(
                                bound_tx.send(Err(format!("cannot listen on {addr}: {e}"))),
                            );
                        }
                    };
                    let _ = bound_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                    accept_loop(listener, app, stopped, timeouts).await;
                });
            })
            .map_err(|e| e.to_string())?;
        addr = bound_rx.recv().map_err(|e| e.to_string())??;
        workers.push(worker);
    }
    Ok((addr, workers))
}

/// Accepts connections until `stopped`, then waits for every open connection to finish its
/// requests in flight. A connection gets the head timeout for its first bytes, and then for each
/// request head (HTTP/1.1) or for each time it has no stream open (HTTP/2).
async fn accept_loop<S>(
    listener: TcpListener,
    app: S,
    mut stopped: watch::Receiver<bool>,
    timeouts: Timeouts,
) where
    S: Service<Request<h2_limits::RequestBody>, Response = Response<Body>, Error = Infallible>,
    S: Service<Request<RequestBody>, Response = Response<Body>, Error = Infallible>,
    <S as Service<Request<h2_limits::RequestBody>>>::Future: Send + 'static,
    <S as Service<Request<RequestBody>>>::Future: Send + 'static,
    S: Clone + Send + 'static,
{
    let servers = Arc::new(Servers::new(timeouts));
    let shutdown = Arc::new(Shutdown::default());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, for example: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let app = app.clone();
        let servers = Arc::clone(&servers);
        let shutdown = Arc::clone(&shutdown);
        // A connection's errors (a reset, a malformed request) concern that caller only.
        tokio::spawn(async move {
            // The head timeout counts from here, the sniff's wait for the first bytes included.
            let accepted = Instant::now();
            let protocol = match tokio::time::timeout(timeouts.head, Protocol::sniff(&stream)).await
            {
                Ok(Ok(protocol)) => protocol,
                Ok(Err(_)) => return,
                Err(_) => return let_go(stream).await,
            };
            match protocol {
                Protocol::Http1 => {
                    let connection =
                        servers
                            .http1
                            .serve_connection_waited(stream, app, accepted.elapsed());
                    let _ = Watched::new(connection, &shutdown, |c| c.graceful_shutdown()).await;
                }
                Protocol::Http2 => {
                    let streams = Arc::new(Streams::default());
                    let service = PerConnection {
                        app: RefCell::new(app),
                        streams: Arc::clone(&streams),
                        body_timeout: timeouts.body,
                    };
                    let io = CountedIo::new(TokioIo::new(stream), Arc::clone(&streams));
                    let connection = servers.http2.serve_connection(io, service);
                    // Boxed: hyper's HTTP/2 connection is large, and inline it would make
                    // every connection's task as large, HTTP/1.1 ones too.
                    let connection = Box::pin(H2Limits::new(
                        connection,
                        streams,
                        timeouts.head,
                        timeouts.send,
                        accepted.elapsed(),
                    ));
                    Watched::new(connection, &shutdown, |c| {
                        c.get_mut().as_mut().graceful_shutdown()
                    })
                    .await;
                }
            }
        });
    }
    drop(listener);
    shutdown.start_and_wait().await;
}

/// The servers a connection is handed to, by protocol: HTTP/1.1 callers go to aoai-upstream's
/// lean server, HTTP/2 callers to hyper's.
struct Servers {
    http1: lean::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Servers {
    fn new(timeouts: Timeouts) -> Self {
        Self {
            http1: lean::Builder::new()
                .head_timeout(Some(timeouts.head))
                .body_timeout(Some(timeouts.body))
                .send_timeout(Some(timeouts.send)),
            http2: http2::Builder::new(TokioExecutor::new()),
        }
    }
}

/// The HTTP/2 connection preface a client opens with (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long [`Protocol::sniff`] waits before it looks again at a connection whose first bytes
/// are a beginning of the HTTP/2 preface (HTTP/2 clients send all of it at once).
const PREFACE_POLL: Duration = Duration::from_millis(10);

/// Which protocol a connection's caller speaks, told from its first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the caller opened with the preface.
    Http2,
}

impl Protocol {
    /// Peeks at the first bytes, leaving them to the server that reads the connection; first
    /// bytes that begin the preface without completing it are looked at again until they
    /// either complete it or stop matching it. Being sure here spares every read of a
    /// long-lived connection a wrapper replaying the bytes read to decide.
    async fn sniff(stream: &TcpStream) -> std::io::Result<Self> {
        let mut first = [0u8; HTTP2_PREFACE.len()];
        loop {
            match stream.peek(&mut first).await? {
                // Closed before a byte: HTTP/1.1's server reads the end and closes.
                0 => return Ok(Self::Http1),
                read if first[..read] != HTTP2_PREFACE[..read] => return Ok(Self::Http1),
                read if read == HTTP2_PREFACE.len() => return Ok(Self::Http2),
                // `peek` would find the same bytes at once: wait for more to arrive.
                _ => tokio::time::sleep(PREFACE_POLL).await,
            }
        }
    }
}

/// Closes a connection that has not told its protocol within the head timeout. The few bytes
/// it sent are read first: closing a socket with unread bytes would reset the connection.
async fn let_go(mut stream: TcpStream) {
    let mut sent = [0u8; HTTP2_PREFACE.len()];
    for _ in 0..4 {
        if !matches!(stream.try_read(&mut sent), Ok(read) if read > 0) {
            break;
        }
    }
    let _ = stream.shutdown().await;
}

/// One worker's graceful shutdown: its connections check a flag when they are polled, and are
/// woken once, when it turns. (hyper-util's `GracefulShutdown` polls a channel receiver, which
/// takes a lock, on every poll of every connection.)
#[derive(Default)]
struct Shutdown {
    started: AtomicBool,
    connections: Mutex<Connections>,
    /// Notified when the last connection closes after shutdown started.
    finished: Notify,
}

/// The open connections' wakers, by slot.
#[derive(Default)]
struct Connections {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    open: usize,
}

impl Shutdown {
    fn open(&self, waker: Waker) -> usize {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections.open += 1;
        match connections.free.pop() {
            Some(slot) => {
                connections.wakers[slot] = Some(waker);
                slot
            }
            None => {
                connections.wakers.push(Some(waker));
                connections.wakers.len() - 1
            }
        }
    }

    fn rewake(&self, slot: usize, waker: Waker) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections.wakers[slot] = Some(waker);
    }

    fn close(&self, slot: usize) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections.wakers[slot] = None;
        connections.free.push(slot);
        connections.open -= 1;
        if connections.open == 0 && self.started.load(Ordering::Acquire) {
            self.finished.notify_one();
        }
    }

    /// Tells every connection to finish, and waits until all have.
    async fn start_and_wait(&self) {
        self.started.store(true, Ordering::Release);
        let wakers: Vec<Waker> = {
            let mut connections = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if connections.open == 0 {
                return;
            }
            connections
                .wakers
                .iter_mut()
                .filter_map(Option::take)
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
        self.finished.notified().await;
    }
}

pin_project! {
    /// A connection that shuts down gracefully once its worker's [`Shutdown`] starts.
    struct Watched<C> {
        #[pin]
        connection: C,
        // Starts the connection's own graceful shutdown.
        start_shutdown: fn(Pin<&mut C>),
        shutdown: Arc<Shutdown>,
        // The slot and waker registered with `shutdown`, from the first poll on.
        registered: Option<(usize, Waker)>,
        shutting_down: bool,
    }

    impl<C> PinnedDrop for Watched<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((slot, _)) = this.registered.take() {
                this.shutdown.close(slot);
            }
        }
    }
}

impl<C> Watched<C> {
    fn new(connection: C, shutdown: &Arc<Shutdown>, start_shutdown: fn(Pin<&mut C>)) -> Self {
        Self {
            connection,
            start_shutdown,
            shutdown: Arc::clone(shutdown),
            registered: None,
            shutting_down: false,
        }
    }
}

impl<C: Future> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.registered {
            None => {
                let slot = this.shutdown.open(cx.waker().clone());
                *this.registered = Some((slot, cx.waker().clone()));
            }
            Some((slot, waker)) if !waker.will_wake(cx.waker()) => {
                *waker = cx.waker().clone();
                this.shutdown.rewake(*slot, cx.waker().clone());
            }
            Some(_) => {}
        }
        if !*this.shutting_down && this.shutdown.started.load(Ordering::Acquire) {
            *this.shutting_down = true;
            (this.start_shutdown)(this.connection.as_mut());
        }
        this.connection.poll(cx)
    }
}

/// One HTTP/2 connection's copy of the app. hyper calls a service by shared reference; the copy
/// sits in a `RefCell` and is called in place, instead of being cloned for every request as a
/// shared service would be. Each stream counts as open in `streams` until its answer has ended;
/// its request body gets `body_timeout` for each wait for more.
struct PerConnection<S> {
    app: RefCell<S>,
    streams: Arc<Streams>,
    body_timeout: Duration,
}

impl<S> hyper::service::Service<Request<Incoming>> for PerConnection<S>
where
    S: Service<Request<h2_limits::RequestBody>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<OpenBody<Body>>;
    type Error = Infallible;
    type Future = OpenFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let stream = self.streams.open();
        let request = request.map(|body| lean::TimedBody::new(body, self.body_timeout));
        OpenFuture::new(self.app.borrow_mut().call(request), stream)
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
