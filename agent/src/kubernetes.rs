//! The node's chip health as Kubernetes sees it: a Node condition and a taint.
//!
//! - Condition `NinelivesChipsHealthy`: `True` when every chip is usable, `False` with reason
//!   `ChipsIsolated` (message lists the chips and codes) or `NodeIsolated` otherwise.
//! - Taint `ninelives.io/chip-fault=<isolated chips>:NoSchedule` while any chip is isolated, so
//!   nothing new lands on the node; `NoSchedule`, not `NoExecute`: running workers stay, the
//!   operator's recovery decides what moves.
//!
//! Writes are edge-triggered and debounced (at most one pair of patches per second), so the
//! apiserver sees O(1) writes per failure, never per chip or per heartbeat.
//!
//! RBAC (ClusterRole of the agent's ServiceAccount): `nodes`: `get`, `patch`;
//! `nodes/status`: `patch`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use ninelives_core::keyspace::ChipState;
use tokio::sync::watch;

use crate::error::AgentError;
use crate::etcd::{Backoff, seed_of};
use crate::events::{AgentEvent, AgentMetrics};
use crate::node::DesiredStates;

/// The Node condition type.
pub const CONDITION_TYPE: &str = "NinelivesChipsHealthy";
/// The taint key.
pub const TAINT_KEY: &str = "ninelives.io/chip-fault";
/// The taint effect.
pub const TAINT_EFFECT: &str = "NoSchedule";

/// What the node report says, computed from the desired chip states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReport {
    /// `True` or `False`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// Taint value (number of isolated chips) when the node must be tainted.
    pub taint: Option<String>,
}

/// Computes the condition and taint for a node's chips.
pub fn node_report(chips: &DesiredStates, node_isolated: bool) -> NodeReport {
    let isolated: Vec<String> = chips
        .iter()
        .filter(|(_, d)| !d.record.state.usable())
        .map(|(i, d)| format!("{i} {} ({})", d.record.state.as_str(), d.record.code))
        .collect();
    let degraded = chips.values().filter(|d| d.record.state == ChipState::Degraded).count();
    if isolated.is_empty() {
        let message = if degraded == 0 {
            format!("all {} chips healthy", chips.len())
        } else {
            format!("all {} chips usable, {degraded} degraded", chips.len())
        };
        return NodeReport { status: "True", reason: "AllChipsUsable", message, taint: None };
    }
    let mut message =
        format!("{} of {} chips isolated: {}", isolated.len(), chips.len(), isolated.join(", "));
    // Condition messages are for people; keep them bounded.
    if message.len() > 1024 {
        message.truncate(1021);
        message.push_str("...");
    }
    NodeReport {
        status: "False",
        reason: if node_isolated { "NodeIsolated" } else { "ChipsIsolated" },
        message,
        taint: Some(isolated.len().to_string()),
    }
}

/// The node's taints with ours set as `report` says; `None` when they are already right.
/// Other taints are kept untouched.
pub fn reconcile_taints(existing: &[Taint], report: &NodeReport) -> Option<Vec<Taint>> {
    let ours = existing.iter().find(|t| t.key == TAINT_KEY);
    let wanted = report.taint.as_ref().map(|value| Taint {
        key: TAINT_KEY.to_string(),
        value: Some(value.clone()),
        effect: TAINT_EFFECT.to_string(),
        time_added: None,
    });
    let unchanged = match (ours, &wanted) {
        (None, None) => true,
        (Some(o), Some(w)) => o.value == w.value && o.effect == w.effect,
        _ => false,
    };
    if unchanged {
        return None;
    }
    let mut taints: Vec<Taint> = existing.iter().filter(|t| t.key != TAINT_KEY).cloned().collect();
    taints.extend(wanted);
    Some(taints)
}

/// The condition to write, keeping `lastTransitionTime` when the status did not change.
pub fn condition(report: &NodeReport, previous: Option<&NodeCondition>, now: Time) -> NodeCondition {
    let transition = match previous {
        Some(p) if p.status == report.status => p.last_transition_time.clone().unwrap_or_else(|| now.clone()),
        _ => now.clone(),
    };
    NodeCondition {
        type_: CONDITION_TYPE.to_string(),
        status: report.status.to_string(),
        reason: Some(report.reason.to_string()),
        message: Some(report.message.clone()),
        last_transition_time: Some(transition),
        last_heartbeat_time: Some(now),
    }
}

/// Writes the node report to the apiserver whenever it changes.
pub struct NodeReporter {
    nodes: Api<Node>,
    node: String,
    metrics: AgentMetrics,
}

impl NodeReporter {
    /// A reporter for `node`.
    pub fn new(client: kube::Client, node: &str, metrics: AgentMetrics) -> Self {
        Self { nodes: Api::all(client), node: node.to_string(), metrics }
    }

