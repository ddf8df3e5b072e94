//! One member of an expert-parallel job: join generations, train, abort and rejoin.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::engine::{DistStepReport, Routing, gather_checkpoint, run_step};
pub use super::link::DEFAULT_RECONNECT_ATTEMPTS;
use super::link::{LinkConfig, MAX_CONNECTIONS, Security};
use super::peer::{PeerStore, Snapshot};
use super::rendezvous::{Backoff, Etcd, Session};
use super::state::{POLL, Shared};
use super::transport::{Collective, TcpCollective, serve};
use super::wire::{HostState, frame_limit};
use crate::checkpoint::{BackgroundSaver, CheckpointStore, ExpertSelection, SaveOutcome, SaveReport};
use crate::data::Corpus;
use crate::error::{Result, WorkerError};
use crate::model::{ExpertId, ParamOwner};
use crate::trainer::{Trainer, TrainerConfig};
use ninelives_core::generation::{DistPlan, GenerationTier, Restore, agreed_step};
use ninelives_core::recovery::{LoadRecord, PeerRecord};
use std::collections::BTreeSet;
use std::sync::MutexGuard;
use std::sync::atomic::AtomicU64;

/// How a member runs.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// This worker's rank.
    pub rank: u32,
    /// Address to listen on for peers (port 0: any).
    pub listen: SocketAddr,
    /// Host (IP or name) peers reach this member at, registered with the listener's port;
    /// `None`: the listener's local address. Needed when listening on `0.0.0.0` (a pod).
    pub advertise: Option<String>,
    /// Membership lease TTL, seconds (the job's heartbeat TTL).
    pub ttl_seconds: i64,
    /// Longest any wait inside a step may take before the step is abandoned.
    pub step_timeout: Duration,
    /// Longest to wait for a plan or for the other members' acknowledgements.
    pub join_timeout: Duration,
    /// Commit a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// How peers prove they belong to the job ([`Security::Authenticated`] with the job's key).
    pub security: Security,
    /// Attempts at re-establishing a broken link to a live member within a generation, within
    /// the step timeout, before the step is abandoned ([`DEFAULT_RECONNECT_ATTEMPTS`]).
    pub reconnect_attempts: u32,
}

