//! Worker-to-worker communication: the [`Collective`] trait and its TCP implementation.
//!
//! Every worker listens on one TCP port (published in etcd under `members/<rank>`). For each
//! generation, each worker opens one connection to every other member and uses it for its own
//! requests (expert forward/backward, answered on the same connection) and for its pushes to
//! that member (collective rounds). Every connection starts with the handshake of
//! [`super::link`]: the peer proves it is the member of this job and generation it claims to be,
//! and every later frame is tied to it. The accepting side runs one handler thread per
//! connection (at most [`MAX_HANDSHAKES`] unauthenticated and [`max_connections`](super::link::LinkConfig::max_connections)
//! authenticated ones at once): it answers expert requests from the [`ExpertService`] and
//! buffers pushes in the bounded inbox.
//!
//! No wait is unbounded: reads time out every [`POLL`] and re-check whether the step must be
//! abandoned (the process is stopping, etcd shows a newer generation, a member's connection
//! closed, or the step deadline passed). A killed peer's sockets are closed by its kernel, so
//! its death is seen at once as end-of-file.
//!
//! [`ExpertService`]: super::service::ExpertService

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::link::{Link, MAX_HANDSHAKES};
use super::peer::Snapshot;
pub use super::state::POLL;
use super::state::{RoundState, Shared};
use super::wire::{Msg, ReadError, decode_state, encode_state};
use crate::error::{Result, WorkerError};

/// Collective operations one member of a generation needs. A vendor collective library
/// (NCCL/HCCL class) could implement the same calls on real hardware.
pub trait Collective {
    /// This member's rank.
    fn rank(&self) -> u32;
    /// Members of the generation, ascending.
    fn members(&self) -> &[u32];
    /// Point-to-point request to `peer` (an expert forward or backward), returning its reply.
    fn call(&self, peer: u32, msg: &Msg) -> Result<Vec<f32>>;
    /// All-to-all of one round: sends `outgoing[q]` to every other member `q` (empty when
    /// absent) and returns what every other member sent here, by rank. Also a barrier.
    fn exchange(
        &self,
        step: u64,
        round: u8,
        outgoing: BTreeMap<u32, Vec<u8>>,
    ) -> Result<BTreeMap<u32, Vec<u8>>>;
}

/// Live inbound connections: handshakes in progress, and authenticated peers by (generation, rank).
#[derive(Default)]
struct Connections {
    handshakes: AtomicUsize,
    peers: Mutex<BTreeSet<(u64, u32)>>,
}

/// Releases a handshake slot when dropped.
struct HandshakeSlot<'a>(&'a AtomicUsize);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections on `listener` and serves them, each on its own thread, until `stop`.
pub fn serve(listener: TcpListener, shared: Arc<Shared>) -> Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true).map_err(|e| WorkerError::Rendezvous(format!("listener: {e}")))?;
    let connections = Arc::new(Connections::default());
    std::thread::Builder::new()
        .name("peer-listener".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, from)) => {
                        // Claimed before the thread starts, so a flood cannot overshoot the bound.
                        if connections.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                            connections.handshakes.fetch_sub(1, Ordering::SeqCst);
                            tracing::warn!(%from, "{MAX_HANDSHAKES} handshakes in progress; connection closed");
                            continue;
                        }
                        let (shared, connections) = (shared.clone(), connections.clone());
                        let spawned = std::thread::Builder::new()
                            .name("peer-handler".into())
                            .spawn(move || handle(stream, from, &shared, &connections));
                        if let Err(e) = spawned {
                            tracing::warn!("cannot start a peer handler: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| WorkerError::Rendezvous(format!("listener thread: {e}")))
}

/// Authenticates one inbound connection, then serves it. `connections.handshakes` was claimed.
fn handle(stream: TcpStream, from: SocketAddr, shared: &Shared, connections: &Connections) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    if let Err(e) = super::socket::set_deadlines(&stream, shared.step_timeout) {
        tracing::warn!(%from, "cannot set deadlines on a peer connection: {e}");
    }
    let accepted = {
        let _slot = HandshakeSlot(&connections.handshakes);
        Link::accept(stream, &shared.link, shared.rank, shared.serving_generation(), &shared.stop)
    };
    let mut link = match accepted {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(%from, "peer connection refused: {e}");
            return;
        }
    };
    let key = (link.generation, link.peer);
    {
        let Ok(mut peers) = connections.peers.lock() else { return };
        if peers.len() >= shared.link.max_connections || !peers.insert(key) {
            tracing::warn!(%from, rank = link.peer, generation = link.generation,
                "a duplicate connection, or too many connections; refused");
            let _ = link.send(&Msg::Refused { reason: "too many connections".into() });
            link.shutdown();
            return;
        }
    }
    if let Err(reason) = serve_link(&mut link, shared) {
        tracing::debug!(rank = link.peer, generation = link.generation, "connection ended: {reason}");
        shared.deliver_lost(link.generation, link.peer);
    }
    link.shutdown();
    if let Ok(mut peers) = connections.peers.lock() {
        peers.remove(&key);
    }
}

