//! Routed experts: one fused op per MoE layer, and the SwiGLU kernels every expert runs with.
//!
//! Why a fused op: composed from candle ops, each routed expert of a layer cost an
//! `index_select`, its SwiGLU, a gate multiply and an `index_add` that copies the whole
//! `[tokens, hidden]` output — 16 copies per layer in the forward and again in the backward,
//! plus a zero tensor and an add per gradient accumulation, all on one thread per expert.
//! [`RoutedExpertsOp`] gathers each expert's tokens once, runs the experts in parallel, and
//! combines their outputs per token in expert order (so the sums are the same for any thread
//! count); its backward does the same in reverse with hand-written SwiGLU derivatives.
//!
//! Where an expert runs is behind [`RemoteExperts`]: [`LocalExperts`] runs it with this
//! process's weights, the expert-parallel requester asks its owner, who runs the very same
//! [`swiglu_forward`] / [`swiglu_backward`] kernels. Both paths therefore compute identical
//! bits: one member and W members give the same parameters as one process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Result, WorkerError};
use crate::ops::{f32s, host_values, row_major};
use crate::params::{ExpertId, Gradients, expert_prefix};

/// One routed-expert evaluation inside a step: the unit of the expert-parallel all-to-all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertCall {
    /// Micro-batch index within the step.
    pub micro: u32,
    /// Layer.
    pub layer: u32,
    /// Routed expert within the layer.
    pub expert: u32,
}

impl ExpertCall {
    /// The expert evaluated.
    pub fn expert_id(&self) -> ExpertId {
        ExpertId::new(self.layer, self.expert)
    }
}

/// Routed experts evaluated wherever they live (issue 7's all-to-all).
///
/// `forward` receives the tokens routed to one expert (`[rows, hidden]`, row-major) and returns
/// the expert's output; `backward` receives the gradient of that output and returns the gradient
/// of the input, while whoever computed the expert keeps its weight gradients. Both are called
/// from inside candle's forward and backward passes, so they block until the answer is in.
pub trait RemoteExperts: Send + Sync {
    /// Expert output for `x`.
    fn forward(&self, call: ExpertCall, rows: usize, x: Vec<f32>) -> Result<Vec<f32>>;
    /// Input gradient for output gradient `dy` of an earlier `forward` of the same call.
    fn backward(&self, call: ExpertCall, rows: usize, dy: Vec<f32>) -> Result<Vec<f32>>;
    /// Every call of one layer; results in the order of `calls`. Sequential unless the
    /// implementation can do better.
    fn forward_many(&self, calls: Vec<(ExpertCall, usize, Vec<f32>)>) -> Result<Vec<Vec<f32>>> {
        calls.into_iter().map(|(call, rows, x)| self.forward(call, rows, x)).collect()
    }
    /// Every backward of one layer; results in the order of `calls`.
    fn backward_many(&self, calls: Vec<(ExpertCall, usize, Vec<f32>)>) -> Result<Vec<Vec<f32>>> {
        calls.into_iter().map(|(call, rows, dy)| self.backward(call, rows, dy)).collect()
    }
}

/// One expert's weights, shared with the model's variables (no copy, no autograd tracking).
#[derive(Clone)]
pub struct ExpertWeights {
    /// `[ffn, hidden]`.
    pub w_gate: Tensor,
    /// `[ffn, hidden]`.
    pub w_up: Tensor,
    /// `[hidden, ffn]`.
    pub w_down: Tensor,
}

impl ExpertWeights {
    fn ffn(&self) -> Result<usize> {
        Ok(self.w_gate.dim(0)?)
    }
}

