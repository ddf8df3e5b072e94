//! Every transition of the job lifecycle, without a cluster.

use super::*;
use crate::fixtures::{job, pods_in_phase, with_phase};
use crate::resources::{WorkerTemplate, desired_pods};
use ninelives_core::job::JobCondition;

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
    pods[0].metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let plan = plan(&job, desired(&job), &pods, None, T0);
    assert!(plan.create.is_empty() && plan.delete.is_empty());
    assert_eq!(plan.status.phase, Some(JobPhase::Pending));
}

mod brain {
    use ninelives_core::recovery::{ActiveRecovery, BrainPhase, JobFailure, RecoveryState, Rung};

    use super::*;
    use crate::resources::{Assignment, HOSTNAME_LABEL, Recovery, assigned_pods};

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
        BrainView {
            state: Some(state),
            progress: Some(ProgressRecord { step: 12, loss: Some(2.5), generation: None, rank: None }),
            control_plane: None,
        }
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
            rollback_from_peers: false,
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
        let plan = plan_with(&job, desired_pods(&job, &template()).unwrap(), &[], None, T0, Some(&pending));
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
        state.failure = Some(JobFailure::LadderExhausted { last: "no spare".into() });
        let pods = scheduled(&job, "Running");
        let plan = plan_with(&job, assigned(&job, &state), &pods, None, T0, Some(&view(state)));
        assert_eq!(plan.status.phase, Some(JobPhase::Failed));
        assert_eq!(plan.delete.len(), 3);
        let failed = condition(&plan.status, "Failed");
        assert_eq!(
            (failed.reason.as_str(), failed.message.as_str()),
            ("RecoveryLadderExhausted", "recovery ladder exhausted: no spare")
        );
    }
}
