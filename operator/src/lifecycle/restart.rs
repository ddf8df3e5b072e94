//! The `restart-pods` mode: no brain; a failed worker pod is replaced, up to
//! `failurePolicy.maxRecoveries`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use ninelives_core::TrainingJob;
use ninelives_core::job::JobPhase;

use super::{Changes, Detail, JobEvent, PodSets, Severity, exit_detail, is_deleting, is_spare, pod_phase};
use crate::resources::pod_template_hash;

/// The phase of a job whose failed pods are simply replaced, and the pod changes for it.
pub(super) fn restart_phase(
    job: &TrainingJob,
    pods: PodSets<'_>,
    running_workers: u32,
    recoveries: &mut u32,
    changes: &mut Changes,
) -> (JobPhase, Detail) {
    let PodSets { desired, existing, live } = pods;
    let spec = &job.spec;
    let nodes = spec.topology.nodes;
    let prior_phase = job.status.as_ref().and_then(|s| s.phase);
    let by_name: BTreeMap<String, &Pod> = existing.iter().map(|p| (p.name_any(), p)).collect();
    let wanted: BTreeSet<String> = desired.iter().map(|p| p.name_any()).collect();
    // Pods of ranks the topology no longer has.
    changes.delete.extend(live.iter().map(|p| p.name_any()).filter(|n| !wanted.contains(n)));

    let mut succeeded = 0u32;
    let mut failed_workers = Vec::new();
    for pod in desired {
        let name = pod.name_any();
        let Some(current) = by_name.get(&name) else {
            changes.create.push(pod);
            continue;
        };
        if is_deleting(current) {
            continue; // recreated once the old one is gone
        }
        if pod_template_hash(current) != pod_template_hash(&pod) {
            changes.delete.insert(name);
            continue;
        }
        match (pod_phase(current), is_spare(current)) {
            ("Succeeded", false) => succeeded += 1,
            ("Failed", false) => failed_workers.push((name, exit_detail(current))),
            // A spare that exits is simply replaced; it held no training state.
            ("Failed" | "Succeeded", true) => {
                changes.delete.insert(name);
            }
            _ => {}
        }
    }

    let phase = if !failed_workers.is_empty() {
        let failed = u32::try_from(failed_workers.len()).unwrap_or(u32::MAX);
        let total = recoveries.saturating_add(failed);
        let names: Vec<String> = failed_workers.iter().map(|(n, d)| format!("{n} ({d})")).collect();
        if total > spec.failure_policy.max_recoveries {
            let text = format!(
                "worker {} failed; {total} recoveries would exceed failurePolicy.maxRecoveries {}",
                names.join(", "),
                spec.failure_policy.max_recoveries
            );
            for pod in live {
                if pod_phase(pod) != "Failed" {
                    changes.delete.insert(pod.name_any());
                }
            }
            return (JobPhase::Failed, Detail { text, failed: Some("MaxRecoveriesExceeded") });
        } else {
            *recoveries = total;
            for (name, d) in failed_workers {
                changes.events.push(JobEvent {
                    severity: Severity::Warning,
                    reason: "WorkerFailed",
                    note: format!("worker pod {name} failed ({d}); replacing it (recovery {recoveries})"),
                });
                changes.delete.insert(name);
            }
            JobPhase::Recovering
        }
    } else if succeeded == nodes {
        // Training is done: standby pods have nothing left to stand by for.
        changes.stop_spares(live);
        JobPhase::Succeeded
    } else if running_workers + succeeded == nodes {
        JobPhase::Running
    } else if prior_phase == Some(JobPhase::Recovering) {
        JobPhase::Recovering
    } else {
        JobPhase::Pending
    };
    (phase, Detail::default())
}