/// What a SwiGLU forward keeps for its backward.
pub struct SwigluSaved {
    rows: usize,
    hidden: usize,
    x: Vec<f32>,
    gate: Vec<f32>,
    /// sigmoid(gate), kept so the backward needs no second `exp`.
    sig: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

impl SwigluSaved {
    /// Rows (tokens) of the forward.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Hidden size of the forward.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// Weight gradients of one expert call: `(w_gate, w_up, w_down)`, flattened.
pub type ExpertGrads = [Vec<f32>; 3];

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Runs `f` on a contiguous f32 CPU tensor's values, without copying them.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(WorkerError::InvalidJob("expert weight is not contiguous".into()));
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(values)) => Ok(f(&values[start..end])),
        _ => Err(WorkerError::InvalidJob("expert weight is not an f32 CPU tensor".into())),
    }
}

/// `dst = lhs · rhs` (or `+=` when `add`), single-threaded: experts already run in parallel.
fn matmul_into(
    dst: &mut [f32],
    rows: usize,
    cols: usize,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    add: bool,
) {
    let dst = MatMut::from_row_major_slice_mut(dst, rows, cols);
    let accum = if add { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(dst, accum, lhs, rhs, 1.0f32, Par::Seq);
}

/// One expert's SwiGLU on `x` (`[rows, hidden]`): `(silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ`.
pub fn swiglu_forward(x: Vec<f32>, rows: usize, w: &ExpertWeights) -> Result<(Vec<f32>, SwigluSaved)> {
    let hidden = w.w_gate.dim(1)?;
    if x.len() != rows * hidden {
        return Err(WorkerError::InvalidJob(format!(
            "expert input of {} values for {rows} rows of {hidden}",
            x.len()
        )));
    }
    let ffn = w.ffn()?;
    let xm = row_major(&x, rows, hidden);
    let mut gate = vec![0.0f32; rows * ffn];
    let mut up = vec![0.0f32; rows * ffn];
    with_values(&w.w_gate, |wg| {
        matmul_into(&mut gate, rows, ffn, xm, row_major(wg, ffn, hidden).transpose(), false)
    })?;
    with_values(&w.w_up, |wu| {
        matmul_into(&mut up, rows, ffn, xm, row_major(wu, ffn, hidden).transpose(), false)
    })?;
    let sig: Vec<f32> = gate.iter().map(|&g| sigmoid(g)).collect();
    let act: Vec<f32> = gate.iter().zip(&sig).zip(&up).map(|((&g, &s), &u)| g * s * u).collect();
    let mut y = vec![0.0f32; rows * hidden];
    with_values(&w.w_down, |wd| {
        matmul_into(
            &mut y,
            rows,
            hidden,
            row_major(&act, rows, ffn),
            row_major(wd, hidden, ffn).transpose(),
            false,
        )
    })?;
    Ok((y, SwigluSaved { rows, hidden, x, gate, sig, up, act }))
}

/// Backward of [`swiglu_forward`] for output gradient `dy` (`[rows, hidden]`): the input
/// gradient and the weight gradients.
pub fn swiglu_backward(
    saved: &SwigluSaved,
    w: &ExpertWeights,
    dy: Vec<f32>,
) -> Result<(Vec<f32>, ExpertGrads)> {
    let (rows, hidden) = (saved.rows, saved.hidden);
    if dy.len() != rows * hidden {
        return Err(WorkerError::InvalidJob(format!(
            "expert output gradient of {} values for {rows} rows",
            dy.len()
        )));
    }
    let ffn = w.ffn()?;
    let dym = row_major(&dy, rows, hidden);
    let mut d_act = vec![0.0f32; rows * ffn];
    with_values(&w.w_down, |wd| matmul_into(&mut d_act, rows, ffn, dym, row_major(wd, hidden, ffn), false))?;
    let mut d_down = vec![0.0f32; hidden * ffn];
    matmul_into(&mut d_down, hidden, ffn, dym.transpose(), row_major(&saved.act, rows, ffn), false);
    let mut d_gate = Vec::with_capacity(d_act.len());
    let mut d_up = Vec::with_capacity(d_act.len());
    for (((&da, &g), &s), &u) in d_act.iter().zip(&saved.gate).zip(&saved.sig).zip(&saved.up) {
        let silu = g * s;
        d_gate.push(da * u * (s * (1.0 + g * (1.0 - s))));
        d_up.push(da * silu);
    }
    let (dg, du) = (row_major(&d_gate, rows, ffn), row_major(&d_up, rows, ffn));
    let mut dx = vec![0.0f32; rows * hidden];
    with_values(&w.w_gate, |wg| matmul_into(&mut dx, rows, hidden, dg, row_major(wg, ffn, hidden), false))?;
    with_values(&w.w_up, |wu| matmul_into(&mut dx, rows, hidden, du, row_major(wu, ffn, hidden), true))?;
    let xm = row_major(&saved.x, rows, hidden);
    let mut d_wg = vec![0.0f32; ffn * hidden];
    let mut d_wu = vec![0.0f32; ffn * hidden];
    matmul_into(&mut d_wg, ffn, hidden, dg.transpose(), xm, false);
    matmul_into(&mut d_wu, ffn, hidden, du.transpose(), xm, false);
    Ok((dx, [d_wg, d_wu, d_down]))
}

fn poisoned() -> WorkerError {
    WorkerError::InvalidJob("expert state lock poisoned".into())
}

/// Experts run in this process with its own weights, in parallel; weight gradients are kept
/// per expert until [`LocalExperts::take_grads`].
pub struct LocalExperts {
    weights: BTreeMap<ExpertId, ExpertWeights>,
    saved: Mutex<HashMap<ExpertCall, SwigluSaved>>,
    grads: Mutex<BTreeMap<ExpertId, ExpertGrads>>,
}

impl std::fmt::Debug for LocalExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExperts").field("experts", &self.weights.keys().collect::<Vec<_>>()).finish()
    }
}

