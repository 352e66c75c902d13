//! A lean HTTP/1.1 server connection for a tower service: the caller's side of a proxy, as
//! [`Upstream`](crate::Upstream) is the backend's.
//!
//! [`serve_connection`] reads requests from one accepted TCP connection, calls the service with
//! each, and writes its answers back, keeping the connection alive between them. It exists for
//! the hot path of a gateway process (the `gateway` example): one task per connection that
//! parses the head straight into an [`http::Request`], hands over a body that arrived with its
//! head as one [`Bytes`] (no channel, no wake-up of the connection for it), and writes an answer's
//! head and its first body frame in one `write`. Services embedded in an axum app keep hyper's
//! server; this one serves the same services, nothing more:
//!
//! - HTTP/1.0 and HTTP/1.1 (`Connection: close` and `keep-alive` honoured), pipelined requests
//!   answered in order; no upgrades, no HTTP/2 (hyper's server is there for those).
//! - Request bodies framed by `Content-Length` or `Transfer-Encoding: chunked` (RFC 9112, 6);
//!   `Expect: 100-continue` answered when the service first reads the body.
//! - Refused with a JSON error and the connection closed: a malformed head (400), a head over
//!   64 KiB or with more than 100 fields (431), both `Content-Length` and `Transfer-Encoding`,
//!   conflicting or malformed lengths, a transfer coding other than a final `chunked` (400, as
//!   RFC 9112 requires against request smuggling), a coding before `chunked` (501).
//! - Answers framed by their `Content-Length` or exact size, else chunked (HTTP/1.1 callers) or
//!   delimited by closing (HTTP/1.0 callers); a body that ends early or runs long closes the
//!   connection. A `Date` field is added when the answer has none. An answer's own
//!   `Connection: close` closes the connection after it; the options of its `Connection` that
//!   name its own hop-by-hop fields are sent on with those fields.
//! - Each answer's body frame goes out as soon as it is produced: a stream is never buffered,
//!   and while it waits for its next frame its connection holds no read or write buffer.
//! - A caller that closes its connection while its request is in flight cancels it: the
//!   service's future is dropped (and with it the backend exchange).
//! - A connection waits at most [`Builder::head_timeout`] (60 s by default, as nginx) for each
//!   request head, from when it is served and from the end of each answer: a caller that has
//!   sent only part of a head by then (however slowly it keeps sending) is answered 408 and
//!   closed, an idle keep-alive connection is closed.
//! - A request body still arriving waits at most [`Builder::body_timeout`] (60 s by default, as
//!   nginx) for its next bytes while the service reads it: then it fails with a `TimedOut`
//!   error, and the connection is closed after the service's answer. [`TimedBody`] gives the
//!   same limit to the bodies another server hands over (hyper's HTTP/2 server, say).
//! - A write to a caller whose connection is full waits at most [`Builder::send_timeout`] (60 s
//!   by default, as nginx) for room: a caller that reads nothing of its answer for that long is
//!   closed, and the answer's body (a backend's stream) dropped. An answer the caller keeps
//!   reading has no time limit, however long it streams.
//!
//! # Example
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use aoai_upstream::server::{RequestBody, serve_connection};
//! use bytes::Bytes;
//! use http_body_util::Full;
//!
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     let hello = tower::service_fn(|_: http::Request<RequestBody>| async {
//!         Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"hello"))))
//!     });
//!     tokio::spawn(serve_connection(stream, hello));
//! }
//! # }
//! ```

use std::{
    cell::RefCell,
    collections::VecDeque,
    fmt,
    future::{Future, poll_fn},
    io,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tower::Service;

use crate::{
    BoxError,
    body::{READ_SIZE, make_read_room},
    headers::{connection_options, names_a_field},
    http1::{
        Chunked, Decoded, FieldSpan, Framing, InvalidField, LengthError, MAX_HEAD_BYTES,
        RequestFraming, agreed_length, chunk_size_line, header_map, invalid, parse_decimal,
        write_content_length, write_field,
    },
};

/// Most request header fields accepted (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Body frames up to this size are copied into the answer's write buffer, to leave with the
/// head or the chunk framing in one `write`; larger ones are written on their own.
const COPY_LIMIT: usize = 32 * 1024;
/// A request waiting for its answer reads ahead on its connection (to notice the caller
/// leaving, and to keep what it pipelines) up to this many bytes.
const READ_AHEAD_LIMIT: usize = MAX_HEAD_BYTES;
/// A connection closed by the server reads and drops at most this much, for at most this long,
/// of what its caller still sends (see `close`).
const CLOSE_DRAIN_LIMIT: usize = 8 * 1024 * 1024;
const CLOSE_DRAIN_TIME: Duration = Duration::from_secs(1);

/// Serves HTTP/1.1 on `stream` with `service`, request after request, until the caller closes
/// the connection, a request or answer says to close it, it waits too long for a request head,
/// the caller reads nothing of its answer for too long, or [`Connection::graceful_shutdown`] is
/// called. See the [module docs](self) for what it accepts and refuses. Serves with
/// [`Builder`]'s defaults (head, body and send timeouts of 60 s).
///
/// The service is polled ready before each call. Its errors, and I/O errors, end the connection
/// (the future's output); they concern that caller only.
pub fn serve_connection<S, B>(stream: TcpStream, service: S) -> Connection
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Builder::new().serve_connection(stream, service)
}

/// How long a connection waits for a request head by default: nginx's `client_header_timeout`.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a write waits for a caller to make room by default: nginx's `send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request body still arriving may go without a byte by default: nginx's
/// `client_body_timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings for serving connections, then [`serve_connection`](Builder::serve_connection).
///
/// ```no_run
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// use aoai_upstream::server::{Builder, RequestBody};
/// use bytes::Bytes;
/// use http_body_util::Full;
///
/// # async fn run() -> std::io::Result<()> {
/// let server = Builder::new().head_timeout(Some(Duration::from_secs(10)));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// loop {
///     let (stream, _) = listener.accept().await?;
///     let hello = tower::service_fn(|_: http::Request<RequestBody>| async {
///         Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"hello"))))
///     });
///     tokio::spawn(server.serve_connection(stream, hello));
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    head_timeout: Option<Duration>,
    body_timeout: Option<Duration>,
    send_timeout: Option<Duration>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            head_timeout: Some(DEFAULT_HEAD_TIMEOUT),
            body_timeout: Some(DEFAULT_BODY_TIMEOUT),
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
        }
    }
}

