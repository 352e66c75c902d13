//! [`UpstreamBody`]: a backend's response body, read straight from its connection.

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::{
    conn::Stream,
    error::UpstreamError,
    http1::{Decoded, Framing},
    pool::Pool,
};

/// Bytes asked of the socket per read.
pub(crate) const READ_SIZE: usize = 8 * 1024;

/// Makes room for the next read: a buffer with less than a quarter of a read's worth of spare
/// capacity gets a read's worth more.
pub(crate) fn make_read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
}

/// The response body of [`Upstream`](crate::Upstream).
///
/// It is read from the backend's connection as the caller polls it, one frame per read, with no
/// buffering beyond one read: an SSE stream reaches the caller event by event. Once the body has
/// been read whole, the connection goes back to the pool for the next request; dropped early,
/// the connection is closed.
///
/// While a plain (loopback) connection waits for the backend, the body holds no read buffer.
pub struct UpstreamBody {
    state: State,
}

enum State {
    /// Read whole with the head; the connection is already back in the pool.
    Complete(Option<Bytes>),
    Streaming(Box<Streaming>),
    Done,
}

struct Streaming {
    stream: Stream,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
}

impl UpstreamBody {
    pub(crate) fn complete(data: Bytes) -> Self {
        Self {
            state: if data.is_empty() {
                State::Done
            } else {
                State::Complete(Some(data))
            },
        }
    }

    pub(crate) fn streaming(
        stream: Stream,
        buf: BytesMut,
        framing: Framing,
        keep_alive: bool,
        pool: Arc<Pool>,
    ) -> Self {
        Self {
            state: State::Streaming(Box::new(Streaming {
                stream,
                buf,
                framing,
                keep_alive,
                pool,
            })),
        }
    }
}

impl Streaming {
    /// The next piece of the body, reading from the socket as needed.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            match self.framing.decode(&mut self.buf)? {
                Decoded::Data(data) => return Poll::Ready(Ok(Some(data))),
                Decoded::End => return Poll::Ready(Ok(None)),
                Decoded::NeedMore => {}
            }
            if self.buf.is_empty() {
                // Wait for the backend without holding a buffer; an idle stream costs little.
                if self.stream.poll_read_ready(cx)?.is_pending() {
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
            make_read_room(&mut self.buf);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.stream),
                cx,
                &mut self.buf
            ))?;
            if read == 0 {
                self.framing.at_eof()?;
                return Poll::Ready(Ok(None));
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        match &mut this.state {
            State::Complete(data) => {
                let data = data.take();
                this.state = State::Done;
                Poll::Ready(data.map(|data| Ok(Frame::data(data))))
            }
            State::Streaming(streaming) => match ready!(streaming.poll_data(cx)) {
                Ok(Some(data)) => {
                    if streaming.framing.is_done() {
                        this.finish();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Err(e) => {
                    this.state = State::Done;
                    Poll::Ready(Some(Err(UpstreamError::Body(e))))
                }
            },
            State::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Complete(data) => data.is_none(),
            State::Streaming(_) => false,
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Complete(Some(data)) => SizeHint::with_exact(data.len() as u64),
            State::Streaming(streaming) => match streaming.framing {
                Framing::Length(remaining) => SizeHint::with_exact(remaining),
                _ => SizeHint::default(),
            },
            State::Complete(None) | State::Done => SizeHint::with_exact(0),
        }
    }
}

impl UpstreamBody {
    /// Ends the body: a connection that read its response exactly and may be kept alive goes
    /// back to the pool.
    fn finish(&mut self) {
        if let State::Streaming(streaming) = std::mem::replace(&mut self.state, State::Done) {
            let Streaming {
                stream,
                buf,
                framing,
                keep_alive,
                pool,
            } = *streaming;
            if keep_alive && framing.is_done() && buf.is_empty() {
                pool.put(stream, buf);
            }
        }
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Complete(_) => "Complete",
            State::Streaming(_) => "Streaming",
            State::Done => "Done",
        };
        f.debug_struct("UpstreamBody")
            .field("state", &state)
            .finish()
    }
}