/// Serves an authenticated connection until it ends (`Err(why)`) or the worker stops (`Ok`).
fn serve_link(link: &mut Link, shared: &Shared) -> std::result::Result<(), String> {
    link.set_poll(POLL).map_err(|e| e.to_string())?;
    let (generation, peer) = (link.generation, link.peer);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let msg = match link.recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            Err(err) => return Err(err.to_string()),
        };
        let reply = match msg {
            Msg::Push { generation: g, step, round, payload } if g == generation => {
                // The sender is the connection's authenticated rank, whatever the frame says.
                shared.deliver_push(generation, peer, step, round, payload).map_err(|e| e.to_string())?;
                continue;
            }
            Msg::Forward { generation: g, step, call, rows, data } if g == generation => {
                match shared.wait_serving(generation, step) {
                    Ok(()) => match shared.service.forward(&shared.trainer, call, rows as usize, data) {
                        Ok(data) => Msg::Reply { data },
                        Err(e) => Msg::Refused { reason: e.to_string() },
                    },
                    Err(reason) => Msg::Refused { reason },
                }
            }
            Msg::Backward { generation: g, step, call, rows, data } if g == generation => {
                match shared.wait_serving(generation, step) {
                    Ok(()) => match shared.service.backward(&shared.trainer, call, rows as usize, data) {
                        Ok(data) => Msg::Reply { data },
                        Err(e) => Msg::Refused { reason: e.to_string() },
                    },
                    Err(reason) => Msg::Refused { reason },
                }
            }
            Msg::PeerCopy { generation: g, step, payload } if g == generation => {
                // Kept for the connection's authenticated rank; a refused copy ends the connection.
                let (params, moments) = decode_state(&payload).map_err(|e| e.to_string())?;
                let copy = Snapshot { step, params, moments };
                shared
                    .peers
                    .lock()
                    .map_err(|_| "peer store lock poisoned".to_string())?
                    .hold(peer, copy, Instant::now())
                    .map_err(|e| {
                        let _ = link.send(&Msg::Refused { reason: e.to_string() });
                        e.to_string()
                    })?;
                Msg::PeerAck { step }
            }
            Msg::PeerFetch { generation: g, step, dense, experts } if g == generation => {
                let found = shared
                    .peers
                    .lock()
                    .map_err(|_| "peer store lock poisoned".to_string())?
                    .find(step, dense, &experts);
                match found {
                    Some(s) => Msg::PeerState { step, payload: encode_state(&s.params, &s.moments) },
                    None => {
                        Msg::Refused { reason: format!("rank {} keeps nothing of step {step}", shared.rank) }
                    }
                }
            }
            other => {
                // A member never sends these here: the connection is not what it claims.
                let reason =
                    format!("unexpected {} on a generation {generation} connection", variant(&other));
                let _ = link.send(&Msg::Refused { reason: reason.clone() });
                return Err(reason);
            }
        };
        let n = link.send(&reply).map_err(|e| e.to_string())?;
        shared.traffic.expert_bytes.fetch_add(n, Ordering::Relaxed);
    }
}

fn variant(msg: &Msg) -> &'static str {
    msg.name()
}

/// The TCP [`Collective`] of one member in one generation.
pub struct TcpCollective {
    shared: Arc<Shared>,
    generation: u64,
    members: Vec<u32>,
    conns: BTreeMap<u32, Mutex<Link>>,
}

