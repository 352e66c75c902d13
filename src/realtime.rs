//! Realtime sessions: a WebSocket the instance switched to (`101 Switching Protocols`), relayed
//! message by message between the caller and the instance, with an idle limit, a lifetime and
//! a close at shutdown ([`Sessions`]).

use std::fmt;
use std::future::{pending, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_usage::{Caller, TokenLimiter, Usage};
use futures_util::{Sink, Stream};
use http::Response;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::metrics::GatewayMetrics;
use crate::record::instance_and_deployment;

/// How long the closing handshakes may take once a side has closed (or the gateway closes
/// both): past it, both connections are dropped.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest message and frame taken from either side. Azure's Realtime API takes up to
/// 15 MiB of audio in one `input_audio_buffer.append`, about 20 MiB once in base64 and JSON,
/// over tungstenite's 16 MiB frame default; a message is held whole before it is passed on, so
/// this is also what one session can make the gateway hold per direction.
const MAX_MESSAGE: usize = 64 << 20;

/// What each side's WebSocket buffers: 8 KiB to read into, and writes gathered up to 16 KiB
/// between flushes (the relay flushes whenever the other side has nothing more for now). A
/// larger message grows the read buffer for as long as it takes. tungstenite allocates and
/// fills the read buffer at once, 128 KiB by default: 256 KiB per idle session. Measured
/// (`benches/realtime.rs`, docs/performance.md): 4 KiB, 8 KiB and 16 KiB hold 15, 23 and
/// 38 KiB per idle session, and pass 32 KiB frames at about 0.40, 0.55 and 0.55 of a direct
/// connection's rate.
fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(16 << 10)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// The Realtime (WebSocket) sessions a [`Gateway`](crate::Gateway) relays: how many are open,
/// and closing them at shutdown.
///
/// A session is counted from the instance's `101 Switching Protocols` until both of its
/// sides are closed. Every gateway has one handle ([`Gateway::sessions`](crate::Gateway::sessions));
/// clones of a gateway share it, and so do gateways built with the same handle
/// ([`GatewayBuilder::sessions`](crate::GatewayBuilder::sessions)). A gateway rebuilt on a
/// configuration reload should be given the handle of the one it replaces: the sessions that
/// started on the old gateway go on there, and are counted and closed with the new ones.
///
/// Cheap to clone: clones share the count. `Sessions::default()` is [`Sessions::new`].
///
/// ```no_run
/// use std::time::Duration;
/// use aoai_tower::{Gateway, Sessions};
///
/// # async fn run(shutdown: impl std::future::Future<Output = ()>) -> Result<(), aoai_tower::GatewayError> {
/// let sessions = Sessions::new();
/// let gateway = Gateway::builder()
///     .backend("eastus", "https://eastus.openai.azure.com")
///     .sessions(sessions.clone())
///     .build()?;
/// // ... serve `gateway` until `shutdown` completes, then stop accepting ...
/// shutdown.await;
/// let closed = sessions.close_all(Duration::from_secs(30)).await;
/// println!("{closed} Realtime sessions were still open after 30 s and were closed with 1001");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Sessions {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sessions open; `close_all` waits on it.
    open: watch::Sender<usize>,
    /// Set once by `close_all`: every relay closes both of its sides with 1001, and so does
    /// any session that starts afterwards.
    closing: watch::Sender<bool>,
}

impl Sessions {
    /// A handle counting no session yet.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                open: watch::Sender::new(0),
                closing: watch::Sender::new(false),
            }),
        }
    }

    /// How many sessions are open.
    pub fn count(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Lets the open sessions finish on their own for up to `grace`, then closes those still
    /// open, both sides with code 1001 (going away) and the reason `gateway shutting down`, and
    /// waits for their closing handshakes (a few seconds at most). Returns at once when no
    /// session is open. Returns how many sessions were still open when `grace` ran out.
    ///
    /// Meant for a graceful shutdown, once the server has stopped accepting: a session that
    /// starts after this was called (on a connection still open) is closed as soon as it
    /// starts, with the same code. (hyper's own graceful shutdown does not wait for upgraded
    /// connections, so it does not wait for sessions.)
    pub async fn close_all(&self, grace: Duration) -> usize {
        let mut open = self.shared.open.subscribe();
        // (`is_ok` drops the `Ref`, a read lock on the count, at once.)
        if tokio::time::timeout(grace, open.wait_for(|&n| n == 0))
            .await
            .is_ok()
        {
            return 0;
        }
        let left = *open.borrow();
        self.shared.closing.send_replace(true);
        // Each relay gives its closing handshakes CLOSING_TIMEOUT; a little more for the last
        // of them to be dropped.
        let deadline = CLOSING_TIMEOUT + Duration::from_millis(500);
        let _ = tokio::time::timeout(deadline, open.wait_for(|&n| n == 0)).await;
        left
    }

    /// Counts a session until the guard is dropped.
    fn open(&self) -> SessionGuard {
        self.shared.open.send_modify(|n| *n += 1);
        SessionGuard {
            sessions: self.clone(),
        }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("open", &self.count())
            .field("closing", &*self.shared.closing.borrow())
            .finish()
    }
}

