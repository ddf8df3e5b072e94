//! # ninelives-agent
//!
//! The per-node daemon of ninelives (a DaemonSet in Kubernetes, a child process in the local
//! demo). It
//!
//! - reads chip health through a [`probe::ChipProbe`] (a sysfs-style directory that vendor
//!   tooling or the [`simulate`]d ASIC feeds),
//! - judges it with a pure state machine ([`health`]) and a configurable fault table
//!   ([`faults`]), quarantining chips that flap,
//! - holds the node's presence in etcd under one lease and writes chip states only when they
//!   change ([`etcd`]),
//! - reports a Node condition and taint to Kubernetes ([`kubernetes`]),
//! - applies placement generations (reroute, load experts, restore) on the local workers and
//!   acknowledges them in etcd ([`exec`]),
//! - serves `/metrics`, `/live` and `/ready` ([`events`] holds every metric).
//!
//! [`agent::Agent`] wires it together; the `ninelives agent` subcommand is a thin shell over it.

pub mod agent;
pub mod error;
pub mod etcd;
pub mod events;
pub mod exec;
pub mod faults;
pub mod health;
pub mod kubernetes;
pub mod node;
pub mod probe;
pub mod simulate;

pub use agent::{Agent, AgentConfig};
pub use error::AgentError;
