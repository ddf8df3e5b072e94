//! The line protocol of a worker member's standard output: what `ninelives worker train`
//! prints and what the launchers (the local runtime, `ninelives worker launch`) read back.
//! Formatted and parsed here only, so the two sides cannot drift.

use std::fmt;

use crate::generation::GenerationTier;

/// One completed training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLine {
    /// The step.
    pub step: u64,
    /// Its loss.
    pub loss: f64,
    /// Throughput of the step.
    pub tokens_per_s: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Load-balancing loss.
    pub balance: f64,
    /// Router z-loss.
    pub z: f64,
}

/// One meaningful line of member output.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberLine {
    /// A generation was joined; training continues from `step`.
    Joined {
        /// The generation.
        generation: u64,
        /// Why it was published.
        tier: GenerationTier,
        /// The step every member continues from.
        step: u64,
        /// Its members.
        members: Vec<u32>,
        /// Routed experts this member holds.
        experts: usize,
    },
    /// A completed step.
    Step(StepLine),
    /// Bytes moved by the member's step so far.
    Traffic {
        /// Expert all-to-all bytes on the wire.
        expert_bytes: u64,
        /// Dense all-reduce bytes on the wire.
        collective_bytes: u64,
        /// Expert all-to-all payload (activations and gradients only).
        payload_bytes: u64,
    },
    /// A generation was abandoned mid-step.
    Aborted {
        /// The generation.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// A checkpoint was committed.
    Committed {
        /// Its step.
        step: u64,
    },
    /// A checkpoint save failed (and was cleaned up); training went on.
    SaveFailed {
        /// The step that was being saved.
        step: u64,
        /// Why.
        reason: String,
    },
    /// The final parameter digest (SHA-256, hex).
    Digest(String),
}

impl fmt::Display for MemberLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberLine::Joined { generation, tier, step, members, experts } => write!(
                f,
                "joined generation={generation} tier={tier} step={step} members={members:?} experts={experts}"
            ),
            MemberLine::Step(s) => write!(
                f,
                "step={} loss={:.4} tokens_per_s={:.0} lr={:.3e} grad_norm={:.3} balance={:.4} z={:.4}",
                s.step, s.loss, s.tokens_per_s, s.lr, s.grad_norm, s.balance, s.z
            ),
            MemberLine::Traffic { expert_bytes, collective_bytes, payload_bytes } => write!(
                f,
                "traffic expert_bytes={expert_bytes} collective_bytes={collective_bytes} a2a_payload_bytes={payload_bytes}"
            ),
            MemberLine::Aborted { generation, reason } => {
                write!(f, "aborted generation={generation} reason={reason}")
            }
            MemberLine::Committed { step } => write!(f, "committed step={step}"),
            MemberLine::SaveFailed { step, reason } => write!(f, "save_failed step={step} reason={reason}"),
            MemberLine::Digest(hex) => write!(f, "params_sha256={hex}"),
        }
    }
}

impl MemberLine {
    /// Parses one line; other lines (logs) and malformed ones give `None`.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        if let Some(hex) = line.strip_prefix("params_sha256=") {
            let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            return ok.then(|| MemberLine::Digest(hex.to_string()));
        }
        let (head, _) = line.split_once(' ').unwrap_or((line, ""));
        let field =
            |name: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        let number = |name: &str| field(name)?.parse::<u64>().ok();
        let real = |name: &str| field(name)?.parse::<f64>().ok().filter(|x| x.is_finite());
        match head {
            "joined" => Some(MemberLine::Joined {
                generation: number("generation")?,
                tier: serde_json::from_value(serde_json::Value::String(field("tier")?.to_string())).ok()?,
                step: number("step")?,
                members: parse_list(line.split_once("members=")?.1)?,
                experts: usize::try_from(number("experts")?).ok()?,
            }),
            "traffic" => Some(MemberLine::Traffic {
                expert_bytes: number("expert_bytes")?,
                collective_bytes: number("collective_bytes")?,
                payload_bytes: number("a2a_payload_bytes")?,
            }),
            "aborted" => Some(MemberLine::Aborted {
                generation: number("generation")?,
                reason: line.split_once("reason=")?.1.to_string(),
            }),
            "committed" => Some(MemberLine::Committed { step: number("step")? }),
            "save_failed" => Some(MemberLine::SaveFailed {
                step: number("step")?,
                reason: line.split_once("reason=")?.1.to_string(),
            }),
            _ => Some(MemberLine::Step(StepLine {
                step: number("step")?,
                loss: real("loss")?,
                tokens_per_s: real("tokens_per_s")?,
                lr: real("lr")?,
                grad_norm: real("grad_norm")?,
                balance: real("balance")?,
                z: real("z")?,
            })),
        }
    }
}

/// `[0, 1, 2]` (the rest of the line after it is ignored).
fn parse_list(text: &str) -> Option<Vec<u32>> {
    let inner = text.strip_prefix('[')?.split_once(']')?.0;
    inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_line_round_trips() {
        let lines = [
            MemberLine::Joined {
                generation: 3,
                tier: GenerationTier::Restore,
                step: 25,
                members: vec![0, 1, 3],
                experts: 40,
            },
            MemberLine::Step(StepLine {
                step: 26,
                loss: 4.1234,
                tokens_per_s: 9811.0,
                lr: 0.003,
                grad_norm: 0.512,
                balance: 1.0,
                z: 0.1,
            }),
            MemberLine::Traffic { expert_bytes: 10, collective_bytes: 20, payload_bytes: 5 },
            MemberLine::Aborted { generation: 4, reason: "peer 2 lost: connection reset".into() },
            MemberLine::Committed { step: 50 },
            MemberLine::SaveFailed {
                step: 60,
                reason: "checkpoint I/O on /c: No space left on device".into(),
            },
            MemberLine::Digest("ab".repeat(32)),
        ];
        for line in lines {
            assert_eq!(MemberLine::parse(&line.to_string()), Some(line.clone()), "{line}");
        }
    }

    #[test]
    fn junk_is_not_a_line() {
        for junk in [
            "",
            "INFO resumed",
            "step=x loss=1 tokens_per_s=1 lr=1 grad_norm=1 balance=1 z=1",
            "step=1 loss=NaN tokens_per_s=1 lr=1 grad_norm=1 balance=1 z=1",
            "step=1 loss=1 tokens_per_s=1",
            "params_sha256=xyz",
            "steps=1 loss=1 tokens_per_s=1 lr=1 grad_norm=1 balance=1 z=1",
            "joined generation=x step=1",
            "joined generation=2 tier=sideways step=1 members=[0] experts=1",
            "joined generation=2 tier=initial step=1 members=[0, x] experts=1",
            "committed step=",
            "save_failed step=3",
        ] {
            assert_eq!(MemberLine::parse(junk), None, "{junk}");
        }
    }
}
