//! Writing, verifying, loading and retaining checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use ninelives_core::ModelDims;

use super::manifest::{
    ADAM_M_SUFFIX, ADAM_V_SUFFIX, CheckpointManifest, ChecksumKind, Checksummer, DataCursor, FORMAT_VERSION,
    MANIFEST_FILE, OptimizerState, READABLE_VERSIONS, RngState, ShardContents, ShardEntry,
};
use super::reader::{self, ShardSink, TensorSpan, VerifyOnly};
use crate::error::{Result, WorkerError};
use crate::model::{ExpertId, HostTensor, ParamOwner};
use crate::optim::Moments;

/// Prefix of checkpoint directory names (`step-0000000025`).
const STEP_PREFIX: &str = "step-";
/// Suffix of files not yet committed by rename.
const TMP_SUFFIX: &str = ".tmp";
// Shards hold the tensors' in-memory bytes as they are: safetensors is little-endian.
#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint I/O writes f32 tensors as native bytes and needs a little-endian host");

/// Threads that hash and write shards (CPU-bound: memory copy into the page cache + checksum).
const WRITE_THREADS: usize = 2;
/// Threads that fsync and rename written shards (waiting on the disk), so the disk starts on the
/// first shards while later ones are still being hashed and written.
const SYNC_THREADS: usize = 2;
/// Name of the keyed RNG scheme (see `crate::rng`).
pub const RNG_ALGORITHM: &str = "splitmix64-keyed(seed,name|step,sample)";

/// A full copy of the training state, taken between steps; the writer works from it while
/// training continues.
#[derive(Clone, Debug)]
pub struct TrainingSnapshot {
    /// Optimizer steps completed.
    pub step: u64,
    /// Model dimensions.
    pub dims: ModelDims,
    /// Data position.
    pub data_cursor: DataCursor,
    /// Parameter values by name.
    pub params: BTreeMap<String, HostTensor>,
    /// Adam moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// sha256 over the parameters (see `MoeTransformer::params_sha256`).
    pub params_sha256: String,
}

/// Which routed experts to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertSelection {
    /// Every expert in the checkpoint.
    All,
    /// Only these (a worker's share of a placement).
    Only(Vec<ExpertId>),
}

impl ExpertSelection {
    fn wants(&self, contents: &ShardContents) -> bool {
        match (self, contents.expert()) {
            (_, None) | (ExpertSelection::All, Some(_)) => true,
            (ExpertSelection::Only(ids), Some(id)) => ids.contains(&id),
        }
    }
}

/// A committed checkpoint read back and verified.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    /// Its directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: CheckpointManifest,
    /// Parameter values by name (dense + the selected experts).
    pub params: BTreeMap<String, HostTensor>,
    /// Adam moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
    /// How the load went.
    pub report: LoadReport,
}

/// Outcome of a save.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveReport {
    /// Step saved.
    pub step: u64,
    /// Checkpoint directory.
    pub path: PathBuf,
    /// Bytes written (shards + manifest).
    pub bytes: u64,
    /// Wall time from first byte to the directory fsync after the manifest rename.
    pub seconds: f64,
    /// Older checkpoints deleted by retention.
    pub removed: Vec<PathBuf>,
}

/// Outcome of a load.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Bytes read and verified.
    pub bytes: u64,
    /// Wall time of reading, verifying and decoding.
    pub seconds: f64,
    /// Newer checkpoints skipped because they were torn or corrupt, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// A directory of checkpoints with keep-last-N retention.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep_last: usize,
}

