//! [`AttemptTimeout`]: each backend's timeout for one attempt, on a coarse timer.
//!
//! It behaves as tower's `Timeout` (an attempt still waiting for its response head when the
//! timeout has passed fails with [`tower::timeout::error::Elapsed`], which the classifier calls a
//! timeout and the gateway answers with 504), but it costs far less per attempt. tower's
//! `Timeout` reads the clock and inserts a tokio timer into the runtime's timer wheel for every
//! attempt, under a lock, and removes it afterwards: about a thousand instructions, for a timeout
//! that almost never passes. Here an attempt only takes a slot in its thread's list, stamped with
//! a tick count; one task per thread counts the ticks, a tenth of the timeout apart (at most one
//! second), and wakes the attempts whose time is up. No clock is read per attempt, and an attempt
//! whose answer is ready at its first poll takes no slot at all.
//!
//! The price is precision: an attempt fails between `timeout` and `timeout` plus two ticks after
//! it started (plus however late the runtime runs the tick task), never before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use thread_local::ThreadLocal;
use tokio::time::Instant;
use tower::Service;
use tower::timeout::error::Elapsed;

use crate::BoxError;

/// The shortest tick: timeouts below ten milliseconds are kept to within a millisecond or two.
const MIN_TICK: Duration = Duration::from_millis(1);
/// The longest tick: a five-minute timeout passes within two seconds of its time.
const MAX_TICK: Duration = Duration::from_secs(1);

/// The timer every backend's [`AttemptTimeout`] shares: the timeout, its tick, and one list of
/// waiting attempts per thread.
#[derive(Debug)]
pub(crate) struct AttemptTimer {
    tick: Duration,
    /// Whole ticks in the timeout, rounded up.
    ticks: u64,
    timeout: Duration,
    waiting: ThreadLocal<Arc<Waiting>>,
}

impl AttemptTimer {
    pub(crate) fn new(timeout: Duration) -> Self {
        let tick = (timeout / 10).clamp(MIN_TICK, MAX_TICK);
        let ticks = u64::try_from(timeout.as_nanos().div_ceil(tick.as_nanos())).unwrap_or(u64::MAX);
        Self {
            tick,
            ticks,
            timeout,
            waiting: ThreadLocal::new(),
        }
    }

    /// The longest an attempt can wait before it fails: its timeout, plus two ticks.
    pub(crate) fn longest_wait(&self) -> Duration {
        self.timeout.saturating_add(self.tick * 2)
    }

    /// This thread's list of waiting attempts.
    fn waiting(&self) -> Arc<Waiting> {
        Arc::clone(self.waiting.get_or(|| Arc::new(Waiting::new(self.tick))))
    }
}

/// Fails a call of the inner service that has not answered within the [`AttemptTimer`]'s
/// timeout with [`Elapsed`].
#[derive(Debug, Clone)]
pub(crate) struct AttemptTimeout<S> {
    inner: S,
    timer: Arc<AttemptTimer>,
}

impl<S> AttemptTimeout<S> {
    pub(crate) fn new(inner: S, timer: Arc<AttemptTimer>) -> Self {
        Self { inner, timer }
    }
}

impl<S, Request> Service<Request> for AttemptTimeout<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            waiting: self.timer.waiting(),
            ticks: self.timer.ticks,
            joined: None,
        }
    }
}

/// Which waker a slot holds, told by its data and vtable pointers (what `Waker::will_wake`
/// compares), kept as numbers so that a re-poll with the same waker needs no lock to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WakerId(usize, usize);

impl WakerId {
    fn of(waker: &Waker) -> Self {
        Self(
            waker.data() as usize,
            std::ptr::from_ref(waker.vtable()) as usize,
        )
    }
}

pin_project! {
    /// Response future of [`AttemptTimeout`].
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // The list of the thread that called; the slot is taken there even if the future moves
        // to another thread, and given back there.
        waiting: Arc<Waiting>,
        ticks: u64,
        // The slot taken at the first poll that has to wait.
        joined: Option<Joined>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(joined) = this.joined.take() {
                this.waiting.leave(joined.slot);
            }
        }
    }
}

