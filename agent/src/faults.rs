//! Fault codes and what the agent does about them.
//!
//! Like Ascend's fault levels, every fault code a probe can report maps to one [`FaultAction`]
//! through a [`FaultTable`]. The built-in defaults ([`FaultTable::default`]) can be overridden
//! per code from a YAML file (`--fault-table FILE`), one `code: action` line each:
//!
//! ```yaml
//! # codes from the vendor tool, and the agent's own synthesised codes
//! hbm-ecc-uncorrectable: isolate-chip
//! vendor-0x80e18402: restart-process
//! correctable-error-burst: ignore
//! ```
//!
//! A code absent from the table is **unknown**: the agent isolates the chip (the conservative
//! choice: a chip we cannot judge is not trusted with training state) and reports it through the
//! `ninelives_agent_unknown_fault_codes_total` metric and a warning log line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ninelives_core::keyspace::ChipState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The code of a chip with no fault.
pub const OK: &str = "ok";
/// Uncorrectable ECC error in the chip's HBM: training state on it is corrupt.
pub const HBM_ECC_UNCORRECTABLE: &str = "hbm-ecc-uncorrectable";
/// A chip-to-chip or chip-to-switch link is down.
pub const LINK_DOWN: &str = "link-down";
/// Synthesised by the agent: the chip's heartbeat counter stopped advancing (hang).
pub const HEARTBEAT_STALLED: &str = "heartbeat-stalled";
/// Synthesised by the agent: the chip's temperature is at or above the policy threshold.
pub const OVER_TEMPERATURE: &str = "over-temperature";
/// Sub-health reported by the vendor tool: the chip runs slow.
pub const SUBHEALTH_SLOW: &str = "subhealth-slow";
/// Synthesised by the agent: too many correctable errors within the policy window.
pub const CORRECTABLE_ERROR_BURST: &str = "correctable-error-burst";
/// A fault in the chip's compute cores that a restart of the training process clears.
pub const AICORE_EXCEPTION: &str = "aicore-exception";
/// Synthesised by the agent: the vendor reports the chip offline.
pub const CHIP_OFFLINE: &str = "chip-offline";
/// Synthesised by the agent: the chip's probe entry is missing or unreadable.
pub const PROBE_UNREADABLE: &str = "probe-unreadable";
/// A host-level fault (host memory, PCIe root complex) that makes every chip of the node unsafe.
pub const HOST_FAULT: &str = "host-fault";
/// Published for healthy chips of a node isolated because of another chip's host-level fault.
pub const NODE_ISOLATED: &str = "node-isolated";
/// Published for a quarantined chip: it flapped too often.
pub const FLAPPING: &str = "flapping";

/// What the agent does about a fault code, mildest first (the order is the severity order).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FaultAction {
    /// Keep the chip healthy; the code is not published.
    Ignore,
    /// Sub-health: the chip stays usable but is published `degraded`, so the planner can
    /// prefer other chips.
    Degrade,
    /// The training process on the chip must restart; the chip itself stays usable
    /// (published `degraded` while the code persists).
    RestartProcess,
    /// The chip is unusable: published `failed`.
    IsolateChip,
    /// The whole node is unsafe: every chip is published `failed` and the node is tainted.
    IsolateNode,
}

impl FaultAction {
    /// The chip state this action publishes.
    pub fn chip_state(self) -> ChipState {
        match self {
            FaultAction::Ignore => ChipState::Healthy,
            FaultAction::Degrade | FaultAction::RestartProcess => ChipState::Degraded,
            FaultAction::IsolateChip | FaultAction::IsolateNode => ChipState::Failed,
        }
    }

    /// Kebab-case name, as in the table file and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultAction::Ignore => "ignore",
            FaultAction::Degrade => "degrade",
            FaultAction::RestartProcess => "restart-process",
            FaultAction::IsolateChip => "isolate-chip",
            FaultAction::IsolateNode => "isolate-node",
        }
    }
}

/// How one fault code was judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// The action to take.
    pub action: FaultAction,
    /// False when the code is not in the table (the action is then the conservative default).
    pub known: bool,
}

/// A fault table file that could not be read or parsed.
#[derive(Debug, Error)]
#[error("fault table {path}: {reason}")]
pub struct FaultTableError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Fault code → action, with the conservative default for unknown codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultTable {
    actions: BTreeMap<String, FaultAction>,
}