impl CheckpointStore {
    /// A store in `dir` (created if needed) keeping the newest `keep_last` checkpoints.
    pub fn open(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| WorkerError::CheckpointIo { path: dir.clone(), source })?;
        Ok(Self { dir, keep_last: keep_last.max(1) })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory a checkpoint of `step` lives in.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{STEP_PREFIX}{step:010}"))
    }

    /// The step of a checkpoint directory (`None` when `path` is not named like one), e.g. of
    /// a directory [`SaveReport::removed`] lists.
    pub fn step_of(path: &Path) -> Option<u64> {
        path.file_name()?.to_str()?.strip_prefix(STEP_PREFIX)?.parse().ok()
    }

    /// Checkpoint directories by step, newest first, with whether each is committed (has its
    /// manifest).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf, bool)>> {
        let io = |source| WorkerError::CheckpointIo { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let Some(step) = Self::step_of(&path) else {
                continue;
            };
            let committed = path.join(MANIFEST_FILE).is_file();
            out.push((step, path, committed));
        }
        out.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        Ok(out)
    }

    /// Writes `snapshot` as a committed checkpoint, then applies retention. Synchronous; see
    /// [`BackgroundSaver`] for the non-blocking path.
    pub fn save(&self, snapshot: &TrainingSnapshot) -> Result<SaveReport> {
        let started = Instant::now();
        let dir = self.step_dir(snapshot.step);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WorkerError::CheckpointIo { path, source }
        };
        if dir.exists() {
            // A torn attempt at the same step (no manifest, or being overwritten after a
            // rollback): start clean.
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        fs::create_dir_all(dir.join("experts")).map_err(io(&dir))?;
        fsync_dir(&self.dir)?;
        fsync_dir(&dir)?;

        // Group tensors into shards: dense, and one per expert.
        let mut shards: BTreeMap<ShardContents, Vec<&str>> = BTreeMap::new();
        for name in snapshot.params.keys() {
            let contents = match ParamOwner::of(name) {
                ParamOwner::Dense => ShardContents::Dense,
                ParamOwner::Expert(id) => ShardContents::Expert { layer: id.layer, expert: id.expert },
            };
            shards.entry(contents).or_default().push(name);
        }
        let jobs: Vec<(ShardContents, Vec<&str>)> = shards.into_iter().collect();
        let entries = write_shards(&dir, snapshot, &jobs)?;
        fsync_dir(&dir.join("experts"))?;

        let manifest = CheckpointManifest {
            format_version: FORMAT_VERSION,
            step: snapshot.step,
            model: snapshot.dims,
            data_cursor: snapshot.data_cursor,
            rng: RngState { algorithm: RNG_ALGORITHM.into(), seed: snapshot.data_cursor.seed },
            optimizer: OptimizerState {
                kind: "adamw".into(),
                updates: snapshot.step,
                location: format!(
                    "in each parameter's shard as <name>{ADAM_M_SUFFIX} and <name>{ADAM_V_SUFFIX}"
                ),
            },
            shards: entries,
            params_sha256: snapshot.params_sha256.clone(),
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| WorkerError::CheckpointWriter(format!("encoding manifest: {e}")))?;
        // The commit point: the manifest's rename, made durable by the directory fsync.
        write_durable(&dir.join(MANIFEST_FILE), &text)?;
        fsync_dir(&dir)?;
        let bytes = manifest.shards.iter().map(|s| s.bytes).sum::<u64>() + text.len() as u64;
        let seconds = started.elapsed().as_secs_f64();
        let removed = self.retain()?;
        Ok(SaveReport { step: snapshot.step, path: dir, bytes, seconds, removed })
    }

    /// Deletes committed checkpoints beyond the newest `keep_last`, and torn (uncommitted)
    /// directories older than the newest committed one. Returns what it removed.
    pub fn retain(&self) -> Result<Vec<PathBuf>> {
        let list = self.list()?;
        let newest_committed = list.iter().find(|(_, _, c)| *c).map(|(s, _, _)| *s);
        let mut kept = 0;
        let mut removed = Vec::new();
        for (step, path, committed) in list {
            let drop = if committed {
                kept += 1;
                kept > self.keep_last
            } else {
                newest_committed.is_some_and(|n| step < n)
            };
            if drop {
                fs::remove_dir_all(&path)
                    .map_err(|source| WorkerError::CheckpointIo { path: path.clone(), source })?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Loads the newest committed checkpoint that verifies, falling back past torn or corrupt
    /// ones (each logged). `Ok(None)` when the directory holds no committed checkpoint (none at
    /// all, or only torn ones: a writer killed before its first commit leaves nothing that was
    /// ever a checkpoint, so training starts over, as the recovery brain expects); an error when
    /// committed checkpoints exist but none is usable (never a silent fresh start).
    pub fn load_latest(
        &self,
        dims: &ModelDims,
        selection: &ExpertSelection,
    ) -> Result<Option<LoadedCheckpoint>> {
        Ok(self.newest_usable(|path| self.load_dir(path, dims, selection))?.map(|(mut loaded, skipped)| {
            loaded.report.skipped = skipped;
            loaded
        }))
    }

    /// Restores the newest committed checkpoint that verifies into `target`'s existing memory,
    /// falling back past torn or corrupt ones (each logged) as [`CheckpointStore::load_latest`]
    /// does. After an error `target` may hold a mix of checkpoints: restore again or rebuild it.
    pub fn restore_latest(
        &self,
        dims: &ModelDims,
        target: &(impl RestoreTarget + ?Sized),
    ) -> Result<Option<(CheckpointManifest, LoadReport)>> {
        Ok(self.newest_usable(|path| self.restore_dir(path, dims, target))?.map(
            |((manifest, mut report), skipped)| {
                report.skipped = skipped;
                (manifest, report)
            },
        ))
    }

    /// Runs `use_dir` on the newest committed checkpoint, then on older ones while it fails with
    /// anything but [`WorkerError::IncompatibleCheckpoint`]. `Ok(None)` when the directory holds
    /// no committed checkpoint (none at all, or only torn ones: a writer killed before its first
    /// commit leaves nothing that was ever a checkpoint, so training starts over, as the recovery
    /// brain expects); an error when committed checkpoints exist but none is usable (never a
    /// silent fresh start). Returns the result and the checkpoints skipped, with the reason.
    fn newest_usable<T>(
        &self,
        mut use_dir: impl FnMut(&Path) -> Result<T>,
    ) -> Result<Option<(T, Vec<Skipped>)>> {
        let list = self.list()?;
        if !list.iter().any(|(_, _, committed)| *committed) {
            for (step, path, _) in &list {
                tracing::warn!(step, path = %path.display(), "checkpoint {} is torn (never committed); ignoring it", path.display());
            }
            return Ok(None);
        }
        let mut skipped = Vec::new();
        for (step, path, committed) in &list {
            if !committed {
                let reason = "torn: no manifest (the writer stopped before the commit)".to_string();
                tracing::warn!(step, path = %path.display(), "checkpoint {} is {reason}; ignoring it", path.display());
                skipped.push((path.clone(), reason));
                continue;
            }
            match use_dir(path) {
                Ok(done) => return Ok(Some((done, skipped))),
                Err(err @ WorkerError::IncompatibleCheckpoint { .. }) => return Err(err),
                Err(err) => {
                    tracing::warn!(
                        step,
                        path = %path.display(),
                        "{err}; falling back to the previous committed checkpoint"
                    );
                    skipped.push((path.clone(), err.to_string()));
                }
            }
        }
        Err(WorkerError::NoUsableCheckpoint { dir: self.dir.clone(), tried: list.len() })
    }

    /// Checks every shard of a committed checkpoint against its manifest (size and checksum)
    /// without decoding. Expert-parallel workers each read only their own shards, so the job
    /// agrees on a step that this check passed for before every worker loads its share.
    pub fn verify_dir(&self, path: &Path) -> Result<CheckpointManifest> {
        let (manifest, _) = parse_manifest(path)?;
        let entries: Vec<&ShardEntry> = manifest.shards.iter().collect();
        for r in reader::read_verified(path, &entries, |_, _| VerifyOnly) {
            r?;
        }
        Ok(manifest)
    }

    /// The newest committed checkpoint whose every shard verifies, logging each one skipped.
    pub fn newest_verified(&self) -> Result<Option<(u64, PathBuf)>> {
        for (step, path, committed) in self.list()? {
            if !committed {
                continue;
            }
            match self.verify_dir(&path) {
                Ok(_) => return Ok(Some((step, path))),
                Err(err) => tracing::warn!(step, "{err}; falling back to the previous committed checkpoint"),
            }
        }
        Ok(None)
    }

    /// Load-time resharding: the newest usable checkpoint, reading the dense shard and only the
    /// expert shards of `experts` (a worker's share of a new placement). Only the shards read
    /// are verified; see [`CheckpointStore::verify_dir`] for agreeing on a step job-wide.
    pub fn load_experts(&self, dims: &ModelDims, experts: &[ExpertId]) -> Result<Option<LoadedCheckpoint>> {
        self.load_latest(dims, &ExpertSelection::Only(experts.to_vec()))
    }

    /// Loads and verifies one committed checkpoint directory into fresh vectors.
    pub fn load_dir(
        &self,
        path: &Path,
        dims: &ModelDims,
        selection: &ExpertSelection,
    ) -> Result<LoadedCheckpoint> {
        let started = Instant::now();
        let (manifest, manifest_bytes) = read_manifest(path, dims)?;
        let wanted = selected_shards(path, &manifest, selection)?;
        let results = reader::read_verified(path, &wanted, FreshSink::new);
        let mut params = BTreeMap::new();
        let mut moments = BTreeMap::new();
        let mut bytes = manifest_bytes;
        for r in results {
            let shard = r?;
            bytes += shard.bytes;
            params.extend(shard.params);
            moments.extend(shard.moments);
        }
        let report = LoadReport { bytes, seconds: started.elapsed().as_secs_f64(), skipped: Vec::new() };
        Ok(LoadedCheckpoint { path: path.to_path_buf(), manifest, params, moments, report })
    }

    /// Restores one committed checkpoint directory into `target`'s existing memory: the dense
    /// shard and the shards of the experts `target` holds. Each shard is written piece by piece
    /// as it streams in and counts only once its size and checksum match; every tensor `target`
    /// holds must be written exactly once. Nothing is allocated per tensor, so a restore into a
    /// live trainer costs the read, the checksum and one copy. After an error `target` may be
    /// partly overwritten (also with bytes of a shard that then failed its checksum).
    pub fn restore_dir(
        &self,
        path: &Path,
        dims: &ModelDims,
        target: &(impl RestoreTarget + ?Sized),
    ) -> Result<(CheckpointManifest, LoadReport)> {
        let started = Instant::now();
        let corrupt = |reason: String| WorkerError::CorruptCheckpoint { path: path.to_path_buf(), reason };
        let (manifest, manifest_bytes) = read_manifest(path, dims)?;
        target.check(&manifest, path)?;
        let held: BTreeMap<String, usize> = target.held();
        let experts: BTreeSet<ExpertId> = held
            .keys()
            .filter_map(|name| match ParamOwner::of(name) {
                ParamOwner::Expert(id) => Some(id),
                ParamOwner::Dense => None,
            })
            .collect();
        let wanted = selected_shards(path, &manifest, &ExpertSelection::Only(experts.into_iter().collect()))?;
        let written: Mutex<BTreeSet<(String, TensorPart)>> = Mutex::new(BTreeSet::new());
        let results = reader::read_verified(path, &wanted, |shard, entry| RestoreSink {
            path: shard.to_path_buf(),
            bytes: entry.bytes,
            held: &held,
            target,
            written: &written,
            parts: Vec::new(),
        });
        let mut bytes = manifest_bytes;
        for r in results {
            bytes += r?;
        }
        let written = written.into_inner().map_err(|_| corrupt("a restore thread panicked".into()))?;
        for name in held.keys() {
            for part in [TensorPart::Value, TensorPart::AdamM, TensorPart::AdamV] {
                if !written.contains(&(name.clone(), part)) {
                    return Err(corrupt(format!("{} of {name} is missing", part.describe())));
                }
            }
        }
        let report = LoadReport { bytes, seconds: started.elapsed().as_secs_f64(), skipped: Vec::new() };
        Ok((manifest, report))
    }
}

/// Reads and parses a checkpoint's manifest; returns it and its size in bytes.
fn parse_manifest(path: &Path) -> Result<(CheckpointManifest, u64)> {
    let manifest_path = path.join(MANIFEST_FILE);
    let text = fs::read(&manifest_path)
        .map_err(|source| WorkerError::CheckpointIo { path: manifest_path.clone(), source })?;
    let manifest: CheckpointManifest =
        serde_json::from_slice(&text).map_err(|e| WorkerError::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason: format!("manifest does not parse: {e}"),
        })?;
    Ok((manifest, text.len() as u64))
}

/// Reads a checkpoint's manifest and checks that this worker can use it (format, model, RNG
/// scheme). Returns it and its size in bytes.
fn read_manifest(path: &Path, dims: &ModelDims) -> Result<(CheckpointManifest, u64)> {
    let (manifest, bytes) = parse_manifest(path)?;
    let incompatible =
        |reason: String| WorkerError::IncompatibleCheckpoint { path: path.to_path_buf(), reason };
    if !READABLE_VERSIONS.contains(&manifest.format_version) {
        return Err(incompatible(format!(
            "format version {} (this worker reads {READABLE_VERSIONS:?})",
            manifest.format_version
        )));
    }
    if manifest.model != *dims {
        return Err(incompatible(format!(
            "written for model {:?}, the job trains {:?}",
            manifest.model, dims
        )));
    }
    if manifest.rng.algorithm != RNG_ALGORITHM {
        return Err(incompatible(format!(
            "RNG scheme {:?}, this worker uses {RNG_ALGORITHM:?}",
            manifest.rng.algorithm
        )));
    }
    Ok((manifest, bytes))
}

/// The shards of `manifest` that `selection` wants; an error if a selected expert has none.
fn selected_shards<'m>(
    path: &Path,
    manifest: &'m CheckpointManifest,
    selection: &ExpertSelection,
) -> Result<Vec<&'m ShardEntry>> {
    if let ExpertSelection::Only(ids) = selection {
        for id in ids {
            let wanted = ShardContents::Expert { layer: id.layer, expert: id.expert };
            if !manifest.shards.iter().any(|s| s.contents == wanted) {
                return Err(WorkerError::CorruptCheckpoint {
                    path: path.to_path_buf(),
                    reason: format!("no shard for {id}"),
                });
            }
        }
    }
    Ok(manifest.shards.iter().filter(|s| selection.wants(&s.contents)).collect())
}