    /// Applies the report of every change of the desired chip states, at most once a second.
    pub async fn run(
        self,
        mut desired: watch::Receiver<DesiredStates>,
        mut isolated: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut applied: Option<NodeReport> = None;
        let mut backoff = Backoff::new(seed_of(&self.node));
        loop {
            let chips: DesiredStates = desired.borrow_and_update().clone();
            let report = node_report(&chips, *isolated.borrow_and_update());
            if chips.is_empty() || applied.as_ref() == Some(&report) {
                tokio::select! {
                    _ = desired.changed() => {}
                    _ = isolated.changed() => {}
                    _ = shutdown.changed() => return,
                }
                // Debounce: a burst of chip changes becomes one write.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            match self.apply(&report).await {
                Ok(tainted) => {
                    AgentEvent::NodeReported { healthy: report.status == "True", tainted }
                        .emit(&self.metrics);
                    applied = Some(report);
                    backoff.reset();
                }
                Err(e) => {
                    let text = e.to_string();
                    AgentEvent::KubeError { op: e.metric_label(), error: &text }.emit(&self.metrics);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    async fn apply(&self, report: &NodeReport) -> Result<bool, AgentError> {
        let node =
            self.nodes.get(&self.node).await.map_err(|source| AgentError::Kube { op: "get-node", source })?;
        let previous = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_TYPE));
        let cond = condition(report, previous, Time(k8s_openapi::jiff::Timestamp::now()));
        // Strategic merge: conditions merge by `type`, so other conditions are untouched.
        let status_patch = serde_json::json!({ "status": { "conditions": [cond] } });
        self.nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Strategic(status_patch))
            .await
            .map_err(|source| AgentError::Kube { op: "patch-node-status", source })?;

        let existing = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        if let Some(taints) = reconcile_taints(&existing, report) {
            // Taints have no merge key: replace the list, guarded by resourceVersion so a
            // concurrent change by someone else is retried, not overwritten.
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": node.metadata.resource_version },
                "spec": { "taints": taints },
            });
            self.nodes
                .patch(&self.node, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|source| AgentError::Kube { op: "patch-node-taints", source })?;
        }
        Ok(report.taint.is_some())
    }
}

/// A client from the in-cluster service account, or from `KUBECONFIG` outside a cluster.
pub async fn default_client() -> Result<kube::Client, AgentError> {
    kube::Client::try_default().await.map_err(|source| AgentError::Kube { op: "connect", source })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ninelives_core::keyspace::ChipRecord;

    use super::*;
    use crate::node::DesiredChip;

    fn chips(states: &[(ChipState, &str)]) -> DesiredStates {
        states
            .iter()
            .enumerate()
            .map(|(i, (state, code))| {
                let record = ChipRecord { state: *state, code: code.to_string(), since: 0.0 };
                (i as u32, DesiredChip { record, observed_at: Instant::now() })
            })
            .collect()
    }

    fn other_taint() -> Taint {
        Taint {
            key: "gpu.example/maintenance".into(),
            value: None,
            effect: "NoExecute".into(),
            time_added: None,
        }
    }

    #[test]
    fn healthy_and_degraded_chips_keep_the_node_untainted() {
        let report = node_report(
            &chips(&[(ChipState::Healthy, "ok"), (ChipState::Degraded, "subhealth-slow")]),
            false,
        );
        assert_eq!((report.status, report.reason), ("True", "AllChipsUsable"));
        assert_eq!(report.message, "all 2 chips usable, 1 degraded");
        assert_eq!(report.taint, None);
        assert_eq!(reconcile_taints(&[other_taint()], &report), None, "nothing to change");
    }

    #[test]
    fn isolated_chips_set_condition_false_and_taint() {
        let c = chips(&[
            (ChipState::Healthy, "ok"),
            (ChipState::Failed, "hbm-ecc-uncorrectable"),
            (ChipState::Quarantined, "flapping:link-down"),
        ]);
        let report = node_report(&c, false);
        assert_eq!((report.status, report.reason), ("False", "ChipsIsolated"));
        assert_eq!(
            report.message,
            "2 of 3 chips isolated: 1 failed (hbm-ecc-uncorrectable), 2 quarantined (flapping:link-down)"
        );
        let taints = reconcile_taints(&[other_taint()], &report).unwrap();
        assert_eq!(taints.len(), 2);
        assert_eq!(taints[0], other_taint(), "foreign taints are kept");
        assert_eq!((taints[1].key.as_str(), taints[1].value.as_deref()), (TAINT_KEY, Some("2")));
        assert_eq!(reconcile_taints(&taints, &report), None, "already tainted");

        let healthy = node_report(&chips(&[(ChipState::Healthy, "ok")]), false);
        assert_eq!(
            reconcile_taints(&taints, &healthy),
            Some(vec![other_taint()]),
            "taint removed on recovery"
        );
        assert_eq!(node_report(&c, true).reason, "NodeIsolated");
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let failed = node_report(&chips(&[(ChipState::Failed, "link-down")]), false);
        let first = condition(&failed, None, t0.clone());
        let again = condition(&failed, Some(&first), t1.clone());
        assert_eq!(again.last_transition_time, Some(t0));
        let healthy = node_report(&chips(&[(ChipState::Healthy, "ok")]), false);
        assert_eq!(condition(&healthy, Some(&again), t1.clone()).last_transition_time, Some(t1));
    }
}
