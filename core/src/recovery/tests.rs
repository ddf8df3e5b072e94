//! Scripted event sequences against the brain, with a tiny in-memory runtime that carries out
//! its actions the way the operator and the local runtime do.

use std::collections::BTreeSet;

use super::*;
use crate::keyspace::{ChipRecord, ChipState};
use crate::placement::{ExpertLoad, Placement, PlacementShape, ReplanOptions};

/// 4 nodes x 4 chips, one expert-parallel group, 2 layers x 8 experts, 4 slots per chip.
fn shape(redundant: u32, min_healthy: f64, nodes_per_rack: Option<u32>, nodes: u32) -> PlacementShape {
    PlacementShape {
        layers: 2,
        routed_experts: 8,
        redundant_experts: redundant,
        expert_state_bytes: 1 << 20,
        nodes,
        chips_per_node: 4,
        chip_memory_bytes: 4 << 20,
        expert_parallel_size: nodes * 4,
        nodes_per_rack,
        min_healthy_fraction: min_healthy,
        pipeline_stages: 1,
    }
}

fn config(shape: PlacementShape) -> BrainConfig {
    BrainConfig {
        load: ExpertLoad::uniform(&shape),
        shape,
        options: ReplanOptions::default(),
        allowed: Rung::LADDER.into_iter().collect(),
        recovery_timeout_s: 30.0,
        start_timeout_s: 120.0,
        apply_timeout_s: 30.0,
        max_recoveries: 10,
        total_steps: 300,
        rejoin_after_s: 60.0,
        peer_copies: true,
        peer_snapshots: 0,
        peer_interval_steps: 1,
    }
}

/// Every expert has two replicas (8 redundant per layer of 8 experts).
fn redundant() -> BrainConfig {
    config(shape(8, 0.5, None, 4))
}

/// One replica per expert: any lost expert needs the checkpoint.
fn single() -> BrainConfig {
    config(shape(0, 0.5, None, 4))
}

/// A fake runtime: applies actions to its view of etcd; agents ack at once, workers join at once
/// (each can be switched off to script slow or failing components).
struct Sim {
    cfg: BrainConfig,
    st: RecoveryState,
    placement: Option<Placement>,
    obs: Observation,
    acks: bool,
    joins: bool,
    log: Vec<Action>,
    /// The clock of the last decision (fed back as `previous_decision`, as the control loop does).
    decided: Option<f64>,
}

impl Sim {
    fn new(cfg: BrainConfig, spares: usize) -> Self {
        let names: Vec<String> = (0..cfg.shape.nodes).map(|i| format!("n{i}")).collect();
        let spare_names: Vec<String> = (0..spares).map(|i| format!("s{i}")).collect();
        let mut obs = Observation { now: 1000.0, ..Default::default() };
        for n in names.iter().chain(&spare_names) {
            obs.nodes.insert(n.clone(), NodeView { alive: true, ..Default::default() });
        }
        Self {
            st: RecoveryState::new(names, spare_names),
            cfg,
            placement: None,
            obs,
            acks: true,
            joins: true,
            log: Vec::new(),
            decided: None,
        }
    }

    fn tick(&mut self) -> Vec<Action> {
        self.obs.previous_decision = self.decided.replace(self.obs.now);
        let d = decide(&self.cfg, &self.st, &self.obs, self.placement.as_ref()).expect("decide");
        self.st = d.state;
        for a in &d.actions {
            match a {
                Action::PublishPlacement { placement, control } => {
                    assert_eq!(placement.generation, control.generation);
                    self.placement = Some(placement.clone());
                    if self.acks {
                        self.ack_all(placement.generation, AckOutcome::Applied);
                    }
                }
                Action::StartMember { rank, .. } if self.joins => {
                    self.obs.members.insert(*rank);
                }
                Action::DropNode { index, .. } => {
                    self.obs.members.remove(index);
                }
                _ => {}
            }
        }
        self.log.extend(d.actions.clone());
        d.actions
    }

    fn ack_all(&mut self, generation: u64, outcome: AckOutcome) {
        let names: Vec<String> =
            self.st.expected_ranks().map(|r| self.st.node_names[r as usize].clone()).collect();
        for node in names {
            if self.obs.nodes.get(&node).is_some_and(|v| v.alive) {
                let ack = Ack {
                    node: node.clone(),
                    generation,
                    kind: None,
                    outcome,
                    seconds: None,
                    error: None,
                    at: None,
                };
                self.obs.acks.entry(generation).or_default().insert(node, ack);
            }
        }
    }

    fn running(cfg: BrainConfig, spares: usize) -> Self {
        let mut sim = Self::new(cfg, spares);
        sim.tick();
        sim.tick();
        assert_eq!(sim.st.phase, BrainPhase::Running);
        sim.obs.step = Some(60);
        sim.obs.checkpoints = BTreeSet::from([25, 50]);
        sim
    }

    fn later(&mut self, seconds: f64) {
        self.obs.now += seconds;
    }

