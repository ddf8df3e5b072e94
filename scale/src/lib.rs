//! # ninelives-scale
//!
//! The scale run of issue 22: one real etcd, `N` in-process node agents (the agent bench's
//! in-memory probes), lightweight simulated members that speak the generation protocol
//! (register at `members/<rank>` under a lease, read the `DistPlan` at `placement`, ack
//! `acks/<gen>/<rank>` with core's [`MemberAck`], report progress and checkpoint records; no
//! training), and the real [`ControlLoop`] over [`EtcdStore`] driving the job, at the reference
//! layout (`examples/longcat-2.0.yaml`) scaled to `N` nodes. Chip, node, rack and flapping-chip
//! faults are injected one at a time; each is timed from the moment it is visible in etcd to
//! the brain's detection, the committed generation and the last member's ack, and its etcd
//! traffic is measured from etcd's own counters.
//!
//! The loop runs on its own OS thread (a current-thread runtime) so its CPU time is its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use ninelives_agent::etcd::{EtcdConfig, EtcdSource};
use ninelives_agent::faults;
use ninelives_agent::probe::{ChipProbe, ChipReading, ProbeError};
use ninelives_agent::{Agent, AgentConfig};
use ninelives_control::{
    BrainStore, Changes, ControlError, ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress,
    Written,
};
use ninelives_core::generation::{PlacementValue, Restore};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::recovery::{
    BrainConfig, BrainPhase, CheckpointRecord, MemberAck, OutagePolicy, ProgressRecord, RecoveryState,
};
use ninelives_core::writer::{WriterRecord, epoch_at};
use ninelives_testkit::{EtcdServer, http_get};
use tokio::sync::mpsc;

mod probe;
pub use probe::{Probe, probe};

const NS: &str = "scale";
const JOB: &str = "longcat";
/// Members' acks, registrations and checkpoint records go in transactions of at most this many
/// puts (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The reference manifest (its topology is scaled to `nodes`).
    pub manifest: String,
    /// Nodes of the job (a multiple of stages x group nodes: 250 at the reference layout).
    pub nodes: u32,
    /// Spare nodes (agents too).
    pub spares: u32,
    /// Faults of each kind: chip, node, rack (5 nodes), flapping chip.
    pub faults_per_kind: usize,
    /// The loop's round period.
    pub round: Duration,
    /// Idle window measured before the faults (per-round cost with nothing changing).
    pub idle: Duration,
    /// Extra etcd flags (the documented workaround: `--max-request-bytes=...`).
    pub etcd_args: Vec<String>,
    /// Longest wait for one fault's recovery to complete.
    pub fault_timeout: Duration,
    /// Agents started per batch (as a DaemonSet rolls out).
    pub batch: usize,
    /// How often each agent polls its chips (a fault is visible within one poll).
    pub agent_poll: Duration,
    /// The agents' lease TTL in seconds (`None`: the manifest's `heartbeatTtlSeconds`). The
    /// brain's outage policy follows it. Node faults are timed from the lease's revocation and
    /// chip faults from the chip's write, so the TTL is not on the measured path; it sets the
    /// keepalive rate (one per node per TTL/3), which at 6,250 in-process agents is most of the
    /// harness's own etcd traffic.
    pub agent_ttl: Option<i64>,
    /// gRPC connections the in-process agents share (a real agent has its own).
    pub connections: usize,
    /// Agents connect afresh for every session, as a real agent does (`EtcdSource::Config`),
    /// instead of sharing the pool of `connections`.
    pub agent_own_connections: bool,
    /// Stop etcd (SIGSTOP) for this long after the idle window, before the faults: the loop
    /// must ride it out and recover every later fault.
    pub stall: Option<Duration>,
}

impl Options {
    /// Defaults for `nodes` nodes.
    pub fn for_nodes(manifest: &str, nodes: u32) -> Self {
        Self {
            manifest: manifest.to_string(),
            nodes,
            spares: (nodes / 100).max(8),
            faults_per_kind: 5,
            round: Duration::from_millis(200),
            idle: Duration::from_secs(10),
            etcd_args: Vec::new(),
            fault_timeout: Duration::from_secs(60),
            batch: 500,
            agent_poll: Duration::from_millis(100),
            agent_ttl: None,
            connections: 16,
            agent_own_connections: false,
            stall: None,
        }
    }
}

/// A fault kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// One chip reports an uncorrectable error.
    Chip,
    /// One node's agent leaves (lease revoked: the `alive` key vanishes at once; a crash would
    /// add the TTL before it is visible).
    Node,
    /// The five nodes of one rack leave together.
    Rack,
    /// One chip faults, clears, faults again (3 onsets, 1 s apart).
    Flap,
}

impl Kind {
    /// Its name in the tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chip => "chip",
            Kind::Node => "node",
            Kind::Rack => "rack",
            Kind::Flap => "flapping chip",
        }
    }
}

