//! The simulator against cases solved by hand, and its bookkeeping on random traces.

use std::collections::BTreeMap;

use super::*;
use crate::fault_schedule::FaultKind;
use crate::manifest::parse_job;

fn tiny() -> TrainingJobSpec {
    match parse_job(include_str!("../../../examples/tiny.yaml")) {
        Ok(job) => job.spec,
        Err(v) => panic!("tiny.yaml does not validate: {v:?}"),
    }
}

/// 1 s steps; detection 1 s (chip) / 3 s (node); commit 2 s; restart 50 s; every transfer so
/// fast it costs nothing; no faults but the given ones; 1,000 s.
fn hand_params() -> SimParams {
    let mut costs = Costs::measured(1.0, 3.0);
    costs.commit_s = 2.0;
    costs.job_restart_s = 50.0;
    costs.spare_start_s = 4.0;
    costs.worker_start_s = 3.0;
    for rate in [&mut costs.read_gbps, &mut costs.write_gbps, &mut costs.snapshot_gbps, &mut costs.link_gbps]
    {
        *rate = 1e15;
    }
    let faults = FaultModel {
        mean_interval_s: BTreeMap::new(),
        repair_s: 1e9,
        flap_onsets: 3,
        flap_half_period_s: 10.0,
    };
    SimParams { horizon_s: 1000.0, seed: 1, costs, faults, peer_interval_steps: 1, samples: 4 }
}

/// Every expert once (no redundant replicas): any chip fault loses an expert's only replica.
fn single_replica(name: &str, recovery: Recovery) -> Policy {
    let mut p = Policy::new(name, recovery);
    p.redundant_experts = Some(0);
    p.interval_steps = Some(10);
    p
}

