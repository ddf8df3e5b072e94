//! The `brain` mode: the recovery brain's record decides the phase; pods follow its node table.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use ninelives_core::job::JobPhase;
use ninelives_core::recovery::BrainPhase;

use super::{BrainView, Changes, Detail, PodSets, exit_detail, is_deleting, is_spare, pod_phase};
use crate::resources::{HOSTNAME_LABEL, RANK_LABEL, pod_template_hash};

/// The brain branch of [`plan_with`](super::plan_with): pods to create and delete, the phase, and its detail.
pub(super) fn brain_phase(view: &BrainView, pods: PodSets<'_>, changes: &mut Changes) -> (JobPhase, Detail) {
    let PodSets { desired, existing, live } = pods;
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
            changes.delete.insert(name);
        }
    }
    let (mut running, mut succeeded, mut waiting) = (0u32, 0u32, Vec::new());
    let expected = desired.iter().filter(|p| !is_spare(p)).count();
    for pod in desired {
        let name = pod.name_any();
        let Some(current) = by_name.get(&name) else {
            changes.create.push(pod);
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
            changes.delete.insert(name);
            continue;
        }
        let rank = current.labels().get(RANK_LABEL).and_then(|r| r.parse::<u32>().ok());
        match (pod_phase(current), is_spare(current)) {
            ("Running", false) => running += 1,
            ("Succeeded", false) => succeeded += 1,
            ("Failed", false) if rank.is_some_and(|r| restarting.contains(&r)) => {
                changes.delete.insert(name);
            }
            ("Failed", false) => waiting.push(format!("{name} ({})", exit_detail(current))),
            ("Failed" | "Succeeded", true) => {
                changes.delete.insert(name);
            }
            _ => {}
        }
    }
    let expected = u32::try_from(expected).unwrap_or(u32::MAX);
    let phase = state.map(|s| s.phase);
    if phase == Some(BrainPhase::Failed) {
        changes.stop_unfinished(live);
        let detail = match state.and_then(|s| s.failure.as_ref()) {
            Some(failure) => Detail { text: failure.to_string(), failed: Some(failure.condition_reason()) },
            None => Detail::text("the recovery brain failed the job"),
        };
        return (JobPhase::Failed, detail);
    }
    if expected > 0 && succeeded == expected {
        changes.stop_spares(live);
        return (JobPhase::Succeeded, Detail::default());
    }
    if let Some(active) = state.and_then(|s| s.active.as_ref()) {
        let triggers: Vec<String> = active.triggers.iter().map(ToString::to_string).collect();
        let text = format!("{} by {} (generation {})", triggers.join(", "), active.rung, active.generation);
        return (JobPhase::Recovering, Detail::text(text));
    }
    if !waiting.is_empty() {
        let text = format!("worker {} failed; the recovery brain decides", waiting.join(", "));
        return (JobPhase::Running, Detail::text(text));
    }
    if running + succeeded == expected && phase.is_some_and(|p| p != BrainPhase::Starting) {
        return (JobPhase::Running, Detail::default());
    }
    (JobPhase::Pending, Detail::default())
}

fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}