/// What a member reports as it goes.
#[derive(Debug)]
pub enum MemberEvent<'a> {
    /// A generation was joined.
    Joined {
        /// Generation.
        generation: u64,
        /// Tier that produced it.
        tier: GenerationTier,
        /// The step training continues from.
        step: u64,
        /// Members.
        members: &'a [u32],
        /// Experts this member holds.
        experts: usize,
    },
    /// A step completed.
    Step(&'a DistStepReport),
    /// Bytes this member put on the wire during the step.
    Traffic {
        /// Expert requests and replies (framing included).
        expert_bytes: u64,
        /// Collective rounds.
        collective_bytes: u64,
        /// Activation payload of the remote expert calls it made (the all-to-all minimum).
        expert_payload_bytes: u64,
    },
    /// A step was abandoned.
    Aborted {
        /// Generation.
        generation: u64,
        /// Why.
        reason: &'a str,
    },
    /// A peer snapshot was taken (its copies go to the buddies in the background).
    PeerSnapshot {
        /// Step of the snapshot.
        step: u64,
        /// Host memory of this member's own snapshots kept, bytes.
        own_bytes: u64,
        /// Host memory of the copies held for other members, bytes.
        held_bytes: u64,
        /// Bytes of copies this member has put on the wire so far (framing included).
        sent_bytes: u64,
        /// Steps of its own snapshots that are complete (every buddy acknowledged).
        complete: &'a [u64],
    },
    /// Links to live members that broke within the generation since the last report: the ones
    /// re-established (the step went on, nothing was restored) and the ones that could not be
    /// within the reconnect budget (the step was abandoned).
    Reconnects {
        /// Generation.
        generation: u64,
        /// Links re-established.
        restored: u64,
        /// Reconnect budgets exhausted.
        failed: u64,
    },
    /// The leader committed a checkpoint.
    Committed(&'a SaveReport),
    /// A checkpoint save of the leader failed (a full disk, an I/O error). It was cleaned up and
    /// training went on; the next save starts over.
    SaveFailed {
        /// The step that was being saved.
        step: u64,
        /// Why.
        error: &'a WorkerError,
    },
}

/// Longest the end of the job waits for buffered etcd writes (the final progress and checkpoint
/// records) to be delivered.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);
/// Attempts at the final checkpoint, the one the job ends on (space may come back on a full disk).
const FINAL_SAVE_ATTEMPTS: u32 = 5;
/// Pause between attempts at the final checkpoint.
const FINAL_SAVE_PAUSE: Duration = Duration::from_secs(1);

/// A wait that an etcd outage does not use up: the deadline runs only while etcd answers, and
/// starts over in full once it answers again after failing. A member waits out an outage of any
/// length rather than giving up on a generation the control loop may still be publishing.
struct Patience {
    limit: Duration,
    deadline: Instant,
    backoff: Backoff,
    failing: bool,
}

impl Patience {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            deadline: Instant::now() + limit,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            failing: false,
        }
    }

    /// Whether the wait is over (never while etcd fails).
    fn expired(&self) -> bool {
        !self.failing && Instant::now() >= self.deadline
    }

    /// Passes an etcd read's answer through: `Some` when etcd answered; `None` after a transient
    /// failure (logged once per outage, then a pause with backoff); an error for a permanent one.
    fn read<T>(&mut self, what: &str, result: Result<T>) -> Result<Option<T>> {
        match result {
            Ok(value) => {
                if self.failing {
                    self.failing = false;
                    self.deadline = Instant::now() + self.limit;
                    tracing::info!("etcd answers again ({what})");
                }
                self.backoff.reset();
                Ok(Some(value))
            }
            Err(e) if e.is_transient_etcd() => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!("{what}: {e}; waiting for etcd");
                }
                std::thread::sleep(self.backoff.next_delay());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs one member until the job's last step; returns the final `params_sha256` on the leader.
pub fn run_member(
    config: TrainerConfig,
    corpus: Arc<Corpus>,
    store: CheckpointStore,
    etcd: Arc<Etcd>,
    options: &MemberOptions,
    mut events: impl FnMut(MemberEvent<'_>),
) -> Result<Option<String>> {
    let rank = options.rank;
    let frame_limit = frame_limit(&config).ok_or_else(|| {
        WorkerError::InvalidJob("the model's largest message exceeds the transport's frame limit".into())
    })?;
    let link = LinkConfig {
        security: options.security.clone(),
        frame_limit,
        max_connections: MAX_CONNECTIONS,
        reconnect_attempts: options.reconnect_attempts,
    };
    let shared = Shared::new(rank, options.step_timeout, link);
    let listener = TcpListener::bind(options.listen)
        .map_err(|e| WorkerError::Rendezvous(format!("cannot listen on {}: {e}", options.listen)))?;
    let local = listener.local_addr().map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
    let addr = advertised_addr(local, options.advertise.as_deref())?;
    let _listener = serve(listener, shared.clone())?;
    // Registration, like every etcd write, is retried in the background until etcd answers.
    let session = Session::start(etcd.clone(), rank, options.ttl_seconds, addr)?;
    session.watch_generation(shared.clone());
    tracing::info!(rank, %addr, "registering");

    let result = member_loop(&config, &corpus, &store, &etcd, &session, &shared, options, &mut events);
    shared.stop.store(true, Ordering::SeqCst);
    if result.is_err() {
        // Leave at once so the control loop replans without waiting for the lease to expire. A
        // member that finished keeps its key until the lease runs out: the control loop must not
        // mistake the end of the job for a loss.
        session.leave();
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn member_loop(
    config: &TrainerConfig,
    corpus: &Arc<Corpus>,
    store: &CheckpointStore,
    etcd: &Etcd,
    session: &Session,
    shared: &Arc<Shared>,
    options: &MemberOptions,
    events: &mut impl FnMut(MemberEvent<'_>),
) -> Result<Option<String>> {
    let rank = options.rank;
    let mut joined = 0u64;
    let mut before_update: Option<(u64, HostState)> = None;
    let mut saver = BackgroundSaver::new(store.clone());
    // The checkpoint the previous generation restored from (retention keeps it).
    let mut previous_restore: Option<u64> = None;
    // The previous generation's plan (who held which expert: where a gained expert comes from).
    let mut previous_plan: Option<DistPlan> = None;
    // The peer record last published.
    let mut published: Option<PeerRecord> = None;
    let peer_sent = Arc::new(AtomicU64::new(0));
    // The link counters already reported (restored, failed).
    let mut links_seen = (0u64, 0u64);
    // A peer restore not finished yet (its step, this member's own snapshot of it): a newer
    // generation that keeps memory as it is continues it.
    let mut unfinished_peer: Option<(u64, Option<Arc<Snapshot>>)> = None;
    loop {
        // Wait for a generation newer than the last one joined.
        let mut patience = Patience::new(options.join_timeout);
        let plan = loop {
            if let Some(Some(plan)) = patience.read("reading the plan", etcd.plan())?
                && plan.generation() > joined
            {
                break plan;
            }
            if patience.expired() {
                return Err(WorkerError::Rendezvous(format!(
                    "no generation after {joined} within {:?}",
                    options.join_timeout
                )));
            }
            std::thread::sleep(POLL);
        };
        let generation = plan.generation();
        joined = generation;
        shared.close(generation)?;
        plan.check(config.dims.layers, config.dims.routed_experts)
            .map_err(|e| WorkerError::Rendezvous(format!("generation {generation}: {e}")))?;
        if plan.position(rank).is_none() {
            return Err(WorkerError::Rendezvous(format!(
                "rank {rank} is not a member of generation {generation}"
            )));
        }
        let mine = plan.experts_of(rank).to_vec();
        // Copies this member keeps in this generation: of the members it is a buddy of.
        let keeps_for: BTreeSet<u32> =
            plan.buddies.iter().filter(|(_, b)| b.contains(&rank)).map(|(r, _)| *r).collect();
        peers(shared)?.begin(generation, keeps_for);
        // A peer restore that needs state from other members (fetched once connected).
        let mut pending_peer: Option<(u64, Option<Arc<Snapshot>>)> = None;
        let mut peer_step: Option<u64> = None;
        // A rebalance gave this member experts it does not hold (copied once connected).
        let mut live_gain = false;

        // Obtain the generation's state.
        {
            let mut guard =
                shared.trainer.write().map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))?;
            match plan.restore {
                Restore::Fresh => {
                    *guard = Some(Trainer::with_experts(config.clone(), corpus.clone(), Some(&mine))?);
                    before_update = None;
                }
                Restore::Checkpoint { step: wanted } => {
                    // Every member reads the same directory, so all fall back to the same step.
                    let (step, path) = store.verified_at_or_before(wanted)?.ok_or_else(|| {
                        WorkerError::NoUsableCheckpoint {
                            dir: store.dir().to_path_buf(),
                            tried: store.list().map_or(0, |l| l.len()),
                        }
                    })?;
                    if step != wanted {
                        tracing::warn!(
                            generation,
                            wanted,
                            step,
                            "the checkpoint to restore is corrupt or missing; restoring the newest older one"
                        );
                    }
                    // Neither this restore's checkpoint nor the previous one's may be deleted by
                    // a save while a member may still read it.
                    store.protect([step].into_iter().chain(previous_restore));
                    previous_restore = Some(step);
                    match guard.as_mut().filter(|t| t.model().held_experts() == mine) {
                        // A member that keeps its experts restores into the memory it has:
                        // nothing to allocate, so the restore runs at the disk's speed.
                        Some(trainer) => match trainer.restore_dir(store, &path) {
                            Ok(report) => tracing::info!(
                                step,
                                bytes = report.bytes,
                                "restored checkpoint in place for generation {generation}"
                            ),
                            Err(err) => {
                                *guard = None; // partly overwritten: never train on it
                                return Err(err);
                            }
                        },
                        None => {
                            let loaded =
                                store.load_dir(&path, &config.dims, &ExpertSelection::Only(mine.clone()))?;
                            tracing::info!(
                                step,
                                bytes = loaded.report.bytes,
                                "loaded checkpoint for generation {generation}"
                            );
                            *guard = Some(Trainer::from_checkpoint(config.clone(), corpus.clone(), loaded)?);
                        }
                    }
                    before_update = None;
                }
                Restore::Peer { step } => {
                    let own = peers(shared)?.own_at(step);
                    let wanted: BTreeSet<ExpertId> = mine.iter().copied().collect();
                    match (guard.as_mut(), own) {
                        // A member that keeps its experts restores its own snapshot in place.
                        (Some(trainer), Some(own))
                            if trainer.model().held_experts() == mine && own.experts() == wanted =>
                        {
                            let bytes = own.bytes();
                            if let Err(err) =
                                trainer.restore_host_state(own.params.clone(), own.moments.clone(), step)
                            {
                                *guard = None; // partly overwritten: never train on it
                                return Err(err);
                            }
                            tracing::info!(
                                generation,
                                step,
                                bytes,
                                "restored from peer memory in place (own snapshot); no checkpoint read"
                            );
                        }
                        // A member that trained without keeping this step cannot rejoin at it.
                        (Some(_), None) => {
                            return Err(WorkerError::NoPeerSnapshot {
                                step,
                                missing: format!("rank {rank}'s own snapshot"),
                            });
                        }
                        // Gained experts, or no state at all (a replacement): fetched from the
                        // other members once connected. The old state is never trained on.
                        (_, own) => {
                            *guard = None;
                            pending_peer = Some((step, own));
                        }
                    }
                    peer_step = Some(step);
                    before_update = None;
                }
                // A rebalance: keep memory, hand off what others gain, drop what moved away,
                // and copy what this member gains from its live holders once connected.
                Restore::Live => {
                    let trainer = guard.as_mut().ok_or_else(|| {
                        WorkerError::Rendezvous(
                            "a rebalance generation needs state in memory; this member has none".into(),
                        )
                    })?;
                    let held = trainer.model().held_experts();
                    let gained_elsewhere: BTreeSet<ExpertId> = plan
                        .members
                        .iter()
                        .filter(|&&r| r != rank)
                        .flat_map(|&r| {
                            let before = previous_plan.as_ref().map_or(&[][..], |p| p.experts_of(r));
                            plan.experts_of(r).iter().filter(move |e| !before.contains(e)).copied()
                        })
                        .collect();
                    let give: Vec<ExpertId> =
                        held.iter().filter(|e| gained_elsewhere.contains(e)).copied().collect();
                    if !give.is_empty() {
                        // Both steps the members may agree on: this one, and the one before if
                        // this member is a step ahead and rolls its last update back.
                        let (params, moments) = trainer.host_state()?;
                        let mut parts = vec![
                            Snapshot { step: trainer.step(), params, moments }.select(false, Some(&give)),
                        ];
                        if let Some((step, (params, moments))) = before_update.as_ref() {
                            let earlier =
                                Snapshot { step: *step, params: params.clone(), moments: moments.clone() };
                            parts.push(earlier.select(false, Some(&give)));
                        }
                        peers(shared)?.hand_off(parts);
                    }
                    let kept: Vec<ExpertId> = held.iter().filter(|e| mine.contains(e)).copied().collect();
                    if kept.len() < held.len() {
                        trainer.retain_experts(&kept)?;
                        if let Some((_, (params, moments))) = before_update.as_mut() {
                            params.retain(|name, _| ParamOwner::of(name).kept_with(&kept));
                            moments.retain(|name, _| ParamOwner::of(name).kept_with(&kept));
                        }
                    }
                    let gains = mine.iter().filter(|e| !held.contains(e)).count();
                    tracing::info!(
                        generation,
                        handed_off = give.len(),
                        dropped = held.len() - kept.len(),
                        gains,
                        "rebalance: keeping memory, copying gained experts from live holders"
                    );
                    live_gain = gains > 0;
                }
                // The settled generation that follows a peer restore is published as soon as
                // every member acknowledged it, possibly while this member still fetches its
                // state: it continues the same restore (same step) instead of failing for lack
                // of state, which the brain would see as a second failure.
                Restore::InMemory if guard.is_none() && unfinished_peer.is_some() => {
                    if let Some((step, own)) = unfinished_peer.clone() {
                        tracing::info!(generation, step, "continuing the unfinished peer restore");
                        pending_peer = Some((step, own));
                        peer_step = Some(step);
                    }
                    before_update = None;
                }
                Restore::InMemory => {
                    let trainer = guard.as_mut().ok_or_else(|| {
                        WorkerError::Rendezvous(
                            "a reroute generation needs state in memory; this member has none".into(),
                        )
                    })?;
                    let held = trainer.model().held_experts();
                    match in_memory_change(&held, &mine) {
                        InMemoryChange::Same => {}
                        InMemoryChange::Drop(dropped) => {
                            // Their other replicas serve them now; free the memory.
                            trainer.retain_experts(&mine)?;
                            if let Some((_, (params, moments))) = before_update.as_mut() {
                                params.retain(|name, _| ParamOwner::of(name).kept_with(&mine));
                                moments.retain(|name, _| ParamOwner::of(name).kept_with(&mine));
                            }
                            tracing::info!(
                                generation,
                                dropped = dropped.len(),
                                "dropped experts the generation no longer places here"
                            );
                        }
                        InMemoryChange::Missing(missing) => {
                            return Err(WorkerError::Rendezvous(format!(
                                "generation {generation} keeps state in memory but gives this member \
                                 experts it does not hold: {missing:?}"
                            )));
                        }
                    }
                }
            }
        }
        unfinished_peer = pending_peer.clone();
        let my_step = peer_step.unwrap_or_else(|| {
            shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0)
        });
        // What the restore left in memory (equal to `mine` on every path), as reported.
        let held = shared
            .trainer
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|t| t.model().held_experts().len()))
            .unwrap_or(if pending_peer.is_some() { mine.len() } else { 0 });
        session.ack(generation, my_step);

        // The generation barrier: every member acknowledged.
        let mut patience = Patience::new(options.join_timeout);
        let acks = loop {
            if let Some(acks) = patience.read("reading acknowledgements", etcd.acks(generation))?
                && plan.members.iter().all(|r| acks.contains_key(r))
            {
                break Some(acks);
            }
            if shared.seen_generation.load(Ordering::SeqCst) > generation || patience.expired() {
                break None;
            }
            std::thread::sleep(POLL);
        };
        let Some(acks) = acks else {
            tracing::warn!(generation, "generation superseded before every member joined");
            continue;
        };
        let acked: BTreeMap<u32, u64> =
            plan.members.iter().filter_map(|r| acks.get(r).map(|s| (*r, *s))).collect();
        let target = agreed_step(&acked).unwrap_or(my_step);
        if my_step != target {
            match before_update.take() {
                Some((step, (params, moments))) if step == target && my_step == target + 1 => {
                    let mut guard = shared
                        .trainer
                        .write()
                        .map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))?;
                    if let Some(t) = guard.as_mut() {
                        t.restore_host_state(params, moments, step)?;
                    }
                    tracing::info!(
                        from = my_step,
                        to = target,
                        "rolled back one update to match the other members"
                    );
                }
                _ => {
                    return Err(WorkerError::Rendezvous(format!(
                        "members disagree on the step ({acked:?}) and this member cannot roll back to {target}"
                    )));
                }
            }
        }
        events(MemberEvent::Joined {
            generation,
            tier: plan.tier,
            step: target,
            members: &plan.members,
            experts: held,
        });

        // Every member's address (a member re-registering after an outage is back shortly).
        let mut patience = Patience::new(options.join_timeout);
        let addrs = loop {
            if let Some(members) = patience.read("reading member addresses", etcd.members())? {
                let addrs: BTreeMap<u32, SocketAddr> =
                    members.into_iter().map(|(r, m)| (r, m.addr)).collect();
                if plan.members.iter().all(|r| addrs.contains_key(r)) {
                    break Some(addrs);
                }
            }
            if shared.seen_generation.load(Ordering::SeqCst) > generation || patience.expired() {
                break None;
            }
            std::thread::sleep(POLL);
        };
        let Some(addrs) = addrs else {
            let reason = "a member of the generation has no registered address";
            events(MemberEvent::Aborted { generation, reason });
            continue;
        };
        let coll = match TcpCollective::connect(
            shared.clone(),
            generation,
            &plan.members,
            &addrs,
            options.step_timeout,
        ) {
            Ok(c) => Arc::new(c),
            Err(WorkerError::Aborted(reason)) => {
                events(MemberEvent::Aborted { generation, reason: &reason });
                continue;
            }
            Err(e) => return Err(e),
        };
        if live_gain {
            // Every member stands at `target` now: this member's own state (dense and the
            // experts it kept) plus the gained experts from the previous holders' hand-off.
            let own = {
                let guard =
                    shared.trainer.read().map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))?;
                let trainer = guard
                    .as_ref()
                    .ok_or_else(|| WorkerError::Rendezvous("no trainer to rebalance".into()))?;
                let (params, moments) = trainer.host_state()?;
                Snapshot { step: trainer.step(), params, moments }
            };
            pending_peer = Some((own.step, Some(Arc::new(own))));
            before_update = None;
        }
        if let Some((step, own)) = pending_peer.take() {
            let fetched = restore_from_peers(
                config,
                corpus,
                shared,
                &coll,
                &plan,
                previous_plan.as_ref(),
                &mine,
                step,
                own,
            );
            match fetched {
                Ok(()) => unfinished_peer = None,
                Err(WorkerError::Aborted(reason)) => {
                    events(MemberEvent::Aborted { generation, reason: &reason });
                    coll.shutdown();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        previous_plan = Some(plan.clone());
        let routing = Arc::new(Routing::new(plan));
        let total = config.total_steps;
        let mut window = LoadWindow::starting_at(
            shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0),
        );
        let mut sender: Option<std::thread::JoinHandle<()>> = None;
        let outcome: Result<Option<String>> = (|| {
            loop {
                let step =
                    shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0);
                if step >= total {
                    break;
                }
                let counters = traffic(shared);
                // The previous snapshot's copies are acknowledged before this step completes on
                // any member (its last round needs everyone), so a member lost after the step
                // loses that step only, not the copy still in flight as well. The copies still
                // overlap the step's compute.
                let report = run_step(shared, &coll, &routing, &mut before_update, || {
                    if let Some(previous) = sender.take() {
                        let _ = previous.join();
                    }
                });
                report_links(shared, generation, &mut links_seen, events);
                let report = report?;
                events(MemberEvent::Step(&report));
                window.add(&report.expert_tokens);
                if report.step % config.load_window_steps.max(1) == 0
                    && let Some(record) = window.close(generation, rank, report.step)
                {
                    // Buffered, latest wins: the brain's load table never holds training up.
                    session.record_load(&record);
                }
                if routing.plan.leader() == Some(rank) {
                    // Buffered: the brain tolerates a late record, training never waits for etcd.
                    session.report_progress(generation, report.step, report.loss);
                }
                let after = traffic(shared);
                events(MemberEvent::Traffic {
                    expert_bytes: after.0 - counters.0,
                    collective_bytes: after.1 - counters.1,
                    expert_payload_bytes: after.2 - counters.2,
                });
                let plan = &routing.plan;
                if !plan.buddies.is_empty() && report.step % plan.peer_interval_steps.max(1) == 0 {
                    // One send in flight: the previous copies go out before the next are taken.
                    if let Some(previous) = sender.take() {
                        let _ = previous.join();
                    }
                    let buddies = plan.buddies.get(&rank).cloned().unwrap_or_default();
                    sender = snapshot(shared, &coll, report.step, buddies, &peer_sent)?;
                    let store = peers(shared)?;
                    let (own_bytes, held_bytes) = store.bytes();
                    let complete = store.complete();
                    drop(store);
                    events(MemberEvent::PeerSnapshot {
                        step: report.step,
                        own_bytes,
                        held_bytes,
                        sent_bytes: peer_sent.load(Ordering::Relaxed),
                        complete: &complete,
                    });
                }
                publish_peers(session, shared, &mut published)?;
                // The last step's checkpoint is written below, in the foreground.
                if report.step % options.checkpoint_every.max(1) == 0 && report.step < total {
                    if let Some(gathered) = gather_checkpoint(shared, &coll, &routing)? {
                        let previous = saver.submit(gathered.snapshot)?;
                        settle(session, store, generation, previous, events);
                    }
                } else {
                    settle(session, store, generation, saver.poll(), events);
                }
            }
            // The end: every member has the final state; the leader writes and reports it.
            let step = shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0);
            let last = gather_checkpoint(shared, &coll, &routing)?;
            settle(session, store, generation, saver.wait(), events);
            if let Some(gathered) = last {
                save_final(store, session, generation, &gathered.snapshot, events)?;
            }
            let mut digest = None;
            if routing.plan.leader() == Some(rank) {
                let newest = store.list()?.into_iter().find(|(_, _, committed)| *committed);
                if let Some((s, path, _)) = newest
                    && s == step
                {
                    digest = Some(store.verify_dir(&path)?.params_sha256);
                }
            }
            // Everyone waits for the leader's commit before leaving (a final barrier).
            coll.exchange(step, 5, BTreeMap::new())?;
            if let Some(last) = sender.take() {
                let _ = last.join();
            }
            publish_peers(session, shared, &mut published)?;
            if !session.flush(FLUSH_LIMIT) {
                tracing::warn!(
                    "etcd did not take the last progress and checkpoint records within {FLUSH_LIMIT:?}"
                );
            }
            Ok(digest)
        })();
        match outcome {
            Ok(digest) => {
                // Links re-established during the final gather and barrier.
                report_links(shared, generation, &mut links_seen, events);
                return Ok(digest);
            }
            Err(WorkerError::Aborted(reason)) => {
                tracing::warn!(generation, "step aborted: {reason}");
                report_links(shared, generation, &mut links_seen, events);
                events(MemberEvent::Aborted { generation, reason: &reason });
                coll.shutdown();
                // Copies in flight end with the connections (unacknowledged: never complete).
                if let Some(last) = sender.take() {
                    let _ = last.join();
                }
                shared.close(generation)?;
                // A save in flight continues; it commits or stays torn (and ignored).
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reports the links re-established or given up since the last report (`seen`), if any.
fn report_links(
    shared: &Shared,
    generation: u64,
    seen: &mut (u64, u64),
    events: &mut impl FnMut(MemberEvent<'_>),
) {
    let now = (shared.links.restored.load(Ordering::Relaxed), shared.links.failed.load(Ordering::Relaxed));
    if now != *seen {
        let (restored, failed) = (now.0 - seen.0, now.1 - seen.1);
        *seen = now;
        events(MemberEvent::Reconnects { generation, restored, failed });
    }
}

fn peers(shared: &Shared) -> Result<MutexGuard<'_, PeerStore>> {
    shared.peers.lock().map_err(|_| WorkerError::Rendezvous("peer store lock poisoned".into()))
}

/// Takes this member's snapshot of `step` into its peer store and sends the experts' part to
/// each of `buddies` on a background thread (overlapped with the next step's compute); each
/// buddy's acknowledgement is recorded as it comes. Returns the thread.
fn snapshot(
    shared: &Arc<Shared>,
    coll: &Arc<TcpCollective>,
    step: u64,
    buddies: Vec<u32>,
    sent: &Arc<AtomicU64>,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    let (params, moments) = {
        let guard = shared.trainer.read().map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))?;
        let trainer = guard.as_ref().ok_or_else(|| WorkerError::Rendezvous("no trainer".into()))?;
        trainer.host_state()?
    };
    let own = peers(shared)?.add_own(Snapshot { step, params, moments }, &buddies, Instant::now());
    if buddies.is_empty() {
        return Ok(None);
    }
    let (shared, coll, sent) = (shared.clone(), coll.clone(), sent.clone());
    let handle = std::thread::Builder::new()
        .name("peer-copy".into())
        .spawn(move || {
            let copy = own.experts_only();
            for buddy in buddies {
                match coll.send_copy(buddy, &copy) {
                    Ok(n) => {
                        sent.fetch_add(n, Ordering::Relaxed);
                        if let Ok(mut store) = shared.peers.lock() {
                            store.acked(step, buddy, Instant::now());
                        }
                    }
                    Err(e) => tracing::warn!(step, buddy, "peer copy not acknowledged: {e}"),
                }
            }
        })
        .map_err(|e| WorkerError::Rendezvous(format!("peer copy thread: {e}")))?;
    Ok(Some(handle))
}

