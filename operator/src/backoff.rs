//! Per-object capped exponential backoff for transient reconcile errors.
//!
//! kube-runtime has no per-object backoff built in (kube-rs issue #1916), so the controller keeps
//! one here, in its context: each failure of an object doubles its delay up to the cap, and a
//! successful reconcile forgets it. One broken job therefore backs off alone while every other
//! job keeps its normal pace.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Delays per object key (`namespace/name`).
#[derive(Debug)]
pub struct ObjectBackoff {
    initial: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl ObjectBackoff {
    /// Backoff starting at `initial`, doubling per consecutive failure, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, failures: Mutex::new(HashMap::new()) }
    }

    /// Records a failure of `key` and returns how long to wait before retrying it.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        let delay = self.initial.saturating_mul(1u32 << (*count).min(20)).min(self.max);
        *count = count.saturating_add(1);
        delay
    }

    /// Forgets `key`'s failures after it reconciled successfully (or was deleted).
    pub fn reset(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_failure_caps_and_resets_per_object() {
        let backoff = ObjectBackoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let delays: Vec<_> = (0..6).map(|_| backoff.next_delay("ns/a")).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 4000, 4000].map(Duration::from_millis).to_vec(),
            "exponential, then capped"
        );
        assert_eq!(backoff.next_delay("ns/b"), Duration::from_millis(500), "other objects unaffected");
        backoff.reset("ns/a");
        assert_eq!(backoff.next_delay("ns/a"), Duration::from_millis(500), "success resets");
    }
}
