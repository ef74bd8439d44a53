//! Whether asking a supervisor again for a plan pays off. A refused plan goes back to the
//! supervisor with the reason (`plan_retries` times), which a capable model uses to fix a
//! slip; a weak one (a 135M model) mostly makes another, and each retry costs a call whose
//! prompt holds the conversation so far. The router remembers, per supervisor, whether its
//! recent retries produced a valid plan; when they rarely did, a job that did not set
//! `plan_retries` itself goes to the default plan after the first refusal, and one job in
//! [`PROBE_EVERY`] still retries, so a supervisor that improves is noticed.

use std::collections::HashMap;
use std::sync::Mutex;

/// Retries remembered per supervisor (the most recent).
const WINDOW: u32 = 16;
/// Retries seen before the record is trusted.
const MIN_SEEN: u32 = 4;
/// Retries keep being used while at least one in this many produced a valid plan.
const PAYING: u32 = 4;
/// While retries are skipped, one job in this many still retries.
pub const PROBE_EVERY: u64 = 8;
/// Supervisors remembered (a job may name its own with `--allow-remote-override`).
const SUPERVISORS: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct Record {
    /// One bit per retry, newest lowest: 1 when it produced a valid plan.
    paid: u16,
    seen: u32,
    jobs: u64,
}

/// Per supervisor, how its recent plan retries went.
#[derive(Debug, Default)]
pub struct PlanRecord {
    by_supervisor: Mutex<HashMap<String, Record>>,
}

impl PlanRecord {
    /// Retries a job may spend on `supervisor` when it did not choose: `default` while
    /// retries pay off (or too few were seen to tell), else 0 but for a probe now and then.
    pub fn retries(&self, supervisor: &str, default: u32) -> u32 {
        let mut map = self.by_supervisor.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = map.get_mut(supervisor) else {
            return default;
        };
        r.jobs += 1;
        let seen = r.seen.min(WINDOW);
        let paid = (r.paid as u32 & ((1u32 << seen) - 1)).count_ones();
        if seen < MIN_SEEN || paid * PAYING >= seen || r.jobs.is_multiple_of(PROBE_EVERY) {
            default
        } else {
            0
        }
    }

    /// One retry on `supervisor` and whether it produced a valid plan.
    pub fn record(&self, supervisor: &str, paid: bool) {
        let mut map = self.by_supervisor.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SUPERVISORS && !map.contains_key(supervisor) {
            map.clear();
        }
        let r = map.entry(supervisor.to_string()).or_default();
        r.paid = (r.paid << 1) | u16::from(paid);
        r.seen = r.seen.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stop_when_they_do_not_pay_and_come_back_when_they_do() {
        let r = PlanRecord::default();
        // Nothing known: the default.
        assert_eq!(r.retries("weak", 2), 2);
        // Too few seen to judge.
        for _ in 0..3 {
            r.record("weak", false);
        }
        assert_eq!(r.retries("weak", 2), 2);
        r.record("weak", false);
        // Four failed retries: no more, but for one probe in PROBE_EVERY jobs.
        let given: Vec<u32> = (0..2 * PROBE_EVERY).map(|_| r.retries("weak", 2)).collect();
        assert_eq!(given.iter().filter(|&&n| n == 2).count(), 2, "{given:?}");
        // Another supervisor is judged on its own record.
        for _ in 0..8 {
            r.record("strong", true);
        }
        assert_eq!(r.retries("strong", 2), 2);
        // Retries that start paying (one in four) are used again.
        for _ in 0..4 {
            r.record("weak", true);
        }
        assert_eq!(r.retries("weak", 2), 2);
    }
}
