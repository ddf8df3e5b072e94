//! The expert placement and reshard planner.
//!
//! Decides which chip hosts which expert replicas ([`Placement`], versioned by generation), and,
//! when chips fail, the next placement plus a [`RecoveryPlan`] saying what the change needs:
//! [`Tier::Reroute`] (every expert kept a live replica), [`Tier::Reshard`] (listed experts must be
//! loaded onto listed chips from a named [`Source`]) or [`Tier::Infeasible`] (with the reason).
//!
//! ```text
//! PlacementShape::from_job(&job_shape, min_healthy_fraction)
//!   └─ initial_placement(&shape, &load)                      -> Placement (generation 1)
//!        └─ replan(&shape, &placement, &failed, &load, &opts) -> Replan { plan, placement }
//!             └─ (loads done) placement.settled()             -> Placement (no pending loads)
//! ```
//!
//! Invariants every output keeps (property-tested in `tests`):
//! - every expert has at least one replica on a healthy chip in every group, and its requested
//!   number whenever a healthy chip with memory and a free failure domain exists;
//! - two replicas of an expert never share a node, nor a rack when racks are modelled;
//! - no chip holds more replicas than its memory;
//! - after failures only replicas that were on failed chips move (unless rebalancing), so moved
//!   state equals the lower bound;
//! - equal inputs give equal outputs: only ordered collections and total-order tie-breaks.
//!
//! Pure code: no I/O, no clocks, no randomness beyond the seeded [`ExpertLoad::zipf`].

mod error;
mod health;
mod ids;
mod initial;
mod load;
mod plan;
mod replan;
mod shape;
mod types;
mod work;

#[cfg(test)]
mod tests;

pub use error::PlanError;
pub use health::{FailedChips, Failure};
pub use ids::{ChipId, ExpertId};
pub use initial::initial_placement;
pub use load::{ExpertLoad, SplitMix64};
pub use plan::{Infeasibility, LoadStats, RecoveryPlan, Tier};
pub use replan::{Redundancy, Replan, ReplanOptions, replan};
pub use shape::PlacementShape;
pub use types::{GroupPlacement, Move, Placement, Source};
