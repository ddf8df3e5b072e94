//! Worker benchmarks, printed as a table (see BENCHMARKS.md, "Training worker"):
//! (a) tokens/s of the `small` model vs the identical model in PyTorch eager, same threads;
//! (b) checkpoint save/load GB/s vs `dd` sequential write (fsync) and read (O_DIRECT) of random
//!     data (a zero-filled file, the earlier reference, is printed for comparison).
//!
//! `cargo bench -p ninelives-worker --bench worker --profile dev -- [THREADS]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use ninelives_core::ModelDims;
use ninelives_core::job::{LearningRateSpec, ModelPreset, ScheduleKind, TrainingSpec};
use ninelives_worker::data::Corpus;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, ExpertSelection, Trainer, TrainerConfig};

const STEPS: u64 = 3;
const GLOBAL_BATCH: u32 = 4;
const MICRO_BATCH: u32 = 2;
/// Parallel dd readers in the strongest load reference: as many as the checkpoint reader has.
const DD_STREAMS: usize = 4;
/// Save/load rounds (each against its own dd run); the medians are reported. The VM's disk
/// switches between speeds from second to second, so a few rounds are needed for a median.
const ROUNDS: u64 = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As `ninelives worker train` does: candle's spin-waiting elementwise pool off (see the doc).
    ninelives_worker::trainer::pin_candle_elementwise_pool()?;
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    // Optional second argument: `train` or `checkpoint` runs only that part (for profiling).
    let part = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    let load_before = load_average();
    let dims = ModelDims::preset(ModelPreset::Small);
    let training = TrainingSpec {
        steps: 100,
        learning_rate: LearningRateSpec {
            peak: 1e-3,
            min: 1e-4,
            warmup_steps: 0,
            schedule: ScheduleKind::Cosine,
        },
        adamw: Default::default(),
        grad_clip: 1.0,
        aux_loss_coef: 0.01,
        z_loss_coef: 0.001,
    };
    let config = TrainerConfig {
        dims,
        training,
        total_steps: 100,
        global_batch_size: GLOBAL_BATCH,
        micro_batch_size: MICRO_BATCH,
        seed: 1,
        router_skew: 0.0,
        load_window_steps: 10,
    };
    let corpus = Arc::new(Corpus::load(&["/usr/share/common-licenses"])?);
    let mut trainer = Trainer::new(config, corpus)?;

    // (a) training throughput.
    if part == "checkpoint" {
        trainer.train_step()?;
        return checkpoint_bench(&mut trainer, &dims, &load_before);
    }
    let ours = run_with_threads(threads, || -> Result<f64, ninelives_worker::WorkerError> {
        trainer.train_step()?; // warm-up
        let start = Instant::now();
        for _ in 0..STEPS {
            trainer.train_step()?;
        }
        Ok((STEPS * u64::from(GLOBAL_BATCH) * u64::from(dims.seq_len)) as f64 / start.elapsed().as_secs_f64())
    })??;
    if part == "train" {
        println!("ninelives `small` train tokens/s: {ours:.0}");
        return Ok(());
    }
    // PyTorch twice: with OpenMP's default wait policy and with `OMP_WAIT_POLICY=PASSIVE`. On a
    // busy machine the default (spinning) workers collapse (10x slower); the faster run is the
    // reference, so the ratio never flatters us.
    let script = format!("{}/benches/torch_small.py", env!("CARGO_MANIFEST_DIR"));
    let mut torch_runs: Vec<(&str, f64)> = Vec::new();
    let mut torch_error = String::new();
    for policy in ["default", "PASSIVE"] {
        let mut cmd = Command::new("python3");
        cmd.args([script.as_str(), "--threads", &threads.to_string(), "--steps", &STEPS.to_string()]).args([
            "--global-batch",
            &GLOBAL_BATCH.to_string(),
            "--micro-batch",
            &MICRO_BATCH.to_string(),
        ]);
        if policy != "default" {
            cmd.env("OMP_WAIT_POLICY", policy);
        }
        let out = cmd.output()?;
        match String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("tokens_per_s=").and_then(|v| v.parse::<f64>().ok()))
        {
            Some(t) => torch_runs.push((policy, t)),
            None => {
                torch_error =
                    String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output").to_string()
            }
        }
    }
    let runs: Vec<String> = torch_runs.iter().map(|(p, t)| format!("{p} {t:.0}")).collect();
    let best =
        torch_runs.iter().map(|&(_, t)| t).fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    println!("| benchmark | ninelives | reference | ratio |\n|---|---|---|---|");
    match best {
        Some(t) => println!(
            "| `small` train tokens/s ({threads} threads, batch {GLOBAL_BATCH}x{}) | {ours:.0} | PyTorch eager {t:.0} (OMP wait policy {}) | {:.2}x |",
            dims.seq_len,
            runs.join(", "),
            ours / t
        ),
        None => println!("| `small` train tokens/s | {ours:.0} | PyTorch unavailable: {torch_error} | - |"),
    }

    checkpoint_bench(&mut trainer, &dims, &load_before)
}

