//! [`ReplayBody`]: a request body read once and replayed on every attempt.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A request body held in memory, cheap to clone: every attempt clones the [`Bytes`] (a
/// reference count), never the data.
#[derive(Debug, Clone, Default)]
pub struct ReplayBody {
    data: Option<Bytes>,
}

impl ReplayBody {
    /// A body that yields `data` once.
    pub fn new(data: Bytes) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// The bytes it yields (empty once yielded), for a layer that reads the request body
    /// before it is sent, such as one that finds the request's deployment in it.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}
