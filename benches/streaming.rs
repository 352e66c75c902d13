//! Streaming through the gateway example, as a separate process: how late each SSE chunk
//! arrives compared with reading the backend directly, and how much memory the gateway needs
//! per concurrent idle stream.
//!
//! ```text
//! cargo build --release --example gateway   # built by the bench when missing
//! cargo bench --bench streaming
//! ```
//!
//! 1. **Chunk latency.** A tiny SSE backend in this process emits `data: {"seq":N}\n\n` every
//!    2 ms; it records when it hands each chunk to hyper, and the client (also in this process)
//!    subtracts that instant from the one at which the chunk reaches it. Streams are read
//!    directly (client → backend) and through the gateway (client → gateway → backend), over
//!    HTTP/1.1 and over HTTP/2 prior knowledge (h2c), alternating so that both see the same
//!    machine. The backend and the client set `TCP_NODELAY`.
//! 2. **Idle streams.** SSE streams held open at once through the gateway, gateway → backend
//!    over HTTP/1.1 (one connection per stream), measured twice: client → gateway over h2c
//!    (10,000 streams, 150 per connection), then over HTTP/1.1 as most OpenAI SDKs call (9,000
//!    streams, one connection each, opened 200 at a time). The gateway holds a socket per
//!    backend stream and one per client connection, 18,000 in all over HTTP/1.1; to keep each
//!    process under the 20,000 file-descriptor limit (checked before each measurement) the
//!    backend runs in another process (this binary, re-executed with `AOAI_STREAM_BACKEND=1`);
//!    each of its streams sends one event and then stays silent. Each measurement starts a
//!    gateway and a backend of its own, and reads the gateway's `VmRSS` from `/proc` after a
//!    warm-up with no stream open, then with every stream open and past its first event.
//!
//! Every child process is killed when the bench ends, also on a panic; every wait has a
//! timeout. Ends with markdown tables of the figures and the machine.
//!
//! `AOAI_STREAM_GATEWAY=PATH` measures another gateway binary (another build or branch) instead
//! of `target/release/examples/gateway`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{MissedTickBehavior, timeout};

#[path = "support/process.rs"]
mod process;

use process::{
    ChildGuard, gateway_binary, load_average, machine, open_fds, proc_kib, proc_status_kib,
    spawn_gateway,
};

/// Set in the environment of the re-executed bench binary that serves the idle streams.
const BACKEND_ENV: &str = "AOAI_STREAM_BACKEND";
/// A gateway binary to measure instead of `target/release/examples/gateway`.
const GATEWAY_ENV: &str = "AOAI_STREAM_GATEWAY";
/// Chunks per measured stream.
const CHUNKS: usize = 500;
/// Time between two chunks of a stream.
const CHUNK_INTERVAL: Duration = Duration::from_millis(2);
/// Measured streams per route, the routes taking turns.
const ROUNDS: usize = 4;
/// Chunks of the unmeasured stream each path starts with.
const WARMUP_CHUNKS: usize = 50;
/// Idle streams held open at once over h2c.
const IDLE_H2C_STREAMS: usize = 10_000;
/// Idle streams per h2c connection (hyper's server allows 200 by default).
const STREAMS_PER_CONNECTION: usize = 150;
/// Idle streams held open at once over HTTP/1.1, one client connection each: two sockets per
/// stream in the gateway.
const IDLE_HTTP1_STREAMS: usize = 9_000;
/// File descriptors a process needs besides the sockets of its idle streams.
const SPARE_FDS: usize = 500;
/// Idle streams being opened at once.
const OPENING_CONCURRENCY: usize = 200;
/// Idle streams opened and closed before the baseline RSS is read. The first streams measured
/// may reuse what these freed, so the growth may be under-counted by this many streams' worth
/// (about 1 %).
const WARMUP_STREAMS: usize = 100;
/// Pause before each RSS reading, for the gateway to settle.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for any one step: a chunk, a connection, a process to start.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for all the idle streams to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest whole run, the build of a missing gateway aside.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest build of a missing gateway binary.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// The Azure OpenAI path every stream is requested on.
const PATH: &str = "/openai/deployments/bench/chat/completions?api-version=2024-10-21";
/// The request body every stream is requested with.
const REQUEST_BODY: &[u8] = br#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

type Error = String;