/// Which tensor of a parameter a checkpoint key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TensorPart {
    /// The parameter's value.
    Value,
    /// Adam's first moment.
    AdamM,
    /// Adam's second moment.
    AdamV,
}

impl TensorPart {
    /// Splits a checkpoint key into the parameter name and the part.
    pub fn of_key(key: &str) -> (&str, TensorPart) {
        if let Some(name) = key.strip_suffix(ADAM_M_SUFFIX) {
            (name, TensorPart::AdamM)
        } else if let Some(name) = key.strip_suffix(ADAM_V_SUFFIX) {
            (name, TensorPart::AdamV)
        } else {
            (key, TensorPart::Value)
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TensorPart::Value => "the value",
            TensorPart::AdamM => "Adam's first moment",
            TensorPart::AdamV => "Adam's second moment",
        }
    }
}

/// Existing memory a checkpoint is restored into: a live trainer's parameters and optimizer
/// moments. Restoring into it, instead of into fresh vectors, allocates nothing: fresh memory
/// costs a page fault and a page clear per page, which on the bench VM was slower than the disk.
pub trait RestoreTarget: Sync {
    /// Every parameter held, with its number of values: the checkpoint must hold each of these
    /// with both Adam moments (the dense shard and the shards of the held experts are read).
    fn held(&self) -> BTreeMap<String, usize>;

