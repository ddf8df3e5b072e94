//! AdamW with linear warmup and cosine (or linear/constant) decay, and global-norm clipping.
//!
//! The update runs on host vectors in plain element order, so it is bit-deterministic and its
//! state (two moments per parameter) is exactly what a checkpoint stores. Parameters are updated
//! in parallel (each one by one thread, in element order), and the global norm adds per-parameter
//! sums in name order, so neither depends on the thread count.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use ninelives_core::job::{LearningRateSpec, ScheduleKind, TrainingSpec};
use rayon::prelude::*;

use crate::error::{Result, WorkerError};
use crate::model::MoeTransformer;
use crate::params::{ExpertId, ParamOwner, ParamSpec, param_specs};

/// Gradients by parameter name (defined with the parameter names in [`crate::params`]).
pub use crate::params::Gradients;

/// The learning rate at a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    spec: LearningRateSpec,
    total_steps: u64,
}

impl Schedule {
    /// A schedule over `total_steps` optimizer steps.
    pub fn new(spec: LearningRateSpec, total_steps: u64) -> Self {
        Self { spec, total_steps }
    }

    /// Learning rate of the update made at `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let s = &self.spec;
        if step < s.warmup_steps {
            return s.peak * (step + 1) as f64 / s.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(s.warmup_steps).max(1) as f64;
        let progress = ((step - s.warmup_steps) as f64 / span).min(1.0);
        match s.schedule {
            ScheduleKind::Cosine => {
                s.min + (s.peak - s.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Linear => s.peak - (s.peak - s.min) * progress,
            ScheduleKind::Constant => s.peak,
        }
    }
}

/// Adam's two moments of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// First moment (mean of gradients).
    pub m: Vec<f32>,
    /// Second moment (mean of squared gradients).
    pub v: Vec<f32>,
}

/// What one optimizer update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateReport {
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over a name-keyed parameter set.
#[derive(Clone, Debug)]
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    weight_decay: f64,
    grad_clip: f64,
    schedule: Schedule,
    decays: BTreeMap<String, bool>,
    moments: BTreeMap<String, Moments>,
}

