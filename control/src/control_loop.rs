//! The loop step: observe → decide → apply → effects.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use ninelives_core::generation::{
    DistPlan, PlacementValue, PlanRecord, from_published_generation, generation_writes, unreferenced_groups,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{
    Action, BrainConfig, Decision, LiveObservation, Observation, Outage, OutageGuard, OutagePolicy,
    RecoveryState, Verdict,
};
use ninelives_core::recovery::{Feedback, LoadTracker, RebalancePolicy, decide_with};
use ninelives_core::writer::WriterRecord;
use ninelives_telemetry::recovery::RecoveryMetrics;
use tracing::{debug, info, warn};

use crate::effects::Effects;
use crate::error::ControlError;
use crate::event::OutageEvent;
use crate::store::{BrainStore, Changes, Written};

/// Which job a loop drives, and the figures its gauges need.
#[derive(Clone, Debug, PartialEq)]
pub struct JobIdentity {
    /// The keyspace (prefix) of the coordination store.
    pub keys: Keyspace,
    /// The job's namespace.
    pub namespace: String,
    /// The job's name.
    pub name: String,
    /// Chips per node (the chip gauges).
    pub chips_per_node: u32,
    /// The job's `minHealthyFraction` (the headroom gauge).
    pub min_healthy_fraction: f64,
}

impl fmt::Display for JobIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What one round saw and did.
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    /// The record before the round.
    pub prior: RecoveryState,
    /// The record after it (as written).
    pub state: RecoveryState,
    /// What the brain saw (shared with the loop, which keeps it current key by key).
    pub observation: Arc<Observation>,
    /// Generations published in this round.
    pub published: Vec<DistPlan>,
}

/// The outcome of [`ControlLoop::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// No record yet and the adapter cannot build the first one yet.
    NotStarted,
    /// The round ran.
    Ran(Box<Round>),
    /// Another writer changed the record since this round read it: nothing was applied.
    Fenced,
    /// The job reached a terminal phase (in an earlier round).
    Finished(Box<RecoveryState>),
    /// The control plane is degraded: nothing was decided (see [`OutageGuard`]).
    Frozen(Box<Outage>),
}

/// The outage policy's TTL until a driver sets the job's own.
const DEFAULT_TTL_S: f64 = 10.0;

/// What a round read, parsed (the observation is the loop's [`LiveObservation`]).
struct Seen {
    record: Option<RecoveryState>,
    revision: i64,
}

/// The store's keys as the loop keeps them between reads: each read applies only what changed,
/// so a quiet round costs O(changes), not O(cluster).
struct Held {
    /// The listing the store's changes continue (`None`: take a full read first).
    listing: Option<u64>,
    /// Node, chip and member keys, parsed.
    observation: LiveObservation,
    /// The raw value at `placement`, and whether it changed since it was last parsed.
    placement: Option<Vec<u8>>,
    placement_changed: bool,
    /// The brain's record, parsed once per change (`Err`: the reason it cannot be read).
    record: Option<Result<RecoveryState, String>>,
    /// Whether the member writes are judged against the generation in force in `current`.
    judged: bool,
}

/// The generation in force, as the loop last read or wrote it: read again from the store only
/// when the commit record at `placement` changes.
enum Current {
    /// A whole plan in the `placement` value (written by tools and tests); the planner's part
    /// is required, the members' part optional.
    Inline { placement: Placement, plan: Option<DistPlan> },
    /// A commit record and the plan assembled from its group values.
    Stored { record: PlanRecord, plan: DistPlan },
}

impl Current {
    fn placement(&self) -> &Placement {
        match self {
            Current::Inline { placement, .. } => placement,
            Current::Stored { plan, .. } => &plan.placement,
        }
    }

    fn plan(&self) -> Option<&DistPlan> {
        match self {
            Current::Inline { plan, .. } => plan.as_ref(),
            Current::Stored { plan, .. } => Some(plan),
        }
    }

