//! What a member's threads share: the trainer, the expert service, which step may be served, and
//! the inbox of collective pushes — bounded per peer and per generation, so no peer (even an
//! authenticated one gone wrong) can make a worker buffer without limit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::link::LinkConfig;
use super::peer::PeerStore;
use super::service::ExpertService;
use crate::error::{Result, WorkerError};
use crate::trainer::Trainer;

/// How often blocked reads and waits re-check for an abort.
pub const POLL: Duration = Duration::from_millis(50);

/// Most pushes buffered from one peer for one generation. A step has five rounds and a peer can
/// be at most one round ahead of a barrier, so a correct peer never has more than two waiting.
pub const MAX_PENDING_PUSHES_PER_PEER: usize = 8;
/// Rounds remembered as consumed per sender: a push is sent again only while unacknowledged,
/// at most two rounds back.
pub const CONSUMED_KEPT: usize = 8;
/// Most generations with pushes buffered at once (the current one and a few a faster peer
/// already joined).
pub const MAX_PENDING_GENERATIONS: usize = 4;

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

/// Links to peers re-established within a generation (a reset connection to a live peer), and
/// reconnect budgets exhausted (the step was abandoned).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Outgoing links re-established and their unacknowledged messages sent again.
    pub restored: AtomicU64,
    /// Links that could not be re-established within the reconnect budget.
    pub failed: AtomicU64,
}

/// Why a push was not buffered (the connection that brought it is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushRefused {
    /// The peer already has [`MAX_PENDING_PUSHES_PER_PEER`] pushes waiting in this generation.
    #[error("rank {from} has {MAX_PENDING_PUSHES_PER_PEER} pushes waiting in generation {generation}")]
    PeerFull {
        /// Generation.
        generation: u64,
        /// Sender.
        from: u32,
    },
    /// Pushes of [`MAX_PENDING_GENERATIONS`] other generations are waiting already.
    #[error("pushes of {MAX_PENDING_GENERATIONS} generations are waiting; generation {0} is refused")]
    TooManyGenerations(u64),
    /// The same round of the same step came twice with different contents (a push sent again
    /// after a reconnect is the same bytes, and is ignored).
    #[error("rank {from} sent round {round} of step {step} twice, differently")]
    Duplicate {
        /// Sender.
        from: u32,
        /// Step.
        step: u64,
        /// Round.
        round: u8,
    },
}

/// Pushes received before the round that consumes them, and closed connections, by generation.
///
/// A push is identified by (generation, step, round, sender); rounds follow each other in
/// (step, round) order. A push sent again after a reconnect is ignored: one already waiting
/// or one of a round already consumed.
#[derive(Debug, Default)]
pub struct Inbox {
    pushes: BTreeMap<(u64, u64, u8, u32), Vec<u8>>,
    /// Senders that left the generation (they said so, or could not be reached again).
    lost: BTreeSet<(u64, u32)>,
    /// Senders whose connection broke without a goodbye, since when: they may reconnect.
    broken: BTreeMap<(u64, u32), Instant>,
    /// The last rounds consumed from each sender (at most [`CONSUMED_KEPT`]), by generation.
    consumed: BTreeMap<(u64, u32), VecDeque<(u64, u8)>>,
    /// Pushes received from each sender, by generation: a sender whose n-th push came
    /// finished its rounds before it, consuming our first n - 1 pushes (an acknowledgement).
    received: BTreeMap<(u64, u32), u64>,
    /// Generations older than this are over: their pushes are dropped.
    floor: u64,
}

/// One round's outcome so far.
#[derive(Debug, PartialEq, Eq)]
pub enum RoundState {
    /// Every other member's push, by rank.
    Complete(BTreeMap<u32, Vec<u8>>),
    /// This member closed its connection before sending its push.
    Lost(u32),
    /// Still waiting.
    Waiting,
}