impl Default for FaultTable {
    fn default() -> Self {
        let actions = [
            (HBM_ECC_UNCORRECTABLE, FaultAction::IsolateChip),
            (LINK_DOWN, FaultAction::IsolateChip),
            (HEARTBEAT_STALLED, FaultAction::IsolateChip),
            (OVER_TEMPERATURE, FaultAction::IsolateChip),
            (CHIP_OFFLINE, FaultAction::IsolateChip),
            (PROBE_UNREADABLE, FaultAction::IsolateChip),
            (SUBHEALTH_SLOW, FaultAction::Degrade),
            (CORRECTABLE_ERROR_BURST, FaultAction::Degrade),
            (AICORE_EXCEPTION, FaultAction::RestartProcess),
            (HOST_FAULT, FaultAction::IsolateNode),
        ]
        .into_iter()
        .map(|(code, action)| (code.to_string(), action))
        .collect();
        Self { actions }
    }
}

impl FaultTable {
    /// Judges a (non-`ok`) fault code. Unknown codes get [`FaultAction::IsolateChip`].
    pub fn judge(&self, code: &str) -> Judgement {
        match self.actions.get(code) {
            Some(&action) => Judgement { action, known: true },
            None => Judgement { action: FaultAction::IsolateChip, known: false },
        }
    }

    /// The defaults with the entries of a YAML `code: action` map laid over them.
    pub fn with_overrides_yaml(mut self, yaml: &str) -> Result<Self, String> {
        let overrides: BTreeMap<String, FaultAction> =
            serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        for (code, action) in overrides {
            if code == OK {
                return Err("the code `ok` means no fault and cannot be mapped".into());
            }
            self.actions.insert(code, action);
        }
        Ok(self)
    }

    /// Loads the defaults overridden by the YAML file at `path`.
    pub fn load(path: &Path) -> Result<Self, FaultTableError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FaultTableError { path: path.to_path_buf(), reason: source.to_string() })?;
        Self::default()
            .with_overrides_yaml(&text)
            .map_err(|reason| FaultTableError { path: path.to_path_buf(), reason })
    }

    /// Every known code and its action, sorted by code (for docs and `--help`).
    pub fn entries(&self) -> impl Iterator<Item = (&str, FaultAction)> {
        self.actions.iter().map(|(code, action)| (code.as_str(), *action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_isolate_the_chip_and_are_flagged() {
        let table = FaultTable::default();
        assert_eq!(
            table.judge("vendor-0xdead"),
            Judgement { action: FaultAction::IsolateChip, known: false }
        );
        assert_eq!(
            table.judge(HBM_ECC_UNCORRECTABLE),
            Judgement { action: FaultAction::IsolateChip, known: true }
        );
        assert_eq!(table.judge(SUBHEALTH_SLOW).action.chip_state(), ChipState::Degraded);
        assert_eq!(table.judge(HOST_FAULT).action, FaultAction::IsolateNode);
    }

    #[test]
    fn overrides_replace_defaults_and_add_codes() {
        let table = FaultTable::default()
            .with_overrides_yaml("# site policy\nlink-down: restart-process\nvendor-0x42: ignore\n")
            .unwrap();
        assert_eq!(table.judge(LINK_DOWN).action, FaultAction::RestartProcess);
        assert_eq!(table.judge("vendor-0x42"), Judgement { action: FaultAction::Ignore, known: true });
        assert_eq!(table.judge(HBM_ECC_UNCORRECTABLE).action, FaultAction::IsolateChip);
    }

    #[test]
    fn bad_tables_are_rejected() {
        assert!(FaultTable::default().with_overrides_yaml("link-down: reboot-the-datacenter\n").is_err());
        assert!(FaultTable::default().with_overrides_yaml("ok: isolate-chip\n").is_err());
        assert!(FaultTable::default().with_overrides_yaml("[1, 2]").is_err());
    }

    #[test]
    fn severity_order_is_mildest_first() {
        assert!(FaultAction::Ignore < FaultAction::Degrade);
        assert!(FaultAction::RestartProcess < FaultAction::IsolateChip);
        assert!(FaultAction::IsolateChip < FaultAction::IsolateNode);
    }
}