    fn chip(&mut self, node: &str, chip: u32, state: ChipState, code: &str) {
        let since = self.obs.now - 0.2;
        let view = self.obs.nodes.entry(node.to_string()).or_default();
        view.chips.insert(chip, ChipRecord { state, code: code.into(), since });
    }

    fn kill_node(&mut self, node: &str) {
        if let Some(v) = self.obs.nodes.get_mut(node) {
            v.alive = false;
        }
        if let Some(rank) = self.st.node_names.iter().position(|n| n == node) {
            self.obs.members.remove(&(rank as u32));
        }
    }

    fn recoveries(&self) -> Vec<&CompletedRecovery> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::RecordRecovery(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn publishes(&self) -> usize {
        self.log.iter().filter(|a| matches!(a, Action::PublishPlacement { .. })).count()
    }

    /// A chip of `node` hosting at least one replica in the current placement.
    fn busy_chip(&self, node: u32) -> u32 {
        let p = self.placement.as_ref().expect("placement");
        (0..4).find(|&c| !p.hosted(&self.cfg.shape, ChipId::new(node, c)).is_empty()).expect("a busy chip")
    }

    /// Ticks until nothing changes, at most `n` times.
    fn settle(&mut self, n: usize) {
        for _ in 0..n {
            let before = self.st.clone();
            let actions = self.tick();
            if actions.is_empty() && before == self.st {
                return;
            }
        }
    }
}

use crate::placement::ChipId;

#[test]
fn a_job_started_over_committed_checkpoints_resumes_from_the_newest() {
    let mut sim = Sim::new(redundant(), 0);
    sim.obs.checkpoints = BTreeSet::from([4, 8]);
    let actions = sim.tick();
    let Action::PublishPlacement { control, .. } = &actions[0] else { panic!("{actions:?}") };
    assert_eq!(control.restore_step, Some(8));
    assert!(
        actions
            .iter()
            .all(|a| !matches!(a, Action::StartMember { restore_step, .. } if *restore_step != Some(8)))
    );
    let fresh = Sim::new(redundant(), 0).tick();
    let Action::PublishPlacement { control, .. } = &fresh[0] else { panic!("{fresh:?}") };
    assert_eq!(control.restore_step, None, "a new job starts from the seeded state");
}

#[test]
fn start_publishes_generation_one_and_waits_for_every_member() {
    let mut sim = Sim::new(redundant(), 1);
    sim.joins = false;
    let actions = sim.tick();
    assert!(matches!(&actions[0], Action::PublishPlacement { placement, .. } if placement.generation == 1));
    let starts = actions.iter().filter(|a| matches!(a, Action::StartMember { .. })).count();
    assert_eq!(starts, 4);
    assert_eq!(sim.st.phase, BrainPhase::Starting);
    sim.obs.members = BTreeSet::from([0, 1, 2]);
    assert!(sim.tick().is_empty());
    assert_eq!(sim.st.phase, BrainPhase::Starting, "one member missing");
    sim.obs.members.insert(3);
    sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Running);
    let steady = sim.st.clone();
    assert!(sim.tick().is_empty());
    assert_eq!(sim.st, steady, "a steady job changes nothing");
}

#[test]
fn chip_fault_with_live_replicas_reroutes_without_losing_steps() {
    let mut sim = Sim::running(redundant(), 1);
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    let actions = sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Recovering);
    let Some(Action::PublishPlacement { placement, control }) = actions.first() else {
        panic!("expected a publish, got {actions:?}")
    };
    assert_eq!(placement.generation, 2);
    assert_eq!(control.restore_step, None, "a reroute never rolls back");
    assert!(control.load_experts.values().flatten().all(|l| matches!(l.source, LoadSource::Peer { .. })));
    assert!(placement.hosted(&sim.cfg.shape, ChipId::new(1, chip)).is_empty());
    sim.later(0.4);
    sim.tick();
    let recs = sim.recoveries();
    assert_eq!(recs.len(), 1);
    let r = recs[0];
    assert_eq!((r.tier, r.kind, r.steps_lost, r.escalations), (Rung::Reroute, TriggerKind::Chip, 0, 0));
    assert!((r.detect_s.unwrap_or(-1.0) - 0.2).abs() < 1e-9, "fault time from the chip record");
    assert!((r.resume_s - 0.4).abs() < 1e-9);
    assert_eq!(sim.st.phase, BrainPhase::Running);
    assert!(sim.tick().is_empty(), "the excluded chip does not trigger again");
}

#[test]
fn chip_fault_without_replicas_reshards_from_the_last_checkpoint() {
    let mut sim = Sim::running(single(), 0);
    let chip = sim.busy_chip(2);
    sim.chip("n2", chip, ChipState::Failed, "link-down");
    let actions = sim.tick();
    let Some(Action::PublishPlacement { control, .. }) = actions.first() else { panic!("{actions:?}") };
    assert_eq!(control.restore_step, Some(50));
    assert!(control.loads() > 0);
    assert!(control.load_experts.values().flatten().all(|l| l.source == LoadSource::Checkpoint { step: 50 }));
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.steps_lost, r.rollback_to), (Rung::Reshard, 10, Some(50)));
    assert_eq!(r.plan_tier, "reshard");
}

