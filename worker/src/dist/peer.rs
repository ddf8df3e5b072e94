//! In-memory peer snapshots (issue 21): what a member keeps in host memory so a generation can
//! roll back to a recent step without reading a checkpoint.
//!
//! Every `peer_interval_steps` steps a member copies its own training state (dense parameters,
//! its experts, their Adam moments; the step is the data position) into this store and sends the
//! experts' part to each of its buddies, which keep it here as a held copy and acknowledge it. An
//! own snapshot is complete once every buddy acknowledged (two-phase): only complete steps are
//! published in the member's [`PeerRecord`], so the brain picks a step every member can restore.
//! The store keeps the [`KEEP`] newest complete snapshots (own, and per held rank), and older
//! ones for [`RETAIN`] after they completed (at most [`MAX_KEEP`]), so the brain's pick is still
//! here: it picks from records it read before it published, and the members train on until they
//! see the generation. Pure: no I/O; the caller passes the time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ninelives_core::recovery::PeerRecord;

use crate::model::ExpertId;
use crate::optim::Moments;
use crate::params::{HostTensor, ParamOwner};

/// Complete snapshots always kept, own and per held rank.
pub const KEEP: usize = 2;
/// How long an older complete snapshot (or held copy) is kept besides the [`KEEP`] newest. The
/// brain's pick lags the members by its record read, its decision and the generation's way back
/// to them: well under a second, which is less than two steps of a large model but may be
/// several of a small one (the demo's `tiny` model makes ~4 steps a second, and completed two
/// more snapshots in that time, evicting the step the brain picked).
pub const RETAIN: Duration = Duration::from_secs(2);
/// Complete snapshots kept at most, own and per held rank: bounds host memory when steps are
/// much shorter than [`RETAIN`].
pub const MAX_KEEP: usize = 6;
/// Own snapshots newer than the newest complete one kept while waiting for acknowledgements.
pub const MAX_PENDING: usize = 2;

/// One member's state at a step (or a part of it: a held copy has only experts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Completed updates (the data position: the next step to train).
    pub step: u64,
    /// Parameter values by name.
    pub params: BTreeMap<String, HostTensor>,
    /// Adam moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
}

impl Snapshot {
    /// Bytes of parameters and moments held.
    pub fn bytes(&self) -> u64 {
        let p: usize = self.params.values().map(|t| t.data.len()).sum();
        let m: usize = self.moments.values().map(|m| m.m.len() + m.v.len()).sum();
        ((p + m) * 4) as u64
    }

    /// The experts' part: what a buddy keeps.
    pub fn experts_only(&self) -> Snapshot {
        self.select(false, None)
    }

    /// The dense parameters when `dense`, and the experts in `experts` (all when `None`).
    pub fn select(&self, dense: bool, experts: Option<&[ExpertId]>) -> Snapshot {
        let keep = |name: &str| match ParamOwner::of(name) {
            ParamOwner::Dense => dense,
            ParamOwner::Expert(e) => experts.is_none_or(|x| x.contains(&e)),
        };
        Snapshot {
            step: self.step,
            params: self
                .params
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            moments: self
                .moments
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, m)| (n.clone(), m.clone()))
                .collect(),
        }
    }

    /// Routed experts present.
    pub fn experts(&self) -> BTreeSet<ExpertId> {
        self.params
            .keys()
            .filter_map(|n| match ParamOwner::of(n) {
                ParamOwner::Expert(e) => Some(e),
                ParamOwner::Dense => None,
            })
            .collect()
    }

    /// Whether any dense parameter is present.
    pub fn has_dense(&self) -> bool {
        self.params.keys().any(|n| ParamOwner::of(n) == ParamOwner::Dense)
    }

    /// Adds `other`'s tensors (same step).
    pub fn merge(&mut self, other: Snapshot) {
        self.params.extend(other.params);
        self.moments.extend(other.moments);
    }
}

/// Why a copy from a peer was not kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CopyRefused {
    /// This member is not a buddy of the sender in the current generation.
    #[error("rank {0} is not a member this one keeps copies for")]
    NotABuddy(u32),
    /// A copy carries only experts; dense parameters come from the member's own snapshot.
    #[error("rank {0} sent a copy with dense parameters")]
    Dense(u32),
}

#[derive(Debug)]
struct Own {
    snapshot: Arc<Snapshot>,
    /// Buddies that have not acknowledged their copy yet.
    waiting: BTreeSet<u32>,
    /// When the last buddy acknowledged (complete).
    completed: Option<Instant>,
}

/// A copy held for another member, and when it arrived.
#[derive(Debug)]
struct Held {
    copy: Arc<Snapshot>,
    at: Instant,
}