/// Writes this member's [`PeerRecord`] to `peers/<rank>` when it changed (buffered).
fn publish_peers(session: &Session, shared: &Shared, published: &mut Option<PeerRecord>) -> Result<()> {
    let record = peers(shared)?.record();
    if published.as_ref() != Some(&record) {
        session.record_peers(&record);
        *published = Some(record);
    }
    Ok(())
}

/// Tokens this member's micro-batches routed to each expert since `from_step` (one window of
/// its [`LoadRecord`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadWindow {
    from_step: u64,
    tokens: Vec<Vec<u64>>,
}

impl LoadWindow {
    /// An empty window after step `step`.
    pub fn starting_at(step: u64) -> Self {
        Self { from_step: step, tokens: Vec::new() }
    }

    /// Adds one step's counts (`[layer][expert]`).
    pub fn add(&mut self, counts: &[Vec<u64>]) {
        if self.tokens.len() < counts.len() {
            self.tokens.resize_with(counts.len(), Vec::new);
        }
        for (sum, layer) in self.tokens.iter_mut().zip(counts) {
            if sum.len() < layer.len() {
                sum.resize(layer.len(), 0);
            }
            for (s, &c) in sum.iter_mut().zip(layer) {
                *s = s.saturating_add(c);
            }
        }
    }

