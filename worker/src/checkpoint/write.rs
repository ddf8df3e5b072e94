//! Writing a checkpoint: the training state's snapshot streamed into one safetensors shard per
//! expert plus the dense shard, each fsync'd and renamed into place, then the manifest as the
//! commit point, then retention.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use ninelives_core::ModelDims;

use super::manifest::{
    ADAM_M_SUFFIX, ADAM_V_SUFFIX, CheckpointManifest, ChecksumKind, Checksummer, DataCursor, FORMAT_VERSION,
    MANIFEST_FILE, OptimizerState, RNG_ALGORITHM, RngState, ShardContents, ShardEntry,
};
use super::store::{CheckpointStore, fsync_dir};
use crate::error::{Result, WorkerError};
use crate::optim::Moments;
use crate::params::{HostTensor, ParamOwner};

/// Suffix of files not yet committed by rename.
const TMP_SUFFIX: &str = ".tmp";
/// Threads that hash and write shards (CPU-bound: memory copy into the page cache + checksum).
const WRITE_THREADS: usize = 2;
/// Threads that fsync and rename written shards (waiting on the disk), so the disk starts on the
/// first shards while later ones are still being hashed and written.
const SYNC_THREADS: usize = 2;

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

impl CheckpointStore {
    /// Writes `snapshot` as a committed checkpoint, then applies retention. Synchronous; see
    /// [`BackgroundSaver`](super::BackgroundSaver) for the non-blocking path.
    ///
    /// A save that fails (a full disk, an I/O error) removes what it wrote, so the failure costs
    /// neither space nor a torn directory, and returns the error: the caller reports it and
    /// trains on. A failed retention after the commit is logged, not returned: the checkpoint is
    /// committed.
    pub fn save(&self, snapshot: &TrainingSnapshot) -> Result<SaveReport> {
        let started = Instant::now();
        let dir = self.step_dir(snapshot.step);
        // Training replayed after a rollback reaches the same state again: a committed copy that
        // verifies is kept rather than deleted and rewritten (a rewrite that failed half-way, on
        // a full disk, would lose a committed checkpoint a restore may need).
        if dir.join(MANIFEST_FILE).is_file()
            && let Ok(existing) = self.verify_dir(&dir)
            && existing.step == snapshot.step
            && existing.params_sha256 == snapshot.params_sha256
        {
            tracing::info!(step = snapshot.step, "the checkpoint of this state is committed already; kept");
            let removed = self.retain().unwrap_or_default();
            let seconds = started.elapsed().as_secs_f64();
            return Ok(SaveReport { step: snapshot.step, path: dir, bytes: 0, seconds, removed });
        }
        let (bytes, seconds) = match self.write_committed(snapshot, &dir, started) {
            Ok(done) => done,
            Err(err) => {
                if let Err(e) = fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %dir.display(), "cannot remove a failed save: {e}");
                }
                return Err(err);
            }
        };
        let removed = self.retain().unwrap_or_else(|e| {
            tracing::warn!(step = snapshot.step, "retention after the commit failed: {e}");
            Vec::new()
        });
        Ok(SaveReport { step: snapshot.step, path: dir, bytes, seconds, removed })
    }

    /// Writes and commits `snapshot` into `dir`; returns its bytes and the seconds since
    /// `started`.
    fn write_committed(
        &self,
        snapshot: &TrainingSnapshot,
        dir: &Path,
        started: Instant,
    ) -> Result<(u64, f64)> {
        let dir = dir.to_path_buf();
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
        fsync_dir(self.dir())?;
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
        Ok((bytes, started.elapsed().as_secs_f64()))
    }
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
