//! The pure heart of the controller: from the job, the pods it should have and the pods it has,
//! decide what to create, what to delete, the new status and the Events to record.
//!
//! No client here, so every transition of the job lifecycle is unit-tested.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use ninelives_core::TrainingJob;
use ninelives_core::job::{JobPhase, TrainingJobStatus};

use k8s_openapi::jiff::Timestamp;
use ninelives_core::recovery::{ProgressRecord, RecoveryState};

use crate::resources::{ROLE_LABEL, Role};

mod brain;
mod conditions;
mod restart;
#[cfg(test)]
mod tests;

pub use conditions::{CONDITION_TYPES, phase_name};

/// Severity of a [`JobEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Lifecycle progress.
    Normal,
    /// Something went wrong.
    Warning,
}

/// One Kubernetes Event to record on the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    /// Normal or Warning.
    pub severity: Severity,
    /// CamelCase reason, e.g. `WorkerFailed`.
    pub reason: &'static str,
    /// Human-readable detail.
    pub note: String,
}

/// What one reconcile should do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Pods to create (server-side apply).
    pub create: Vec<Pod>,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    /// Whether the headless Service should exist.
    pub service: bool,
    /// The status the job should have afterwards.
    pub status: TrainingJobStatus,
    /// Events to record.
    pub events: Vec<JobEvent>,
}

/// The pods one reconcile plans with.
struct PodSets<'a> {
    /// The pods the job should have.
    desired: Vec<Pod>,
    /// The job's pods as listed.
    existing: &'a [Pod],
    /// Those not being deleted.
    live: &'a [&'a Pod],
}

/// What a reconcile will change: pods to create and delete, Events to record.
#[derive(Default)]
struct Changes {
    create: Vec<Pod>,
    delete: BTreeSet<String>,
    events: Vec<JobEvent>,
}

impl Changes {
    /// Deletes every live pod that has not finished (finished ones stay for their logs).
    fn stop_unfinished(&mut self, live: &[&Pod]) {
        for pod in live {
            if !matches!(pod_phase(pod), "Succeeded" | "Failed") {
                self.delete.insert(pod.name_any());
            }
        }
    }

    /// Deletes every live spare (nothing left to stand by for).
    fn stop_spares(&mut self, live: &[&Pod]) {
        for pod in live {
            if is_spare(pod) {
                self.delete.insert(pod.name_any());
            }
        }
    }
}

/// Why the job is in its phase: the text for conditions and Events, and, when it failed, the
/// `Failed` condition's reason (typed at its source, never read back from the text).
#[derive(Clone, Debug, Default, PartialEq)]
struct Detail {
    text: String,
    failed: Option<&'static str>,
}

impl Detail {
    fn text(text: impl Into<String>) -> Self {
        Self { text: text.into(), failed: None }
    }
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

fn is_deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn is_spare(pod: &Pod) -> bool {
    pod.labels().get(ROLE_LABEL).is_some_and(|r| r == Role::Spare.as_str())
}

fn exit_detail(pod: &Pod) -> String {
    let terminated = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find_map(|c| c.state.as_ref()?.terminated.as_ref()));
    match terminated {
        Some(t) => match &t.reason {
            Some(reason) => format!("exit code {}, {reason}", t.exit_code),
            None => format!("exit code {}", t.exit_code),
        },
        None => "no exit status".into(),
    }
}

/// Decides one reconcile of `job`.
///
/// - `desired`: the pods [`crate::resources::desired_pods`] built (ignored when `invalid`);
/// - `existing`: the job's pods as listed from the apiserver;
/// - `invalid`: the core validator's message when the spec is invalid;
/// - `now`: RFC 3339 time for condition transitions.
pub fn plan(
    job: &TrainingJob,
    desired: Vec<Pod>,
    existing: &[Pod],
    invalid: Option<&str>,
    now: &str,
) -> Plan {
    plan_with(job, desired, existing, invalid, now, None)
}

/// What the recovery brain's record in etcd says about a job (`None` state: not started yet,
/// i.e. the pods are not all scheduled, so no node table exists).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrainView {
    /// The record at `jobs/<ns>/<job>/recovery`.
    pub state: Option<RecoveryState>,
    /// Progress reported by the lead member.
    pub progress: Option<ProgressRecord>,
    /// The control plane as the job's driver sees it: `Some` while it freezes decisions.
    pub control_plane: Option<ControlPlaneNote>,
}

