//! The model's parameters by name: the vocabulary the model, its experts, the optimizer and
//! checkpoints share.
//!
//! Every parameter has a name (`embed`, `layers.0.wq`, `layers.0.experts.3.w_gate`); the name says
//! who owns it ([`ParamOwner`]: the dense part or one routed expert, keyed by `(layer, expert)`,
//! never by rank), and [`param_specs`] gives each one's shape and deterministic initial value.
//! Values ([`HostTensor`]) and gradients ([`Gradients`]) travel between modules keyed by these
//! names. This module depends on no other module of the model, so every one of them can use it.

use std::collections::BTreeMap;

use ninelives_core::ModelDims;
use sha2::{Digest, Sha256};

use crate::rng::{KeyedStream, key, name_word};

/// Standard deviation of weight initialisation (GPT-2 style).
const INIT_STD: f64 = 0.02;

/// One routed expert of one layer: the unit of expert placement, checkpoint sharding and
/// load-time resharding (the planner's id, so placements and checkpoints name experts alike).
pub use ninelives_core::placement::ExpertId;

/// Every routed expert of a model, in (layer, expert) order.
pub fn all_experts(dims: &ModelDims) -> Vec<ExpertId> {
    (0..dims.layers).flat_map(|l| (0..dims.routed_experts).map(move |e| ExpertId::new(l, e))).collect()
}

/// The parameter-name prefix of an expert's tensors.
pub fn expert_prefix(id: ExpertId) -> String {
    format!("layers.{}.experts.{}.", id.layer, id.expert)
}

/// Who a parameter belongs to: the dense (data-parallel) part, or one routed expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamOwner {
    /// Embeddings, attention, norms, routers, output head.
    Dense,
    /// A routed expert's SwiGLU weights.
    Expert(ExpertId),
}

impl ParamOwner {
    /// Parses the owner from a parameter name.
    pub fn of(name: &str) -> Self {
        let mut parts = name.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("layers"), Some(l), Some("experts"), Some(e)) => match (l.parse(), e.parse()) {
                (Ok(layer), Ok(expert)) => ParamOwner::Expert(ExpertId { layer, expert }),
                _ => ParamOwner::Dense,
            },
            _ => ParamOwner::Dense,
        }
    }

    /// Whether a worker holding only the routed experts `experts` keeps this parameter (dense
    /// parameters are kept by every worker).
    pub fn kept_with(self, experts: &[ExpertId]) -> bool {
        match self {
            ParamOwner::Dense => true,
            ParamOwner::Expert(id) => experts.contains(&id),
        }
    }
}

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// All ones (norm gains).
    Ones,
    /// N(0, std²).
    Normal(f64),
}

/// Name, shape and initialisation of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Full parameter name.
    pub name: String,
    /// Tensor shape (`[out, in]` for projections).
    pub shape: Vec<usize>,
    init: Init,
}

impl ParamSpec {
    /// Elements in the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether decoupled weight decay applies (matrices yes; norm gains no).
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }

    /// The deterministic initial value: a pure function of `(seed, name)`.
    pub fn initial_value(&self, seed: u64) -> Vec<f32> {
        match self.init {
            Init::Ones => vec![1.0; self.numel()],
            Init::Normal(std) => {
                KeyedStream::new(key(&[seed, name_word(&self.name)])).normals(self.numel(), std)
            }
        }
    }
}

/// Every parameter of the model, in name order.
pub fn param_specs(dims: &ModelDims) -> Vec<ParamSpec> {
    let h = dims.hidden_size as usize;
    let v = dims.vocab_size as usize;
    let f = dims.expert_ffn_size as usize;
    let experts = dims.routed_experts as usize + dims.zero_experts as usize;
    // Residual-branch outputs are scaled down with depth (GPT-2).
    let out_std = INIT_STD / (2.0 * f64::from(dims.layers.max(1))).sqrt();
    let mut specs = vec![
        ParamSpec { name: "embed".into(), shape: vec![v, h], init: Init::Normal(INIT_STD) },
        ParamSpec { name: "final_norm".into(), shape: vec![h], init: Init::Ones },
        ParamSpec { name: "lm_head".into(), shape: vec![v, h], init: Init::Normal(INIT_STD) },
    ];
    for l in 0..dims.layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        specs.push(ParamSpec { name: p("attn_norm"), shape: vec![h], init: Init::Ones });
        specs.push(ParamSpec { name: p("wq"), shape: vec![h, h], init: Init::Normal(INIT_STD) });
        specs.push(ParamSpec { name: p("wk"), shape: vec![h, h], init: Init::Normal(INIT_STD) });
        specs.push(ParamSpec { name: p("wv"), shape: vec![h, h], init: Init::Normal(INIT_STD) });
        specs.push(ParamSpec { name: p("wo"), shape: vec![h, h], init: Init::Normal(out_std) });
        specs.push(ParamSpec { name: p("moe_norm"), shape: vec![h], init: Init::Ones });
        specs.push(ParamSpec { name: p("router"), shape: vec![experts, h], init: Init::Normal(INIT_STD) });
        for e in 0..dims.routed_experts {
            let x = |s: &str| format!("layers.{l}.experts.{e}.{s}");
            specs.push(ParamSpec { name: x("w_gate"), shape: vec![f, h], init: Init::Normal(INIT_STD) });
            specs.push(ParamSpec { name: x("w_up"), shape: vec![f, h], init: Init::Normal(INIT_STD) });
            specs.push(ParamSpec { name: x("w_down"), shape: vec![h, f], init: Init::Normal(out_std) });
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// A tensor's value on the host: the unit of snapshots, checkpoints and gradient exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major elements.
    pub data: Vec<f32>,
}

/// Gradients by parameter name (host vectors, flattened).
pub type Gradients = BTreeMap<String, Vec<f32>>;

/// The little-endian bytes of f32 values (the layout of parameter digests and of checkpoints).
pub fn le_bytes(values: &[f32]) -> &[u8] {
    #[cfg(not(target_endian = "little"))]
    compile_error!("parameter digests hash native f32 bytes and need a little-endian host");
    bytemuck::cast_slice(values)
}

/// sha256 over host parameter values in name order, as little-endian f32 bytes: the same digest
/// as `MoeTransformer::params_sha256` of a model holding them.
pub fn host_params_sha256(values: &BTreeMap<String, HostTensor>) -> String {
    let mut hasher = Sha256::new();
    for value in values.values() {
        hasher.update(le_bytes(&value.data));
    }
    hex(&hasher.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ninelives_core::job::ModelPreset;

    #[test]
    fn parameter_count_matches_the_core_dimensions() {
        for preset in [ModelPreset::Tiny, ModelPreset::Small] {
            let dims = ModelDims::preset(preset);
            let total: u64 = param_specs(&dims).iter().map(|s| s.numel() as u64).sum();
            assert_eq!(total, dims.total_params(), "{preset:?}");
        }
    }

    #[test]
    fn expert_names_parse_back_to_their_ids() {
        assert_eq!(ParamOwner::of("layers.3.experts.7.w_gate"), ParamOwner::Expert(ExpertId::new(3, 7)));
        assert_eq!(ParamOwner::of("layers.3.router"), ParamOwner::Dense);
        assert_eq!(ParamOwner::of("embed"), ParamOwner::Dense);
    }
}