/// One session counted in its [`Sessions`] while it lives.
struct SessionGuard {
    sessions: Sessions,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.shared.open.send_modify(|n| *n -= 1);
    }
}

/// A gateway's Realtime settings: where its sessions are counted, and their limits.
#[derive(Debug, Clone, Default)]
pub(crate) struct Realtime {
    pub(crate) sessions: Sessions,
    /// How long a session may go without a frame either way.
    pub(crate) idle_limit: Option<Duration>,
    /// How long a session may last.
    pub(crate) lifetime: Option<Duration>,
}

impl Realtime {
    /// Relays the WebSocket session the instance switched to, once both connections are handed
    /// over, in a task of its own; counted in [`Sessions`] from now until it ends.
    pub(crate) fn relay(&self, caller: OnUpgrade, backend: OnUpgrade, meter: SessionMeter) {
        let guard = self.sessions.open();
        let shutdown = self.sessions.shared.closing.subscribe();
        let limits = (self.idle_limit, self.lifetime);
        tokio::spawn(async move {
            let _counted = guard;
            match tokio::try_join!(caller, backend) {
                Ok((caller, backend)) => relay(caller, backend, limits, shutdown, meter).await,
                Err(error) => tracing::warn!(%error, "upgrade failed"),
            }
        });
    }
}

/// What a session's responses used, read from the instance's `response.done` events as they
/// pass: each charged to the caller's token limit and recorded in the metrics at once, and the
/// whole in one log line when the session ends.
#[derive(Debug)]
pub(crate) struct SessionMeter {
    caller: Option<Caller>,
    limiter: Option<TokenLimiter>,
    metrics: Option<GatewayMetrics>,
    instance: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    responses: u64,
    input_tokens: u64,
    output_tokens: u64,
}