    fn record(&self) -> Option<&PlanRecord> {
        match self {
            Current::Inline { .. } => None,
            Current::Stored { record, .. } => Some(record),
        }
    }
}

/// One job's control loop.
pub struct ControlLoop<S> {
    brain: BrainConfig,
    job: JobIdentity,
    job_keys: JobKeys,
    store: S,
    metrics: Option<RecoveryMetrics>,
    newest_checkpoint: Option<u64>,
    outage_policy: OutagePolicy,
    guard: OutageGuard,
    /// The outage cause last reported to the adapter (`None`: healthy).
    reported: Option<&'static str>,
    /// The generation in force (`None`: none yet, or not known since a failed write).
    current: Option<Current>,
    /// Whether group values of older generations may be left to collect.
    collect: bool,
    /// The members' measured load, smoothed; fed to every decision.
    loads: LoadTracker,
    /// When a running job is rebalanced for it (`spec.parallelism.rebalance`).
    rebalance: Option<RebalancePolicy>,
    /// Who this loop publishes as, and whether the store holds its claim yet.
    writer: Option<Writer>,
    /// The `now` of the last observation the brain decided on (frozen rounds do not count): a
    /// fault first seen later became visible after it ([`Observation::previous_decision`]).
    last_decision: Option<f64>,
    held: Held,
}

/// A loop's writer identity and its standing.
#[derive(Clone, Debug)]
struct Writer {
    record: WriterRecord,
    claimed: bool,
    /// Set once a newer writer took the job (what the key held then): the loop stays stopped.
    deposed: Option<Option<WriterRecord>>,
}

impl<S: BrainStore> ControlLoop<S> {
    /// The loop of `job`, deciding with `brain`, over `store`; `metrics` gets the brain's gauges.
    pub fn new(brain: BrainConfig, job: JobIdentity, store: S, metrics: Option<RecoveryMetrics>) -> Self {
        if let Some(m) = &metrics {
            m.job_started(&job.namespace, &job.name);
        }
        let job_keys = job.keys.job(&job.namespace, &job.name);
        let outage_policy = OutagePolicy::for_ttl(DEFAULT_TTL_S);
        let (guard, reported) = (OutageGuard::default(), None);
        let loads = LoadTracker::new(&brain.shape, RebalancePolicy::window_of(None));
        let held = Held {
            listing: None,
            observation: LiveObservation::new(&job.keys, &job.namespace, &job.name),
            placement: None,
            placement_changed: false,
            record: None,
            judged: false,
        };
        Self {
            held,
            brain,
            job,
            job_keys,
            store,
            metrics,
            newest_checkpoint: None,
            outage_policy,
            guard,
            reported,
            writer: None,
            current: None,
            collect: true,
            loads,
            rebalance: None,
            last_decision: None,
        }
    }

    /// Publishes as `writer` (the driver's identity and leadership epoch): the first round claims
    /// the job's writer key, every publication compares it, and once a writer of a newer epoch
    /// claims the job every round returns [`ControlError::Fenced`] without touching the store.
    /// Without a writer the loop is fenced by the record's revision only.
    pub fn with_writer(mut self, writer: WriterRecord) -> Self {
        self.writer = Some(Writer { record: writer, claimed: false, deposed: None });
        self
    }

    /// Rebalances a running job by `policy` (the spec's `parallelism.rebalance`; `None`: never
    /// for balance alone). Measured load is fed back to every re-plan either way.
    pub fn with_rebalance(mut self, policy: Option<RebalancePolicy>) -> Self {
        self.loads = LoadTracker::new(&self.brain.shape, RebalancePolicy::window_of(policy.as_ref()));
        self.rebalance = policy;
        self
    }

    /// The smoothed load table the members measured, as the brain plans with it.
    pub fn measured_load(&self) -> &LoadTracker {
        &self.loads
    }

    /// The brain's configuration.
    pub fn brain(&self) -> &BrainConfig {
        &self.brain
    }

    /// The placement of the generation in force, as last read or written (`None`: not known).
    pub fn placement(&self) -> Option<&Placement> {
        self.current.as_ref().map(Current::placement)
    }

