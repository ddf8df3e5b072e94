//! The pure heart of the controller: from the job, the pods it should have and the pods it has,
//! decide what to create, what to delete, the new status and the Events to record.
//!
//! No client here, so every transition of the job lifecycle is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use ninelives_core::TrainingJob;
use ninelives_core::job::{JobCondition, JobPhase, TrainingJobStatus};

use k8s_openapi::jiff::Timestamp;
use ninelives_core::recovery::{BrainPhase, ProgressRecord, RecoveryState};

use crate::resources::{HOSTNAME_LABEL, RANK_LABEL, ROLE_LABEL, Role, pod_template_hash};

/// Condition types, always all present, in this order.
pub const CONDITION_TYPES: [&str; 5] = ["Ready", "Suspended", "Invalid", "Succeeded", "Failed"];

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
    let mut create = Vec::new();
    let mut delete = BTreeSet::new();
    let mut events = Vec::new();
    let mut detail = String::new();
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
        detail = message.to_string();
        JobPhase::Invalid
    } else if matches!(prior_phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        // Terminal, like a batch Job: keep finished pods for their logs, stop everything else.
        for pod in &live {
            if !matches!(pod_phase(pod), "Succeeded" | "Failed") {
                delete.insert(pod.name_any());
            }
        }
        prior_phase.unwrap_or(JobPhase::Failed)
    } else if spec.suspend {
        delete.extend(live.iter().map(|p| p.name_any()));
        JobPhase::Suspended
    } else if let Some(view) = brain {
        let (phase, why) = brain_phase(view, desired, existing, &live, &mut create, &mut delete);
        detail = why;
        phase
    } else {
        let by_name: BTreeMap<String, &Pod> = existing.iter().map(|p| (p.name_any(), p)).collect();
        let wanted: BTreeSet<String> = desired.iter().map(|p| p.name_any()).collect();
        // Pods of ranks the topology no longer has.
        delete.extend(live.iter().map(|p| p.name_any()).filter(|n| !wanted.contains(n)));

        let mut succeeded = 0u32;
        let mut failed_workers = Vec::new();
        for pod in desired {
            let name = pod.name_any();
            let Some(current) = by_name.get(&name) else {
                create.push(pod);
                continue;
            };
            if is_deleting(current) {
                continue; // recreated once the old one is gone
            }
            if pod_template_hash(current) != pod_template_hash(&pod) {
                delete.insert(name);
                continue;
            }
            match (pod_phase(current), is_spare(current)) {
                ("Succeeded", false) => succeeded += 1,
                ("Failed", false) => failed_workers.push((name, exit_detail(current))),
                // A spare that exits is simply replaced; it held no training state.
                ("Failed" | "Succeeded", true) => {
                    delete.insert(name);
                }
                _ => {}
            }
        }

        if !failed_workers.is_empty() {
            let failed = u32::try_from(failed_workers.len()).unwrap_or(u32::MAX);
            let total = recoveries.saturating_add(failed);
            let names: Vec<String> = failed_workers.iter().map(|(n, d)| format!("{n} ({d})")).collect();
            if total > spec.failure_policy.max_recoveries {
                detail = format!(
                    "worker {} failed; {total} recoveries would exceed failurePolicy.maxRecoveries {}",
                    names.join(", "),
                    spec.failure_policy.max_recoveries
                );
                for pod in &live {
                    if pod_phase(pod) != "Failed" {
                        delete.insert(pod.name_any());
                    }
                }
                JobPhase::Failed
            } else {
                recoveries = total;
                for (name, d) in failed_workers {
                    events.push(JobEvent {
                        severity: Severity::Warning,
                        reason: "WorkerFailed",
                        note: format!("worker pod {name} failed ({d}); replacing it (recovery {recoveries})"),
                    });
                    delete.insert(name);
                }
                JobPhase::Recovering
            }
        } else if succeeded == nodes {
            // Training is done: standby pods have nothing left to stand by for.
            for pod in &live {
                if is_spare(pod) {
                    delete.insert(pod.name_any());
                }
            }
            JobPhase::Succeeded
        } else if running_workers + succeeded == nodes {
            JobPhase::Running
        } else if prior_phase == Some(JobPhase::Recovering) {
            JobPhase::Recovering
        } else {
            JobPhase::Pending
        }
    };

    if !create.is_empty() {
        let names: Vec<String> = create.iter().map(|p| p.name_any()).collect();
        events.push(JobEvent {
            severity: Severity::Normal,
            reason: "CreatedWorkers",
            note: format!("created worker pods {}", names.join(", ")),
        });
    }
    if prior_phase != Some(phase) {
        events.push(transition_event(prior_phase, phase, nodes, &detail));
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
    status.conditions = conditions(&prior.conditions, phase, nodes, &detail, job.metadata.generation, now);

    let service = !matches!(phase, JobPhase::Invalid | JobPhase::Succeeded | JobPhase::Failed);
    Plan { create, delete: delete.into_iter().collect(), service, status, events }
}