impl LocalExperts {
    /// Experts with these weights.
    pub fn new(weights: BTreeMap<ExpertId, ExpertWeights>) -> Self {
        Self { weights, saved: Mutex::default(), grads: Mutex::default() }
    }

    fn weights(&self, id: ExpertId) -> Result<&ExpertWeights> {
        self.weights
            .get(&id)
            .ok_or_else(|| WorkerError::InvalidJob(format!("expert {id} is not held by this worker")))
    }

    /// The weight gradients of every backward so far, by expert.
    pub fn take_grads(&self) -> Result<BTreeMap<ExpertId, ExpertGrads>> {
        Ok(std::mem::take(&mut *self.grads.lock().map_err(|_| poisoned())?))
    }
}

impl RemoteExperts for LocalExperts {
    fn forward(&self, call: ExpertCall, rows: usize, x: Vec<f32>) -> Result<Vec<f32>> {
        let (y, saved) = swiglu_forward(x, rows, self.weights(call.expert_id())?)?;
        self.saved.lock().map_err(|_| poisoned())?.insert(call, saved);
        Ok(y)
    }

    fn backward(&self, call: ExpertCall, _rows: usize, dy: Vec<f32>) -> Result<Vec<f32>> {
        let saved =
            self.saved.lock().map_err(|_| poisoned())?.remove(&call).ok_or_else(|| {
                WorkerError::InvalidJob(format!("backward of {call:?} without its forward"))
            })?;
        let (dx, grads) = swiglu_backward(&saved, self.weights(call.expert_id())?, dy)?;
        self.grads.lock().map_err(|_| poisoned())?.insert(call.expert_id(), grads);
        Ok(dx)
    }

    fn forward_many(&self, calls: Vec<(ExpertCall, usize, Vec<f32>)>) -> Result<Vec<Vec<f32>>> {
        calls.into_par_iter().map(|(call, rows, x)| self.forward(call, rows, x)).collect()
    }

    fn backward_many(&self, calls: Vec<(ExpertCall, usize, Vec<f32>)>) -> Result<Vec<Vec<f32>>> {
        calls.into_par_iter().map(|(call, rows, dy)| self.backward(call, rows, dy)).collect()
    }
}

