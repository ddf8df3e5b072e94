//! A LongCat-style decoder-only MoE transformer in candle.
//!
//! Per layer: RMSNorm → causal multi-head attention with rotary positions (dense, or block-sparse
//! when the job asks for it) → residual → RMSNorm → MoE feed-forward → residual. The MoE block has
//! a linear router over `routed + zero` experts; each token goes to its top-k experts by softmax
//! probability, weighted by that probability. Routed experts are SwiGLU FFNs; zero-computation
//! experts (LongCat-Flash) return their input unchanged, so tokens routed there cost nothing.
//! The layer also yields the Switch-style load-balancing loss and the router z-loss.
//!
//! Parameters live in a name-keyed map. Experts are keyed by `(layer, expert)` in their names
//! (`layers.{l}.experts.{e}.w_gate`), never by rank, so the same names work in every placement;
//! the names, their owners and their shapes are defined in [`crate::params`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use ninelives_core::ModelDims;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::MicroBatch;
use crate::error::{Result, WorkerError};
use crate::experts::{ExpertWeights, LocalExperts, RoutedExpertsOp};
use crate::ops::{self, RopeTables};

// The parameter vocabulary lives in `params` and the expert-call types in `experts` (which the
// model uses, and which must not use the model); re-exported here, where callers have always
// found them.
pub use crate::experts::{ExpertCall, RemoteExperts};
pub use crate::params::{
    ExpertId, HostTensor, ParamOwner, ParamSpec, all_experts, expert_prefix, hex, host_params_sha256,
    le_bytes, param_specs,
};

/// RMSNorm epsilon.
const NORM_EPS: f64 = 1e-5;
/// Rotary-embedding base.
const ROPE_THETA: f64 = 10_000.0;
/// Additive score for masked attention positions; exp() of it is exactly 0 in f32.
const MASKED: f32 = -1e9;

/// Checks that the worker can run a model of these dimensions.
pub fn check_dims(dims: &ModelDims) -> Result<()> {
    let bad = |m: String| Err(WorkerError::InvalidJob(m));
    if dims.vocab_size != 256 {
        return bad(format!("the worker is byte-level: vocabSize must be 256, not {}", dims.vocab_size));
    }
    if dims.heads == 0
        || !dims.hidden_size.is_multiple_of(dims.heads)
        || !(dims.hidden_size / dims.heads).is_multiple_of(2)
    {
        return bad(format!(
            "hiddenSize {} must split into {} heads of even width (rotary embeddings)",
            dims.hidden_size, dims.heads
        ));
    }
    if dims.top_k == 0
        || u64::from(dims.top_k) > u64::from(dims.routed_experts) + u64::from(dims.zero_experts)
    {
        return bad(format!("topK {} must be in 1..=routedExperts + zeroExperts", dims.top_k));
    }
    if dims.layers == 0 || dims.seq_len < 2 || dims.expert_ffn_size == 0 {
        return bad("layers, expertFfnSize must be positive and seqLen at least 2".into());
    }
    // Dimensions come from a manifest: every size the worker computes from them (parameter
    // counts, parameters + gradients + moments in bytes, a micro-batch's activations) must fit,
    // or a product would wrap in a release build.
    let state_bytes = dims.checked_total_params().and_then(|p| p.checked_mul(16));
    let activations = u64::from(dims.seq_len)
        .checked_mul(u64::from(dims.hidden_size.max(dims.expert_ffn_size)))
        .and_then(|x| x.checked_mul(u64::from(dims.layers)))
        .and_then(|x| x.checked_mul(u64::from(dims.top_k) + 8));
    let fits = |bytes: Option<u64>| bytes.and_then(|b| isize::try_from(b).ok()).is_some();
    if !fits(state_bytes) || !fits(activations) {
        return bad(format!(
            "model dimensions too large for one process: {} layers x {} hidden x {} experts of {}",
            dims.layers, dims.hidden_size, dims.routed_experts, dims.expert_ffn_size
        ));
    }
    if let Some(sparse) = dims.sparse_attention
        && (sparse.block_size == 0 || !dims.seq_len.is_multiple_of(sparse.block_size))
    {
        return bad(format!(
            "sparse attention blockSize {} must divide seqLen {}",
            sparse.block_size, dims.seq_len
        ));
    }
    Ok(())
}