/// (b) checkpoint bandwidth vs dd, in the same directory, interleaved, median of [`ROUNDS`].
fn checkpoint_bench(
    trainer: &mut Trainer,
    dims: &ModelDims,
    load_before: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new().prefix("ninelives-bench").tempdir_in(".")?;
    let store = CheckpointStore::open(dir.path().join("ckpt"), 1)?;
    let snapshot_start = Instant::now();
    let snapshot = trainer.snapshot()?;
    let snapshot_secs = snapshot_start.elapsed().as_secs_f64();
    let dd_file = dir.path().join("dd.bin");
    let random_file = dir.path().join("random.bin");
    let zero_file = dir.path().join("zero.bin");
    let (mut save, mut dd_write, mut load, mut dd_read) = (vec![], vec![], vec![], vec![]);
    let (mut fresh_load, mut dd_shards, mut dd_shards_parallel) = (vec![], vec![], vec![]);
    let (mut zero_write, mut zero_read) = (vec![], vec![]);
    let (mut bytes, mut shards, mut save_secs) = (0, 0, vec![]);
    for round in 0..ROUNDS {
        let mut snap = snapshot.clone();
        snap.step += round; // a new checkpoint directory each round
        let saved = store.save(&snap)?;
        bytes = saved.bytes;
        shards = std::fs::read_dir(saved.path.join("experts"))?.count() + 1;
        save.push(saved.bytes as f64 / 1e9 / saved.seconds);
        save_secs.push(saved.seconds);
        let mib = saved.bytes.div_ceil(1 << 20);
        if round == 0 {
            // dd's data: random bytes, like a checkpoint's, so no storage layer can treat the
            // reference specially (zeros can be: thin provisioning, zero detection). The
            // zero-filled file of the earlier benches is still measured, for comparison.
            let random = random_file.display().to_string();
            run("dd", &["if=/dev/urandom", &format!("of={random}"), "bs=1M", &format!("count={mib}")])?;
            run("dd", &[&format!("if={random}"), "of=/dev/null", "bs=1M"])?; // into the page cache
        }
        for (source, target, into) in [
            (&random_file, &dd_file, &mut dd_write),
            (&PathBuf::from("/dev/zero"), &zero_file, &mut zero_write),
        ] {
            let _ = std::fs::remove_file(target);
            let start = Instant::now();
            run(
                "dd",
                &[
                    &format!("if={}", source.display()),
                    &format!("of={}", target.display()),
                    "bs=1M",
                    &format!("count={mib}"),
                    "conv=fsync",
                ],
            )?;
            into.push((mib << 20) as f64 / 1e9 / start.elapsed().as_secs_f64());
        }

        // A restore into the running trainer (what a surviving worker does): in place. Its
        // references: dd reading the same shard files one after the other, and 4 dd processes
        // reading them in parallel (our reader's concurrency). The order of the three rotates
        // from round to round, so none always finds the disk in the state another left.
        let files = shard_files(&saved.path)?;
        let shard_bytes = files.iter().map(|f| f.metadata().map(|m| m.len())).sum::<Result<u64, _>>()?;
        for turn in 0..3 {
            drop_cache(&saved.path)?;
            match (turn + round) % 3 {
                0 => {
                    let restored = trainer.restore_dir(&store, &saved.path)?;
                    load.push(restored.bytes as f64 / 1e9 / restored.seconds);
                }
                1 => dd_shards.push(shard_bytes as f64 / 1e9 / dd_files(&files)?),
                _ => {
                    dd_shards_parallel.push(shard_bytes as f64 / 1e9 / dd_files_parallel(&files, DD_STREAMS)?)
                }
            }
        }
        // A load into fresh vectors (what a new process does first): every page is new.
        drop_cache(&saved.path)?;
        let loaded = store.load_latest(dims, &ExpertSelection::All)?.ok_or("checkpoint vanished")?;
        fresh_load.push(loaded.report.bytes as f64 / 1e9 / loaded.report.seconds);
        drop(loaded);
        for (file, into) in [(&dd_file, &mut dd_read), (&zero_file, &mut zero_read)] {
            drop_cache_file(file)?;
            let start = Instant::now();
            run("dd", &[&format!("if={}", file.display()), "of=/dev/null", "bs=1M", "iflag=direct"])?;
            into.push((mib << 20) as f64 / 1e9 / start.elapsed().as_secs_f64());
        }
    }
    let rounds: Vec<String> = (0..load.len())
        .map(|i| {
            format!(
                "{:.2}/{:.2}/{:.2}/{:.2}/{:.2}",
                load[i], dd_shards_parallel[i], dd_shards[i], fresh_load[i], dd_read[i]
            )
        })
        .collect();
    println!(
        "load rounds (GB/s: in place / {DD_STREAMS} dd in parallel over the shard files / one dd after the other / fresh memory / dd of a separate file): {}",
        rounds.join(", ")
    );
    let (save, dd_write, load, dd_read) = (median(save), median(dd_write), median(load), median(dd_read));
    let dd_shards = median(dd_shards);
    let dd_shards_parallel = median(dd_shards_parallel);
    println!(
        "| checkpoint save GB/s ({:.0} MB, {shards} shards, XXH3-128 + fsync; median of {ROUNDS}) | {save:.2} | dd conv=fsync, random data {dd_write:.2} | {:.2}x |",
        bytes as f64 / 1e6,
        save / dd_write
    );
    println!(
        "| training pause for a save (host snapshot) | {:.3} s | full save {:.3} s | - |",
        snapshot_secs,
        median(save_secs)
    );
    println!(
        "| checkpoint load GB/s (cold cache, XXH3-128 verified, restored into the running trainer; median of {ROUNDS}) | {load:.2} | {DD_STREAMS} dd iflag=direct in parallel over the same shard files {dd_shards_parallel:.2} | {:.2}x |",
        load / dd_shards_parallel
    );
    println!(
        "| checkpoint load GB/s (as above) vs one dd after the other over the shard files | {load:.2} | dd iflag=direct of the same shard files {dd_shards:.2} | {:.2}x |",
        load / dd_shards
    );
    println!(
        "| checkpoint load GB/s (as above) vs dd of a separate random file of the same size | {load:.2} | dd iflag=direct, random data {dd_read:.2} | {:.2}x |",
        load / dd_read
    );
    let fresh_load = median(fresh_load);
    println!(
        "| checkpoint load GB/s into fresh memory (a new process; page faults included) | {fresh_load:.2} | dd iflag=direct of the same shard files {dd_shards:.2} | {:.2}x |",
        fresh_load / dd_shards
    );
    println!(
        "| dd of a zero-filled file (write fsync / read direct GB/s; not the reference) | - | {:.2} / {:.2} | - |",
        median(zero_write),
        median(zero_read)
    );
    println!("load average before / after: {load_before} / {}", load_average());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn run(cmd: &str, args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(format!("{cmd} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// Runs dd and returns the copy time it reports itself ("..., 0.0123 s, ..."), which leaves out
/// starting the process (a tenth of a second over a checkpoint's ~100 files).
fn dd_seconds(args: &[&str]) -> Result<f64, Box<dyn std::error::Error>> {
    let out = Command::new("dd").args(args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("dd failed: {stderr}").into());
    }
    stderr
        .lines()
        .last()
        .and_then(|line| line.split(", ").find_map(|part| part.strip_suffix(" s")?.parse::<f64>().ok()))
        .ok_or_else(|| format!("no time in dd's report: {stderr}").into())
}

/// Seconds for dd to read `files` one after the other (`bs=1M iflag=direct`), as dd reports them.
fn dd_files(files: &[PathBuf]) -> Result<f64, Box<dyn std::error::Error>> {
    let mut seconds = 0.0;
    for file in files {
        seconds += dd_seconds(&[&format!("if={}", file.display()), "of=/dev/null", "bs=1M", "iflag=direct"])?;
    }
    Ok(seconds)
}

/// Seconds for `streams` dd sequences running at once, each over every `streams`-th file: the
/// slowest sequence's sum of dd's own times (process starts left out, which flatters dd).
fn dd_files_parallel(files: &[PathBuf], streams: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let shares: Vec<Vec<PathBuf>> =
        (0..streams).map(|k| files.iter().skip(k).step_by(streams).cloned().collect()).collect();
    let times: Vec<Result<f64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            shares.iter().map(|share| s.spawn(move || dd_files(share).map_err(|e| e.to_string()))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("dd thread panicked".into()))).collect()
    });
    let mut slowest: f64 = 0.0;
    for t in times {
        slowest = slowest.max(t?);
    }
    Ok(slowest)
}

/// A checkpoint's shard files (dense first, then the experts in name order).
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut experts = std::fs::read_dir(dir.join("experts"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?;
    experts.sort();
    let mut files = vec![dir.join("dense.safetensors")];
    files.extend(experts);
    Ok(files)
}

/// Drops a checkpoint's files from the page cache (`dd iflag=nocache count=0`), so the load is
/// measured from disk like dd's O_DIRECT read (the loader reads with O_DIRECT too where it can).
fn drop_cache(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    for entry in std::fs::read_dir(dir)?.chain(std::fs::read_dir(dir.join("experts"))?) {
        let path = entry?.path();
        if path.is_file() {
            drop_cache_file(&path)?;
        }
    }
    Ok(())
}

fn drop_cache_file(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    run("dd", &[&format!("if={}", path.display()), "iflag=nocache", "count=0"])
}