    /// Accepts or refuses a checkpoint by its manifest (already checked for format, model and RNG
    /// scheme), before anything is written.
    fn check(&self, manifest: &CheckpointManifest, path: &Path) -> Result<()>;

    /// Overwrites bytes `[offset, offset + bytes.len())` of one tensor with little-endian f32
    /// data: a piece of a shard as it streams in (called from several threads at once; each byte
    /// once). An error if the range does not fit the tensor.
    fn overwrite(&self, name: &str, part: TensorPart, offset: usize, bytes: &[u8]) -> Result<()>;
}

/// Streams a shard's tensors into a [`RestoreTarget`]; yields the shard's size.
struct RestoreSink<'a, T: ?Sized> {
    path: PathBuf,
    bytes: u64,
    held: &'a BTreeMap<String, usize>,
    target: &'a T,
    written: &'a Mutex<BTreeSet<(String, TensorPart)>>,
    /// Parameter and part of each tensor, in the shard's order.
    parts: Vec<(String, TensorPart)>,
}

impl<T: RestoreTarget + ?Sized> ShardSink for RestoreSink<'_, T> {
    type Output = u64;

    fn begin(&mut self, tensors: &[TensorSpan]) -> Result<()> {
        let corrupt = |reason: String| WorkerError::CorruptCheckpoint { path: self.path.clone(), reason };
        for tensor in tensors {
            let key = &tensor.key;
            let (name, part) = TensorPart::of_key(key);
            let Some(&numel) = self.held.get(name) else {
                return Err(corrupt(format!("tensor {key} is not a parameter this worker holds")));
            };
            if tensor.len != numel * 4 {
                return Err(corrupt(format!(
                    "tensor {key} has {} bytes, the model needs {}",
                    tensor.len,
                    numel * 4
                )));
            }
            let first = self.written.lock().map(|mut w| w.insert((name.to_string(), part))).unwrap_or(false);
            if !first {
                return Err(corrupt(format!("tensor {key} appears twice")));
            }
            self.parts.push((name.to_string(), part));
        }
        Ok(())
    }

    fn piece(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let (name, part) = &self.parts[index];
        self.target.overwrite(name, *part, offset, bytes)
    }

    fn finish(self) -> Result<u64> {
        Ok(self.bytes)
    }
}