/// RFC 3339 of a unix time (the brain's clock is a number).
fn rfc3339(unix: f64) -> String {
    Timestamp::from_second(unix.round() as i64).map(|t| t.to_string()).unwrap_or_default()
}

/// The brain branch of [`plan_with`]: pods to create and delete, the phase, and its detail.
fn brain_phase(
    view: &BrainView,
    desired: Vec<Pod>,
    existing: &[Pod],
    live: &[&Pod],
    create: &mut Vec<Pod>,
    delete: &mut BTreeSet<String>,
) -> (JobPhase, String) {
    let by_name: BTreeMap<String, &Pod> = existing.iter().map(|p| (p.name_any(), p)).collect();
    let wanted: BTreeSet<String> = desired.iter().map(|p| p.name_any()).collect();
    let state = view.state.as_ref();
    let restarting: BTreeSet<u32> =
        state.and_then(|s| s.active.as_ref()).map(|a| a.restarted.clone()).unwrap_or_default();
    let spares: BTreeSet<&str> =
        state.map(|s| s.spares.iter().map(String::as_str).collect()).unwrap_or_default();
    for pod in live {
        let name = pod.name_any();
        if wanted.contains(&name) {
            continue;
        }
        // Before the record exists every desired pod is listed; after it, a spare stays while
        // the record still counts its node as a spare.
        let standing_by = is_spare(pod)
            && !matches!(pod_phase(pod), "Succeeded" | "Failed")
            && pod_node(pod).is_some_and(|n| spares.contains(n));
        if !standing_by {
            delete.insert(name);
        }
    }
    let (mut running, mut succeeded, mut waiting) = (0u32, 0u32, Vec::new());
    let expected = desired.iter().filter(|p| !is_spare(p)).count();
    for pod in desired {
        let name = pod.name_any();
        let Some(current) = by_name.get(&name) else {
            create.push(pod);
            continue;
        };
        if is_deleting(current) {
            continue;
        }
        let pinned = pod.spec.as_ref().and_then(|s| s.node_selector.as_ref()?.get(HOSTNAME_LABEL).cloned());
        // Where the pod is, or is waiting to go (a restart ordered onto a node that then died).
        let placed = pod_node(current).or_else(|| {
            current.spec.as_ref()?.node_selector.as_ref()?.get(HOSTNAME_LABEL).map(String::as_str)
        });
        let moved = pinned.is_some_and(|node| placed.is_some_and(|n| n != node));
        if pod_template_hash(current) != pod_template_hash(&pod) || moved {
            delete.insert(name);
            continue;
        }
        let rank = current.labels().get(RANK_LABEL).and_then(|r| r.parse::<u32>().ok());
        match (pod_phase(current), is_spare(current)) {
            ("Running", false) => running += 1,
            ("Succeeded", false) => succeeded += 1,
            ("Failed", false) if rank.is_some_and(|r| restarting.contains(&r)) => {
                delete.insert(name);
            }
            ("Failed", false) => waiting.push(format!("{name} ({})", exit_detail(current))),
            ("Failed" | "Succeeded", true) => {
                delete.insert(name);
            }
            _ => {}
        }
    }
    let expected = u32::try_from(expected).unwrap_or(u32::MAX);
    let phase = state.map(|s| s.phase);
    if phase == Some(BrainPhase::Failed) {
        for pod in live {
            if !matches!(pod_phase(pod), "Succeeded" | "Failed") {
                delete.insert(pod.name_any());
            }
        }
        let why = state
            .and_then(|s| s.failure.clone())
            .unwrap_or_else(|| "the recovery brain failed the job".into());
        return (JobPhase::Failed, why);
    }
    if expected > 0 && succeeded == expected {
        for pod in live {
            if is_spare(pod) {
                delete.insert(pod.name_any());
            }
        }
        return (JobPhase::Succeeded, String::new());
    }
    if let Some(active) = state.and_then(|s| s.active.as_ref()) {
        let triggers: Vec<String> = active.triggers.iter().map(ToString::to_string).collect();
        return (
            JobPhase::Recovering,
            format!("{} by {} (generation {})", triggers.join(", "), active.rung, active.generation),
        );
    }
    if !waiting.is_empty() {
        return (
            JobPhase::Running,
            format!("worker {} failed; the recovery brain decides", waiting.join(", ")),
        );
    }
    if running + succeeded == expected && phase.is_some_and(|p| p != BrainPhase::Starting) {
        return (JobPhase::Running, String::new());
    }
    (JobPhase::Pending, String::new())
}

fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

fn transition_event(prior: Option<JobPhase>, phase: JobPhase, nodes: u32, detail: &str) -> JobEvent {
    let (severity, reason, note) = match phase {
        JobPhase::Pending => (Severity::Normal, "Pending", format!("waiting for {nodes} workers to run")),
        JobPhase::Running => (Severity::Normal, "Running", format!("all {nodes} workers are running")),
        JobPhase::Recovering if !detail.is_empty() => (Severity::Warning, "Recovering", detail.to_string()),
        JobPhase::Recovering => (Severity::Warning, "Recovering", "replacing failed workers".into()),
        JobPhase::Suspended => {
            (Severity::Normal, "Suspended", "spec.suspend is true; worker pods deleted".into())
        }
        JobPhase::Succeeded => {
            (Severity::Normal, "Succeeded", format!("all {nodes} workers finished training"))
        }
        JobPhase::Failed => (Severity::Warning, "Failed", detail.to_string()),
        JobPhase::Invalid => (Severity::Warning, "InvalidSpec", detail.to_string()),
    };
    if prior == Some(JobPhase::Suspended) && phase != JobPhase::Suspended {
        return JobEvent {
            severity: Severity::Normal,
            reason: "Resumed",
            note: "spec.suspend is false; creating worker pods".into(),
        };
    }
    JobEvent { severity, reason, note }
}

