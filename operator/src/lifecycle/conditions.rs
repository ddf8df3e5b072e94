//! Conditions and phase-transition Events.

use ninelives_core::job::{JobCondition, JobPhase};

use super::{ControlPlaneNote, Detail, JobEvent, Severity};

/// Condition types, always all present, in this order.
pub const CONDITION_TYPES: [&str; 6] =
    ["Ready", "Suspended", "Invalid", "Succeeded", "Failed", "ControlPlaneDegraded"];

pub(super) fn transition_event(
    prior: Option<JobPhase>,
    phase: JobPhase,
    nodes: u32,
    detail: &str,
) -> JobEvent {
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
pub(super) fn conditions(
    prior: &[JobCondition],
    phase: JobPhase,
    nodes: u32,
    detail: &Detail,
    control_plane: Option<&ControlPlaneNote>,
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
                ("Invalid", JobPhase::Invalid) => (true, "InvalidSpec", detail.text.clone()),
                ("Invalid", _) => (false, "Valid", String::new()),
                ("Succeeded", JobPhase::Succeeded) => {
                    (true, "AllWorkersSucceeded", format!("all {nodes} workers finished training"))
                }
                ("Succeeded", _) => (false, phase_name(phase), String::new()),
                ("Failed", JobPhase::Failed) => {
                    (true, detail.failed.unwrap_or("RecoveryFailed"), detail.text.clone())
                }
                ("ControlPlaneDegraded", _) => match control_plane {
                    Some(note) => (true, note.reason, note.message.clone()),
                    None => (false, "ControlPlaneHealthy", String::new()),
                },
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