    /// Judges control-plane outages with `policy` (default: [`OutagePolicy::for_ttl`] of 10 s;
    /// drivers pass the job's heartbeat TTL).
    pub fn with_outage_policy(mut self, policy: OutagePolicy) -> Self {
        self.outage_policy = policy;
        self
    }

    /// The job.
    pub fn job(&self) -> &JobIdentity {
        &self.job
    }

    /// The store (an adapter swaps its client after a reconnect).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// One round at time `now` (unix seconds). [`ControlError::Fenced`] (see
    /// [`with_writer`](ControlLoop::with_writer)) means the adapter must stop driving the job.
    #[tracing::instrument(name = "control_step", skip_all, fields(job = %self.job))]
    pub async fn step<E: Effects>(&mut self, effects: &mut E, now: f64) -> Result<Progress, ControlError> {
        self.claim().await?;
        let result = self.round(effects, now).await;
        if let (Err(ControlError::Fenced { current, ours, .. }), Some(writer)) = (&result, &mut self.writer) {
            warn!(job = %self.job, ours = %ours, current = ?current, "deposed by a newer writer; no longer driving the job");
            writer.deposed = Some(current.clone());
        }
        result
    }

    /// Claims the job's writer key on the first round (again after a failed claim); the
    /// deposition once deposed.
    async fn claim(&mut self) -> Result<(), ControlError> {
        let Some(writer) = &mut self.writer else { return Ok(()) };
        if let Some(current) = &writer.deposed {
            let job = self.job_keys.root().to_string();
            return Err(ControlError::Fenced { job, ours: writer.record.clone(), current: current.clone() });
        }
        if writer.claimed {
            return Ok(());
        }
        match self.store.claim(&writer.record).await {
            Ok(()) => {
                info!(job = %self.job, writer = %writer.record, "claimed the job's writer key");
                writer.claimed = true;
                Ok(())
            }
            Err(ControlError::Fenced { job, ours, current }) => {
                warn!(job = %self.job, ours = %ours, current = ?current, "a newer writer holds the job; not driving it");
                writer.deposed = Some(current.clone());
                Err(ControlError::Fenced { job, ours, current })
            }
            Err(e) => Err(e),
        }
    }

    async fn round<E: Effects>(&mut self, effects: &mut E, now: f64) -> Result<Progress, ControlError> {
        let seen = match self.observe().await {
            Ok(seen) => seen,
            Err(e) => {
                if e.is_unreachable() {
                    let verdict = self.guard.read_failed(&self.outage_policy, now, &e.to_string());
                    self.report_outage(effects, &verdict).await?;
                }
                return Err(e);
            }
        };
        let mut prior = match seen.record {
            Some(record) => record,
            None => match effects.node_table().await? {
                Some(first) => first,
                None => return Ok(Progress::NotStarted),
            },
        };
        if prior.phase.is_terminal() {
            return Ok(Progress::Finished(Box::new(prior)));
        }
        let original = prior.clone();
        let nodes: Vec<String> = prior.expected_nodes().chain(prior.spares.iter().cloned()).collect();
        self.held.observation.stamp(now, self.last_decision);
        let verdict =
            self.guard.observed(&self.outage_policy, &nodes, self.held.observation.observation(), now);
        self.report_outage(effects, &verdict).await?;
        match verdict {
            Verdict::Act => {}
            Verdict::Freeze(outage) => return Ok(Progress::Frozen(Box::new(outage))),
            // No deadline counted while decisions were frozen.
            Verdict::Resume { frozen_s, .. } => prior.postpone(frozen_s),
        }
        // Members' load windows: checked, then folded into the smoothed table.
        let obs = self.held.observation.shared();
        for (rank, why) in self.loads.observe(&obs.loads, prior.generation, obs.step) {
            debug!(rank, reason = %why, "ignoring a load record");
        }
        let feedback = Feedback { load: self.loads.table(), rebalance: self.rebalance };
        self.last_decision = Some(now);
        let decision =
            decide_with(&self.brain, &feedback, &prior, &obs, self.current.as_ref().map(Current::placement))?;
        for r in decision.actions.iter().filter_map(|a| match a {
            Action::RecordRecovery(r) => Some(r),
            _ => None,
        }) {
            for t in &r.triggers {
                if let Some(why) = &t.stamp_rejected {
                    warn!(job = %self.job, trigger = %t, "fault time unknown: {why}");
                }
            }
        }
        let Some((published, revision)) = self.apply(&original, &decision, seen.revision).await? else {
            return Ok(Progress::Fenced);
        };
        self.dispatch(effects, &prior, &decision, &published).await?;
        // Housekeeping: a failure leaves the garbage for a later round, never fails this one.
        if let Err(e) = self.collect_garbage(&decision.state, &obs, revision).await {
            debug!(error = %e, "collecting older group values and acks failed; retried later");
        }
        self.gauges(&decision.state, &obs, now);
        let round = Round { prior, state: decision.state, observation: obs, published };
        Ok(Progress::Ran(Box::new(round)))
    }

