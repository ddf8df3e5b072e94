//! The store: a directory of checkpoints, one `step-NNNNNNNNNN/` directory each; listing,
//! keep-last-N retention, verification against the manifest, and the search for the newest
//! usable checkpoint. Writing is in `write`, reading back in `restore`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::manifest::{CheckpointManifest, MANIFEST_FILE, ShardEntry};
use super::reader::{self, VerifyOnly};
use crate::error::{Result, WorkerError};

/// Prefix of checkpoint directory names (`step-0000000025`).
const STEP_PREFIX: &str = "step-";

/// A directory of checkpoints with keep-last-N retention.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep_last: usize,
    /// Steps retention must keep whatever their age (shared by the store's clones, so the
    /// background saver honours what the member loop protects).
    protected: Arc<Mutex<BTreeSet<u64>>>,
}

impl CheckpointStore {
    /// A store in `dir` (created if needed) keeping the newest `keep_last` checkpoints.
    pub fn open(dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| WorkerError::CheckpointIo { path: dir.clone(), source })?;
        Ok(Self { dir, keep_last: keep_last.max(1), protected: Arc::default() })
    }

    /// Makes retention keep the checkpoints of `steps` (replacing the previous set): the ones a
    /// restore of the current or the previous generation may still read, which a save racing
    /// with that restore must not delete.
    pub fn protect(&self, steps: impl IntoIterator<Item = u64>) {
        if let Ok(mut protected) = self.protected.lock() {
            *protected = steps.into_iter().collect();
        }
    }

    /// The steps [`CheckpointStore::protect`] set.
    pub fn protected(&self) -> BTreeSet<u64> {
        self.protected.lock().map(|p| p.clone()).unwrap_or_default()
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
    /// a directory [`SaveReport::removed`](super::SaveReport::removed) lists.
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

    /// Deletes committed checkpoints beyond the newest `keep_last`, and torn (uncommitted)
    /// directories older than the newest committed one; never a [protected](Self::protect)
    /// step. Returns what it removed.
    pub fn retain(&self) -> Result<Vec<PathBuf>> {
        let list = self.list()?;
        let protected = self.protected();
        let newest_committed = list.iter().find(|(_, _, c)| *c).map(|(s, _, _)| *s);
        let mut kept = 0;
        let mut removed = Vec::new();
        for (step, path, committed) in list {
            let drop = if protected.contains(&step) {
                false
            } else if committed {
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

    /// Runs `use_dir` on the newest committed checkpoint, then on older ones while it fails with
    /// anything but [`WorkerError::IncompatibleCheckpoint`]. `Ok(None)` when the directory holds
    /// no committed checkpoint (none at all, or only torn ones: a writer killed before its first
    /// commit leaves nothing that was ever a checkpoint, so training starts over, as the recovery
    /// brain expects); an error when committed checkpoints exist but none is usable (never a
    /// silent fresh start). Returns the result and the checkpoints skipped, with the reason.
    pub(super) fn newest_usable<T>(
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
        self.verified_at_or_before(u64::MAX)
    }

    /// The newest committed checkpoint of `step` or older whose every shard verifies, logging
    /// each one skipped: where a restore to `step` goes when that checkpoint is corrupt or gone.
    /// Every member reads the same directory, so every member picks the same one.
    pub fn verified_at_or_before(&self, step: u64) -> Result<Option<(u64, PathBuf)>> {
        for (found, path, committed) in self.list()? {
            if !committed || found > step {
                continue;
            }
            match self.verify_dir(&path) {
                Ok(_) => return Ok(Some((found, path))),
                Err(err) => {
                    tracing::warn!(step = found, "{err}; falling back to the previous committed checkpoint");
                }
            }
        }
        Ok(None)
    }
}

/// Reads and parses a checkpoint's manifest; returns it and its size in bytes.
pub(super) fn parse_manifest(path: &Path) -> Result<(CheckpointManifest, u64)> {
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

/// A checkpoint passed over while looking for a usable one, and why.
pub(super) type Skipped = (PathBuf, String);

/// fsyncs a directory, making the renames and removals in it durable.
pub(super) fn fsync_dir(dir: &Path) -> Result<()> {
    let io = |source| WorkerError::CheckpointIo { path: dir.to_path_buf(), source };
    File::open(dir).map_err(io)?.sync_all().map_err(io)
}
