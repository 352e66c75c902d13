//! An idle limit for HTTP/2 connections, which hyper's server does not keep: a connection with
//! no stream open for a whole limit is shut down gracefully (`GOAWAY`), and dropped if it has
//! not finished one limit later (a caller that never answers the `GOAWAY`'s ping). nginx keeps
//! the same limit (`keepalive_timeout` for HTTP/2). A stream counts as open from its request to
//! the end of its answer's body, so a stream that stays quiet for long (an SSE answer between
//! two events) is never cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// How many ticks of a quarter of the limit with no stream open close a connection: the fifth
/// such tick comes between one limit and a quarter more after the last stream ended.
const QUIET_TICKS: u32 = 5;

/// One connection's streams: how many are open now, and how many were ever opened.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    open: AtomicUsize,
    opened: AtomicUsize,
}

impl Streams {
    /// Counts a stream as open until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(self))
    }
}

/// A stream counted as open in its connection's [`Streams`] while this lives.
#[derive(Debug)]
pub(crate) struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
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
        let stream = this.stream.take();
        Poll::Ready(Ok(response.map(|body| OpenBody {
            body,
            _stream: stream,
        })))
    }
}

pin_project! {
    /// An answer's body that keeps its stream open until it ends or is dropped.
    pub(crate) struct OpenBody<B> {
        #[pin]
        body: B,
        _stream: Option<OpenStream>,
    }
}

impl<B: Body<Data = Bytes>> Body for OpenBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A connection that is shut down gracefully once it has had no stream open for `limit`,
    /// and dropped if it is still there one `limit` after that.
    pub(crate) struct IdleLimit<C> {
        #[pin]
        connection: C,
        // Starts the connection's graceful shutdown.
        start_shutdown: fn(Pin<&mut C>),
        streams: Arc<Streams>,
        #[pin]
        tick: Sleep,
        interval: Duration,
        // `streams.opened` at the last tick.
        seen: usize,
        // Ticks in a row with no stream open and none opened.
        quiet: u32,
        shutting_down: bool,
    }
}

impl<C> IdleLimit<C> {
    pub(crate) fn new(
        connection: C,
        start_shutdown: fn(Pin<&mut C>),
        streams: Arc<Streams>,
        limit: Duration,
    ) -> Self {
        let interval = limit / 4;
        Self {
            connection,
            start_shutdown,
            streams,
            tick: tokio::time::sleep(interval),
            interval,
            seen: 0,
            quiet: 0,
            shutting_down: false,
        }
    }

    /// Starts the connection's graceful shutdown (the worker is stopping).
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        (this.start_shutdown)(this.connection);
    }
}

impl<C: Future> Future for IdleLimit<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        while this.tick.as_mut().poll(cx).is_ready() {
            let opened = this.streams.opened.load(Ordering::Relaxed);
            if this.streams.open.load(Ordering::Relaxed) == 0 && opened == *this.seen {
                *this.quiet += 1;
            } else {
                *this.quiet = 0;
                *this.seen = opened;
            }
            if *this.quiet >= QUIET_TICKS {
                if *this.shutting_down {
                    return Poll::Ready(());
                }
                *this.shutting_down = true;
                *this.quiet = 0;
                (this.start_shutdown)(this.connection.as_mut());
            }
            let next = Instant::now() + *this.interval;
            this.tick.as_mut().reset(next);
        }
        this.connection.poll(cx).map(drop)
    }
}