/// Weights of the auxiliary router losses in the training objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    /// Load-balancing loss coefficient (summed over layers).
    pub aux: f64,
    /// Router z-loss coefficient (summed over layers).
    pub z: f64,
}

/// The result of one micro-batch's forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// The differentiable objective: cross-entropy + weighted router losses.
    pub objective: Tensor,
    /// Mean next-byte cross-entropy (nats per byte).
    pub cross_entropy: f32,
    /// Load-balancing loss summed over layers.
    pub balance_loss: f32,
    /// Router z-loss summed over layers.
    pub z_loss: f32,
    /// Tokens routed to each routed expert, per layer (`[layer][expert]`).
    pub expert_tokens: Vec<Vec<u32>>,
    /// The experts run in this process (no expert source given): after the backward, their
    /// weight gradients are taken from here.
    pub local_experts: Option<Arc<LocalExperts>>,
}

/// Where a forward pass gets its routed experts from.
#[derive(Clone)]
pub struct ExpertSource {
    /// The expert service.
    pub remote: Arc<dyn RemoteExperts>,
    /// The micro-batch being computed.
    pub micro: u32,
}

/// The model: its dimensions and a name-keyed set of trainable parameters.
///
/// A model may hold only some routed experts (see [`MoeTransformer::held_experts`]); a forward pass
/// that routes tokens to an expert it does not hold fails with a clear error. Issue 7's
/// expert-parallel runtime supplies remote experts at exactly that point.
pub struct MoeTransformer {
    dims: ModelDims,
    params: BTreeMap<String, Var>,
    rope: RopeTables,
    device: Device,
    /// Per layer, the fixed bias added to the router's logits (`routerSkew`); empty: none.
    router_bias: Vec<Tensor>,
}

impl MoeTransformer {
    /// A freshly initialised model holding the dense parameters and the experts in `experts`
    /// (every expert when `None`). Initial values depend only on `(seed, parameter name)`.
    pub fn initialize(dims: ModelDims, seed: u64, experts: Option<&[ExpertId]>) -> Result<Self> {
        check_dims(&dims)?;
        let wanted: Option<BTreeSet<ExpertId>> = experts.map(|e| e.iter().copied().collect());
        let mut values = BTreeMap::new();
        for spec in param_specs(&dims) {
            if let (ParamOwner::Expert(id), Some(wanted)) = (ParamOwner::of(&spec.name), &wanted)
                && !wanted.contains(&id)
            {
                continue;
            }
            let data = spec.initial_value(seed);
            values.insert(spec.name.clone(), HostTensor { shape: spec.shape.clone(), data });
        }
        Self::from_values(dims, values)
    }

    /// A model from explicit parameter values (e.g. loaded from a checkpoint). Every dense
    /// parameter must be present; experts may be a subset. Shapes are checked.
    pub fn from_values(dims: ModelDims, values: BTreeMap<String, HostTensor>) -> Result<Self> {
        check_dims(&dims)?;
        let device = Device::Cpu;
        let specs: BTreeMap<String, ParamSpec> =
            param_specs(&dims).into_iter().map(|s| (s.name.clone(), s)).collect();
        for (name, spec) in &specs {
            if ParamOwner::of(name) == ParamOwner::Dense && !values.contains_key(name) {
                return Err(WorkerError::InvalidJob(format!("dense parameter {name} is missing")));
            }
            if let Some(v) = values.get(name)
                && (v.shape != spec.shape || v.data.len() != spec.numel())
            {
                return Err(WorkerError::InvalidJob(format!(
                    "parameter {name} has shape {:?} ({} values), the model needs {:?}",
                    v.shape,
                    v.data.len(),
                    spec.shape
                )));
            }
        }
        let mut params = BTreeMap::new();
        for (name, value) in values {
            if !specs.contains_key(&name) {
                return Err(WorkerError::InvalidJob(format!("unknown parameter {name}")));
            }
            // `Var::from_vec` takes the vector as the variable's storage; `Var::from_tensor`
            // would copy it once more.
            params.insert(name, Var::from_vec(value.data, value.shape, &device)?);
        }
        let head_dim = (dims.hidden_size / dims.heads) as usize;
        let rope = RopeTables::new(dims.seq_len as usize, head_dim, ROPE_THETA);
        Ok(Self { dims, params, rope, device, router_bias: Vec::new() })
    }