/// One injected fault, timed (seconds from the fault becoming visible in etcd).
#[derive(Clone, Debug)]
pub struct FaultResult {
    /// Which kind.
    pub kind: Kind,
    /// Visible → the round that saw it finished reading.
    pub detected: Option<f64>,
    /// Visible → its first generation committed.
    pub committed: Option<f64>,
    /// Visible → every member of the last generation of the recovery acked.
    pub acked: Option<f64>,
    /// Visible → the brain completed the recovery.
    pub completed: Option<f64>,
    /// Injection → visible (the agent's poll and write).
    pub inject_to_visible: Option<f64>,
    /// etcd gRPC messages received between injection and completion.
    pub requests: f64,
    /// etcd bytes received + sent between injection and completion.
    pub bytes: f64,
    /// Generations published.
    pub generations: usize,
    /// Tiers published.
    pub tiers: Vec<String>,
    /// Apiserver writes the operator would have made between injection and completion.
    pub kube: KubeWrites,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The result of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Nodes.
    pub nodes: u32,
    /// Chips.
    pub chips: u32,
    /// Agents' start-up.
    pub startup_s: f64,
    /// Start → generation 1 acked by every member.
    pub first_generation_s: Option<f64>,
    /// Idle window: rounds, mean round wall ms, mean loop CPU ms per round.
    pub idle_rounds: u64,
    /// Mean round wall time while idle.
    pub idle_round_ms: f64,
    /// Mean loop-thread CPU per round while idle.
    pub idle_cpu_ms: f64,
    /// Mean read (one txn) wall time while idle.
    pub idle_read_ms: f64,
    /// Bytes handed out by a read while idle, mean (the changed keys of the job prefix and
    /// `nodes/`).
    pub read_bytes: u64,
    /// Keys handed out by a read while idle, mean.
    pub read_keys: u64,
    /// Of which: the placement value.
    pub placement_bytes: u64,
    /// Of which: the recovery record.
    pub record_bytes: u64,
    /// etcd gRPC requests/s and bytes/s during the idle window (all clients).
    pub idle_etcd_rps: f64,
    /// etcd bytes/s (received + sent) during the idle window.
    pub idle_etcd_bps: f64,
    /// Largest value the loop wrote.
    pub largest_write: u64,
    /// Largest transaction the loop wrote (sum of values).
    pub largest_txn: u64,
    /// Group values the loop wrote (new content only) and collected over the run.
    pub group_writes: u64,
    /// Group values collected (deleted once a generation settled).
    pub group_deletes: u64,
    /// Largest group value written.
    pub largest_group: u64,
    /// Largest value stored in etcd at the end (every key, every writer).
    pub largest_stored: u64,
    /// Bytes the members read for the last generation (record each, changed group values).
    pub member_plan_bytes: u64,
    /// etcd DB size at the end.
    pub db_bytes: f64,
    /// Process RSS at the end (agents, members and the loop in one process).
    pub rss_bytes: u64,
    /// Loop thread CPU over the whole run, seconds.
    pub loop_cpu_s: f64,
    /// Times the loop's store listed its view (the first read, then once per re-sync).
    pub view_lists: u64,
    /// Faults.
    pub faults: Vec<FaultResult>,
    /// Agents not ready (lease held, chips in sync) when the loop started (stragglers the
    /// harness stopped waiting for; they join when they catch up).
    pub stragglers: usize,
    /// Agents' lease TTL, seconds.
    pub agent_ttl: i64,
    /// CPU of the harness process (agents, members, the loop) while idle, cores.
    pub idle_process_cpu: f64,
    /// CPU of etcd while idle, cores.
    pub idle_etcd_cpu: f64,
    /// etcd's peak resident memory, bytes (sampled every 250 ms).
    pub etcd_rss_peak: u64,
    /// The etcd stall injected before the faults, and the loop's state once it settled.
    pub stall: Option<String>,
    /// Where it broke, if it did.
    pub broke: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Chips

/// In-memory chips of one node: a heartbeat from the clock, a fault flag per chip. Public for
/// the e2e apiserver-writes run, which drives the same agents under the real operator.
pub struct MemProbe {
    started: Instant,
    faulty: Vec<AtomicBool>,
}

impl MemProbe {
    /// `chips` healthy chips.
    pub fn new(chips: u32) -> Self {
        Self { started: Instant::now(), faulty: (0..chips).map(|_| AtomicBool::new(false)).collect() }
    }
    /// Marks `chip` faulty (an uncorrectable HBM ECC error) or healthy again.
    pub fn set(&self, chip: u32, faulty: bool) {
        if let Some(f) = self.faulty.get(chip as usize) {
            f.store(faulty, Ordering::Relaxed);
        }
    }
}

impl ChipProbe for MemProbe {
    fn discover(&self) -> Result<Vec<u32>, ProbeError> {
        Ok((0..u32::try_from(self.faulty.len()).unwrap_or(0)).collect())
    }
    fn read(&self, index: u32) -> Result<ChipReading, ProbeError> {
        let beat = u64::try_from(self.started.elapsed().as_millis() / 50).unwrap_or(u64::MAX);
        let mut reading = ChipReading::healthy(beat);
        if self.faulty.get(index as usize).is_some_and(|f| f.load(Ordering::Relaxed)) {
            reading.error_code = faults::HBM_ECC_UNCORRECTABLE.to_string();
        }
        Ok(reading)
    }
    fn take_clear_request(&self, _index: u32) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The loop's store, metered

/// Per-round figures the metered store keeps.
#[derive(Default)]
struct Meter {
    reads: u64,
    read_ns: u64,
    /// Keys and bytes the reads handed out, summed (changes only, but a full read's every key).
    read_bytes: u64,
    read_keys: u64,
    placement_bytes: u64,
    record_bytes: u64,
    largest_write: u64,
    largest_txn: u64,
    /// When the last read returned.
    last_read_done: Option<Instant>,
    /// When each committed write returned, with the number of puts.
    commits: Vec<Instant>,
    /// Group values read, written (new content only), deleted (collected).
    group_reads: u64,
    group_writes: u64,
    group_deletes: u64,
    largest_group_write: u64,
    /// Lists of the store's view so far.
    lists: u64,
}

/// [`EtcdStore`] with every read and write measured.
struct Metered {
    inner: EtcdStore,
    meter: Arc<Mutex<Meter>>,
    placement_key: String,
    record_key: String,
}

impl BrainStore for Metered {
    async fn read(&mut self) -> Result<Changes, ControlError> {
        let t = Instant::now();
        let changes = self.inner.read().await?;
        let mut m = self.meter.lock().unwrap_or_else(|e| e.into_inner());
        m.reads += 1;
        m.read_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        m.read_keys += changes.kvs.len() as u64;
        m.read_bytes +=
            changes.kvs.iter().map(|(k, v)| (k.len() + v.as_ref().map_or(0, Vec::len)) as u64).sum::<u64>();
        if changes.full {
            (m.placement_bytes, m.record_bytes) = (0, 0);
        }
        for (key, value) in &changes.kvs {
            let size = value.as_ref().map_or(0, |v| v.len() as u64);
            if *key == self.placement_key {
                m.placement_bytes = size;
            } else if *key == self.record_key {
                m.record_bytes = size;
            }
        }
        m.last_read_done = Some(Instant::now());
        m.lists = self.inner.lists();
        Ok(changes)
    }

    fn resync(&mut self) {
        self.inner.resync();
    }

    async fn write(&mut self, puts: Vec<(String, String)>, revision: i64) -> Result<Written, ControlError> {
        let largest = puts.iter().map(|(_, v)| v.len() as u64).max().unwrap_or(0);
        let total = puts.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        {
            let mut m = self.meter.lock().unwrap_or_else(|e| e.into_inner());
            m.largest_write = m.largest_write.max(largest);
            m.largest_txn = m.largest_txn.max(total);
        }
        let written = self.inner.write(puts, revision).await?;
        if let Written::Committed { .. } = written {
            self.meter.lock().unwrap_or_else(|e| e.into_inner()).commits.push(Instant::now());
        }
        Ok(written)
    }

    async fn claim(&mut self, writer: &WriterRecord) -> Result<(), ControlError> {
        self.inner.claim(writer).await
    }

    async fn get_many(&mut self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, ControlError> {
        let values = self.inner.get_many(keys).await?;
        let mut m = self.meter.lock().unwrap_or_else(|e| e.into_inner());
        m.group_reads += values.len() as u64;
        Ok(values)
    }

    async fn put_unguarded(&mut self, puts: Vec<(String, String)>) -> Result<(), ControlError> {
        {
            let mut m = self.meter.lock().unwrap_or_else(|e| e.into_inner());
            let largest = puts.iter().map(|(_, v)| v.len() as u64).max().unwrap_or(0);
            m.largest_write = m.largest_write.max(largest);
            m.group_writes += puts.len() as u64;
            m.largest_group_write = m.largest_group_write.max(largest);
        }
        self.inner.put_unguarded(puts).await
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, ControlError> {
        self.inner.list_keys(prefix).await
    }

    async fn delete_guarded(&mut self, keys: Vec<String>, revision: i64) -> Result<Written, ControlError> {
        let n = keys.len() as u64;
        let written = self.inner.delete_guarded(keys, revision).await?;
        if written != Written::Fenced {
            self.meter.lock().unwrap_or_else(|e| e.into_inner()).group_deletes += n;
        }
        Ok(written)
    }
}

// ---------------------------------------------------------------------------------------------
// Effects: members are started through the member pool

/// The apiserver writes the operator's effects adapter (`operator::driver::KubeEffects`) would
/// make for the effects the loop asked for, counted effect by effect: an Event per completed
/// recovery and per control-plane transition (`Recorder::publish`), one status write per round
/// that asked for a reconcile (the adapter sets one flag per round; the reconcile writes status
/// once, and only when it changed, so this is an upper bound), and one pod write per member
/// start, spare brought in or node dropped (the pods that really change, an upper bound too).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KubeWrites {
    /// Events (`Recovered`, `ControlPlaneDegraded`/`Healthy`).
    pub events: u64,
    /// Status writes (rounds that triggered a reconcile).
    pub status: u64,
    /// Pod writes (member starts, spares brought in, nodes dropped).
    pub pods: u64,
}

impl KubeWrites {
    /// All apiserver writes.
    pub fn total(&self) -> u64 {
        self.events + self.status + self.pods
    }
}

struct ScaleEffects {
    table: RecoveryState,
    start: mpsc::UnboundedSender<u32>,
    /// Whether this round asked for a reconcile (as `KubeEffects::reconcile`).
    reconcile: bool,
    kube: Arc<Mutex<KubeWrites>>,
}

impl ScaleEffects {
    fn count(&mut self, f: impl FnOnce(&mut KubeWrites)) {
        self.reconcile = true;
        f(&mut self.kube.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The end of a round: the reconcile it triggered writes the status once.
    fn round_done(&mut self) {
        if std::mem::take(&mut self.reconcile) {
            self.kube.lock().unwrap_or_else(|e| e.into_inner()).status += 1;
        }
    }
}

impl Effects for ScaleEffects {
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        Ok(Some(self.table.clone()))
    }
    async fn start_member(&mut self, rank: u32, _: &str, _: Option<u64>) -> Result<(), EffectError> {
        self.count(|k| k.pods += 1);
        self.start.send(rank).map_err(|e| EffectError::new("start-member", e.to_string()))
    }
    async fn bring_in_spare(&mut self, _: &str, _: &str, _: u32) -> Result<(), EffectError> {
        self.count(|k| k.pods += 1);
        Ok(())
    }
    async fn drop_node(&mut self, _: u32, _: &str) -> Result<(), EffectError> {
        self.count(|k| k.pods += 1);
        Ok(())
    }
    async fn record_recovery(
        &mut self,
        _: &ninelives_core::recovery::CompletedRecovery,
    ) -> Result<(), EffectError> {
        self.count(|k| k.events += 1);
        Ok(())
    }
    async fn phase_changed(&mut self, _: &RecoveryState, _: &RecoveryState) -> Result<(), EffectError> {
        self.count(|_| {});
        Ok(())
    }
    async fn control_plane(
        &mut self,
        _: Option<&ninelives_core::recovery::Outage>,
    ) -> Result<(), EffectError> {
        self.count(|k| k.events += 1);
        Ok(())
    }
}

/// What a round of the loop reports to the harness.
#[derive(Clone, Debug)]
struct RoundNote {
    read_done: Option<Instant>,
    published: Vec<(u64, String, Option<Instant>)>,
    phase: BrainPhase,
    active: bool,
    completed: usize,
    wall: Duration,
    cpu_ns: u64,
    error: Option<String>,
}

/// CPU time of the calling thread, ns (`/proc/thread-self/schedstat`, first field).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds (user + system) of process `pid` ("self": this one) from `/proc/<pid>/stat`
/// (clock ticks of 10 ms).
fn process_cpu_s(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The fields after the command name (which may hold spaces) ends with ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of this process and of etcd so far.
fn cpu_now(etcd: &EtcdServer) -> (f64, f64) {
    (process_cpu_s("self"), etcd.pid().map_or(0.0, |p| process_cpu_s(&p.to_string())))
}

/// The machine's load average (1, 5, 15 min), as `/proc/loadavg` says.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The guard's limit on etcd's resident memory.
const ETCD_RSS_LIMIT: u64 = 4 << 30;

/// Resident set size of this process, bytes.
fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident set size of process `pid` ("self": this one), bytes (0 if it is gone).
fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).map(|kb| kb * 1024)
            })
        })
        .unwrap_or(0)
}