impl SessionMeter {
    /// Charges `caller`'s responses to `limiter` and records them in `metrics`; the instance and
    /// the deployment are set once the instance has switched protocols
    /// ([`switched`](Self::switched)).
    pub(crate) fn new(
        caller: Option<Caller>,
        limiter: Option<TokenLimiter>,
        metrics: Option<GatewayMetrics>,
    ) -> Self {
        Self {
            caller,
            limiter,
            metrics,
            instance: None,
            deployment: None,
            responses: 0,
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    /// Takes the instance and the deployment from the instance's `101 Switching Protocols`.
    pub(crate) fn switched<B>(&mut self, response: &Response<B>) {
        (self.instance, self.deployment) = instance_and_deployment(response.extensions());
    }

    /// Reads a text message from the instance: a `response.done` event's usage is counted.
    fn observe(&mut self, text: &str) {
        if !text.contains("\"response.done\"") {
            return;
        }
        let Some(usage) = Usage::from_json(text.as_bytes()) else {
            return;
        };
        self.responses += 1;
        self.input_tokens += usage.input_tokens;
        self.output_tokens += usage.output_tokens;
        if let (Some(limiter), Some(caller)) = (&self.limiter, &self.caller) {
            limiter.charge(caller, usage.total_tokens);
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_tokens(
                self.caller
                    .as_ref()
                    .map(|caller| caller.shared_name().clone()),
                self.instance.clone(),
                self.deployment.clone(),
                &usage,
            );
        }
    }

    /// The session's log line.
    fn log(&self, started: Instant) {
        tracing::info!(
            caller = self.caller.as_ref().map_or("-", Caller::name),
            backend = self.instance.as_deref().unwrap_or("-"),
            deployment = self.deployment.as_deref().unwrap_or("-"),
            responses = self.responses,
            prompt_tokens = self.input_tokens,
            completion_tokens = self.output_tokens,
            duration_s = started.elapsed().as_secs_f64(),
            "realtime session"
        );
    }
}

/// Relays messages between the caller and the instance until both sides are closed: what one
/// side sends (text, binary, ping, pong, close with its code and reason) goes to the other as
/// it comes. When one side closes, its close frame goes to the other and both closing
/// handshakes finish; when one side's connection ends without a close frame, the other is
/// closed with 1001 (the caller went away) or 1011 (the instance's connection was lost). The
/// idle limit, the lifetime and a shutdown close both sides with 1001.
async fn relay(
    caller: Upgraded,
    backend: Upgraded,
    (idle_limit, lifetime): (Option<Duration>, Option<Duration>),
    mut shutdown: watch::Receiver<bool>,
    meter: SessionMeter,
) {
    let config = Some(websocket_config());
    let caller = WebSocketStream::from_raw_socket(TokioIo::new(caller), Role::Server, config).await;
    let backend =
        WebSocketStream::from_raw_socket(TokioIo::new(backend), Role::Client, config).await;
    let started = Instant::now();
    let mut relay = Relay {
        caller: Side::new(
            caller,
            CloseFrame {
                code: CloseCode::Away,
                reason: "caller went away".into(),
            },
        ),
        backend: Side::new(
            backend,
            CloseFrame {
                code: CloseCode::Error,
                reason: "instance connection lost".into(),
            },
        ),
        last_frame: started,
        closing: false,
        told_closing: false,
        meter,
    };
    let lifetime_ends = lifetime.map(|lifetime| started + lifetime);
    // Set once a side closes (or the gateway closes both): the closing handshakes end by then.
    let mut closing_ends: Option<Instant> = None;
    loop {
        let open = closing_ends.is_none();
        // The idle deadline moves with each frame; it is read again after each wake-up.
        let idle_ends = idle_limit
            .filter(|_| open)
            .map(|idle| relay.last_frame + idle);
        tokio::select! {
            progress = poll_fn(|cx| relay.poll(cx)) => match progress {
                Progress::Done => break,
                Progress::Closing => closing_ends = Some(Instant::now() + CLOSING_TIMEOUT),
            },
            () = sleep_until_some(idle_ends) => {
                let idle = idle_limit.unwrap_or_default();
                if relay.last_frame + idle <= Instant::now() {
                    relay.close_both(format!("idle for {} s", seconds(idle)));
                    closing_ends = Some(Instant::now() + CLOSING_TIMEOUT);
                }
            }
            () = sleep_until_some(lifetime_ends.filter(|_| open)) => {
                let lifetime = lifetime.unwrap_or_default();
                relay.close_both(format!("session lifetime of {} s reached", seconds(lifetime)));
                closing_ends = Some(Instant::now() + CLOSING_TIMEOUT);
            }
            closing = shutdown.wait_for(|&closing| closing), if open => {
                // A dropped sender cannot be: `Sessions` holds it, and the guard holds that.
                drop(closing);
                relay.close_both("gateway shutting down".to_owned());
                closing_ends = Some(Instant::now() + CLOSING_TIMEOUT);
            }
            () = sleep_until_some(closing_ends) => {
                tracing::debug!("a Realtime session's closing handshake timed out");
                break;
            }
        }
    }
    relay.meter.log(started);
}

/// Sleeps until `at`; forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

/// `duration` in seconds as a close reason says it: `300`, `0.2`.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        duration.as_secs_f64().to_string()
    }
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// One side of a session: the caller's, or the instance's.
struct Side {
    socket: Socket,
    /// A message from the other side, waiting for room here.
    outgoing: Option<Message>,
    /// Sent messages not flushed yet.
    unflushed: bool,
    /// Nothing more comes from this side: it closed, or its connection ended.
    ended: bool,
    /// This side sent a close frame.
    sent_close: bool,
    /// Nothing can be sent here any more: its connection failed or is closed.
    broken: bool,
    /// What the other side is closed with when this side's connection ends without a close
    /// frame.
    lost: CloseFrame,
}

impl Side {
    fn new(socket: Socket, lost: CloseFrame) -> Self {
        Self {
            socket,
            outgoing: None,
            unflushed: false,
            ended: false,
            sent_close: false,
            broken: false,
            lost,
        }
    }

