//! What the operator refuses beyond the core validator, because it depends on the cluster:
//! tolerations and priority classes outside the administrator's allow-list, and a multi-node
//! job whose checkpoint volume its members cannot share. Pure: the controller reads the PVC and
//! passes it in; a refusal becomes the job's `Invalid` condition.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use ninelives_core::TrainingJob;

/// The tolerations and priority classes a TrainingJob may ask for. Opt-in: with no allow-list
/// (the default) every job gets what it asks for; an administrator who lets untrusted users
/// create TrainingJobs sets one, so nobody schedules onto reserved nodes or preempts others'
/// work through a job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulingAllowList {
    /// Toleration keys a job may use (an operator-`Exists` toleration without a key, which
    /// tolerates every taint, needs the key `*` here). `None`: any.
    pub toleration_keys: Option<Vec<String>>,
    /// Priority class names a job may use. `None`: any.
    pub priority_classes: Option<Vec<String>>,
}

impl SchedulingAllowList {
    /// Every way `job` exceeds the allow-list, as messages naming the field.
    pub fn violations(&self, job: &TrainingJob) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(allowed) = &self.toleration_keys {
            for (i, toleration) in job.spec.pod.tolerations.iter().enumerate() {
                let key = toleration.key.as_deref().filter(|k| !k.is_empty()).unwrap_or("*");
                if !allowed.iter().any(|a| a == key) {
                    out.push(format!(
                        "spec.pod.tolerations[{i}]: key {key:?} is not in the operator's allow-list ({})",
                        allowed.join(", ")
                    ));
                }
            }
        }
        if let (Some(allowed), Some(class)) = (&self.priority_classes, &job.spec.pod.priority_class_name)
            && !allowed.iter().any(|a| a == class)
        {
            out.push(format!(
                "spec.pod.priorityClassName: {class:?} is not in the operator's allow-list ({})",
                allowed.join(", ")
            ));
        }
        out
    }
}

/// The operator's admission settings (flags; the same for every job).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Tolerations and priority classes jobs may request.
    pub allow_list: SchedulingAllowList,
    /// `checkpoint.path` directories are one filesystem shared by every node (the same NFS
    /// mount everywhere, or the e2e node runner, whose pods are processes of one host).
    pub shared_checkpoint_paths: bool,
}

/// Pods of a job that may run on different nodes: training nodes plus spares (a spare that
/// takes over a rank restores from the same checkpoints).
fn members(job: &TrainingJob) -> u32 {
    job.spec.topology.nodes.saturating_add(job.spec.topology.spare_nodes)
}

/// What the controller knows about the job's checkpoint PVC.
#[derive(Clone, Debug)]
pub enum ClaimLookup<'a> {
    /// The job names no PVC, or it is a single-member job (nothing to share).
    NotNeeded,
    /// The claim as read from the apiserver.
    Found(&'a PersistentVolumeClaim),
    /// No such claim in the job's namespace.
    Missing,
}

/// Whether the job's checkpoint PVC must be read to judge it.
pub fn needs_claim(job: &TrainingJob) -> Option<&str> {
    let pvc = job.spec.checkpoint.pvc.as_ref()?;
    (members(job) > 1).then_some(pvc.claim_name.as_str())
}