/// Runs the loop on its own thread every `round` until `stop`; notes go to `notes`.
#[allow(clippy::too_many_arguments)]
fn spawn_loop(
    mut control: ControlLoop<Metered>,
    mut effects: ScaleEffects,
    meter: Arc<Mutex<Meter>>,
    round: Duration,
    stop: Arc<AtomicBool>,
    notes: mpsc::UnboundedSender<RoundNote>,
    cpu_total: Arc<AtomicU64>,
    in_service: Arc<Mutex<BTreeSet<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let cpu0 = thread_cpu_ns();
            let mut generation = None;
            while !stop.load(Ordering::Relaxed) {
                let (t, c) = (Instant::now(), thread_cpu_ns());
                let commits_before = meter.lock().unwrap_or_else(|e| e.into_inner()).commits.len();
                let result = control.step(&mut effects, ninelives_control::unix_now()).await;
                effects.round_done();
                let (read_done, commits) = {
                    let m = meter.lock().unwrap_or_else(|e| e.into_inner());
                    (m.last_read_done, m.commits.get(commits_before..).map(<[_]>::to_vec).unwrap_or_default())
                };
                let mut note = RoundNote {
                    read_done,
                    published: Vec::new(),
                    phase: BrainPhase::Starting,
                    active: false,
                    completed: 0,
                    wall: t.elapsed(),
                    cpu_ns: thread_cpu_ns().saturating_sub(c),
                    error: None,
                };
                match result {
                    Ok(Progress::Ran(r)) => {
                        note.published = r
                            .published
                            .iter()
                            .enumerate()
                            .map(|(i, p)| (p.generation(), p.tier.to_string(), commits.get(i).copied()))
                            .collect();
                        note.phase = r.state.phase;
                        note.active = r.state.active.is_some();
                        note.completed = r.state.history.len();
                        // The nodes in the job, for the harness's choice of fault targets
                        // (after the round's CPU was measured; only when a generation changed).
                        if generation != Some(r.state.generation) {
                            generation = Some(r.state.generation);
                            let nodes = (0..)
                                .zip(&r.state.node_names)
                                .filter(|(i, _)| !r.state.dropped.contains(i))
                                .map(|(_, n)| n.clone())
                                .collect();
                            *in_service.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
                        }
                    }
                    Ok(Progress::Finished(s)) => note.phase = s.phase,
                    Ok(other) => note.error = Some(format!("{other:?}").chars().take(200).collect()),
                    Err(e) => note.error = Some(e.to_string().chars().take(400).collect()),
                }
                cpu_total.store(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
                if notes.send(note).is_err() {
                    return;
                }
                tokio::time::sleep(round.saturating_sub(t.elapsed())).await;
            }
        });
    })
}

// ---------------------------------------------------------------------------------------------
// Members

/// Shared view of the member pool (public for the e2e apiserver-writes run).
#[derive(Default)]
pub struct PoolState {
    /// Ranks whose member is down (its node left): not registered, not acking.
    pub down: BTreeSet<u32>,
    /// When the last ack of each generation was written.
    pub acked: HashMap<u64, Instant>,
    /// Bytes the members read for the latest generation: the commit record each, and the value
    /// of their group when its content changed (the pool reads each changed group once).
    plan_bytes: u64,
    /// The largest group value read.
    largest_group: u64,
    /// The pool's first failure.
    pub error: Option<String>,
    /// Keep-alives of the members' lease that failed (each renewed, or retried 5 s later).
    pub keepalive_failures: u64,
}

/// What the members take from a generation.
struct InForce {
    generation: u64,
    members: Vec<u32>,
    restore: Restore,
}

/// Reads the generation whose `placement` value is `value`, as its members would: the commit
/// record, then the group values whose content changed since `digests` (updated). Returns it, the
/// bytes every member would have read, and the largest group value.
async fn read_generation(
    client: &mut Client,
    job: &JobKeys,
    value: &[u8],
    digests: &mut Vec<String>,
) -> Result<(InForce, u64, u64), String> {
    let record = match PlacementValue::parse(value).map_err(|e| e.to_string())? {
        PlacementValue::Inline(p) => {
            let bytes = value.len() as u64 * p.members.len() as u64;
            return Ok((
                InForce { generation: p.generation(), members: p.members, restore: p.restore },
                bytes,
                0,
            ));
        }
        PlacementValue::Record(record) => record,
    };
    let members = record.member_ranks().map_err(|e| e.to_string())?;
    let changed: Vec<u32> = (0..)
        .zip(&record.groups)
        .filter(|(g, d)| digests.get(*g as usize) != Some(*d))
        .map(|(g, _)| g)
        .collect();
    let mut kv = client.kv_client().max_decoding_message_size(64 << 20);
    let (mut bytes, mut largest) = (value.len() as u64 * members.len() as u64, 0);
    for batch in changed.chunks(TXN_OPS) {
        let keys: Vec<String> = batch.iter().filter_map(|g| record.group_key(job, *g)).collect();
        let ops = keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect::<Vec<_>>();
        let resp = kv.txn(Txn::new().and_then(ops)).await.map_err(|e| e.to_string())?;
        for (g, op) in batch.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(get) = op else { return Err("not a get".into()) };
            let kv = get.kvs().first().ok_or_else(|| format!("group {g} is missing"))?;
            let group = record.parse_group(*g, kv.value()).map_err(|e| e.to_string())?;
            let len = kv.value().len() as u64;
            largest = largest.max(len);
            bytes += len * members.iter().filter(|&&r| record.group_of(r) == group.index).count() as u64;
        }
    }
    *digests = record.groups.clone();
    Ok((InForce { generation: record.generation, members, restore: record.restore }, bytes, largest))
}

