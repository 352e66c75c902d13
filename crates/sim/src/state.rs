//! [`SimState`]: what one emulated instance remembers, and the controls tests drive it with.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::objects::{ObjectKind, Objects};
use crate::realtime::Sessions;
use crate::{Fault, SimConfig};

/// One request as the emulator received it, before any fault or credential check.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string, without the `?`, if there was one.
    pub query: Option<String>,
    /// Every header, as received.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The value of header `name`, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The shared state of one emulated instance: its config, the recorded requests, the fault
/// queue, the streaming gate and the quota window.
///
/// Cheap to clone (an [`Arc`] inside); every clone controls the same instance. Give it to
/// [`router`](crate::router) to serve the instance from your own app, and keep a clone to drive
/// it. [`SimHandle`](crate::SimHandle) offers the same controls for an instance served by
/// [`start`](crate::start).
#[derive(Clone)]
pub struct SimState {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    received: AtomicUsize,
    records: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<VecDeque<Fault>>,
    realtime: Sessions,
    held: AtomicBool,
    released: Semaphore,
    window: Mutex<Window>,
    objects: Mutex<Objects>,
}

/// Tokens and requests accepted in the current fixed 60 s window.
struct Window {
    start: Instant,
    tokens: u64,
    requests: u64,
}

const WINDOW: Duration = Duration::from_secs(60);

/// The quota reported in `x-ratelimit-remaining-*` when the config sets none (a standard
/// deployment's default for gpt-4o: 240K TPM, and Azure's 6 RPM per 1000 TPM).
const NOMINAL_TPM: u64 = 240_000;

/// Which quota a request would exceed, and when the window resets.
#[derive(Debug)]
pub(crate) struct Exceeded {
    pub(crate) calls: bool,
    pub(crate) retry_after: Duration,
}

