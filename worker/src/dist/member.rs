//! One member of an expert-parallel job: join generations, train, abort and rejoin.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::engine::{DistStepReport, HostState, Routing, gather_checkpoint, run_step};
use super::link::{LinkConfig, MAX_CONNECTIONS, Security};
use super::rendezvous::{Etcd, Session};
use super::state::{POLL, Shared};
use super::transport::{Collective, TcpCollective, serve};
use super::wire::frame_limit;
use crate::checkpoint::{BackgroundSaver, CheckpointStore, ExpertSelection, SaveReport};
use crate::data::Corpus;
use crate::error::{Result, WorkerError};
use crate::model::{ExpertId, ParamOwner};
use crate::trainer::{Trainer, TrainerConfig};
use ninelives_core::generation::{GenerationTier, Restore, agreed_step};

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
    /// The leader committed a checkpoint.
    Committed(&'a SaveReport),
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
    let link =
        LinkConfig { security: options.security.clone(), frame_limit, max_connections: MAX_CONNECTIONS };
    let shared = Shared::new(rank, options.step_timeout, link);
    let listener = TcpListener::bind(options.listen)
        .map_err(|e| WorkerError::Rendezvous(format!("cannot listen on {}: {e}", options.listen)))?;
    let local = listener.local_addr().map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
    let addr = advertised_addr(local, options.advertise.as_deref())?;
    let _listener = serve(listener, shared.clone())?;
    let session = Session::start(etcd.clone(), rank, options.ttl_seconds)?;
    session.register(addr)?;
    session.watch_generation(shared.clone());
    tracing::info!(rank, %addr, "registered");

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
    loop {
        // Wait for a generation newer than the last one joined.
        let deadline = Instant::now() + options.join_timeout;
        let plan = loop {
            if let Some(plan) = etcd.plan()?
                && plan.generation() > joined
            {
                break plan;
            }
            if Instant::now() >= deadline {
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

        // Obtain the generation's state.
        {
            let mut guard =
                shared.trainer.write().map_err(|_| WorkerError::Rendezvous("lock poisoned".into()))?;
            match plan.restore {
                Restore::Fresh => {
                    *guard = Some(Trainer::with_experts(config.clone(), corpus.clone(), Some(&mine))?);
                    before_update = None;
                }
                Restore::Checkpoint { step } => {
                    let path = store.step_dir(step);
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
        let my_step = shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0);
        // What the restore left in memory (equal to `mine` on every path), as reported.
        let held = shared
            .trainer
            .read()
            .ok()
            .and_then(|g| g.as_ref().map(|t| t.model().held_experts().len()))
            .unwrap_or(0);
        session.ack(generation, my_step)?;

        // The generation barrier: every member acknowledged.
        let deadline = Instant::now() + options.join_timeout;
        let acks = loop {
            let acks = etcd.acks(generation)?;
            if plan.members.iter().all(|r| acks.contains_key(r)) {
                break Some(acks);
            }
            if shared.seen_generation.load(Ordering::SeqCst) > generation || Instant::now() >= deadline {
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

        let addrs = etcd.members()?.into_iter().map(|(r, m)| (r, m.addr)).collect();
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
        let routing = Arc::new(Routing::new(plan));
        let total = config.total_steps;
        let outcome: Result<Option<String>> = (|| {
            let mut last_saved = None;
            loop {
                let step =
                    shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0);
                if step >= total {
                    break;
                }
                let counters = traffic(shared);
                let report = run_step(shared, &coll, &routing, &mut before_update)?;
                events(MemberEvent::Step(&report));
                if routing.plan.leader() == Some(rank)
                    && let Err(e) = etcd.put_progress(report.step, report.loss)
                {
                    // The brain tolerates a late record; training must not stop for it.
                    tracing::warn!(step = report.step, "cannot report progress: {e}");
                }
                let after = traffic(shared);
                events(MemberEvent::Traffic {
                    expert_bytes: after.0 - counters.0,
                    collective_bytes: after.1 - counters.1,
                    expert_payload_bytes: after.2 - counters.2,
                });
                if report.step % options.checkpoint_every.max(1) == 0 || report.step == total {
                    if let Some(gathered) = gather_checkpoint(shared, &coll, &routing)?
                        && let Some(done) = saver.submit(gathered.snapshot)?
                    {
                        committed(etcd, &done, events);
                    }
                    last_saved = Some(report.step);
                } else if let Some(done) = saver.poll()? {
                    committed(etcd, &done, events);
                }
            }
            // The end: every member has the final state; the leader writes and reports it.
            let step = shared.trainer.read().ok().and_then(|g| g.as_ref().map(Trainer::step)).unwrap_or(0);
            if last_saved != Some(step)
                && let Some(gathered) = gather_checkpoint(shared, &coll, &routing)?
                && let Some(done) = saver.submit(gathered.snapshot)?
            {
                committed(etcd, &done, events);
            }
            let mut digest = None;
            if let Some(done) = saver.wait()? {
                committed(etcd, &done, events);
            }
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
            Ok(digest)
        })();
        match outcome {
            Ok(digest) => return Ok(digest),
            Err(WorkerError::Aborted(reason)) => {
                tracing::warn!(generation, "step aborted: {reason}");
                events(MemberEvent::Aborted { generation, reason: &reason });
                coll.shutdown();
                shared.close(generation)?;
                // A save in flight continues; it commits or stays torn (and ignored).
            }
            Err(e) => return Err(e),
        }
    }
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

/// Reports a committed checkpoint: its record in etcd for the recovery brain, the deletion of
/// the records of the checkpoints retention removed, then the event. A failed write is logged,
/// never fatal: the brain tolerates a late record, and training must not stop for it.
fn committed(etcd: &Etcd, done: &SaveReport, events: &mut impl FnMut(MemberEvent<'_>)) {
    if let Err(e) = etcd.put_checkpoint(done.step, &done.path) {
        tracing::warn!(step = done.step, "cannot record the committed checkpoint: {e}");
    }
    for step in done.removed.iter().filter_map(|p| CheckpointStore::step_of(p)) {
        if step != done.step
            && let Err(e) = etcd.delete_checkpoint(step)
        {
            tracing::warn!(step, "cannot delete the record of a removed checkpoint: {e}");
        }
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
    fn a_reroute_may_only_take_experts_away() {
        let e = |l, x| ExpertId::new(l, x);
        let held = [e(0, 0), e(0, 2), e(1, 1)];
        assert_eq!(in_memory_change(&held, &held), InMemoryChange::Same);
        assert_eq!(in_memory_change(&held, &[e(0, 0), e(1, 1)]), InMemoryChange::Drop(vec![e(0, 2)]));
        assert_eq!(in_memory_change(&held, &[]), InMemoryChange::Drop(held.to_vec()));
        assert_eq!(in_memory_change(&held, &[e(0, 0), e(0, 3)]), InMemoryChange::Missing(vec![e(0, 3)]));
    }
}