/// Of `(step, completed at)` pairs, the steps to keep: the [`KEEP`] newest, and those younger
/// than [`RETAIN`] among the [`MAX_KEEP`] newest.
fn retained(mut complete: Vec<(u64, Instant)>, now: Instant) -> BTreeSet<u64> {
    complete.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
    complete
        .into_iter()
        .enumerate()
        .filter(|(i, (_, at))| *i < KEEP || (*i < MAX_KEEP && now.saturating_duration_since(*at) < RETAIN))
        .map(|(_, (step, _))| step)
        .collect()
}

/// A member's own snapshots and the copies it holds for others.
#[derive(Debug, Default)]
pub struct PeerStore {
    generation: u64,
    own: BTreeMap<u64, Own>,
    held: BTreeMap<u32, BTreeMap<u64, Held>>,
    /// Ranks whose copies this member keeps in the current generation.
    keeps_for: BTreeSet<u32>,
    /// A rebalance's hand-off: experts this member held that others gain, at the steps the
    /// members may agree on, kept until the next generation (see [`PeerStore::hand_off`]).
    handoff: Vec<Arc<Snapshot>>,
}

impl PeerStore {
    /// Enters `generation`, where this member keeps copies for `keeps_for`. Copies held for
    /// ranks of earlier generations stay (a lost member's copy is what a restore needs).
    pub fn begin(&mut self, generation: u64, keeps_for: BTreeSet<u32>) {
        self.generation = generation;
        self.keeps_for = keeps_for;
        self.handoff.clear();
    }

    /// Keeps `parts` (experts only) for the members that gain them in this generation (a
    /// rebalance, [`Restore::Live`](ninelives_core::generation::Restore::Live)): this member may
    /// drop them at once, and a gainer still fetches them with [`PeerStore::find`].
    pub fn hand_off(&mut self, parts: Vec<Snapshot>) {
        self.handoff = parts.into_iter().map(|p| Arc::new(p.select(false, None))).collect();
    }

    /// Keeps this member's own `snapshot`, taken at `now`, complete once each of `buddies`
    /// acknowledged it (at once without buddies). Returns it, shared, for sending.
    pub fn add_own(&mut self, snapshot: Snapshot, buddies: &[u32], now: Instant) -> Arc<Snapshot> {
        let step = snapshot.step;
        let snapshot = Arc::new(snapshot);
        let waiting: BTreeSet<u32> = buddies.iter().copied().collect();
        let completed = waiting.is_empty().then_some(now);
        self.own.insert(step, Own { snapshot: snapshot.clone(), waiting, completed });
        self.retain_own(now);
        snapshot
    }

    /// Records `from`'s acknowledgement, at `now`, of the copy of step `step`; whether that
    /// made the snapshot complete.
    pub fn acked(&mut self, step: u64, from: u32, now: Instant) -> bool {
        let Some(own) = self.own.get_mut(&step) else { return false };
        let was = own.waiting.is_empty();
        own.waiting.remove(&from);
        let done = own.waiting.is_empty() && !was;
        if done {
            own.completed = Some(now);
            self.retain_own(now);
        }
        done
    }

    fn retain_own(&mut self, now: Instant) {
        let complete: Vec<(u64, Instant)> =
            self.own.iter().filter_map(|(s, o)| Some((*s, o.completed?))).collect();
        let newest_complete = complete.iter().map(|(s, _)| *s).max();
        let keep_complete = retained(complete, now);
        let pending: BTreeSet<u64> = self
            .own
            .iter()
            .filter(|(s, o)| !o.waiting.is_empty() && newest_complete.is_none_or(|c| **s > c))
            .map(|(s, _)| *s)
            .rev()
            .take(MAX_PENDING)
            .collect();
        self.own.retain(|s, _| keep_complete.contains(s) || pending.contains(s));
    }

    /// Steps of the complete own snapshots, ascending.
    pub fn complete(&self) -> Vec<u64> {
        self.own.iter().filter(|(_, o)| o.waiting.is_empty()).map(|(s, _)| *s).collect()
    }

    /// Keeps `from`'s copy (only experts), received at `now`, replacing one of the same step.
    pub fn hold(&mut self, from: u32, copy: Snapshot, now: Instant) -> Result<(), CopyRefused> {
        if !self.keeps_for.contains(&from) {
            return Err(CopyRefused::NotABuddy(from));
        }
        if copy.has_dense() {
            return Err(CopyRefused::Dense(from));
        }
        let copies = self.held.entry(from).or_default();
        copies.insert(copy.step, Held { copy: Arc::new(copy), at: now });
        let keep = retained(copies.iter().map(|(s, h)| (*s, h.at)).collect(), now);
        copies.retain(|s, _| keep.contains(s));
        Ok(())
    }