/// An attempt's slot in its thread's list: where it is, the tick it is due at, and which waker
/// it holds.
#[derive(Debug)]
struct Joined {
    slot: usize,
    due: u64,
    waker: WakerId,
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            if let Some(joined) = this.joined.take() {
                this.waiting.leave(joined.slot);
            }
            return Poll::Ready(result.map_err(Into::into));
        }
        let waker = WakerId::of(cx.waker());
        match this.joined {
            None => {
                let (slot, due) = this.waiting.join(*this.ticks, cx.waker());
                *this.joined = Some(Joined { slot, due, waker });
            }
            // Polled again by the waker the slot holds, before the tick it is due at (the tick
            // count only grows, and is counted before any slot is marked out of time): nothing
            // to check under the lock.
            Some(joined) if waker == joined.waker && this.waiting.now() < joined.due => {}
            Some(joined) => {
                if this.waiting.expired(joined.slot, cx.waker()) {
                    this.waiting.leave(joined.slot);
                    *this.joined = None;
                    return Poll::Ready(Err(Box::new(Elapsed::new())));
                }
                joined.waker = waker;
            }
        }
        Poll::Pending
    }
}

/// One thread's waiting attempts, and the tick count its ticking task advances.
#[derive(Debug)]
struct Waiting {
    tick: Duration,
    /// Ticks counted so far; written under the lock, read without it.
    now: AtomicU64,
    state: Mutex<WaitingState>,
}

#[derive(Debug, Default)]
struct WaitingState {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The ticking task that runs, if one does: its number (`ticker` counts them).
    ticking: Option<u64>,
    ticker: u64,
}

#[derive(Debug, Default)]
struct Slot {
    /// The tick at which the attempt's time is up.
    due: u64,
    expired: bool,
    waker: Option<Waker>,
}