impl Builder {
    /// The defaults: a head timeout of [`DEFAULT_HEAD_TIMEOUT`], a body timeout of
    /// [`DEFAULT_BODY_TIMEOUT`], a send timeout of [`DEFAULT_SEND_TIMEOUT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a request body still arriving may go without a byte while the service waits
    /// for more of it: then the body fails with an [`io::ErrorKind::TimedOut`] error (the
    /// service answers as it answers a body it cannot read), and the connection is closed after
    /// the answer. It bounds each wait, not the whole body: a large body that keeps arriving
    /// takes as long as it takes, and a body the service is not reading has no limit. `None`:
    /// no limit.
    pub fn body_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.body_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// How long a write to the caller may wait for room in its connection: a caller that reads
    /// nothing of its answer for that long (its socket full) has its connection closed, and the
    /// answer's body (a backend's stream) is dropped. It bounds each wait, not the answer: a
    /// stream the caller keeps reading lasts as long as it lasts. `None`: no limit.
    pub fn send_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.send_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// How long a connection may wait for a whole request head: from when it is served (or
    /// began to wait, with [`serve_connection_waited`](Self::serve_connection_waited)), and
    /// from the end of each answer. A caller that has sent part of a head by then is answered
    /// `408 Request Timeout` and the connection closed (a head sent a byte at a time does not
    /// keep it open); a connection idle between requests is closed. `None`: no limit.
    ///
    /// The limit is kept on a coarse tick, a quarter of it, so that a request costs no timer
    /// of its own: a connection is closed after waiting between the timeout and a quarter more.
    pub fn head_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.head_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Serves HTTP/1.1 on `stream` with `service` and these settings; see the function
    /// [`serve_connection`].
    pub fn serve_connection<S, B>(&self, stream: TcpStream, service: S) -> Connection
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve_connection_waited(stream, service, Duration::ZERO)
    }

    /// Serves HTTP/1.1 on `stream` as [`serve_connection`](Self::serve_connection) does, for a
    /// connection that has already waited `waited` for its first request head: a server in
    /// front that looked at its first bytes to tell its protocol, say. The head timeout of the
    /// first head counts that time, so that a caller gets it once in all.
    pub fn serve_connection_waited<S, B>(
        &self,
        stream: TcpStream,
        service: S,
        waited: Duration,
    ) -> Connection
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let shared = Arc::new(Shared {
            graceful: AtomicBool::new(false),
            first_head_waited: waited,
        });
        let serving = serve(stream, service, Arc::clone(&shared), self.clone());
        Connection {
            future: Box::pin(serving),
            shared,
        }
    }
}

/// One connection being served: a future that ends when the connection does. Made by
/// [`serve_connection`].
#[must_use = "a connection is served only while its future is polled"]
pub struct Connection {
    future: Pin<Box<dyn Future<Output = io::Result<()>> + Send>>,
    shared: Arc<Shared>,
}

/// What a [`Connection`] and the future serving it share.
///
/// How long the connection waited for its first head is kept here rather than in the future,
/// which every connection keeps for as long as it lasts: the future is 2,048 bytes, an
/// allocator size class, and 16 bytes more (an argument, or a local, lives as long as the
/// future) would put it in the next class, 512 bytes larger.
struct Shared {
    /// Set by [`Connection::graceful_shutdown`].
    graceful: AtomicBool,
    first_head_waited: Duration,
}

impl Connection {
    /// Finishes the request in flight, if any, answering it with `Connection: close`, and then
    /// ends; an idle connection ends at its next poll. The caller polls the connection after
    /// calling this.
    pub fn graceful_shutdown(&self) {
        self.shared.graceful.store(true, Ordering::Release);
    }
}

