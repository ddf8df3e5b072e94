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
//! abandoned (the process is stopping, etcd shows a newer generation, a member left, or the step
//! deadline passed).
//!
//! A transient fault stays cheap. A connection that breaks while both members live (a reset,
//! an end of file from a middlebox) is re-established by the member that opened it, within the
//! generation: the same handshake, then every push the other member may not have consumed is
//! sent again (a member that pushed round `r` consumed every earlier round of ours), then the
//! interrupted request is asked again. The receiver ignores pushes it already has, by
//! (generation, step, round); an expert owner answers a repeated request with the same bits.
//! At most [`LinkConfig::reconnect_attempts`](super::link::LinkConfig) attempts per operation,
//! within the step timeout; past them the step is abandoned as before. A member that leaves a
//! generation says goodbye on its connections (its peers stop waiting for it at once); a
//! connection that ends without one is broken, not lost: the waiting side checks its own link
//! to that member, and a killed member's (closed by its kernel) cannot be re-established, so its
//! death is still found within the reconnect budget.
//!
//! [`ExpertService`]: super::service::ExpertService

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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

/// Live inbound connections: handshakes in progress, and authenticated peers by
/// (generation, rank) with the flag that retires each (set when the member reconnects).
#[derive(Default)]
struct Connections {
    handshakes: AtomicUsize,
    peers: Mutex<BTreeMap<(u64, u32), Arc<AtomicBool>>>,
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
    let retired = Arc::new(AtomicBool::new(false));
    {
        let Ok(mut peers) = connections.peers.lock() else { return };
        if !peers.contains_key(&key) && peers.len() >= shared.link.max_connections {
            tracing::warn!(%from, rank = link.peer, generation = link.generation,
                "too many connections; refused");
            let _ = link.send(&Msg::Refused { reason: "too many connections".into() });
            link.shutdown();
            return;
        }
        // A member that connects again in the same generation re-establishes a broken link:
        // the new connection replaces the old one, whose handler ends without reporting a loss.
        if let Some(old) = peers.insert(key, retired.clone()) {
            old.store(true, Ordering::SeqCst);
            tracing::info!(%from, rank = link.peer, generation = link.generation,
                "a member re-established its link; the previous connection is retired");
        }
        shared.deliver_restored(key.0, key.1);
    }
    let end = serve_link(&mut link, shared, &retired);
    link.shutdown();
    let Ok(mut peers) = connections.peers.lock() else { return };
    if retired.load(Ordering::SeqCst) {
        return; // replaced by the member's new connection
    }
    peers.remove(&key);
    // Reported while the map is held, so a reconnect cannot slip in between and be undone.
    match end {
        End::Stopped => {}
        End::Left(reason) => {
            tracing::debug!(rank = key.1, generation = key.0, "connection ended: {reason}");
            shared.deliver_lost(key.0, key.1);
        }
        End::Broken(reason) => {
            tracing::info!(
                rank = key.1,
                generation = key.0,
                "connection broke ({reason}); waiting for the member to re-establish it"
            );
            shared.deliver_broken(key.0, key.1);
        }
    }
}

/// How an authenticated inbound connection ended.
enum End {
    /// The worker is stopping, or the member connected again (the connection was retired).
    Stopped,
    /// The member left the generation (it said goodbye) or broke the protocol: it is lost.
    Left(String),
    /// The connection broke (end of file, a reset): the member may re-establish it.
    Broken(String),
}

/// Serves an authenticated connection until it ends, the worker stops or `retired` is set.
fn serve_link(link: &mut Link, shared: &Shared, retired: &AtomicBool) -> End {
    match serve_frames(link, shared, retired) {
        Ok(end) => end,
        Err(reason) => End::Left(reason),
    }
}

/// [`serve_link`]'s loop; `Err` is a protocol violation or a refused message.
fn serve_frames(link: &mut Link, shared: &Shared, retired: &AtomicBool) -> std::result::Result<End, String> {
    if let Err(e) = link.set_poll(POLL) {
        return Ok(End::Broken(e.to_string()));
    }
    let (generation, peer) = (link.generation, link.peer);
    loop {
        if shared.stop.load(Ordering::SeqCst) || retired.load(Ordering::SeqCst) {
            return Ok(End::Stopped);
        }
        let msg = match link.recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            Err(err @ (ReadError::Closed | ReadError::Io(_))) => return Ok(End::Broken(err.to_string())),
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
                    Ok(()) => {
                        match shared.service.forward(&shared.trainer, peer, call, rows as usize, data) {
                            Ok(data) => Msg::Reply { data },
                            Err(e) => Msg::Refused { reason: e.to_string() },
                        }
                    }
                    Err(reason) => Msg::Refused { reason },
                }
            }
            Msg::Backward { generation: g, step, call, rows, data } if g == generation => {
                match shared.wait_serving(generation, step) {
                    Ok(()) => match shared.service.backward(&shared.trainer, peer, call, rows as usize, data)
                    {
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
            // A member's goodbye: it abandons the generation (see [`TcpCollective::shutdown`]).
            Msg::Refused { reason } => return Ok(End::Left(format!("rank {peer} left: {reason}"))),
            other => {
                // A member never sends these here: the connection is not what it claims.
                let reason =
                    format!("unexpected {} on a generation {generation} connection", variant(&other));
                let _ = link.send(&Msg::Refused { reason: reason.clone() });
                return Err(reason);
            }
        };
        match link.send(&reply) {
            Ok(n) => shared.traffic.expert_bytes.fetch_add(n, Ordering::Relaxed),
            // The member asks again on the connection it re-establishes.
            Err(e) => return Ok(End::Broken(e.to_string())),
        };
    }
}