#[test]
fn expert_parallel_workers_acknowledge_generations_themselves() {
    // Kubernetes with expert-parallel members: no agent executes the generation, each member
    // restores its state and writes `acks/<gen>/<rank>`; the brain needs nothing else.
    let mut sim = Sim::running(single(), 0);
    sim.acks = false;
    let chip = sim.busy_chip(2);
    sim.chip("n2", chip, ChipState::Failed, "link-down");
    sim.tick();
    let generation = sim.st.generation;
    sim.later(0.5);
    sim.obs.joined.insert(generation, BTreeSet::from([0, 1, 2]));
    assert!(sim.tick().is_empty(), "rank 3 has not joined yet");
    assert_eq!(sim.st.phase, BrainPhase::Recovering);
    sim.obs.joined.entry(generation).or_default().insert(3);
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.generation, r.rollback_to), (Rung::Reshard, generation, Some(50)));
    assert_eq!(sim.st.phase, BrainPhase::Running);
}

#[test]
fn expert_parallel_workers_roll_back_whenever_state_would_be_copied() {
    // With agents, a replicated expert is copied from a live peer; worker processes cannot, so
    // the same node loss rolls back to the checkpoint, and a reroute still moves nothing.
    let mut sim = Sim::running(redundant().for_expert_parallel(), 1);
    sim.kill_node("n3");
    sim.later(4.0);
    let actions = sim.tick();
    let control = actions.iter().find_map(|a| match a {
        Action::PublishPlacement { control, .. } => Some(control),
        _ => None,
    });
    assert_eq!(control.and_then(|c| c.restore_step), Some(50), "{actions:?}");
    let mut sim = Sim::running(redundant().for_expert_parallel(), 1);
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    let actions = sim.tick();
    let Some(Action::PublishPlacement { control, .. }) = actions.first() else { panic!("{actions:?}") };
    assert_eq!((control.restore_step, control.loads()), (None, 0), "a reroute keeps memory");
}

#[test]
fn failure_during_a_checkpoint_write_rolls_back_to_the_last_committed_one() {
    let mut sim = Sim::running(single(), 0);
    // Step 74 done; checkpoint 75 is being written (no record yet: not committed).
    sim.obs.step = Some(74);
    let chip = sim.busy_chip(0);
    sim.chip("n0", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.tick();
    // The torn checkpoint never commits; the recovery finishes on 50.
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.rollback_to, r.steps_lost), (Some(50), 24));
}