impl Future for Connection {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.future.as_mut().poll(cx)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field(
                "graceful_shutdown",
                &self.shared.graceful.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// The body of a request read by [`serve_connection`].
///
/// A body that arrived with its head (a chat request, nearly always) is one [`Bytes`] sliced
/// from the read buffer. Any other is read from the connection as the service polls it, one
/// piece per read. Its errors are [`io::Error`]s: the caller closed the connection before the
/// body ended (`UnexpectedEof`), or its chunked framing is invalid (`InvalidData`).
pub struct RequestBody {
    kind: BodyKind,
}

enum BodyKind {
    Complete(Option<Bytes>),
    Fed(Arc<Feed>),
}

impl RequestBody {
    fn complete(data: Bytes) -> Self {
        Self {
            kind: BodyKind::Complete((!data.is_empty()).then_some(data)),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.kind {
            BodyKind::Complete(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            BodyKind::Fed(feed) => feed.poll_piece(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Complete(data) => data.is_none(),
            BodyKind::Fed(feed) => feed.lock().is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Complete(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            BodyKind::Fed(feed) => {
                let fed = feed.lock();
                match fed.framing {
                    Framing::Length(remaining) => SizeHint::with_exact(
                        remaining + fed.pieces.iter().map(|p| p.len() as u64).sum::<u64>(),
                    ),
                    _ => SizeHint::default(),
                }
            }
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let BodyKind::Fed(feed) = &self.kind {
            feed.lock().dropped = true;
        }
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            BodyKind::Complete(_) => "Complete",
            BodyKind::Fed(_) => "Fed",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

/// A body still arriving: the connection decodes pieces from its read buffer into it when the
/// body asks for more; the body hands them to the service.
struct Feed(Mutex<Fed>);

struct Fed {
    /// What is left to decode, and how.
    framing: Framing,
    pieces: VecDeque<Bytes>,
    /// Set once the framing ended; the pieces may still hold data.
    ended: bool,
    error: Option<io::Error>,
    /// Who waits for the next piece; set while the body is starved.
    waker: Option<Waker>,
    /// The connection's task, when it waits for the body to ask for more: the body may be read
    /// on another task (a client's connection task, say), which must wake it.
    connection: Option<Waker>,
    /// The body was dropped: nothing more is decoded into it.
    dropped: bool,
    /// `Expect: 100-continue`, not yet answered.
    expects_continue: bool,
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fed> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn poll_piece(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut fed = self.lock();
        if let Some(piece) = fed.pieces.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if let Some(error) = fed.error.take() {
            fed.ended = true;
            return Poll::Ready(Some(Err(error)));
        }
        if fed.ended {
            return Poll::Ready(None);
        }
        match &mut fed.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        if let Some(connection) = fed.connection.take() {
            connection.wake();
        }
        Poll::Pending
    }
}

impl Fed {
    fn is_end(&self) -> bool {
        self.pieces.is_empty() && self.ended && self.error.is_none()
    }

    /// Whether the connection should read for this body: it waits for a piece.
    fn is_starved(&self) -> bool {
        self.waker.is_some() && self.pieces.is_empty() && !self.ended && !self.dropped
    }

    /// Decodes what `buf` holds into pieces; whether anything changed for the body.
    fn decode_from(&mut self, buf: &mut BytesMut) -> bool {
        let mut changed = false;
        while !self.ended && !self.dropped {
            match self.framing.decode(buf) {
                Ok(Decoded::Data(data)) => self.pieces.push_back(data),
                Ok(Decoded::End) => self.ended = true,
                Ok(Decoded::NeedMore) => break,
                Err(e) => {
                    self.fail(invalid(&format!("invalid request body: {e}")));
                }
            }
            changed = true;
        }
        if changed && let Some(waker) = self.waker.take() {
            waker.wake();
        }
        changed
    }

    fn fail(&mut self, error: io::Error) {
        self.error = Some(error);
        self.ended = true;
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// A request refused before it reaches the service.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: &'static str,
}

impl Refusal {
    fn new(status: StatusCode, message: &'static str) -> Self {
        Self { status, message }
    }

    fn bad_request(message: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// What a request head says about its body and its connection.
struct Head {
    request: Request<()>,
    body: RequestFraming,
    keep_alive: bool,
    expects_continue: bool,
}

async fn serve<S, B>(
    stream: TcpStream,
    mut service: S,
    shared: Arc<Shared>,
    settings: Builder,
) -> io::Result<()>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let head_timeout = settings.head_timeout;
    let mut caller = Caller {
        stream,
        send_timeout: settings.send_timeout,
        buf: BytesMut::with_capacity(READ_SIZE),
        feed: None,
        continue_sent: 0,
        body_wait: settings.body_timeout.map(BodyWait::new),
    };
    let mut out = Vec::with_capacity(1024);
    let mut head_wait =
        pin!(head_timeout.map(|timeout| HeadWait::new(timeout, shared.first_head_waited)));
    loop {
        let head = loop {
            if !caller.buf.is_empty() {
                match parse_request_head(&mut caller.buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => return refuse(caller, &mut out, &refusal).await,
                }
            }
            let read = poll_fn(|cx| {
                // Idle: a graceful shutdown ends the connection here.
                if caller.buf.is_empty() && shared.graceful.load(Ordering::Acquire) {
                    return Poll::Ready(Ok(Some(0)));
                }
                make_read_room(&mut caller.buf);
                let read = tokio_util::io::poll_read_buf(
                    Pin::new(&mut caller.stream),
                    cx,
                    &mut caller.buf,
                );
                if read.is_ready() {
                    return read.map_ok(Some);
                }
                let expired = head_wait
                    .as_mut()
                    .as_pin_mut()
                    .is_some_and(|wait| wait.expired(cx));
                if expired {
                    Poll::Ready(Ok(None))
                } else {
                    Poll::Pending
                }
            })
            .await?;
            let Some(read) = read else {
                if caller.buf.is_empty() {
                    // Idle for the whole timeout: closed, with nothing to answer.
                    return Ok(());
                }
                let late = Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request head did not arrive in time",
                );
                return refuse(caller, &mut out, &late).await;
            };
            if read == 0 {
                // Closed (or shutting down) between requests, or inside a head: nothing to answer.
                return Ok(());
            }
        };
        let Head {
            request,
            body: body_framing,
            mut keep_alive,
            expects_continue,
        } = head;
        let (body, feed) = take_body(&mut caller.buf, body_framing, expects_continue);
        caller.feed = feed;
        caller.continue_sent = 0;
        let asked = Asked {
            head: request.method() == Method::HEAD,
            http10: request.version() == http::Version::HTTP_10,
        };
        let request = request.map(|()| body);

        poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(|e| io::Error::other(e.into()))?;
        // The service's future is dropped once it has answered, before the answer is written.
        let answer = {
            let mut future = pin!(service.call(request));
            poll_fn(|cx| {
                loop {
                    if let Poll::Ready(result) = future.as_mut().poll(cx) {
                        return Poll::Ready(Some(result.map_err(|e| io::Error::other(e.into()))));
                    }
                    match caller.poll_event(cx) {
                        Poll::Ready(CallerEvent::BodyFed) => {}
                        Poll::Ready(CallerEvent::Left) => return Poll::Ready(None),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await
        };
        // The caller left: the service's future (and whatever it was waiting for) is dropped.
        let Some(answer) = answer else { return Ok(()) };
        let response = answer?;
        // A body dropped before its end (a 413, say) leaves the connection out of step.
        keep_alive &= !caller.body_abandoned();
        keep_alive &= !shared.graceful.load(Ordering::Acquire);
        let (head, body) = response.into_parts();
        let kept = write_response(&mut caller, &mut out, head, body, asked, keep_alive).await?;
        // The answer may have carried the request body on (an echo): it must have ended.
        if !kept || !caller.body_complete() {
            close(caller.stream, caller.buf).await;
            return Ok(());
        }
        if let Some(wait) = head_wait.as_mut().as_pin_mut() {
            wait.begin();
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's head timeout, kept on a coarse tick (a quarter of the timeout) that is
    /// armed again only when it fires, so that a request costs an increment rather than a timer
    /// of its own (whose registration costs tokio's time driver a lock and a reading of the
    /// clock). A wait for a head ends the connection on the fourth tick that finds it still
    /// going on without a tick having missed its start: between the timeout and a quarter more
    /// after it began.
    ///
    /// The tick is polled only while the connection waits for a head; one that fires meanwhile
    /// (an answer that takes longer than a quarter of the timeout) wakes the connection's task
    /// once, and is found fired at the start of the next wait, which it does not count against.
    struct HeadWait {
        #[pin]
        tick: tokio::time::Sleep,
        // A quarter of the timeout.
        interval: Duration,
        // Waits for a head begun since the connection was served, the first not counted.
        waits: u64,
        // `waits` when the tick was last armed.
        armed_in: u64,
        // Ticks the current wait has seen fire since the one that found it begun.
        quiet: u32,
        // The waker the tick wakes.
        registered: Option<Waker>,
    }
}

impl HeadWait {
    /// Ticks per timeout.
    const TICKS: u32 = 4;

    /// The first wait, begun `waited` before the connection is served, for a head timeout of
    /// `timeout`. The whole ticks it has lasted count as ticks it has seen fire (all but the
    /// last: that one fires at once if it has lasted the timeout), and the next one is armed for
    /// when it would have fired.
    fn new(timeout: Duration, waited: Duration) -> Self {
        let interval = timeout / Self::TICKS;
        let seen = waited.as_nanos() / interval.as_nanos().max(1);
        let quiet = u32::try_from(seen).map_or(Self::TICKS - 1, |seen| seen.min(Self::TICKS - 1));
        let next = (interval * (quiet + 1)).saturating_sub(waited);
        Self {
            tick: tokio::time::sleep(next),
            interval,
            waits: 0,
            armed_in: 0,
            quiet,
            registered: None,
        }
    }

    /// A wait for the next head begins: an answer has ended.
    fn begin(self: Pin<&mut Self>) {
        *self.project().waits += 1;
    }

    /// Whether the wait for a head has lasted the timeout; otherwise the tick is armed, with
    /// `cx`'s waker, for when it fires next.
    fn expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let mut this = self.project();
        let wakes = |registered: &Option<Waker>, waker: &Waker| {
            registered
                .as_ref()
                .is_some_and(|registered| registered.will_wake(waker))
        };
        // Armed, and it will wake this task: no need to register again (polling a timer takes a
        // few atomic instructions, and a request would pay them every time).
        if !this.tick.is_elapsed() && wakes(this.registered, cx.waker()) {
            return false;
        }
        // Out of the task's budget, which could otherwise answer `Pending` without registering.
        while Pin::new(&mut tokio::task::unconstrained(this.tick.as_mut()))
            .poll(cx)
            .is_ready()
        {
            if *this.armed_in == *this.waits {
                *this.quiet += 1;
                if *this.quiet == Self::TICKS {
                    return true;
                }
            } else {
                *this.armed_in = *this.waits;
                *this.quiet = 0;
            }
            let next = tokio::time::Instant::now() + *this.interval;
            this.tick.as_mut().reset(next);
        }
        if !wakes(this.registered, cx.waker()) {
            *this.registered = Some(cx.waker().clone());
        }
        false
    }
}

/// The caller's side of a connection: its socket, what was read from it and not used yet, and
/// the body of the request in flight while it is still arriving.
struct Caller {
    stream: TcpStream,
    /// How long a write to it may wait for room.
    send_timeout: Option<Duration>,
    buf: BytesMut,
    feed: Option<Arc<Feed>>,
    /// How much of a `100 Continue` for the request in flight has been written.
    continue_sent: usize,
    /// The body timeout's wait for more of a request body still arriving.
    body_wait: Option<BodyWait>,
}

/// The body timeout's wait for a request body's next bytes: a timer armed when a wait begins
/// (boxed, on first use: a body that comes whole with its head never waits) and disarmed when it
/// ends. The lean server keeps one per connection; [`TimedBody`] one per body.
struct BodyWait {
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl BodyWait {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            timer: None,
            armed: false,
        }
    }

    /// Whether the wait under way, begun now if none was, has lasted the timeout (and so is
    /// over); otherwise the timer is registered with `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match &mut self.timer {
            Some(timer) if self.armed => timer,
            Some(timer) => {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.timeout);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        let fired = timer.as_mut().poll(cx).is_ready();
        self.armed = !fired;
        fired
    }

    /// The wait is over: bytes came, or the body is not asked for more.
    fn end(&mut self) {
        self.armed = false;
    }

    /// What a body fails with when a wait has lasted the timeout.
    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no more of the request body arrived within {:?}",
                self.timeout
            ),
        )
    }
}

pin_project_lite::pin_project! {
    /// A request body with the body timeout ([`Builder::body_timeout`]) for a server that hands
    /// over bodies of its own, hyper's HTTP/2 server say: each wait for its next frame, while it
    /// is polled, lasts at most the timeout, and then the body fails with an
    /// [`io::ErrorKind::TimedOut`] error. As with the lean server's bodies, a body that keeps
    /// arriving takes as long as it takes, and one nobody polls has no limit.
    pub struct TimedBody<B> {
        #[pin]
        body: B,
        wait: BodyWait,
    }
}

impl<B> TimedBody<B> {
    /// `body`, each wait for its next frame limited to `timeout`.
    pub fn new(body: B, timeout: Duration) -> Self {
        Self {
            body,
            wait: BodyWait::new(timeout),
        }
    }
}

impl<B> fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedBody")
            .field("timeout", &self.wait.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            this.wait.end();
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.wait.expired(cx) {
            return Poll::Ready(Some(Err(Box::new(this.wait.timed_out()))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Caller {
    /// Its socket, to write answers to.
    fn sender(&mut self) -> Sender<'_> {
        Sender {
            socket: &mut self.stream,
            timeout: self.send_timeout,
        }
    }

    /// Serves the caller's side while the service or an answer's body waits: reads for a request
    /// body still arriving when it asks for more (on whichever task reads it), and otherwise
    /// reads ahead to notice the caller leaving.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<CallerEvent> {
        if let Some(feed) = &self.feed
            && !feed.lock().ended
        {
            match feed_body(
                feed,
                &mut self.stream,
                &mut self.buf,
                &mut self.continue_sent,
                cx,
            ) {
                Poll::Ready(result) => {
                    if let Some(wait) = &mut self.body_wait {
                        wait.end();
                    }
                    if let Err(e) = result {
                        feed.lock().fail(e);
                    }
                    return Poll::Ready(CallerEvent::BodyFed);
                }
                Poll::Pending => {
                    if let Some(wait) = &mut self.body_wait {
                        let mut fed = feed.lock();
                        if !fed.is_starved() {
                            // Not asked for: the service takes its time, which is not limited.
                            wait.end();
                        } else if wait.expired(cx) {
                            fed.fail(wait.timed_out());
                            return Poll::Ready(CallerEvent::BodyFed);
                        }
                    }
                }
            }
        }
        watch_caller(&mut self.stream, &mut self.buf, cx).map(|()| CallerEvent::Left)
    }

    /// [`poll_event`](Self::poll_event) for an answer's body that waits (an SSE stream between
    /// events): an empty read buffer is given back first, so that an idle stream costs its
    /// connection no read buffer (8 KiB); the next read after the answer makes a new one.
    fn poll_event_holding_less(&mut self, cx: &mut Context<'_>) -> Poll<CallerEvent> {
        if self.buf.is_empty() && self.buf.capacity() > 0 && self.body_complete() {
            self.buf = BytesMut::new();
        }
        self.poll_event(cx)
    }

    /// Whether the request's body was dropped before its end.
    fn body_abandoned(&self) -> bool {
        self.feed.as_ref().is_some_and(|feed| {
            let fed = feed.lock();
            fed.dropped && !fed.framing.is_done()
        })
    }

    /// Whether the request's body was read to its end (or came whole with its head).
    fn body_complete(&self) -> bool {
        self.feed
            .as_ref()
            .is_none_or(|feed| feed.lock().framing.is_done())
    }
}

/// What the request asked that shapes its answer on the wire.
#[derive(Clone, Copy)]
struct Asked {
    /// A `HEAD` request: the answer has no body.
    head: bool,
    /// From an HTTP/1.0 caller: no chunked coding.
    http10: bool,
}

/// The request's body: taken whole from `buf` when it is all there, else a feed that the
/// connection fills as the service reads.
fn take_body(
    buf: &mut BytesMut,
    framing: RequestFraming,
    expects_continue: bool,
) -> (RequestBody, Option<Arc<Feed>>) {
    let framing = match framing {
        RequestFraming::Length(0) => return (RequestBody::complete(Bytes::new()), None),
        RequestFraming::Length(length) if length <= buf.len() as u64 => {
            let data = buf.split_to(length as usize).freeze();
            return (RequestBody::complete(data), None);
        }
        RequestFraming::Length(length) => Framing::Length(length),
        RequestFraming::Chunked => Framing::Chunked(Chunked::Size),
    };
    let mut fed = Fed {
        framing,
        pieces: VecDeque::new(),
        ended: false,
        error: None,
        waker: None,
        connection: None,
        dropped: false,
        expects_continue,
    };
    fed.decode_from(buf);
    if !buf.is_empty() || fed.ended {
        // The body came whole (pipelined requests may follow): no 100 Continue needed.
        fed.expects_continue = false;
    }
    let feed = Arc::new(Feed(Mutex::new(fed)));
    (
        RequestBody {
            kind: BodyKind::Fed(Arc::clone(&feed)),
        },
        Some(feed),
    )
}

/// Reads for a body that waits for its next piece: `Ready(Ok)` when the body has something new
/// (a piece, its end, an error), `Pending` while neither the body nor the socket is ready.
fn feed_body(
    feed: &Feed,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    continue_sent: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    loop {
        let mut fed = feed.lock();
        if !fed.is_starved() {
            match &mut fed.connection {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        if fed.expects_continue {
            drop(fed);
            while *continue_sent < CONTINUE.len() {
                let written = std::task::ready!(
                    Pin::new(&mut *stream).poll_write(cx, &CONTINUE[*continue_sent..])
                )?;
                *continue_sent += written;
            }
            feed.lock().expects_continue = false;
            continue;
        }
        if fed.decode_from(buf) {
            return Poll::Ready(Ok(()));
        }
        drop(fed);
        make_read_room(buf);
        let read = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *stream),
            cx,
            buf
        ))?;
        if read == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "caller closed the connection before the request body ended",
            )));
        }
    }
}

/// What the caller's side of the connection did while the service or an answer's body waited.
enum CallerEvent {
    /// The request body has something new: poll again.
    BodyFed,
    /// The caller closed the connection (or it failed).
    Left,
}

/// Reads ahead on the caller's connection while its request is in flight: `Ready` when the
/// caller has closed it (or it failed); bytes it sends meanwhile (a pipelined request, or the
/// rest of a body nobody asked for yet) are kept.
///
/// With nothing kept, it waits for the socket before it makes room to read: a stream waiting for
/// its backend holds no read buffer (see `write_response`).
fn watch_caller(stream: &mut TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
    while buf.len() < READ_AHEAD_LIMIT {
        if buf.is_empty() && std::task::ready!(stream.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        make_read_room(buf);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Pending
}

/// Parses the request head at the front of `buf` and removes it; `None` while incomplete.
fn parse_request_head(buf: &mut BytesMut) -> Result<Option<Head>, Refusal> {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head larger than 64 KiB",
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "more than 100 request header fields",
            ));
        }
        Err(_) => return Err(Refusal::bad_request("malformed request head")),
    };
    if length > MAX_HEAD_BYTES {
        return Err(Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head larger than 64 KiB",
        ));
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad_request("invalid method"))?;
    let http10 = parsed.version == Some(0);
    // Offsets into the head, to slice it once it is frozen.
    let base = buf.as_ptr() as usize;
    let target = parsed.path.unwrap_or_default().as_bytes();
    let target_start = target.as_ptr() as usize - base;
    let target = target_start..target_start + target.len();
    let mut spans = [FieldSpan::default(); MAX_HEADERS];
    let mut scan = RequestFields::default();
    let count = parsed.headers.len();
    for (field, span) in parsed.headers.iter().zip(spans.iter_mut()) {
        let name = field.name.as_bytes();
        scan.read(name, field.value)?;
        *span = FieldSpan::of(base, name, field.value);
    }
    let body = scan.body_framing(http10)?;
    let keep_alive = if http10 { scan.keep_alive } else { !scan.close };
    let expects_continue = scan.expects_continue && !http10;
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target))
        .map_err(|_| Refusal::bad_request("invalid request target"))?;
    // Room for the fields the middleware adds (the backend's credential, ...).
    let headers = header_map(&head, &spans[..count], 2).map_err(|e| match e {
        InvalidField::Name => Refusal::bad_request("invalid header name"),
        InvalidField::Value => Refusal::bad_request("invalid header value"),
    })?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http10 {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive,
        expects_continue,
    }))
}