    /// Tells the adapter (and the log and metrics) when the control plane became degraded, its
    /// cause changed, or it is healthy again.
    async fn report_outage<E: Effects>(
        &mut self,
        effects: &mut E,
        verdict: &Verdict,
    ) -> Result<(), ControlError> {
        let now_reported = match verdict {
            Verdict::Freeze(o) => Some(o.cause.reason()),
            Verdict::Act | Verdict::Resume { .. } => None,
        };
        if now_reported == self.reported {
            return Ok(());
        }
        self.reported = now_reported;
        let outage = match verdict {
            Verdict::Freeze(o) => Some(o),
            _ => None,
        };
        OutageEvent {
            outage,
            frozen_s: (match verdict {
                Verdict::Resume { frozen_s, .. } => Some(*frozen_s),
                _ => None,
            }),
        }
        .emit(&self.job.namespace, &self.job.name, self.metrics.as_ref());
        effects.control_plane(outage).await?;
        Ok(())
    }

    /// Reads what changed in the job's keys and parses it. The record and the placement are
    /// untrusted input: unreadable means the job is stuck (an error every round), never
    /// silently restarted.
    async fn observe(&mut self) -> Result<Seen, ControlError> {
        let mut changes = self.store.read().await?;
        if !changes.full && self.held.listing != Some(changes.listing) {
            // Changes against a listing this loop never saw whole (a store it did not open).
            self.store.resync();
            changes = self.store.read().await?;
            if !changes.full {
                let reason =
                    "the store handed out changes instead of a full read after a re-sync".to_string();
                return Err(ControlError::Malformed { key: self.job_keys.root().to_string(), reason });
            }
        }
        let revision = changes.record_revision;
        // Applied before anything can fail: the store hands each change out once.
        self.absorb(changes);
        let placement_key = self.job_keys.placement();
        let malformed = |reason: String| ControlError::Malformed { key: placement_key.clone(), reason };
        if self.held.placement_changed || self.current.is_none() {
            match self.held.placement.clone() {
                None => self.set_current(None),
                Some(bytes) => match PlacementValue::parse(&bytes) {
                    Ok(PlacementValue::Record(record)) => {
                        if self.current.as_ref().and_then(Current::record) != Some(&record) {
                            // A generation this loop did not write (a restart, another driver).
                            self.set_current(None);
                            let plan = self.read_groups(&record).await?;
                            self.set_current(Some(Current::Stored { record, plan }));
                        }
                    }
                    // The planner's part is required, the members' part optional (older writers).
                    _ => {
                        let placement: Placement =
                            serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
                        let plan = serde_json::from_slice::<DistPlan>(&bytes).ok();
                        self.set_current(Some(Current::Inline { placement, plan }));
                    }
                },
            }
            // Cleared only once parsed: a placement that failed is parsed again next round.
            self.held.placement_changed = false;
        }
        // Member writes are judged against the generation in force: a stale member's replayed
        // progress or ack changes nothing.
        if !self.held.judged {
            let in_force = self.current.as_ref().and_then(Current::plan).map(DistPlan::in_force);
            self.held.observation.set_in_force(in_force);
            self.held.judged = true;
        }
        let record_key = self.job_keys.recovery();
        let record = match &self.held.record {
            None => None,
            Some(Ok(record)) => Some(record.clone()),
            Some(Err(reason)) => {
                return Err(ControlError::Malformed { key: record_key, reason: reason.clone() });
            }
        };
        Ok(Seen { record, revision })
    }

