//! Gang scheduling: the PodGroup that makes Volcano or the scheduler-plugins coscheduling
//! plugin place a job's training pods all together or not at all. Without one, each pod is its
//! own gang and a 6,250-pod job can sit half-placed, holding nodes another job needs.
//!
//! The PodGroup is named after the job, owned by it, and asks for `minMember` = the job's
//! training nodes (spares are extra members, welcome but not required). Built without a
//! client, like [`crate::resources`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use ninelives_core::TrainingJob;

use crate::error::Result;
use crate::resources::{KUEUE_QUEUE_LABEL, WorkerTemplate, job_labels, owner_reference};

/// Annotation naming a pod's Volcano PodGroup.
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";
/// Label naming a pod's coscheduling PodGroup.
pub const COSCHEDULING_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// Default scheduler name that selects Volcano's PodGroup.
pub const VOLCANO_SCHEDULER: &str = "volcano";
/// Default scheduler name of the scheduler-plugins scheduler (coscheduling plugin).
pub const COSCHEDULING_SCHEDULER: &str = "scheduler-plugins-scheduler";

/// Which gang scheduler's PodGroup a job gets, from its `spec.pod.schedulerName`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gang {
    /// Volcano: `scheduling.volcano.sh/v1beta1` PodGroup, pods annotated with its name.
    Volcano,
    /// scheduler-plugins coscheduling: `scheduling.x-k8s.io/v1alpha1` PodGroup, pods labelled.
    Coscheduling,
}

/// Scheduler names that select each gang scheduler (operator flags; one cluster may run both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangSchedulers {
    /// `schedulerName` of Volcano.
    pub volcano: String,
    /// `schedulerName` of the scheduler-plugins scheduler with the coscheduling plugin.
    pub coscheduling: String,
}

impl Default for GangSchedulers {
    fn default() -> Self {
        Self { volcano: VOLCANO_SCHEDULER.into(), coscheduling: COSCHEDULING_SCHEDULER.into() }
    }
}

/// The gang scheduler of `job`, if its scheduler is one.
pub fn scheduler(job: &TrainingJob, template: &WorkerTemplate) -> Option<Gang> {
    let name = job.spec.pod.scheduler_name.as_deref()?;
    if name == template.gang.volcano {
        Some(Gang::Volcano)
    } else if name == template.gang.coscheduling {
        Some(Gang::Coscheduling)
    } else {
        None
    }
}

impl Gang {
    /// The PodGroup resource of this scheduler.
    pub fn api_resource(self) -> ApiResource {
        let (group, version) = match self {
            Gang::Volcano => ("scheduling.volcano.sh", "v1beta1"),
            Gang::Coscheduling => ("scheduling.x-k8s.io", "v1alpha1"),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: "PodGroup".into(),
            plural: "podgroups".into(),
        }
    }
}

/// The PodGroup `job` should have under `gang`.
pub fn desired_pod_group(job: &TrainingJob, gang: Gang) -> Result<DynamicObject> {
    let name = job.name_any();
    let mut labels = job_labels(&name);
    if let Some(queue) = job.labels().get(KUEUE_QUEUE_LABEL) {
        labels.insert(KUEUE_QUEUE_LABEL.into(), queue.clone());
    }
    let min_member = job.spec.topology.nodes;
    let mut spec = serde_json::Map::new();
    spec.insert("minMember".into(), min_member.into());
    if gang == Gang::Volcano
        && let Some(class) = &job.spec.pod.priority_class_name
    {
        spec.insert("priorityClassName".into(), class.clone().into());
    }
    let mut object =
        DynamicObject::new(&name, &gang.api_resource()).within(&job.namespace().unwrap_or_default());
    object.metadata = ObjectMeta {
        labels: Some(labels),
        owner_references: Some(vec![owner_reference(job)?]),
        ..object.metadata
    };
    object.data = serde_json::json!({ "spec": spec });
    Ok(object)
}

/// Whether an existing PodGroup already asks for what `desired` does (its spec fields we set).
pub fn pod_group_matches(existing: &DynamicObject, desired: &DynamicObject) -> bool {
    let fields = |o: &DynamicObject| -> BTreeMap<String, serde_json::Value> {
        desired.data["spec"]
            .as_object()
            .map(|spec| spec.keys().map(|k| (k.clone(), o.data["spec"][k].clone())).collect())
            .unwrap_or_default()
    };
    fields(existing) == fields(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::job;
    use crate::resources::{JOB_LABEL, desired_pods};

    fn with_scheduler(name: &str) -> TrainingJob {
        let mut job = job("big").nodes(4).spares(1).build();
        job.spec.pod.scheduler_name = Some(name.into());
        job.metadata.labels = Some(BTreeMap::from([(KUEUE_QUEUE_LABEL.to_string(), "team-a".to_string())]));
        job
    }

    #[test]
    fn volcano_jobs_get_a_podgroup_of_their_training_nodes_and_annotated_pods() {
        let job = with_scheduler("volcano");
        let template = WorkerTemplate::default();
        assert_eq!(scheduler(&job, &template), Some(Gang::Volcano));
        let group = desired_pod_group(&job, Gang::Volcano).unwrap();
        assert_eq!(group.types.as_ref().unwrap().api_version, "scheduling.volcano.sh/v1beta1");
        assert_eq!(group.data["spec"]["minMember"], 4, "spares are not required for the gang");
        assert_eq!(group.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(group.labels()[KUEUE_QUEUE_LABEL], "team-a");
        for pod in desired_pods(&job, &template).unwrap() {
            assert_eq!(pod.annotations()[VOLCANO_GROUP_ANNOTATION], "big");
            assert_eq!(pod.labels()[KUEUE_QUEUE_LABEL], "team-a");
            assert!(!pod.labels().contains_key(COSCHEDULING_GROUP_LABEL));
        }
    }

    #[test]
    fn coscheduling_jobs_get_its_podgroup_and_labelled_pods() {
        let job = with_scheduler(COSCHEDULING_SCHEDULER);
        let template = WorkerTemplate::default();
        assert_eq!(scheduler(&job, &template), Some(Gang::Coscheduling));
        let group = desired_pod_group(&job, Gang::Coscheduling).unwrap();
        assert_eq!(group.types.as_ref().unwrap().api_version, "scheduling.x-k8s.io/v1alpha1");
        assert_eq!(group.data["spec"]["minMember"], 4);
        let pods = desired_pods(&job, &template).unwrap();
        assert!(pods.iter().all(|p| p.labels()[COSCHEDULING_GROUP_LABEL] == "big"));
        assert!(pods.iter().all(|p| !p.annotations().contains_key(VOLCANO_GROUP_ANNOTATION)));
    }

    #[test]
    fn other_schedulers_get_no_podgroup_and_a_changed_size_is_a_mismatch() {
        let template = WorkerTemplate::default();
        assert_eq!(scheduler(&with_scheduler("default-scheduler"), &template), None);
        assert_eq!(scheduler(&job("plain").build(), &template), None);
        let pods = desired_pods(&with_scheduler("my-scheduler"), &template).unwrap();
        assert!(pods.iter().all(|p| !p.labels().contains_key(COSCHEDULING_GROUP_LABEL)));
        assert_eq!(pods[0].labels()[JOB_LABEL], "big");

        let job = with_scheduler("volcano");
        let group = desired_pod_group(&job, Gang::Volcano).unwrap();
        assert!(pod_group_matches(&group, &group));
        let mut bigger = job.clone();
        bigger.spec.topology.nodes = 8;
        assert!(!pod_group_matches(&group, &desired_pod_group(&bigger, Gang::Volcano).unwrap()));
    }
}
