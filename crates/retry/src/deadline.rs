//! The deadline of a whole request, with a timer only when something could outlast it.

use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// A deadline's settings, shared by every request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadlineSettings {
    pub(crate) limit: Duration,
    /// The timeout each backend applies to an attempt, if known.
    pub(crate) attempt_timeout: Option<Duration>,
}

pin_project! {
    /// One request's deadline.
    ///
    /// Arming a timer costs a clock read, a timer-wheel insertion and a removal, for every
    /// request, though the deadline almost never passes. So the timer is armed only when
    /// something could outlast the deadline: a body that is not read at once, an attempt that
    /// may start too late for its own timeout to end before the deadline (or whose timeout is
    /// unknown), a backoff. Otherwise the attempt's own timeout wakes the request first.
    pub(crate) struct Deadline {
        // The settings and when the request started; `None` without a deadline.
        started: Option<(DeadlineSettings, Instant)>,
        // Boxed: rarely armed, and a `Sleep` would make every request's future larger.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl Deadline {
    pub(crate) fn new(settings: Option<DeadlineSettings>) -> Self {
        Self {
            started: settings.map(|settings| (settings, Instant::now())),
            timer: None,
        }
    }

    /// The deadline, if there is one and it has passed, as far as the armed timer tells; arms
    /// nothing.
    pub(crate) fn elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Duration> {
        let this = self.project();
        let timer = this.timer.as_mut()?;
        let (settings, _) = (*this.started)?;
        timer.as_mut().poll(cx).is_ready().then_some(settings.limit)
    }

    /// Arms the timer, if there is a deadline and it is not armed yet, for something whose end
    /// is unknown: a body read, a backoff. True when it was armed just now: the caller polls
    /// [`Deadline::elapsed`] next, which registers the timer's waker.
    pub(crate) fn arm(self: Pin<&mut Self>) -> bool {
        let this = self.project();
        if this.timer.is_some() {
            return false;
        }
        let Some((settings, started)) = *this.started else {
            return false;
        };
        *this.timer = Some(Box::pin(tokio::time::sleep_until(started + settings.limit)));
        true
    }

    /// Called as an attempt starts (`first`: the first one, which starts when the request did,
    /// its body having been read at once): arms the timer unless the attempt's own timeout ends
    /// before the deadline.
    pub(crate) fn attempt_starts(self: Pin<&mut Self>, first: bool) {
        let Some((settings, started)) = self.started else {
            return;
        };
        if self.timer.is_some() {
            return;
        }
        let outlasts = settings.attempt_timeout.is_none_or(|timeout| {
            let elapsed = if first {
                Duration::ZERO
            } else {
                started.elapsed()
            };
            elapsed.saturating_add(timeout) > settings.limit
        });
        if outlasts {
            self.arm();
        }
    }
}
