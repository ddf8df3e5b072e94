//! Reading shards back: a two-stage pipeline that keeps the disk busy while shards already read
//! are verified and decoded.
//!
//! Why two stages: a reader that also checksums and decodes leaves the disk idle while it does
//! so. On the bench VM's virtio disk, reading a checkpoint's files with no CPU work in between
//! ran at 3.0–3.4 GB/s, the same files read-verify-decoded by each thread in turn at 2.4–2.6.
//! Here [`IO_THREADS`] threads only read (`O_DIRECT`, [`READ_CHUNK`] requests) and hand each
//! whole shard to [`DECODE_THREADS`] threads that checksum and decode it.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, mpsc};

use super::manifest::{Checksummer, ShardEntry};
use crate::error::{Result, WorkerError};

/// Threads that read shard files and do nothing else (they wait on the disk).
const IO_THREADS: usize = 4;
/// Threads that checksum and decode the shards read (CPU-bound: one per core of the bench VM).
const DECODE_THREADS: usize = 2;
/// Shards read and waiting for a decoder, at most: bounds the memory of a load to
/// `IO_THREADS + READ_AHEAD + DECODE_THREADS` shard buffers.
const READ_AHEAD: usize = 4;
/// Bytes per read request. 1 MiB requests from 4 threads read the bench checkpoint at
/// 3.0–3.4 GB/s, 8 MiB from 8 threads at 2.4–2.7.
const READ_CHUNK: usize = 1 << 20;
/// Alignment of buffers and request sizes for `O_DIRECT` reads.
const DIRECT_ALIGN: usize = 4096;
/// Shard buffers kept for the next load (see [`BUFFERS`]).
const POOLED_BUFFERS: usize = IO_THREADS + READ_AHEAD + DECODE_THREADS;

/// Read buffers reused from shard to shard and from load to load: a fresh buffer costs a page
/// fault and a page clear per page, as much CPU as checksumming it. At most [`POOLED_BUFFERS`]
/// are kept (each as large as the largest shard it held: tens of MB for `small`).
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A pooled buffer whose window `[start, start + len)` is aligned for direct I/O.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Room for `len` bytes, rounded up to whole direct-I/O blocks.
    fn new(len: usize) -> Self {
        let room = len.next_multiple_of(DIRECT_ALIGN).max(DIRECT_ALIGN) + DIRECT_ALIGN;
        // The smallest pooled buffer that fits, else the largest one (grown): big buffers stay
        // for big shards.
        let mut raw = BUFFERS
            .lock()
            .ok()
            .and_then(|mut pool| {
                let fit = (0..pool.len())
                    .filter(|&i| pool[i].len() >= room)
                    .min_by_key(|&i| pool[i].len())
                    .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()))?;
                Some(pool.swap_remove(fit))
            })
            .unwrap_or_default();
        if raw.len() < room {
            raw.resize(room, 0);
        }
        let misalign = raw.as_ptr() as usize % DIRECT_ALIGN;
        let start = if misalign == 0 { 0 } else { DIRECT_ALIGN - misalign };
        Self { raw, start, len }
    }

    /// The whole aligned window (including the rounding), for reading into.
    fn window(&mut self) -> &mut [u8] {
        let room = self.len.next_multiple_of(DIRECT_ALIGN).max(DIRECT_ALIGN);
        &mut self.raw[self.start..self.start + room]
    }

    /// The bytes read.
    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl Drop for AlignedBuf {
    /// Returns the buffer to the pool (or frees it when the pool is full).
    fn drop(&mut self) {
        if let Ok(mut pool) = BUFFERS.lock()
            && pool.len() < POOLED_BUFFERS
        {
            pool.push(std::mem::take(&mut self.raw));
        }
    }
}

/// Reads up to `expected + 1` bytes of `path` (one more than expected, so a longer file is
/// noticed). Bypasses the page cache (`O_DIRECT`) where the file system allows it: a restore
/// reads each byte once, so caching it would only cost a copy.
fn read_file(path: &Path, expected: usize) -> std::io::Result<AlignedBuf> {
    match read_file_with(path, expected, libc::O_DIRECT) {
        Ok(done) => Ok(done),
        // Not supported here (tmpfs, some overlays): read through the page cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => read_file_with(path, expected, 0),
        Err(e) => Err(e),
    }
}