/// The simulated members: one lease for all, registrations and acks in batched transactions.
/// One watch on `placement` stands for every member's watch; the pool reads each changed group
/// value once where each member would read its own (`plan_bytes` counts what they would read).
/// A rank sent on `starts` registers (as a started member process would) and acks every
/// generation it is in; a rank in `state.down` is gone. Public for the e2e apiserver-writes
/// run, where the fake kubelet starts members as their pods run.
pub async fn member_pool(
    mut client: Client,
    job: JobKeys,
    mut starts: mpsc::UnboundedReceiver<u32>,
    state: Arc<Mutex<PoolState>>,
    stop: Arc<AtomicBool>,
) {
    let fail = |state: &Arc<Mutex<PoolState>>, e: String| {
        state.lock().unwrap_or_else(|p| p.into_inner()).error.get_or_insert(e);
    };
    let mut lease = match client.lease_grant(30, None).await {
        Ok(l) => l.id(),
        Err(e) => return fail(&state, format!("member lease: {e}")),
    };
    let Ok((mut keeper, mut keep_stream)) = client.lease_keep_alive(lease).await else {
        return fail(&state, "member keepalive".into());
    };
    let watch = client.watch(job.placement(), Some(WatchOptions::new())).await;
    let Ok(mut plans) = watch else { return fail(&state, "placement watch".into()) };
    let mut registered: BTreeSet<u32> = BTreeSet::new();
    let mut to_register: BTreeSet<u32> = BTreeSet::new();
    let mut plan: Option<InForce> = None;
    // The content digest of each group the members last read.
    let mut digests: Vec<String> = Vec::new();
    let mut step: u64 = 0;
    let mut acked_ranks: BTreeSet<u32> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_step = Instant::now();
    let mut last_keepalive = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut pending_starts = Vec::new();
        tokio::select! {
            _ = tick.tick() => {}
            Some(rank) = starts.recv() => pending_starts.push(rank),
            msg = plans.message() => {
                let values: Vec<Vec<u8>> = match msg {
                    Ok(Some(msg)) => msg
                        .events()
                        .iter()
                        .filter(|e| e.event_type() == EventType::Put)
                        .filter_map(|e| e.kv().map(|kv| kv.value().to_vec()))
                        .collect(),
                    // As a real member does: watch again, and read what it may have missed.
                    _ => match client.watch(job.placement(), Some(WatchOptions::new())).await {
                        Ok(again) => {
                            plans = again;
                            let got = client.get(job.placement(), None).await;
                            got.ok().and_then(|g| g.kvs().first().map(|kv| kv.value().to_vec())).into_iter().collect()
                        }
                        Err(e) => {
                            eprintln!("members: placement watch ended, retried: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            Vec::new()
                        }
                    },
                };
                for value in values {
                    match read_generation(&mut client, &job, &value, &mut digests).await {
                        Ok((p, bytes, largest)) => {
                            plan = Some(p);
                            acked_ranks.clear();
                            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                            s.plan_bytes = bytes;
                            s.largest_group = s.largest_group.max(largest);
                        }
                        Err(e) => fail(&state, format!("placement unreadable: {e}")),
                    }
                }
            }
        }
        while let Ok(rank) = starts.try_recv() {
            pending_starts.push(rank);
        }
        let down = state.lock().unwrap_or_else(|p| p.into_inner()).down.clone();
        // Members of nodes that left are gone: their keys too.
        let gone: Vec<u32> = registered.intersection(&down).copied().collect();
        if !gone.is_empty() {
            let ops = gone.iter().map(|r| TxnOp::delete(job.member(*r), None)).collect::<Vec<_>>();
            for chunk in ops.chunks(TXN_OPS) {
                if let Err(e) = client.txn(Txn::new().and_then(chunk.to_vec())).await {
                    fail(&state, format!("member delete: {e}"));
                }
            }
            for r in gone {
                registered.remove(&r);
            }
        }
        // Start (register) the members the brain asked for.
        // Each rank once (a start dispatched again by a later generation of the same recovery
        // is the same member: etcd refuses a transaction that names a key twice), and a
        // registration etcd refused is retried at the next tick.
        to_register.extend(pending_starts.into_iter().filter(|r| !registered.contains(r)));
        if !to_register.is_empty() {
            let new: Vec<u32> = to_register.iter().copied().collect();
            for chunk in new.chunks(TXN_OPS) {
                match client.txn(Txn::new().and_then(member_puts(&job, lease, chunk))).await {
                    Ok(_) => {
                        for r in chunk {
                            to_register.remove(r);
                            registered.insert(*r);
                        }
                    }
                    Err(e) => eprintln!("members: registration failed, retried: {e}"),
                }
            }
            {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.down.retain(|r| !registered.contains(r));
            }
        }
        // Ack the generation in force for every registered member of it not yet acked.
        if let Some(p) = &plan {
            let g = p.generation;
            let restore_step = match p.restore {
                Restore::Checkpoint { step } | Restore::Peer { step } => step,
                Restore::Fresh => 0,
                Restore::InMemory | Restore::Live => step,
            };
            let todo: Vec<u32> = p
                .members
                .iter()
                .copied()
                .filter(|r| registered.contains(r) && !acked_ranks.contains(r))
                .collect();
            if !todo.is_empty() {
                let ack = MemberAck { step: restore_step, generation: Some(g) };
                let Ok(value) = serde_json::to_string(&ack) else { continue };
                let ops = todo.iter().map(|r| TxnOp::put(job.ack(g, &r.to_string()), value.clone(), None));
                let ops = ops.collect::<Vec<_>>();
                let mut ok = true;
                for chunk in ops.chunks(TXN_OPS) {
                    if let Err(e) = client.txn(Txn::new().and_then(chunk.to_vec())).await {
                        fail(&state, format!("ack: {e}"));
                        ok = false;
                        break;
                    }
                }
                if ok {
                    acked_ranks.extend(todo);
                    step = restore_step;
                    if p.members.iter().all(|r| acked_ranks.contains(r)) {
                        state.lock().unwrap_or_else(|p| p.into_inner()).acked.insert(g, Instant::now());
                    }
                }
            }
            // Progress once a second (one step), a checkpoint record every 10 steps, only
            // while the whole generation is joined.
            if p.members.iter().all(|r| acked_ranks.contains(r))
                && last_step.elapsed() >= Duration::from_secs(1)
            {
                last_step = Instant::now();
                step += 1;
                let progress = ProgressRecord {
                    step,
                    loss: Some(2.0),
                    generation: Some(g),
                    rank: p.members.first().copied(),
                };
                let mut ops = Vec::new();
                if let Ok(v) = serde_json::to_string(&progress) {
                    ops.push(TxnOp::put(job.progress(), v, None));
                }
                if step.is_multiple_of(10) {
                    let record = CheckpointRecord { step, location: None, generation: Some(g) };
                    if let Ok(v) = serde_json::to_string(&record) {
                        ops.push(TxnOp::put(job.checkpoint(step), v, None));
                    }
                }
                if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
                    fail(&state, format!("progress: {e}"));
                }
            }
        }
        if last_keepalive.elapsed() >= Duration::from_secs(5) {
            last_keepalive = Instant::now();
            let answered = keeper.keep_alive().await.is_ok()
                && matches!(keep_stream.message().await, Ok(Some(r)) if r.ttl() > 0);
            if !answered {
                // As a real member does: the same lease on a new stream if etcd still has it,
                // else a new lease with every member key registered again under it. A failure
                // is retried at the next keep-alive, not fatal (an overloaded etcd recovers).
                match renew_members(&mut client, lease, &job, &registered).await {
                    Ok((l, k, s)) => (lease, keeper, keep_stream) = (l, k, s),
                    Err(e) => {
                        state.lock().unwrap_or_else(|p| p.into_inner()).keepalive_failures += 1;
                        eprintln!("members: keep-alive failed, retried in 5 s: {e}");
                    }
                }
            }
        }
    }
}