fn run(policy: &Policy, trace: &[Fault]) -> PolicyOutcome {
    match simulate_policy(&tiny(), policy, &hand_params(), trace) {
        Ok(o) => o,
        Err(e) => panic!("{}: {e}", policy.name),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[test]
fn one_chip_fault_solved_by_hand_for_each_policy() {
    // A chip fault at 105.5 s: 105.5 steps done, the newest checkpoint is step 100.
    let trace = [Fault { at: 105.5, kind: FaultKind::Chip, node: 1, chip: Some(3) }];

    // Restart: detected at 106.5, restarted at 156.5 from step 100; 843.5 more steps.
    let restart = run(&single_replica("restart", Recovery::CheckpointRestart), &trace);
    assert!(close(restart.steps_kept, 943.5), "{restart:#?}");
    assert!(close(restart.ettr, 0.9435));
    assert!(close(restart.steps_lost, 5.5));
    assert!(close(restart.detection_s, 1.0));
    assert_eq!(restart.tiers["restart"].count, 1);
    assert!(close(restart.tiers["restart"].seconds, 50.0));

    // ninelives without peer copies: the brain reshards the lost expert from the checkpoint,
    // rolling back to step 100; resumed at 106.5 + 2 = 108.5; 891.5 more steps.
    let no_peer = run(&single_replica("no peer", Recovery::Ninelives { peer_copies: false }), &trace);
    assert!(close(no_peer.steps_kept, 991.5), "{no_peer:#?}");
    assert!(close(no_peer.steps_lost, 5.5));
    assert_eq!(no_peer.tiers["reshard"].count, 1);
    assert!(close(no_peer.tiers["reshard"].seconds, 2.0));
    assert_eq!((no_peer.disk_rollbacks, no_peer.peer_rollbacks), (1, 0));

    // With peer copies the buddy holds step 105: only the half step in flight is lost.
    let peer = run(&single_replica("peer", Recovery::Ninelives { peer_copies: true }), &trace);
    assert!(close(peer.steps_kept, 996.5), "{peer:#?}");
    assert!(close(peer.steps_lost, 0.5));
    assert!(close(peer.ettr, 0.9965));
    assert_eq!((peer.disk_rollbacks, peer.peer_rollbacks), (0, 1));
    assert!(peer.decisions >= 4, "start (2), fault, resume");
}

#[test]
fn a_node_loss_is_replaced_by_the_spare_and_a_lost_buddy_falls_back_to_disk() {
    // Node 2 lost at 205.5 s: detected after the 3 s TTL, the spare comes in (4 s start).
    let lone = [Fault { at: 205.5, kind: FaultKind::Node, node: 2, chip: None }];
    let peer = run(&single_replica("peer", Recovery::Ninelives { peer_copies: true }), &lone);
    assert_eq!(peer.tiers["replace"].count, 1, "{peer:#?}");
    // 205 kept; resumed at 205.5 + 3 + 2 + 4 = 214.5; 785.5 more steps.
    assert!(close(peer.steps_kept, 990.5), "{peer:#?}");
    assert_eq!(peer.peer_rollbacks, 1);

    // Node 2 and its buddy (node 3: tiny has no racks, so the next node) lost together: the
    // copies are gone, the job rolls back to step 200 on disk.
    let both = [
        Fault { at: 205.5, kind: FaultKind::Node, node: 2, chip: None },
        Fault { at: 205.6, kind: FaultKind::Node, node: 3, chip: None },
    ];
    let lost = run(&single_replica("peer", Recovery::Ninelives { peer_copies: true }), &both);
    assert_eq!((lost.disk_rollbacks, lost.peer_rollbacks), (1, 0), "{lost:#?}");
    assert!(close(lost.steps_lost, 5.5));
}

#[test]
fn a_flapping_chip_costs_one_recovery_not_one_per_flap() {
    let trace = [Fault { at: 50.25, kind: FaultKind::Flap, node: 0, chip: Some(5) }];
    let restart = run(&single_replica("restart", Recovery::CheckpointRestart), &trace);
    let peer = run(&single_replica("peer", Recovery::Ninelives { peer_copies: true }), &trace);
    // Onsets at 50.25, 70.25 and 90.25 s: the baseline restarts for each (the later ones fall
    // inside the restart and push it back); the brain excluded the chip at the first.
    assert_eq!(restart.interruptions, 3);
    assert_eq!(peer.interruptions, 1, "{peer:#?}");
    assert_eq!(peer.tiers.values().map(|t| t.count).sum::<u64>(), 1);
    assert!(close(restart.detection_s, 1.0) && close(restart.tiers["restart"].seconds, 90.0));
}

#[test]
fn wall_time_adds_up_and_runs_are_deterministic_on_a_random_trace() {
    let mut params = hand_params();
    params.horizon_s = 6.0 * 3600.0;
    params.faults = match FaultModel::every(600.0, &DEFAULT_MIX) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    params.faults.repair_s = 900.0;
    params.costs = Costs::measured(2.0, 3.0);
    let mut spec = tiny();
    // tiny allows 20 recoveries in its life; this trace has ~36 faults. Four nodes lose a
    // quarter of the job per node loss: with one spare the job soon falls below its
    // minHealthyFraction (a real outcome, but not what this test is about).
    spec.failure_policy.max_recoveries = 10_000;
    spec.topology.spare_nodes = 4;
    let policies = Policy::defaults(8, 25);
    let report = match simulate(&spec, &policies, &params) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(report.outcomes.len(), policies.len());
    for o in &report.outcomes {
        let spent = o.steps_kept * params.costs.step_s
            + o.lost_work_s
            + o.checkpoint_pause_s
            + o.detection_s
            + o.recovery_s()
            + o.dead_s;
        assert!(
            (spent - params.horizon_s).abs() < 1e-3,
            "{}: {spent} s accounted of {}",
            o.policy.name,
            params.horizon_s
        );
        assert!(o.ettr > 0.0 && o.ettr < 1.0, "{}: {}", o.policy.name, o.ettr);
        assert!(!o.tiers.contains_key("unhandled"), "{}: {:?}", o.policy.name, o.tiers);
        assert!(o.job_failed.is_none(), "{}: {:?}", o.policy.name, o.job_failed);
    }
    let again = simulate(&spec, &policies, &params).map(|r| r.outcomes);
    assert_eq!(again.as_ref().ok(), Some(&report.outcomes));
    let by_name =
        |n: &str| report.outcomes.iter().find(|o| o.policy.name == n).map(|o| o.ettr).unwrap_or(0.0);
    assert!(by_name("ninelives, peer copies") > by_name("checkpoint-restart"));
}