/// The full condition set for `phase`, keeping `lastTransitionTime` of conditions whose status
/// did not change (Kubernetes API conventions).
fn conditions(
    prior: &[JobCondition],
    phase: JobPhase,
    nodes: u32,
    detail: &str,
    generation: Option<i64>,
    now: &str,
) -> Vec<JobCondition> {
    CONDITION_TYPES
        .iter()
        .map(|&type_| {
            let (on, reason, message) = match (type_, phase) {
                ("Ready", JobPhase::Running) => {
                    (true, "WorkersRunning", format!("all {nodes} workers are running"))
                }
                ("Ready", _) => (false, phase_name(phase), String::new()),
                ("Suspended", JobPhase::Suspended) => (true, "Suspended", "spec.suspend is true".to_string()),
                ("Suspended", _) => (false, "NotSuspended", String::new()),
                ("Invalid", JobPhase::Invalid) => (true, "InvalidSpec", detail.to_string()),
                ("Invalid", _) => (false, "Valid", String::new()),
                ("Succeeded", JobPhase::Succeeded) => {
                    (true, "AllWorkersSucceeded", format!("all {nodes} workers finished training"))
                }
                ("Succeeded", _) => (false, phase_name(phase), String::new()),
                ("Failed", JobPhase::Failed) if detail.contains("maxRecoveries") => {
                    (true, "MaxRecoveriesExceeded", detail.to_string())
                }
                ("Failed", JobPhase::Failed) => (true, "RecoveryFailed", detail.to_string()),
                _ => (false, phase_name(phase), String::new()),
            };
            let status = if on { "True" } else { "False" }.to_string();
            let last_transition_time = prior
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
            JobCondition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The phase's name as shown by `kubectl get tj`.
pub fn phase_name(phase: JobPhase) -> &'static str {
    match phase {
        JobPhase::Pending => "Pending",
        JobPhase::Running => "Running",
        JobPhase::Recovering => "Recovering",
        JobPhase::Suspended => "Suspended",
        JobPhase::Succeeded => "Succeeded",
        JobPhase::Failed => "Failed",
        JobPhase::Invalid => "Invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{job, pods_in_phase, with_phase};
    use crate::resources::{WorkerTemplate, desired_pods};

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";

    fn desired(job: &TrainingJob) -> Vec<Pod> {
        desired_pods(job, &WorkerTemplate::default()).unwrap()
    }

    fn condition<'a>(status: &'a TrainingJobStatus, type_: &str) -> &'a JobCondition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn names(pods: &[Pod]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn new_job_creates_every_pod_and_is_pending() {
        let job = job("tiny").spares(1).build();
        let plan = plan(&job, desired(&job), &[], None, T0);
        assert_eq!(names(&plan.create), ["tiny-0", "tiny-1", "tiny-2"]);
        assert!(plan.service);
        assert_eq!(plan.status.phase, Some(JobPhase::Pending));
        assert_eq!(condition(&plan.status, "Ready").status, "False");
        assert_eq!(plan.status.observed_generation, Some(1));
        let reasons: Vec<_> = plan.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["CreatedWorkers", "Pending"]);
    }

    #[test]
    fn all_workers_running_is_running_and_ready_and_nothing_is_rewritten() {
        let job = job("tiny").build();
        let pods = pods_in_phase(&job, "Running");
        let first = plan(&job, desired(&job), &pods, None, T0);
        assert!(first.create.is_empty() && first.delete.is_empty(), "matching pods are left alone");
        assert_eq!(first.status.phase, Some(JobPhase::Running));
        assert_eq!(first.status.healthy_chips, 16);
        let ready = condition(&first.status, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "WorkersRunning"));

        // The next reconcile, later, must produce the identical status: no write, no event.
        let job = crate::fixtures::job("tiny").status(first.status.clone()).build();
        let second = plan(&job, desired(&job), &pods, None, T1);
        assert_eq!(second.status, first.status, "transition times kept");
        assert!(second.events.is_empty());
    }

    #[test]
    fn all_workers_succeeded_is_succeeded_and_spares_are_stopped() {
        let job = job("tiny").spares(1).build();
        let mut pods = pods_in_phase(&job, "Succeeded");
        let spare = pods.pop().unwrap();
        pods.push(with_phase(spare, "Running"));
        let plan = plan(&job, desired(&job), &pods, None, T0);
        assert_eq!(plan.status.phase, Some(JobPhase::Succeeded));
        assert_eq!(plan.delete, ["tiny-2"]);
        assert!(!plan.service);
        assert_eq!(condition(&plan.status, "Succeeded").status, "True");
    }

    #[test]
    fn failed_worker_is_replaced_and_counted_until_max_recoveries() {
        let job = job("tiny").build(); // maxRecoveries 2
        let mut pods = pods_in_phase(&job, "Running");
        pods[1] = with_phase(pods[1].clone(), "Failed");
        let first = plan(&job, desired(&job), &pods, None, T0);
        assert_eq!(first.status.phase, Some(JobPhase::Recovering));
        assert_eq!(first.status.recoveries, 1);
        assert_eq!(first.delete, ["tiny-1"]);
        assert!(first.events.iter().any(|e| e.reason == "WorkerFailed" && e.note.contains("exit code 1")));

        let mut status = first.status.clone();
        status.recoveries = 2;
        let job = crate::fixtures::job("tiny").status(status).build();
        let last = plan(&job, desired(&job), &pods, None, T1);
        assert_eq!(last.status.phase, Some(JobPhase::Failed));
        assert_eq!(last.delete, ["tiny-0"], "running workers stop, the failed one stays for its logs");
        let failed = condition(&last.status, "Failed");
        assert_eq!(failed.status, "True");
        assert!(failed.message.contains("maxRecoveries 2"), "{}", failed.message);
    }

    #[test]
    fn suspend_deletes_every_pod_and_resume_recreates_them() {
        let job = job("tiny").suspended().build();
        let pods = pods_in_phase(&job, "Running");
        let suspended = plan(&job, desired(&job), &pods, None, T0);
        assert_eq!(suspended.delete, ["tiny-0", "tiny-1"]);
        assert!(suspended.create.is_empty());
        assert_eq!(suspended.status.phase, Some(JobPhase::Suspended));
        assert_eq!(condition(&suspended.status, "Suspended").status, "True");

        let job = crate::fixtures::job("tiny").status(suspended.status).build();
        let resumed = plan(&job, desired(&job), &[], None, T1);
        assert_eq!(resumed.create.len(), 2);
        assert_eq!(resumed.status.phase, Some(JobPhase::Pending));
        assert!(resumed.events.iter().any(|e| e.reason == "Resumed"));
        assert_eq!(condition(&resumed.status, "Suspended").last_transition_time, T1);
    }

    #[test]
    fn invalid_spec_reports_the_validator_message_and_touches_nothing() {
        let job = job("tiny").invalid().build();
        let message = "spec.model.heads: hiddenSize must be divisible by heads";
        let plan = plan(&job, Vec::new(), &[], Some(message), T0);
        assert!(plan.create.is_empty() && plan.delete.is_empty() && !plan.service);
        assert_eq!(plan.status.phase, Some(JobPhase::Invalid));
        let invalid = condition(&plan.status, "Invalid");
        assert_eq!((invalid.status.as_str(), invalid.message.as_str()), ("True", message));
        assert_eq!(plan.events[0].reason, "InvalidSpec");
        assert_eq!(plan.events[0].severity, Severity::Warning);
    }

    #[test]
    fn changed_template_replaces_pods_and_shrunk_topology_removes_orphans() {
        let old = job("tiny").nodes(3).build();
        let pods = pods_in_phase(&old, "Running");
        let mut new = job("tiny").nodes(2).build();
        new.spec.training.steps = 99;
        let plan = plan(&new, desired(&new), &pods, None, T0);
        assert_eq!(plan.delete, ["tiny-0", "tiny-1", "tiny-2"]);
        assert!(plan.create.is_empty(), "new pods wait until the old ones are gone");
    }

    #[test]
    fn terminating_pods_are_waited_for() {
        let job = job("tiny").build();
        let mut pods = pods_in_phase(&job, "Running");
        pods[0].metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        let plan = plan(&job, desired(&job), &pods, None, T0);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert_eq!(plan.status.phase, Some(JobPhase::Pending));
    }

    mod brain {
        use ninelives_core::recovery::{ActiveRecovery, BrainPhase, RecoveryState, Rung};

        use super::*;
        use crate::resources::{Assignment, Recovery, assigned_pods};

        fn template() -> WorkerTemplate {
            WorkerTemplate::new(Recovery::Brain)
        }

        /// `pod` bound to `node`.
        fn on(mut pod: Pod, node: &str) -> Pod {
            pod.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
            pod
        }

        /// The pods of a 2-node job with one spare, scheduled on n0, n1 and s0, all in `phase`.
        fn scheduled(job: &TrainingJob, phase: &str) -> Vec<Pod> {
            let pods = desired_pods(job, &template()).unwrap();
            pods.into_iter().zip(["n0", "n1", "s0"]).map(|(p, n)| on(with_phase(p, phase), n)).collect()
        }

        fn view(state: RecoveryState) -> BrainView {
            BrainView { state: Some(state), progress: Some(ProgressRecord { step: 12, loss: Some(2.5) }) }
        }

        fn assigned(job: &TrainingJob, state: &RecoveryState) -> Vec<Pod> {
            let a: Assignment =
                state.expected_ranks().map(|r| (r, state.node_names[r as usize].clone())).collect();
            assigned_pods(job, &template(), &a).unwrap()
        }

        fn running_state() -> RecoveryState {
            let mut s = RecoveryState::new(vec!["n0".into(), "n1".into()], vec!["s0".into()]);
            s.phase = BrainPhase::Running;
            s.generation = 3;
            s
        }

        fn active(rung: Rung, restarted: &[u32]) -> ActiveRecovery {
            ActiveRecovery {
                id: 1,
                triggers: Vec::new(),
                rung,
                generation: 4,
                fault_at: None,
                detected_at: 0.0,
                deadline: 60.0,
                step_at_detection: 12,
                rollback_to: Some(10),
                plan_tier: "reshard".into(),
                experts_moved: 3,
                restarted: restarted.iter().copied().collect(),
                attempts: Vec::new(),
            }
        }

        #[test]
        fn before_the_record_every_pod_is_created_and_spares_stand_by() {
            let job = job("tiny").spares(1).build();
            let pending = BrainView::default();
            let plan =
                plan_with(&job, desired_pods(&job, &template()).unwrap(), &[], None, T0, Some(&pending));
            assert_eq!(plan.create.len(), 3);
            assert_eq!(plan.status.phase, Some(JobPhase::Pending));
        }

        #[test]
        fn running_members_on_their_nodes_are_left_alone_and_status_comes_from_the_record() {
            let job = job("tiny").spares(1).build();
            let state = running_state();
            let pods = scheduled(&job, "Running");
            let plan = plan_with(&job, assigned(&job, &state), &pods, None, T0, Some(&view(state)));
            assert!(plan.create.is_empty() && plan.delete.is_empty(), "{:?}", plan.delete);
            assert_eq!(plan.status.phase, Some(JobPhase::Running));
            assert_eq!((plan.status.placement_generation, plan.status.step), (3, 12));
        }

        #[test]
        fn a_failed_member_waits_for_the_brain_then_is_restarted_when_ordered() {
            let job = job("tiny").spares(1).build();
            let mut pods = scheduled(&job, "Running");
            pods[1] = with_phase(pods[1].clone(), "Failed");
            let state = running_state();
            let plan = plan_with(&job, assigned(&job, &state), &pods, None, T0, Some(&view(state.clone())));
            assert!(plan.delete.is_empty(), "not before the brain decides");
            let mut recovering = state;
            recovering.phase = BrainPhase::Recovering;
            recovering.recoveries = 1;
            recovering.active = Some(active(Rung::Restore, &[1]));
            let plan = plan_with(&job, assigned(&job, &recovering), &pods, None, T0, Some(&view(recovering)));
            assert_eq!(plan.delete, ["tiny-1"]);
            assert_eq!((plan.status.phase, plan.status.recoveries), (Some(JobPhase::Recovering), 1));
            assert!(plan.events.iter().any(|e| e.reason == "Recovering" && e.note.contains("restore")));
        }

        #[test]
        fn a_rank_moved_to_the_spare_is_recreated_there_and_the_spare_pod_goes() {
            let job = job("tiny").spares(1).build();
            let mut pods = scheduled(&job, "Running");
            pods[1] = with_phase(pods[1].clone(), "Failed");
            let mut state = running_state();
            state.node_names[1] = "s0".into();
            state.spares.clear();
            let desired = assigned(&job, &state);
            let plan = plan_with(&job, desired.clone(), &pods, None, T0, Some(&view(state.clone())));
            assert_eq!(plan.delete, ["tiny-1", "tiny-2"], "the old rank-1 pod and the spare's standby pod");
            let after: Vec<Pod> = vec![pods[0].clone()];
            let plan = plan_with(&job, desired, &after, None, T0, Some(&view(state)));
            let selector = plan.create[0].spec.as_ref().unwrap().node_selector.clone().unwrap();
            assert_eq!(selector[HOSTNAME_LABEL], "s0");
        }

        #[test]
        fn a_restart_waiting_on_a_dead_node_follows_the_rank_to_the_spare() {
            let job = job("tiny").spares(1).build();
            let mut state = running_state();
            let before = assigned(&job, &state);
            let mut pods = scheduled(&job, "Running");
            pods[1] = with_phase(before[1].clone(), "Pending"); // pinned to n1, never bound
            state.node_names[1] = "s0".into();
            state.spares.clear();
            let plan = plan_with(&job, assigned(&job, &state), &pods, None, T0, Some(&view(state)));
            assert!(plan.delete.contains(&"tiny-1".to_string()), "{:?}", plan.delete);
        }

        #[test]
        fn a_job_the_brain_failed_is_failed_with_its_reason_and_stopped() {
            let job = job("tiny").spares(1).build();
            let mut state = running_state();
            state.phase = BrainPhase::Failed;
            state.failure = Some("recovery ladder exhausted: no spare".into());
            let pods = scheduled(&job, "Running");
            let plan = plan_with(&job, assigned(&job, &state), &pods, None, T0, Some(&view(state)));
            assert_eq!(plan.status.phase, Some(JobPhase::Failed));
            assert_eq!(plan.delete.len(), 3);
            let failed = condition(&plan.status, "Failed");
            assert_eq!(
                (failed.reason.as_str(), failed.message.as_str()),
                ("RecoveryFailed", "recovery ladder exhausted: no spare")
            );
        }
    }
}
