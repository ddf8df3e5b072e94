//! Expert-parallel training across worker processes (issue 7).
//!
//! - [`plan`]: pure decisions — micro-batch and replica assignment (the generation protocol
//!   itself, and every decision to publish one, belong to `ninelives-core` and the control loop);
//! - [`wire`]: the length-prefixed binary frames workers exchange;
//! - [`auth`]: the job key, the handshake proofs and the frame tags (pure);
//! - [`link`]: one authenticated connection: the handshake and tagged frames;
//! - [`state`]: what a member's threads share, with the bounded inbox of pushes;
//! - [`socket`]: deadlines on peer sockets (write timeout, TCP user timeout, keepalive);
//! - [`transport`]: the [`transport::Collective`] trait and its TCP implementation, with
//!   bounded waits that abandon a step when a peer is lost or a new generation appears;
//! - [`service`]: the owner side of the expert all-to-all;
//! - [`engine`]: one training step, identical in math for one worker and for many;
//! - [`rendezvous`]: etcd membership, plan, acknowledgements, generation watch;
//! - [`peer`]: in-memory peer snapshots (own and buddies' copies), pure;
//! - [`member`]: a member's life: join a generation, train, abort, rejoin.

pub mod auth;
pub mod engine;
#[cfg(test)]
mod fuzz;
pub mod link;
pub mod member;
pub mod peer;
pub mod plan;
pub mod rendezvous;
pub mod service;
pub mod socket;
pub mod state;
pub mod transport;
pub mod wire;