    /// Adds a fixed, untrained bias to the router's logits that skews expert load: routed expert
    /// `e` of layer `l` gets `skew * r / (routed - 1)` with `r = (e + l) mod routed`, so each
    /// layer has a different hottest expert (zero-computation experts get none). 0 removes it.
    /// Deterministic: it changes which experts are hot, never who computes what.
    pub fn set_router_skew(&mut self, skew: f64) -> Result<()> {
        self.router_bias.clear();
        if skew == 0.0 {
            return Ok(());
        }
        let routed = self.dims.routed_experts as usize;
        let experts = routed + self.dims.zero_experts as usize;
        let span = routed.saturating_sub(1).max(1) as f64;
        for l in 0..self.dims.layers as usize {
            let bias: Vec<f32> = (0..experts)
                .map(|e| if e < routed { (skew * ((e + l) % routed) as f64 / span) as f32 } else { 0.0 })
                .collect();
            self.router_bias.push(Tensor::from_vec(bias, experts, &self.device)?);
        }
        Ok(())
    }

    /// The model's dimensions.
    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }

    /// Parameters held, in name order.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// The routed experts this model holds, in (layer, expert) order.
    pub fn held_experts(&self) -> Vec<ExpertId> {
        let ids: BTreeSet<ExpertId> = self
            .params
            .keys()
            .filter_map(|n| match ParamOwner::of(n) {
                ParamOwner::Expert(id) => Some(id),
                ParamOwner::Dense => None,
            })
            .collect();
        ids.into_iter().collect()
    }

    /// Drops the routed experts not in `experts` (a generation gave them to other members only);
    /// dense parameters and the experts kept are untouched.
    pub fn retain_experts(&mut self, experts: &[ExpertId]) {
        self.params.retain(|name, _| ParamOwner::of(name).kept_with(experts));
    }

    /// Copies every held parameter to the host, in name order (parameters in parallel).
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        let params: Vec<(&String, &Var)> = self.params.iter().collect();
        params
            .par_iter()
            .map(|(name, var)| {
                let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                Ok(((*name).clone(), HostTensor { shape: var.dims().to_vec(), data }))
            })
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().collect())
    }

    /// Overwrites one parameter's value in place.
    pub fn set_param(&self, name: &str, data: Vec<f32>) -> Result<()> {
        let var = self
            .params
            .get(name)
            .ok_or_else(|| WorkerError::InvalidJob(format!("parameter {name} is not held")))?;
        let tensor = Tensor::from_vec(data, var.dims(), &self.device)?;
        var.set(&tensor)?;
        Ok(())
    }

    /// Overwrites bytes `[offset, offset + bytes.len())` of one parameter in place with
    /// little-endian f32 data (a checkpoint restored into this model's existing memory, piece by
    /// piece). Parameters may be written from several threads.
    pub fn overwrite_param(&self, name: &str, offset: usize, bytes: &[u8]) -> Result<()> {
        let var = self
            .params
            .get(name)
            .ok_or_else(|| WorkerError::InvalidJob(format!("parameter {name} is not held")))?;
        var.as_tensor().inplace_op1(&ops::OverwriteF32 { offset, bytes })?;
        Ok(())
    }

    /// sha256 over every held parameter in name order, as little-endian f32 bytes.
    pub fn params_sha256(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        for var in self.params.values() {
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            hasher.update(le_bytes(&values));
        }
        Ok(hex(&hasher.finalize()))
    }

    fn param(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(Var::as_tensor)
            .ok_or_else(|| WorkerError::InvalidJob(format!("parameter {name} is not held by this worker")))
    }

    /// Forward pass of one micro-batch, returning the objective to differentiate.
    pub fn forward(&self, batch: &MicroBatch, weights: LossWeights) -> Result<ForwardOutput> {
        self.forward_with(batch, weights, None)
    }

    /// One routed expert's weights (shared with the model's variables, not tracked by autograd):
    /// what an expert's owner computes with for a [`RemoteExperts::forward`].
    pub fn expert_weights(&self, id: ExpertId) -> Result<ExpertWeights> {
        let prefix = expert_prefix(id);
        let get = |w: &str| self.param(&format!("{prefix}{w}")).map(Tensor::detach);
        Ok(ExpertWeights { w_gate: get("w_gate")?, w_up: get("w_up")?, w_down: get("w_down")? })
    }

    /// Forward pass with routed experts evaluated by `experts` (expert parallelism) instead of
    /// this model's own expert weights (`None`: local, as [`MoeTransformer::forward`]).
    pub fn forward_with(
        &self,
        batch: &MicroBatch,
        weights: LossWeights,
        experts: Option<&ExpertSource>,
    ) -> Result<ForwardOutput> {
        let (b, t) = (batch.sequences, batch.seq_len);
        if t != self.dims.seq_len as usize || batch.inputs.len() != b * t || batch.targets.len() != b * t {
            return Err(WorkerError::InvalidJob(format!(
                "micro-batch of {b}x{t} tokens does not match seqLen {}",
                self.dims.seq_len
            )));
        }
        let h = self.dims.hidden_size as usize;
        let inputs = Tensor::from_slice(&batch.inputs, b * t, &self.device)?;
        let targets = Tensor::from_slice(&batch.targets, b * t, &self.device)?;
        let mut x = self.param("embed")?.index_select(&inputs, 0)?; // [b*t, h]
        let mut balance = Vec::new();
        let mut zloss = Vec::new();
        let mut expert_tokens = Vec::new();
        // Without an expert source the experts run here, with this model's weights; their
        // weight gradients are collected outside candle's graph, as an owner's are.
        let (source, local_experts) = match experts {
            Some(source) => (source.clone(), None),
            None => {
                let weights = self
                    .held_experts()
                    .into_iter()
                    .map(|id| Ok((id, self.expert_weights(id)?)))
                    .collect::<Result<BTreeMap<_, _>>>()?;
                let local = Arc::new(LocalExperts::new(weights));
                (ExpertSource { remote: local.clone(), micro: batch.index as u32 }, Some(local))
            }
        };
        for l in 0..self.dims.layers {
            let normed = rms_norm(&x, self.param(&format!("layers.{l}.attn_norm"))?)?;
            x = (x + self.attention(l, &normed, b, t)?)?;
            let normed = rms_norm(&x, self.param(&format!("layers.{l}.moe_norm"))?)?;
            let moe = self.moe(l, &normed, &source)?;
            x = (x + moe.output)?;
            balance.push(moe.balance_loss);
            zloss.push(moe.z_loss);
            expert_tokens.push(moe.expert_tokens);
        }
        let x = rms_norm(&x, self.param("final_norm")?)?;
        let logits = ops::linear(&x, self.param("lm_head")?)?; // [b*t, vocab]
        let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let balance = Tensor::stack(&balance, 0)?.sum_all()?;
        let zloss = Tensor::stack(&zloss, 0)?.sum_all()?;
        let objective = ((&ce + (&balance * weights.aux)?)? + (&zloss * weights.z)?)?;
        let _ = h;
        Ok(ForwardOutput {
            objective,
            cross_entropy: ce.to_scalar::<f32>()?,
            balance_loss: balance.to_scalar::<f32>()?,
            z_loss: zloss.to_scalar::<f32>()?,
            expert_tokens,
            local_experts,
        })
    }

    fn attention(&self, l: u32, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let h = self.dims.hidden_size as usize;
        let nh = self.dims.heads as usize;
        let hd = h / nh;
        let proj = |w: &str| -> Result<Tensor> {
            let w = self.param(&format!("layers.{l}.{w}"))?;
            Ok(ops::linear(x, w)?.reshape((b, t, h))?)
        };
        // Rotary embedding fused with the split into heads: [b, t, h] -> [b, nh, t, hd].
        let q = ops::rope_heads(&proj("wq")?, &self.rope, nh)?;
        let k = ops::rope_heads(&proj("wk")?, &self.rope, nh)?;
        let v = proj("wv")?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = ops::batched_matmul(&q, &k, true)?; // [b, nh, t, t]
        let probs = match self.dims.sparse_attention {
            Some(sparse) => {
                let mask = block_sparse_mask(
                    &q,
                    &k,
                    sparse.block_size as usize,
                    sparse.top_blocks as usize,
                    &self.device,
                )?;
                ops::softmax_last_dim(&(scores * scale)?.broadcast_add(&mask)?)?
            }
            // Scale, causal mask and softmax in one fused op.
            None => ops::causal_softmax(&scores, scale)?,
        };
        let out = ops::batched_matmul(&probs, &v, false)?.transpose(1, 2)?.reshape((b * t, h))?;
        Ok(ops::linear(&out, self.param(&format!("layers.{l}.wo"))?)?)
    }

    fn moe(&self, l: u32, x: &Tensor, source: &ExpertSource) -> Result<MoeOutput> {
        let routed = self.dims.routed_experts as usize;
        let zero = self.dims.zero_experts as usize;
        let experts = routed + zero;
        let top_k = self.dims.top_k as usize;
        let n = x.dim(0)?;
        let mut logits = ops::linear(x, self.param(&format!("layers.{l}.router"))?)?; // [n, experts]
        if let Some(bias) = self.router_bias.get(l as usize) {
            logits = logits.broadcast_add(bias)?;
        }
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let plan = RoutingPlan::top_k(&probs.to_vec2::<f32>()?, top_k, routed);
        let mask = Tensor::from_vec(plan.selection_mask(experts), (n, experts), &self.device)?;
        let gates = (&probs * &mask)?;

        // Routed experts, one fused op: the accumulation order is fixed, whoever computes them.
        let routed_gates = gates.narrow(1, 0, routed)?.contiguous()?;
        let op = RoutedExpertsOp::new(source.remote.clone(), source.micro, l, plan.tokens_per_expert.clone());
        let mut out = x.contiguous()?.apply_op2(&routed_gates, op)?;
        // Zero-computation experts return their input: weight it by their summed gates.
        if zero > 0 {
            let zero_gate = gates.narrow(1, routed, zero)?.sum_keepdim(1)?;
            out = (out + x.broadcast_mul(&zero_gate)?)?;
        }

        // Switch-style balance loss over all experts: E * sum_i f_i * P_i, f_i the (constant)
        // fraction of routing slots expert i received, P_i its mean router probability.
        let slots = (n * top_k) as f32;
        let fractions: Vec<f32> = plan.counts.iter().map(|&c| c as f32 / slots).collect();
        let fractions = Tensor::from_vec(fractions, experts, &self.device)?;
        let mean_prob = probs.mean(0)?;
        let balance_loss = ((mean_prob * fractions)?.sum_all()? * experts as f64)?;
        // Router z-loss: mean squared log-sum-exp of the router logits.
        let max = logits.max_keepdim(1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
        let z_loss = lse.sqr()?.mean_all()?;
        let expert_tokens = plan.counts[..routed].iter().map(|&c| c as u32).collect();
        Ok(MoeOutput { output: out, balance_loss, z_loss, expert_tokens })
    }
}

