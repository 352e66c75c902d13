//! Idle keep-alive connections to one backend, one list per thread.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use thread_local::ThreadLocal;

use crate::conn::Stream;

/// Idle connections kept per backend and thread; more are closed when they come back.
const MAX_IDLE_PER_THREAD: usize = 256;

/// The idle connections of one backend.
///
/// Each thread has its own list, so taking and returning a connection is a thread-local
/// `RefCell` borrow: no lock, no atomic, no other thread woken. A connection is taken last in,
/// first out (the warmest); connections idle longer than the idle timeout are closed when the
/// next one comes back, so that a quiet backend's sockets do not stay open forever.
///
/// An idle connection keeps the unused end of its last read buffer (at most 8 KiB), where the
/// next response is read without a new allocation.
///
/// Taking reads no clock: a connection the backend closed is refused by [`Stream::is_open`],
/// whatever its age, and one it keeps open is good to use.
pub(crate) struct Pool {
    idle: ThreadLocal<RefCell<Vec<Idle>>>,
    idle_timeout: Duration,
}

struct Idle {
    stream: Stream,
    /// What is left of the last response's read buffer, for the next response.
    buf: BytesMut,
    since: Instant,
}

impl Pool {
    pub(crate) fn new(idle_timeout: Duration) -> Self {
        Self {
            idle: ThreadLocal::new(),
            idle_timeout,
        }
    }

    /// The most recently returned connection that is still open, if any, with what is left of
    /// its read buffer.
    pub(crate) fn take(&self) -> Option<(Stream, BytesMut)> {
        let mut idle = self.idle.get()?.borrow_mut();
        while let Some(mut entry) = idle.pop() {
            if entry.stream.is_open() {
                return Some((entry.stream, entry.buf));
            }
        }
        None
    }

    /// Keeps a connection whose last response was read whole, and the empty rest of its read
    /// buffer, for the next request on this thread. Closes connections that have idled too long.
    pub(crate) fn put(&self, stream: Stream, buf: BytesMut) {
        debug_assert!(buf.is_empty());
        let now = Instant::now();
        let mut idle = self.idle.get_or_default().borrow_mut();
        if idle
            .first()
            .is_some_and(|oldest| now.duration_since(oldest.since) >= self.idle_timeout)
        {
            idle.retain(|entry| now.duration_since(entry.since) < self.idle_timeout);
        }
        if idle.len() < MAX_IDLE_PER_THREAD {
            idle.push(Idle {
                stream,
                buf,
                since: now,
            });
        }
    }
}