/// The members' lease after a failed keep-alive: `lease` on a new stream if etcd still has it,
/// else a new lease with the keys of `registered` put again under it.
async fn renew_members(
    client: &mut Client,
    lease: i64,
    job: &JobKeys,
    registered: &BTreeSet<u32>,
) -> Result<(i64, etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), String> {
    if let Ok((keeper, stream)) = client.lease_keep_alive(lease).await {
        return Ok((lease, keeper, stream));
    }
    let lease = client.lease_grant(30, None).await.map_err(|e| format!("member lease: {e}"))?.id();
    let (keeper, stream) =
        client.lease_keep_alive(lease).await.map_err(|e| format!("member keepalive: {e}"))?;
    let ranks: Vec<u32> = registered.iter().copied().collect();
    for chunk in ranks.chunks(TXN_OPS) {
        let ops = member_puts(job, lease, chunk);
        client.txn(Txn::new().and_then(ops)).await.map_err(|e| format!("member register: {e}"))?;
    }
    Ok((lease, keeper, stream))
}

/// The registration of members `ranks` under `lease`: one put of `members/<rank>` each.
fn member_puts(job: &JobKeys, lease: i64, ranks: &[u32]) -> Vec<TxnOp> {
    let value = |r: u32| format!(r#"{{"rank":{r},"addr":"127.0.0.1:0","pid":0}}"#);
    let options = || Some(PutOptions::new().with_lease(lease));
    ranks.iter().map(|r| TxnOp::put(job.member(*r), value(*r), options())).collect()
}

// ---------------------------------------------------------------------------------------------
// etcd's own counters

#[derive(Clone, Copy, Default)]
struct Counters {
    requests: f64,
    bytes: f64,
    db: f64,
}

/// The sum of metric `name`'s samples whose line contains `label` ("" for all) in Prometheus
/// text `text`.
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn counters(addr: SocketAddr) -> Counters {
    let text = http_get(addr, "/metrics").unwrap_or_default();
    let sum = |name: &str| metric_sum(&text, name, "");
    Counters {
        requests: sum("grpc_server_msg_received_total"),
        bytes: sum("etcd_network_client_grpc_received_bytes_total")
            + sum("etcd_network_client_grpc_sent_bytes_total"),
        db: sum("etcd_mvcc_db_total_size_in_bytes"),
    }
}

/// What etcd holds at one moment: its memory and the streams and watchers its clients keep.
struct EtcdTrace {
    rss_mb: f64,
    goroutines: f64,
    watch_streams: f64,
    watchers: f64,
    slow_watchers: f64,
    pending_events: f64,
    keepalive_started: f64,
    keepalive_handled: f64,
    leases_granted: f64,
    leases_revoked: f64,
}

impl EtcdTrace {
    /// etcd's `/metrics` at `addr` and the RSS of `pid` (zeros for what it did not answer: a
    /// stalled etcd answers nothing within the client's timeout).
    fn sample(addr: SocketAddr, pid: &str) -> Self {
        let text = http_get(addr, "/metrics").unwrap_or_default();
        let sum = |name: &str, label: &str| metric_sum(&text, name, label);
        let keepalive = r#"grpc_method="LeaseKeepAlive""#;
        Self {
            rss_mb: rss_of(pid) as f64 / 1e6,
            goroutines: sum("go_goroutines", ""),
            watch_streams: sum("etcd_debugging_mvcc_watch_stream_total", ""),
            watchers: sum("etcd_debugging_mvcc_watcher_total", ""),
            slow_watchers: sum("etcd_debugging_mvcc_slow_watcher_total", ""),
            pending_events: sum("etcd_debugging_mvcc_pending_events_total", ""),
            keepalive_started: sum("grpc_server_started_total", keepalive),
            keepalive_handled: sum("grpc_server_handled_total", keepalive),
            leases_granted: sum("etcd_server_lease_grant_total", "")
                + sum("etcd_debugging_lease_granted_total", ""),
            leases_revoked: sum("etcd_debugging_lease_revoked_total", ""),
        }
    }
}

impl std::fmt::Display for EtcdTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rss {:.0} MB, goroutines {:.0}, watch streams {:.0}, watchers {:.0} (slow {:.0}), pending events {:.0}, keep-alive streams started {:.0} ended {:.0}, leases granted {:.0} revoked {:.0}",
            self.rss_mb,
            self.goroutines,
            self.watch_streams,
            self.watchers,
            self.slow_watchers,
            self.pending_events,
            self.keepalive_started,
            self.keepalive_handled,
            self.leases_granted,
            self.leases_revoked
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// A failure of the harness itself (not of the system under test).
#[derive(Debug)]
pub struct ScaleError(pub String);

impl std::fmt::Display for ScaleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ScaleError {}

fn err(what: &str) -> impl Fn(String) -> ScaleError + '_ {
    move |e| ScaleError(format!("{what}: {e}"))
}

/// Name of node `i` (`node-00042`), of the agents and of the brain's node table.
pub fn node_name(i: u32) -> String {
    format!("node-{i:05}")
}

