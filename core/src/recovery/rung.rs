//! The recovery ladder's rungs, cheapest first.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::job::RecoveryTier;

/// A rung of the recovery ladder, cheapest first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Rung {
    /// New placement generation routing around the failed chips; no state moves that training
    /// waits for, the interrupted step is retried (0 steps lost).
    Reroute,
    /// Lost experts re-placed and loaded (from a live peer, else from the last committed
    /// checkpoint, which rolls the whole job back to it).
    Reshard,
    /// The whole job rolls back to the last committed checkpoint on the new placement; lost
    /// workers are restarted.
    Restore,
    /// A spare node takes over the index of a lost (or faulty) node.
    Replace,
    /// The lost (or faulty) node is dropped; the job continues on fewer nodes within
    /// `minHealthyFraction`.
    Shrink,
}

impl Rung {
    /// Every rung, cheapest first: the escalation order.
    pub const LADDER: [Rung; 5] = [Rung::Reroute, Rung::Reshard, Rung::Restore, Rung::Replace, Rung::Shrink];

    /// Lower-case name, as in metrics labels (`tier`) and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Rung::Reroute => "reroute",
            Rung::Reshard => "reshard",
            Rung::Restore => "restore",
            Rung::Replace => "replace",
            Rung::Shrink => "shrink",
        }
    }

    /// The API tier this rung belongs to; `shrink` is part of `replace` ("bring in spare nodes,
    /// or continue degraded").
    pub fn api_tier(self) -> RecoveryTier {
        match self {
            Rung::Reroute => RecoveryTier::Reroute,
            Rung::Reshard => RecoveryTier::Reshard,
            Rung::Restore => RecoveryTier::Restore,
            Rung::Replace | Rung::Shrink => RecoveryTier::Replace,
        }
    }

    /// The rungs strictly above this one, in order.
    pub fn above(self) -> impl Iterator<Item = Rung> {
        Rung::LADDER.into_iter().filter(move |r| *r > self)
    }
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_order_and_api_tiers() {
        assert_eq!(Rung::Reroute.above().collect::<Vec<_>>(), &Rung::LADDER[1..]);
        assert_eq!(Rung::Shrink.above().count(), 0);
        assert_eq!(Rung::Shrink.api_tier(), RecoveryTier::Replace);
    }
}