fn variant(msg: &Msg) -> &'static str {
    msg.name()
}

/// First pause between two attempts at re-establishing a link; it doubles with each attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two attempts at re-establishing a link.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why an operation on an outgoing link failed.
enum LinkFault {
    /// The connection broke (a reset, end of file, a failed write): re-establish it, try again.
    Broken(String),
    /// Anything else (a refusal, an unexpected answer, the deadline): the operation fails.
    Fatal(String),
}

fn broken_or_fatal(peer: u32, err: ReadError) -> LinkFault {
    match err {
        ReadError::Closed | ReadError::Io(_) => LinkFault::Broken(format!("rank {peer}: {err}")),
        other => LinkFault::Fatal(format!("rank {peer}: {other}")),
    }
}

/// One outgoing link: its connection (none while broken), and the pushes of the generation the
/// peer may not have consumed yet, by (step, round): sent again on a re-established connection.
struct PeerLink {
    link: Option<Link>,
    /// (sequence, step, round, payload), in the order sent.
    unacked: VecDeque<(u64, u64, u8, Vec<u8>)>,
    /// Pushes sent to this peer in the generation.
    sent: u64,
}

/// Opens `generation`'s authenticated connection from this member to `rank` at `addr`, within
/// `deadline`; `retry`: dials again until then (the peer may not listen yet).
fn dial(
    shared: &Shared,
    generation: u64,
    rank: u32,
    addr: SocketAddr,
    deadline: Instant,
    retry: bool,
) -> std::result::Result<Link, String> {
    let stream = loop {
        let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => break s,
            Err(e) if retry && Instant::now() < deadline => {
                tracing::debug!("connecting to rank {rank} at {addr}: {e}; retrying");
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(format!("cannot connect to rank {rank} at {addr}: {e}")),
        }
    };
    let io = |e: std::io::Error| format!("connection to rank {rank}: {e}");
    stream.set_nodelay(true).map_err(io)?;
    super::socket::set_deadlines(&stream, shared.step_timeout).map_err(io)?;
    let link = Link::connect(stream, &shared.link, generation, shared.rank, rank, &shared.stop)
        .map_err(|e| format!("connection to rank {rank} at {addr}: {e}"))?;
    link.set_poll(POLL).map_err(io)?;
    Ok(link)
}

/// The TCP [`Collective`] of one member in one generation.
///
/// A link to a live peer that breaks within the generation (a reset connection, an end of file)
/// does not end the step: the link is re-established with the same handshake, the pushes the
/// peer may not have consumed are sent again (it ignores the ones it has, by generation, step
/// and round), and the interrupted request is asked again (the owner answers a repeat with the
/// same bits). At most [`LinkConfig::reconnect_attempts`](super::link::LinkConfig) attempts per
/// operation, within the step timeout; past them the step is abandoned as before.
pub struct TcpCollective {
    shared: Arc<Shared>,
    generation: u64,
    members: Vec<u32>,
    addrs: BTreeMap<u32, SocketAddr>,
    conns: BTreeMap<u32, Mutex<PeerLink>>,
    /// Set by [`TcpCollective::shutdown`]: no link is re-established any more.
    closed: AtomicBool,
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
        let mut peer_addrs = BTreeMap::new();
        for &rank in members {
            if rank == shared.rank {
                continue;
            }
            let addr = *addrs
                .get(&rank)
                .ok_or_else(|| WorkerError::Rendezvous(format!("no address published for rank {rank}")))?;
            let link = dial(&shared, generation, rank, addr, Instant::now() + timeout, true)
                .map_err(WorkerError::Aborted)?;
            conns.insert(rank, Mutex::new(PeerLink { link: Some(link), unacked: VecDeque::new(), sent: 0 }));
            peer_addrs.insert(rank, addr);
        }
        Ok(Self {
            shared,
            generation,
            members: members.to_vec(),
            addrs: peer_addrs,
            conns,
            closed: AtomicBool::new(false),
        })
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

