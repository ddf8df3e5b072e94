//! Expert-parallel training across worker processes (issue 7).
//!
//! - [`plan`]: pure decisions — micro-batch and replica assignment (the generation protocol
//!   itself, and every decision to publish one, belong to `ninelives-core` and the control loop);
//! - [`wire`]: the length-prefixed binary frames workers exchange;
//! - [`transport`]: the [`transport::Collective`] trait and its TCP implementation, with
//!   bounded waits that abandon a step when a peer is lost or a new generation appears;
//! - [`service`]: the owner side of the expert all-to-all;
//! - [`engine`]: one training step, identical in math for one worker and for many;
//! - [`rendezvous`]: etcd membership, plan, acknowledgements, generation watch;
//! - [`member`]: a member's life: join a generation, train, abort, rejoin.

pub mod engine;
pub mod member;
pub mod plan;
pub mod rendezvous;
pub mod service;
pub mod transport;
pub mod wire;
