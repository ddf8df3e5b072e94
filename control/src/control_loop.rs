//! The loop step: observe → decide → apply → effects.

use std::fmt;

use ninelives_core::generation::{DistPlan, from_published_generation, generation_writes};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{Action, BrainConfig, Decision, Observation, RecoveryState, decide};
use ninelives_telemetry::recovery::RecoveryMetrics;
use tracing::{debug, info};

use crate::effects::Effects;
use crate::error::ControlError;
use crate::store::{BrainStore, Snapshot, Written};

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
    /// What the brain saw.
    pub observation: Observation,
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
}

/// What a round read, parsed.
struct Seen {
    observation: Observation,
    placement: Option<Placement>,
    /// The members' plan in force (the previous generation of the next one).
    plan: Option<DistPlan>,
    record: Option<RecoveryState>,
    revision: i64,
}

/// One job's control loop.
pub struct ControlLoop<S> {
    brain: BrainConfig,
    job: JobIdentity,
    job_keys: JobKeys,
    store: S,
    metrics: Option<RecoveryMetrics>,
    newest_checkpoint: Option<u64>,
}

impl<S: BrainStore> ControlLoop<S> {
    /// The loop of `job`, deciding with `brain`, over `store`; `metrics` gets the brain's gauges.
    pub fn new(brain: BrainConfig, job: JobIdentity, store: S, metrics: Option<RecoveryMetrics>) -> Self {
        if let Some(m) = &metrics {
            m.job_started(&job.namespace, &job.name);
        }
        let job_keys = job.keys.job(&job.namespace, &job.name);
        Self { brain, job, job_keys, store, metrics, newest_checkpoint: None }
    }

    /// The job.
    pub fn job(&self) -> &JobIdentity {
        &self.job
    }

    /// The store (an adapter swaps its client after a reconnect).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// One round at time `now` (unix seconds).
    #[tracing::instrument(name = "control_step", skip_all, fields(job = %self.job))]
    pub async fn step<E: Effects>(&mut self, effects: &mut E, now: f64) -> Result<Progress, ControlError> {
        let seen = self.observe(now).await?;
        let prior = match seen.record {
            Some(record) => record,
            None => match effects.node_table().await? {
                Some(first) => first,
                None => return Ok(Progress::NotStarted),
            },
        };
        if prior.phase.is_terminal() {
            return Ok(Progress::Finished(Box::new(prior)));
        }
        let decision = decide(&self.brain, &prior, &seen.observation, seen.placement.as_ref())?;
        let Some(published) = self.apply(&prior, &decision, seen.plan, seen.revision).await? else {
            return Ok(Progress::Fenced);
        };
        self.dispatch(effects, &prior, &decision, &published).await?;
        self.gauges(&decision.state, &seen.observation, now);
        let round = Round { prior, state: decision.state, observation: seen.observation, published };
        Ok(Progress::Ran(Box::new(round)))
    }

    /// Reads and parses the job's keys. The record and the placement are untrusted input:
    /// unreadable means the job is stuck (an error every round), never silently restarted.
    async fn observe(&mut self, now: f64) -> Result<Seen, ControlError> {
        let snapshot: Snapshot = self.store.read().await?;
        let (observation, malformed) = Observation::from_kvs(
            &self.job.keys,
            &self.job.namespace,
            &self.job.name,
            now,
            snapshot.kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        for m in &malformed {
            debug!(key = %m.key, reason = %m.reason, "ignoring a malformed value");
        }
        let placement_key = self.job_keys.placement();
        let (placement, plan) = match snapshot.value(&placement_key) {
            None => (None, None),
            Some(bytes) => {
                let placement: Placement = serde_json::from_slice(bytes).map_err(|e| {
                    ControlError::Malformed { key: placement_key.clone(), reason: e.to_string() }
                })?;
                (Some(placement), serde_json::from_slice::<DistPlan>(bytes).ok())
            }
        };
        let record_key = self.job_keys.recovery();
        let record = snapshot
            .value(&record_key)
            .map(|bytes| RecoveryState::parse(&record_key, bytes))
            .transpose()
            .map_err(|e| ControlError::Malformed { key: record_key.clone(), reason: e.reason })?;
        Ok(Seen { observation, placement, plan, record, revision: snapshot.record_revision })
    }

    /// Writes the decision: each new generation with the record in one guarded transaction, or
    /// the record alone when it changed. `None` when a guard failed (fenced).
    async fn apply(
        &mut self,
        prior: &RecoveryState,
        decision: &Decision,
        mut previous: Option<DistPlan>,
        mut revision: i64,
    ) -> Result<Option<Vec<DistPlan>>, ControlError> {
        let mut published = Vec::new();
        for action in &decision.actions {
            let Action::PublishPlacement { placement, control } = action else { continue };
            let state = &decision.state;
            let plan =
                from_published_generation(&self.brain.shape, state, placement, control, previous.as_ref())?;
            let writes = generation_writes(&self.job_keys, &plan, control, state)?;
            match self.store.write(writes.to_vec(), revision).await? {
                Written::Committed { revision: r } => revision = r,
                Written::Fenced => return Ok(None),
            }
            info!(generation = plan.generation(), tier = %plan.tier, restore = ?plan.restore, "published a generation");
            previous = Some(plan.clone());
            published.push(plan);
        }
        if published.is_empty() && decision.state != *prior {
            let record = vec![(self.job_keys.recovery(), decision.state.to_json())];
            if self.store.write(record, revision).await? == Written::Fenced {
                return Ok(None);
            }
        }
        Ok(Some(published))
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