    /// The record of the window ending at `step` (none when it holds no step or no token) and a
    /// new window after it.
    pub fn close(&mut self, generation: u64, rank: u32, step: u64) -> Option<LoadRecord> {
        let done = std::mem::replace(self, Self::starting_at(step));
        (step > done.from_step && done.tokens.iter().flatten().any(|&c| c > 0)).then_some(LoadRecord {
            generation,
            rank,
            from_step: done.from_step,
            to_step: step,
            tokens: done.tokens,
        })
    }
}

/// Builds this member's state of `step` for a peer restore: its own snapshot (`own`, if it has
/// one) for the dense parameters and the experts it kept, and the rest fetched from the other
/// members: gained experts from their previous holders first (a member whose chip failed
/// still has its host memory), then from anyone holding a copy; the dense parameters (a
/// replacement has none) from any member. Nothing is read from disk.
#[allow(clippy::too_many_arguments)]
fn restore_from_peers(
    config: &TrainerConfig,
    corpus: &Arc<Corpus>,
    shared: &Shared,
    coll: &TcpCollective,
    plan: &DistPlan,
    previous: Option<&DistPlan>,
    mine: &[ExpertId],
    step: u64,
    own: Option<Arc<Snapshot>>,
) -> Result<()> {
    let rank = shared.rank;
    let mut state =
        own.as_ref().map_or(Snapshot { step, ..Snapshot::default() }, |o| o.select(true, Some(mine)));
    let mut need_dense = own.is_none();
    let missing = |state: &Snapshot| -> Vec<ExpertId> {
        let have = state.experts();
        mine.iter().filter(|e| !have.contains(e)).copied().collect()
    };
    let order = fetch_order(rank, &plan.members, previous, &missing(&state));
    let mut from: BTreeMap<u32, u64> = BTreeMap::new();
    for peer in order {
        let want = missing(&state);
        if want.is_empty() && !need_dense {
            break;
        }
        let part = coll
            .fetch(peer, step, need_dense, &want)
            .map_err(|e| WorkerError::Aborted(format!("peer restore: {e}")))?;
        let Some(part) = part else { continue };
        // Only what was asked for, whatever the peer sent.
        let part = part.select(need_dense, Some(&want));
        if part.params.is_empty() {
            continue;
        }
        need_dense &= !part.has_dense();
        from.insert(peer, part.bytes());
        state.merge(part);
    }
    let want = missing(&state);
    if need_dense || !want.is_empty() {
        let mut what = Vec::new();
        if need_dense {
            what.push("the dense parameters".to_string());
        }
        if !want.is_empty() {
            what.push(format!("experts {want:?}"));
        }
        return Err(WorkerError::NoPeerSnapshot { step, missing: what.join(" and ") });
    }
    let bytes = state.bytes();
    let trainer =
        Trainer::from_host_state(config.clone(), corpus.clone(), state.params, state.moments, step)?;
    *shared.trainer.write().map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))? = Some(trainer);
    tracing::info!(
        generation = coll.generation(),
        step,
        bytes,
        own = own.is_some(),
        fetched_from = ?from,
        "restored from peer memory; no checkpoint read"
    );
    Ok(())
}

