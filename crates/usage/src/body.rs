//! [`UsageBody`]: the response body, passed through frame by frame while its usage is read.

use std::fmt;
use std::io::IoSlice;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Buf;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::scan::Scan;
use crate::{UsageCallback, UsageReport};

pin_project! {
    /// The response body of [`CountUsage`](crate::CountUsage): the inner body, every frame passed
    /// on the moment it arrives, its usage read on the way.
    ///
    /// The callback `F` is called exactly once: when the body ends (`complete: true`), when it
    /// fails or is dropped before its end (`complete: false`, with the usage seen so far).
    pub struct UsageBody<B, F>
    where
        F: UsageCallback,
    {
        #[pin]
        inner: B,
        counter: Counter<F>,
    }
}

impl<B, F> UsageBody<B, F>
where
    B: Body,
    F: UsageCallback,
{
    pub(crate) fn new(inner: B, mut counter: Counter<F>) -> Self {
        // A body already at its end may never be polled (hyper checks `is_end_stream` first).
        if inner.is_end_stream() {
            counter.finish(true);
        }
        Self { inner, counter }
    }

    /// Wraps the body of `response`, an answer of your own stack, so its usage reaches
    /// `callback`: what [`CountUsage`](crate::CountUsage) does to each response of its inner
    /// service, for code that has the response in hand. `callback.on_response` is called
    /// first. JSON answers (and single stream events) are parsed up to `parse_limit` bytes.
    pub fn wrap(response: Response<B>, callback: F, parse_limit: usize) -> Response<Self> {
        Counter::new(callback).wrap(response, Some(parse_limit))
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B, F> Body for UsageBody<B, F>
where
    B: Body,
    F: UsageCallback,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        match ready!(this.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if this.counter.first_data_at.is_none() && data.has_remaining() {
                        this.counter.first_data_at = Some(Instant::now());
                    }
                    this.counter.feed(data);
                }
                // hyper stops polling a body that says it has ended, so its last frame may be the
                // last poll: that is the end too.
                if this.inner.is_end_stream() {
                    this.counter.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                this.counter.finish(false);
                Poll::Ready(Some(Err(error)))
            }
            None => {
                this.counter.finish(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, F> fmt::Debug for UsageBody<B, F>
where
    B: fmt::Debug,
    F: UsageCallback,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageBody")
            .field("inner", &self.inner)
            .field("counter", &self.counter)
            .finish()
    }
}

/// The callback and what is read so far; calls the callback once, at the latest when dropped.
pub(crate) struct Counter<F>
where
    F: UsageCallback,
{
    callback: Option<F>,
    scan: Scan,
    first_data_at: Option<Instant>,
}

impl<F> Counter<F>
where
    F: UsageCallback,
{
    pub(crate) fn new(callback: F) -> Self {
        Self {
            callback: Some(callback),
            scan: Scan::Skip,
            first_data_at: None,
        }
    }

    /// Shows `response` to the callback, chooses how to read its body (parsing up to
    /// `parse_limit` bytes; with `None` its bytes are not looked at), and wraps the body.
    pub(crate) fn wrap<B: Body>(
        mut self,
        response: Response<B>,
        parse_limit: Option<usize>,
    ) -> Response<UsageBody<B, F>> {
        if let Some(callback) = self.callback.as_mut() {
            callback.on_response(&response);
        }
        if let Some(limit) = parse_limit {
            self.scan = Scan::for_headers(response.headers(), limit);
        }
        response.map(|body| UsageBody::new(body, self))
    }

    fn feed<D: Buf>(&mut self, data: &D) {
        // Once reported, the scan is `Skip`: nothing more is read.
        if !self.scan.wants_bytes() {
            return;
        }
        let chunk = data.chunk();
        if chunk.len() == data.remaining() {
            self.scan.feed(chunk);
            return;
        }
        // A buffer in several pieces (rare: hyper and axum hand out `Bytes`).
        let mut slices = [IoSlice::new(&[]); 64];
        let n = data.chunks_vectored(&mut slices);
        if slices[..n].iter().map(|s| s.len()).sum::<usize>() != data.remaining() {
            // Bytes we cannot see: better no usage than a wrong one.
            self.scan.abandon();
            return;
        }
        for slice in &slices[..n] {
            self.scan.feed(slice);
        }
    }

    /// Calls the callback, unless it was called already.
    pub(crate) fn finish(&mut self, complete: bool) {
        if let Some(callback) = self.callback.take() {
            let read = mem::replace(&mut self.scan, Scan::Skip)
                .finish(complete)
                .unwrap_or_default();
            callback.on_report(UsageReport {
                usage: read.usage,
                model: read.model,
                id: read.id,
                complete,
                first_data_at: self.first_data_at,
            });
        }
    }
}

impl<F> Drop for Counter<F>
where
    F: UsageCallback,
{
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<F> fmt::Debug for Counter<F>
where
    F: UsageCallback,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter")
            .field("reported", &self.callback.is_none())
            .field("scan", &self.scan)
            .finish()
    }
}
