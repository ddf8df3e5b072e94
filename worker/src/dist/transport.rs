//! Worker-to-worker communication: the [`Collective`] trait and its TCP implementation.
//!
//! Every worker listens on one TCP port (published in etcd under `members/<rank>`). For each
//! generation, each worker opens one connection to every other member and uses it for its own
//! requests (expert forward/backward, answered on the same connection) and for its pushes to
//! that member (collective rounds). The accepting side runs one handler thread per connection:
//! it answers expert requests from the [`ExpertService`] and forwards pushes to the inbox.
//!
//! No wait is unbounded: reads time out every [`POLL`] and re-check whether the step must be
//! abandoned (the process is stopping, etcd shows a newer generation, a member's connection
//! closed, or the step deadline passed). A killed peer's sockets are closed by its kernel, so
//! its death is seen at once as end-of-file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::service::ExpertService;
use super::wire::{FrameReader, Msg, ReadError, write_frame};
use crate::error::{Result, WorkerError};
use crate::trainer::Trainer;

/// How often blocked reads and waits re-check for an abort.
pub const POLL: Duration = Duration::from_millis(50);

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

/// What the handler threads tell the main thread.
#[derive(Debug)]
enum Inbound {
    Push { generation: u64, step: u64, round: u8, from: u32, payload: Vec<u8> },
    Lost { generation: u64, rank: u32 },
}

/// Which step the expert service may serve.
#[derive(Debug, Default)]
struct ServeState {
    generation: u64,
    /// `Some(step)` while the step runs.
    step: Option<u64>,
    /// Why the current generation's step was abandoned, if it was.
    aborted: Option<String>,
}

/// Communication counters (bytes put on the wire by this worker).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Expert requests and their replies (the all-to-all).
    pub expert_bytes: AtomicU64,
    /// Collective rounds (gradient all-gather, norm partials, checkpoint gather).
    pub collective_bytes: AtomicU64,
    /// Token-activation payload that had to cross workers: rows × hidden × 4 bytes per
    /// direction of each remote expert call (the all-to-all's analytical minimum).
    pub expert_payload_bytes: AtomicU64,
}

/// State shared between the main thread, the handler threads and the etcd watcher.
pub struct Shared {
    /// This worker's rank.
    pub rank: u32,
    /// The training state, read while computing, written while updating.
    pub trainer: RwLock<Option<Trainer>>,
    /// Served expert calls of the current step.
    pub service: ExpertService,
    /// Bytes sent.
    pub traffic: Traffic,
    /// Newest generation seen in etcd (written by the watcher).
    pub seen_generation: AtomicU64,
    /// Set when the process is shutting down.
    pub stop: AtomicBool,
    /// Longest a step may wait for any one peer.
    pub step_timeout: Duration,
    state: Mutex<ServeState>,
    changed: Condvar,
    inbox_tx: Mutex<Sender<Inbound>>,
    inbox_rx: Mutex<Receiver<Inbound>>,
    pending: Mutex<Pending>,
}

/// Pushes received before the round that consumes them, and closed connections, by generation.
#[derive(Debug, Default)]
struct Pending {
    pushes: BTreeMap<(u64, u64, u8, u32), Vec<u8>>,
    lost: BTreeSet<(u64, u32)>,
}