/// What the framing and connection fields of a request head say.
#[derive(Default)]
struct RequestFields {
    content_length: Option<u64>,
    /// Whether a `Transfer-Encoding` field is present, and whether its last coding so far is
    /// `chunked`.
    transfer_encoding: Option<bool>,
    /// A coding other than `chunked` came before it.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    expects_continue: bool,
}

impl RequestFields {
    fn read(&mut self, name: &[u8], value: &[u8]) -> Result<(), Refusal> {
        // Four names, told apart by length first: `FieldRole::of`, which knows every hop-by-hop
        // name, cost about 200 more instructions per proxied request here.
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            14 if is(b"content-length") => {
                let length = agreed_length(value, self.content_length).map_err(|e| match e {
                    LengthError::Invalid => Refusal::bad_request("invalid Content-Length"),
                    LengthError::Conflicting => {
                        Refusal::bad_request("conflicting Content-Length values")
                    }
                })?;
                self.content_length = Some(length);
            }
            17 if is(b"transfer-encoding") => {
                for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if coding.is_empty() {
                        continue;
                    }
                    if self.transfer_encoding == Some(true) {
                        // Something after `chunked`: the body's end cannot be told.
                        return Err(Refusal::bad_request(
                            "chunked is not the last transfer coding",
                        ));
                    }
                    let chunked = coding.eq_ignore_ascii_case(b"chunked");
                    self.other_coding |= !chunked;
                    self.transfer_encoding = Some(chunked);
                }
            }
            10 if is(b"connection") => {
                for option in connection_options(value) {
                    self.close |= option.eq_ignore_ascii_case(b"close");
                    self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            6 if is(b"expect") => {
                self.expects_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        Ok(())
    }

    fn body_framing(&self, http10: bool) -> Result<RequestFraming, Refusal> {
        match (self.transfer_encoding, self.content_length) {
            (None, length) => Ok(RequestFraming::Length(length.unwrap_or(0))),
            (Some(_), Some(_)) => Err(Refusal::bad_request(
                "both Transfer-Encoding and Content-Length",
            )),
            (Some(_), None) if http10 => Err(Refusal::bad_request(
                "Transfer-Encoding in an HTTP/1.0 request",
            )),
            (Some(false), None) => Err(Refusal::bad_request(
                "chunked is not the last transfer coding",
            )),
            (Some(true), None) if self.other_coding => Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            )),
            (Some(true), None) => Ok(RequestFraming::Chunked),
        }
    }
}

