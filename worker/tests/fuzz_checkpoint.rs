//! Property-based fuzzing of the checkpoint decoders (issue 23): a committed checkpoint's
//! manifest and its shards' safetensors headers, changed at random, are read by `verify_dir` and
//! `load_dir` (what a resume and the brain's fallback do). Nothing panics; a changed shard byte is
//! always detected; a manifest change is either refused or harmless (the checkpoint still loads
//! to the very same parameters).
//!
//! Cases per property: `NINELIVES_FUZZ_CASES` (default 32; `scripts/fuzz` runs many more).

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use ninelives_worker::checkpoint::MANIFEST_FILE;
use ninelives_worker::{CheckpointStore, ExpertSelection, Trainer, TrainerConfig};
use proptest::prelude::*;
use serde_json::Value;

fn config() -> ProptestConfig {
    let cases = std::env::var("NINELIVES_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A small model, so each case reads a few hundred kilobytes.
fn small() -> TrainerConfig {
    let mut c = common::tiny_config(2);
    c.dims.layers = 2;
    c.dims.hidden_size = 32;
    c.dims.heads = 2;
    c.dims.routed_experts = 4;
    c.dims.expert_ffn_size = 32;
    c.dims.seq_len = 16;
    c.global_batch_size = 4;
    c.micro_batch_size = 2;
    c
}

struct Saved {
    _dir: tempfile::TempDir,
    store: CheckpointStore,
    path: PathBuf,
    manifest: Vec<u8>,
    shards: Vec<(PathBuf, Vec<u8>)>,
    digest: String,
}

/// One committed checkpoint of one step, saved once for every case (each case restores it).
fn saved() -> &'static Saved {
    static SAVED: OnceLock<Saved> = OnceLock::new();
    SAVED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), 3).unwrap();
        let mut t = Trainer::new(small(), common::demo_corpus()).unwrap();
        t.train_step().unwrap();
        let report = store.save(&t.snapshot().unwrap()).unwrap();
        let path = report.path;
        let manifest = std::fs::read(path.join(MANIFEST_FILE)).unwrap();
        let mut shards: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        shards.sort();
        assert!(!shards.is_empty());
        let digest = t.params_sha256().unwrap();
        Saved { _dir: dir, store, path, manifest, shards, digest }
    })
}

/// Holds the checkpoint for one case (the properties run on parallel threads) and restores the
/// saved files after it, whatever it did.
struct Restore<'a>(&'a Saved, #[allow(dead_code)] MutexGuard<'static, ()>);

fn exclusive(s: &'static Saved) -> Restore<'static> {
    static LOCK: Mutex<()> = Mutex::new(());
    Restore(s, LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        std::fs::write(self.0.path.join(MANIFEST_FILE), &self.0.manifest).unwrap();
        for (p, bytes) in &self.0.shards {
            std::fs::write(p, bytes).unwrap();
        }
    }
}

/// Reads the checkpoint both ways; returns the loaded parameters' digest when both accept it.
fn read(s: &Saved) -> Option<String> {
    let verified = s.store.verify_dir(&s.path);
    let loaded = s.store.load_dir(&s.path, &small().dims, &ExpertSelection::All);
    match (verified, loaded) {
        (Ok(_), Ok(loaded)) => {
            let t = Trainer::from_checkpoint(small(), common::demo_corpus(), loaded).ok()?;
            Some(t.params_sha256().unwrap())
        }
        _ => None,
    }
}

fn mutate(seed: &[u8], edits: &[(u8, usize, u8)], within: usize) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(kind, at, byte) in edits {
        let at = at % within.min(out.len()).max(1);
        match kind % 3 {
            0 if at < out.len() => out[at] ^= byte | 1,
            1 => out.insert(at.min(out.len()), byte),
            _ if at < out.len() => {
                out.remove(at);
            }
            _ => {}
        }
    }
    out
}

fn header_len(shard: &[u8]) -> usize {
    let n = u64::from_le_bytes(shard[..8].try_into().unwrap());
    8 + usize::try_from(n).unwrap()
}

fn json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(-1)),
        "[a-z0-9/_.-]{0,12}".prop_map(Value::from),
        prop::collection::vec(any::<u32>().prop_map(Value::from), 0..4).prop_map(Value::Array),
    ]
}

/// Every scalar path inside `v`.
fn leaves(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, c)| {
            here.push(k.clone());
            leaves(c, here, out);
            here.pop();
        }),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, c)| {
            here.push(i.to_string());
            leaves(c, here, out);
            here.pop();
        }),
        _ => out.push(here.clone()),
    }
}

fn replace(seed: &Value, pick: usize, with: Value) -> Value {
    let mut all = Vec::new();
    leaves(seed, &mut Vec::new(), &mut all);
    let mut out = seed.clone();
    let mut at = &mut out;
    for step in &all[pick % all.len()] {
        at = match at {
            Value::Object(m) => m.get_mut(step).unwrap(),
            Value::Array(a) => &mut a[step.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
    }
    *at = with;
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_changed_shard_header_is_always_detected(
        which in any::<usize>(),
        edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..4),
    ) {
        let s = saved();
        let _restore = exclusive(s);
        let (path, original) = &s.shards[which % s.shards.len()];
        let changed = mutate(original, &edits, header_len(original));
        prop_assume!(&changed != original);
        write(path, &changed);
        prop_assert_eq!(read(s), None, "a changed shard was accepted");
    }

    #[test]
    fn a_changed_manifest_is_refused_or_harmless(
        pick in any::<usize>(),
        with in json(),
        edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..3),
    ) {
        let s = saved();
        let _restore = exclusive(s);
        let seed: Value = serde_json::from_slice(&s.manifest).unwrap();
        let text = serde_json::to_vec(&replace(&seed, pick, with)).unwrap();
        let text = mutate(&text, &edits, text.len());
        write(&s.path.join(MANIFEST_FILE), &text);
        if let Some(digest) = read(s) {
            prop_assert_eq!(digest, s.digest.clone(), "an accepted manifest changed the parameters");
        }
    }
}

#[test]
fn the_saved_checkpoint_reads_back() {
    let s = saved();
    let _restore = exclusive(s);
    assert_eq!(read(s), Some(s.digest.clone()));
}
