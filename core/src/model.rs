//! Resolved model dimensions: a [`ModelSpec`] with its preset applied.

use serde::{Deserialize, Serialize};

use crate::job::{ModelPreset, ModelSpec, SparseAttentionSpec};

/// Bytes of training state per expert parameter: bf16 weight + bf16 gradient + fp32 master
/// weight + two fp32 Adam moments (2 + 2 + 4 + 4 + 4).
pub const STATE_BYTES_PER_PARAM: u64 = 16;

/// Every dimension of the model, with no optional fields left.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelDims {
    /// Transformer blocks (each with an MoE layer).
    pub layers: u32,
    /// Model width.
    pub hidden_size: u32,
    /// Attention heads.
    pub heads: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Routed experts per layer.
    pub routed_experts: u32,
    /// Zero-computation (identity) experts per layer.
    pub zero_experts: u32,
    /// Experts chosen per token.
    pub top_k: u32,
    /// SwiGLU inner width of one expert.
    pub expert_ffn_size: u32,
    /// Sequence length.
    pub seq_len: u32,
    /// Block-sparse attention, if enabled.
    pub sparse_attention: Option<SparseAttentionSpec>,
}

impl ModelDims {
    /// The dimensions of a preset.
    pub fn preset(preset: ModelPreset) -> Self {
        match preset {
            // ~1.9 M parameters.
            ModelPreset::Tiny => ModelDims {
                layers: 4,
                hidden_size: 128,
                heads: 4,
                vocab_size: 256,
                routed_experts: 8,
                zero_experts: 2,
                top_k: 2,
                expert_ffn_size: 128,
                seq_len: 64,
                sparse_attention: None,
            },
            // ~38 M parameters.
            ModelPreset::Small => ModelDims {
                layers: 6,
                hidden_size: 320,
                heads: 5,
                vocab_size: 256,
                routed_experts: 16,
                zero_experts: 4,
                top_k: 4,
                expert_ffn_size: 384,
                seq_len: 256,
                sparse_attention: None,
            },
            // LongCat-2.0 class: 60 MoE layers x (512 routed + 256 zero-computation) experts,
            // top-12, ~1.6 T parameters, 1M-token context with block-sparse attention.
            ModelPreset::LongCat2 => ModelDims {
                layers: 60,
                hidden_size: 6144,
                heads: 64,
                vocab_size: 131_072,
                routed_experts: 512,
                zero_experts: 256,
                top_k: 12,
                expert_ffn_size: 2816,
                seq_len: 1_048_576,
                sparse_attention: Some(SparseAttentionSpec { block_size: 128, top_blocks: 64 }),
            },
        }
    }