/// Answers a refused request and ends the connection.
async fn refuse(mut caller: Caller, out: &mut Vec<u8>, refusal: &Refusal) -> io::Result<()> {
    let body = format!(
        r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
        refusal
            .status
            .canonical_reason()
            .unwrap_or("Error")
            .replace(' ', ""),
        refusal.message
    );
    out.clear();
    write_status_line(out, refusal.status);
    out.extend_from_slice(b"content-type: application/json\r\n");
    write_content_length(out, body.len() as u64);
    out.extend_from_slice(b"connection: close\r\n");
    write_date(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    write_all(&mut caller.sender(), out).await?;
    close(caller.stream, BytesMut::new()).await;
    Ok(())
}

/// Closes a connection without losing the answer just written: the write side is shut first,
/// and what the caller still sends (a body nobody read, say) is read and dropped for a moment,
/// because closing a socket with unread bytes resets the connection, and a reset can reach the
/// caller before it has read the answer.
async fn close(mut stream: TcpStream, mut buf: BytesMut) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut drained = 0;
        while drained < CLOSE_DRAIN_LIMIT {
            buf.clear();
            make_read_room(&mut buf);
            match tokio::io::AsyncReadExt::read_buf(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIME, drain).await;
}

fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// How an answer's body is delimited on the wire.
#[derive(PartialEq, Eq)]
enum Delimited {
    /// No body is written (`HEAD`, 1xx, 204, 304).
    Nothing,
    Length(u64),
    Chunked,
    /// By closing the connection (an HTTP/1.0 caller, a body of unknown size).
    Close,
}

/// Writes a `Connection` field with the options of `options` that name fields, if any.
fn write_named_options(out: &mut Vec<u8>, options: &[u8]) {
    let mut named = connection_options(options).filter(|option| names_a_field(option));
    let Some(first) = named.next() else {
        return;
    };
    out.extend_from_slice(b"connection: ");
    out.extend_from_slice(first);
    for option in named {
        out.extend_from_slice(b", ");
        out.extend_from_slice(option);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the answer of `head` and `body`; whether the connection may carry another request.
///
/// The head's fields are freed once it has gone out rather than while the caller waits for it.
/// They are kept in the argument, which lives as long as the future anyway, so that this costs
/// the connection's future no room.
async fn write_response<B>(
    caller: &mut Caller,
    out: &mut Vec<u8>,
    mut head: http::response::Parts,
    body: B,
    asked: Asked,
    mut keep_alive: bool,
) -> io::Result<bool>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let status = head.status;
    if status.is_informational() {
        // Not an answer: the caller would wait on for the final one. Treated as the service
        // failing.
        return Err(io::Error::other(format!(
            "the service answered with an interim status ({status})"
        )));
    }
    out.clear();
    write_status_line(out, status);
    let mut declared = None;
    let mut date = false;
    for (name, value) in &head.headers {
        if *name == http::header::CONTENT_LENGTH {
            if declared.is_none() {
                declared = parse_decimal(value.as_bytes());
            }
            continue;
        }
        if *name == http::header::CONNECTION {
            let options = value.as_bytes();
            keep_alive &=
                !connection_options(options).any(|option| option.eq_ignore_ascii_case(b"close"));
            // `close` and `keep-alive` are the connection's to say (below); options naming the
            // answer's own hop-by-hop fields go to the caller with those fields.
            write_named_options(out, options);
            continue;
        }
        if *name == http::header::TRANSFER_ENCODING || name.as_str() == "keep-alive" {
            continue;
        }
        date |= *name == http::header::DATE;
        write_field(out, name, value);
    }
    if !date {
        write_date(out);
    }
    let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let length = declared.or_else(|| body.size_hint().exact());
    let delimited = if no_body {
        if status == StatusCode::NOT_MODIFIED
            && let Some(length) = declared
        {
            write_content_length(out, length);
        }
        Delimited::Nothing
    } else if asked.head {
        if let Some(length) = length {
            write_content_length(out, length);
        }
        Delimited::Nothing
    } else if let Some(length) = length {
        write_content_length(out, length);
        Delimited::Length(length)
    } else if asked.http10 {
        keep_alive = false;
        Delimited::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Delimited::Chunked
    };
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if asked.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if delimited == Delimited::Nothing {
        // The body is not sent; dropping it may close the backend's connection, which the
        // backend's `Content-Length` would have said nothing about anyway.
        drop(body);
        write_all(&mut caller.sender(), out).await?;
        return Ok(keep_alive);
    }
    let mut body = pin!(body);
    let mut left = match delimited {
        Delimited::Length(length) => Some(length),
        _ => None,
    };
    loop {
        if out.is_empty() && !(head.headers.is_empty() && head.extensions.is_empty()) {
            // The head has gone out: freed once, not again for each of a stream's frames.
            head.headers = HeaderMap::new();
            head.extensions = http::Extensions::new();
        }
        let next = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Next::Frame(frame)),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Next::Failed),
            Poll::Ready(None) => Poll::Ready(Next::End),
            // Whatever is ready goes out before waiting for more.
            Poll::Pending if !out.is_empty() => Poll::Ready(Next::Flush),
            // A request body that the answer carries on is read as the answer asks. A stream
            // that waits (for its next event) holds no write buffer either.
            Poll::Pending => {
                if out.capacity() > 0 {
                    *out = Vec::new();
                }
                match caller.poll_event_holding_less(cx) {
                    Poll::Ready(CallerEvent::BodyFed) => Poll::Ready(Next::Fed),
                    Poll::Ready(CallerEvent::Left) => Poll::Ready(Next::Failed),
                    Poll::Pending => Poll::Pending,
                }
            }
        })
        .await;
        match next {
            Next::Fed => {}
            Next::Flush => write_all(&mut caller.sender(), out).await?,
            Next::Frame(frame) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers are not sent.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if let Some(left) = &mut left {
                    if data.len() as u64 > *left {
                        // The body runs past its length: the caller gets what was promised,
                        // and the connection is closed.
                        write_data(&mut caller.sender(), out, &data[..*left as usize]).await?;
                        write_all(&mut caller.sender(), out).await?;
                        return Ok(false);
                    }
                    *left -= data.len() as u64;
                }
                if delimited == Delimited::Chunked {
                    out.extend_from_slice(chunk_size_line(data.len(), &mut [0; 20]));
                    write_data(&mut caller.sender(), out, &data).await?;
                    out.extend_from_slice(b"\r\n");
                } else {
                    write_data(&mut caller.sender(), out, &data).await?;
                }
            }
            Next::End => {
                if delimited == Delimited::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                write_all(&mut caller.sender(), out).await?;
                // A body that ended short of its length leaves the caller waiting for the rest:
                // closing the connection tells it.
                let complete = left.is_none_or(|left| left == 0);
                return Ok(keep_alive && complete && delimited != Delimited::Close);
            }
            Next::Failed => {
                // The answer cannot be completed (its body failed, or the caller left): what
                // was sent stands, and closing the connection without the last chunk tells the
                // caller it is cut short.
                let _ = write_all(&mut caller.sender(), out).await;
                return Ok(false);
            }
        }
    }
}