/// Adds expert weight gradients to a gradient map under the parameter names.
pub fn insert_expert_grads(into: &mut Gradients, grads: BTreeMap<ExpertId, ExpertGrads>) {
    for (id, [gate, up, down]) in grads {
        let prefix = expert_prefix(id);
        into.insert(format!("{prefix}w_gate"), gate);
        into.insert(format!("{prefix}w_up"), up);
        into.insert(format!("{prefix}w_down"), down);
    }
}

/// The routed experts of one MoE layer as one candle op over `(x [tokens, hidden],
/// gates [tokens, routed])`: `out[t] = Σ_e gates[t, e] · expert_e(x[t])` over the experts `t`
/// was routed to, in ascending expert order.
pub struct RoutedExpertsOp {
    /// Where the experts run.
    pub experts: Arc<dyn RemoteExperts>,
    /// Micro-batch index (part of every call's identity).
    pub micro: u32,
    /// Layer.
    pub layer: u32,
    /// For each routed expert, its tokens, ascending.
    pub tokens_per_expert: Vec<Vec<u32>>,
    /// Expert outputs of the forward, kept for the gates' gradient.
    outputs: Mutex<Vec<Vec<f32>>>,
}

impl RoutedExpertsOp {
    /// The op for one layer of one micro-batch.
    pub fn new(
        experts: Arc<dyn RemoteExperts>,
        micro: u32,
        layer: u32,
        tokens_per_expert: Vec<Vec<u32>>,
    ) -> Self {
        Self { experts, micro, layer, tokens_per_expert, outputs: Mutex::default() }
    }

    /// The experts with tokens, in order.
    fn active(&self) -> impl Iterator<Item = (usize, &Vec<u32>)> {
        self.tokens_per_expert.iter().enumerate().filter(|(_, t)| !t.is_empty())
    }

    fn call(&self, expert: usize) -> ExpertCall {
        ExpertCall { micro: self.micro, layer: self.layer, expert: expert as u32 }
    }

