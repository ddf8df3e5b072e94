//! Telling a control-plane outage from failures.
//!
//! A slow etcd disk, a defragmentation, a leader election or a paused etcd makes every lease
//! expire at once: agents' presence and members' keys vanish together, though no chip failed and
//! training never needed etcd. Read naively that is "every node lost" and fails a healthy job.
//! Like Kubernetes' node lifecycle controller (zone disruption thresholds), the guard calls it an
//! outage when the brain's own reads fail, or when more than a fraction of the job's nodes vanish
//! within one heartbeat TTL; while it lasts the brain decides nothing and counts no deadline.
//! Once the view is stable again for a grace period (members and agents re-register), the brain
//! assesses what is still missing — real faults reported meanwhile are recovered then.
//!
//! Pure: the driver feeds every read (or its failure) with the time, and asks what to do.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::observe::Observation;

/// When a disappearance is an outage. Configurable; defaults below.
#[derive(Clone, Debug, PartialEq)]
pub struct OutagePolicy {
    /// More than this fraction of the job's nodes (training nodes and spares) vanishing within
    /// [`OutagePolicy::window_s`] is an outage. Well below one half: half a job's nodes failing
    /// at once is far more likely a control-plane event than hardware.
    pub max_vanished_fraction: f64,
    /// ... and at least this many nodes (one lost node of a small job is a node loss).
    pub min_vanished: usize,
    /// The window: the heartbeat TTL (every lease expires within one TTL of an outage).
    pub window_s: f64,
    /// How long the view must be stable after an outage before the brain acts on it again.
    pub grace_s: f64,
}

/// The default fraction ([`OutagePolicy::max_vanished_fraction`]).
pub const DEFAULT_MAX_VANISHED_FRACTION: f64 = 0.3;

impl OutagePolicy {
    /// The policy for a heartbeat TTL of `ttl_s` seconds: window one TTL, grace one TTL (a member
    /// or agent re-registers well within it after etcd returns).
    pub fn for_ttl(ttl_s: f64) -> Self {
        Self {
            max_vanished_fraction: DEFAULT_MAX_VANISHED_FRACTION,
            min_vanished: 2,
            window_s: ttl_s,
            grace_s: ttl_s,
        }
    }
}

/// Why the control plane is degraded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum OutageCause {
    /// The brain's own reads of the store fail.
    StoreUnreachable {
        /// The newest error.
        error: String,
    },
    /// Too many nodes vanished at once.
    MassDisappearance {
        /// Nodes that vanished within the window.
        vanished: usize,
        /// Nodes of the job.
        of: usize,
    },
}

impl OutageCause {
    /// The condition/Event reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        match self {
            OutageCause::StoreUnreachable { .. } => "StoreUnreachable",
            OutageCause::MassDisappearance { .. } => "MassDisappearance",
        }
    }
}

impl fmt::Display for OutageCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutageCause::StoreUnreachable { error } => {
                write!(f, "the coordination store is unreachable: {error}")
            }
            OutageCause::MassDisappearance { vanished, of } => {
                write!(f, "{vanished} of {of} nodes vanished within one heartbeat TTL")
            }
        }
    }
}

/// An outage in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Outage {
    /// When it was first seen (unix seconds).
    pub since: f64,
    /// Nodes last seen alive at or after this time and missing now count as vanished in it.
    pub baseline: f64,
    /// The newest cause.
    pub cause: OutageCause,
    /// Since when the view has been stable again, if it is.
    pub stable_since: Option<f64>,
}

/// What the driver does this round.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Decide as usual.
    Act,
    /// Decide nothing, count no deadline.
    Freeze(Outage),
    /// The outage ended after `frozen_s` seconds: decide, with the active recovery's deadline
    /// moved by that much (no deadline counted during the outage).
    Resume {
        /// The outage that ended.
        outage: Outage,
        /// How long decisions were frozen.
        frozen_s: f64,
    },
}

/// The guard's memory of the view (kept by the driver; a restarted driver starts afresh, and
/// the brain's record is unaffected).
#[derive(Clone, Debug, Default)]
pub struct OutageGuard {
    /// Nodes (by name) and when each was last seen alive.
    last_alive: BTreeMap<String, f64>,
    /// The newest successful read.
    last_read: Option<f64>,
    outage: Option<Outage>,
}

impl OutageGuard {
    /// The outage in progress, if any.
    pub fn outage(&self) -> Option<&Outage> {
        self.outage.as_ref()
    }

    /// A read of the store failed at `now`.
    pub fn read_failed(&mut self, policy: &OutagePolicy, now: f64, error: &str) -> Verdict {
        let cause = OutageCause::StoreUnreachable { error: error.to_string() };
        let baseline = self.baseline(policy, now);
        Verdict::Freeze(self.enter(now, baseline, cause))
    }

    /// Where the vanishing window starts at `now`: one window back, or back to the previous
    /// successful read when reads stopped for longer (a paused etcd answers nothing for a while,
    /// then shows every lease expired at once).
    fn baseline(&self, policy: &OutagePolicy, now: f64) -> f64 {
        let window = now - policy.window_s;
        self.outage.as_ref().map_or_else(|| self.last_read.map_or(window, |r| r.min(window)), |o| o.baseline)
    }

    fn enter(&mut self, now: f64, baseline: f64, cause: OutageCause) -> Outage {
        let outage = match self.outage.take() {
            Some(o) => Outage { cause, stable_since: None, ..o },
            None => Outage { since: now, baseline, cause, stable_since: None },
        };
        self.outage = Some(outage.clone());
        outage
    }