fn main() {
    if std::env::var_os(BACKEND_ENV).is_some() {
        idle_backend_main();
        return;
    }
    let gateway =
        gateway_binary("streaming", GATEWAY_ENV, BUILD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async { timeout(RUN_TIMEOUT, run(&gateway)).await });
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("streaming bench failed: {e}"),
        Err(_) => panic!("streaming bench did not finish within {RUN_TIMEOUT:?}"),
    }
}

async fn run(gateway: &Path) -> Result<(), Error> {
    let load_at_start = load_average();
    println!("streaming bench: gateway binary {}", gateway.display());
    let latency = measure_latency(gateway).await?;
    let idle = [
        measure_idle_streams(gateway, Proto::H2c, IDLE_H2C_STREAMS).await?,
        measure_idle_streams(gateway, Proto::Http1, IDLE_HTTP1_STREAMS).await?,
    ];
    print_report(&load_at_start, &latency, &idle);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// Re-executes this binary as the idle-stream backend and reads the port it listens on.
fn spawn_idle_backend() -> Result<(ChildGuard, SocketAddr), Error> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    let child = Command::new(exe)
        .env(BACKEND_ENV, "1")
        // The backend exits when this pipe closes, should this process die without unwinding.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the backend process: {e}"))?;
    let mut backend = ChildGuard::new("backend", child);
    let stdout = backend.child.stdout.take().ok_or("no backend stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(STEP_TIMEOUT)
        .map_err(|_| format!("the backend printed no port within {STEP_TIMEOUT:?}"))?;
    let port: u16 = line
        .trim()
        .parse()
        .map_err(|_| format!("the backend printed {line:?}, not a port"))?;
    Ok((backend, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// A loopback listener with a backlog deep enough for thousands of connections in a burst.
fn listen_loopback() -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(4096)
}

/// Serves `app` on `listener`, with `TCP_NODELAY` on every accepted connection.
async fn serve_nodelay(listener: TcpListener, app: Router) {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let _ = axum::serve(listener, app).await;
}

fn sse_response(body: Body) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("a valid response")
}

// ---------------------------------------------------------------------------------------------
// The idle-stream backend (child process).

/// `main` of the re-executed binary: serves idle SSE streams until killed or until its stdin
/// closes.
fn idle_backend_main() {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let listener = listen_loopback().expect("a loopback listener");
        let port = listener.local_addr().expect("a local address").port();
        println!("{port}");
        serve_nodelay(listener, Router::new().fallback(idle_sse)).await;
    });
}

/// One event at once, then silence for ever.
async fn idle_sse() -> Response<Body> {
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Bytes::from_static(b"data: {\"seq\":0}\n\n"))
    });
    sse_response(Body::from_stream(
        first.chain(futures_util::stream::pending()),
    ))
}

// ---------------------------------------------------------------------------------------------
// Chunk latency.

/// When each chunk of a stream was handed to hyper, by sequence number.
type Emitted = Arc<[OnceLock<Instant>]>;

/// The emission tables of the streams in progress, by run id (`run=` in the query).
#[derive(Clone, Default)]
struct Emissions(Arc<Mutex<HashMap<u64, Emitted>>>);

impl Emissions {
    fn start(&self, run: u64, chunks: usize) -> Emitted {
        let table: Emitted = (0..chunks).map(|_| OnceLock::new()).collect();
        self.lock().insert(run, table.clone());
        table
    }

    fn get(&self, run: u64) -> Option<Emitted> {
        self.lock().get(&run).cloned()
    }

    fn end(&self, run: u64) {
        self.lock().remove(&run);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Emitted>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream of `data: {"seq":N}` chunks, one every [`CHUNK_INTERVAL`], as many as the run's
/// table holds; each chunk's emission instant is recorded just before hyper gets it.
async fn timed_sse(State(emissions): State<Emissions>, uri: Uri) -> Response<Body> {
    let run = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("run="))
        .and_then(|run| run.parse().ok());
    let Some(table) = run.and_then(|run| emissions.get(run)) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("unknown run"))
            .expect("a valid response");
    };
    // The first chunk one interval after the headers, so that it does not race them.
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + CHUNK_INTERVAL, CHUNK_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let chunks = futures_util::stream::unfold((ticks, 0), move |(mut ticks, seq)| {
        let table = table.clone();
        async move {
            if seq == table.len() {
                return None;
            }
            ticks.tick().await;
            let chunk = Bytes::from(format!("data: {{\"seq\":{seq}}}\n\n"));
            let _ = table[seq].set(Instant::now());
            Some((Ok::<_, Infallible>(chunk), (ticks, seq + 1)))
        }
    });
    sse_response(Body::from_stream(chunks))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    H2c,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::H2c => "h2c",
        }
    }

    /// Idle streams per client connection: h2c multiplexes them, HTTP/1.1 carries one at a time.
    fn streams_per_connection(self) -> usize {
        match self {
            Proto::Http1 => 1,
            Proto::H2c => STREAMS_PER_CONNECTION,
        }
    }
}