/// Whom a peer restore asks, in order: the previous holders of the `missing` experts that are
/// still members, then every other member by rank.
pub fn fetch_order(
    rank: u32,
    members: &[u32],
    previous: Option<&DistPlan>,
    missing: &[ExpertId],
) -> Vec<u32> {
    let mut order: Vec<u32> = Vec::new();
    if let Some(prev) = previous {
        for &e in missing {
            for h in prev.holders(e) {
                if h != rank && members.contains(&h) && !order.contains(&h) {
                    order.push(h);
                }
            }
        }
    }
    for &m in members {
        if m != rank && !order.contains(&m) {
            order.push(m);
        }
    }
    order
}

/// The address registered for peers: `advertise` (an IP, or a name resolved here) with the
/// listener's actual port, or the listener's own address without it.
pub fn advertised_addr(local: SocketAddr, advertise: Option<&str>) -> Result<SocketAddr> {
    let Some(host) = advertise else { return Ok(local) };
    let bad = |why: String| WorkerError::Rendezvous(format!("cannot advertise {host:?}: {why}"));
    // Bracketed IPv6 (`[fd00::1]`) as well as bare.
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, local.port()));
    }
    (bare, local.port())
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address".into()))
}

/// What an in-memory (reroute) generation asks of a member's experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InMemoryChange {
    /// It keeps exactly the experts it holds.
    Same,
    /// It keeps a subset: these experts are dropped.
    Drop(Vec<ExpertId>),
    /// It is given experts it does not hold (only a checkpoint could supply them).
    Missing(Vec<ExpertId>),
}