    fn lock(&self, peer: u32) -> std::result::Result<MutexGuard<'_, PeerLink>, String> {
        let conn = self.conns.get(&peer).ok_or_else(|| format!("rank {peer} is not a peer"))?;
        conn.lock().map_err(|_| "connection lock poisoned".to_string())
    }

    /// Runs `op` on `peer`'s link (`conn`). When the link is broken, or breaks during `op`, it
    /// is re-established and `op` runs again: at most `reconnect_attempts` connection attempts,
    /// all within the step timeout from now. `op` must be idempotent at the peer.
    fn on_link<T>(
        &self,
        peer: u32,
        conn: &mut PeerLink,
        mut op: impl FnMut(&mut Link) -> std::result::Result<T, LinkFault>,
    ) -> std::result::Result<T, String> {
        let deadline = Instant::now() + self.shared.step_timeout;
        let budget = self.shared.link.reconnect_attempts;
        let mut attempts = 0u32;
        let mut why = "the link is down".to_string();
        loop {
            if let Some(link) = conn.link.as_mut() {
                match op(link) {
                    Ok(value) => return Ok(value),
                    Err(LinkFault::Fatal(e)) => return Err(e),
                    Err(LinkFault::Broken(e)) => {
                        if let Some(old) = conn.link.take() {
                            old.shutdown();
                        }
                        why = e;
                    }
                }
            }
            let mut last = String::new();
            loop {
                if self.closed.load(Ordering::SeqCst) {
                    return Err(format!("the link to rank {peer} broke ({why}) after the generation closed"));
                }
                if let Some(reason) = self.shared.abort_reason(self.generation) {
                    return Err(reason);
                }
                let now = Instant::now();
                if attempts >= budget || now >= deadline {
                    self.shared.links.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        generation = self.generation,
                        peer,
                        attempts,
                        "the link to rank {peer} could not be re-established ({why}; last: {last})"
                    );
                    return Err(format!(
                        "the link to rank {peer} broke ({why}); {attempts} reconnect attempts failed \
                         (last: {last})"
                    ));
                }
                if attempts > 0 {
                    let pause = RECONNECT_BACKOFF
                        .saturating_mul(1 << (attempts - 1).min(10))
                        .min(RECONNECT_BACKOFF_MAX)
                        .min(deadline.saturating_duration_since(now));
                    std::thread::sleep(pause);
                }
                attempts += 1;
                match self.reestablish(peer, conn, deadline) {
                    Ok(resent) => {
                        self.shared.links.restored.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            generation = self.generation,
                            peer,
                            attempt = attempts,
                            resent,
                            "re-established the link to rank {peer} after: {why}"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::info!(
                            generation = self.generation,
                            peer,
                            attempt = attempts,
                            "reconnect: {e}"
                        );
                        last = e;
                    }
                }
            }
        }
    }

    /// Dials `peer` again and sends the pushes it may not have consumed. Returns how many.
    fn reestablish(
        &self,
        peer: u32,
        conn: &mut PeerLink,
        deadline: Instant,
    ) -> std::result::Result<usize, String> {
        let addr = *self.addrs.get(&peer).ok_or_else(|| format!("rank {peer} is not a peer"))?;
        let mut link = dial(&self.shared, self.generation, peer, addr, deadline, false)?;
        for (_, step, round, payload) in &conn.unacked {
            let (step, round) = (*step, *round);
            let msg = Msg::Push { generation: self.generation, step, round, payload: payload.clone() };
            let n =
                link.send(&msg).map_err(|e| format!("sending round {round} of step {step} again: {e}"))?;
            self.shared.traffic.collective_bytes.fetch_add(n, Ordering::Relaxed);
        }
        conn.link = Some(link);
        Ok(conn.unacked.len())
    }

    /// Sends `peer` its push of `round` of `step`, kept until the peer shows it consumed it.
    fn push(&self, peer: u32, step: u64, round: u8, payload: Vec<u8>) -> std::result::Result<u64, String> {
        // Rounds run in lockstep: the peer's n-th push means it consumed our first n - 1.
        let received = self.shared.inbox().map_err(|e| e.to_string())?.received_from(self.generation, peer);
        let mut conn = self.lock(peer)?;
        conn.unacked.retain(|u| u.0 + 1 >= received);
        let seq = conn.sent;
        conn.sent += 1;
        conn.unacked.push_back((seq, step, round, payload.clone()));
        let msg = Msg::Push { generation: self.generation, step, round, payload };
        self.on_link(peer, &mut conn, |link| {
            link.send(&msg).map_err(|e| LinkFault::Broken(format!("rank {peer}: {e}")))
        })
    }

    /// Re-establishes `peer`'s link if it broke (a peek, nothing consumed). A link in use is
    /// left to its user, who finds out.
    fn repair(&self, peer: u32) -> std::result::Result<(), String> {
        let Some(conn) = self.conns.get(&peer) else { return Ok(()) };
        let Ok(mut conn) = conn.try_lock() else { return Ok(()) };
        if conn.link.as_ref().is_some_and(|l| !l.is_broken()) {
            return Ok(());
        }
        if let Some(old) = conn.link.take() {
            old.shutdown();
        }
        self.on_link(peer, &mut conn, |_| Ok(()))
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

    /// One request and its answer on `peer`'s connection, within the step timeout (asked again
    /// on a re-established link); does not abandon the step on failure (the caller decides).
    fn request(&self, peer: u32, msg: &Msg) -> std::result::Result<(Msg, u64), String> {
        let mut conn = self.lock(peer)?;
        let (stop, step_timeout) = (&self.shared.stop, self.shared.step_timeout);
        self.on_link(peer, &mut conn, |link| {
            let sent = link.send(msg).map_err(|e| LinkFault::Broken(format!("rank {peer} is gone: {e}")))?;
            let deadline = Instant::now() + step_timeout;
            loop {
                match link.recv() {
                    Ok(Some(answer)) => return Ok((answer, sent)),
                    Ok(None) => {}
                    Err(e) => return Err(broken_or_fatal(peer, e)),
                }
                if stop.load(Ordering::SeqCst) {
                    return Err(LinkFault::Fatal("stopping".into()));
                }
                if Instant::now() >= deadline {
                    return Err(LinkFault::Fatal(format!(
                        "rank {peer} did not answer within {step_timeout:?}"
                    )));
                }
            }
        })
    }

    /// Leaves the generation: tells every peer (a goodbye, so it stops waiting for this member
    /// at once instead of for a reconnect) and closes every outgoing connection.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for conn in self.conns.values() {
            if let Ok(mut c) = conn.lock()
                && let Some(mut link) = c.link.take()
            {
                let _ = link.send(&Msg::Refused { reason: format!("rank {} left", self.shared.rank) });
                link.shutdown();
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
        let mut conn = self.lock(peer).map_err(|e| self.fail(e))?;
        let (shared, generation) = (&self.shared, self.generation);
        let answer = self.on_link(peer, &mut conn, |link| {
            let sent = link.send(msg).map_err(|e| LinkFault::Broken(format!("rank {peer} is gone: {e}")))?;
            shared.traffic.expert_bytes.fetch_add(sent, Ordering::Relaxed);
            let deadline = Instant::now() + shared.step_timeout;
            loop {
                match link.recv() {
                    Ok(Some(Msg::Reply { data })) => return Ok(data),
                    Ok(Some(Msg::Refused { reason })) => {
                        return Err(LinkFault::Fatal(format!("rank {peer} refused: {reason}")));
                    }
                    Ok(Some(other)) => {
                        return Err(LinkFault::Fatal(format!("rank {peer} answered {other:?}")));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(broken_or_fatal(peer, e)),
                }
                if let Some(reason) = shared.abort_reason(generation) {
                    return Err(LinkFault::Fatal(reason));
                }
                if Instant::now() >= deadline {
                    return Err(LinkFault::Fatal(format!(
                        "rank {peer} did not answer within {:?}",
                        shared.step_timeout
                    )));
                }
            }
        });
        answer.map_err(|e| self.fail(e))
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
            let n = self.push(peer, step, round, payload).map_err(|e| self.fail(e))?;
            self.shared.traffic.collective_bytes.fetch_add(n, Ordering::Relaxed);
        }
        let others: Vec<u32> = self.members.iter().copied().filter(|&r| r != self.shared.rank).collect();
        let g = self.generation;
        let deadline = Instant::now() + self.shared.step_timeout;
        let mut probed = Instant::now();
        let mut inbox = self.shared.inbox().map_err(|e| self.fail(e.to_string()))?;
        loop {
            match inbox.take_round(g, step, round, &others) {
                RoundState::Complete(pushes) => return Ok(pushes),
                RoundState::Lost(r) => {
                    drop(inbox);
                    return Err(self.fail(format!("rank {r} left generation {g} during step {step}")));
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
            // Our own links are checked while we wait: one that broke after a push went out
            // (the push may be lost with it) is re-established and the push sent again, or the
            // peer would wait for it while we wait for the peer. A member whose connection here
            // broke may be gone (killed) or alive (the connection was reset): our link to it
            // tells too; a dead member's cannot be re-established.
            if probed.elapsed() >= POLL {
                drop(inbox);
                for &peer in &others {
                    self.repair(peer).map_err(|e| self.fail(e))?;
                }
                inbox = self.shared.inbox().map_err(|e| self.fail(e.to_string()))?;
                probed = Instant::now();
                continue;
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
