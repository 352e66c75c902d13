//! Realtime (WebSocket) sessions through the gateway: how many 1 KiB frames a second pass
//! through its relay compared with a direct connection, and how much memory the gateway needs
//! per idle session.
//!
//! ```text
//! cargo build --release --example gateway   # built by the bench when missing
//! cargo bench --bench realtime
//! ```
//!
//! 1. **Frames per second.** An echo instance (tokio-tungstenite) in this process; a client,
//!    in this process too, sends binary frames as fast as they go (a writer task, pipelined)
//!    while it reads the echoes, and times the first send to the last echo: 50,000 frames of
//!    1 KiB, and 5,000 of 32 KiB ([`LOADS`]).
//!    Directly (client → instance) and through a [`Gateway`] served in this process on
//!    loopback (client → gateway → instance: each frame crosses the relay twice, there and
//!    back), alternating, [`ROUNDS`] times each; the best round of each is reported, and their
//!    ratio. Everything shares this machine's cores, so the figure includes the relay's CPU
//!    time, not only its latency.
//! 2. **Idle sessions.** The gateway example (`target/release/examples/gateway`, a process of
//!    its own) in front of the echo instance of this process; [`SESSIONS`] sessions opened
//!    through it, each sending one 1 KiB frame and reading its echo, then silent. The gateway's
//!    `VmRSS` (from `/proc`) after a warm-up with no session open, then with every session
//!    open, divided by the sessions.
//!
//! Every child process is killed when the bench ends, also on a panic; every wait has a
//! timeout. Ends with markdown tables of the figures and the machine.
//!
//! `AOAI_REALTIME_GATEWAY=PATH` measures another gateway binary instead of
//! `target/release/examples/gateway`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use aoai_tower::Gateway;
use axum::Router;
use axum::serve::ListenerExt;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "support/process.rs"]
mod process;

use process::{gateway_binary, load_average, machine, open_fds, proc_status_kib, spawn_gateway};

/// Frames per timed round, and their size: small ones (the relay's cost per message), and
/// frames the size of a Realtime audio event (base64 audio in JSON: 32 KiB is about 680 ms of
/// pcm16 at 24 kHz).
const LOADS: [(usize, usize); 2] = [(50_000, 1024), (5_000, 32 * 1024)];
/// The frame each idle session sends once.
const FRAME_BYTES: usize = 1024;
/// Timed rounds per route (after one untimed warm-up round each).
const ROUNDS: usize = 5;
/// Idle sessions held open at once through the gateway process.
const SESSIONS: usize = 2_000;
/// Sessions opened and closed before the baseline is read, so that the gateway's runtime and
/// allocator have grown to their working size.
const WARMUP_SESSIONS: usize = 100;
/// Sessions opening at once.
const OPENING_CONCURRENCY: usize = 100;
/// Time for the gateway to settle before each reading.
const SETTLE: Duration = Duration::from_secs(1);
/// The longest wait for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the whole bench may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest build of a missing gateway binary.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// A gateway binary to measure instead of `target/release/examples/gateway`.
const GATEWAY_ENV: &str = "AOAI_REALTIME_GATEWAY";
const PATH: &str = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime";

type Error = String;
type Session = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn main() {
    let gateway =
        gateway_binary("realtime", GATEWAY_ENV, BUILD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async { timeout(RUN_TIMEOUT, run(&gateway)).await });
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("realtime bench failed: {e}"),
        Err(_) => panic!("realtime bench did not finish within {RUN_TIMEOUT:?}"),
    }
}

