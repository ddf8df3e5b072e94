//! Checkpoints: exact resume, restore into another expert placement, corruption fallback,
//! torn checkpoints, retention.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;

use common::{demo_corpus, tiny_config};
use ninelives_worker::checkpoint::LoadedCheckpoint;
use ninelives_worker::model::all_experts;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, ExpertId, ExpertSelection, Trainer};

const STEPS: u64 = 8;
const SPLIT: u64 = 4;

fn straight_digest() -> String {
    let mut t = Trainer::new(tiny_config(STEPS), demo_corpus()).unwrap();
    for _ in 0..STEPS {
        t.train_step().unwrap();
    }
    t.params_sha256().unwrap()
}

/// Trains to SPLIT and commits a checkpoint there (plus one at SPLIT / 2).
fn train_and_save(store: &CheckpointStore) {
    let mut t = Trainer::new(tiny_config(STEPS), demo_corpus()).unwrap();
    while t.step() < SPLIT {
        t.train_step().unwrap();
        if t.step().is_multiple_of(SPLIT / 2) {
            store.save(&t.snapshot().unwrap()).unwrap();
        }
    }
}

/// Flips the `mask` bits of one byte of a file, at `at(file length)`.
fn flip_bits(path: &std::path::Path, at: fn(usize) -> usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at(bytes.len());
    bytes[i] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

/// Runs `test` on 2 kernel threads with a store (keep-last 3) holding the checkpoints that
/// [`train_and_save`] commits.
fn with_saved_store(test: impl FnOnce(&CheckpointStore) + Send) {
    let dir = tempfile::tempdir().unwrap();
    run_with_threads(2, || {
        let store = CheckpointStore::open(dir.path(), 3).unwrap();
        train_and_save(&store);
        test(&store);
    })
    .unwrap();
}

fn finish(loaded: LoadedCheckpoint) -> String {
    let mut t = Trainer::from_checkpoint(tiny_config(STEPS), demo_corpus(), loaded).unwrap();
    assert_eq!(t.step(), SPLIT);
    while t.step() < STEPS {
        t.train_step().unwrap();
    }
    t.params_sha256().unwrap()
}

#[test]
fn resume_and_restore_into_another_placement_reproduce_the_straight_run() {
    with_saved_store(|store| {
        let expected = straight_digest();
        let dims = tiny_config(STEPS).dims;

        let full = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!(full.manifest.step, SPLIT);
        let full_bytes = full.report.bytes;
        assert_eq!(finish(full), expected, "plain resume");

        // A different placement: two workers, one owning the even experts of every layer and the
        // other the odd ones, each loading only its own shards.
        let all = all_experts(&dims);
        let (even, odd): (Vec<ExpertId>, Vec<ExpertId>) = all.iter().partition(|id| id.expert % 2 == 0);
        let a = store.load_experts(&dims, &even).unwrap().unwrap();
        let b = store.load_experts(&dims, &odd).unwrap().unwrap();
        assert!(a.report.bytes < full_bytes, "a worker reads only its experts' shards");
        let held = |l: &LoadedCheckpoint| -> Vec<ExpertId> {
            let mut ids: Vec<ExpertId> = l
                .params
                .keys()
                .filter_map(|n| match ninelives_worker::model::ParamOwner::of(n) {
                    ninelives_worker::model::ParamOwner::Expert(id) => Some(id),
                    ninelives_worker::model::ParamOwner::Dense => None,
                })
                .collect();
            ids.dedup();
            ids
        };
        assert_eq!(held(&a), even);
        assert_eq!(held(&b), odd);
        // Reassemble the model from the two shares (what expert parallelism does across
        // processes) and continue: the result is the straight run's, bit for bit.
        let mut merged = a;
        merged.params.extend(b.params);
        merged.moments.extend(b.moments);
        assert_eq!(finish(merged), expected, "restore into the even/odd placement");
    });
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    with_saved_store(|store| {
        let dims = tiny_config(STEPS).dims;
        // Flip one byte in the middle of one expert shard of the newest checkpoint.
        let shard = store.step_dir(SPLIT).join("experts/layer-0002-expert-00005.safetensors");
        flip_bits(&shard, |len| len / 2, 0x01);

        let loaded = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!(loaded.manifest.step, SPLIT / 2, "fell back to the previous checkpoint");
        assert_eq!(loaded.report.skipped.len(), 1);
        let (path, reason) = &loaded.report.skipped[0];
        assert_eq!(path, &store.step_dir(SPLIT));
        assert!(
            reason.contains("checksum mismatch (xxh3-128)") && reason.contains("layer-0002-expert-00005"),
            "{reason}"
        );

        // A worker loading only other experts verifies only what it reads; the job-wide check
        // that expert-parallel workers agree on first skips the corrupt checkpoint.
        let other = store.load_experts(&dims, &[ExpertId::new(0, 0)]).unwrap().unwrap();
        assert_eq!(other.manifest.step, SPLIT);
        let (step, _) = store.newest_verified().unwrap().unwrap();
        assert_eq!(step, SPLIT / 2);
    });
}

/// Rewrites a committed checkpoint's manifest as format 1 wrote it: sha256 per shard.
fn downgrade_to_format_1(dir: &std::path::Path) {
    use sha2::Digest;
    let path = dir.join("manifest.json");
    let mut manifest: ninelives_worker::checkpoint::CheckpointManifest =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(manifest.format_version, 2);
    manifest.format_version = 1;
    for shard in &mut manifest.shards {
        assert!(shard.xxh3_128.take().is_some(), "format 2 records XXH3-128");
        let digest = sha2::Sha256::digest(std::fs::read(dir.join(&shard.file)).unwrap());
        shard.sha256 = Some(digest.iter().map(|b| format!("{b:02x}")).collect());
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn format_1_checkpoints_with_sha256_still_load_and_are_verified() {
    with_saved_store(|store| {
        let expected = straight_digest();
        let dims = tiny_config(STEPS).dims;
        downgrade_to_format_1(&store.step_dir(SPLIT));
        downgrade_to_format_1(&store.step_dir(SPLIT / 2));
        let loaded = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!((loaded.manifest.step, loaded.manifest.format_version), (SPLIT, 1));
        assert_eq!(finish(loaded), expected, "resume from a format-1 checkpoint");

        let shard = store.step_dir(SPLIT).join("dense.safetensors");
        flip_bits(&shard, |len| len - 1, 0x80);
        let loaded = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!(loaded.manifest.step, SPLIT / 2, "the corrupt format-1 checkpoint is skipped");
        assert!(
            loaded.report.skipped[0].1.contains("checksum mismatch (sha256)"),
            "{:?}",
            loaded.report.skipped
        );
    });
}

#[test]
fn a_torn_checkpoint_without_manifest_is_ignored_and_nothing_usable_is_an_error() {
    with_saved_store(|store| {
        let dims = tiny_config(STEPS).dims;
        // The writer died after the shards of step SPLIT but before its manifest.
        std::fs::remove_file(store.step_dir(SPLIT).join("manifest.json")).unwrap();
        let loaded = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!(loaded.manifest.step, SPLIT / 2);
        assert!(loaded.report.skipped[0].1.contains("no manifest"));

        let only_torn = tempfile::tempdir().unwrap();
        let torn = CheckpointStore::open(only_torn.path(), 3).unwrap();
        std::fs::create_dir_all(torn.step_dir(4)).unwrap();
        std::fs::write(torn.step_dir(4).join("layer-0.safetensors.tmp"), b"partial").unwrap();
        // A directory holding only a torn checkpoint never held a committed one: start over.
        assert!(torn.load_latest(&dims, &ExpertSelection::All).unwrap().is_none());

        // Damage the remaining one as well: an error, never a silent fresh start.
        std::fs::write(store.step_dir(SPLIT / 2).join("manifest.json"), b"{ not json").unwrap();
        let err = store.load_latest(&dims, &ExpertSelection::All).unwrap_err();
        assert!(err.to_string().contains("no usable checkpoint"), "{err}");
    });
}

#[test]
fn retention_keeps_the_newest_n_committed_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    run_with_threads(2, || {
        let store = CheckpointStore::open(dir.path(), 2).unwrap();
        let mut t = Trainer::new(tiny_config(5), demo_corpus()).unwrap();
        let mut digests = BTreeMap::new();
        for _ in 0..5 {
            t.train_step().unwrap();
            let report = store.save(&t.snapshot().unwrap()).unwrap();
            digests.insert(t.step(), t.params_sha256().unwrap());
            assert!(report.bytes > 0);
        }
        let steps: Vec<u64> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|(s, _, committed)| {
                assert!(committed);
                s
            })
            .collect();
        assert_eq!(steps, vec![5, 4]);
        let dims = tiny_config(5).dims;
        let loaded = store.load_latest(&dims, &ExpertSelection::All).unwrap().unwrap();
        assert_eq!(loaded.manifest.params_sha256, digests[&5]);
    })
    .unwrap();
}

/// A trainer that has moved on (trained past the checkpoint) restored in place: the parameters,
/// moments and step are the checkpoint's, so finishing reproduces the straight run.
#[test]
fn restoring_into_a_live_trainer_reproduces_the_straight_run() {
    with_saved_store(|store| {
        let expected = straight_digest();
        let saved = store.load_latest(&tiny_config(STEPS).dims, &ExpertSelection::All).unwrap().unwrap();

        // A live trainer that diverged: other seed-independent state, two steps past SPLIT.
        let mut live = Trainer::new(tiny_config(STEPS), demo_corpus()).unwrap();
        for _ in 0..SPLIT + 2 {
            live.train_step().unwrap();
        }
        let report = live.restore_latest(store).unwrap().unwrap();
        assert!(report.skipped.is_empty());
        assert_eq!(report.bytes, saved.report.bytes, "the same bytes as a load into fresh memory");
        assert_eq!(live.step(), SPLIT);
        assert_eq!(live.params_sha256().unwrap(), saved.manifest.params_sha256);
        let snapshot = live.snapshot().unwrap();
        assert_eq!(snapshot.moments, saved.moments, "Adam moments restored");
        while live.step() < STEPS {
            live.train_step().unwrap();
        }
        assert_eq!(live.params_sha256().unwrap(), expected);

        // A worker holding only some experts restores only their shards, in place.
        let dims = tiny_config(STEPS).dims;
        let mine: Vec<ExpertId> = all_experts(&dims).into_iter().filter(|id| id.expert % 2 == 1).collect();
        // (Freshly initialised: a member holding a share cannot step alone.)
        let mut share = Trainer::with_experts(tiny_config(STEPS), demo_corpus(), Some(&mine)).unwrap();
        let report = share.restore_dir(store, &store.step_dir(SPLIT)).unwrap();
        assert!(report.bytes < saved.report.bytes, "only the held experts' shards are read");
        let loaded = store.load_experts(&dims, &mine).unwrap().unwrap();
        let restored = share.snapshot().unwrap();
        assert_eq!(restored.params, loaded.params);
        assert_eq!(restored.moments, loaded.moments);
        assert_eq!(share.step(), SPLIT);
    });
}

/// Restoring in place falls back past a corrupt newest checkpoint (whatever of it was already
/// written is overwritten by the previous one), and refuses another job's checkpoint before
/// writing anything.
#[test]
fn restoring_in_place_falls_back_past_corruption_and_refuses_other_jobs() {
    with_saved_store(|store| {
        let dims = tiny_config(STEPS).dims;
        let previous = store.load_dir(&store.step_dir(SPLIT / 2), &dims, &ExpertSelection::All).unwrap();
        // Corrupt the last byte of the dense shard: the expert shards verify and are written
        // first or concurrently, so the fallback has to overwrite them.
        let shard = store.step_dir(SPLIT).join("dense.safetensors");
        flip_bits(&shard, |len| len - 1, 0x01);

        let mut live = Trainer::new(tiny_config(STEPS), demo_corpus()).unwrap();
        live.train_step().unwrap();
        let report = live.restore_latest(store).unwrap().unwrap();
        assert_eq!(live.step(), SPLIT / 2, "fell back to the previous checkpoint");
        assert_eq!(report.skipped.len(), 1);
        assert!(report.skipped[0].1.contains("checksum mismatch (xxh3-128)"), "{:?}", report.skipped);
        assert_eq!(live.params_sha256().unwrap(), previous.manifest.params_sha256);
        assert_eq!(live.snapshot().unwrap().moments, previous.moments);

        // Another job (another seed): refused before any tensor is written.
        let mut config = tiny_config(STEPS);
        config.seed += 1;
        let mut other = Trainer::new(config, demo_corpus()).unwrap();
        let before = other.params_sha256().unwrap();
        let err = other.restore_dir(store, &store.step_dir(SPLIT / 2)).unwrap_err();
        assert!(err.to_string().contains("seed"), "{err}");
        assert_eq!(other.params_sha256().unwrap(), before, "nothing was written");
        assert_eq!(other.step(), 0);
    });
}

/// Retention never deletes a protected checkpoint (one a restore of the current or previous
/// generation may read), and a save of a state that is committed already keeps that copy.
#[test]
fn retention_spares_protected_checkpoints_and_a_committed_state_is_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    run_with_threads(2, || {
        let store = CheckpointStore::open(dir.path(), 2).unwrap();
        store.protect([1]);
        let mut t = Trainer::new(tiny_config(5), demo_corpus()).unwrap();
        let mut snapshots = BTreeMap::new();
        for _ in 0..5 {
            t.train_step().unwrap();
            let snapshot = t.snapshot().unwrap();
            store.save(&snapshot).unwrap();
            snapshots.insert(t.step(), snapshot);
        }
        let steps: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _, _)| s).collect();
        assert_eq!(steps, vec![5, 4, 1], "keep-last 2, and the protected step 1");
        store.protect([]);
        // Saving step 4's state again (training replayed after a rollback) writes nothing.
        let again = store.save(&snapshots[&4]).unwrap();
        assert_eq!(again.bytes, 0, "the committed copy is kept");
        assert_eq!(again.removed, vec![store.step_dir(1)], "unprotected, step 1 goes");
        store.verify_dir(&store.step_dir(4)).unwrap();
        // A corrupt committed copy is rewritten.
        flip_bits(&store.step_dir(4).join("dense.safetensors"), |n| n / 2, 0x10);
        assert!(store.save(&snapshots[&4]).unwrap().bytes > 0);
        store.verify_dir(&store.step_dir(4)).unwrap();
    })
    .unwrap();
}