/// Runs the scale run on the caller's multi-thread runtime.
pub async fn run(o: &Options) -> Result<Report, ScaleError> {
    let text = std::fs::read_to_string(&o.manifest).map_err(|e| err("manifest")(e.to_string()))?;
    let mut job =
        ninelives_core::manifest::parse_job(&text).map_err(|v| err("manifest")(format!("{v:?}")))?;
    job.spec.topology.nodes = o.nodes;
    job.spec.topology.spare_nodes = o.spares;
    let brain =
        BrainConfig::from_spec(&job.spec).map_err(|e| err("brain")(e.to_string()))?.for_expert_parallel();
    let chips = job.spec.topology.chips_per_node;
    let ttl = o.agent_ttl.unwrap_or(i64::from(job.spec.failure_policy.heartbeat_ttl_seconds)).max(1);
    let rack = job.spec.topology.nodes_per_rack.unwrap_or(1);
    let mut report = Report { nodes: o.nodes, chips: o.nodes * chips, agent_ttl: ttl, ..Report::default() };

    let args: Vec<&str> = o.etcd_args.iter().map(String::as_str).collect();
    let etcd = EtcdServer::start_with_args(&args).map_err(|e| err("etcd")(e.to_string()))?;
    // A guard on etcd's memory: an overloaded etcd (clients retrying faster than it answers) can
    // grow until the kernel's OOM killer picks a victim on the shared machine. Past the limit the
    // guard kills this run's etcd (its own child) and the run reports why it broke.
    let addr: SocketAddr = etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .map_err(|e: std::net::AddrParseError| err("addr")(e.to_string()))?;
    let stop_guard = Arc::new(AtomicBool::new(false));
    let etcd_rss_peak = Arc::new(AtomicU64::new(0));
    if let Some(pid) = etcd.pid() {
        let (stop, peak) = (stop_guard.clone(), etcd_rss_peak.clone());
        std::thread::spawn(move || {
            let (t0, mut ticks) = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                // Every 5 s, what etcd holds (to tell a leak of watchers or keep-alive streams
                // from a backlog of events when its memory grows).
                if ticks % 20 == 0 {
                    eprintln!(
                        "[etcd +{:.0} s] {}",
                        t0.elapsed().as_secs_f64(),
                        EtcdTrace::sample(addr, &pid.to_string())
                    );
                }
                ticks += 1;
                let rss = rss_of(&pid.to_string());
                if rss == 0 {
                    // etcd is gone (stopped, killed, a zombie): never signal a reused pid.
                    return;
                }
                peak.fetch_max(rss, Ordering::Relaxed);
                if rss > ETCD_RSS_LIMIT {
                    eprintln!("etcd RSS {:.1} GB over the guard's limit: killing it", rss as f64 / 1e9);
                    let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
    }
    let keys = Keyspace::new("/scale/");
    let job_keys = keys.job(NS, JOB);
    let connect = || async {
        Client::connect([etcd.endpoint()], None).await.map_err(|e| err("connect")(e.to_string()))
    };

    // Agents, on a pool of connections, in batches.
    let mut pool = Vec::new();
    for _ in 0..o.connections.max(1) {
        pool.push(connect().await?);
    }
    let total = o.nodes + o.spares;
    let started = Instant::now();
    let cpu_start = cpu_now(&etcd);
    let mut agents: Vec<Option<Agent>> = Vec::new();
    let mut probes = Vec::new();
    // Whether each agent has been ready (lease held, chips in sync) at least once: on a loaded
    // machine some agent always re-syncs after a missed keepalive, so "all ready at once" may
    // never hold for thousands; each batch waits until its agents have joined once.
    let mut joined: Vec<bool> = Vec::new();
    for n in 0..total {
        let probe = Arc::new(MemProbe::new(chips));
        let source = if o.agent_own_connections {
            EtcdSource::Config(EtcdConfig { endpoints: vec![etcd.endpoint()], tls: None })
        } else {
            EtcdSource::Shared(Box::new(pool[n as usize % pool.len()].clone()))
        };
        let mut config = AgentConfig::new(&node_name(n), source, probe.clone());
        config.keys = keys.clone();
        config.ttl = ttl;
        config.poll_interval = o.agent_poll;
        agents.push(Some(Agent::start(config).await.map_err(|e| err("agent")(e.to_string()))?));
        joined.push(false);
        probes.push(probe);
        if agents.len().is_multiple_of(o.batch) || agents.len() == total as usize {
            // Generous: at 6,250 nodes on a shared 2-core machine a batch of 500 takes minutes.
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let waiting = mark_joined(&agents, &mut joined);
                if waiting == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ScaleError(format!(
                        "{waiting} of {} agents never ready within 600 s",
                        agents.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "[{} nodes] {} agents joined after {:.1} s",
                o.nodes,
                agents.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    // Then all in sync at once, for a while: stragglers re-syncing after a missed keepalive are
    // counted and left to join on their own (the brain sees them as any late node).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        report.stragglers = agents.iter().flatten().filter(|a| !a.is_ready()).count();
        if report.stragglers == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.startup_s = started.elapsed().as_secs_f64();
    let cpu_ready = cpu_now(&etcd);
    eprintln!(
        "[{} nodes] start-up CPU: harness process {:.1} s, etcd {:.1} s over {:.1} s wall; load average {}",
        o.nodes,
        cpu_ready.0 - cpu_start.0,
        cpu_ready.1 - cpu_start.1,
        report.startup_s,
        load_average()
    );
    eprintln!(
        "[{} nodes] {} agents ready in {:.1} s ({} not in sync at the start)",
        o.nodes, total, report.startup_s, report.stragglers
    );

    // Watch the node keys: when each fault becomes visible.
    // Every time a key turned faulty (an alive key deleted, a chip written failed): a key may
    // turn faulty more than once (an etcd stall expires leases; the agent comes back), and a
    // fault is visible at the first change after its injection.
    let visible: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let mut watch_client = connect().await?;
    let mut node_events = watch_client
        .watch(keys.nodes(), Some(WatchOptions::new().with_prefix()))
        .await
        .map_err(|e| err("watch")(e.to_string()))?;
    let vis = visible.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(msg)) = node_events.message().await {
            let now = Instant::now();
            let mut v = vis.lock().unwrap_or_else(|p| p.into_inner());
            for e in msg.events() {
                let Some(kv) = e.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let faulty = e.event_type() == EventType::Delete
                    || String::from_utf8_lossy(kv.value()).contains("\"failed\"");
                if faulty {
                    v.entry(key).or_default().push(now);
                }
            }
        }
    });

    // Members and the loop.
    let pool_state: Arc<Mutex<PoolState>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (start_tx, start_rx) = mpsc::unbounded_channel();
    let members = tokio::spawn(member_pool(
        connect().await?,
        job_keys.clone(),
        start_rx,
        pool_state.clone(),
        stop.clone(),
    ));
    let meter: Arc<Mutex<Meter>> = Arc::default();
    let store = Metered {
        inner: EtcdStore::new(connect().await?, keys.clone(), NS, JOB),
        meter: meter.clone(),
        placement_key: job_keys.placement(),
        record_key: job_keys.recovery(),
    };
    let identity = JobIdentity {
        keys: keys.clone(),
        namespace: NS.into(),
        name: JOB.into(),
        chips_per_node: chips,
        min_healthy_fraction: job.spec.failure_policy.min_healthy_fraction,
    };
    // The run's loop claims the job's writer key, as every driver does (its epoch: its start).
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let writer = WriterRecord::new(format!("scale-{}", std::process::id()), epoch_at(since));
    let control = ControlLoop::new(brain, identity, store, None)
        .with_writer(writer)
        .with_outage_policy(OutagePolicy::for_ttl(ttl as f64));
    let table =
        RecoveryState::new((0..o.nodes).map(node_name).collect(), (o.nodes..total).map(node_name).collect());
    let kube: Arc<Mutex<KubeWrites>> = Arc::default();
    let effects = ScaleEffects { table, start: start_tx, reconcile: false, kube: kube.clone() };
    let (note_tx, mut notes) = mpsc::unbounded_channel();
    let cpu_total = Arc::new(AtomicU64::new(0));
    let in_service: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let loop_thread = spawn_loop(
        control,
        effects,
        meter.clone(),
        o.round,
        stop.clone(),
        note_tx,
        cpu_total.clone(),
        in_service.clone(),
    );

    let t0 = Instant::now();
    let mut last_error: Option<String> = None;
    let mut last = None::<RoundNote>;
    let mut first_error: Option<Instant> = None;
    // Generation 1 joined and the phase running.
    let deadline = t0 + Duration::from_secs(120 + u64::from(o.nodes) / 50);
    loop {
        // The first round plans and publishes the whole job: tens of seconds at 6,250 nodes.
        let note = tokio::time::timeout(Duration::from_secs(90), notes.recv()).await;
        let Ok(Some(note)) = note else {
            report.broke = Some("the loop stopped reporting".into());
            break;
        };
        if let Some(e) = &note.error {
            if last_error.as_deref() != Some(e) {
                eprintln!("[{} nodes] loop: {e}", o.nodes);
            }
            last_error = Some(e.clone());
        }
        // A loop that fails every round for 15 s (etcd refusing the generation) will not
        // recover by waiting: that is where this scale breaks.
        match (&note.error, first_error) {
            (Some(_), None) => first_error = Some(Instant::now()),
            (None, _) => first_error = None,
            _ => {}
        }
        if first_error.is_some_and(|t| t.elapsed() > Duration::from_secs(15)) {
            report.broke =
                Some(format!("generation 1 never committed: {}", last_error.clone().unwrap_or_default()));
            break;
        }
        let running = note.phase == BrainPhase::Running;
        last = Some(note);
        if running {
            report.first_generation_s = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() > deadline {
            let pool_err = pool_state.lock().unwrap_or_else(|p| p.into_inner()).error.clone();
            report.broke = Some(format!(
                "generation 1 not joined within {:.0} s: loop error {:?}; member error {:?}",
                deadline.duration_since(t0).as_secs_f64(),
                last_error,
                pool_err
            ));
            break;
        }
    }
    let _ = last;
    eprintln!(
        "[{} nodes] generation 1: {:?} s; broke: {:?}",
        o.nodes, report.first_generation_s, report.broke
    );

    if report.broke.is_none() {
        // Idle: nothing changes; the loop's per-round cost and etcd's load.
        while notes.try_recv().is_ok() {}
        let c0 = counters(addr);
        let idle_start = Instant::now();
        let cpu0 = cpu_now(&etcd);
        let (mut rounds, mut wall, mut cpu) = (0u64, 0f64, 0f64);
        let r0 = meter.lock().unwrap_or_else(|p| p.into_inner()).read_ns;
        let (reads0, keys0, bytes0) = {
            let m = meter.lock().unwrap_or_else(|p| p.into_inner());
            (m.reads, m.read_keys, m.read_bytes)
        };
        while idle_start.elapsed() < o.idle {
            if let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await {
                rounds += 1;
                wall += n.wall.as_secs_f64() * 1e3;
                cpu += n.cpu_ns as f64 / 1e6;
            }
        }
        let c1 = counters(addr);
        let secs = idle_start.elapsed().as_secs_f64();
        let cpu1 = cpu_now(&etcd);
        report.idle_process_cpu = (cpu1.0 - cpu0.0) / secs;
        report.idle_etcd_cpu = (cpu1.1 - cpu0.1) / secs;
        eprintln!(
            "[{} nodes] idle CPU: harness process {:.2} cores (agents, members, loop), etcd {:.2} cores; load average {}",
            o.nodes,
            report.idle_process_cpu,
            report.idle_etcd_cpu,
            load_average()
        );
        {
            let m = meter.lock().unwrap_or_else(|p| p.into_inner());
            report.idle_read_ms = (m.read_ns - r0) as f64 / 1e6 / (m.reads - reads0).max(1) as f64;
            let reads = (m.reads - reads0).max(1);
            report.read_bytes = (m.read_bytes - bytes0) / reads;
            report.read_keys = (m.read_keys - keys0) / reads;
            report.placement_bytes = m.placement_bytes;
            report.record_bytes = m.record_bytes;
        }
        report.idle_rounds = rounds;
        report.idle_round_ms = wall / rounds.max(1) as f64;
        report.idle_cpu_ms = cpu / rounds.max(1) as f64;
        report.idle_etcd_rps = (c1.requests - c0.requests) / secs;
        report.idle_etcd_bps = (c1.bytes - c0.bytes) / secs;
        eprintln!(
            "[{} nodes] idle: {rounds} rounds, {:.1} ms/round wall, {:.1} ms CPU, read {:.1} ms, {} keys {} B (placement {} B), etcd {:.0} req/s {:.0} B/s",
            o.nodes,
            report.idle_round_ms,
            report.idle_cpu_ms,
            report.idle_read_ms,
            report.read_keys,
            report.read_bytes,
            report.placement_bytes,
            report.idle_etcd_rps,
            report.idle_etcd_bps
        );

        if let Some(stall) = o.stall {
            report.stall = Some(stall_etcd(&etcd, stall, &mut notes).await);
            eprintln!("[{} nodes] etcd stalled {:?}: {:?}", o.nodes, stall, report.stall);
            // Who is behind a freeze: the agents (not back in etcd) or the loop's view (etcd has
            // them, the brain does not see them).
            let ready = agents.iter().flatten().filter(|a| a.is_ready()).count();
            let mut kv = connect().await?.kv_client();
            let listed = kv.get(keys.nodes(), Some(GetOptions::new().with_prefix().with_keys_only())).await;
            let alive =
                listed.map_or(0, |r| r.kvs().iter().filter(|kv| kv.key().ends_with(b"/alive")).count());
            let diagnosis = format!("after the stall: {ready} agents ready, {alive} alive keys in etcd");
            eprintln!("[{} nodes] {diagnosis}", o.nodes);
            report.stall = Some(format!("{}; {diagnosis}", report.stall.take().unwrap_or_default()));
        }

        // Faults, one at a time, each on a node not touched before.
        let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(o.nodes);
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m.max(1)
        };
        let mut used: BTreeSet<u32> = BTreeSet::new();
        let racks = o.nodes / rack.max(1);
        let plan = [Kind::Chip, Kind::Node, Kind::Rack, Kind::Flap];
        for i in 0..o.faults_per_kind * plan.len() {
            let kind = plan[i % plan.len()];
            // Choose targets: nodes the job still has (not replaced by a spare, not dropped by
            // a shrink: an etcd stall that expires leases can do either), not faulted before.
            let targets = (0..100_000).find_map(|_| {
                let t: Vec<u32> = if kind == Kind::Rack {
                    let r = u32::try_from(next(u64::from(racks))).unwrap_or(0);
                    (r * rack..(r + 1) * rack).collect()
                } else {
                    vec![u32::try_from(next(u64::from(o.nodes))).unwrap_or(0)]
                };
                let serving = in_service.lock().unwrap_or_else(|p| p.into_inner());
                t.iter().all(|n| !used.contains(n) && serving.contains(&node_name(*n))).then_some(t)
            });
            let Some(targets) = targets else {
                report.broke = Some(format!("no {} fault target left in the job", kind.as_str()));
                break;
            };
            used.extend(&targets);
            let chip = u32::try_from(next(u64::from(chips))).unwrap_or(0);
            let watch_keys: Vec<String> = match kind {
                Kind::Chip | Kind::Flap => vec![keys.chip(&node_name(targets[0]), chip)],
                Kind::Node | Kind::Rack => targets.iter().map(|n| keys.node_alive(&node_name(*n))).collect(),
            };
            while notes.try_recv().is_ok() {}
            let before = counters(addr);
            let kube_before = *kube.lock().unwrap_or_else(|p| p.into_inner());
            let injected = Instant::now();
            let completed_before = last_completed(&mut notes).await.unwrap_or(0);
            match kind {
                Kind::Chip => probes[targets[0] as usize].set(chip, true),
                Kind::Flap => {
                    let probe = probes[targets[0] as usize].clone();
                    tokio::spawn(async move {
                        for onset in 0..3 {
                            probe.set(chip, true);
                            tokio::time::sleep(Duration::from_millis(600)).await;
                            if onset < 2 {
                                probe.set(chip, false);
                                tokio::time::sleep(Duration::from_millis(600)).await;
                            }
                        }
                    });
                }
                Kind::Node | Kind::Rack => {
                    {
                        let mut s = pool_state.lock().unwrap_or_else(|p| p.into_inner());
                        s.down.extend(&targets);
                    }
                    let mut stopping = Vec::new();
                    for n in &targets {
                        if let Some(a) = agents.get_mut(*n as usize).and_then(Option::take) {
                            stopping.push(tokio::spawn(a.shutdown()));
                        }
                    }
                    for s in stopping {
                        let _ = s.await;
                    }
                }
            }
            let result = time_fault(
                kind,
                &watch_keys,
                &visible,
                &mut notes,
                &pool_state,
                injected,
                completed_before,
                o.fault_timeout,
            )
            .await;
            let after = counters(addr);
            let mut result = result;
            result.requests = after.requests - before.requests;
            result.bytes = after.bytes - before.bytes;
            let kube_after = *kube.lock().unwrap_or_else(|p| p.into_inner());
            result.kube = KubeWrites {
                events: kube_after.events - kube_before.events,
                status: kube_after.status - kube_before.status,
                pods: kube_after.pods - kube_before.pods,
            };
            eprintln!(
                "[{} nodes] {} fault {}: visible+{:?} detected {:?} committed {:?} acked {:?} completed {:?} tiers {:?} req {:.0} bytes {:.0} apiserver {:?} load {} {}",
                o.nodes,
                kind.as_str(),
                i / plan.len(),
                result.inject_to_visible,
                result.detected,
                result.committed,
                result.acked,
                result.completed,
                result.tiers,
                result.requests,
                result.bytes,
                result.kube,
                load_average(),
                result.error.clone().unwrap_or_default()
            );
            eprintln!(
                "[{} nodes] agents' etcd errors so far, by operation: {:?}",
                o.nodes,
                agent_errors(&agents)
            );
            let broken = result.error.is_some() && result.committed.is_none();
            report.faults.push(result);
            if broken {
                report.broke = Some(format!("{} fault not recovered: {:?}", kind.as_str(), last_error));
                break;
            }
        }
    }

    {
        let m = meter.lock().unwrap_or_else(|p| p.into_inner());
        report.largest_write = m.largest_write;
        report.largest_txn = m.largest_txn;
        report.group_writes = m.group_writes;
        report.group_deletes = m.group_deletes;
        report.largest_group = m.largest_group_write;
        report.view_lists = m.lists;
        if report.placement_bytes == 0 {
            report.placement_bytes = m.placement_bytes;
        }
    }
    {
        let s = pool_state.lock().unwrap_or_else(|p| p.into_inner());
        report.member_plan_bytes = s.plan_bytes;
        report.largest_group = report.largest_group.max(s.largest_group);
    }
    // etcd may be the thing that broke: the scan is bounded and its failure is reported, not
    // fatal (the figures above are kept).
    let scan = async { largest_stored(&connect().await?).await };
    match tokio::time::timeout(Duration::from_secs(30), scan).await {
        Ok(Ok(largest)) => report.largest_stored = largest,
        Ok(Err(e)) => {
            report.broke = Some(format!("{}; final scan: {e}", report.broke.take().unwrap_or_default()))
        }
        Err(_) => {
            report.broke =
                Some(format!("{}; final scan: no answer in 30 s", report.broke.take().unwrap_or_default()))
        }
    }
    stop_guard.store(true, Ordering::Relaxed);
    report.etcd_rss_peak = etcd_rss_peak.load(Ordering::Relaxed);
    if report.etcd_rss_peak > ETCD_RSS_LIMIT {
        report.broke = Some(format!(
            "{}; etcd killed at {:.1} GB RSS",
            report.broke.take().unwrap_or_default(),
            report.etcd_rss_peak as f64 / 1e9
        ));
    }
    report.db_bytes = counters(addr).db;
    report.rss_bytes = rss_bytes();
    stop.store(true, Ordering::Relaxed);
    report.loop_cpu_s = cpu_total.load(Ordering::Relaxed) as f64 / 1e9;
    drop(notes);
    let _ = tokio::task::spawn_blocking(move || loop_thread.join()).await;
    members.abort();
    watcher.abort();
    // Together: one at a time, 6,312 lease revocations took longer than the run.
    let stopping: Vec<_> = agents.into_iter().flatten().map(|a| tokio::spawn(a.shutdown())).collect();
    for s in stopping {
        let _ = s.await;
    }
    drop(pool);
    Ok(report)
}

/// The etcd errors the agents counted (`ninelives_agent_etcd_errors_total`), summed by operation.
fn agent_errors(agents: &[Option<Agent>]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for agent in agents.iter().flatten() {
        for family in agent.metrics().registry().gather() {
            if family.name() != "ninelives_agent_etcd_errors_total" {
                continue;
            }
            for m in family.get_metric() {
                let op = m.get_label().iter().map(|l| l.value().to_string()).collect::<Vec<_>>().join(",");
                *out.entry(op).or_insert(0.0) += m.get_counter().get_value();
            }
        }
    }
    out
}

/// Stops etcd for `stall` (SIGSTOP, as a stalled disk or a starved process does), resumes it,
/// and follows the loop until it runs with no recovery in progress and no error for 2 s (at
/// most 120 s). Returns what happened, for the report.
async fn stall_etcd(
    etcd: &EtcdServer,
    stall: Duration,
    notes: &mut mpsc::UnboundedReceiver<RoundNote>,
) -> String {
    let Some(pid) = etcd.pid() else { return "no etcd process".into() };
    let signal = |sig: &str| {
        std::process::Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success())
    };
    if !signal("-STOP") {
        return "could not stop etcd".into();
    }
    tokio::time::sleep(stall).await;
    if !signal("-CONT") {
        return "could not resume etcd".into();
    }
    let resumed = Instant::now();
    let (mut errors, mut recoveries, mut quiet_since) = (BTreeSet::new(), 0usize, None::<Instant>);
    let mut last = None::<RoundNote>;
    while resumed.elapsed() < Duration::from_secs(120) {
        let Ok(Some(note)) = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await else { break };
        if let Some(e) = &note.error {
            errors.insert(e.chars().take(120).collect::<String>());
        }
        recoveries += note.published.len();
        let quiet = note.error.is_none() && !note.active && note.phase == BrainPhase::Running;
        quiet_since = if quiet { quiet_since.or(Some(Instant::now())) } else { None };
        last = Some(note);
        if quiet_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
            break;
        }
    }
    let settled = quiet_since.map_or("never settled within 120 s".to_string(), |t| {
        format!("settled {:.1} s after etcd resumed", t.duration_since(resumed).as_secs_f64())
    });
    format!(
        "{settled}; {recoveries} generations published meanwhile; phase {:?}; loop errors {errors:?}",
        last.map(|n| n.phase)
    )
}

/// Marks the agents ready now as joined; returns how many have never been ready.
fn mark_joined(agents: &[Option<Agent>], joined: &mut [bool]) -> usize {
    for (a, j) in agents.iter().zip(joined.iter_mut()) {
        *j |= a.as_ref().is_some_and(Agent::is_ready);
    }
    joined.iter().take(agents.len()).filter(|j| !**j).count()
}

/// The largest value stored under any key (one read of the whole keyspace).
async fn largest_stored(client: &Client) -> Result<u64, ScaleError> {
    let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
    let all = kv.get(vec![0u8], Some(GetOptions::new().with_from_key())).await;
    let all = all.map_err(|e| err("scan")(e.to_string()))?;
    Ok(all.kvs().iter().map(|kv| kv.value().len() as u64).max().unwrap_or(0))
}

/// The number of completed recoveries as of the latest round.
async fn last_completed(notes: &mut mpsc::UnboundedReceiver<RoundNote>) -> Option<usize> {
    tokio::time::timeout(Duration::from_secs(5), notes.recv()).await.ok().flatten().map(|n| n.completed)
}

/// Follows the loop's rounds until the recovery of this fault completes.
#[allow(clippy::too_many_arguments)]
async fn time_fault(
    kind: Kind,
    watch_keys: &[String],
    visible: &Mutex<HashMap<String, Vec<Instant>>>,
    notes: &mut mpsc::UnboundedReceiver<RoundNote>,
    pool: &Mutex<PoolState>,
    injected: Instant,
    completed_before: usize,
    timeout: Duration,
) -> FaultResult {
    let mut r = FaultResult {
        kind,
        detected: None,
        committed: None,
        acked: None,
        completed: None,
        inject_to_visible: None,
        requests: 0.0,
        bytes: 0.0,
        generations: 0,
        tiers: Vec::new(),
        kube: KubeWrites::default(),
        error: None,
    };
    let mut gens: BTreeMap<u64, Option<Instant>> = BTreeMap::new();
    let (mut detected, mut completed) = (None, None);
    let mut last_error = None;
    let deadline = injected + timeout;
    while completed.is_none() && Instant::now() < deadline {
        let Ok(Some(note)) = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await else { break };
        if note.error.is_some() {
            last_error = note.error.clone();
        }
        if detected.is_none() && (note.active || !note.published.is_empty()) {
            detected = note.read_done;
        }
        for (g, _, at) in &note.published {
            gens.insert(*g, *at);
            r.tiers.push(note.published.iter().find(|p| p.0 == *g).map(|p| p.1.clone()).unwrap_or_default());
        }
        if note.completed > completed_before && !note.active {
            completed = Some(Instant::now());
        }
    }
    // The fault became visible when the first of its keys changed.
    let seen = {
        let v = visible.lock().unwrap_or_else(|p| p.into_inner());
        watch_keys.iter().filter_map(|k| v.get(k)).flatten().copied().filter(|t| *t >= injected).min()
    };
    let base = seen.unwrap_or(injected);
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(base).as_secs_f64());
    r.inject_to_visible = seen.map(|t| t.duration_since(injected).as_secs_f64());
    r.detected = since(detected);
    r.committed = since(gens.values().flatten().min().copied());
    r.generations = gens.len();
    // The recovery's own generations (the `settled` one that follows completion is not
    // part of the recovery's critical path).
    if let Some(g) = generation_of_recovery(&gens, &r.tiers) {
        r.acked = since(pool.lock().unwrap_or_else(|p| p.into_inner()).acked.get(&g).copied());
    }
    r.completed = since(completed);
    if completed.is_none() {
        let members = pool.lock().unwrap_or_else(|p| p.into_inner()).error.clone();
        r.error = Some(format!(
            "not completed within {:.0} s (last loop error: {last_error:?}; members' error: {members:?}; \
             generations published {gens:?}; visible {seen:?} after injection)",
            timeout.as_secs_f64(),
            gens = gens.keys().collect::<Vec<_>>(),
            seen = seen.map(|t| t.duration_since(injected)),
        ));
    }
    r
}

/// The last generation of a recovery that is not the `settled` one.
fn generation_of_recovery(gens: &BTreeMap<u64, Option<Instant>>, tiers: &[String]) -> Option<u64> {
    let keys: Vec<u64> = gens.keys().copied().collect();
    keys.iter()
        .zip(tiers)
        .filter(|(_, t)| t.as_str() != "settled")
        .map(|(g, _)| *g)
        .next_back()
        .or(keys.last().copied())
}

/// p-th percentile (nearest rank) of `values`.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}