impl TcpCollective {
    /// Connects to every other member (`addrs` by rank) within `timeout`, authenticating each
    /// connection.
    pub fn connect(
        shared: Arc<Shared>,
        generation: u64,
        members: &[u32],
        addrs: &BTreeMap<u32, SocketAddr>,
        timeout: Duration,
    ) -> Result<Self> {
        let mut conns = BTreeMap::new();
        for &rank in members {
            if rank == shared.rank {
                continue;
            }
            let addr = addrs
                .get(&rank)
                .ok_or_else(|| WorkerError::Rendezvous(format!("no address published for rank {rank}")))?;
            let deadline = Instant::now() + timeout;
            let stream = loop {
                match TcpStream::connect_timeout(addr, timeout) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("connecting to rank {rank} at {addr}: {e}; retrying");
                        std::thread::sleep(POLL);
                    }
                    Err(e) => {
                        return Err(WorkerError::Aborted(format!(
                            "cannot connect to rank {rank} at {addr}: {e}"
                        )));
                    }
                }
            };
            let io = |e: std::io::Error| WorkerError::Aborted(format!("connection to rank {rank}: {e}"));
            stream.set_nodelay(true).map_err(io)?;
            super::socket::set_deadlines(&stream, shared.step_timeout).map_err(io)?;
            let link = Link::connect(stream, &shared.link, generation, shared.rank, rank, &shared.stop)
                .map_err(|e| WorkerError::Aborted(format!("connection to rank {rank} at {addr}: {e}")))?;
            link.set_poll(POLL).map_err(io)?;
            conns.insert(rank, Mutex::new(link));
        }
        Ok(Self { shared, generation, members: members.to_vec(), conns })
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn check_abort(&self) -> Result<()> {
        match self.shared.abort_reason(self.generation) {
            Some(reason) => Err(WorkerError::Aborted(reason)),
            None => Ok(()),
        }
    }

    /// Fails the step: records why, so handler threads refuse further requests, and returns the
    /// error to raise.
    pub fn fail(&self, reason: String) -> WorkerError {
        self.shared.abort(self.generation, &reason);
        WorkerError::Aborted(reason)
    }

    fn send(&self, peer: u32, msg: &Msg) -> Result<u64> {
        let conn = self.conns.get(&peer).ok_or_else(|| self.fail(format!("rank {peer} is not a peer")))?;
        let mut conn = conn.lock().map_err(|_| self.fail("connection lock poisoned".into()))?;
        conn.send(msg).map_err(|e| self.fail(format!("rank {peer} is gone: {e}")))
    }

    /// Sends `snapshot` (a copy for `peer` to keep) and waits for its acknowledgement, within the
    /// step timeout. Returns the bytes sent. Holds the connection meanwhile, so it runs beside
    /// the step's local compute (a background thread), never inside a request of the step.
    pub fn send_copy(&self, peer: u32, snapshot: &Snapshot) -> std::result::Result<u64, String> {
        let msg = Msg::PeerCopy {
            generation: self.generation,
            step: snapshot.step,
            payload: encode_state(&snapshot.params, &snapshot.moments),
        };
        let answer = self.request(peer, &msg)?;
        match answer {
            (Msg::PeerAck { step }, n) if step == snapshot.step => Ok(n),
            (other, _) => Err(format!("rank {peer} answered a copy with {}", variant(&other))),
        }
    }

    /// Asks `peer` for what it keeps of `step` (see [`Msg::PeerFetch`]). `Ok(None)`: it has
    /// nothing of that step.
    pub fn fetch(
        &self,
        peer: u32,
        step: u64,
        dense: bool,
        experts: &[crate::model::ExpertId],
    ) -> std::result::Result<Option<Snapshot>, String> {
        let msg = Msg::PeerFetch { generation: self.generation, step, dense, experts: experts.to_vec() };
        match self.request(peer, &msg)? {
            (Msg::PeerState { step: s, payload }, _) if s == step => {
                let (params, moments) =
                    decode_state(&payload).map_err(|e| format!("rank {peer} sent a malformed state: {e}"))?;
                Ok(Some(Snapshot { step, params, moments }))
            }
            (Msg::Refused { .. }, _) => Ok(None),
            (other, _) => Err(format!("rank {peer} answered a fetch with {}", variant(&other))),
        }
    }

    /// One request and its answer on `peer`'s connection, within the step timeout; does not
    /// abandon the step on failure (the caller decides).
    fn request(&self, peer: u32, msg: &Msg) -> std::result::Result<(Msg, u64), String> {
        let conn = self.conns.get(&peer).ok_or_else(|| format!("rank {peer} is not a peer"))?;
        let mut conn = conn.lock().map_err(|_| "connection lock poisoned".to_string())?;
        let sent = conn.send(msg).map_err(|e| format!("rank {peer} is gone: {e}"))?;
        let deadline = Instant::now() + self.shared.step_timeout;
        loop {
            match conn.recv() {
                Ok(Some(answer)) => return Ok((answer, sent)),
                Ok(None) => {}
                Err(e) => return Err(format!("rank {peer}: {e}")),
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return Err("stopping".into());
            }
            if Instant::now() >= deadline {
                return Err(format!("rank {peer} did not answer within {:?}", self.shared.step_timeout));
            }
        }
    }

    /// Closes every outgoing connection, so peers waiting on us see the end at once.
    pub fn shutdown(&self) {
        for conn in self.conns.values() {
            if let Ok(c) = conn.lock() {
                c.shutdown();
            }
        }
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> u32 {
        self.shared.rank
    }

    fn members(&self) -> &[u32] {
        &self.members
    }

    fn call(&self, peer: u32, msg: &Msg) -> Result<Vec<f32>> {
        self.check_abort()?;
        let conn = self.conns.get(&peer).ok_or_else(|| self.fail(format!("rank {peer} is not a peer")))?;
        let mut conn = conn.lock().map_err(|_| self.fail("connection lock poisoned".into()))?;
        let sent = conn.send(msg).map_err(|e| self.fail(format!("rank {peer} is gone: {e}")))?;
        self.shared.traffic.expert_bytes.fetch_add(sent, Ordering::Relaxed);
        let deadline = Instant::now() + self.shared.step_timeout;
        loop {
            match conn.recv() {
                Ok(Some(Msg::Reply { data })) => return Ok(data),
                Ok(Some(Msg::Refused { reason })) => {
                    return Err(self.fail(format!("rank {peer} refused: {reason}")));
                }
                Ok(Some(other)) => return Err(self.fail(format!("rank {peer} answered {other:?}"))),
                Ok(None) => {}
                Err(ReadError::Closed) => return Err(self.fail(format!("rank {peer} closed the connection"))),
                Err(e) => return Err(self.fail(format!("rank {peer}: {e}"))),
            }
            self.check_abort()?;
            if Instant::now() >= deadline {
                return Err(
                    self.fail(format!("rank {peer} did not answer within {:?}", self.shared.step_timeout))
                );
            }
        }
    }

    fn exchange(
        &self,
        step: u64,
        round: u8,
        mut outgoing: BTreeMap<u32, Vec<u8>>,
    ) -> Result<BTreeMap<u32, Vec<u8>>> {
        self.check_abort()?;
        for &peer in &self.members {
            if peer == self.shared.rank {
                continue;
            }
            let payload = outgoing.remove(&peer).unwrap_or_default();
            let msg = Msg::Push { generation: self.generation, step, round, payload };
            let n = self.send(peer, &msg)?;
            self.shared.traffic.collective_bytes.fetch_add(n, Ordering::Relaxed);
        }
        let others: Vec<u32> = self.members.iter().copied().filter(|&r| r != self.shared.rank).collect();
        let g = self.generation;
        let deadline = Instant::now() + self.shared.step_timeout;
        let mut inbox = self.shared.inbox().map_err(|e| self.fail(e.to_string()))?;
        loop {
            match inbox.take_round(g, step, round, &others) {
                RoundState::Complete(pushes) => return Ok(pushes),
                RoundState::Lost(r) => {
                    drop(inbox);
                    return Err(self.fail(format!("rank {r} closed its connection during step {step}")));
                }
                RoundState::Waiting => {}
            }
            if let Some(reason) = self.shared.abort_reason(g) {
                return Err(WorkerError::Aborted(reason));
            }
            if Instant::now() >= deadline {
                drop(inbox);
                return Err(self.fail(format!(
                    "round {round} of step {step} incomplete after {:?}",
                    self.shared.step_timeout
                )));
            }
            inbox = self.shared.wait_arrival(inbox, POLL).map_err(|e| self.fail(e.to_string()))?;
        }
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        self.shutdown();
    }
}
