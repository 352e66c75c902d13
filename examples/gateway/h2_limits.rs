//! The limits nginx keeps on HTTP/2 connections and hyper's server does not:
//!
//! - **Idle:** a connection with no stream open for the idle limit (the gateway's head timeout;
//!   nginx's `keepalive_timeout`) is shut down gracefully (`GOAWAY`), and dropped if it has not
//!   finished one limit later (a caller that never answers the `GOAWAY`'s ping). A stream counts
//!   as open from its request to the end of its answer's body, so a stream that stays quiet for
//!   long (an SSE answer between two events) is never cut. The wait for the preface, before the
//!   connection is known to be HTTP/2, counts as time without a stream.
//! - **Send:** a connection on which a stream's answer waits to be sent (its caller's window is
//!   shut) while nothing of any answer moves for the send limit (nginx's `send_timeout`): no
//!   answer asked for more, no write to the socket. It is dropped, and the answers' bodies (the
//!   backends' streams) with it: a caller that reads nothing no longer holds its backend
//!   exchanges for good, and one that reads slowly keeps its answer.
//! - **Body:** a request body still arriving that the service waits on gets the body timeout
//!   (nginx's `client_body_timeout`) for its next frame, and then fails with a `TimedOut`
//!   error, which the gateway answers 408 as over HTTP/1.1: the lean server's own limit, as
//!   `aoai_upstream::server::TimedBody` around hyper's body.
//!
//! The idle and send limits are kept on one coarse tick per connection, a quarter of the
//! shorter limit: a limit is reached between its length and one tick more after the last event
//! that counts. The body timeout arms a timer of its own, boxed, only for a body that makes the
//! service wait (one that came with its head never does).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aoai_tower::upstream::server::TimedBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulConnection;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Ticks per limit; a limit is reached on the tick after that many quiet ones, so that it has
/// lasted a whole limit whenever in the first tick's interval the quiet began.
const TICKS_PER_LIMIT: u32 = 4;

/// One connection's streams, as its limits see them.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    /// Streams open now.
    open: AtomicUsize,
    /// Streams ever opened.
    opened: AtomicUsize,
    /// Streams whose answer has handed hyper a frame and has not been asked for the next one:
    /// hyper waits for the caller's window to open.
    waiting_to_send: AtomicUsize,
    /// Polls of the answers' bodies and writes to the socket that took something, ever: how
    /// the limits see the connection's answers move.
    moved: AtomicUsize,
}

impl Streams {
    /// Counts a stream as open until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            streams: Arc::clone(self),
            waiting_to_send: false,
        }
    }
}

/// A stream counted as open in its connection's [`Streams`] while this lives.
#[derive(Debug)]
pub(crate) struct OpenStream {
    streams: Arc<Streams>,
    /// Counted in `waiting_to_send`.
    waiting_to_send: bool,
}

impl OpenStream {
    /// The stream's answer is polled: it no longer waits to be sent.
    fn polled(&mut self) {
        self.streams.moved.fetch_add(1, Ordering::Relaxed);
        if std::mem::take(&mut self.waiting_to_send) {
            self.streams.waiting_to_send.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The stream's answer handed hyper a frame, which waits until hyper asks for the next one.
    fn handed_a_frame(&mut self) {
        self.waiting_to_send = true;
        self.streams.waiting_to_send.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.waiting_to_send {
            self.streams.waiting_to_send.fetch_sub(1, Ordering::Relaxed);
        }
        self.streams.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A service's future that keeps its stream open, and hands that on to the answer's body.
    pub(crate) struct OpenFuture<F> {
        #[pin]
        future: F,
        stream: Option<OpenStream>,
    }
}

impl<F> OpenFuture<F> {
    pub(crate) fn new(future: F, stream: OpenStream) -> Self {
        Self {
            future,
            stream: Some(stream),
        }
    }
}

impl<F, B, E> Future for OpenFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<OpenBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.future.poll(cx))?;
        let stream = this
            .stream
            .take()
            .expect("OpenFuture polled after completion");
        Poll::Ready(Ok(response.map(|body| OpenBody { body, stream })))
    }
}

pin_project! {
    /// An answer's body that keeps its stream open until it ends or is dropped, and tells its
    /// connection's limits whether it waits to be sent.
    pub(crate) struct OpenBody<B> {
        #[pin]
        body: B,
        stream: OpenStream,
    }
}

impl<B: Body<Data = Bytes>> Body for OpenBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        this.stream.polled();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.stream.handed_a_frame();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A connection's socket, counting in its [`Streams`] the writes that take something: how
    /// the limits see an answer going out while hyper asks no body for more (it waits for the
    /// caller's window to let out what it holds).
    pub(crate) struct CountedIo<I> {
        #[pin]
        io: I,
        streams: Arc<Streams>,
    }
}

