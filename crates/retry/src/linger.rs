//! Lingering on an over-limit body: the rest is read and dropped in the background, as nginx's
//! lingering close does, so that a caller that writes its whole body before reading the answer
//! reads the 413 instead of a connection reset.

use std::time::Duration;

use bytes::Buf;
use http_body::Body;
use http_body_util::BodyExt;

/// How long, and how much of, an over-limit body is read and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Linger {
    /// The longest it goes on in all (nginx's `lingering_time`).
    pub(crate) total: Duration,
    /// The longest wait for the next frame (nginx's `lingering_timeout`).
    pub(crate) idle: Duration,
    /// The most bytes read; the body is dropped at the first frame beyond.
    pub(crate) max_bytes: u64,
}

impl Linger {
    /// nginx's defaults (30 s in all, 5 s between frames), and at most 64 MiB.
    pub(crate) const DEFAULT: Self = Self {
        total: Duration::from_secs(30),
        idle: Duration::from_secs(5),
        max_bytes: 64 * 1024 * 1024,
    };

    /// Reads the rest of `body` and drops it, in a task of its own, if a tokio runtime is
    /// current (and lingering is on); otherwise drops it at once.
    pub(crate) fn spawn<B>(self, body: B)
    where
        B: Body + Send + Unpin + 'static,
    {
        if self.total.is_zero() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.drain(body));
        }
    }

    async fn drain<B: Body + Unpin>(self, mut body: B) {
        let mut left = self.max_bytes;
        let reading = async {
            while let Ok(Some(Ok(frame))) = tokio::time::timeout(self.idle, body.frame()).await {
                let len = frame.data_ref().map_or(0, |data| data.remaining() as u64);
                match left.checked_sub(len) {
                    Some(rest) => left = rest,
                    None => break,
                }
                if body.is_end_stream() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(self.total, reading).await;
    }
}