impl Inbox {
    /// Buffers `from`'s push for `round` of `step` in `generation`, within the bounds.
    pub fn push(
        &mut self,
        generation: u64,
        from: u32,
        step: u64,
        round: u8,
        payload: Vec<u8>,
    ) -> std::result::Result<(), PushRefused> {
        if generation < self.floor {
            return Ok(()); // an older generation's leftover: nobody will read it
        }
        let key = (generation, step, round, from);
        if self.consumed.get(&(generation, from)).is_some_and(|done| done.contains(&(step, round))) {
            return Ok(()); // sent again after a reconnect; consumed already
        }
        if let Some(waiting) = self.pushes.get(&key) {
            if *waiting == payload {
                return Ok(()); // sent again after a reconnect
            }
            return Err(PushRefused::Duplicate { from, step, round });
        }
        let generations: BTreeSet<u64> = self.pushes.keys().map(|k| k.0).collect();
        if !generations.contains(&generation) && generations.len() >= MAX_PENDING_GENERATIONS {
            return Err(PushRefused::TooManyGenerations(generation));
        }
        let waiting = self.pushes.range((generation, 0, 0, 0)..=(generation, u64::MAX, u8::MAX, u32::MAX));
        if waiting.filter(|(k, _)| k.3 == from).count() >= MAX_PENDING_PUSHES_PER_PEER {
            return Err(PushRefused::PeerFull { generation, from });
        }
        self.pushes.insert(key, payload);
        *self.received.entry((generation, from)).or_default() += 1;
        Ok(())
    }

    /// Records that `rank` left `generation` (it said goodbye, or cannot be reached).
    pub fn lost(&mut self, generation: u64, rank: u32) {
        if generation >= self.floor {
            self.lost.insert((generation, rank));
        }
    }

    /// Records that the connection of `rank` in `generation` broke without a goodbye (it may
    /// reconnect).
    pub fn broken(&mut self, generation: u64, rank: u32) {
        if generation >= self.floor {
            self.broken.entry((generation, rank)).or_insert_with(Instant::now);
        }
    }

    /// Records that `rank` authenticated a new connection in `generation`.
    pub fn restored(&mut self, generation: u64, rank: u32) {
        self.broken.remove(&(generation, rank));
    }

    /// The members of `generation` whose connection is broken, and since when.
    pub fn broken_since(&self, generation: u64) -> Vec<(u32, Instant)> {
        self.broken.range((generation, 0)..=(generation, u32::MAX)).map(|(k, t)| (k.1, *t)).collect()
    }

    /// Pushes received from `rank` in `generation` (repeats not counted): it consumed all but
    /// the last of ours.
    pub fn received_from(&self, generation: u64, rank: u32) -> u64 {
        self.received.get(&(generation, rank)).copied().unwrap_or(0)
    }

    /// Drops everything of generations before `generation`.
    pub fn advance(&mut self, generation: u64) {
        self.floor = self.floor.max(generation);
        let floor = self.floor;
        self.pushes.retain(|k, _| k.0 >= floor);
        self.lost.retain(|k| k.0 >= floor);
        self.broken.retain(|k, _| k.0 >= floor);
        self.consumed.retain(|k, _| k.0 >= floor);
        self.received.retain(|k, _| k.0 >= floor);
    }

    /// Takes `round` of `step` in `generation` when every one of `others` pushed it.
    pub fn take_round(&mut self, generation: u64, step: u64, round: u8, others: &[u32]) -> RoundState {
        if others.iter().all(|r| self.pushes.contains_key(&(generation, step, round, *r))) {
            for r in others {
                let done = self.consumed.entry((generation, *r)).or_default();
                done.push_back((step, round));
                if done.len() > CONSUMED_KEPT {
                    done.pop_front();
                }
            }
            return RoundState::Complete(
                others
                    .iter()
                    .filter_map(|r| self.pushes.remove(&(generation, step, round, *r)).map(|p| (*r, p)))
                    .collect(),
            );
        }
        let gone = others.iter().find(|r| {
            self.lost.contains(&(generation, **r))
                && !self.pushes.contains_key(&(generation, step, round, **r))
        });
        gone.map_or(RoundState::Waiting, |r| RoundState::Lost(*r))
    }