impl<I> CountedIo<I> {
    pub(crate) fn new(io: I, streams: Arc<Streams>) -> Self {
        Self { io, streams }
    }
}

impl<I: hyper::rt::Read> hyper::rt::Read for CountedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write> hyper::rt::Write for CountedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        counted(this.streams, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        counted(this.streams, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Counts `written` in `streams` if it took something.
fn counted(streams: &Streams, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(1..)) = written {
        streams.moved.fetch_add(1, Ordering::Relaxed);
    }
    written
}

/// Ticks in a row on which something a limit watches has not happened.
struct Quiet {
    /// The watched count at the last tick.
    seen: usize,
    ticks: u32,
    /// Ticks that reach the limit.
    limit: u32,
}

impl Quiet {
    fn new(limit: Duration, interval: Duration) -> Self {
        let ticks = limit.as_nanos().div_ceil(interval.as_nanos().max(1));
        Self {
            seen: 0,
            ticks: 0,
            limit: u32::try_from(ticks).unwrap_or(u32::MAX).saturating_add(1),
        }
    }

    /// A limit whose condition has held for `quiet` already: its whole ticks count, short of
    /// the limit itself, which the next tick then reaches if `quiet` has lasted it.
    fn already(limit: Duration, interval: Duration, quiet: Duration) -> Self {
        let mut new = Self::new(limit, interval);
        let ticks = quiet.as_nanos() / interval.as_nanos().max(1);
        new.ticks = u32::try_from(ticks).map_or(new.limit - 1, |ticks| ticks.min(new.limit - 1));
        new
    }

    /// One tick: whether the limit is reached, `quiet` saying whether the tick found the
    /// condition the limit watches, and `count` moving meaning that something happened.
    fn tick(&mut self, quiet: bool, count: usize) -> bool {
        if quiet && count == self.seen {
            self.ticks += 1;
        } else {
            self.ticks = 0;
            self.seen = count;
        }
        self.ticks >= self.limit
    }
}

pin_project! {
    /// A connection with the idle and send limits.
    pub(crate) struct H2Limits<C> {
        #[pin]
        connection: C,
        streams: Arc<Streams>,
        #[pin]
        tick: Sleep,
        interval: Duration,
        // No stream open, none opened.
        idle: Quiet,
        // A stream waiting to be sent, and nothing moving: no answer polled, no socket write.
        stalled: Quiet,
        shutting_down: bool,
    }
}

impl<C: GracefulConnection> H2Limits<C> {
    /// The limits of a connection that has already gone `waited` without a stream (the wait for
    /// its preface), which its idle limit counts.
    pub(crate) fn new(
        connection: C,
        streams: Arc<Streams>,
        idle: Duration,
        send: Duration,
        waited: Duration,
    ) -> Self {
        let interval = idle.min(send) / TICKS_PER_LIMIT;
        Self {
            connection,
            streams,
            tick: tokio::time::sleep(interval),
            interval,
            idle: Quiet::already(idle, interval, waited),
            stalled: Quiet::new(send, interval),
            shutting_down: false,
        }
    }

    /// Starts the connection's graceful shutdown (the worker is stopping).
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        self.project().connection.graceful_shutdown();
    }
}

impl<C: GracefulConnection> Future for H2Limits<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        while this.tick.as_mut().poll(cx).is_ready() {
            let streams = &this.streams;
            let waiting = streams.waiting_to_send.load(Ordering::Relaxed) > 0;
            let moved = streams.moved.load(Ordering::Relaxed);
            if this.stalled.tick(waiting, moved) {
                // The caller reads nothing: a graceful shutdown would wait on it too.
                return Poll::Ready(());
            }
            let idle = streams.open.load(Ordering::Relaxed) == 0;
            let mut opened = streams.opened.load(Ordering::Relaxed);
            if *this.shutting_down {
                // Past the `GOAWAY`: what a stream that has ended left to send still goes out.
                opened = opened.wrapping_add(moved);
            }
            if this.idle.tick(idle, opened) {
                if *this.shutting_down {
                    return Poll::Ready(());
                }
                *this.shutting_down = true;
                this.idle.ticks = 0;
                this.connection.as_mut().graceful_shutdown();
            }
            let next = Instant::now() + *this.interval;
            this.tick.as_mut().reset(next);
        }
        this.connection.poll(cx).map(drop)
    }
}

/// The body of a request an HTTP/2 caller sends.
pub(crate) type RequestBody = TimedBody<Incoming>;