#[test]
fn failure_during_a_recovery_is_folded_into_it() {
    let mut sim = Sim::running(redundant(), 1);
    sim.acks = false;
    let a = sim.busy_chip(1);
    sim.chip("n1", a, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.tick();
    assert_eq!(sim.st.generation, 2);
    sim.later(1.0);
    let b = sim.busy_chip(3);
    sim.chip("n3", b, ChipState::Failed, "link-down");
    let actions = sim.tick();
    assert!(matches!(&actions[0], Action::PublishPlacement { placement, .. } if placement.generation == 3));
    let active = sim.st.active.clone().expect("still recovering");
    assert_eq!(active.triggers.len(), 2);
    assert_eq!(active.attempts.len(), 2);
    assert!(active.attempts[0].abandoned.as_deref().is_some_and(|w| w.contains("new fault")));
    // Acks of the abandoned generation do not complete the recovery.
    sim.ack_all(2, AckOutcome::Applied);
    assert!(sim.tick().is_empty());
    sim.ack_all(3, AckOutcome::Applied);
    sim.later(0.5);
    sim.tick();
    let recs = sim.recoveries();
    assert_eq!(recs.len(), 1, "one recovery for both faults");
    assert_eq!(recs[0].triggers.len(), 2);
    assert_eq!(recs[0].generation, 3);
    assert!((recs[0].resume_s - 1.5).abs() < 1e-9, "timed from the first detection");
    let p = sim.placement.as_ref().expect("placement");
    assert!(p.hosted(&sim.cfg.shape, ChipId::new(1, a)).is_empty());
    assert!(p.hosted(&sim.cfg.shape, ChipId::new(3, b)).is_empty());
    assert_eq!(sim.st.recoveries, 1);
}

#[test]
fn a_flapping_chip_causes_one_recovery_and_rejoins_only_after_the_hold_down() {
    let mut sim = Sim::running(redundant(), 1);
    let chip = sim.busy_chip(2);
    for round in 0..3 {
        sim.chip("n2", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
        sim.settle(4);
        sim.later(2.0);
        let state = if round == 2 { ChipState::Quarantined } else { ChipState::Healthy };
        let code = if round == 2 { "flapping:hbm-ecc-uncorrectable" } else { "ok" };
        sim.chip("n2", chip, state, code);
        sim.settle(4);
        sim.later(2.0);
    }
    assert_eq!(sim.recoveries().len(), 1, "one recovery, not one per flap");
    let ex = &sim.st.excluded[&ChipId::new(2, chip)];
    assert_eq!(ex.relapses, 2);
    // Healthy again (quarantine cleared): still out until it has been healthy for 60 s.
    sim.chip("n2", chip, ChipState::Healthy, "ok");
    sim.settle(4);
    sim.later(59.0);
    sim.settle(4);
    assert!(sim.st.excluded.contains_key(&ChipId::new(2, chip)));
    sim.later(1.5);
    sim.settle(4);
    assert!(!sim.st.excluded.contains_key(&ChipId::new(2, chip)), "rejoined after the hold-down");
    // A later fault of the same chip is a new recovery.
    sim.chip("n2", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.settle(4);
    assert_eq!(sim.recoveries().len(), 2);
}

#[test]
fn whole_node_loss_brings_in_the_spare() {
    let mut sim = Sim::running(redundant(), 1);
    sim.kill_node("n2");
    let actions = sim.tick();
    assert!(actions.contains(&Action::BringInSpare { spare: "s0".into(), replaces: "n2".into(), index: 2 }));
    assert!(actions.iter().any(|a| matches!(a, Action::StartMember { rank: 2, node, .. } if node == "s0")));
    let Some(Action::PublishPlacement { placement, control }) =
        actions.iter().find(|a| matches!(a, Action::PublishPlacement { .. }))
    else {
        panic!("{actions:?}")
    };
    // Every replica of the lost node is reloaded onto the spare, from live peers.
    assert!(control.load_experts.contains_key("s0"));
    assert_eq!(control.restore_step, None);
    assert!(
        !control
            .load_experts
            .values()
            .flatten()
            .any(|l| matches!(&l.source, LoadSource::Peer { node, .. } if node == "n2"))
    );
    assert!(placement.has_pending());
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.kind, r.steps_lost), (Rung::Replace, TriggerKind::Node, 0));
    assert_eq!(r.detect_s, None, "a lease expiry carries no fault time");
    assert_eq!(sim.st.node_names[2], "s0");
    assert!(sim.st.spares.is_empty());
    assert!(sim.st.excluded.is_empty(), "the new node's chips are in use");
}

#[test]
fn spares_exhausted_shrinks_the_job() {
    let mut sim = Sim::running(redundant(), 1);
    sim.kill_node("n1");
    sim.settle(3);
    sim.kill_node("n3");
    let actions = sim.tick();
    assert!(actions.contains(&Action::DropNode { index: 3, node: "n3".into() }));
    sim.settle(3);
    let recs = sim.recoveries();
    assert_eq!(recs.iter().map(|r| r.tier).collect::<Vec<_>>(), [Rung::Replace, Rung::Shrink]);
    assert_eq!(sim.st.dropped, BTreeSet::from([3]));
    assert_eq!(sim.st.phase, BrainPhase::Running);
    assert!(sim.tick().is_empty(), "a dropped node is not a fault any more");
}

#[test]
fn rack_loss_replaces_what_it_can_and_drops_the_rest() {
    // 8 nodes in racks of 2; every expert has two replicas on different racks.
    let mut sim = Sim::running(config(shape(8, 0.5, Some(2), 8)), 1);
    sim.kill_node("n2");
    sim.kill_node("n3");
    let actions = sim.tick();
    assert!(actions.contains(&Action::BringInSpare { spare: "s0".into(), replaces: "n2".into(), index: 2 }));
    assert!(actions.contains(&Action::DropNode { index: 3, node: "n3".into() }));
    let Some(Action::PublishPlacement { control, .. }) =
        actions.iter().find(|a| matches!(a, Action::PublishPlacement { .. }))
    else {
        panic!("{actions:?}")
    };
    assert_eq!(control.restore_step, None, "rack-disjoint replicas survive a rack");
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.steps_lost, r.triggers.len()), (Rung::Replace, 0, 2));
}

#[test]
fn crossing_min_healthy_fraction_fails_the_job_with_the_reason() {
    let mut sim = Sim::running(config(shape(8, 0.75, None, 4)), 0);
    sim.kill_node("n0");
    sim.settle(3);
    assert_eq!(sim.recoveries()[0].tier, Rung::Shrink, "12 of 16 chips is still 0.75");
    sim.kill_node("n1");
    let actions = sim.tick();
    let Some(Action::FailJob(failure)) = actions.last() else { panic!("{actions:?}") };
    let JobFailure::NoRecoveryApplies { refusals } = failure else { panic!("{failure:?}") };
    let below = |r: &RungRefusal| matches!(&r.refusal, Refusal::Infeasible { reason } if reason.contains("minHealthyFraction"));
    assert!(refusals.iter().any(below), "{failure}");
    assert_eq!(sim.st.phase, BrainPhase::Failed);
    assert!(sim.tick().is_empty(), "terminal");
}