    /// A send here failed: with the connection (nothing more can be sent), or because this
    /// side is closing (only that message is dropped: tungstenite sends nothing after a close
    /// frame).
    fn failed(&mut self, error: &WsError) -> bool {
        let broken = matches!(
            error,
            WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed
        );
        self.broken |= broken;
        broken
    }
}

/// Both sides of a session.
struct Relay {
    caller: Side,
    backend: Side,
    /// When the last message arrived from either side.
    last_frame: Instant,
    /// A side closed or was lost, or the gateway closes both.
    closing: bool,
    /// `Progress::Closing` was returned.
    told_closing: bool,
    /// What the instance's responses used.
    meter: SessionMeter,
}

/// How far a relay got.
enum Progress {
    /// The session started closing (reported once).
    Closing,
    /// Both sides are closed.
    Done,
}

impl Relay {
    /// Moves messages both ways, each as far as it can (one direction waiting for room does not
    /// hold the other up).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Progress> {
        let up = forward(
            cx,
            &mut self.caller,
            &mut self.backend,
            &mut self.last_frame,
            &mut self.closing,
            None,
        );
        let down = forward(
            cx,
            &mut self.backend,
            &mut self.caller,
            &mut self.last_frame,
            &mut self.closing,
            Some(&mut self.meter),
        );
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Progress::Done);
        }
        if self.closing && !self.told_closing {
            self.told_closing = true;
            return Poll::Ready(Progress::Closing);
        }
        Poll::Pending
    }

    /// Closes both sides with 1001 and `reason`, in place of anything still waiting to be sent
    /// to them.
    fn close_both(&mut self, reason: String) {
        tracing::debug!(%reason, "closing a Realtime session");
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: reason.into(),
        };
        for side in [&mut self.caller, &mut self.backend] {
            if !side.broken {
                side.outgoing = Some(Message::Close(Some(frame.clone())));
            }
        }
        self.closing = true;
        self.told_closing = true;
    }
}

/// Sends `from`'s messages to `to` until `from` has nothing more for now, then flushes `to`;
/// `meter` reads the text messages on the way (the instance's, for their usage).
/// Ready once `from` has ended and all of it was passed on (or `to` broke).
fn forward(
    cx: &mut Context<'_>,
    from: &mut Side,
    to: &mut Side,
    last_frame: &mut Instant,
    closing: &mut bool,
    mut meter: Option<&mut SessionMeter>,
) -> Poll<()> {
    loop {
        if let Some(message) = to.outgoing.take()
            && !to.broken
        {
            let sent = match Pin::new(&mut to.socket).poll_ready(cx) {
                Poll::Pending => {
                    to.outgoing = Some(message);
                    return Poll::Pending;
                }
                Poll::Ready(ready) => {
                    ready.and_then(|()| Pin::new(&mut to.socket).start_send(message))
                }
            };
            match sent {
                Ok(()) => to.unflushed = true,
                Err(error) => *closing |= to.failed(&error),
            }
        }
        if from.ended {
            break;
        }
        match Pin::new(&mut from.socket).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => {
                *last_frame = Instant::now();
                if message.is_close() {
                    from.sent_close = true;
                    *closing = true;
                }
                if let (Some(meter), Message::Text(text)) = (meter.as_deref_mut(), &message) {
                    meter.observe(text);
                }
                to.outgoing = Some(message);
            }
            Poll::Ready(end) => {
                if let Some(Err(error)) = end {
                    tracing::debug!(%error, "a Realtime session's connection failed");
                }
                from.ended = true;
                *closing = true;
                if !from.sent_close {
                    to.outgoing = Some(Message::Close(Some(from.lost.clone())));
                }
            }
            Poll::Pending => break,
        }
    }
    if to.unflushed && !to.broken {
        match Pin::new(&mut to.socket).poll_flush(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => to.unflushed = false,
            Poll::Ready(Err(error)) => *closing |= to.failed(&error),
        }
    }
    if from.ended && (to.outgoing.is_none() || to.broken) {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_say_whole_seconds_and_fractions() {
        assert_eq!(seconds(Duration::from_secs(300)), "300");
        assert_eq!(seconds(Duration::from_millis(200)), "0.2");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5");
    }

    #[tokio::test]
    async fn close_all_returns_at_once_without_sessions_and_after_the_grace_with_one() {
        let sessions = Sessions::new();
        let started = Instant::now();
        assert_eq!(sessions.close_all(Duration::from_secs(30)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(1));

        let sessions = Sessions::new();
        let guard = sessions.open();
        assert_eq!(sessions.count(), 1);
        let mut closing = sessions.shared.closing.subscribe();
        // The "relay": ends its session once told to close.
        let relay = tokio::spawn(async move {
            let _ = closing.wait_for(|&c| c).await;
            drop(guard);
        });
        let started = Instant::now();
        let grace = Duration::from_millis(100);
        assert_eq!(sessions.close_all(grace).await, 1);
        assert!(started.elapsed() >= grace);
        relay.await.unwrap();
        assert_eq!(sessions.count(), 0);
    }
}