/// A checkpoint passed over while looking for a usable one, and why.
type Skipped = (PathBuf, String);

/// Adam moments (m, v) of one parameter as they are found while reading a shard.
type MomentPair = (Option<Vec<f32>>, Option<Vec<f32>>);

struct ShardData {
    bytes: u64,
    params: BTreeMap<String, HostTensor>,
    moments: BTreeMap<String, Moments>,
}

/// Writes every shard: [`WRITE_THREADS`] threads stream each shard's tensors from the snapshot
/// into a temporary file while hashing them, and hand the open file to [`SYNC_THREADS`] threads
/// that fsync and rename it. Entries come back in `jobs` order.
fn write_shards(
    dir: &Path,
    snapshot: &TrainingSnapshot,
    jobs: &[(ShardContents, Vec<&str>)],
) -> Result<Vec<ShardEntry>> {
    let (to_sync, synced) = mpsc::channel::<WrittenShard>();
    let synced = Mutex::new(synced);
    let sync_errors = Mutex::new(Vec::new());
    let written = std::thread::scope(|s| {
        for _ in 0..SYNC_THREADS {
            s.spawn(|| {
                loop {
                    let next = match synced.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(shard) = next else { return };
                    if let Err(e) = shard.commit()
                        && let Ok(mut errors) = sync_errors.lock()
                    {
                        errors.push(e);
                    }
                }
            });
        }
        let written = parallel_map(jobs, WRITE_THREADS, |(contents, names)| {
            let shard = write_shard(dir, snapshot, *contents, names)?;
            let entry = shard.entry.clone();
            to_sync
                .send(shard)
                .map_err(|_| WorkerError::CheckpointWriter("shard sync threads stopped".into()))?;
            Ok(entry)
        });
        // Closing the channel lets the sync threads finish once the queue is drained.
        drop(to_sync);
        written
    });
    if let Some(err) = sync_errors.into_inner().ok().and_then(|mut e| e.pop()) {
        return Err(err);
    }
    written.into_iter().collect()
}