async fn run(gateway: &Path) -> Result<(), Error> {
    let load_at_start = load_average();
    println!("realtime bench: gateway binary {}", gateway.display());
    let instance = echo_instance().await?;
    let throughput = measure_frames_per_second(instance).await?;
    let idle = measure_idle_sessions(gateway, instance).await?;
    print_report(&load_at_start, &throughput, &idle);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The instance and the in-process gateway.

/// A WebSocket instance that echoes every data frame, on loopback; returns its address.
async fn echo_instance() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(session) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (sink, stream) = session.split();
                // `forward` flushes whenever no echo is ready: pipelined frames are written
                // together.
                let data = stream.filter(|message| {
                    std::future::ready(message.as_ref().is_ok_and(|m| m.is_binary() || m.is_text()))
                });
                let _ = data.forward(sink).await;
            });
        }
    });
    Ok(addr)
}

/// A gateway in front of `instance`, served in this process; returns its address.
async fn in_process_gateway(instance: SocketAddr) -> Result<SocketAddr, Error> {
    let gateway = Gateway::builder()
        .backend("bench", format!("http://{instance}"))
        .build()
        .map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
    let app = Router::new().nest_service("/openai", gateway);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn connect(addr: SocketAddr) -> Result<Session, Error> {
    let url = format!("ws://{addr}{PATH}");
    let (session, response) = timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| format!("no handshake with {addr} within {STEP_TIMEOUT:?}"))?
        .map_err(|e| format!("handshake with {addr} failed: {e}"))?;
    if response.status() != 101 {
        return Err(format!("{addr} answered {}", response.status()));
    }
    Ok(session)
}

// ---------------------------------------------------------------------------------------------
// 1. Frames per second.

/// One route's rounds at one load.
struct Throughput {
    label: &'static str,
    frames: usize,
    frame_bytes: usize,
    rounds: Vec<Duration>,
}

impl Throughput {
    fn best(&self) -> Duration {
        self.rounds.iter().copied().min().unwrap_or(Duration::MAX)
    }

    fn frames_per_second(&self) -> f64 {
        self.frames as f64 / self.best().as_secs_f64()
    }
}

/// Sends `frames` frames of `frame_bytes` over one new session to `addr` while reading the
/// echoes; the time from the first send to the last echo.
async fn round(addr: SocketAddr, frames: usize, frame_bytes: usize) -> Result<Duration, Error> {
    let session = connect(addr).await?;
    let (mut sink, mut stream) = session.split();
    let payload = Bytes::from(vec![0x5a; frame_bytes]);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..frames {
            sink.feed(Message::Binary(payload.clone())).await?;
        }
        sink.flush().await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>(sink)
    });
    for n in 0..frames {
        match timeout(STEP_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(Message::Binary(echo)))) if echo.len() == frame_bytes => {}
            Ok(other) => return Err(format!("echo {n}: {other:?}")),
            Err(_) => return Err(format!("echo {n} did not come within {STEP_TIMEOUT:?}")),
        }
    }
    let elapsed = started.elapsed();
    let mut sink = writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let _ = sink.close().await;
    Ok(elapsed)
}