/// A client connection: its request sender, and its connection task, aborted on drop.
struct Connection {
    sender: Sender,
    driver: AbortOnDrop,
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    H2c(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Waits until the connection can take a request.
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::Http1(s) => s.ready().await,
            Sender::H2c(s) => s.ready().await,
        }
    }

    async fn send_request(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Sender::Http1(s) => s.send_request(request).await,
            Sender::H2c(s) => s.send_request(request).await,
        }
    }

    /// Another sender on the same connection, if its protocol multiplexes streams (h2c).
    fn share(&self) -> Option<Sender> {
        match self {
            Sender::Http1(_) => None,
            Sender::H2c(s) => Some(Sender::H2c(s.clone())),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>, Error> {
    let tcp = timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    Ok(TokioIo::new(tcp))
}

async fn handshake(addr: SocketAddr, proto: Proto) -> Result<Connection, Error> {
    let io = connect(addr).await?;
    let handshake = async {
        match proto {
            Proto::Http1 => {
                let (sender, connection) = http1::handshake(io).await?;
                let task = AbortOnDrop(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                Ok(Connection {
                    sender: Sender::Http1(sender),
                    driver: task,
                })
            }
            Proto::H2c => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
                let task = AbortOnDrop(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                Ok(Connection {
                    sender: Sender::H2c(sender),
                    driver: task,
                })
            }
        }
    };
    timeout(STEP_TIMEOUT, handshake)
        .await
        .map_err(|_| format!("the {} handshake with {addr} timed out", proto.label()))?
        .map_err(|e: hyper::Error| {
            format!("the {} handshake with {addr} failed: {e}", proto.label())
        })
}

/// A streaming request for `path_and_query`: origin-form for HTTP/1.1, absolute for HTTP/2.
fn sse_request(addr: SocketAddr, path_and_query: &str, proto: Proto) -> Request<Full<Bytes>> {
    let builder = match proto {
        Proto::Http1 => Request::post(path_and_query).header(header::HOST, addr.to_string()),
        Proto::H2c => Request::post(format!("http://{addr}{path_and_query}")),
    };
    builder
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::from_static(REQUEST_BODY)))
        .expect("a valid request")
}

/// Checks a streaming response's status; its body as the error otherwise.
async fn expect_ok(response: Response<Incoming>) -> Result<Incoming, Error> {
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response.into_body());
    }
    let body = timeout(STEP_TIMEOUT, response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Err(format!("status {status}: {body}"))
}

/// Opens a stream on a new connection to `addr`.
async fn open_stream(
    addr: SocketAddr,
    proto: Proto,
    path_and_query: &str,
) -> Result<(Incoming, Connection), Error> {
    let mut connection = handshake(addr, proto).await?;
    let request = sse_request(addr, path_and_query, proto);
    let response = timeout(STEP_TIMEOUT, connection.sender.send_request(request))
        .await
        .map_err(|_| format!("no response headers from {addr} within {STEP_TIMEOUT:?}"))?
        .map_err(|e| format!("request to {addr} failed: {e}"))?;
    Ok((expect_ok(response).await?, connection))
}

/// Reads one timed stream of `chunks` chunks and returns each chunk's latency.
async fn timed_stream(
    emissions: &Emissions,
    run: u64,
    addr: SocketAddr,
    proto: Proto,
    chunks: usize,
) -> Result<Vec<Duration>, Error> {
    let table = emissions.start(run, chunks);
    let result = read_timed_stream(&table, run, addr, proto).await;
    emissions.end(run);
    result
}

