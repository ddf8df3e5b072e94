//! Training text and deterministic batch sampling.
//!
//! A dataset is a set of directories or files of text. All files are read recursively, sorted by
//! path and concatenated into one byte corpus (the model's vocabulary is the 256 byte values).
//! Sample `i` of step `s` is the window starting at `key(seed, s, i) mod (len - seq_len)`, so
//! sampling is a pure function of `(seed, step, sample index)`: who computes a sample, and in how
//! many processes, never changes the data.

use std::path::{Path, PathBuf};

use crate::error::{Result, WorkerError};
use crate::rng;

/// Directory levels followed below a dataset root (guards against pathological trees).
const MAX_DEPTH: usize = 32;

/// The concatenated training text.
#[derive(Clone, Debug)]
pub struct Corpus {
    bytes: Vec<u8>,
    files: usize,
}

/// One micro-batch: `sequences` windows of `seq_len` input bytes and their next-byte targets,
/// flattened row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    /// Position of this micro-batch within the global batch (its reduction order).
    pub index: usize,
    /// Sequences in it.
    pub sequences: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Input bytes, `sequences * seq_len`.
    pub inputs: Vec<u32>,
    /// Next-byte targets, `sequences * seq_len`.
    pub targets: Vec<u32>,
}

impl Corpus {
    /// Reads every regular file under `paths` (recursively, in path order).
    pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut files = Vec::new();
        for root in paths {
            collect_files(root.as_ref(), 0, &mut files)?;
        }
        files.sort();
        files.dedup();
        let mut bytes = Vec::new();
        for file in &files {
            let text =
                std::fs::read(file).map_err(|source| WorkerError::Dataset { path: file.clone(), source })?;
            bytes.extend_from_slice(&text);
        }
        Ok(Self { bytes, files: files.len() })
    }

    /// A corpus from bytes already in memory (tests and benchmarks).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes, files: 1 }
    }

    /// Total bytes of text.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the corpus holds no text.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Files read.
    pub fn files(&self) -> usize {
        self.files
    }

    /// Checks the corpus holds at least one training window.
    pub fn check_fits(&self, seq_len: usize) -> Result<()> {
        if self.bytes.len() <= seq_len {
            return Err(WorkerError::DatasetTooSmall { bytes: self.bytes.len(), needed: seq_len + 1 });
        }
        Ok(())
    }

    /// The start offset of sample `sample` of step `step`.
    pub fn window_start(&self, seed: u64, step: u64, sample: u64, seq_len: usize) -> usize {
        let windows = (self.bytes.len() - seq_len) as u64;
        (rng::key(&[seed, step, sample]) % windows) as usize
    }

    /// Micro-batch `index` of step `step`: global samples `index * size .. (index + 1) * size`.
    /// The corpus must hold more than `seq_len` bytes ([`Corpus::check_fits`]).
    pub fn micro_batch(&self, seed: u64, step: u64, index: usize, size: usize, seq_len: usize) -> MicroBatch {
        let mut inputs = Vec::with_capacity(size * seq_len);
        let mut targets = Vec::with_capacity(size * seq_len);
        for row in 0..size {
            let sample = (index * size + row) as u64;
            let start = self.window_start(seed, step, sample, seq_len);
            let window = &self.bytes[start..start + seq_len + 1];
            inputs.extend(window[..seq_len].iter().map(|&b| u32::from(b)));
            targets.extend(window[1..].iter().map(|&b| u32::from(b)));
        }
        MicroBatch { index, sequences: size, seq_len, inputs, targets }
    }
}

fn collect_files(path: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let io_err = |source| WorkerError::Dataset { path: path.to_path_buf(), source };
    // Follows symlinks to files; directory symlinks are followed too, bounded by MAX_DEPTH.
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_file() {
        out.push(path.to_path_buf());
    } else if meta.is_dir() {
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for entry in std::fs::read_dir(path).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            collect_files(&entry.path(), depth + 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_are_a_pure_function_of_seed_step_and_sample() {
        let corpus = Corpus::from_bytes((0..10_000u32).map(|i| (i * 7 % 251) as u8).collect());
        let whole = corpus.micro_batch(7, 3, 0, 4, 16);
        // Sample 2 of the step, computed as micro-batch 1 of size 2, is the same window.
        let half = corpus.micro_batch(7, 3, 1, 2, 16);
        assert_eq!(&whole.inputs[32..], &half.inputs[..]);
        assert_eq!(whole.targets[..15], whole.inputs[1..16]);
        assert_ne!(corpus.micro_batch(7, 4, 0, 4, 16), whole);
    }

    #[test]
    fn unreadable_dataset_is_an_error() {
        let err = Corpus::load(&["/nonexistent/ninelives-data"]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ninelives-data"), "{err}");
    }
}
