//! Whether asking a supervisor for a plan pays off. A capable model's plans are valid, or
//! come right when a refused one goes back with the reason; a weak one (a 135M model)
//! mostly writes plans the router refuses, each a call whose prompt holds the schema and
//! the conversation so far, and then the router's default plan runs anyway. The router
//! remembers, per supervisor, whether its recent plan calls (first or retried) gave a valid
//! plan; when fewer than one in [`PAYING`] did, a job that did not set `plan_retries`
//! itself runs the default plan without asking, and one job in [`PROBE_EVERY`] still asks,
//! so a supervisor that improves is noticed.

use std::collections::HashMap;
use std::sync::Mutex;

/// Plan calls remembered per supervisor (the most recent).
const WINDOW: u32 = 16;
/// Plan calls seen before the record is trusted: one job's first plan and two retries.
const MIN_SEEN: u32 = 3;
/// Plans keep being asked for while at least one call in this many gave a valid plan. A
/// capable supervisor's plans are nearly all valid; a 135M model's were one in four to
/// five, and even its valid ones were mostly junk (tasks that repeat a phrase).
const PAYING: u32 = 2;
/// While plans are not asked for, one job in this many still asks.
pub const PROBE_EVERY: u64 = 8;
/// Supervisors remembered (a job may name its own with `--allow-remote-override`).
const SUPERVISORS: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct Record {
    /// One bit per plan call, newest lowest: 1 when it gave a valid plan.
    valid: u16,
    seen: u32,
    jobs: u64,
}

/// What a job that did not choose does about plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planning {
    /// Ask the supervisor, with this many retries after a refused plan.
    Ask { retries: u32 },
    /// Run the default plan without asking: of the supervisor's last `seen` plan calls,
    /// `valid` gave a valid plan.
    Skip { valid: u32, seen: u32 },
}

/// Per supervisor, how its recent plan calls went.
#[derive(Debug, Default)]
pub struct PlanRecord {
    by_supervisor: Mutex<HashMap<String, Record>>,
}

impl PlanRecord {
    /// What a job that did not choose does on `supervisor`: ask with `retries` while its
    /// plans pay off (or too few were seen to tell), else skip but for a probe now and then.
    pub fn planning(&self, supervisor: &str, retries: u32) -> Planning {
        let mut map = self.by_supervisor.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = map.get_mut(supervisor) else {
            return Planning::Ask { retries };
        };
        r.jobs += 1;
        let seen = r.seen.min(WINDOW);
        let valid = (r.valid as u32 & ((1u32 << seen) - 1)).count_ones();
        if seen < MIN_SEEN || valid * PAYING >= seen || r.jobs.is_multiple_of(PROBE_EVERY) {
            Planning::Ask { retries }
        } else {
            Planning::Skip { valid, seen }
        }
    }

    /// One plan call on `supervisor` and whether it gave a valid plan.
    pub fn record(&self, supervisor: &str, valid: bool) {
        let mut map = self.by_supervisor.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SUPERVISORS && !map.contains_key(supervisor) {
            map.clear();
        }
        let r = map.entry(supervisor.to_string()).or_default();
        r.valid = (r.valid << 1) | u16::from(valid);
        r.seen = r.seen.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_stop_being_asked_for_when_they_do_not_pay_and_come_back_when_they_do() {
        let r = PlanRecord::default();
        let ask = Planning::Ask { retries: 2 };
        // Nothing known: ask.
        assert_eq!(r.planning("weak", 2), ask);
        // Too few seen to judge.
        for _ in 0..2 {
            r.record("weak", false);
        }
        assert_eq!(r.planning("weak", 2), ask);
        r.record("weak", false);
        // Three refused plans (one job's worth): no more asking, but for one probe in
        // PROBE_EVERY jobs.
        let given: Vec<Planning> = (0..2 * PROBE_EVERY)
            .map(|_| r.planning("weak", 2))
            .collect();
        assert_eq!(given.iter().filter(|&&p| p == ask).count(), 2, "{given:?}");
        assert!(given.contains(&Planning::Skip { valid: 0, seen: 3 }));
        // Another supervisor is judged on its own record.
        for _ in 0..8 {
            r.record("strong", true);
        }
        assert_eq!(r.planning("strong", 2), ask);
        // Plans that start coming right (one call in two) are asked for again.
        for _ in 0..2 {
            r.record("weak", true);
            assert!(matches!(r.planning("weak", 2), Planning::Skip { .. }));
        }
        r.record("weak", true);
        assert_eq!(r.planning("weak", 2), ask);
        // Three valid in sixteen: skipped again.
        for _ in 0..10 {
            r.record("weak", false);
        }
        assert_eq!(r.planning("weak", 2), Planning::Skip { valid: 3, seen: 16 });
    }
}
