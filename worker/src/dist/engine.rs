//! One expert-parallel training step, the same code for one worker and for many.
//!
//! 1. **Compute.** Member at position `p` of `W` computes micro-batches `m ≡ p (mod W)`. Every
//!    routed expert runs through [`Requester`]: the tokens go to the serving replica
//!    ([`serving_replica`]), which may be this worker (a direct call) or a peer (TCP); in backward
//!    the output gradient goes to the same replica, which returns the input gradient and keeps
//!    the weight gradients for `(micro-batch, expert)`.
//! 2. **Round 1** (all-gather): each member sends its micro-batches' dense gradients and losses
//!    to every other member.
//! 3. **Round 2**: each member sends the expert weight gradients it computed to the other
//!    replicas of those experts, so every replica holds every micro-batch's gradients.
//! 4. Every member runs [`Trainer::reduce`] over all micro-batches (dense + the experts it
//!    holds): sums in micro-batch index order, whoever computed them.
//! 5. **Round 3**: the global norm's per-parameter partials: dense ones are computed by every
//!    member alike; an expert's by its first holder; exchanged, summed in name order.
//! 6. The update ([`Trainer::apply_with_norm`]); the state before it is kept so a reroute can
//!    roll one update back.
//! 7. **Round 4** (checkpoint steps): members send their experts' parameters and moments to the
//!    leader, which writes an ordinary checkpoint (same format as one worker's).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ninelives_core::generation::DistPlan;

use super::plan::{micro_batch_owner, serving_replica};
use super::state::Shared;
use super::transport::{Collective, TcpCollective};
use super::wire::{Dec, Enc, HostState, Malformed, Msg, decode_state, encode_state};
use crate::checkpoint::{DataCursor, TrainingSnapshot};
use crate::error::{Result, WorkerError};
use crate::model::{ExpertCall, ExpertId, ExpertSource, HostTensor, ParamOwner, RemoteExperts};
use crate::optim::{AdamW, Gradients};
use crate::trainer::MicroBatchResult;

/// Round numbers within a step.
const ROUND_DENSE: u8 = 1;
const ROUND_EXPERT_GRADS: u8 = 2;
const ROUND_NORM: u8 = 3;
const ROUND_CHECKPOINT: u8 = 4;

/// One expert weight gradient of one micro-batch, borrowed for encoding.
type ExpertGradRef<'a> = (u32, &'a str, &'a [f32]);

/// The routing view of one generation.
pub struct Routing {
    /// The generation's plan.
    pub plan: DistPlan,
    holders: BTreeMap<ExpertId, Vec<u32>>,
}

impl Routing {
    /// Precomputes the holders of every expert.
    pub fn new(plan: DistPlan) -> Self {
        let mut holders: BTreeMap<ExpertId, Vec<u32>> = BTreeMap::new();
        for (&rank, experts) in &plan.experts {
            for &e in experts {
                holders.entry(e).or_default().push(rank);
            }
        }
        holders.values_mut().for_each(|h| h.sort_unstable());
        Self { plan, holders }
    }

    /// Holders of `expert`, ascending.
    pub fn holders(&self, expert: ExpertId) -> &[u32] {
        self.holders.get(&expert).map_or(&[], Vec::as_slice)
    }

    /// Whether `rank` is `expert`'s first holder (it reports the expert's norm partial and
    /// writes it to checkpoints).
    pub fn is_primary(&self, rank: u32, expert: ExpertId) -> bool {
        self.holders(expert).first() == Some(&rank)
    }
}

/// The requester side of the all-to-all, handed to the model as its expert source.
struct Requester {
    shared: Arc<Shared>,
    coll: Arc<TcpCollective>,
    routing: Arc<Routing>,
    step: u64,
}

impl Requester {
    fn owner(&self, call: ExpertCall) -> Result<u32> {
        let id = call.expert_id();
        serving_replica(self.routing.holders(id), call.micro, id)
            .ok_or_else(|| WorkerError::Aborted(format!("{id} has no live replica")))
    }

    fn remote(&self, owner: u32, msg: Msg, values: usize) -> Result<Vec<f32>> {
        // Both directions carry `values` floats: the all-to-all's payload.
        self.shared.traffic.expert_payload_bytes.fetch_add(8 * values as u64, Ordering::Relaxed);
        self.coll.call(owner, &msg)
    }
}

impl RemoteExperts for Requester {
    fn forward(&self, call: ExpertCall, rows: usize, x: Vec<f32>) -> Result<Vec<f32>> {
        let owner = self.owner(call)?;
        let generation = self.coll.generation();
        if owner == self.shared.rank {
            return self.shared.service.forward(&self.shared.trainer, self.shared.rank, call, rows, x);
        }
        let values = x.len();
        let msg = Msg::Forward { generation, step: self.step, call, rows: rows as u32, data: x };
        self.remote(owner, msg, values)
    }

