//! The background saver: checkpoints written on their own thread while training continues.

use std::thread::JoinHandle;

use super::store::CheckpointStore;
use super::write::{SaveReport, TrainingSnapshot};
use crate::error::{Result, WorkerError};

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