    /// This member's own snapshot of `step`, complete or not.
    pub fn own_at(&self, step: u64) -> Option<Arc<Snapshot>> {
        self.own.get(&step).map(|o| o.snapshot.clone())
    }

    /// What this member has of `step`: the dense parameters (from its own snapshot) when
    /// `dense`, and each of `experts` found in its own snapshot or in a held copy. Partial when
    /// it lacks some; `None` when it has nothing of that step.
    pub fn find(&self, step: u64, dense: bool, experts: &[ExpertId]) -> Option<Snapshot> {
        let mut out = Snapshot { step, ..Snapshot::default() };
        let mut missing: Vec<ExpertId> = experts.to_vec();
        let sources = self
            .own_at(step)
            .into_iter()
            .chain(self.held.values().filter_map(|c| c.get(&step).map(|h| h.copy.clone())))
            .chain(self.handoff.iter().filter(|h| h.step == step).cloned());
        let mut first = true;
        for source in sources {
            let own_dense = dense && first && self.own.contains_key(&step);
            first = false;
            let part = source.select(own_dense, Some(&missing));
            missing.retain(|e| !part.experts().contains(e));
            out.merge(part);
        }
        (!out.params.is_empty()).then_some(out)
    }

    /// Bytes held: own snapshots and copies.
    pub fn bytes(&self) -> (u64, u64) {
        let own = self.own.values().map(|o| o.snapshot.bytes()).sum();
        let held = self.held.values().flat_map(|c| c.values()).map(|h| h.copy.bytes()).sum();
        (own, held)
    }