#[test]
fn a_lost_worker_is_restarted_from_the_last_checkpoint() {
    let mut sim = Sim::running(redundant(), 1);
    sim.obs.members.remove(&1);
    let actions = sim.tick();
    assert!(actions.contains(&Action::StartMember { rank: 1, node: "n1".into(), restore_step: Some(50) }));
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.kind, r.steps_lost), (Rung::Restore, TriggerKind::Worker, 10));
}

#[test]
fn operator_restart_mid_recovery_continues_the_same_attempt() {
    let mut sim = Sim::running(single(), 0);
    sim.acks = false;
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.tick();
    let published = sim.publishes();
    // The operator dies; a new one reads the record (and everything else) back from etcd.
    let stored = sim.st.to_json();
    let restored = RecoveryState::parse("/ninelives/jobs/default/tiny/recovery", stored.as_bytes())
        .expect("record parses");
    assert_eq!(restored, sim.st);
    sim.st = restored;
    sim.later(2.0);
    assert!(sim.tick().is_empty(), "no second publish, no new recovery");
    assert_eq!(sim.publishes(), published);
    sim.ack_all(sim.st.generation, AckOutcome::Applied);
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.id, r.tier, r.rollback_to), (1, Rung::Reshard, Some(50)));
    assert!((r.resume_s - 2.0).abs() < 1e-9, "timed across the restart");
}

#[test]
fn a_recovery_that_times_out_climbs_the_ladder_then_fails() {
    let mut sim = Sim::running(redundant(), 1);
    sim.acks = false;
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.tick();
    let mut rungs: Vec<Rung> = sim.st.active.iter().map(|a| a.rung).collect();
    for _ in 0..6 {
        sim.later(31.0);
        sim.tick();
        rungs.extend(sim.st.active.iter().map(|a| a.rung));
    }
    assert_eq!(rungs, [Rung::Reroute, Rung::Reshard, Rung::Restore, Rung::Replace, Rung::Shrink]);
    assert_eq!(sim.st.phase, BrainPhase::Failed);
    assert!(matches!(sim.st.failure, Some(JobFailure::LadderExhausted { .. })), "{:?}", sim.st.failure);
    assert_eq!(sim.publishes(), 6, "generation 1 and one per rung");
    assert!(sim.log.contains(&Action::BringInSpare { spare: "s0".into(), replaces: "n1".into(), index: 1 }));
    assert!(sim.log.contains(&Action::DropNode { index: 1, node: "s0".into() }));
    // The restore rung rolled back; the later rungs keep that rollback.
    let restores: Vec<Option<u64>> = sim
        .log
        .iter()
        .filter_map(|a| match a {
            Action::PublishPlacement { control, .. } => Some(control.restore_step),
            _ => None,
        })
        .collect();
    assert_eq!(restores, [None, None, None, Some(50), Some(50), Some(50)]);
}

#[test]
fn an_agent_refusing_a_generation_escalates_at_once() {
    let mut sim = Sim::running(redundant(), 1);
    sim.acks = false;
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    sim.tick();
    sim.ack_all(2, AckOutcome::Failed);
    sim.tick();
    let active = sim.st.active.clone().expect("recovering");
    assert_eq!((active.rung, active.generation), (Rung::Reshard, 3));
}

#[test]
fn max_recoveries_fails_the_next_fault() {
    let mut cfg = redundant();
    cfg.max_recoveries = 1;
    let mut sim = Sim::running(cfg, 1);
    sim.chip("n1", sim.busy_chip(1), ChipState::Failed, "link-down");
    sim.settle(3);
    sim.chip("n2", sim.busy_chip(2), ChipState::Failed, "link-down");
    sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Failed);
    assert!(
        matches!(sim.st.failure, Some(JobFailure::MaxRecoveriesExceeded { max: 1, .. })),
        "{:?}",
        sim.st.failure
    );
}

#[test]
fn reaching_the_last_step_succeeds() {
    let mut sim = Sim::running(redundant(), 1);
    sim.obs.step = Some(300);
    sim.obs.members.clear();
    assert_eq!(sim.tick(), vec![Action::JobSucceeded]);
    assert_eq!(sim.st.phase, BrainPhase::Succeeded);
}

#[test]
fn hang_and_flap_codes_name_their_trigger() {
    let mut sim = Sim::running(redundant(), 1);
    sim.chip("n0", sim.busy_chip(0), ChipState::Failed, "heartbeat-stalled");
    sim.settle(3);
    sim.chip("n3", sim.busy_chip(3), ChipState::Quarantined, "flapping:link-down");
    sim.settle(3);
    let kinds: Vec<TriggerKind> = sim.recoveries().iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [TriggerKind::Hang, TriggerKind::Flap]);
}