async fn read_timed_stream(
    table: &Emitted,
    run: u64,
    addr: SocketAddr,
    proto: Proto,
) -> Result<Vec<Duration>, Error> {
    let (mut body, _connection) = open_stream(addr, proto, &format!("{PATH}&run={run}")).await?;
    let mut latencies = Vec::with_capacity(table.len());
    let mut pending: Vec<u8> = Vec::new();
    while latencies.len() < table.len() {
        let frame = timeout(STEP_TIMEOUT, body.frame())
            .await
            .map_err(|_| format!("no chunk within {STEP_TIMEOUT:?}"))?;
        let received = Instant::now();
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) => return Err(format!("the stream failed: {e}")),
            None => {
                return Err(format!(
                    "the stream ended after {} of {} chunks",
                    latencies.len(),
                    table.len()
                ));
            }
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let seq = parse_seq(&event)
                .ok_or_else(|| format!("unexpected event {:?}", String::from_utf8_lossy(&event)))?;
            let emitted = table
                .get(seq)
                .and_then(OnceLock::get)
                .ok_or_else(|| format!("chunk {seq} received but never emitted"))?;
            latencies.push(received.saturating_duration_since(*emitted));
        }
    }
    Ok(latencies)
}

/// `N` from `data: {"seq":N}\n\n`.
fn parse_seq(event: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(event).ok()?;
    let rest = text.trim().strip_prefix("data: {\"seq\":")?;
    rest.strip_suffix('}')?.parse().ok()
}

/// One way of reaching the backend.
#[derive(Clone, Copy)]
struct Route {
    via_gateway: bool,
    proto: Proto,
}

impl Route {
    fn label(self) -> String {
        let via = if self.via_gateway {
            "gateway"
        } else {
            "direct"
        };
        format!("{via}, {}", self.proto.label())
    }
}

struct LatencyRow {
    route: Route,
    sorted: Vec<Duration>,
    /// The latest first chunk of any measured stream: what a stall at a stream's start (Nagle's
    /// algorithm holding the first chunk behind the headers, say) costs.
    worst_first: Duration,
}