    /// Applies a spec: the preset's values, overridden by every field the spec sets.
    /// Returns the names of dimensions that are neither set nor given by a preset.
    pub fn resolve(spec: &ModelSpec) -> Result<Self, Vec<&'static str>> {
        let base = spec.preset.map(Self::preset);
        let mut missing = Vec::new();
        let mut pick = |name: &'static str, explicit: Option<u32>, preset: Option<u32>| {
            explicit.or(preset).unwrap_or_else(|| {
                missing.push(name);
                0
            })
        };
        let dims = ModelDims {
            layers: pick("layers", spec.layers, base.map(|b| b.layers)),
            hidden_size: pick("hiddenSize", spec.hidden_size, base.map(|b| b.hidden_size)),
            heads: pick("heads", spec.heads, base.map(|b| b.heads)),
            vocab_size: pick("vocabSize", spec.vocab_size, base.map(|b| b.vocab_size)),
            routed_experts: pick("routedExperts", spec.routed_experts, base.map(|b| b.routed_experts)),
            // Zero-computation experts are optional even without a preset.
            zero_experts: spec.zero_experts.or(base.map(|b| b.zero_experts)).unwrap_or(0),
            top_k: pick("topK", spec.top_k, base.map(|b| b.top_k)),
            expert_ffn_size: pick("expertFfnSize", spec.expert_ffn_size, base.map(|b| b.expert_ffn_size)),
            seq_len: pick("seqLen", spec.seq_len, base.map(|b| b.seq_len)),
            sparse_attention: spec.sparse_attention.or(base.and_then(|b| b.sparse_attention)),
        };
        if missing.is_empty() { Ok(dims) } else { Err(missing) }
    }

    /// Parameters of one routed SwiGLU expert (gate, up and down projections); saturates at
    /// `u64::MAX` for dimensions no machine holds (see [`ModelDims::checked_total_params`]).
    pub fn expert_params(&self) -> u64 {
        self.checked_expert_params().unwrap_or(u64::MAX)
    }

    fn checked_expert_params(&self) -> Option<u64> {
        3u64.checked_mul(u64::from(self.hidden_size))?.checked_mul(u64::from(self.expert_ffn_size))
    }

    /// Training-state bytes of one expert replica (see [`STATE_BYTES_PER_PARAM`]); saturating.
    pub fn expert_state_bytes(&self) -> u64 {
        self.expert_params().saturating_mul(STATE_BYTES_PER_PARAM)
    }

    /// Parameters outside the routed experts: embeddings, attention, norms, routers; saturating.
    pub fn dense_params(&self) -> u64 {
        self.checked_dense_params().unwrap_or(u64::MAX)
    }

    fn checked_dense_params(&self) -> Option<u64> {
        let h = u64::from(self.hidden_size);
        let v = u64::from(self.vocab_size);
        let experts = u64::from(self.routed_experts) + u64::from(self.zero_experts);
        let per_layer =
            h.checked_mul(h)?.checked_mul(4)?.checked_add(2 * h)?.checked_add(h.checked_mul(experts)?)?;
        v.checked_mul(h)?
            .checked_mul(2)?
            .checked_add(u64::from(self.layers).checked_mul(per_layer)?)?
            .checked_add(h)
    }

    /// All parameters; saturating.
    pub fn total_params(&self) -> u64 {
        self.checked_total_params().unwrap_or(u64::MAX)
    }

    /// All parameters, `None` when the count overflows a `u64`: dimensions come from manifests,
    /// so a product of them is never trusted to fit.
    pub fn checked_total_params(&self) -> Option<u64> {
        let routed = u64::from(self.layers)
            .checked_mul(u64::from(self.routed_experts))?
            .checked_mul(self.checked_expert_params()?)?;
        self.checked_dense_params()?.checked_add(routed)
    }

    /// Parameters a token touches on average: dense parts plus the routed share of its top-k
    /// (zero-computation experts cost nothing).
    pub fn active_params(&self) -> u64 {
        let all = u64::from(self.routed_experts) + u64::from(self.zero_experts);
        let routed_per_token = u64::from(self.top_k) * u64::from(self.routed_experts) / all.max(1);
        u64::from(self.layers)
            .saturating_mul(routed_per_token)
            .saturating_mul(self.expert_params())
            .saturating_add(self.dense_params())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_sizes() {
        let tiny = ModelDims::preset(ModelPreset::Tiny).total_params();
        assert!((1_000_000..=2_000_000).contains(&tiny), "tiny has {tiny} parameters");
        let small = ModelDims::preset(ModelPreset::Small).total_params();
        assert!((20_000_000..=50_000_000).contains(&small), "small has {small} parameters");
        let longcat = ModelDims::preset(ModelPreset::LongCat2);
        let total = longcat.total_params() as f64;
        assert!((1.5e12..1.75e12).contains(&total), "longcat-2.0 has {total:e} parameters");
        let active = longcat.active_params() as f64;
        assert!((2.5e10..6e10).contains(&active), "longcat-2.0 activates {active:e} parameters");
    }

    #[test]
    fn explicit_fields_override_the_preset() {
        let spec = ModelSpec { preset: Some(ModelPreset::Tiny), layers: Some(2), ..ModelSpec::default() };
        let dims = ModelDims::resolve(&spec).unwrap();
        assert_eq!(dims.layers, 2);
        assert_eq!(dims.hidden_size, 128);
    }

    #[test]
    fn parameter_counts_of_absurd_dimensions_saturate_or_are_none() {
        let huge = ModelDims {
            layers: u32::MAX,
            hidden_size: u32::MAX,
            vocab_size: u32::MAX,
            routed_experts: u32::MAX,
            expert_ffn_size: u32::MAX,
            ..ModelDims::preset(ModelPreset::Tiny)
        };
        assert_eq!(huge.checked_total_params(), None);
        assert_eq!(huge.total_params(), u64::MAX);
        assert_eq!(huge.expert_state_bytes(), u64::MAX);
        assert_eq!(huge.active_params(), u64::MAX);
        let tiny = ModelDims::preset(ModelPreset::Tiny);
        assert_eq!(tiny.checked_total_params(), Some(tiny.total_params()));
    }

    #[test]
    fn missing_dimensions_are_named() {
        let spec = ModelSpec { layers: Some(2), ..ModelSpec::default() };
        let missing = ModelDims::resolve(&spec).unwrap_err();
        assert_eq!(
            missing,
            ["hiddenSize", "heads", "vocabSize", "routedExperts", "topK", "expertFfnSize", "seqLen"]
        );
    }
}