impl WaitingState {
    /// Slots taken by waiting attempts.
    fn taken(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Waiting {
    fn new(tick: Duration) -> Self {
        Self {
            tick,
            now: AtomicU64::new(0),
            state: Mutex::default(),
        }
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, WaitingState> {
        // Nothing here panics while holding the lock; a poisoned list is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for an attempt that waits `ticks` from now, and starts the ticking task if
    /// none runs.
    ///
    /// Due `ticks + 1` ticks on: the next tick may come at once, but each one after it comes a
    /// whole tick's time after the one before, so the attempt waits at least `ticks` whole
    /// ticks, its timeout.
    fn join(self: &Arc<Self>, ticks: u64, waker: &Waker) -> (usize, u64) {
        let mut state = self.lock();
        let due = self.now().saturating_add(ticks).saturating_add(1);
        let slot = Slot {
            due,
            expired: false,
            waker: Some(waker.clone()),
        };
        let index = match state.free.pop() {
            Some(index) => {
                state.slots[index] = slot;
                index
            }
            None => {
                state.slots.push(slot);
                state.slots.len() - 1
            }
        };
        if state.ticking.is_none() {
            state.ticker += 1;
            let number = state.ticker;
            state.ticking = Some(number);
            drop(state);
            tokio::spawn(tick(Ticker {
                waiting: Arc::clone(self),
                number,
            }));
        }
        (index, due)
    }

    /// Whether the attempt in `slot` is out of time; if not, `waker` is the one to wake.
    fn expired(&self, slot: usize, waker: &Waker) -> bool {
        let mut state = self.lock();
        let slot = &mut state.slots[slot];
        if slot.expired {
            return true;
        }
        match &mut slot.waker {
            Some(known) if known.will_wake(waker) => {}
            other => *other = Some(waker.clone()),
        }
        false
    }

    fn leave(&self, slot: usize) {
        let mut state = self.lock();
        state.slots[slot] = Slot::default();
        state.free.push(slot);
    }
}

/// The ticking task of one thread's [`Waiting`]; marks it as having none when it ends, also when
/// its runtime drops it.
struct Ticker {
    waiting: Arc<Waiting>,
    number: u64,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let mut state = self.waiting.lock();
        if state.ticking == Some(self.number) {
            state.ticking = None;
        }
    }
}

/// Counts ticks while attempts wait, waking those whose time is up; ends when none waits.
async fn tick(ticker: Ticker) {
    let period = ticker.waiting.tick;
    let mut next = Instant::now() + period;
    let mut wakers = Vec::new();
    loop {
        tokio::time::sleep_until(next).await;
        {
            let mut state = ticker.waiting.lock();
            // Read under the lock that counts the tick: an attempt that joined before this tick
            // joined before this time, and the next tick comes a whole tick after it.
            next = Instant::now() + period;
            let now = ticker.waiting.now() + 1;
            // Counted before any slot is marked, so that a re-poll that reads an earlier count
            // finds its slot not yet out of time.
            ticker.waiting.now.store(now, Ordering::Release);
            for slot in &mut state.slots {
                if slot.due <= now && !slot.expired && slot.waker.is_some() {
                    slot.expired = true;
                    wakers.extend(slot.waker.take());
                }
            }
            if state.taken() == 0 {
                state.ticking = None;
                return;
            }
        }
        // Woken outside the lock: a waker may run code of its own.
        wakers.drain(..).for_each(Waker::wake);
    }
}

// These tests run on real time, with timeouts of a few hundred milliseconds at most: tokio's
// paused clock (its `test-util` feature) would be compiled into the gateway example too, which
// gets this package's dev-dependencies, and its clock takes a lock on every reading.
#[cfg(test)]
mod tests {
    use super::*;

    use std::future::{Pending, pending, ready};

    use futures_util::FutureExt;
    use tower::ServiceExt;
    use tower::util::{ServiceFn, service_fn};

    fn timer(timeout: Duration) -> Arc<AttemptTimer> {
        Arc::new(AttemptTimer::new(timeout))
    }

    fn taken(timer: &AttemptTimer) -> usize {
        timer.waiting().lock().taken()
    }

    fn hang(_: ()) -> Pending<Result<(), BoxError>> {
        pending()
    }

    /// A backend that never answers.
    type Hung = ServiceFn<fn(()) -> Pending<Result<(), BoxError>>>;

    /// The timeout of [`hung`]: ticks of 10 ms.
    const HUNG_TIMEOUT: Duration = Duration::from_millis(100);

    /// A backend that never answers, behind a timeout of [`HUNG_TIMEOUT`].
    fn hung() -> AttemptTimeout<Hung> {
        AttemptTimeout::new(service_fn(hang as fn(()) -> _), timer(HUNG_TIMEOUT))
    }

    #[tokio::test]
    async fn a_call_that_never_answers_fails_with_elapsed_after_its_timeout() {
        let started = Instant::now();
        let error = hung().oneshot(()).await.unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        let waited = started.elapsed();
        assert!(waited >= HUNG_TIMEOUT, "{waited:?}");
        // Two ticks late at most, and whatever this shared machine adds.
        assert!(waited <= HUNG_TIMEOUT * 10, "{waited:?}");
    }

    #[tokio::test]
    async fn a_call_never_fails_before_its_timeout_whatever_the_phase_of_the_tick() {
        let timeout = Duration::from_millis(200);
        let timer = timer(timeout);
        // Calls that never answer, one after the other, keep the ticks (20 ms) going, and the
        // calls below start 7 ms apart, at every phase of a tick. (A tick fires up to a
        // millisecond late on tokio's timer, which would hide a call due a tick early only
        // with ticks of a few milliseconds.)
        let hung = AttemptTimeout::new(service_fn(hang as fn(()) -> _), Arc::clone(&timer));
        let keep_ticking = {
            let hung = hung.clone();
            async move {
                loop {
                    let _ = hung.clone().oneshot(()).await;
                }
            }
        };
        let calls = async {
            let mut calls = Vec::new();
            for _ in 0..25 {
                tokio::time::sleep(Duration::from_millis(7)).await;
                let started = Instant::now();
                // The instant it failed, taken as it failed.
                let call = hung.clone().oneshot(()).map(|result| {
                    let elapsed = result.is_err_and(|error| error.is::<Elapsed>());
                    (elapsed, Instant::now())
                });
                calls.push((started, tokio::spawn(call)));
            }
            for (started, call) in calls {
                let (elapsed, failed_at) = call.await.unwrap();
                assert!(elapsed);
                let waited = failed_at - started;
                assert!(waited >= timeout, "failed after {waited:?}");
            }
        };
        tokio::select! {
            () = calls => {}
            () = keep_ticking => unreachable!(),
        }
    }

    /// A waker that counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_call_polled_by_another_waker_is_woken_through_that_one() {
        let mut service = hung();
        let mut call = std::pin::pin!(service.call(()));
        let first = Arc::new(CountingWaker(Default::default()));
        let second = Arc::new(CountingWaker(Default::default()));
        let poll = |call: Pin<&mut ResponseFuture<_>>, waker: &Arc<CountingWaker>| {
            call.poll(&mut Context::from_waker(&Waker::from(Arc::clone(waker))))
        };
        assert!(poll(call.as_mut(), &first).is_pending());
        assert!(
            poll(call.as_mut(), &first).is_pending(),
            "same waker, nothing to do"
        );
        assert!(poll(call.as_mut(), &second).is_pending());
        tokio::time::sleep(HUNG_TIMEOUT * 3).await;
        assert_eq!(first.0.load(Ordering::Relaxed), 0);
        assert_eq!(second.0.load(Ordering::Relaxed), 1);
        let Poll::Ready(Err(error)) = poll(call.as_mut(), &second) else {
            panic!("the call did not time out");
        };
        assert!(error.is::<Elapsed>());
    }

    #[tokio::test]
    async fn an_immediate_answer_or_error_takes_no_slot() {
        let timer = timer(Duration::from_secs(1));
        let service = AttemptTimeout::new(
            service_fn(|fail: bool| {
                ready(if fail {
                    Err::<(), BoxError>("refused".into())
                } else {
                    Ok(())
                })
            }),
            Arc::clone(&timer),
        );
        service.clone().oneshot(false).await.unwrap();
        let error = service.oneshot(true).await.unwrap_err();
        assert_eq!(error.to_string(), "refused");
        assert_eq!(taken(&timer), 0);
        assert!(timer.waiting().lock().ticking.is_none(), "no ticking task");
    }

    #[tokio::test]
    async fn slots_are_given_back_on_answer_and_on_drop_and_the_ticking_stops() {
        // Ticks of 100 ms, a timeout no call below reaches.
        let timer = timer(Duration::from_secs(1));
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let answered = Arc::new(std::sync::Mutex::new(Some(answered)));
        let service = AttemptTimeout::new(
            service_fn(move |()| {
                let answered = answered.lock().unwrap().take();
                // The first call waits for the answer, the second for ever.
                async move {
                    match answered {
                        Some(answered) => answered.await.map_err(BoxError::from),
                        None => pending().await,
                    }
                }
            }),
            Arc::clone(&timer),
        );
        let first = tokio::spawn(service.clone().oneshot(()));
        let second = tokio::spawn(service.oneshot(()));
        tokio::task::yield_now().await;
        assert_eq!(taken(&timer), 2);
        answer.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(taken(&timer), 1);
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        assert_eq!(taken(&timer), 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            timer.waiting().lock().ticking.is_none(),
            "the ticking stopped"
        );
    }

    #[tokio::test]
    async fn many_waiting_calls_all_time_out_and_their_slots_are_reused() {
        let service = hung();
        for _ in 0..2 {
            let calls: Vec<_> = (0..1000)
                .map(|_| tokio::spawn(service.clone().oneshot(())))
                .collect();
            for call in calls {
                assert!(call.await.unwrap().unwrap_err().is::<Elapsed>());
            }
        }
        let state = service.timer.waiting();
        let state = state.lock();
        assert_eq!(state.slots.len(), 1000);
        assert_eq!(state.taken(), 0);
    }

    #[test]
    fn a_timer_outlives_the_runtime_that_ticked_it() {
        let service = hung();
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let error = runtime
                .block_on(async {
                    tokio::time::timeout(HUNG_TIMEOUT * 20, service.clone().oneshot(())).await
                })
                .expect("the call times out instead of hanging")
                .unwrap_err();
            assert!(error.is::<Elapsed>());
            // A call left waiting when its runtime goes away.
            let left = runtime.spawn(service.clone().oneshot(()));
            runtime.block_on(tokio::task::yield_now());
            drop(runtime);
            drop(left);
        }
    }

    #[test]
    fn ticks_are_a_tenth_of_the_timeout_within_bounds() {
        let tick = |timeout| AttemptTimer::new(timeout).tick;
        assert_eq!(tick(Duration::from_secs(300)), MAX_TICK);
        assert_eq!(tick(Duration::from_millis(300)), Duration::from_millis(30));
        assert_eq!(tick(Duration::from_micros(5)), MIN_TICK);
        let timer = AttemptTimer::new(Duration::from_millis(25));
        assert_eq!(timer.ticks, 10);
        assert_eq!(timer.longest_wait(), Duration::from_millis(30));
    }
}