/// A shard written to its temporary file, not yet durable.
struct WrittenShard {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    entry: ShardEntry,
}

impl WrittenShard {
    /// fsync, then rename into place (the caller fsyncs the directory afterwards).
    fn commit(self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|source| WorkerError::CheckpointIo { path: self.tmp.clone(), source })?;
        drop(self.file);
        fs::rename(&self.tmp, &self.path)
            .map_err(|source| WorkerError::CheckpointIo { path: self.path, source })
    }
}

/// A tensor of a shard: its key, shape and elements.
type ShardTensor<'a> = (String, &'a [usize], &'a [f32]);

/// The safetensors header of `tensors` laid out back to back in order: the 8-byte length, then
/// the JSON, padded with spaces to a multiple of 8 so the data stays aligned.
fn safetensors_header(tensors: &[ShardTensor<'_>]) -> Result<Vec<u8>> {
    let mut index = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, shape, data) in tensors {
        let end = offset + std::mem::size_of_val(*data);
        index.insert(
            key.clone(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(index))
        .map_err(|e| WorkerError::CheckpointWriter(format!("encoding a shard header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    Ok(header)
}

/// Streams one shard (safetensors: each parameter and its Adam moments) from the snapshot's
/// buffers into its temporary file, hashing the same bytes on the way: no serialised copy.
fn write_shard(
    dir: &Path,
    snap: &TrainingSnapshot,
    contents: ShardContents,
    names: &[&str],
) -> Result<WrittenShard> {
    let missing = |n: &str| WorkerError::CheckpointWriter(format!("snapshot has no optimizer state for {n}"));
    let mut tensors: Vec<ShardTensor<'_>> = Vec::with_capacity(names.len() * 3);
    for &name in names {
        let Some(p) = snap.params.get(name) else { continue };
        let m = snap.moments.get(name).ok_or_else(|| missing(name))?;
        for (key, data) in [
            (name.to_string(), &p.data),
            (format!("{name}{ADAM_M_SUFFIX}"), &m.m),
            (format!("{name}{ADAM_V_SUFFIX}"), &m.v),
        ] {
            if data.len() != p.shape.iter().product::<usize>() {
                return Err(WorkerError::CheckpointWriter(format!("tensor {key} does not match its shape")));
            }
            tensors.push((key, &p.shape, data));
        }
    }
    let header = safetensors_header(&tensors)?;
    let file_name = contents.file_name();
    let path = dir.join(&file_name);
    let tmp = tmp_path(&path);
    let io = |source| WorkerError::CheckpointIo { path: tmp.clone(), source };
    let mut file = File::create(&tmp).map_err(io)?;
    let mut hasher = Checksummer::new(ChecksumKind::Xxh3_128);
    let mut bytes = header.len() as u64;
    hasher.update(&header);
    file.write_all(&header).map_err(io)?;
    for (_, _, data) in &tensors {
        let raw: &[u8] = bytemuck::cast_slice(data);
        hasher.update(raw);
        file.write_all(raw).map_err(io)?;
        bytes += raw.len() as u64;
    }
    let entry =
        ShardEntry { file: file_name, contents, xxh3_128: Some(hasher.finish()), sha256: None, bytes };
    Ok(WrittenShard { file, tmp, path, entry })
}

/// Streams a shard's tensors into fresh vectors.
struct FreshSink {
    path: PathBuf,
    bytes: u64,
    tensors: Vec<TensorSpan>,
    values: Vec<Vec<f32>>,
    /// The first bytes of a value split between two pieces (only if a tensor's data does not
    /// start 4-byte aligned in the file; ours do).
    carry: Vec<u8>,
}

impl FreshSink {
    fn new(path: &Path, entry: &ShardEntry) -> Self {
        Self { path: path.to_path_buf(), bytes: entry.bytes, tensors: vec![], values: vec![], carry: vec![] }
    }
}

impl ShardSink for FreshSink {
    type Output = ShardData;

    fn begin(&mut self, tensors: &[TensorSpan]) -> Result<()> {
        // The reader checked that the header describes exactly the file's size, so this reserves
        // no more than the file holds.
        self.values = tensors.iter().map(|t| Vec::with_capacity(t.len / 4)).collect();
        self.tensors = tensors.to_vec();
        Ok(())
    }

    fn piece(&mut self, index: usize, _offset: usize, mut bytes: &[u8]) -> Result<()> {
        let values = &mut self.values[index];
        if !self.carry.is_empty() {
            let take = (4 - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if let Ok(value) = <[u8; 4]>::try_from(self.carry.as_slice()) {
                values.push(f32::from_le_bytes(value));
                self.carry.clear();
            }
        }
        let whole = bytes.len() / 4 * 4;
        match bytemuck::try_cast_slice::<u8, f32>(&bytes[..whole]) {
            Ok(aligned) => values.extend_from_slice(aligned),
            Err(_) => values
                .extend(bytes[..whole].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        }
        self.carry.extend_from_slice(&bytes[whole..]);
        Ok(())
    }

    fn finish(self) -> Result<ShardData> {
        let corrupt = |reason: String| WorkerError::CorruptCheckpoint { path: self.path.clone(), reason };
        let mut params = BTreeMap::new();
        let mut raw_moments: BTreeMap<String, MomentPair> = BTreeMap::new();
        for (tensor, data) in self.tensors.into_iter().zip(self.values) {
            match TensorPart::of_key(&tensor.key) {
                (name, TensorPart::AdamM) => raw_moments.entry(name.to_string()).or_default().0 = Some(data),
                (name, TensorPart::AdamV) => raw_moments.entry(name.to_string()).or_default().1 = Some(data),
                (_, TensorPart::Value) => {
                    params.insert(tensor.key, HostTensor { shape: tensor.shape, data });
                }
            }
        }
        let mut moments = BTreeMap::new();
        for name in params.keys() {
            match raw_moments.remove(name) {
                Some((Some(m), Some(v))) => {
                    moments.insert(name.clone(), Moments { m, v });
                }
                _ => return Err(corrupt(format!("optimizer state of {name} is missing"))),
            }
        }
        Ok(ShardData { bytes: self.bytes, params, moments })
    }
}

/// `path` with the temporary suffix.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    PathBuf::from(tmp_name)
}

/// Writes `bytes` to `path` via a temporary file: write, fsync, rename. The caller fsyncs the
/// directory to make the rename durable.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let io = |source| WorkerError::CheckpointIo { path: tmp.clone(), source };
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| WorkerError::CheckpointIo { path: path.to_path_buf(), source })
}

fn fsync_dir(dir: &Path) -> Result<()> {
    let io = |source| WorkerError::CheckpointIo { path: dir.to_path_buf(), source };
    File::open(dir).map_err(io)?.sync_all().map_err(io)
}

/// Maps `f` over `items` on `threads` scoped threads, results in item order.
fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = Mutex::new(0usize);
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(item) = items.get(i) else { return };
                    let r = f(item);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    slots.into_iter().filter_map(|m| m.into_inner().ok().flatten()).collect()
}

/// Writes checkpoints on a background thread so training continues while shards hit the disk.
/// At most one save is in flight: submitting the next waits for the previous one.
#[derive(Debug)]
pub struct BackgroundSaver {
    store: CheckpointStore,
    in_flight: Option<JoinHandle<Result<SaveReport>>>,
}

impl BackgroundSaver {
    /// A saver writing into `store`.
    pub fn new(store: CheckpointStore) -> Self {
        Self { store, in_flight: None }
    }

    /// The store written to.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Starts writing `snapshot`. Returns the report of the previous save if one was still in
    /// flight (waiting for it first).
    pub fn submit(&mut self, snapshot: TrainingSnapshot) -> Result<Option<SaveReport>> {
        let previous = self.wait()?;
        let store = self.store.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || store.save(&snapshot))
            .map_err(|e| WorkerError::CheckpointWriter(format!("cannot start writer thread: {e}")))?;
        self.in_flight = Some(handle);
        Ok(previous)
    }

    /// Whether the save in flight (if any) has finished.
    pub fn is_idle(&self) -> bool {
        self.in_flight.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the save in flight, if any, and returns its report.
    pub fn wait(&mut self) -> Result<Option<SaveReport>> {
        match self.in_flight.take() {
            None => Ok(None),
            Some(handle) => match handle.join() {
                Ok(result) => result.map(Some),
                Err(_) => Err(WorkerError::CheckpointWriter("writer thread panicked".into())),
            },
        }
    }

    /// Returns the report of a finished save without blocking, if there is one.
    pub fn poll(&mut self) -> Result<Option<SaveReport>> {
        if self.in_flight.as_ref().is_some_and(JoinHandle::is_finished) { self.wait() } else { Ok(None) }
    }
}