#[test]
fn a_corrupt_placement_or_node_table_is_an_error_not_a_panic() {
    let mut sim = Sim::running(redundant(), 1);
    let mut bad = sim.placement.clone().expect("placement");
    bad.groups.clear();
    sim.chip("n1", 0, ChipState::Failed, "link-down");
    assert!(decide(&sim.cfg, &sim.st, &sim.obs, Some(&bad)).is_err());
    sim.st.node_names.pop();
    assert!(matches!(
        decide(&sim.cfg, &sim.st, &sim.obs, sim.placement.as_ref()),
        Err(BrainError::NodeTable { expected: 4, found: 3 })
    ));
}

#[test]
fn config_from_the_demo_manifest() {
    let job = crate::manifest::parse_job(include_str!("../../../examples/tiny.yaml")).expect("tiny.yaml");
    let cfg = BrainConfig::from_spec(&job.spec).expect("config");
    assert_eq!((cfg.shape.nodes, cfg.shape.chips_per_node), (4, 8));
    assert!(cfg.allowed.contains(&Rung::Shrink), "replace allows shrink");
    assert_eq!(cfg.recovery_timeout_s, 60.0);
    let mut sim = Sim::running(cfg, 1);
    sim.kill_node("n3");
    sim.settle(3);
    assert_eq!(sim.recoveries()[0].tier, Rung::Replace);
}

/// Expert-parallel workers with one replica per expert and `k` peer copies.
fn peers_on(k: u32) -> BrainConfig {
    BrainConfig { peer_snapshots: k, ..single().for_expert_parallel() }
}

impl Sim {
    /// Every member of the current generation reports complete snapshots of `steps`, its own and
    /// its buddies' copies (one buddy each, the next rank).
    fn snapshots(&mut self, steps: &[u64]) {
        let members: Vec<u32> = self.st.expected_ranks().collect();
        let mut records: BTreeMap<u32, PeerRecord> = members
            .iter()
            .map(|&r| {
                (r, PeerRecord { generation: self.st.generation, own: steps.to_vec(), ..Default::default() })
            })
            .collect();
        for (rank, holders) in crate::peer::buddies(&members, 1, None) {
            for h in holders {
                if let Some(rec) = records.get_mut(&h) {
                    rec.holds.insert(rank, steps.to_vec());
                }
            }
        }
        self.obs.peers = records;
    }

    fn published_control(actions: &[Action]) -> ControlRecord {
        actions
            .iter()
            .find_map(|a| match a {
                Action::PublishPlacement { control, .. } => Some(control.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no publish in {actions:?}"))
    }
}

use std::collections::BTreeMap;

#[test]
fn a_chip_fault_with_buddies_rolls_back_to_the_newest_peer_snapshot() {
    let mut sim = Sim::running(peers_on(1), 0);
    sim.snapshots(&[58, 59]);
    let chip = sim.busy_chip(2);
    sim.chip("n2", chip, ChipState::Failed, "link-down");
    let control = Sim::published_control(&sim.tick());
    assert_eq!((control.restore_step, control.from_peers), (Some(59), true));
    assert_eq!(control.source(), RestoreSource::Peer { step: 59 });
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.steps_lost, r.source), (Rung::Reshard, 1, RestoreSource::Peer { step: 59 }));
    assert_eq!(r.to_status(String::new()).source.as_deref(), Some("peer"));
}

#[test]
fn a_node_loss_with_a_surviving_buddy_restores_the_spare_from_peers() {
    let mut sim = Sim::running(peers_on(1), 1);
    sim.snapshots(&[59, 60]);
    sim.kill_node("n2");
    let actions = sim.tick();
    assert!(actions.contains(&Action::StartMember { rank: 2, node: "s0".into(), restore_step: Some(60) }));
    let control = Sim::published_control(&actions);
    assert_eq!(control.source(), RestoreSource::Peer { step: 60 });
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.tier, r.steps_lost, r.source), (Rung::Replace, 0, RestoreSource::Peer { step: 60 }));
}

#[test]
fn a_member_lost_with_its_buddy_falls_back_to_the_disk_checkpoint() {
    // Rank 3 holds rank 2's only copy: losing both nodes leaves rank 2's state nowhere in memory.
    let mut sim = Sim::running(peers_on(1), 2);
    sim.snapshots(&[59, 60]);
    sim.kill_node("n2");
    sim.kill_node("n3");
    let control = Sim::published_control(&sim.tick());
    assert_eq!((control.restore_step, control.from_peers), (Some(50), false));
    sim.tick();
    let r = sim.recoveries()[0];
    assert_eq!((r.steps_lost, r.source), (10, RestoreSource::Checkpoint { step: 50 }));
    // Two faults in different failure domains (a chip on n1, the whole of n3) are covered.
    let mut sim = Sim::running(peers_on(1), 1);
    sim.snapshots(&[59, 60]);
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "link-down");
    sim.kill_node("n3");
    let control = Sim::published_control(&sim.tick());
    assert_eq!(control.source(), RestoreSource::Peer { step: 60 });
}

