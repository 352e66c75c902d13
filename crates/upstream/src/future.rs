//! The response future of [`Upstream`](crate::Upstream).

use std::{
    cell::RefCell,
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use tokio_util::sync::ReusableBoxFuture;

use crate::{body::UpstreamBody, error::UpstreamError};

type Answer = Result<Response<UpstreamBody>, UpstreamError>;

/// A backend exchange, in a box that goes back to its thread's spares once it has answered.
type Exchange = ReusableBoxFuture<'static, Answer>;

/// Boxes kept per thread for the next exchanges: as many as a thread has had in flight at once,
/// up to this.
const SPARE_BOXES: usize = 64;

thread_local! {
    /// This thread's boxes of exchanges that have answered, each holding a finished future.
    static SPARES: RefCell<Vec<Exchange>> = const { RefCell::new(Vec::new()) };
}

/// `exchange` in a box: a spare one of this thread's, or a new one.
pub(crate) fn boxed<F>(exchange: F) -> Exchange
where
    F: Future<Output = Answer> + Send + 'static,
{
    // A thread whose locals are being destroyed has no spares.
    match SPARES
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
    {
        Some(mut spare) => {
            spare.set(exchange);
            spare
        }
        None => ReusableBoxFuture::new(exchange),
    }
}

/// Response future of [`Upstream`](crate::Upstream): the backend's response with its
/// hop-by-hop headers removed and its body streaming, or an [`UpstreamError`].
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    state: State,
}

enum State {
    // Sending the request and reading the response head.
    Sending(Exchange),
    // Refused before any backend contact; `None` once the error has been returned.
    Refused(Option<UpstreamError>),
    // Answered; the exchange's box went back to the thread's spares.
    Done,
}

impl ResponseFuture {
    pub(crate) fn sending(exchange: Exchange) -> Self {
        Self {
            state: State::Sending(exchange),
        }
    }

    pub(crate) fn refused(error: UpstreamError) -> Self {
        Self {
            state: State::Refused(Some(error)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<UpstreamBody>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Sending(exchange) => {
                let answer = std::task::ready!(exchange.poll(cx));
                if let State::Sending(finished) = std::mem::replace(&mut self.state, State::Done) {
                    // Dropped instead on a thread whose locals are being destroyed.
                    let _ = SPARES.try_with(|spares| {
                        let mut spares = spares.borrow_mut();
                        if spares.len() < SPARE_BOXES {
                            spares.push(finished);
                        }
                    });
                }
                Poll::Ready(answer)
            }
            State::Refused(error) => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
            State::Done => panic!("ResponseFuture polled after completion"),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Sending(_) => "Sending",
            State::Refused(_) => "Refused",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;

    use super::*;

    /// An exchange that answers at once.
    async fn answered() -> Answer {
        Ok(Response::new(UpstreamBody::complete(Bytes::from_static(
            b"ok",
        ))))
    }

    /// Where a box keeps its future.
    fn address(exchange: &mut Exchange) -> *const u8 {
        let future: &(dyn Future<Output = Answer> + Send) = &*exchange.get_pin();
        std::ptr::from_ref(future).cast::<u8>()
    }

    /// Drives `future` to its answer.
    async fn finish(mut future: ResponseFuture) {
        let answer = poll_fn(|cx| Pin::new(&mut future).poll(cx)).await;
        assert_eq!(answer.unwrap().status(), 200);
    }

    fn spares() -> usize {
        SPARES.with(|spares| spares.borrow().len())
    }

    #[tokio::test]
    async fn an_answered_exchanges_box_carries_the_next_exchange_on_its_thread() {
        SPARES.with(|spares| spares.borrow_mut().clear());
        let mut first = boxed(answered());
        let first_address = address(&mut first);
        finish(ResponseFuture::sending(first)).await;
        assert_eq!(spares(), 1, "the answered exchange's box should be kept");
        let mut second = boxed(answered());
        assert_eq!(spares(), 0, "the next exchange should take it");
        assert_eq!(address(&mut second), first_address);
        finish(ResponseFuture::sending(second)).await;
        assert_eq!(spares(), 1);
    }

    #[tokio::test]
    async fn a_thread_keeps_at_most_its_limit_of_spare_boxes() {
        SPARES.with(|spares| spares.borrow_mut().clear());
        let in_flight: Vec<_> = (0..SPARE_BOXES + 8).map(|_| boxed(answered())).collect();
        for exchange in in_flight {
            finish(ResponseFuture::sending(exchange)).await;
        }
        assert_eq!(spares(), SPARE_BOXES);
    }
}