struct MoeOutput {
    output: Tensor,
    balance_loss: Tensor,
    z_loss: Tensor,
    expert_tokens: Vec<u32>,
}

/// Which tokens go to which experts in one MoE layer. Computed from router probabilities on the
/// host; ties break towards the lower expert index, so routing is deterministic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingPlan {
    /// For each token, its chosen experts (routed and zero-computation), best first.
    pub choices: Vec<Vec<usize>>,
    /// For each routed expert, the tokens routed to it, ascending.
    pub tokens_per_expert: Vec<Vec<u32>>,
    /// Routing slots received by every expert (routed then zero-computation).
    pub counts: Vec<usize>,
}

impl RoutingPlan {
    /// Top-k routing of `probs` (`[tokens][experts]`); the first `routed` experts are routed
    /// experts, the rest zero-computation.
    pub fn top_k(probs: &[Vec<f32>], k: usize, routed: usize) -> Self {
        let experts = probs.first().map_or(0, Vec::len);
        let mut tokens_per_expert = vec![Vec::new(); routed];
        let mut counts = vec![0; experts];
        let mut choices = Vec::with_capacity(probs.len());
        for (token, row) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(k);
            for &e in &order {
                counts[e] += 1;
                if e < routed {
                    tokens_per_expert[e].push(token as u32);
                }
            }
            choices.push(order);
        }
        Self { choices, tokens_per_expert, counts }
    }

    /// A `[tokens * experts]` 0/1 mask of the chosen experts.
    pub fn selection_mask(&self, experts: usize) -> Vec<f32> {
        let mut mask = vec![0.0; self.choices.len() * experts];
        for (token, chosen) in self.choices.iter().enumerate() {
            for &e in chosen {
                mask[token * experts + e] = 1.0;
            }
        }
        mask
    }
}