/// What an answer's body has next.
enum Next {
    Frame(Frame<Bytes>),
    End,
    Failed,
    /// Nothing yet: write out what is waiting.
    Flush,
    /// Nothing yet, but the request body it may be carrying on got more: poll it again.
    Fed,
}

/// Appends `data` to `out`, or, when it is large, writes `out` and then `data` itself.
async fn write_data(stream: &mut Sender<'_>, out: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
    if data.len() <= COPY_LIMIT {
        out.extend_from_slice(data);
        return Ok(());
    }
    write_all(stream, out).await?;
    write_whole(stream, data).await
}

/// Writes all of `out` and clears it.
async fn write_all(stream: &mut Sender<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    write_whole(stream, out).await?;
    out.clear();
    Ok(())
}

/// Writes all of `data`.
async fn write_whole(stream: &mut Sender<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let written = stream.write_some(data).await?;
        data = &data[written..];
    }
    Ok(())
}

/// The caller's socket, written with the send timeout.
struct Sender<'a> {
    socket: &'a mut TcpStream,
    /// How long a write may wait for room.
    timeout: Option<Duration>,
}

impl Sender<'_> {
    /// One write of some of `data`. A socket that is writable is written without registering
    /// for readiness (a plain `write` system call); only a full one waits, for at most the send
    /// timeout (a timer only then, not for every write).
    async fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.socket.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => return Ok(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.timeout {
                    None => self.socket.writable().await?,
                    Some(timeout) => tokio::time::timeout(timeout, self.socket.writable())
                        .await
                        .map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the caller read nothing of its answer for the send timeout",
                            )
                        })??,
                },
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends a `Date` field with the current time, formatted once a second per thread.
fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    DATE.with_borrow_mut(|(second, text)| {
        if *second != now.as_secs() {
            *second = now.as_secs();
            let formatted = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(*second));
            text.copy_from_slice(&formatted.as_bytes()[..29]);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &str) -> Result<Option<Head>, Refusal> {
        parse_request_head(&mut BytesMut::from(raw))
    }

    fn refusal_of(raw: &str) -> (StatusCode, &'static str) {
        match head_of(raw) {
            Err(refusal) => (refusal.status, refusal.message),
            Ok(_) => panic!("{raw:?} was accepted"),
        }
    }

    #[test]
    fn a_head_is_parsed_into_the_request_and_its_framing() {
        let mut buf = BytesMut::from(
            "POST /openai/x?api-version=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
        );
        let head = parse_request_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/openai/x?api-version=1");
        assert_eq!(head.request.version(), http::Version::HTTP_11);
        let values: Vec<_> = head.request.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert!(matches!(head.body, RequestFraming::Length(5)));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert!(
            head_of("POST / HTTP/1.1\r\nHost: gw\r\n")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_field() {
        let keep = |raw: &str| head_of(raw).unwrap().unwrap().keep_alive;
        assert!(keep("GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases = [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
        ];
        for raw in cases {
            assert_eq!(refusal_of(raw).0, StatusCode::BAD_REQUEST, "{raw:?}");
        }
        let (status, message) =
            refusal_of("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{message}");
    }

    #[test]
    fn agreeing_lengths_are_one_length() {
        let head = head_of("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5, 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(head.body, RequestFraming::Length(5)));
    }

    #[test]
    fn oversized_and_malformed_heads_are_refused() {
        let fields: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        assert_eq!(
            refusal_of(&raw).0,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let raw = format!(
            "GET / HTTP/1.1\r\nx-big: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES + 1)
        );
        assert_eq!(
            refusal_of(&raw).0,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            refusal_of("GET / HTTP/2.0\r\n\r\n").0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refusal_of("G\0T / HTTP/1.1\r\n\r\n").0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refusal_of("GET / HTTP/1.1\r\nx: a\0b\r\n\r\n").0,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn a_body_in_the_buffer_is_taken_whole() {
        let mut buf = BytesMut::from("helloGET");
        let (body, feed) = take_body(&mut buf, RequestFraming::Length(5), false);
        assert!(feed.is_none());
        assert!(matches!(&body.kind, BodyKind::Complete(Some(data)) if data == "hello"));
        assert_eq!(&buf[..], b"GET");
    }

    #[test]
    fn a_chunked_body_in_the_buffer_is_decoded_and_what_follows_kept() {
        let mut buf = BytesMut::from("5\r\nhello\r\n0\r\n\r\nGET");
        let (body, feed) = take_body(&mut buf, RequestFraming::Chunked, true);
        let feed = feed.unwrap();
        let fed = feed.lock();
        assert!(fed.ended);
        assert!(
            !fed.expects_continue,
            "a body already here needs no 100 Continue"
        );
        assert_eq!(fed.pieces, [Bytes::from_static(b"hello")]);
        drop(fed);
        assert_eq!(&buf[..], b"GET");
        drop(body);
        assert!(feed.lock().dropped);
    }
}