impl LatencyRow {
    fn median(&self) -> Duration {
        percentile(&self.sorted, 50.0)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn measure_latency(gateway_binary: &Path) -> Result<Vec<LatencyRow>, Error> {
    let emissions = Emissions::default();
    let listener = listen_loopback().map_err(|e| format!("cannot listen: {e}"))?;
    let backend = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .fallback(timed_sse)
        .with_state(emissions.clone());
    let server = AbortOnDrop(tokio::spawn(serve_nodelay(listener, app)));
    let (mut gateway, gateway_addr) = spawn_gateway(gateway_binary, backend).await?;
    println!(
        "chunk latency: {CHUNKS} chunks every {CHUNK_INTERVAL:?}, {ROUNDS} streams per route \
         (backend {backend}, gateway {gateway_addr}, pid {})",
        gateway.pid()
    );

    let routes = [
        Route {
            via_gateway: false,
            proto: Proto::Http1,
        },
        Route {
            via_gateway: true,
            proto: Proto::Http1,
        },
        Route {
            via_gateway: false,
            proto: Proto::H2c,
        },
        Route {
            via_gateway: true,
            proto: Proto::H2c,
        },
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); routes.len()];
    let mut worst_first = vec![Duration::ZERO; routes.len()];
    let mut run = 0;
    for round in 0..=ROUNDS {
        for ((route, samples), worst_first) in routes.iter().zip(&mut samples).zip(&mut worst_first)
        {
            run += 1;
            let addr = if route.via_gateway {
                gateway_addr
            } else {
                backend
            };
            // Round 0 warms every route up and is not counted.
            let chunks = if round == 0 { WARMUP_CHUNKS } else { CHUNKS };
            let latencies = timed_stream(&emissions, run, addr, route.proto, chunks)
                .await
                .map_err(|e| format!("{}: {e}", route.label()))?;
            if round > 0 {
                // Chunks arrive in order: the first latency is the first chunk's.
                *worst_first = (*worst_first).max(latencies[0]);
                samples.extend(latencies);
            }
        }
    }
    gateway.check_alive()?;
    drop(gateway);
    drop(server);
    Ok(routes
        .into_iter()
        .zip(samples)
        .zip(worst_first)
        .map(|((route, mut sorted), worst_first)| {
            sorted.sort_unstable();
            LatencyRow {
                route,
                sorted,
                worst_first,
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Idle streams.

struct IdleReport {
    /// How the client reaches the gateway.
    proto: Proto,
    streams: usize,
    connections: usize,
    open_time: Duration,
    rss_base_kib: u64,
    rss_held_kib: u64,
    hwm_kib: u64,
    huge_kib: Option<u64>,
    gateway_fds: usize,
    still_open: usize,
    backend_base_kib: u64,
    backend_held_kib: u64,
}

impl IdleReport {
    fn growth_kib(&self) -> u64 {
        self.rss_held_kib.saturating_sub(self.rss_base_kib)
    }

    fn per_stream_kib(&self) -> f64 {
        self.growth_kib() as f64 / self.streams as f64
    }

    fn backend_per_stream_kib(&self) -> f64 {
        self.backend_held_kib.saturating_sub(self.backend_base_kib) as f64 / self.streams as f64
    }
}

/// The soft limit on open files of this process, which the gateway and the backend inherit;
/// `None` when unlimited or unknown.
fn fd_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// An idle stream, with what keeps its connection open.
struct IdleStream {
    body: Incoming,
    _sender: Sender,
    /// The task of the stream's own connection; `None` on a shared connection.
    _driver: Option<AbortOnDrop>,
}

/// Opens `count` streams to `addr` and returns them once each has delivered its first event,
/// at most [`OPENING_CONCURRENCY`] opening at once: spread over the `shared` connections, or,
/// when there are none, each on a new `proto` connection of its own.
async fn open_idle_streams(
    addr: SocketAddr,
    proto: Proto,
    shared: &[Connection],
    count: usize,
) -> Result<Vec<IdleStream>, Error> {
    let permits = Arc::new(Semaphore::new(OPENING_CONCURRENCY));
    let mut shared = shared.iter().cycle();
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let shared = shared
            .next()
            .and_then(|connection| connection.sender.share());
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let (mut sender, driver) = match shared {
                Some(sender) => (sender, None),
                None => {
                    let Connection { sender, driver } = handshake(addr, proto).await?;
                    (sender, Some(driver))
                }
            };
            sender
                .ready()
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            let response = sender
                .send_request(sse_request(addr, PATH, proto))
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let mut body = expect_ok(response).await?;
            match body.frame().await {
                Some(Ok(frame)) if frame.is_data() => Ok(IdleStream {
                    body,
                    _sender: sender,
                    _driver: driver,
                }),
                Some(Err(e)) => Err(format!("the stream failed: {e}")),
                _ => Err("the stream ended before its first event".to_owned()),
            }
        });
    }
    let mut streams = Vec::with_capacity(count);
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            streams.push(joined.map_err(|e| e.to_string())??);
        }
        Ok::<_, Error>(())
    };
    timeout(OPEN_TIMEOUT, collect).await.map_err(|_| {
        format!(
            "{} of {count} streams opened within {OPEN_TIMEOUT:?}",
            streams.len()
        )
    })??;
    Ok(streams)
}

/// Holds `count` idle streams open through a gateway of its own, the client reaching it over
/// `proto`, and reads what they cost.
async fn measure_idle_streams(
    gateway_binary: &Path,
    proto: Proto,
    count: usize,
) -> Result<IdleReport, Error> {
    let connections = count.div_ceil(proto.streams_per_connection());
    // The gateway holds the most: a socket per client connection and one per backend stream.
    let fds_needed = connections + count + SPARE_FDS;
    if let Some(limit) = fd_limit().filter(|&limit| limit < fds_needed) {
        return Err(format!(
            "{count} idle {} streams need about {fds_needed} file descriptors in the gateway, \
             over the limit of {limit} (ulimit -n)",
            proto.label()
        ));
    }
    let (mut backend, backend_addr) = spawn_idle_backend()?;
    let (mut gateway, gateway_addr) = spawn_gateway(gateway_binary, backend_addr).await?;
    let pid = gateway.pid();
    println!(
        "idle streams: {count} over {connections} {} connections (backend pid {}, gateway pid \
         {pid})",
        proto.label(),
        backend.pid()
    );
    // Connections that carry many streams are opened up front; one that carries a single stream
    // is opened with it.
    let mut shared = Vec::new();
    if proto.streams_per_connection() > 1 {
        for _ in 0..connections {
            shared.push(handshake(gateway_addr, proto).await?);
        }
    }

    // Warm-up: the gateway serves a few streams and closes them again.
    drop(open_idle_streams(gateway_addr, proto, &shared, WARMUP_STREAMS).await?);
    tokio::time::sleep(SETTLE).await;
    gateway.check_alive()?;
    let rss_base_kib = proc_status_kib(pid, "VmRSS")?;
    let backend_base_kib = proc_status_kib(backend.pid(), "VmRSS")?;

    let started = Instant::now();
    let mut streams = open_idle_streams(gateway_addr, proto, &shared, count).await?;
    let open_time = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    gateway.check_alive()?;
    backend.check_alive()?;
    let rss_held_kib = proc_status_kib(pid, "VmRSS")?;
    let hwm_kib = proc_status_kib(pid, "VmHWM")?;
    // Transparent huge pages make a single touched byte cost 2 MiB of RSS.
    let huge_kib = proc_kib(pid, "smaps_rollup", "AnonHugePages").ok();
    let gateway_fds = open_fds(pid);
    let backend_held_kib = proc_status_kib(backend.pid(), "VmRSS")?;
    // An idle stream has nothing to deliver: a frame, an end or an error means it was lost.
    let still_open = streams
        .iter_mut()
        .map(|stream| stream.body.frame().now_or_never().is_none())
        .filter(|&open| open)
        .count();

    drop(streams);
    drop(shared);
    drop(gateway);
    drop(backend);
    Ok(IdleReport {
        proto,
        streams: count,
        connections,
        open_time,
        rss_base_kib,
        rss_held_kib,
        hwm_kib,
        huge_kib,
        gateway_fds,
        still_open,
        backend_base_kib,
        backend_held_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn signed_micros(later: Duration, earlier: Duration) -> String {
    let diff = later.as_secs_f64() - earlier.as_secs_f64();
    format!("{:+.1} µs", diff * 1e6)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

fn print_report(load_at_start: &str, latency: &[LatencyRow], idle: &[IdleReport]) {
    println!();
    println!("## Streaming through the gateway");
    println!();
    println!(
        "Machine: {}; 1-minute load average {load_at_start} at start, {} at end.",
        machine(),
        load_average()
    );
    println!();
    println!("Chunk latency, emission by the backend to reception by the client:");
    println!();
    println!("| route | chunks | median | p90 | p99 | max | first chunk, worst | added median |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut worst_added = Duration::ZERO;
    for row in latency {
        let direct = latency
            .iter()
            .find(|r| !r.route.via_gateway && r.route.proto == row.route.proto);
        let added = match direct {
            Some(direct) if row.route.via_gateway => {
                worst_added = worst_added.max(row.median().saturating_sub(direct.median()));
                signed_micros(row.median(), direct.median())
            }
            _ => "-".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {added} |",
            row.route.label(),
            row.sorted.len(),
            micros(row.median()),
            micros(percentile(&row.sorted, 90.0)),
            micros(percentile(&row.sorted, 99.0)),
            micros(row.sorted.last().copied().unwrap_or_default()),
            micros(row.worst_first),
        );
    }
    for idle in idle {
        print_idle_table(idle);
    }
    println!();
    println!("| target | figure | |");
    println!("| --- | ---: | --- |");
    println!(
        "| added median latency under 1 ms | {} | {} |",
        micros(worst_added),
        verdict(worst_added < Duration::from_millis(1))
    );
    // Idle streams have no target of their own since the gateway serves callers with hyper: a
    // bare hyper server's idle connection (the backend's row of each table) sets the scale.
}

fn print_idle_table(idle: &IdleReport) {
    println!();
    println!(
        "| {} idle {} streams through the gateway | value |",
        idle.streams,
        idle.proto.label()
    );
    println!("| --- | ---: |");
    let rows: [(&str, String); 11] = [
        (
            &format!("{} connections, client → gateway", idle.proto.label()),
            idle.connections.to_string(),
        ),
        (
            "time to open them all",
            format!("{:.2} s", idle.open_time.as_secs_f64()),
        ),
        ("still open at the reading", idle.still_open.to_string()),
        (
            "gateway VmRSS, warmed up, 0 streams",
            format!("{} KiB", idle.rss_base_kib),
        ),
        (
            "gateway VmRSS, all streams open",
            format!("{} KiB", idle.rss_held_kib),
        ),
        ("gateway RSS growth", format!("{} KiB", idle.growth_kib())),
        (
            "**gateway RSS growth per stream**",
            format!("**{:.2} KiB**", idle.per_stream_kib()),
        ),
        ("gateway VmHWM", format!("{} KiB", idle.hwm_kib)),
        (
            "of the RSS, transparent huge pages (AnonHugePages)",
            idle.huge_kib
                .map_or_else(|| "unknown".to_owned(), |kib| format!("{kib} KiB")),
        ),
        (
            "gateway open fds, all streams open",
            idle.gateway_fds.to_string(),
        ),
        (
            "for scale: backend (bare hyper HTTP/1.1 server) RSS growth per stream",
            format!("{:.2} KiB", idle.backend_per_stream_kib()),
        ),
    ];
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
}