    fn backward(&self, call: ExpertCall, rows: usize, dy: Vec<f32>) -> Result<Vec<f32>> {
        let owner = self.owner(call)?;
        let generation = self.coll.generation();
        if owner == self.shared.rank {
            return self.shared.service.backward(&self.shared.trainer, self.shared.rank, call, rows, dy);
        }
        let values = dy.len();
        let msg = Msg::Backward { generation, step: self.step, call, rows: rows as u32, data: dy };
        self.remote(owner, msg, values)
    }
}

/// What one distributed step did.
#[derive(Clone, Debug, PartialEq)]
pub struct DistStepReport {
    /// Steps completed after this one.
    pub step: u64,
    /// Mean cross-entropy of the global batch.
    pub loss: f64,
    /// Mean balance loss.
    pub balance_loss: f64,
    /// Mean z-loss.
    pub z_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time.
    pub seconds: f64,
    /// Global-batch tokens per second.
    pub tokens_per_second: f64,
    /// Tokens this member's micro-batches routed to each routed expert, `[layer][expert]`.
    pub expert_tokens: Vec<Vec<u64>>,
}

/// A full copy of the model assembled on the leader at a checkpoint step.
pub struct Gathered {
    /// The snapshot to write (every parameter, every moment).
    pub snapshot: TrainingSnapshot,
}

fn aborted_or(shared: &Shared, generation: u64, err: WorkerError) -> WorkerError {
    match shared.abort_reason(generation) {
        Some(reason) => WorkerError::Aborted(reason),
        None => err,
    }
}

fn malformed(from: u32, e: Malformed) -> WorkerError {
    WorkerError::Aborted(format!("rank {from} sent a malformed payload: {e}"))
}

fn poisoned() -> WorkerError {
    WorkerError::Rendezvous("trainer lock poisoned".into())
}