    /// Applies one read's changes to what the loop holds.
    fn absorb(&mut self, changes: Changes) {
        let (placement_key, record_key) = (self.job_keys.placement(), self.job_keys.recovery());
        let held = &mut self.held;
        if changes.full {
            held.observation.clear();
            held.placement = None;
            held.placement_changed = true;
            held.record = None;
        }
        held.listing = Some(changes.listing);
        let (malformed, stale) =
            (held.observation.malformed().len(), held.observation.observation().stale.len());
        for (key, value) in changes.kvs {
            if key == placement_key {
                held.placement_changed = true;
                held.placement = value.clone();
            } else if key == record_key {
                held.record = value
                    .as_deref()
                    .map(|bytes| RecoveryState::parse(&record_key, bytes).map_err(|e| e.reason));
            }
            match value {
                Some(v) => held.observation.put(&key, &v),
                None => held.observation.delete(&key),
            }
        }
        // Reported when they appear, not every round.
        let o = &held.observation;
        if o.malformed().len() > malformed || o.observation().stale.len() > stale {
            for m in o.malformed() {
                debug!(key = %m.key, reason = %m.reason, "ignoring a malformed value");
            }
            for stale in &o.observation().stale {
                debug!(key = %stale.key, reason = %stale.reason, "ignoring a stale member write");
            }
        }
    }

    /// Sets the generation in force; member writes are judged against it from the next read.
    fn set_current(&mut self, current: Option<Current>) {
        self.current = current;
        self.held.judged = false;
    }

    /// The plan a commit record names, from its group values.
    async fn read_groups(&mut self, record: &PlanRecord) -> Result<DistPlan, ControlError> {
        let keys = record.group_keys(&self.job_keys);
        let values = self.store.get_many(keys.clone()).await?;
        let mut groups = Vec::with_capacity(keys.len());
        for ((g, key), value) in (0..).zip(keys).zip(values) {
            let bytes = value
                .ok_or_else(|| ControlError::Malformed { key: key.clone(), reason: "missing".to_string() })?;
            groups.push(record.parse_group(g, &bytes)?);
        }
        Ok(record.assemble(&groups)?)
    }

    /// Writes the decision: each new generation (its changed group values first, then the
    /// commit record with the brain's record in one guarded transaction), or the record alone
    /// when it changed. `None` when a guard failed (fenced); else what was published and the
    /// record's revision.
    async fn apply(
        &mut self,
        prior: &RecoveryState,
        decision: &Decision,
        mut revision: i64,
    ) -> Result<Option<(Vec<DistPlan>, i64)>, ControlError> {
        let mut published = Vec::new();
        for action in &decision.actions {
            let Action::PublishPlacement { placement, control } = action else { continue };
            let state = &decision.state;
            // Until the commit lands, what is in force is unknown: read again next round.
            let previous = self.current.take();
            self.held.judged = false;
            let plan = from_published_generation(
                &self.brain,
                state,
                placement,
                control,
                previous.as_ref().and_then(Current::plan),
            )?;
            let previous_record = previous.as_ref().and_then(Current::record);
            let writes =
                generation_writes(&self.job_keys, &plan, &self.brain.shape, control, state, previous_record)?;
            self.store.put_unguarded(writes.groups).await?;
            match self.store.write(writes.commit.to_vec(), revision).await? {
                Written::Committed { revision: r } => revision = r,
                Written::Fenced => return Ok(None),
            }
            info!(generation = plan.generation(), tier = %plan.tier, restore = ?plan.restore, "published a generation");
            self.set_current(Some(Current::Stored { record: writes.record, plan: plan.clone() }));
            self.collect = true;
            published.push(plan);
        }
        if published.is_empty() && decision.state != *prior {
            let record = vec![(self.job_keys.recovery(), decision.state.to_json())];
            match self.store.write(record, revision).await? {
                Written::Committed { revision: r } => revision = r,
                Written::Fenced => return Ok(None),
            }
        }
        Ok(Some((published, revision)))
    }

