//! Remote-token budgets for MinionS (review H8): each client (an API key, or an address on
//! an open router) may spend at most so many of the operator's supervisor tokens per
//! window. A job checks the budget before every supervisor call and charges what the call
//! used, so a client overshoots by at most one call per job it runs at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clients remembered at most; past it, spent windows are dropped first, then the oldest.
const MAX_CLIENTS: usize = 100_000;

/// The budgets of every client of one router.
#[derive(Clone)]
pub struct Budgets {
    /// Tokens per client per window; 0 means no budget.
    per_window: u64,
    window: Duration,
    used: Arc<Mutex<HashMap<String, (Instant, u64)>>>,
}

/// One client's budget, as a job carries it.
#[derive(Clone)]
pub struct Budget {
    budgets: Budgets,
    client: String,
}

/// The budget is spent until the window renews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    pub tokens: u64,
    pub renews_in: Duration,
}

impl Budgets {
    pub fn new(per_window: u64, window: Duration) -> Self {
        Budgets {
            per_window,
            window: window.max(Duration::from_secs(1)),
            used: Arc::default(),
        }
    }

    /// `client`'s budget, or `None` when budgets are off.
    pub fn client(&self, client: String) -> Option<Budget> {
        (self.per_window > 0).then(|| Budget {
            budgets: self.clone(),
            client,
        })
    }
}

impl Budget {
    /// Whether another supervisor call may start.
    pub fn check(&self) -> Result<(), Spent> {
        let b = &self.budgets;
        let used = b.used.lock().unwrap_or_else(|p| p.into_inner());
        match used.get(&self.client) {
            Some((start, tokens)) if start.elapsed() < b.window && *tokens >= b.per_window => {
                Err(Spent {
                    tokens: b.per_window,
                    renews_in: b.window.saturating_sub(start.elapsed()),
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts `tokens` a call used against the client's window.
    pub fn charge(&self, tokens: u64) {
        let b = &self.budgets;
        let mut used = b.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_CLIENTS && !used.contains_key(&self.client) {
            used.retain(|_, (start, _)| start.elapsed() < b.window);
            if used.len() >= MAX_CLIENTS
                && let Some(oldest) = used
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| k.clone())
            {
                used.remove(&oldest);
            }
        }
        let entry = used
            .entry(self.client.clone())
            .or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= b.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_refused_once_its_window_is_spent_and_others_are_not() {
        let budgets = Budgets::new(100, Duration::from_secs(3600));
        let a = budgets.client("key:a".into()).unwrap();
        let b = budgets.client("key:b".into()).unwrap();
        a.check().unwrap();
        a.charge(60);
        a.check().unwrap();
        a.charge(60);
        let spent = a.check().unwrap_err();
        assert_eq!(spent.tokens, 100);
        assert!(spent.renews_in <= Duration::from_secs(3600));
        b.check().unwrap();
        // Off when the budget is 0.
        assert!(
            Budgets::new(0, Duration::from_secs(1))
                .client("x".into())
                .is_none()
        );
    }

    #[test]
    fn a_window_renews() {
        let budgets = Budgets::new(10, Duration::from_secs(1));
        let a = budgets.client("ip:192.0.2.1".into()).unwrap();
        a.charge(u64::MAX);
        a.charge(u64::MAX);
        assert!(a.check().is_err());
        std::thread::sleep(Duration::from_millis(1100));
        a.check().unwrap();
        a.charge(5);
        a.check().unwrap();
    }
}
