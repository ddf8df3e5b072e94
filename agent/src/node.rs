//! The node's chips together: polls the probe, runs each chip's [`ChipHealth`], applies
//! node-level isolation, and publishes the *desired* chip states for the etcd and Kubernetes
//! sides to reconcile.
//!
//! The desired states are a level, not a queue of events: whoever reconciles them (after an etcd
//! outage, say) writes the current truth once, never a backlog of stale transitions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ninelives_core::keyspace::{ChipRecord, ChipState};

use crate::events::{AgentEvent, AgentMetrics};
use crate::faults::{self, FaultAction, FaultTable};
use crate::health::{ChipHealth, HealthPolicy, Transition, Verdict};
use crate::probe::ChipProbe;

/// The state one chip should have in etcd.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredChip {
    /// The record to write.
    pub record: ChipRecord,
    /// When the observation that produced it was made (for publish latency).
    pub observed_at: Instant,
}

/// Desired state of every chip of the node, by index.
pub type DesiredStates = BTreeMap<u32, DesiredChip>;

/// Unix time now, in fractional seconds.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Whether two records describe the same state (their `since` may differ).
pub fn same_state(a: &ChipRecord, b: &ChipRecord) -> bool {
    a.state == b.state && a.code == b.code
}

/// Health of every chip of one node.
pub struct NodeHealth {
    table: FaultTable,
    chips: BTreeMap<u32, ChipHealth>,
    published: DesiredStates,
    isolated: bool,
    origin: Instant,
}

impl NodeHealth {
    /// Chips `indices`, all believed healthy, `quarantined` ones (from a previous run, as read
    /// back from etcd) kept in quarantine.
    pub fn new(
        indices: &[u32],
        policy: &HealthPolicy,
        table: FaultTable,
        quarantined: &BTreeMap<u32, String>,
        metrics: &AgentMetrics,
    ) -> Self {
        let origin = Instant::now();
        let mut chips = BTreeMap::new();
        let mut published = BTreeMap::new();
        for &index in indices {
            let mut chip = ChipHealth::new(policy.clone());
            if let Some(code) = quarantined.get(&index) {
                chip.restore_quarantine(code);
            }
            let v = chip.verdict();
            let record = ChipRecord { state: v.state, code: v.code.clone(), since: unix_now() };
            AgentEvent::ChipDiscovered { chip: index, state: v.state }.emit(metrics);
            published.insert(index, DesiredChip { record, observed_at: origin });
            chips.insert(index, chip);
        }
        Self { table, chips, published, isolated: false, origin }
    }

    /// Desired states as of the last poll.
    pub fn desired(&self) -> &DesiredStates {
        &self.published
    }

    /// Whether a host-level fault isolates the node.
    pub fn is_isolated(&self) -> bool {
        self.isolated
    }

    /// Reads every chip once and updates the desired states. Returns true when any desired
    /// state changed.
    pub fn poll(&mut self, probe: &dyn ChipProbe, metrics: &AgentMetrics) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.origin);
        for (&index, chip) in self.chips.iter_mut() {
            if probe.take_clear_request(index)
                && let Some(t) = chip.clear()
            {
                AgentEvent::QuarantineCleared { chip: index }.emit(metrics);
                report(index, &t, metrics);
            }
            let reading = probe.read(index);
            if let Some(t) = chip.observe(reading.as_ref(), elapsed, &self.table) {
                report(index, &t, metrics);
            }
        }
        self.republish(now, metrics)
    }

    fn republish(&mut self, now: Instant, metrics: &AgentMetrics) -> bool {
        let isolated = self.chips.values().any(|c| c.verdict().action == FaultAction::IsolateNode);
        if isolated != self.isolated {
            self.isolated = isolated;
            AgentEvent::NodeIsolation { isolated }.emit(metrics);
        }
        let mut changed = false;
        for (&index, chip) in &self.chips {
            let v: &Verdict = chip.verdict();
            let (state, code) = if isolated && v.state.usable() {
                (ChipState::Failed, faults::NODE_ISOLATED.to_string())
            } else {
                (v.state, v.code.clone())
            };
            let current = self.published.get(&index);
            if current.is_some_and(|d| d.record.state == state && d.record.code == code) {
                continue;
            }
            let record = ChipRecord { state, code, since: unix_now() };
            self.published.insert(index, DesiredChip { record, observed_at: now });
            changed = true;
        }
        changed
    }

    /// Sets the time origin of the state machines back by `by` (tests of time-based rules).
    #[cfg(test)]
    fn age(&mut self, by: Duration) {
        self.origin = self.origin.checked_sub(by).unwrap_or(self.origin);
    }
}