    /// For every token, the `(active expert slot, row)` pairs it was routed to, in expert order.
    fn routes(&self, tokens: usize) -> Vec<Vec<(usize, usize)>> {
        let mut routes = vec![Vec::new(); tokens];
        for (slot, (_, ids)) in self.active().enumerate() {
            for (row, &t) in ids.iter().enumerate() {
                routes[t as usize].push((slot, row));
            }
        }
        routes
    }
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `(token, d gate)` of one expert's tokens.
type GateGrads = Vec<(usize, f32)>;

impl candle_core::CustomOp2 for RoutedExpertsOp {
    fn name(&self) -> &'static str {
        "routed-experts"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_layout: &Layout,
        gs: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(xs, x_layout, "routed experts")?;
        let gates = f32s(gs, g_layout, "routed experts")?;
        let (tokens, hidden) = x_layout.shape().dims2()?;
        let routed = self.tokens_per_expert.len();
        if g_layout.shape().dims2()? != (tokens, routed) {
            return Err(msg(format!(
                "routed experts: gates are {:?}, need [{tokens}, {routed}]",
                g_layout.dims()
            )));
        }
        let calls = self
            .active()
            .map(|(e, ids)| {
                let mut rows = Vec::with_capacity(ids.len() * hidden);
                for &t in ids {
                    let t = t as usize;
                    rows.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
                }
                (self.call(e), ids.len(), rows)
            })
            .collect();
        let outputs = self.experts.forward_many(calls).map_err(msg)?;
        let experts: Vec<usize> = self.active().map(|(e, _)| e).collect();
        let routes = self.routes(tokens);
        let mut out = vec![0.0f32; tokens * hidden];
        out.par_chunks_mut(hidden).zip(&routes).enumerate().for_each(|(t, (acc, route))| {
            for &(slot, row) in route {
                let g = gates[t * routed + experts[slot]];
                for (a, &y) in acc.iter_mut().zip(&outputs[slot][row * hidden..(row + 1) * hidden]) {
                    *a += g * y;
                }
            }
        });
        *self.outputs.lock().map_err(|_| msg("routed experts: lock poisoned"))? = outputs;
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gates: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (tokens, hidden) = x.dims2()?;
        let routed = self.tokens_per_expert.len();
        let d_out = host_values(grad_res)?;
        let gate_values = host_values(gates)?;
        let outputs =
            std::mem::take(&mut *self.outputs.lock().map_err(|_| msg("routed experts: lock poisoned"))?);
        let active: Vec<(usize, &Vec<u32>)> = self.active().collect();
        if outputs.len() != active.len() {
            return Err(msg("routed experts: backward without its forward"));
        }
        // Per expert: the gates' gradient (y · dOut per routed token) and the output gradient
        // handed to the expert (gate · dOut).
        let per_expert: Vec<(GateGrads, Vec<f32>)> = active
            .par_iter()
            .zip(&outputs)
            .map(|(&(e, ids), y)| {
                let mut d_gates = Vec::with_capacity(ids.len());
                let mut dy = Vec::with_capacity(ids.len() * hidden);
                for (row, &t) in ids.iter().enumerate() {
                    let t = t as usize;
                    let d = &d_out[t * hidden..(t + 1) * hidden];
                    let yr = &y[row * hidden..(row + 1) * hidden];
                    d_gates.push((t, yr.iter().zip(d).map(|(a, b)| a * b).sum::<f32>()));
                    let g = gate_values[t * routed + e];
                    dy.extend(d.iter().map(|v| g * v));
                }
                (d_gates, dy)
            })
            .collect();
        let mut d_gates = vec![0.0f32; tokens * routed];
        let mut calls = Vec::with_capacity(active.len());
        for (&(e, ids), (dg, dy)) in active.iter().zip(per_expert) {
            for (t, v) in dg {
                d_gates[t * routed + e] = v;
            }
            calls.push((self.call(e), ids.len(), dy));
        }
        let dxs = self.experts.backward_many(calls).map_err(msg)?;
        let routes = self.routes(tokens);
        let mut dx = vec![0.0f32; tokens * hidden];
        dx.par_chunks_mut(hidden).zip(&routes).for_each(|(acc, route)| {
            for &(slot, row) in route {
                for (a, &v) in acc.iter_mut().zip(&dxs[slot][row * hidden..(row + 1) * hidden]) {
                    *a += v;
                }
            }
        });
        let dx = Tensor::from_vec(dx, (tokens, hidden), x.device())?;
        let d_gates = Tensor::from_vec(d_gates, (tokens, routed), gates.device())?;
        Ok((Some(dx), Some(d_gates)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use candle_core::{Device, Var};

    use super::*;

    fn seq(n: usize, mul: f32, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + salt) * 37 % 101) as f32 / 50.0 - 1.0) * mul).collect()
    }

    fn host_of(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The fused op (value, input, gate and weight gradients) against the same layer composed
    /// from candle ops with candle's autograd: the formulation it replaced.
    #[test]
    fn the_fused_layer_matches_the_composed_experts_and_their_gradients() {
        let (tokens, hidden, ffn, routed) = (11, 6, 5, 4);
        let dev = Device::Cpu;
        let x = Var::from_vec(seq(tokens * hidden, 1.0, 0), (tokens, hidden), &dev).unwrap();
        // Each token to two experts (one of them possibly absent from the plan).
        let mut tokens_per_expert = vec![Vec::new(); routed];
        let mut gate_values = vec![0.0f32; tokens * routed];
        for t in 0..tokens {
            for e in [t % 3, 3 - (t % 2)] {
                if !tokens_per_expert[e].contains(&(t as u32)) {
                    tokens_per_expert[e].push(t as u32);
                    gate_values[t * routed + e] = 0.1 + 0.05 * (t + e) as f32;
                }
            }
        }
        tokens_per_expert.iter_mut().for_each(|ids| ids.sort_unstable());
        let gates = Var::from_vec(gate_values, (tokens, routed), &dev).unwrap();
        let weights: Vec<[Var; 3]> = (0..routed)
            .map(|e| {
                [
                    Var::from_vec(seq(ffn * hidden, 0.5, 10 + e), (ffn, hidden), &dev).unwrap(),
                    Var::from_vec(seq(ffn * hidden, 0.5, 20 + e), (ffn, hidden), &dev).unwrap(),
                    Var::from_vec(seq(hidden * ffn, 0.5, 30 + e), (hidden, ffn), &dev).unwrap(),
                ]
            })
            .collect();
        let probe = Tensor::from_vec(seq(tokens * hidden, 1.0, 7), (tokens, hidden), &dev).unwrap();

        // Composed reference.
        let mut reference = x.as_tensor().zeros_like().unwrap();
        for (e, ids) in tokens_per_expert.iter().enumerate().filter(|(_, ids)| !ids.is_empty()) {
            let idx = Tensor::from_slice(ids, ids.len(), &dev).unwrap();
            let xe = x.as_tensor().index_select(&idx, 0).unwrap();
            let [wg, wu, wd] = &weights[e];
            let gate = xe.matmul(&wg.as_tensor().t().unwrap()).unwrap().silu().unwrap();
            let up = xe.matmul(&wu.as_tensor().t().unwrap()).unwrap();
            let y = (gate * up).unwrap().matmul(&wd.as_tensor().t().unwrap()).unwrap();
            let ge = gates
                .as_tensor()
                .t()
                .unwrap()
                .get(e)
                .unwrap()
                .index_select(&idx, 0)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            reference = reference.index_add(&idx, &y.broadcast_mul(&ge).unwrap(), 0).unwrap();
        }
        let ref_grads = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();

        // Fused.
        let local = Arc::new(LocalExperts::new(
            weights
                .iter()
                .enumerate()
                .map(|(e, [g, u, d])| {
                    let w = ExpertWeights {
                        w_gate: g.as_tensor().detach(),
                        w_up: u.as_tensor().detach(),
                        w_down: d.as_tensor().detach(),
                    };
                    (ExpertId::new(0, e as u32), w)
                })
                .collect(),
        ));
        let op = RoutedExpertsOp::new(local.clone(), 0, 0, tokens_per_expert.clone());
        let fused = x.as_tensor().apply_op2(gates.as_tensor(), op).unwrap();
        assert!(max_diff(&host_of(&fused), &host_of(&reference)) < 1e-5);
        let grads = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&x, &gates] {
            let (a, b) = (grads.get(var.as_tensor()).unwrap(), ref_grads.get(var.as_tensor()).unwrap());
            assert!(max_diff(&host_of(a), &host_of(b)) < 1e-5, "input or gate gradient differs");
        }
        let expert_grads = local.take_grads().unwrap();
        for (e, ids) in tokens_per_expert.iter().enumerate() {
            let got = expert_grads.get(&ExpertId::new(0, e as u32));
            if ids.is_empty() {
                assert!(got.is_none(), "an expert without tokens has no gradient");
                continue;
            }
            for (g, w) in got.unwrap().iter().zip(&weights[e]) {
                let want = host_of(ref_grads.get(w.as_tensor()).unwrap());
                assert!(max_diff(g, &want) < 1e-5, "weight gradient of expert {e} differs");
            }
        }
    }

    #[test]
    fn an_expert_that_is_not_held_is_a_clear_error() {
        let local = LocalExperts::new(BTreeMap::new());
        let call = ExpertCall { micro: 0, layer: 1, expert: 2 };
        let err = local.forward(call, 1, vec![0.0; 4]).unwrap_err().to_string();
        assert!(err.contains("not held"), "{err}");
        let err = local.backward(call, 1, vec![0.0; 4]).unwrap_err().to_string();
        assert!(err.contains("without its forward"), "{err}");
    }
}
