//! [`RetryBudget`]: tower's `TpsBudget`, with a deposit of one atomic add.

use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::Budget;

/// The windows the budget's time to live is cut into.
const WINDOWS: u32 = 10;
/// Deposits between two looks at the clock; a withdrawal always looks.
const DEPOSITS_PER_EXPIRY: isize = 64;

/// A retry budget with the semantics of tower's [`TpsBudget`](tower::retry::budget::TpsBudget)
/// (retries may add `retry_percent` to the requests of the last `ttl`, plus `min_per_sec`
/// retries a second), cheaper to deposit into.
///
/// Every request deposits; tower's budget takes a lock and reads the clock on each deposit, to
/// move its window on. Here a deposit is one atomic add, and every 64th also moves the window on
/// (as does every withdrawal, which only a retry makes). Deposits are counted in the window they
/// are committed in: at most 64 of them count as more recent than they were (a slack of at most
/// 64 requests, against a reserve of `min_per_sec` times `ttl` retries), and when fewer than 64
/// come in a whole time to live, they may expire early, which allows fewer retries, not more.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// The index of the window being written and when it began.
    generation: Mutex<(usize, Instant)>,
    reserve: isize,
    slots: Box<[AtomicIsize]>,
    window: Duration,
    /// What the current window holds so far.
    writer: AtomicIsize,
    deposit_amount: isize,
    withdraw_amount: isize,
}

impl RetryBudget {
    /// As [`TpsBudget::new`](tower::retry::budget::TpsBudget::new): `ttl` between 1 and 60
    /// seconds (clamped here), `retry_percent` between 0 and 1000 (clamped).
    pub(crate) fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let retry_percent = retry_percent.clamp(0.0, 1000.0);
        // Whole amounts, as tower's: a deposit of 1 (or 1000) and a withdrawal of its inverse.
        let (deposit_amount, withdraw_amount) = if retry_percent == 0.0 {
            (0, 1)
        } else if retry_percent <= 1.0 {
            (1, (1.0 / retry_percent) as isize)
        } else {
            (1000, (1000.0 / retry_percent) as isize)
        };
        let reserve = isize::try_from(min_per_sec)
            .unwrap_or(isize::MAX)
            .saturating_mul(ttl.as_secs() as isize)
            .saturating_mul(withdraw_amount);
        Self {
            generation: Mutex::new((0, Instant::now())),
            reserve,
            slots: (0..WINDOWS).map(|_| AtomicIsize::new(0)).collect(),
            window: ttl / WINDOWS,
            writer: AtomicIsize::new(0),
            deposit_amount,
            withdraw_amount,
        }
    }

    /// Moves the window on to now: commits what the current window holds, and empties the
    /// windows that passed since.
    fn expire(&self) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (index, began) = *generation;
        let now = Instant::now();
        let mut elapsed = now.saturating_duration_since(began);
        if elapsed < self.window {
            return;
        }
        let committed = self.writer.swap(0, Ordering::SeqCst);
        self.slots[index].store(committed, Ordering::SeqCst);
        let mut index = (index + 1) % self.slots.len();
        while elapsed > self.window {
            self.slots[index].store(0, Ordering::SeqCst);
            elapsed -= self.window;
            index = (index + 1) % self.slots.len();
        }
        *generation = (index, now);
    }

    fn balance(&self) -> isize {
        self.slots
            .iter()
            .map(|slot| slot.load(Ordering::SeqCst))
            .fold(self.writer.load(Ordering::SeqCst), isize::saturating_add)
            .saturating_add(self.reserve)
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let before = self.writer.fetch_add(self.deposit_amount, Ordering::SeqCst);
        // The window's count tells when to look at the clock: every 64th deposit into it
        // (withdrawals shift the count, which only moves the next look a little).
        let deposits = before.checked_div(self.deposit_amount).unwrap_or(0);
        if deposits.rem_euclid(DEPOSITS_PER_EXPIRY) == DEPOSITS_PER_EXPIRY - 1 {
            self.expire();
        }
    }

    fn withdraw(&self) -> bool {
        self.expire();
        if self.balance() >= self.withdraw_amount {
            self.writer
                .fetch_add(-self.withdraw_amount, Ordering::SeqCst);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn withdrawals(budget: &RetryBudget) -> usize {
        (0..100_000).take_while(|_| budget.withdraw()).count()
    }

    /// Deposits `count` times, `every` apart (on the paused clock).
    async fn deposit(budget: &RetryBudget, count: isize, every: Duration) {
        for _ in 0..count {
            budget.deposit();
            tokio::time::advance(every).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_requests_the_reserve_allows_min_per_sec_for_the_ttl() {
        let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2);
        assert_eq!(withdrawals(&budget), 100);
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_allow_their_percent_of_retries_on_top() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        deposit(&budget, 1000, Duration::ZERO).await;
        assert_eq!(withdrawals(&budget), 10 + 200);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_older_than_the_ttl_no_longer_count() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.5);
        deposit(&budget, 1000, Duration::ZERO).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        // Half the time to live later, the deposits still count.
        assert!(budget.withdraw());
        tokio::time::advance(Duration::from_secs(6)).await;
        // Past it, only the reserve is left, less the withdrawal made meanwhile.
        assert_eq!(withdrawals(&budget), 10 - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_between_looks_at_the_clock_count_in_the_window_they_are_committed_in() {
        // Fewer deposits than make the budget look at the clock, within a few seconds: they
        // count until a whole time to live after they were committed.
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 1.0);
        deposit(&budget, DEPOSITS_PER_EXPIRY - 1, Duration::from_millis(50)).await;
        assert_eq!(withdrawals(&budget), 10 + DEPOSITS_PER_EXPIRY as usize - 1);
        // Spread over more than the time to live, they are committed with a window that has
        // passed, and count no more: only the reserve is left, fewer retries rather than more.
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 1.0);
        deposit(&budget, DEPOSITS_PER_EXPIRY - 1, Duration::from_millis(300)).await;
        assert_eq!(withdrawals(&budget), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn under_steady_traffic_only_the_last_ttl_of_requests_counts() {
        // 640 requests over 20 s: those of the last 10 s (320) count, within a window (32
        // requests) and the deposits between looks at the clock (64).
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 1.0);
        deposit(&budget, 640, Duration::from_micros(31_250)).await;
        let allowed = withdrawals(&budget);
        assert!(
            (10 + 320 - 96..=10 + 320 + 96).contains(&allowed),
            "{allowed}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_percent_budget_allows_only_the_reserve() {
        let budget = RetryBudget::new(Duration::from_secs(1), 3, 0.0);
        deposit(&budget, 1000, Duration::ZERO).await;
        assert_eq!(withdrawals(&budget), 3);
    }
}