/// Runs one step. On `Err(Aborted)` nothing was applied and the served state is discarded.
/// `before_update` receives the state before the update (for a one-step rollback).
/// `before_last_round` runs before the step's last exchange, which no member completes until
/// every member entered it: what it waits for is done everywhere before the step is.
pub fn run_step(
    shared: &Arc<Shared>,
    coll: &Arc<TcpCollective>,
    routing: &Arc<Routing>,
    before_update: &mut Option<(u64, HostState)>,
    before_last_round: impl FnOnce(),
) -> Result<DistStepReport> {
    let started = Instant::now();
    let me = shared.rank;
    let generation = coll.generation();
    let members = routing.plan.members.clone();

    // 1. Compute this member's micro-batches.
    let guard = shared.trainer.read().map_err(|_| poisoned())?;
    let trainer = guard.as_ref().ok_or_else(|| WorkerError::Rendezvous("no trainer".into()))?;
    let step = trainer.step();
    let config = trainer.config().clone();
    let micro_batches = config.micro_batches();
    shared.open_step(generation, step)?;
    let remote: Arc<dyn RemoteExperts> =
        Arc::new(Requester { shared: shared.clone(), coll: coll.clone(), routing: routing.clone(), step });
    let mut mine = Vec::new();
    for m in 0..micro_batches {
        if micro_batch_owner(&members, m) != Some(me) {
            continue;
        }
        let source = ExpertSource { remote: remote.clone(), micro: m as u32 };
        let result = trainer
            .micro_batch_gradients_with(&trainer.micro_batch(m), Some(&source))
            .map_err(|e| aborted_or(shared, generation, e))?;
        mine.push(result);
    }
    drop(guard);
    let mut expert_tokens: Vec<Vec<u64>> = Vec::new();
    for r in &mine {
        expert_tokens.resize_with(expert_tokens.len().max(r.expert_tokens.len()), Vec::new);
        for (sum, layer) in expert_tokens.iter_mut().zip(&r.expert_tokens) {
            sum.resize(sum.len().max(layer.len()), 0);
            for (s, &c) in sum.iter_mut().zip(layer) {
                *s += u64::from(c);
            }
        }
    }

    // 2. Round 1: dense gradients and losses of every micro-batch, to everyone.
    let payload = encode_results(&mine);
    let outgoing = members.iter().filter(|&&r| r != me).map(|&r| (r, payload.clone())).collect();
    let received = coll.exchange(step, ROUND_DENSE, outgoing)?;
    let mut by_micro: BTreeMap<usize, MicroBatchResult> = mine.into_iter().map(|r| (r.index, r)).collect();
    for (from, bytes) in received {
        for r in decode_results(&bytes).map_err(|e| malformed(from, e))? {
            by_micro.insert(r.index, r);
        }
    }

    // 3. Round 2: expert weight gradients to the other replicas.
    let served = shared.service.take_grads()?;
    let mut outgoing: BTreeMap<u32, Vec<ExpertGradRef<'_>>> = BTreeMap::new();
    for ((m, e), grads) in &served {
        for &holder in routing.holders(*e) {
            if holder != me {
                let list = outgoing.entry(holder).or_default();
                list.extend(grads.iter().map(|(n, g)| (*m, n.as_str(), g.as_slice())));
            }
        }
    }
    let outgoing = outgoing.into_iter().map(|(r, list)| (r, encode_expert_grads(&list))).collect();
    let received = coll.exchange(step, ROUND_EXPERT_GRADS, outgoing)?;
    let mut expert_grads: Vec<(u32, String, Vec<f32>)> = Vec::new();
    for ((m, _), grads) in served {
        expert_grads.extend(grads.into_iter().map(|(n, g)| (m, n, g)));
    }
    for (from, bytes) in received {
        expert_grads.extend(decode_expert_grads(&bytes).map_err(|e| malformed(from, e))?);
    }
    for (m, name, g) in expert_grads {
        let slot = by_micro
            .get_mut(&(m as usize))
            .ok_or_else(|| WorkerError::Aborted(format!("expert gradient for unknown micro-batch {m}")))?;
        slot.grads.insert(name, g);
    }

    // 4. The ordered reduction, identical to one process's.
    let guard = shared.trainer.read().map_err(|_| poisoned())?;
    let trainer = guard.as_ref().ok_or_else(|| WorkerError::Rendezvous("no trainer".into()))?;
    let (grads, [loss, balance_loss, z_loss]) = trainer.reduce(by_micro.into_values().collect())?;
    drop(guard);

    // 5. Round 3: the global norm from per-parameter partials.
    // Every held parameter's partial (in parallel, each in element order); the non-primary
    // replicas' expert partials are dropped so each expert counts once.
    let mut partials = AdamW::norm_partials(&grads);
    let mut mine_expert = Vec::new();
    partials.retain(|name, p| match ParamOwner::of(name) {
        ParamOwner::Dense => true,
        ParamOwner::Expert(e) if routing.is_primary(me, e) => {
            mine_expert.push((name.clone(), *p));
            true
        }
        ParamOwner::Expert(_) => false,
    });
    let payload = encode_partials(&mine_expert);
    let outgoing = members.iter().filter(|&&r| r != me).map(|&r| (r, payload.clone())).collect();
    before_last_round();
    for (from, bytes) in coll.exchange(step, ROUND_NORM, outgoing)? {
        partials.extend(decode_partials(&bytes).map_err(|e| malformed(from, e))?);
    }
    let grad_norm = AdamW::norm_from_partials(&partials);

    // 6. The update. Past this point the step is done here, whatever peers do.
    let mut guard = shared.trainer.write().map_err(|_| poisoned())?;
    let trainer = guard.as_mut().ok_or_else(|| WorkerError::Rendezvous("no trainer".into()))?;
    *before_update = Some((step, trainer.host_state()?));
    let update = trainer.apply_with_norm(&grads, grad_norm)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(DistStepReport {
        step: trainer.step(),
        loss,
        balance_loss,
        z_loss,
        lr: update.lr,
        grad_norm: update.grad_norm,
        seconds,
        tokens_per_second: config.tokens_per_step() as f64 / seconds.max(1e-9),
        expert_tokens,
    })
}

/// Round 4: gathers every expert's parameters and moments on the leader. Returns the full
/// snapshot on the leader, `None` elsewhere.
pub fn gather_checkpoint(
    shared: &Arc<Shared>,
    coll: &Arc<TcpCollective>,
    routing: &Arc<Routing>,
) -> Result<Option<Gathered>> {
    let me = shared.rank;
    let leader = routing.plan.leader().ok_or_else(|| WorkerError::Rendezvous("no members".into()))?;
    let guard = shared.trainer.read().map_err(|_| poisoned())?;
    let trainer = guard.as_ref().ok_or_else(|| WorkerError::Rendezvous("no trainer".into()))?;
    let step = trainer.step();
    let config = trainer.config().clone();
    let (mut params, mut moments) = trainer.host_state()?;
    drop(guard);
    // Only each expert's first holder contributes it; the leader contributes dense.
    params.retain(|name, _| match ParamOwner::of(name) {
        ParamOwner::Dense => me == leader,
        ParamOwner::Expert(e) => routing.is_primary(me, e),
    });
    moments.retain(|name, _| params.contains_key(name));
    let mut outgoing = BTreeMap::new();
    if me != leader {
        outgoing.insert(leader, encode_state(&params, &moments));
    }
    let received = coll.exchange(step, ROUND_CHECKPOINT, outgoing)?;
    if me != leader {
        return Ok(None);
    }
    for (from, bytes) in received {
        let (p, m) = decode_state(&bytes).map_err(|e| malformed(from, e))?;
        params.extend(p);
        moments.extend(m);
    }
    let expected: BTreeSet<String> =
        crate::model::param_specs(&config.dims).into_iter().map(|s| s.name).collect();
    let have: BTreeSet<String> = params.keys().cloned().collect();
    if have != expected {
        let missing: Vec<&String> = expected.difference(&have).take(3).collect();
        return Err(WorkerError::Aborted(format!("checkpoint gather is missing {missing:?}")));
    }
    let snapshot = TrainingSnapshot {
        step,
        dims: config.dims,
        data_cursor: DataCursor {
            seed: config.seed,
            next_step: step,
            global_batch_size: config.global_batch_size,
            micro_batch_size: config.micro_batch_size,
        },
        params_sha256: params_digest(&params),
        params,
        moments,
    };
    Ok(Some(Gathered { snapshot }))
}