/// Why the members of `job` cannot share its checkpoints, if they cannot.
///
/// Every member restores from the checkpoint directory and the generation's leader writes it,
/// so a job on more than one node needs one volume all of them mount read-write at once: a
/// `ReadWriteMany` PVC. A plain `checkpoint.path` is a directory of each pod's own node (or its
/// container), so it is accepted for a multi-node job only when the operator is told that those
/// paths are one shared filesystem on every node (`--shared-checkpoint-paths`).
pub fn checkpoint_violation(job: &TrainingJob, claim: ClaimLookup<'_>, shared_paths: bool) -> Option<String> {
    let members = members(job);
    if members <= 1 {
        return None;
    }
    let checkpoint = &job.spec.checkpoint;
    match (&checkpoint.pvc, claim) {
        (Some(pvc), ClaimLookup::Missing) => Some(format!(
            "spec.checkpoint.pvc: PersistentVolumeClaim {:?} does not exist; a job of {members} nodes needs a \
             ReadWriteMany claim every member mounts",
            pvc.claim_name
        )),
        (Some(pvc), ClaimLookup::Found(found)) => {
            let modes = found.spec.as_ref().and_then(|s| s.access_modes.clone()).unwrap_or_default();
            (!modes.iter().any(|m| m == "ReadWriteMany")).then(|| {
                format!(
                    "spec.checkpoint.pvc: PersistentVolumeClaim {:?} has access modes [{}]; a job of {members} \
                     nodes needs ReadWriteMany, since every member restores from the checkpoints the leader writes",
                    pvc.claim_name,
                    modes.join(", ")
                )
            })
        }
        (Some(_), ClaimLookup::NotNeeded) => None,
        (None, _) if shared_paths => None,
        (None, _) => Some(format!(
            "spec.checkpoint.path: {:?} is a directory of each pod's own node, not shared by the {members} nodes \
             of this job; use spec.checkpoint.pvc with a ReadWriteMany claim (a path is allowed for a single-node \
             job, or when the operator runs with --shared-checkpoint-paths)",
            checkpoint.path.as_deref().unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, Toleration};

    use super::*;
    use crate::fixtures::job;

    fn claim(modes: &[&str]) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes.iter().map(|m| (*m).to_string()).collect()),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    }

    #[test]
    fn a_multi_node_job_needs_a_read_write_many_claim() {
        let job = job("big").nodes(2).pvc("ckpt").build();
        assert_eq!(needs_claim(&job), Some("ckpt"));
        let rwo = checkpoint_violation(&job, ClaimLookup::Found(&claim(&["ReadWriteOnce"])), false)
            .expect("RWO refused");
        assert!(rwo.contains("\"ckpt\" has access modes [ReadWriteOnce]"), "{rwo}");
        assert!(rwo.contains("needs ReadWriteMany"), "{rwo}");
        let missing = checkpoint_violation(&job, ClaimLookup::Missing, false).expect("missing refused");
        assert!(missing.contains("does not exist"), "{missing}");
        assert_eq!(checkpoint_violation(&job, ClaimLookup::Found(&claim(&["ReadWriteMany"])), false), None);
    }

    #[test]
    fn a_host_path_serves_one_node_only_unless_paths_are_shared() {
        let multi = job("big").nodes(2).build();
        let message = checkpoint_violation(&multi, ClaimLookup::NotNeeded, false).expect("refused");
        assert!(message.starts_with("spec.checkpoint.path: \"/tmp/ckpt\""), "{message}");
        assert_eq!(checkpoint_violation(&multi, ClaimLookup::NotNeeded, true), None);
        let single = job("one").nodes(1).build();
        assert_eq!(checkpoint_violation(&single, ClaimLookup::NotNeeded, false), None);
        let with_spare = job("one").nodes(1).spares(1).build();
        assert!(
            checkpoint_violation(&with_spare, ClaimLookup::NotNeeded, false).is_some(),
            "a spare is a member"
        );
        let single_pvc = job("one").nodes(1).pvc("ckpt").build();
        assert_eq!(needs_claim(&single_pvc), None, "one node may use a ReadWriteOnce claim");
    }

    #[test]
    fn the_allow_list_is_opt_in_and_names_what_it_refuses() {
        let job = job("tiny").scheduling().build();
        assert!(SchedulingAllowList::default().violations(&job).is_empty(), "no list: anything goes");
        let allow = SchedulingAllowList {
            toleration_keys: Some(vec!["ninelives.io/chip".into()]),
            priority_classes: Some(vec!["training".into()]),
        };
        assert!(allow.violations(&job).is_empty());
        let strict = SchedulingAllowList {
            toleration_keys: Some(vec!["other".into()]),
            priority_classes: Some(vec!["batch".into()]),
        };
        let v = strict.violations(&job);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("spec.pod.tolerations[0]: key \"ninelives.io/chip\""), "{v:?}");
        assert!(v[1].starts_with("spec.pod.priorityClassName: \"training\""), "{v:?}");
        let mut wildcard = job.clone();
        wildcard.spec.pod.tolerations =
            vec![Toleration { operator: Some("Exists".into()), ..Toleration::default() }];
        let v = allow.violations(&wildcard);
        assert!(v[0].contains("key \"*\""), "a keyless Exists toleration tolerates every taint: {v:?}");
    }
}