    /// Once the generation in force has settled (no recovery active, every expected member
    /// joined it), deletes the group values no commit record names any more (older generations,
    /// a fenced writer's leftovers) and the acknowledgements of older generations (only the
    /// active recovery's generation's are ever read), guarded like every write.
    async fn collect_garbage(
        &mut self,
        state: &RecoveryState,
        obs: &Observation,
        revision: i64,
    ) -> Result<(), ControlError> {
        let Some(record) = self.current.as_ref().and_then(Current::record) else { return Ok(()) };
        let joined = obs.joined.get(&record.generation);
        let settled =
            state.active.is_none() && joined.is_some_and(|j| state.expected_ranks().all(|r| j.contains(&r)));
        if !self.collect || !settled {
            return Ok(());
        }
        let existing = self.store.list_keys(self.job_keys.plan_groups()).await?;
        let mut garbage = unreferenced_groups(&self.job_keys, record, existing.iter().map(String::as_str));
        let acked = obs.joined.keys().chain(obs.acks.keys());
        let old: BTreeSet<u64> = acked.copied().filter(|g| *g < record.generation).collect();
        garbage.extend(old.into_iter().map(|g| self.job_keys.acks(g)));
        if !garbage.is_empty() {
            debug!(keys = garbage.len(), generation = record.generation, "collecting older group values");
            if self.store.delete_guarded(garbage, revision).await? == Written::Fenced {
                return Ok(());
            }
        }
        self.collect = false;
        Ok(())
    }

    /// Hands every action but the store writes to the adapter, in order.
    async fn dispatch<E: Effects>(
        &self,
        effects: &mut E,
        prior: &RecoveryState,
        decision: &Decision,
        published: &[DistPlan],
    ) -> Result<(), ControlError> {
        let mut plans = published.iter();
        for action in &decision.actions {
            match action {
                Action::PublishPlacement { .. } => {
                    if let Some(plan) = plans.next() {
                        effects.published(plan).await?;
                    }
                }
                Action::StartMember { rank, node, restore_step } => {
                    effects.start_member(*rank, node, *restore_step).await?;
                }
                Action::BringInSpare { spare, replaces, index } => {
                    effects.bring_in_spare(spare, replaces, *index).await?;
                }
                Action::DropNode { index, node } => effects.drop_node(*index, node).await?,
                Action::RecordRecovery(r) => effects.record_recovery(r).await?,
                // Carried by the state: reported through `phase_changed`.
                Action::JobSucceeded | Action::FailJob(_) => {}
            }
        }
        let state = &decision.state;
        if state.phase != prior.phase || state.active != prior.active {
            effects.phase_changed(prior, state).await?;
        }
        Ok(())
    }

    /// The brain's gauges: phase, chips, generation, newest checkpoint.
    fn gauges(&mut self, state: &RecoveryState, obs: &Observation, now: f64) {
        let Some(m) = &self.metrics else { return };
        let (ns, name) = (&self.job.namespace, &self.job.name);
        m.brain(ns, name, state, obs, self.job.chips_per_node, self.job.min_healthy_fraction);
        let newest = obs.checkpoints.last().copied();
        if newest > self.newest_checkpoint
            && let Some(step) = newest
        {
            // Members write the record right after the commit: seen within a round.
            m.checkpoint(ns, name, step, now);
            self.newest_checkpoint = newest;
        }
    }
}