#[test]
fn without_peer_records_or_copies_the_rollback_is_the_disk_checkpoint_as_before() {
    for (k, records) in [(1, false), (0, true)] {
        let mut sim = Sim::running(peers_on(k), 1);
        if records {
            sim.snapshots(&[59, 60]);
        }
        sim.kill_node("n2");
        let control = Sim::published_control(&sim.tick());
        assert_eq!(control.source(), RestoreSource::Checkpoint { step: 50 }, "k={k}");
        sim.tick();
        assert_eq!(sim.recoveries()[0].source, RestoreSource::Checkpoint { step: 50 });
    }
    // A snapshot older than the newest checkpoint is not worth it.
    let mut sim = Sim::running(peers_on(1), 1);
    sim.snapshots(&[40]);
    sim.kill_node("n2");
    assert_eq!(Sim::published_control(&sim.tick()).source(), RestoreSource::Checkpoint { step: 50 });
}

#[test]
fn a_lost_worker_restarts_from_peers_and_a_stale_record_of_a_restarted_member_does_not_count() {
    let mut sim = Sim::running(peers_on(1), 0);
    sim.snapshots(&[59, 60]);
    sim.obs.members.remove(&1);
    let actions = sim.tick();
    assert!(actions.contains(&Action::StartMember { rank: 1, node: "n1".into(), restore_step: Some(60) }));
    sim.tick();
    assert_eq!(sim.recoveries()[0].source, RestoreSource::Peer { step: 60 });
    // Records written before that recovery's generation describe memory that may be gone.
    sim.obs.step = Some(70);
    sim.obs.members.remove(&2);
    let control = Sim::published_control(&sim.tick());
    assert_eq!(control.source(), RestoreSource::Checkpoint { step: 50 });
}

#[test]
fn a_retried_recovery_keeps_its_peer_snapshot_unless_a_new_fault_loses_its_last_copy() {
    let mut sim = Sim::running(peers_on(1), 2);
    sim.snapshots(&[59, 60]);
    sim.acks = false;
    sim.joins = false;
    sim.obs.members.remove(&1);
    let first = Sim::published_control(&sim.tick());
    assert_eq!(first.source(), RestoreSource::Peer { step: 60 });
    // Newer snapshots appear while the attempt times out: the retry keeps step 60.
    for rec in sim.obs.peers.values_mut() {
        rec.own = vec![60, 61];
        for steps in rec.holds.values_mut() {
            *steps = vec![60, 61];
        }
    }
    sim.later(31.0);
    let retry = Sim::published_control(&sim.tick());
    assert!(retry.generation > first.generation);
    assert_eq!(retry.source(), RestoreSource::Peer { step: 60 });
    // Rank 2 holds rank 1's only copy; losing its node too leaves only the disk.
    sim.kill_node("n2");
    let fallback = Sim::published_control(&sim.tick());
    assert_eq!(fallback.source(), RestoreSource::Checkpoint { step: 50 });
}

/// A member that never joins the first generation: waited for until the start deadline (and
/// no longer: the job cannot hang in Starting), then recovered like a lost worker.
#[test]
fn a_member_missing_at_the_start_deadline_is_recovered_like_a_lost_worker() {
    let mut sim = Sim::new(single(), 0);
    sim.joins = false;
    let first = sim.tick();
    assert!(matches!(first[0], Action::PublishPlacement { .. }), "{first:?}");
    assert_eq!(sim.st.starting_since, Some(1000.0));
    // Every member but rank 2 registers; before the deadline the brain only waits.
    sim.obs.members = BTreeSet::from([0, 1, 3]);
    sim.later(119.0);
    assert!(sim.tick().is_empty());
    assert_eq!((sim.st.phase, sim.st.recoveries), (BrainPhase::Starting, 0));
    // Time frozen by a control-plane outage does not count against the start.
    let mut frozen = sim.st.clone();
    frozen.postpone(30.0);
    assert_eq!(frozen.starting_since, Some(1030.0));
    sim.later(1.0);
    let actions = sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Recovering, "{actions:?}");
    let active = sim.st.active.clone().expect("a recovery");
    assert_eq!(active.triggers.len(), 1);
    assert_eq!((active.triggers[0].kind, active.triggers[0].node), (TriggerKind::Worker, 2));
    assert_eq!(active.triggers[0].code, START_TIMEOUT_CODE);
    // The lost worker's rung: it is restarted, and once it joins training starts.
    assert!(actions.iter().any(|a| matches!(a, Action::StartMember { rank: 2, .. })), "{actions:?}");
    sim.obs.members.insert(2);
    sim.settle(5);
    assert_eq!(sim.st.phase, BrainPhase::Running);
    assert_eq!(sim.recoveries().len(), 1);
    assert_eq!(sim.recoveries()[0].trigger, "worker n2 start-timeout");
}