impl SimState {
    /// The state of a fresh instance: nothing recorded, no faults queued, chunks not held.
    pub fn new(config: SimConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                received: AtomicUsize::new(0),
                records: Mutex::new(Vec::new()),
                faults: Mutex::new(VecDeque::new()),
                realtime: Sessions::default(),
                held: AtomicBool::new(false),
                released: Semaphore::new(0),
                window: Mutex::new(Window {
                    start: Instant::now(),
                    tokens: 0,
                    requests: 0,
                }),
                objects: Mutex::new(Objects::default()),
            }),
        }
    }

    /// The instance's config.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// Queue a fault for the next request that arrives; faults are taken in the order pushed.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.inner.faults).push_back(fault);
    }

    /// Queue the same fault for the next `n` requests.
    pub fn push_faults(&self, fault: Fault, n: usize) {
        lock(&self.inner.faults).extend(std::iter::repeat_n(fault, n));
    }

    /// Every request received so far, in arrival order, including those answered with a fault
    /// or a 401 (none when [`SimConfig::record_requests`] is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.records).clone()
    }

    /// How many requests were received so far (counted even when recording is off).
    pub fn request_count(&self) -> usize {
        self.inner.received.load(Ordering::SeqCst)
    }

    /// How many Realtime sessions (WebSockets on `/openai/realtime` and `/openai/v1/realtime`)
    /// are open: counted from the upgrade until either side sends its close frame or the
    /// connection ends, so a proxy test can assert the instance side was closed.
    pub fn realtime_sessions(&self) -> usize {
        self.inner.realtime.open()
    }

    pub(crate) fn realtime(&self) -> &Sessions {
        &self.inner.realtime
    }

    /// Forget the recorded requests (and their count) and drop the queued faults.
    pub fn clear(&self) {
        let mut records = lock(&self.inner.records);
        records.clear();
        self.inner.received.store(0, Ordering::SeqCst);
        lock(&self.inner.faults).clear();
    }

    /// Hold streams back: from now on every SSE content chunk after a stream's first one waits
    /// for a [`release_chunk`](Self::release_chunk). The other events (prompt filter results,
    /// role, the first content chunk, finish, `[DONE]`) are not held.
    pub fn hold_chunks(&self) {
        self.inner.held.store(true, Ordering::SeqCst);
    }

    /// Let exactly one more held chunk out (of any stream). A release given while no chunk
    /// waits is kept for the next one.
    pub fn release_chunk(&self) {
        self.inner.released.add_permits(1);
    }

    /// How many objects of `kind` requests created on this instance: stored responses, uploaded
    /// files, batches, threads, messages and runs. Deleted objects still count; objects the
    /// instance makes itself (a batch's output file, a run's reply message) do not.
    ///
    /// A proxy that retries a creating request must leave exactly one object behind.
    pub fn object_count(&self, kind: ObjectKind) -> usize {
        self.objects().created(kind)
    }

    /// The objects this instance holds (see [`crate::objects`]).
    pub(crate) fn objects(&self) -> MutexGuard<'_, Objects> {
        lock(&self.inner.objects)
    }

    /// Count a request, and keep it when recording is on.
    pub(crate) fn record(&self, request: impl FnOnce() -> RecordedRequest) {
        if !self.inner.config.record_requests {
            self.inner.received.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let request = request();
        let mut records = lock(&self.inner.records);
        records.push(request);
        // Counted under the lock, so the count never runs ahead of the records.
        self.inner.received.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn pop_fault(&self) -> Option<Fault> {
        lock(&self.inner.faults).pop_front()
    }

    /// Wait for a release when chunks are held.
    pub(crate) async fn gate(&self) {
        if self.inner.held.load(Ordering::SeqCst) {
            // The semaphore is never closed, so acquiring only fails if it were; the permit is
            // consumed: one release lets one chunk out.
            if let Ok(permit) = self.inner.released.acquire().await {
                permit.forget();
            }
        }
    }

    /// Take `tokens` from the quota, or say which limit the request would exceed.
    pub(crate) fn charge(&self, tokens: u64) -> Result<(), Exceeded> {
        let config = &self.inner.config;
        let mut window = self.window();
        let retry_after = WINDOW.saturating_sub(window.start.elapsed());
        if let Some(rpm) = config.requests_per_minute
            && window.requests >= rpm
        {
            return Err(Exceeded {
                calls: true,
                retry_after,
            });
        }
        if let Some(tpm) = config.tokens_per_minute
            && window.tokens.saturating_add(tokens) > tpm
        {
            return Err(Exceeded {
                calls: false,
                retry_after,
            });
        }
        window.tokens = window.tokens.saturating_add(tokens);
        window.requests += 1;
        Ok(())
    }

    /// `(requests, tokens)` still available in the current window, for the
    /// `x-ratelimit-remaining-*` headers.
    pub(crate) fn remaining(&self) -> (u64, u64) {
        let (tpm, rpm) = self.limits();
        let window = self.window();
        (
            rpm.saturating_sub(window.requests),
            tpm.saturating_sub(window.tokens),
        )
    }

    /// `(tokens, requests)` per minute: the configured limits, or the nominal ones.
    pub(crate) fn limits(&self) -> (u64, u64) {
        let config = &self.inner.config;
        let tpm = config.tokens_per_minute.unwrap_or(NOMINAL_TPM);
        let rpm = config
            .requests_per_minute
            .unwrap_or_else(|| (tpm * 6 / 1000).max(1));
        (tpm, rpm)
    }

    /// The current window, started afresh when the last one is over.
    fn window(&self) -> MutexGuard<'_, Window> {
        let mut window = lock(&self.inner.window);
        if window.start.elapsed() >= WINDOW {
            *window = Window {
                start: Instant::now(),
                tokens: 0,
                requests: 0,
            };
        }
        window
    }
}

impl fmt::Debug for SimState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimState")
            .field("config", &self.inner.config)
            .field("requests", &self.request_count())
            .field("faults", &lock(&self.inner.faults).len())
            .field("held", &self.inner.held.load(Ordering::SeqCst))
            .finish()
    }
}

/// Lock a mutex, shrugging off poisoning: every critical section here is a single push, pop or
/// clone that leaves the data consistent even if a panic interrupted the thread afterwards.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
