//! The control loop's effects in the local runtime: which members to start, and the journal
//! of what happened (the live view's events and the report's recoveries).

use std::collections::BTreeSet;

use ninelives_control::{EffectError, Effects};
use ninelives_core::fault_schedule::{FaultKind, ScheduledFault};
use ninelives_core::generation::DistPlan;
use ninelives_core::recovery::{BrainPhase, CompletedRecovery, Outage, RecoveryState, TriggerKind};

use crate::report::OutageEntry;

/// A fault as injected, for matching it to the recovery it caused.
#[derive(Clone, Debug)]
pub(crate) struct Injected {
    pub fault: ScheduledFault,
    /// Unix seconds.
    pub at: f64,
    pub matched: bool,
}

/// A recovery waiting for training to really resume (measured from the step lines).
#[derive(Clone, Debug)]
pub(crate) struct Resuming {
    pub record: CompletedRecovery,
    /// The report's label: the scheduled fault (`chip:1/3`), else the brain's trigger.
    pub trigger: String,
    pub detect_s: Option<f64>,
}

/// Time-stamped event lines, oldest first.
#[derive(Clone, Debug, Default)]
pub(crate) struct Journal {
    /// Seconds since the run started, stamped on the lines written now.
    pub t: f64,
    pub lines: Vec<String>,
}

impl Journal {
    pub fn note(&mut self, what: impl std::fmt::Display) {
        self.lines.push(format!("{:7.1}s {what}", self.t));
    }
}

/// What the loop asked for, and what the run has seen.
pub(crate) struct LocalEffects {
    /// The node table the run starts with.
    pub table: RecoveryState,
    /// Ranks the brain ordered started that do not run yet.
    pub wanted: BTreeSet<u32>,
    pub journal: Journal,
    pub injected: Vec<Injected>,
    pub resuming: Vec<Resuming>,
    /// Why the job failed, once it did.
    pub failure: Option<String>,
    /// Control-plane outages, oldest first.
    pub outages: Vec<OutageEntry>,
}

impl LocalEffects {
    pub fn new(table: RecoveryState) -> Self {
        Self {
            table,
            wanted: BTreeSet::new(),
            journal: Journal::default(),
            injected: Vec::new(),
            resuming: Vec::new(),
            failure: None,
            outages: Vec::new(),
        }
    }
}

impl Effects for LocalEffects {
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        Ok(Some(self.table.clone()))
    }

    async fn published(&mut self, plan: &DistPlan) -> Result<(), EffectError> {
        let (generation, tier, restore) = (plan.generation(), plan.tier, plan.restore);
        self.journal.note(format!("generation {generation} ({tier}, restore {restore:?}) published"));
        Ok(())
    }

    async fn start_member(&mut self, rank: u32, _: &str, _: Option<u64>) -> Result<(), EffectError> {
        self.wanted.insert(rank);
        Ok(())
    }

    async fn bring_in_spare(&mut self, spare: &str, replaces: &str, index: u32) -> Result<(), EffectError> {
        self.journal.note(format!("spare {spare} replaces {replaces} (node {index})"));
        Ok(())
    }

    async fn drop_node(&mut self, index: u32, node: &str) -> Result<(), EffectError> {
        self.journal.note(format!("node {node} (index {index}) dropped; continuing degraded"));
        self.wanted.remove(&index);
        Ok(())
    }

    async fn record_recovery(&mut self, r: &CompletedRecovery) -> Result<(), EffectError> {
        let (trigger, detect_s) = match_fault(&mut self.injected, r);
        self.journal.note(format!(
            "recovered {trigger} by {} (generation {})",
            r.tier.as_str(),
            r.generation
        ));
        self.resuming.push(Resuming { record: r.clone(), trigger, detect_s });
        Ok(())
    }

    async fn control_plane(&mut self, outage: Option<&Outage>) -> Result<(), EffectError> {
        let open = self.outages.last_mut().filter(|o| o.frozen_s.is_none());
        match (outage, open) {
            (Some(o), None) => {
                self.journal.note(format!("control plane degraded: {}; decisions frozen", o.cause));
                let reason = o.cause.reason().to_string();
                self.outages.push(OutageEntry { reason, at_s: self.journal.t, frozen_s: None });
            }
            (Some(o), Some(_)) => self.journal.note(format!("control plane still degraded: {}", o.cause)),
            (None, Some(open)) => {
                open.frozen_s = Some(self.journal.t - open.at_s);
                self.journal.note("control plane healthy again; deciding");
            }
            (None, None) => {}
        }
        Ok(())
    }

    async fn phase_changed(
        &mut self,
        prior: &RecoveryState,
        state: &RecoveryState,
    ) -> Result<(), EffectError> {
        match (state.phase, &state.active) {
            (BrainPhase::Recovering, Some(a)) if prior.phase != BrainPhase::Recovering => {
                let what: Vec<String> = a.triggers.iter().map(ToString::to_string).collect();
                self.journal.note(format!("detected {} → {}", what.join(", "), a.rung.as_str()));
            }
            (BrainPhase::Succeeded, _) => self.journal.note("job succeeded"),
            (BrainPhase::Failed, _) => {
                let reason =
                    state.failure.as_ref().map_or_else(|| "unknown".to_string(), ToString::to_string);
                self.journal.note(format!("job FAILED: {reason}"));
                self.failure = Some(reason);
            }
            _ => {}
        }
        Ok(())
    }
}

/// The scheduled fault behind a recovery: by node (and chip) and kind, injected before the
/// brain detected it. Returns the report's trigger label and the measured detection time.
pub(crate) fn match_fault(injected: &mut [Injected], r: &CompletedRecovery) -> (String, Option<f64>) {
    let fits = |i: &Injected| {
        i.at <= r.detected_at + 0.5
            && r.triggers.iter().any(|t| match t.kind {
                TriggerKind::Node => i.fault.kind == FaultKind::Node && i.fault.node == t.node,
                TriggerKind::Worker => matches!(i.fault.kind, FaultKind::Worker | FaultKind::Node),
                TriggerKind::Chip | TriggerKind::Hang | TriggerKind::Flap => {
                    i.fault.kind.targets_chip() && i.fault.node == t.node && i.fault.chip == t.chip
                }
            })
    };
    // Prefer a fault not yet explained; a node loss can explain two recoveries (its worker,
    // seen at once, and its lease, seen after the TTL).
    let pick =
        injected.iter().position(|i| !i.matched && fits(i)).or_else(|| injected.iter().rposition(fits));
    match pick {
        Some(k) => {
            let i = &mut injected[k];
            i.matched = true;
            let label = i.fault.to_string();
            let label = label.split('@').next().unwrap_or_default().to_string();
            (label, Some((r.detected_at - i.at).max(0.0)))
        }
        None => (r.trigger.clone(), r.detect_s),
    }
}