/// Compares the experts a member `held` with the ones a reroute generation gives it (`mine`).
pub fn in_memory_change(held: &[ExpertId], mine: &[ExpertId]) -> InMemoryChange {
    let missing: Vec<ExpertId> = mine.iter().filter(|e| !held.contains(e)).copied().collect();
    if !missing.is_empty() {
        return InMemoryChange::Missing(missing);
    }
    let dropped: Vec<ExpertId> = held.iter().filter(|e| !mine.contains(e)).copied().collect();
    if dropped.is_empty() { InMemoryChange::Same } else { InMemoryChange::Drop(dropped) }
}

/// Reports how a background save ended: a commit is recorded for the recovery brain; a failure
/// (the save removed what it wrote) is reported and training goes on.
fn settle(
    session: &Session,
    store: &CheckpointStore,
    generation: u64,
    outcome: Option<SaveOutcome>,
    events: &mut impl FnMut(MemberEvent<'_>),
) {
    match outcome {
        None => {}
        Some(SaveOutcome::Committed(done)) => committed(session, store, generation, &done, events),
        Some(SaveOutcome::Failed { step, error }) => {
            tracing::error!(step, "checkpoint save failed; training continues: {error}");
            events(MemberEvent::SaveFailed { step, error: &error });
        }
    }
}

/// Writes the checkpoint the job ends on, retrying a failed save ([`FINAL_SAVE_ATTEMPTS`] in
/// all): without it the job has no final state to report.
fn save_final(
    store: &CheckpointStore,
    session: &Session,
    generation: u64,
    snapshot: &crate::checkpoint::TrainingSnapshot,
    events: &mut impl FnMut(MemberEvent<'_>),
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match store.save(snapshot) {
            Ok(done) => {
                committed(session, store, generation, &done, events);
                return Ok(());
            }
            Err(error) => {
                tracing::error!(step = snapshot.step, attempt, "final checkpoint save failed: {error}");
                events(MemberEvent::SaveFailed { step: snapshot.step, error: &error });
                if attempt >= FINAL_SAVE_ATTEMPTS {
                    return Err(error);
                }
            }
        }
        attempt += 1;
        std::thread::sleep(FINAL_SAVE_PAUSE);
    }
}

/// Reports a committed checkpoint: its record for the recovery brain, the deletion of the
/// records of the checkpoints retention removed and of any record older than the oldest
/// directory left (all buffered: the brain tolerates a late record, and training never waits
/// for etcd), then the event.
fn committed(
    session: &Session,
    store: &CheckpointStore,
    generation: u64,
    done: &SaveReport,
    events: &mut impl FnMut(MemberEvent<'_>),
) {
    session.record_checkpoint(generation, done.step, &done.path);
    for step in done.removed.iter().filter_map(|p| CheckpointStore::step_of(p)) {
        if step != done.step {
            session.forget_checkpoint(step);
        }
    }
    match store.list() {
        Ok(left) => {
            if let Some(oldest) = left.iter().map(|(step, _, _)| *step).min() {
                session.forget_checkpoints_before(oldest);
            }
        }
        Err(e) => tracing::warn!("cannot list the checkpoints left; stale records stay: {e}"),
    }
    events(MemberEvent::Committed(done));
}

fn traffic(shared: &Shared) -> (u64, u64, u64) {
    let t = &shared.traffic;
    (
        t.expert_bytes.load(Ordering::Relaxed),
        t.collective_bytes.load(Ordering::Relaxed),
        t.expert_payload_bytes.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_host_takes_the_listeners_port() {
        let local: SocketAddr = "0.0.0.0:29500".parse().unwrap();
        assert_eq!(advertised_addr(local, None).unwrap(), local);
        assert_eq!(advertised_addr(local, Some("10.1.2.3")).unwrap(), "10.1.2.3:29500".parse().unwrap());
        assert_eq!(advertised_addr(local, Some("[fd00::7]")).unwrap(), "[fd00::7]:29500".parse().unwrap());
        assert_eq!(advertised_addr(local, Some("fd00::7")).unwrap(), "[fd00::7]:29500".parse().unwrap());
        assert_eq!(advertised_addr(local, Some("localhost")).unwrap().port(), 29500);
    }

    #[test]
    fn a_load_window_sums_steps_and_closes_once_per_window() {
        let mut w = LoadWindow::starting_at(10);
        assert_eq!(w.close(3, 1, 10), None, "no step in the window");
        w.add(&[vec![1, 2], vec![0, 4]]);
        w.add(&[vec![3, 0], vec![1, 1]]);
        let r = w.close(3, 1, 15).unwrap();
        assert_eq!((r.generation, r.rank, r.from_step, r.to_step), (3, 1, 10, 15));
        assert_eq!(r.tokens, vec![vec![4, 2], vec![1, 5]]);
        // The next window starts where this one ended; a window without tokens writes nothing.
        w.add(&[vec![0, 0], vec![0, 0]]);
        assert_eq!(w.close(3, 1, 20), None);
        w.add(&[vec![1, 0], vec![0, 0]]);
        assert_eq!(w.close(4, 1, 25).map(|r| (r.from_step, r.generation)), Some((20, 4)));
    }

    #[test]
    fn a_reroute_may_only_take_experts_away() {
        let e = |l, x| ExpertId::new(l, x);
        let held = [e(0, 0), e(0, 2), e(1, 1)];
        assert_eq!(in_memory_change(&held, &held), InMemoryChange::Same);
        assert_eq!(in_memory_change(&held, &[e(0, 0), e(1, 1)]), InMemoryChange::Drop(vec![e(0, 2)]));
        assert_eq!(in_memory_change(&held, &[]), InMemoryChange::Drop(held.to_vec()));
        assert_eq!(in_memory_change(&held, &[e(0, 0), e(0, 3)]), InMemoryChange::Missing(vec![e(0, 3)]));
    }
}
