//! The retry budget of a pool: retries may add at most 20 % to the requests it serves (plus a
//! small reserve for quiet pools), so a failing backend cannot turn into a retry storm.

use std::sync::atomic::{AtomicI64, Ordering};

/// Tokens, in thousandths.
const TOKEN: i64 = 1000;
/// What each request deposits: a fifth of a retry.
const DEPOSIT: i64 = TOKEN / 5;
/// The reserve a pool starts with, and the most it can save up.
const INITIAL: i64 = 10 * TOKEN;
const CAP: i64 = 100 * TOKEN;

/// A token bucket filled by requests and emptied by retries. Shared by every table that
/// contains the pool.
#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            balance: AtomicI64::new(INITIAL),
        }
    }
}

impl RetryBudget {
    /// Credits one request.
    pub fn deposit(&self) {
        if self.balance.load(Ordering::Relaxed) < CAP {
            self.balance.fetch_add(DEPOSIT, Ordering::Relaxed);
        }
    }

    /// Takes the price of one retry; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                (balance >= TOKEN).then_some(balance - TOKEN)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_a_fifth_of_requests() {
        let budget = RetryBudget::default();
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 210, "10 reserve + 1000 / 5");
        assert!(!budget.withdraw());
    }
}