/// A node lost before the first step is recovered at once (not after the start deadline), and
/// members still starting are waited for by that recovery, not taken for lost.
#[test]
fn a_node_lost_before_the_first_step_is_recovered_at_once() {
    let mut sim = Sim::new(single(), 1);
    sim.joins = false;
    sim.tick();
    sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Starting);
    sim.obs.members = BTreeSet::from([0]);
    sim.later(2.0);
    sim.kill_node("n3");
    let actions = sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Recovering, "{actions:?}");
    let active = sim.st.active.clone().expect("a recovery");
    assert_eq!(active.triggers.iter().map(|t| t.kind).collect::<Vec<_>>(), [TriggerKind::Node]);
    assert!(
        actions.iter().any(|a| matches!(a, Action::BringInSpare { spare, .. } if spare == "s0")),
        "{actions:?}"
    );
    assert!(active.restarted.contains(&1) && active.restarted.contains(&2), "{active:?}");
    // The slow members and the spare's member join: training starts, with one recovery.
    sim.obs.members.extend([1, 2, 3]);
    sim.settle(5);
    assert_eq!((sim.st.phase, sim.st.recoveries), (BrainPhase::Running, 1));
}

/// With no recovery left, a member missing at the start deadline fails the job with a typed
/// reason instead of leaving it Starting.
#[test]
fn a_start_deadline_with_no_recovery_left_fails_the_job() {
    let mut sim = Sim::new(BrainConfig { max_recoveries: 0, ..single() }, 0);
    sim.joins = false;
    sim.tick();
    sim.obs.members = BTreeSet::from([0, 1, 2]);
    sim.later(200.0);
    sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Failed);
    let failure = sim.st.failure.clone().expect("a failure");
    assert_eq!(failure, JobFailure::StartTimedOut { missing: vec!["n3".into()] });
    assert_eq!(failure.condition_reason(), "StartTimeout");
    assert!(sim.log.iter().any(|a| matches!(a, Action::FailJob(JobFailure::StartTimedOut { .. }))));
}

/// A chip fault on a node whose clock is `skew_s` off (its agent stamps the fault on its own
/// clock): the recovery it causes, one decision after the previous one.
fn recovery_with_stamp_skewed(skew_s: f64) -> CompletedRecovery {
    let mut sim = Sim::running(redundant(), 1);
    sim.later(0.5);
    sim.tick();
    sim.later(0.5);
    let chip = sim.busy_chip(1);
    sim.chip("n1", chip, ChipState::Failed, "hbm-ecc-uncorrectable");
    if let Some(record) = sim.obs.nodes.get_mut("n1").and_then(|v| v.chips.get_mut(&chip)) {
        record.since += skew_s;
    }
    sim.tick();
    assert_eq!(sim.st.phase, BrainPhase::Recovering);
    sim.later(0.4);
    sim.tick();
    let recs = sim.recoveries();
    assert_eq!(recs.len(), 1);
    recs[0].clone()
}

/// The brain's detection time does not take a skewed reporter's clock: a fault stamp an hour
/// behind (or ahead) of the brain's clock is refused with a typed reason and the detection time
/// is unknown, not 3,600 s (or 0 s); a stamp within the plausible report lag is taken as it is.
#[test]
fn a_fault_stamp_from_a_skewed_clock_is_refused_not_taken_as_the_detection_time() {
    let behind = recovery_with_stamp_skewed(-3600.0);
    assert_eq!(behind.detect_s, None, "an hour-behind stamp made detection read {:?} s", behind.detect_s);
    assert_eq!(behind.fault_at, None);
    let t = &behind.triggers[0];
    assert_eq!(t.at, None);
    let Some(StampRejected::TooOld { stamp, earliest }) = t.stamp_rejected else {
        panic!("expected a too-old stamp, got {:?}", t.stamp_rejected)
    };
    // The window's lower end: the previous decision (0.5 s before the fault was seen) less the
    // report lag.
    assert!((earliest - (behind.detected_at - 0.5 - MAX_REPORT_LAG_SECONDS)).abs() < 1e-9);
    assert!((behind.detected_at - stamp - 3600.2).abs() < 1e-9);

    let ahead = recovery_with_stamp_skewed(3600.0);
    assert_eq!(ahead.detect_s, None, "an hour-ahead stamp made detection read {:?} s", ahead.detect_s);
    assert!(matches!(ahead.triggers[0].stamp_rejected, Some(StampRejected::FromTheFuture { .. })));

    // A report that took 30 s to arrive (an agent retrying its write) is plausible: taken.
    let late = recovery_with_stamp_skewed(-30.0);
    assert_eq!(late.triggers[0].stamp_rejected, None);
    assert!((late.detect_s.unwrap_or(-1.0) - 30.2).abs() < 1e-9, "{:?}", late.detect_s);
    // Clocks a fraction of a second apart: the fault counts as seen at once.
    let close = recovery_with_stamp_skewed(0.5);
    assert_eq!(close.detect_s, Some(0.0));

    // The refusal survives the state's round trip (it is persisted in the recovery record).
    let json = serde_json::to_string(&behind.triggers[0]).expect("serialize");
    assert!(json.contains(r#""stampRejected":{"reason":"tooOld""#), "{json}");
    let back: Trigger = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, behind.triggers[0]);
}