fn read_file_with(path: &Path, expected: usize, flags: i32) -> std::io::Result<AlignedBuf> {
    let mut file = OpenOptions::new().read(true).custom_flags(flags).open(path)?;
    let mut buf = AlignedBuf::new(expected + 1);
    let mut filled = 0;
    {
        let window = buf.window();
        while filled < window.len() {
            let end = (filled + READ_CHUNK).min(window.len());
            let n = file.read(&mut window[filled..end])?;
            if n == 0 {
                break;
            }
            filled += n;
            if flags != 0 && !n.is_multiple_of(DIRECT_ALIGN) {
                // A short direct read ends at end of file; the next offset would be unaligned.
                break;
            }
        }
    }
    buf.len = filled;
    Ok(buf)
}

/// Checks a shard's bytes against its manifest entry: size, then checksum.
fn verify(path: &Path, entry: &ShardEntry, bytes: &[u8]) -> Result<()> {
    let corrupt = |reason: String| WorkerError::CorruptCheckpoint { path: path.to_path_buf(), reason };
    let (kind, recorded) =
        entry.checksum().ok_or_else(|| corrupt("the manifest records no checksum for this shard".into()))?;
    if bytes.len() as u64 != entry.bytes {
        return Err(corrupt(format!(
            "shard has {}{} bytes, the manifest says {} (torn write)",
            bytes.len(),
            if bytes.len() as u64 > entry.bytes { "+" } else { "" },
            entry.bytes
        )));
    }
    let mut hasher = Checksummer::new(kind);
    hasher.update(bytes);
    let found = hasher.finish();
    if found != recorded {
        return Err(corrupt(format!(
            "checksum mismatch ({}): manifest {recorded}, file {found}",
            kind.name()
        )));
    }
    Ok(())
}

/// Reads every shard of `entries` from `dir`, verifies its size and checksum against the entry,
/// and runs `decode` on its bytes; results in `entries` order. Reading runs on [`IO_THREADS`]
/// (largest shard first, so the long one does not finish last), verifying and decoding on
/// [`DECODE_THREADS`].
pub(super) fn read_verified<R: Send>(
    dir: &Path,
    entries: &[&ShardEntry],
    decode: impl Fn(&Path, &[u8]) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(entries[i].bytes));
    let next = Mutex::new(order.into_iter());
    let slots: Vec<Mutex<Option<Result<R>>>> = entries.iter().map(|_| Mutex::new(None)).collect();
    let put = |i: usize, r: Result<R>| {
        if let Some(Ok(mut slot)) = slots.get(i).map(Mutex::lock) {
            *slot = Some(r);
        }
    };
    let (tx, rx) = mpsc::sync_channel::<(usize, AlignedBuf)>(READ_AHEAD);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..IO_THREADS.min(entries.len()) {
            let tx = tx.clone();
            s.spawn(|| {
                let tx = tx; // moved in: the channel closes when every reader is done
                loop {
                    let Some(i) = next.lock().ok().and_then(|mut n| n.next()) else { return };
                    let entry = entries[i];
                    let path = dir.join(&entry.file);
                    let corrupt =
                        |reason: String| WorkerError::CorruptCheckpoint { path: path.clone(), reason };
                    let read = usize::try_from(entry.bytes)
                        .map_err(|_| corrupt("shard size overflows".into()))
                        .and_then(|expected| {
                            read_file(&path, expected).map_err(|e| corrupt(format!("shard unreadable: {e}")))
                        });
                    match read {
                        Ok(buf) => {
                            if tx.send((i, buf)).is_err() {
                                return;
                            }
                        }
                        Err(e) => put(i, Err(e)),
                    }
                }
            });
        }
        drop(tx);
        for _ in 0..DECODE_THREADS.min(entries.len()) {
            s.spawn(|| {
                loop {
                    // Hold the lock only to take the next shard, not while decoding it.
                    let Some((i, buf)) = rx.lock().ok().and_then(|rx| rx.recv().ok()) else { return };
                    let path = dir.join(&entries[i].file);
                    let r = verify(&path, entries[i], buf.bytes()).and_then(|()| decode(&path, buf.bytes()));
                    put(i, r);
                }
            });
        }
    });
    slots
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.into_inner().ok().flatten().unwrap_or_else(|| {
                Err(WorkerError::CorruptCheckpoint {
                    path: dir.join(&entries[i].file),
                    reason: "shard was not read (a reader thread failed)".into(),
                })
            })
        })
        .collect()
}