fn report(chip: u32, t: &Transition, metrics: &AgentMetrics) {
    for code in &t.unknown_codes {
        AgentEvent::UnknownFaultCode { chip, code }.emit(metrics);
    }
    if t.quarantined {
        AgentEvent::ChipQuarantined { chip, code: &t.to.code }.emit(metrics);
    }
    AgentEvent::ChipChanged {
        chip,
        from: t.from.state,
        to: t.to.state,
        code: &t.to.code,
        action: t.to.action,
    }
    .emit(metrics);
}

/// How often the probe is read by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ChipProbe, DirProbe};
    use crate::simulate::{Fault, SimulatedAsic, inject};

    fn node(n: u32) -> (tempfile::TempDir, SimulatedAsic, DirProbe, NodeHealth, AgentMetrics) {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimulatedAsic::create(tmp.path(), n).unwrap();
        let probe = DirProbe::new(tmp.path());
        let metrics = AgentMetrics::new().unwrap();
        let indices = probe.discover().unwrap();
        let health = NodeHealth::new(
            &indices,
            &HealthPolicy::default(),
            FaultTable::default(),
            &BTreeMap::new(),
            &metrics,
        );
        (tmp, sim, probe, health, metrics)
    }

    #[test]
    fn healthy_node_publishes_nothing_new() {
        let (_tmp, sim, probe, mut health, metrics) = node(8);
        for _ in 0..20 {
            sim.tick().unwrap();
            assert!(!health.poll(&probe, &metrics));
        }
        assert!(health.desired().values().all(|d| d.record.state == ChipState::Healthy));
    }

    #[test]
    fn host_fault_isolates_every_chip_and_recovers() {
        let (tmp, sim, probe, mut health, metrics) = node(4);
        inject(tmp.path(), 2, &Fault::HostFault).unwrap();
        sim.tick().unwrap();
        assert!(health.poll(&probe, &metrics));
        assert!(health.is_isolated());
        let d = health.desired();
        assert_eq!(d[&2].record.code, faults::HOST_FAULT);
        assert_eq!(
            (d[&0].record.state, d[&0].record.code.as_str()),
            (ChipState::Failed, faults::NODE_ISOLATED)
        );
        inject(tmp.path(), 2, &Fault::Recover).unwrap();
        sim.tick().unwrap();
        assert!(health.poll(&probe, &metrics));
        assert!(!health.is_isolated());
        assert!(health.desired().values().all(|d| d.record.state == ChipState::Healthy));
    }

    #[test]
    fn hung_chip_fails_after_hang_delay() {
        let (tmp, sim, probe, mut health, metrics) = node(2);
        sim.tick().unwrap();
        health.poll(&probe, &metrics);
        inject(tmp.path(), 1, &Fault::Hang).unwrap();
        sim.tick().unwrap();
        health.poll(&probe, &metrics);
        assert_eq!(health.desired()[&1].record.state, ChipState::Healthy);
        health.age(Duration::from_secs(3));
        sim.tick().unwrap();
        assert!(health.poll(&probe, &metrics));
        assert_eq!(health.desired()[&1].record.code, faults::HEARTBEAT_STALLED);
        assert_eq!(health.desired()[&0].record.state, ChipState::Healthy);
    }

    #[test]
    fn restored_quarantine_is_kept_and_cleared_by_the_clear_file() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimulatedAsic::create(tmp.path(), 2).unwrap();
        let probe = DirProbe::new(tmp.path());
        let metrics = AgentMetrics::new().unwrap();
        let q = BTreeMap::from([(1, "flapping:link-down".to_string())]);
        let mut health =
            NodeHealth::new(&[0, 1], &HealthPolicy::default(), FaultTable::default(), &q, &metrics);
        sim.tick().unwrap();
        health.poll(&probe, &metrics);
        assert_eq!(health.desired()[&1].record.state, ChipState::Quarantined);
        crate::simulate::request_clear(tmp.path(), 1).unwrap();
        assert!(health.poll(&probe, &metrics));
        assert_eq!(health.desired()[&1].record.state, ChipState::Healthy);
    }
}
