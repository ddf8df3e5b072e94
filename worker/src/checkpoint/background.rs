//! The background saver: checkpoints written on their own thread while training continues.

use std::thread::JoinHandle;

use super::store::CheckpointStore;
use super::write::{SaveReport, TrainingSnapshot};
use crate::error::{Result, WorkerError};

/// How a background save ended.
#[derive(Debug)]
pub enum SaveOutcome {
    /// Committed, with retention applied.
    Committed(SaveReport),
    /// Failed (a full disk, an I/O error). What it wrote was removed; training goes on and the
    /// next save starts over.
    Failed {
        /// The step that was being saved.
        step: u64,
        /// Why.
        error: WorkerError,
    },
}

/// A save on its thread.
#[derive(Debug)]
struct InFlight {
    step: u64,
    handle: JoinHandle<Result<SaveReport>>,
}

/// Writes checkpoints on a background thread so training continues while shards hit the disk.
/// At most one save is in flight: submitting the next waits for the previous one.
#[derive(Debug)]
pub struct BackgroundSaver {
    store: CheckpointStore,
    in_flight: Option<InFlight>,
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

    /// Starts writing `snapshot`. Returns how the previous save ended if one was still in
    /// flight (waiting for it first). Fails only when no writer thread can be started.
    pub fn submit(&mut self, snapshot: TrainingSnapshot) -> Result<Option<SaveOutcome>> {
        let previous = self.wait();
        let store = self.store.clone();
        let step = snapshot.step;
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || store.save(&snapshot))
            .map_err(|e| WorkerError::CheckpointWriter(format!("cannot start writer thread: {e}")))?;
        self.in_flight = Some(InFlight { step, handle });
        Ok(previous)
    }

    /// Whether the save in flight (if any) has finished.
    pub fn is_idle(&self) -> bool {
        self.in_flight.as_ref().is_none_or(|f| f.handle.is_finished())
    }

    /// Waits for the save in flight, if any, and returns how it ended.
    pub fn wait(&mut self) -> Option<SaveOutcome> {
        let InFlight { step, handle } = self.in_flight.take()?;
        Some(match handle.join() {
            Ok(Ok(report)) => SaveOutcome::Committed(report),
            Ok(Err(error)) => SaveOutcome::Failed { step, error },
            Err(_) => SaveOutcome::Failed {
                step,
                error: WorkerError::CheckpointWriter("writer thread panicked".into()),
            },
        })
    }

    /// How a finished save ended, without blocking, if one finished.
    pub fn poll(&mut self) -> Option<SaveOutcome> {
        if self.in_flight.as_ref().is_some_and(|f| f.handle.is_finished()) { self.wait() } else { None }
    }
}