impl Shared {
    /// Fresh state for `rank`.
    pub fn new(rank: u32, step_timeout: Duration) -> Arc<Self> {
        let (tx, rx) = channel();
        Arc::new(Self {
            rank,
            trainer: RwLock::new(None),
            service: ExpertService::default(),
            traffic: Traffic::default(),
            seen_generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            step_timeout,
            state: Mutex::new(ServeState::default()),
            changed: Condvar::new(),
            inbox_tx: Mutex::new(tx),
            inbox_rx: Mutex::new(rx),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn lock_state(&self) -> Result<std::sync::MutexGuard<'_, ServeState>> {
        self.state.lock().map_err(|_| WorkerError::Rendezvous("serve state lock poisoned".into()))
    }

    /// Starts serving `step` of `generation` (clears what an abandoned step left behind).
    pub fn open_step(&self, generation: u64, step: u64) -> Result<()> {
        let mut s = self.lock_state()?;
        if s.generation != generation || s.step != Some(step) {
            self.service.clear();
        }
        s.generation = generation;
        s.step = Some(step);
        s.aborted = None;
        drop(s);
        self.changed.notify_all();
        Ok(())
    }

    /// Stops serving (between generations).
    pub fn close(&self, generation: u64) -> Result<()> {
        let mut s = self.lock_state()?;
        if generation > s.generation {
            // An abort belongs to its generation: a new one starts clean, or peers asking for its
            // first step would be refused with the old generation's reason.
            s.aborted = None;
        }
        s.generation = s.generation.max(generation);
        s.step = None;
        drop(s);
        self.service.clear();
        self.changed.notify_all();
        Ok(())
    }

    /// Marks the step of `generation` abandoned, so pending requests are refused.
    pub fn abort(&self, generation: u64, reason: &str) {
        if let Ok(mut s) = self.state.lock()
            && s.generation == generation
            && s.aborted.is_none()
        {
            s.aborted = Some(reason.to_string());
        }
        self.changed.notify_all();
    }

    /// Why the step of `generation` must stop, if it must.
    pub fn abort_reason(&self, generation: u64) -> Option<String> {
        if self.stop.load(Ordering::SeqCst) {
            return Some("the worker is stopping".into());
        }
        let seen = self.seen_generation.load(Ordering::SeqCst);
        if seen > generation {
            return Some(format!("generation {seen} was published"));
        }
        self.state.lock().ok().and_then(|s| if s.generation == generation { s.aborted.clone() } else { None })
    }

    /// Waits until `step` of `generation` is being served. `Err(reason)` when it never will be.
    fn wait_serving(&self, generation: u64, step: u64) -> std::result::Result<(), String> {
        let deadline = Instant::now() + self.step_timeout;
        let Ok(mut s) = self.state.lock() else { return Err("state lock poisoned".into()) };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err("the owner is stopping".into());
            }
            if s.generation > generation || (s.generation == generation && s.aborted.is_some()) {
                return Err(format!("the owner left generation {generation}"));
            }
            if s.generation == generation {
                match s.step {
                    Some(current) if current == step => return Ok(()),
                    Some(current) if current > step => return Err(format!("step {step} is over")),
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out waiting to serve step {step}"));
            }
            s = match self.changed.wait_timeout(s, POLL) {
                Ok((guard, _)) => guard,
                Err(_) => return Err("state lock poisoned".into()),
            };
        }
    }
}

/// Accepts connections on `listener` and serves them, each on its own thread, until `stop`.
pub fn serve(listener: TcpListener, shared: Arc<Shared>) -> Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true).map_err(|e| WorkerError::Rendezvous(format!("listener: {e}")))?;
    std::thread::Builder::new()
        .name("peer-listener".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = shared.clone();
                        let spawned = std::thread::Builder::new()
                            .name("peer-handler".into())
                            .spawn(move || handle(stream, &shared));
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

fn handle(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(POLL));
    let mut reader = FrameReader::new();
    let mut peer: Option<(u64, u32)> = None;
    let inbox = match shared.inbox_tx.lock() {
        Ok(tx) => tx.clone(),
        Err(_) => return,
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let msg = match reader.next(&mut stream) {
            Ok(Some(msg)) => msg,
            Ok(None) => continue,
            Err(err) => {
                if let Some((generation, rank)) = peer {
                    tracing::debug!(rank, generation, "connection from rank {rank} ended: {err}");
                    let _ = inbox.send(Inbound::Lost { generation, rank });
                }
                return;
            }
        };
        let reply = match msg {
            Msg::Hello { generation, rank } => {
                peer = Some((generation, rank));
                continue;
            }
            Msg::Push { generation, step, round, from, payload } => {
                let _ = inbox.send(Inbound::Push { generation, step, round, from, payload });
                continue;
            }
            Msg::Forward { generation, step, call, rows, data } => {
                match shared.wait_serving(generation, step) {
                    Ok(()) => {
                        match shared.service.forward(shared, generation, step, call, rows as usize, data) {
                            Ok(data) => Msg::Reply { data },
                            Err(e) => Msg::Refused { reason: e.to_string() },
                        }
                    }
                    Err(reason) => Msg::Refused { reason },
                }
            }
            Msg::Backward { generation, step, call, rows, data } => {
                match shared.wait_serving(generation, step) {
                    Ok(()) => {
                        match shared.service.backward(shared, generation, step, call, rows as usize, data) {
                            Ok(data) => Msg::Reply { data },
                            Err(e) => Msg::Refused { reason: e.to_string() },
                        }
                    }
                    Err(reason) => Msg::Refused { reason },
                }
            }
            Msg::Reply { .. } | Msg::Refused { .. } => Msg::Refused { reason: "unexpected reply".into() },
        };
        match write_frame(&mut stream, &reply) {
            Ok(n) => {
                shared.traffic.expert_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => {
                if let Some((generation, rank)) = peer {
                    let _ = inbox.send(Inbound::Lost { generation, rank });
                }
                return;
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    reader: FrameReader,
}

/// The TCP [`Collective`] of one member in one generation.
pub struct TcpCollective {
    shared: Arc<Shared>,
    generation: u64,
    members: Vec<u32>,
    conns: BTreeMap<u32, Mutex<Conn>>,
}

impl TcpCollective {
    /// Connects to every other member (`addrs` by rank) within `timeout`.
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
            let mut stream = loop {
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
            stream.set_read_timeout(Some(POLL)).map_err(io)?;
            write_frame(&mut stream, &Msg::Hello { generation, rank: shared.rank }).map_err(io)?;
            conns.insert(rank, Mutex::new(Conn { stream, reader: FrameReader::new() }));
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
        write_frame(&mut conn.stream, msg).map_err(|e| self.fail(format!("rank {peer} is gone: {e}")))
    }

    /// Closes every outgoing connection, so peers waiting on us see the end at once.
    pub fn shutdown(&self) {
        for conn in self.conns.values() {
            if let Ok(c) = conn.lock() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Moves what the handler threads received into the pending buffer (keeping newer
    /// generations' pushes, dropping older ones). Returns whether anything arrived.
    fn drain_inbox(&self, wait: Duration) -> Result<bool> {
        let rx = self.shared.inbox_rx.lock().map_err(|_| self.fail("inbox lock poisoned".into()))?;
        let first = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => return Ok(false),
            Err(RecvTimeoutError::Disconnected) => return Err(self.fail("inbox closed".into())),
        };
        let mut msgs = vec![first];
        msgs.extend(rx.try_iter());
        drop(rx);
        let mut pending =
            self.shared.pending.lock().map_err(|_| self.fail("pending lock poisoned".into()))?;
        let current = self.generation;
        pending.pushes.retain(|k, _| k.0 >= current);
        pending.lost.retain(|k| k.0 >= current);
        for m in msgs {
            match m {
                Inbound::Push { generation, step, round, from, payload } if generation >= current => {
                    pending.pushes.insert((generation, step, round, from), payload);
                }
                Inbound::Lost { generation, rank } if generation >= current => {
                    pending.lost.insert((generation, rank));
                }
                _ => {} // an older generation's leftovers
            }
        }
        Ok(true)
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
        let sent =
            write_frame(&mut conn.stream, msg).map_err(|e| self.fail(format!("rank {peer} is gone: {e}")))?;
        self.shared.traffic.expert_bytes.fetch_add(sent, Ordering::Relaxed);
        let deadline = Instant::now() + self.shared.step_timeout;
        loop {
            let Conn { stream, reader } = &mut *conn;
            match reader.next(stream) {
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
            let msg = Msg::Push { generation: self.generation, step, round, from: self.shared.rank, payload };
            let n = self.send(peer, &msg)?;
            self.shared.traffic.collective_bytes.fetch_add(n, Ordering::Relaxed);
        }
        let others: Vec<u32> = self.members.iter().copied().filter(|&r| r != self.shared.rank).collect();
        let g = self.generation;
        let deadline = Instant::now() + self.shared.step_timeout;
        loop {
            {
                let mut pending =
                    self.shared.pending.lock().map_err(|_| self.fail("pending lock poisoned".into()))?;
                if others.iter().all(|r| pending.pushes.contains_key(&(g, step, round, *r))) {
                    return Ok(others
                        .iter()
                        .filter_map(|r| pending.pushes.remove(&(g, step, round, *r)).map(|p| (*r, p)))
                        .collect());
                }
                let gone = others.iter().find(|r| {
                    pending.lost.contains(&(g, **r)) && !pending.pushes.contains_key(&(g, step, round, **r))
                });
                if let Some(r) = gone {
                    let reason = format!("rank {r} closed its connection during step {step}");
                    drop(pending);
                    return Err(self.fail(reason));
                }
            }
            self.check_abort()?;
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "round {round} of step {step} incomplete after {:?}",
                    self.shared.step_timeout
                )));
            }
            self.drain_inbox(POLL)?;
        }
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Writes a frame, for callers outside this module (tests).
pub fn send_frame(stream: &mut impl Write, msg: &Msg) -> std::io::Result<u64> {
    write_frame(stream, msg)
}
