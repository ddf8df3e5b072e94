//! Reading a checkpoint back: into fresh vectors ([`CheckpointStore::load_dir`]), or streamed
//! into the existing memory of a live trainer ([`CheckpointStore::restore_dir`], through a
//! [`RestoreTarget`]); both check the manifest is one this worker can use, read only the selected
//! shards and verify each against its checksum, and fall back past torn or corrupt checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ninelives_core::ModelDims;

use super::manifest::{
    ADAM_M_SUFFIX, ADAM_V_SUFFIX, CheckpointManifest, READABLE_VERSIONS, RNG_ALGORITHM, ShardContents,
    ShardEntry,
};
use super::reader::{self, ShardSink, TensorSpan};
use super::store::{CheckpointStore, parse_manifest};
use crate::error::{Result, WorkerError};
use crate::optim::Moments;
use crate::params::{ExpertId, HostTensor, ParamOwner};

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

impl CheckpointStore {
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

/// Adam moments (m, v) of one parameter as they are found while reading a shard.
type MomentPair = (Option<Vec<f32>>, Option<Vec<f32>>);

struct ShardData {
    bytes: u64,
    params: BTreeMap<String, HostTensor>,
    moments: BTreeMap<String, Moments>,
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