    /// Pushes buffered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.pushes.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.pushes.is_empty()
    }
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
    /// How connections are authenticated and bounded.
    pub link: LinkConfig,
    /// In-memory peer snapshots: own, and copies held for buddies (kept across generations).
    pub peers: Mutex<PeerStore>,
    /// Links re-established, and reconnect budgets exhausted.
    pub links: LinkCounters,
    state: Mutex<ServeState>,
    changed: Condvar,
    inbox: Mutex<Inbox>,
    arrived: Condvar,
}

impl Shared {
    /// Fresh state for `rank`.
    pub fn new(rank: u32, step_timeout: Duration, link: LinkConfig) -> Arc<Self> {
        Arc::new(Self {
            rank,
            trainer: RwLock::new(None),
            service: ExpertService::default(),
            traffic: Traffic::default(),
            seen_generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            step_timeout,
            link,
            peers: Mutex::new(PeerStore::default()),
            links: LinkCounters::default(),
            state: Mutex::new(ServeState::default()),
            changed: Condvar::new(),
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
        })
    }

    fn lock_state(&self) -> Result<MutexGuard<'_, ServeState>> {
        self.state.lock().map_err(|_| WorkerError::Rendezvous("serve state lock poisoned".into()))
    }

    /// The inbox, locked.
    pub fn inbox(&self) -> Result<MutexGuard<'_, Inbox>> {
        self.inbox.lock().map_err(|_| WorkerError::Rendezvous("inbox lock poisoned".into()))
    }

    /// Buffers a push that arrived on `from`'s authenticated connection, and wakes the waiter.
    pub fn deliver_push(
        &self,
        generation: u64,
        from: u32,
        step: u64,
        round: u8,
        payload: Vec<u8>,
    ) -> std::result::Result<(), PushRefused> {
        let Ok(mut inbox) = self.inbox.lock() else { return Ok(()) };
        let outcome = inbox.push(generation, from, step, round, payload);
        drop(inbox);
        self.arrived.notify_all();
        outcome
    }

    /// Records that `rank` left `generation` (its connection ended with a goodbye), and wakes the
    /// waiter.
    pub fn deliver_lost(&self, generation: u64, rank: u32) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.lost(generation, rank);
        }
        self.arrived.notify_all();
    }

    /// Records that `rank`'s authenticated connection of `generation` broke without a goodbye
    /// (it may reconnect), and wakes the waiter.
    pub fn deliver_broken(&self, generation: u64, rank: u32) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.broken(generation, rank);
        }
        self.arrived.notify_all();
    }

    /// Records that `rank` authenticated a new connection in `generation`.
    pub fn deliver_restored(&self, generation: u64, rank: u32) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.restored(generation, rank);
        }
        self.arrived.notify_all();
    }

    /// Waits up to `wait` for the next push or loss.
    pub fn wait_arrival<'a>(
        &self,
        inbox: MutexGuard<'a, Inbox>,
        wait: Duration,
    ) -> Result<MutexGuard<'a, Inbox>> {
        self.arrived
            .wait_timeout(inbox, wait)
            .map(|(guard, _)| guard)
            .map_err(|_| WorkerError::Rendezvous("inbox lock poisoned".into()))
    }

    /// The generation being served (or last served).
    pub fn serving_generation(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.generation)
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

    /// Stops serving (between generations) and drops older generations' pushes.
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
        self.inbox()?.advance(generation);
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
    pub fn wait_serving(&self, generation: u64, step: u64) -> std::result::Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_is_bounded_per_peer_per_generation_and_in_generations() {
        let mut inbox = Inbox::default();
        for step in 0..MAX_PENDING_PUSHES_PER_PEER as u64 {
            inbox.push(1, 2, step, 1, vec![0; 4]).unwrap();
        }
        assert_eq!(inbox.push(1, 2, 99, 1, vec![]), Err(PushRefused::PeerFull { generation: 1, from: 2 }));
        inbox.push(1, 3, 0, 1, vec![]).unwrap(); // another peer has its own budget
        inbox.push(1, 3, 0, 1, vec![]).unwrap(); // the same push again (a reconnect): ignored
        assert_eq!(
            inbox.push(1, 3, 0, 1, vec![1]),
            Err(PushRefused::Duplicate { from: 3, step: 0, round: 1 })
        );
        for g in 2..=MAX_PENDING_GENERATIONS as u64 {
            inbox.push(g, 2, 0, 1, vec![]).unwrap();
        }
        assert_eq!(inbox.push(100, 2, 0, 1, vec![]), Err(PushRefused::TooManyGenerations(100)));
        inbox.advance(2);
        assert_eq!(inbox.len(), MAX_PENDING_GENERATIONS - 1, "generation 1 dropped");
        inbox.push(1, 2, 0, 1, vec![]).unwrap();
        assert_eq!(inbox.len(), MAX_PENDING_GENERATIONS - 1, "a stale push is not kept");
        inbox.push(100, 2, 0, 1, vec![]).unwrap();
    }

    #[test]
    fn a_round_completes_with_every_push_or_names_the_lost_member() {
        let mut inbox = Inbox::default();
        inbox.push(1, 1, 5, 2, vec![1]).unwrap();
        assert_eq!(inbox.take_round(1, 5, 2, &[1, 2]), RoundState::Waiting);
        inbox.lost(1, 2);
        assert_eq!(inbox.take_round(1, 5, 2, &[1, 2]), RoundState::Lost(2));
        inbox.push(1, 2, 5, 2, vec![2]).unwrap();
        assert_eq!(
            inbox.take_round(1, 5, 2, &[1, 2]),
            RoundState::Complete(BTreeMap::from([(1, vec![1]), (2, vec![2])]))
        );
        assert!(inbox.is_empty());
    }

    #[test]
    fn pushes_sent_again_after_a_reconnect_are_ignored_and_acknowledge_earlier_rounds() {
        let mut inbox = Inbox::default();
        inbox.push(1, 2, 5, 1, vec![7]).unwrap();
        assert_eq!(inbox.received_from(1, 2), 1);
        assert_eq!(inbox.take_round(1, 5, 1, &[2]), RoundState::Complete(BTreeMap::from([(2, vec![7])])));
        // Round 1 consumed: sent again, it is dropped (not kept as a new push, not refused).
        inbox.push(1, 2, 5, 1, vec![7]).unwrap();
        assert!(inbox.is_empty(), "{inbox:?}");
        inbox.push(1, 2, 5, 2, vec![8]).unwrap();
        inbox.push(1, 2, 5, 2, vec![8]).unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox.received_from(1, 2), 2, "rank 2 finished round 1");
        assert_eq!(inbox.received_from(1, 3), 0);
    }

    #[test]
    fn a_broken_connection_waits_for_a_reconnect_a_goodbye_is_a_loss() {
        let mut inbox = Inbox::default();
        inbox.broken(1, 2);
        assert_eq!(inbox.broken_since(1).iter().map(|b| b.0).collect::<Vec<_>>(), [2]);
        assert_eq!(inbox.take_round(1, 0, 1, &[2]), RoundState::Waiting, "broken is not lost");
        inbox.restored(1, 2);
        assert!(inbox.broken_since(1).is_empty());
        inbox.lost(1, 2);
        assert_eq!(inbox.take_round(1, 0, 1, &[2]), RoundState::Lost(2));
        inbox.broken(1, 3);
        inbox.advance(2);
        assert!(inbox.broken_since(1).is_empty(), "an older generation's state is dropped");
    }
}