async fn measure_frames_per_second(instance: SocketAddr) -> Result<Vec<Throughput>, Error> {
    let gateway = in_process_gateway(instance).await?;
    let routes = [
        ("direct (client → instance)", instance),
        ("through the gateway", gateway),
    ];
    let mut results = Vec::new();
    for (frames, frame_bytes) in LOADS {
        let mut load: Vec<Throughput> = routes
            .iter()
            .map(|&(label, _)| Throughput {
                label,
                frames,
                frame_bytes,
                rounds: Vec::new(),
            })
            .collect();
        for (_, addr) in routes {
            round(addr, frames, frame_bytes)
                .await
                .map_err(|e| format!("warm-up: {e}"))?;
        }
        for _ in 0..ROUNDS {
            for (result, (_, addr)) in load.iter_mut().zip(routes) {
                result.rounds.push(round(addr, frames, frame_bytes).await?);
            }
        }
        results.extend(load);
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// 2. Idle sessions.

/// Opens `count` sessions through `addr`, [`OPENING_CONCURRENCY`] at a time; each sends one
/// frame and reads its echo before it is returned.
async fn open_sessions(addr: SocketAddr, count: usize) -> Result<Vec<Session>, Error> {
    let mut sessions = Vec::with_capacity(count);
    while sessions.len() < count {
        let batch = OPENING_CONCURRENCY.min(count - sessions.len());
        let opened = futures_util::future::join_all((0..batch).map(|_| async move {
            let mut session = connect(addr).await?;
            let frame = Message::Binary(Bytes::from(vec![0x5a; FRAME_BYTES]));
            session.send(frame).await.map_err(|e| e.to_string())?;
            match timeout(STEP_TIMEOUT, session.next()).await {
                Ok(Some(Ok(Message::Binary(_)))) => Ok(session),
                other => Err(format!("no echo: {other:?}")),
            }
        }))
        .await;
        for session in opened {
            sessions.push(session?);
        }
    }
    Ok(sessions)
}

struct IdleReport {
    sessions: usize,
    base_kib: u64,
    held_kib: u64,
    held_fds: usize,
}

impl IdleReport {
    fn kib_per_session(&self) -> f64 {
        self.held_kib.saturating_sub(self.base_kib) as f64 / self.sessions as f64
    }
}

async fn measure_idle_sessions(binary: &Path, instance: SocketAddr) -> Result<IdleReport, Error> {
    let (mut gateway, addr) = spawn_gateway(binary, instance).await?;
    let pid = gateway.pid();
    // Warm-up: sessions opened and closed, then a pause.
    let warmup = open_sessions(addr, WARMUP_SESSIONS).await?;
    for mut session in warmup {
        let _ = session.close(None).await;
        while let Ok(Some(Ok(_))) = timeout(STEP_TIMEOUT, session.next()).await {}
    }
    tokio::time::sleep(SETTLE).await;
    gateway.check_alive()?;
    let base_kib = proc_status_kib(pid, "VmRSS")?;
    let sessions = open_sessions(addr, SESSIONS).await?;
    tokio::time::sleep(SETTLE).await;
    gateway.check_alive()?;
    let held_kib = proc_status_kib(pid, "VmRSS")?;
    let held_fds = open_fds(pid);
    drop(sessions);
    Ok(IdleReport {
        sessions: SESSIONS,
        base_kib,
        held_kib,
        held_fds,
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

fn print_report(load_at_start: &str, throughput: &[Throughput], idle: &IdleReport) {
    println!();
    println!("## Realtime sessions through the gateway");
    println!();
    println!("Binary frames, pipelined, echoed; best of {ROUNDS} rounds:");
    println!();
    println!(
        "| Frames | Route | Frames/s (round trips) | MiB/s each way | Best round | All rounds |"
    );
    println!("|---|---|---|---|---|---|");
    for result in throughput {
        let rounds: Vec<String> = result
            .rounds
            .iter()
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
            .collect();
        println!(
            "| {} × {} KiB | {} | {:.0} | {:.0} | {:.0} ms | {} |",
            result.frames,
            result.frame_bytes / 1024,
            result.label,
            result.frames_per_second(),
            result.frames_per_second() * result.frame_bytes as f64 / (1 << 20) as f64,
            result.best().as_secs_f64() * 1e3,
            rounds.join(", ")
        );
    }
    println!();
    for pair in throughput.chunks(2) {
        println!(
            "{} KiB frames through the gateway: {:.2} of the direct rate.",
            pair[0].frame_bytes / 1024,
            pair[1].frames_per_second() / pair[0].frames_per_second()
        );
    }
    println!();
    println!(
        "| Idle sessions (gateway example process) | VmRSS before | VmRSS open | Per session | Open fds |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {} |",
        idle.sessions,
        idle.base_kib as f64 / 1024.0,
        idle.held_kib as f64 / 1024.0,
        idle.kib_per_session(),
        idle.held_fds
    );
    println!();
    println!(
        "Machine: {}; load average {load_at_start} at the start, {} at the end.",
        machine(),
        load_average()
    );
}