/// sha256 over parameters in name order as little-endian f32: `MoeTransformer::params_sha256`
/// of a model holding all of them.
pub fn params_digest(params: &BTreeMap<String, HostTensor>) -> String {
    crate::model::host_params_sha256(params)
}

fn encode_results(results: &[MicroBatchResult]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(results.len() as u32);
    for r in results {
        e.u32(r.index as u32).f32(r.cross_entropy).f32(r.balance_loss).f32(r.z_loss);
        e.u32(r.grads.len() as u32);
        for (name, g) in &r.grads {
            e.str(name).f32s(g);
        }
    }
    e.finish()
}

pub(super) fn decode_results(bytes: &[u8]) -> Result<Vec<MicroBatchResult>, Malformed> {
    let mut d = Dec::new(bytes);
    let n = d.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let index = d.u32()? as usize;
        let (cross_entropy, balance_loss, z_loss) = (d.f32()?, d.f32()?, d.f32()?);
        let count = d.u32()?;
        let mut grads = Gradients::new();
        for _ in 0..count {
            let name = d.str()?;
            grads.insert(name, d.f32s()?);
        }
        // Token counts stay with the member that routed them (published as its load window).
        out.push(MicroBatchResult {
            index,
            grads,
            cross_entropy,
            balance_loss,
            z_loss,
            expert_tokens: Vec::new(),
        });
    }
    d.end()?;
    Ok(out)
}

fn encode_expert_grads(list: &[(u32, &str, &[f32])]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(list.len() as u32);
    for (m, name, g) in list {
        e.u32(*m).str(name).f32s(g);
    }
    e.finish()
}

pub(super) fn decode_expert_grads(bytes: &[u8]) -> Result<Vec<(u32, String, Vec<f32>)>, Malformed> {
    // A member with nothing for this peer sends an empty payload.
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut d = Dec::new(bytes);
    let n = d.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push((d.u32()?, d.str()?, d.f32s()?));
    }
    d.end()?;
    Ok(out)
}

fn encode_partials(list: &[(String, f64)]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(list.len() as u32);
    for (name, p) in list {
        e.str(name).f64(*p);
    }
    e.finish()
}

pub(super) fn decode_partials(bytes: &[u8]) -> Result<Vec<(String, f64)>, Malformed> {
    let mut d = Dec::new(bytes);
    let n = d.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push((d.str()?, d.f64()?));
    }
    d.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Moments;

    #[test]
    fn payloads_round_trip() {
        let mut grads = Gradients::new();
        grads.insert("embed".into(), vec![1.0, -2.5]);
        let r = MicroBatchResult {
            index: 3,
            grads,
            cross_entropy: 5.5,
            balance_loss: 1.0,
            z_loss: 0.25,
            expert_tokens: Vec::new(),
        };
        let back = decode_results(&encode_results(std::slice::from_ref(&r))).unwrap();
        assert_eq!(back[0].index, 3);
        assert_eq!(back[0].grads, r.grads);
        let g = [0.5f32, 1.5];
        let list = [(2u32, "layers.0.experts.1.w_up", &g[..])];
        assert_eq!(
            decode_expert_grads(&encode_expert_grads(&list)).unwrap(),
            vec![(2, "layers.0.experts.1.w_up".to_string(), g.to_vec())]
        );
        let p = vec![("a".to_string(), 0.1f64)];
        assert_eq!(decode_partials(&encode_partials(&p)).unwrap(), p);
        let mut params = BTreeMap::new();
        params.insert("x".to_string(), HostTensor { shape: vec![2], data: vec![1.0, 2.0] });
        let mut moments = BTreeMap::new();
        moments.insert("x".to_string(), Moments { m: vec![0.1, 0.2], v: vec![0.3, 0.4] });
        let (p2, m2) = decode_state(&encode_state(&params, &moments)).unwrap();
        assert_eq!((p2, m2), (params, moments));
        assert!(decode_state(&[1, 0, 0]).is_err());
    }
}
