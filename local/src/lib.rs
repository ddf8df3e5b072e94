//! # ninelives-local
//!
//! The local-process runtime: what `ninelives demo` runs the whole system with, on one machine
//! and without Kubernetes. The same recovery brain (`ninelives_core::recovery`) that the
//! operator drives on a cluster decides here; this crate provides the I/O around it:
//!
//! - [`supervisor`]: child processes in their own process groups, killed (the whole group) on
//!   drop, on [`Supervisor::shutdown`] and therefore on Ctrl-C — no orphans;
//! - [`etcd`]: a private etcd as a child (free loopback ports, temp dir, a clear install hint when
//!   the binary is missing);
//! - [`processes`]: command lines of agents (`ninelives agent run --simulate 8 ...`), fault
//!   injection (`ninelives agent inject`), and the expert-parallel members of the job
//!   ([`MemberSpec`]: `ninelives worker train M --rank R --etcd URL`, one per node), plus the
//!   parser of the workers' step and join lines;
//! - [`report`]: `report.json` (recoveries, goodput, final loss, parameter comparison);
//! - [`svg`]: hand-written SVG line charts with recoveries marked;
//! - [`live`]: the live view, a pure function from state to text;
//! - [`run`]: [`run_local`], a run of it all under the job's control loop (`ninelives demo`),
//!   with its effects (`effects`), processes (`cluster`) and step-line tally (`training`);
//! - [`metrics`]: the recovery and job metrics of whoever drives the brain.
//!
//! The stdout lines of members are formatted and parsed by
//! [`ninelives_core::member_output`].

mod cluster;
mod effects;
pub mod error;
pub mod etcd;
pub mod live;
pub mod run;
mod training;
/// The recovery brain's metrics (they live in telemetry: the operator exports them too).
pub use ninelives_telemetry::recovery as metrics;
pub mod processes;
pub mod report;
pub mod supervisor;
pub mod svg;

pub use error::RuntimeError;
pub use etcd::LocalEtcd;
pub use processes::MemberSpec;
pub use run::{
    LocalRunConfig, MemberRouting, MetricsPlan, NAMESPACE, RunOutcome, committed_checkpoints, node_names,
    run_local,
};
pub use supervisor::{ChildId, Supervisor};