fn rms_norm(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    Ok(ops::rms_norm(x, gain, NORM_EPS)?)
}

/// Block-sparse causal mask `[b, heads, t, t]`: each query block sees its own block (causally),
/// the first block, and the `top_blocks` earlier blocks whose mean key best matches the block's
/// mean query. Selection is made on the host and is not differentiated (as in LongCat Sparse
/// Attention's block selection); the mask is then applied to dense scores.
fn block_sparse_mask(
    q: &Tensor,
    k: &Tensor,
    block: usize,
    top_blocks: usize,
    device: &Device,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let blocks = t / block;
    // Mean query/key per block: [b, nh, blocks, hd].
    let qm = q.reshape((b, nh, blocks, block, hd))?.mean(3)?.to_dtype(DType::F32)?;
    let km = k.reshape((b, nh, blocks, block, hd))?.mean(3)?.to_dtype(DType::F32)?;
    let block_scores = qm.matmul(&km.t()?)?.flatten_all()?.to_vec1::<f32>()?; // [b, nh, blocks, blocks]
    let mut mask = vec![MASKED; b * nh * t * t];
    for bh in 0..b * nh {
        for qb in 0..blocks {
            let row = &block_scores[(bh * blocks + qb) * blocks..(bh * blocks + qb + 1) * blocks];
            let mut earlier: Vec<usize> = (1..qb).collect();
            earlier.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
            earlier.truncate(top_blocks);
            earlier.push(0);
            earlier.push(qb);
            for kb in earlier {
                for qi in qb * block..(qb + 1) * block {
                    for ki in kb * block..((kb + 1) * block).min(qi + 1) {
                        mask[(bh * t + qi) * t + ki] = 0.0;
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (b, nh, t, t), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ninelives_core::job::ModelPreset;

    #[test]
    fn routing_takes_top_k_and_breaks_ties_low() {
        let probs = vec![vec![0.1, 0.4, 0.4, 0.1], vec![0.7, 0.1, 0.1, 0.1]];
        let plan = RoutingPlan::top_k(&probs, 2, 3);
        assert_eq!(plan.choices, vec![vec![1, 2], vec![0, 1]]);
        assert_eq!(plan.tokens_per_expert, vec![vec![1], vec![0, 1], vec![0]]);
        assert_eq!(plan.counts, vec![1, 2, 1, 0]);
    }

    #[test]
    fn a_model_without_an_expert_says_which_one_is_missing() {
        let dims = ModelDims::preset(ModelPreset::Tiny);
        let held = [ExpertId::new(0, 0)];
        let model = MoeTransformer::initialize(dims, 1, Some(&held)).unwrap();
        assert_eq!(model.held_experts(), held);
        let batch = crate::data::Corpus::from_bytes(vec![b'a'; 1000]).micro_batch(1, 0, 0, 1, 64);
        let err = model.forward(&batch, LossWeights { aux: 0.0, z: 0.0 }).unwrap_err();
        assert!(err.to_string().contains("not held by this worker"), "{err}");
    }
}