    /// A read at `now` gave `obs`; `nodes` are the job's nodes (training nodes and spares).
    pub fn observed(
        &mut self,
        policy: &OutagePolicy,
        nodes: &[String],
        obs: &Observation,
        now: f64,
    ) -> Verdict {
        let alive = |n: &String| obs.nodes.get(n).is_some_and(|v| v.alive);
        let baseline = self.baseline(policy, now);
        // A node this guard never saw (a restarted driver) counts as seen just now: a mass of
        // missing nodes at start-up is judged like a fresh one, and ages out after a window.
        for n in nodes {
            self.last_alive.entry(n.clone()).or_insert(now);
        }
        let vanished = nodes
            .iter()
            .filter(|n| !alive(n) && self.last_alive.get(*n).is_some_and(|&t| t >= baseline))
            .count();
        for n in nodes.iter().filter(|n| alive(n)) {
            self.last_alive.insert(n.clone(), now);
        }
        self.last_read = Some(now);
        let of = nodes.len();
        if vanished >= policy.min_vanished && vanished as f64 > policy.max_vanished_fraction * of as f64 {
            let cause = OutageCause::MassDisappearance { vanished, of };
            return Verdict::Freeze(self.enter(now, baseline, cause));
        }
        let Some(mut outage) = self.outage.take() else { return Verdict::Act };
        let stable = *outage.stable_since.get_or_insert(now);
        if now - stable < policy.grace_s {
            self.outage = Some(outage.clone());
            return Verdict::Freeze(outage);
        }
        let frozen_s = (now - outage.since).max(0.0);
        Verdict::Resume { outage, frozen_s }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::NodeView;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    fn obs(alive: &[&String]) -> Observation {
        let mut o = Observation::default();
        for n in alive {
            o.nodes.insert((*n).clone(), NodeView { alive: true, ..Default::default() });
        }
        o
    }

    #[test]
    fn one_lost_node_is_a_failure_not_an_outage() {
        let (p, ns) = (OutagePolicy::for_ttl(10.0), nodes(6));
        let mut g = OutageGuard::default();
        assert_eq!(g.observed(&p, &ns, &obs(&ns.iter().collect::<Vec<_>>()), 0.0), Verdict::Act);
        let five: Vec<&String> = ns.iter().skip(1).collect();
        assert_eq!(g.observed(&p, &ns, &obs(&five), 5.0), Verdict::Act);
    }

    #[test]
    fn every_lease_expiring_at_once_freezes_until_the_view_is_stable_for_the_grace() {
        let (p, ns) = (OutagePolicy::for_ttl(10.0), nodes(100));
        let mut g = OutageGuard::default();
        let all: Vec<&String> = ns.iter().collect();
        assert_eq!(g.observed(&p, &ns, &obs(&all), 0.0), Verdict::Act);
        let Verdict::Freeze(o) = g.observed(&p, &ns, &obs(&[]), 20.0) else { panic!("not frozen") };
        assert_eq!(o.cause, OutageCause::MassDisappearance { vanished: 100, of: 100 });
        // 20 s > the 10 s TTL since the nodes were seen, but nothing was read in between: a
        // paused etcd looks exactly like this.
        assert!(matches!(g.observed(&p, &ns, &obs(&[]), 25.0), Verdict::Freeze(_)));
        // Agents re-register: stable from 26; 99 back, one truly lost.
        let back: Vec<&String> = ns.iter().skip(1).collect();
        assert!(matches!(g.observed(&p, &ns, &obs(&back), 26.0), Verdict::Freeze(_)));
        assert!(matches!(g.observed(&p, &ns, &obs(&back), 35.0), Verdict::Freeze(_)), "within the grace");
        let Verdict::Resume { frozen_s, .. } = g.observed(&p, &ns, &obs(&back), 36.5) else { panic!() };
        assert!((frozen_s - 16.5).abs() < 1e-9);
        assert_eq!(g.observed(&p, &ns, &obs(&back), 37.0), Verdict::Act, "the lost node is a failure");
    }

    #[test]
    fn failed_reads_freeze_and_a_good_read_starts_the_grace() {
        let (p, ns) = (OutagePolicy::for_ttl(3.0), nodes(4));
        let mut g = OutageGuard::default();
        let all: Vec<&String> = ns.iter().collect();
        assert_eq!(g.observed(&p, &ns, &obs(&all), 0.0), Verdict::Act);
        let Verdict::Freeze(o) = g.read_failed(&p, 1.0, "deadline exceeded") else { panic!() };
        assert_eq!(o.cause.reason(), "StoreUnreachable");
        assert!(matches!(g.read_failed(&p, 9.0, "deadline exceeded"), Verdict::Freeze(_)));
        assert!(matches!(g.observed(&p, &ns, &obs(&all), 16.0), Verdict::Freeze(_)));
        let Verdict::Resume { frozen_s, outage } = g.observed(&p, &ns, &obs(&all), 19.0) else { panic!() };
        assert_eq!((frozen_s, outage.since), (18.0, 1.0));
    }

    #[test]
    fn a_driver_started_during_an_outage_freezes_too() {
        let (p, ns) = (OutagePolicy::for_ttl(10.0), nodes(8));
        let mut g = OutageGuard::default();
        assert!(matches!(g.observed(&p, &ns, &obs(&[]), 0.0), Verdict::Freeze(_)));
    }
}