impl AdamW {
    /// An optimizer with zero moments for every parameter `model` holds.
    pub fn new(training: &TrainingSpec, total_steps: u64, model: &MoeTransformer) -> Self {
        let specs: BTreeMap<String, ParamSpec> =
            param_specs(model.dims()).into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut decays = BTreeMap::new();
        let mut moments = BTreeMap::new();
        for (name, var) in model.params() {
            let n = var.elem_count();
            decays.insert(name.clone(), specs.get(name).is_some_and(ParamSpec::decays));
            moments.insert(name.clone(), Moments { m: vec![0.0; n], v: vec![0.0; n] });
        }
        Self {
            beta1: training.adamw.beta1,
            beta2: training.adamw.beta2,
            epsilon: training.adamw.epsilon,
            weight_decay: training.adamw.weight_decay,
            grad_clip: training.grad_clip,
            schedule: Schedule::new(training.learning_rate.clone(), total_steps),
            decays,
            moments,
        }
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Moments by parameter name.
    pub fn moments(&self) -> &BTreeMap<String, Moments> {
        &self.moments
    }

    /// Replaces the moments of `name` (restore from a checkpoint).
    pub fn set_moments(&mut self, name: &str, moments: Moments) -> Result<()> {
        let slot = self
            .moments
            .get_mut(name)
            .ok_or_else(|| WorkerError::InvalidJob(format!("no optimizer state for {name}")))?;
        if slot.m.len() != moments.m.len() || slot.v.len() != moments.v.len() {
            return Err(WorkerError::InvalidJob(format!("optimizer state of {name} has the wrong size")));
        }
        *slot = moments;
        Ok(())
    }

    /// Every parameter's moments, for overwriting in place (a checkpoint restored into a live
    /// trainer).
    pub(crate) fn moments_mut(&mut self) -> impl Iterator<Item = (&String, &mut Moments)> {
        self.moments.iter_mut()
    }

    /// Drops the state of the routed experts not in `experts` (see
    /// [`MoeTransformer::retain_experts`]).
    pub fn retain_experts(&mut self, experts: &[ExpertId]) {
        self.moments.retain(|name, _| ParamOwner::of(name).kept_with(experts));
        self.decays.retain(|name, _| ParamOwner::of(name).kept_with(experts));
    }

    /// Sum of squares of one parameter's gradient, in element order, in f64: the per-parameter
    /// partial of the global norm. Expert-parallel workers each compute the partials of the
    /// parameters they own and exchange them.
    pub fn norm_partial(grad: &[f32]) -> f64 {
        grad.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()
    }

    /// Per-parameter partials of `grads`, computed in parallel (each one by one thread, in
    /// element order, so the values do not depend on the thread count).
    pub fn norm_partials(grads: &Gradients) -> BTreeMap<String, f64> {
        let grads: Vec<(&String, &Vec<f32>)> = grads.iter().collect();
        grads.par_iter().map(|(name, g)| ((*name).clone(), Self::norm_partial(g))).collect()
    }

    /// Global L2 norm from per-parameter partials, summed in name order (deterministic, and the
    /// same whether the partials were computed in one process or many).
    pub fn norm_from_partials(partials: &BTreeMap<String, f64>) -> f64 {
        partials.values().sum::<f64>().sqrt()
    }

    /// Global L2 norm of `grads`: per-parameter partials (in parallel) summed in name order.
    pub fn global_norm(grads: &Gradients) -> f64 {
        Self::norm_from_partials(&Self::norm_partials(grads))
    }

    /// Applies the update of `step` (0-based) with the mean gradients `grads`.
    /// Parameters without a gradient (an expert no token reached) still decay and move by
    /// their moments, as in PyTorch with zero gradients.
    pub fn update(&mut self, model: &MoeTransformer, step: u64, grads: &Gradients) -> Result<UpdateReport> {
        self.update_with_norm(model, step, grads, Self::global_norm(grads))
    }

    /// [`AdamW::update`] with the global gradient norm given: an expert-parallel worker holds
    /// the gradients of only some parameters, and the norm clipping needs all of them.
    pub fn update_with_norm(
        &mut self,
        model: &MoeTransformer,
        step: u64,
        grads: &Gradients,
        grad_norm: f64,
    ) -> Result<UpdateReport> {
        if !grad_norm.is_finite() {
            return Err(WorkerError::Diverged { step, what: format!("gradient norm {grad_norm}") });
        }
        let clip = if grad_norm > self.grad_clip { (self.grad_clip / grad_norm) as f32 } else { 1.0 };
        let lr = self.schedule.lr(step);
        let t = (step + 1) as i32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2 = 1.0 - self.beta2.powi(t);
        let step_size = (lr / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let eps = self.epsilon as f32;
        let params = model.params();
        let mut work: Vec<(&String, &Var, &mut Moments, f32)> = Vec::with_capacity(self.moments.len());
        for (name, state) in self.moments.iter_mut() {
            let Some(var) = params.get(name) else { continue };
            let decay = if self.decays.get(name).copied().unwrap_or(false) {
                (lr * self.weight_decay) as f32
            } else {
                0.0
            };
            work.push((name, var, state, decay));
        }
        // Each parameter by one thread, in element order: bit-identical for any thread count.
        work.into_par_iter()
            .map(|(name, var, state, decay)| -> Result<()> {
                let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let g = grads.get(name);
                if g.is_some_and(|g| g.len() != p.len()) {
                    return Err(WorkerError::InvalidJob(format!("gradient of {name} has the wrong size")));
                }
                if state.m.len() != p.len() || state.v.len() != p.len() {
                    return Err(WorkerError::InvalidJob(format!(
                        "optimizer state of {name} has the wrong size"
                    )));
                }
                // Zipped iterators, no indexing: the loop compiles without bounds checks.
                let update = |(((p, m), v), g): (((&mut f32, &mut f32), &mut f32), f32)| {
                    let gi = g * clip;
                    *m = b1 * *m + (1.0 - b1) * gi;
                    *v = b2 * *v + (1.0 - b2) * gi * gi;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p -= decay * *p + step_size * *m / denom;
                };
                let moments = p.iter_mut().zip(state.m.iter_mut()).zip(state.v.iter_mut());
                match g {
                    Some(g) => moments.zip(g.iter().copied()).for_each(update),
                    None => moments.zip(std::iter::repeat(0.0)).for_each(update),
                }
                var.set(&Tensor::from_vec(p, var.dims(), var.device())?)?;
                Ok(())
            })
            .collect::<Result<Vec<()>>>()?;
        Ok(UpdateReport { lr, grad_norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let spec = LearningRateSpec { peak: 1.0, min: 0.1, warmup_steps: 10, schedule: ScheduleKind::Cosine };
        let s = Schedule::new(spec, 110);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
    }
}