/// Why a job's driver froze its decisions (the `ControlPlaneDegraded` condition).
#[derive(Clone, Debug, PartialEq)]
pub struct ControlPlaneNote {
    /// CamelCase reason (`StoreUnreachable`, `MassDisappearance`).
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// Recoveries kept in `status.recentRecoveries`.
pub const RECENT_RECOVERIES: usize = 5;

/// [`plan`] with the recovery brain in charge of failures (`brain`: its record; `desired`: from
/// [`crate::resources::assigned_pods`] once the record exists). A failed worker pod is replaced
/// only when the brain ordered its rank restarted, a rank the brain moved to another node is
/// recreated there, and phase, recoveries and failure come from the record.
pub fn plan_with(
    job: &TrainingJob,
    desired: Vec<Pod>,
    existing: &[Pod],
    invalid: Option<&str>,
    now: &str,
    brain: Option<&BrainView>,
) -> Plan {
    let prior = job.status.clone().unwrap_or_default();
    let prior_phase = prior.phase;
    let spec = &job.spec;
    let nodes = spec.topology.nodes;
    let chips = spec.topology.chips_per_node;
    let mut recoveries = prior.recoveries;
    let mut changes = Changes::default();
    let mut detail = Detail::default();
    let mut running_workers = 0u32;
    let mut running_spares = 0u32;

    let live: Vec<&Pod> = existing.iter().filter(|p| !is_deleting(p)).collect();
    for pod in &live {
        match (pod_phase(pod), is_spare(pod)) {
            ("Running", false) => running_workers += 1,
            ("Running", true) => running_spares += 1,
            _ => {}
        }
    }

    let phase = if let Some(message) = invalid {
        // Touch nothing: the previous spec's pods (if any) are the user's to judge.
        detail = Detail::text(message);
        JobPhase::Invalid
    } else if matches!(prior_phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        // Terminal, like a batch Job: keep finished pods for their logs, stop everything else.
        changes.stop_unfinished(&live);
        prior_phase.unwrap_or(JobPhase::Failed)
    } else if spec.suspend {
        changes.delete.extend(live.iter().map(|p| p.name_any()));
        JobPhase::Suspended
    } else if let Some(view) = brain {
        let (phase, why) = brain::brain_phase(view, PodSets { desired, existing, live: &live }, &mut changes);
        detail = why;
        phase
    } else {
        let pods = PodSets { desired, existing, live: &live };
        let (phase, why) = restart::restart_phase(job, pods, running_workers, &mut recoveries, &mut changes);
        detail = why;
        phase
    };

    if !changes.create.is_empty() {
        let names: Vec<String> = changes.create.iter().map(|p| p.name_any()).collect();
        changes.events.push(JobEvent {
            severity: Severity::Normal,
            reason: "CreatedWorkers",
            note: format!("created worker pods {}", names.join(", ")),
        });
    }
    if prior_phase != Some(phase) {
        changes.events.push(conditions::transition_event(prior_phase, phase, nodes, &detail.text));
    }

    let mut status = prior.clone();
    status.phase = Some(phase);
    status.recoveries = recoveries;
    if let Some(state) = brain.and_then(|b| b.state.as_ref()) {
        status.recoveries = state.recoveries;
        status.placement_generation = state.generation;
        status.failed_chips = u32::try_from(state.excluded.len()).unwrap_or(u32::MAX);
        let skip = state.history.len().saturating_sub(RECENT_RECOVERIES);
        status.recent_recoveries =
            state.history.iter().skip(skip).map(|r| r.to_status(rfc3339(r.resumed_at))).collect();
    }
    if let Some(p) = brain.and_then(|b| b.progress) {
        status.step = p.step;
        status.last_loss = p.loss;
    }
    status.observed_generation = job.metadata.generation;
    status.healthy_chips = running_workers.saturating_mul(chips);
    status.spare_chips = running_spares.saturating_mul(chips);
    let control_plane = brain.and_then(|b| b.control_plane.as_ref());
    status.conditions = conditions::conditions(
        &prior.conditions,
        phase,
        nodes,
        &detail,
        control_plane,
        job.metadata.generation,
        now,
    );

    let service = !matches!(phase, JobPhase::Invalid | JobPhase::Succeeded | JobPhase::Failed);
    let Changes { create, delete, events } = changes;
    Plan { create, delete: delete.into_iter().collect(), service, status, events }
}

/// RFC 3339 of a unix time (the brain's clock is a number).
fn rfc3339(unix: f64) -> String {
    Timestamp::from_second(unix.round() as i64).map(|t| t.to_string()).unwrap_or_default()
}