    /// The record published at `peers/<rank>`.
    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            generation: self.generation,
            own: self.complete(),
            holds: self
                .held
                .iter()
                .filter(|(_, c)| !c.is_empty())
                .map(|(r, c)| (*r, c.keys().copied().collect()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(step: u64, experts: &[u32]) -> Snapshot {
        let mut s = Snapshot { step, ..Snapshot::default() };
        let t = |v: f32| HostTensor { shape: vec![2], data: vec![v, v + 0.5] };
        s.params.insert("embed".into(), t(step as f32));
        s.moments.insert("embed".into(), Moments { m: vec![0.0; 2], v: vec![1.0; 2] });
        for &e in experts {
            let name = format!("layers.0.experts.{e}.w_in");
            s.params.insert(name.clone(), t(e as f32 + step as f32));
            s.moments.insert(name, Moments { m: vec![2.0; 2], v: vec![3.0; 2] });
        }
        s
    }

    /// The time of event `i` when events are [`RETAIN`] apart: only the [`KEEP`] newest stay.
    fn apart(t0: Instant, i: u64) -> Instant {
        t0 + RETAIN * u32::try_from(i).unwrap()
    }

    #[test]
    fn a_snapshot_is_complete_only_after_every_buddy_acked() {
        let mut store = PeerStore::default();
        let now = Instant::now();
        store.add_own(snap(1, &[0]), &[2, 3], now);
        assert!(store.complete().is_empty());
        assert!(!store.acked(1, 2, now));
        assert!(store.complete().is_empty(), "one of two buddies is not enough");
        assert!(!store.acked(1, 9, now), "a stranger's ack changes nothing");
        assert!(store.acked(1, 3, now));
        assert_eq!(store.complete(), [1]);
        assert!(!store.acked(1, 3, now), "a repeated ack is not a new completion");
        assert_eq!(store.record().own, [1]);
    }

    #[test]
    fn the_two_newest_complete_snapshots_are_kept() {
        let mut store = PeerStore::default();
        let t0 = Instant::now();
        for step in 1..=5 {
            store.add_own(snap(step, &[0]), &[1], apart(t0, step));
            store.acked(step, 1, apart(t0, step));
        }
        assert_eq!(store.complete(), [4, 5]);
        assert!(store.own_at(3).is_none());
        // Incomplete newer ones wait (at most MAX_PENDING); the complete ones stay meanwhile.
        for step in 6..=9 {
            store.add_own(snap(step, &[0]), &[1], apart(t0, step));
        }
        assert_eq!(store.complete(), [4, 5]);
        assert!(store.own_at(7).is_none() && store.own_at(8).is_some() && store.own_at(9).is_some());
        store.acked(9, 1, apart(t0, 9));
        assert_eq!(store.complete(), [5, 9]);
        assert!(store.own_at(8).is_none(), "an older incomplete one is dropped once a newer completes");
    }

    #[test]
    fn copies_are_kept_for_buddies_only_two_per_rank_experts_only() {
        let mut store = PeerStore::default();
        let t0 = Instant::now();
        store.begin(3, [1].into());
        assert_eq!(store.hold(2, snap(1, &[1]).experts_only(), t0), Err(CopyRefused::NotABuddy(2)));
        assert_eq!(store.hold(1, snap(1, &[1]), t0), Err(CopyRefused::Dense(1)));
        for step in 1..=3 {
            store.hold(1, snap(step, &[1, 2]).experts_only(), apart(t0, step)).unwrap();
        }
        let record = store.record();
        assert_eq!((record.generation, record.holds), (3, BTreeMap::from([(1, vec![2, 3])])));
        // A later generation keeps the copies of a rank it no longer lists.
        store.begin(4, BTreeSet::new());
        assert_eq!(store.record().holds[&1], [2, 3]);
    }

    /// Steps faster than the brain's lag: what completed within [`RETAIN`] stays (at most
    /// [`MAX_KEEP`]), so the brain's pick from a record a few steps old is still held; once
    /// [`RETAIN`] passes, only [`KEEP`] remain.
    #[test]
    fn fast_steps_keep_what_completed_within_the_retention_window() {
        let mut store = PeerStore::default();
        store.begin(1, [1].into());
        let t0 = Instant::now();
        let tick = |step: u64| t0 + Duration::from_millis(250) * u32::try_from(step).unwrap();
        for step in 1..=4 {
            store.add_own(snap(step, &[0]), &[1], tick(step));
            store.acked(step, 1, tick(step));
            store.hold(1, snap(step, &[1]).experts_only(), tick(step)).unwrap();
        }
        assert_eq!(store.complete(), [1, 2, 3, 4], "4 steps in 1 s: all within the window");
        assert_eq!(store.record().holds[&1], [1, 2, 3, 4]);
        for step in 5..=12 {
            store.add_own(snap(step, &[0]), &[1], tick(step));
            store.acked(step, 1, tick(step));
            store.hold(1, snap(step, &[1]).experts_only(), tick(step)).unwrap();
        }
        // 12 steps in 3 s: the window (2 s) covers 8 of them; the cap keeps 6.
        assert_eq!(store.complete(), [7, 8, 9, 10, 11, 12]);
        assert_eq!(store.record().holds[&1], [7, 8, 9, 10, 11, 12]);
        // A slow step later, only the two newest remain.
        let late = tick(12) + RETAIN;
        store.add_own(snap(13, &[0]), &[1], late);
        store.acked(13, 1, late);
        store.hold(1, snap(13, &[1]).experts_only(), late).unwrap();
        assert_eq!(store.complete(), [12, 13]);
        assert_eq!(store.record().holds[&1], [12, 13]);
    }

    #[test]
    fn find_takes_dense_from_the_own_snapshot_and_experts_from_copies() {
        let mut store = PeerStore::default();
        store.begin(1, [5].into());
        store.add_own(snap(4, &[0]), &[5], Instant::now());
        store.hold(5, snap(4, &[1, 2]).experts_only(), Instant::now()).unwrap();
        let e = |x| ExpertId::new(0, x);
        let found = store.find(4, true, &[e(0), e(2)]).unwrap();
        assert!(found.has_dense());
        assert_eq!(found.experts(), [e(0), e(2)].into());
        assert_eq!(found.params["layers.0.experts.2.w_in"].data, [6.0, 6.5]);
        let partial = store.find(4, false, &[e(3), e(1)]).unwrap();
        assert_eq!(partial.experts(), [e(1)].into());
        assert!(store.find(5, true, &[e(0)]).is_none(), "nothing of a step never taken");
    }

    #[test]
    fn a_rebalance_hand_off_answers_fetches_until_the_next_generation() {
        let mut store = PeerStore::default();
        store.begin(2, BTreeSet::new());
        let e = |x| ExpertId::new(0, x);
        // Handed off at two steps; only experts are kept, never the dense part.
        store.hand_off(vec![snap(7, &[3]), snap(6, &[3])]);
        let found = store.find(7, true, &[e(3)]).unwrap();
        assert_eq!(found.experts(), [e(3)].into());
        assert!(!found.has_dense());
        assert_eq!(store.find(6, false, &[e(3)]).unwrap().step, 6);
        assert!(store.find(8, false, &[e(3)]).is_none());
        store.begin(3, BTreeSet::new());
        assert!(store.find(7, false, &[e(3)]).is_none(), "released with the next generation");
    }
}
