//! The training job's progress over simulated time: steps, disk checkpoints, halts and resumes.

use std::collections::BTreeSet;

/// Progress of the job in steps (fractional: a step in flight is part done), the committed disk
/// checkpoints, and where the wall time went while it ran.
#[derive(Clone, Debug)]
pub(crate) struct Training {
    step_s: f64,
    interval: u64,
    /// Training pauses this long at each checkpoint step.
    pause_s: f64,
    /// After the pause, the checkpoint commits this much later (async write).
    write_s: f64,
    keep: usize,
    /// Steps done (the step in flight counts in part).
    pub progress: f64,
    /// Time up to which progress is accounted.
    pub clock: f64,
    pub running: bool,
    pause_left: f64,
    /// The checkpoint being taken: its step, and its commit time once the pause is over.
    pending: Option<(u64, Option<f64>)>,
    /// Committed checkpoint steps (0 = the seeded initial state), newest `keep`.
    pub committed: BTreeSet<u64>,
    /// Wall time computing steps (kept or not).
    pub compute_s: f64,
    /// Wall time paused for checkpoints.
    pub pause_total_s: f64,
    /// Checkpoints skipped because the previous write was still running.
    pub skipped: u64,
}

impl Training {
    pub fn new(step_s: f64, interval: u64, pause_s: f64, write_s: f64, keep: usize) -> Self {
        Self {
            step_s,
            interval: interval.max(1),
            pause_s,
            write_s,
            keep: keep.max(1),
            progress: 0.0,
            clock: 0.0,
            running: true,
            pause_left: 0.0,
            pending: None,
            committed: BTreeSet::from([0]),
            compute_s: 0.0,
            pause_total_s: 0.0,
            skipped: 0,
        }
    }

    /// The newest committed checkpoint.
    pub fn newest(&self) -> u64 {
        self.committed.last().copied().unwrap_or(0)
    }

    /// Accounts the time up to `to`.
    pub fn advance(&mut self, to: f64) {
        while self.running && self.clock < to {
            if self.pause_left > 0.0 {
                self.pause(to);
                continue;
            }
            if let Some((step, Some(at))) = self.pending
                && at <= self.clock
            {
                self.commit(step);
                continue;
            }
            self.compute(to);
        }
        if let Some((step, Some(at))) = self.pending
            && self.running
            && at <= self.clock
        {
            self.commit(step);
        }
        self.clock = self.clock.max(to);
    }

    fn pause(&mut self, to: f64) {
        let d = self.pause_left.min(to - self.clock);
        self.clock += d;
        self.pause_left -= d;
        self.pause_total_s += d;
        if self.pause_left <= 0.0 {
            self.pause_left = 0.0;
            if let Some((step, None)) = self.pending {
                self.pending = Some((step, Some(self.clock + self.write_s)));
            }
        }
    }

    fn compute(&mut self, to: f64) {
        let interval = self.interval as f64;
        let next = ((self.progress / interval).floor() + 1.0) * interval;
        let reach = self.clock + (next - self.progress) * self.step_s;
        let commit_at = match self.pending {
            Some((_, Some(at))) => at,
            _ => f64::INFINITY,
        };
        let stop = to.min(commit_at);
        if reach <= stop {
            self.compute_s += reach - self.clock;
            self.clock = reach;
            self.progress = next;
            self.start_checkpoint(next as u64);
        } else {
            self.compute_s += stop - self.clock;
            self.progress += (stop - self.clock) / self.step_s;
            self.clock = stop;
        }
    }

    fn start_checkpoint(&mut self, step: u64) {
        if self.pending.is_some() {
            self.skipped += 1;
            return;
        }
        self.pending = Some((step, None));
        self.pause_left = self.pause_s;
        if self.pause_s <= 0.0 {
            self.pending = Some((step, Some(self.clock + self.write_s)));
        }
    }

    fn commit(&mut self, step: u64) {
        self.pending = None;
        self.committed.insert(step);
        while self.committed.len() > self.keep {
            self.committed.pop_first();
        }
    }

    /// Training stops at `at` (a fault): the checkpoint being taken is abandoned.
    pub fn halt(&mut self, at: f64) {
        self.advance(at);
        self.running = false;
        self.pending = None;
        self.pause_left = 0.0;
    }

    /// Training continues at `at` from `progress` steps; checkpoints after it are discarded.
    pub fn resume(&mut self, at: f64, progress: f64) {
        self.clock = self.clock.max(at);
        self.running = true;
        self.progress = progress;
        let keep_to = progress.floor() as u64;
        self.committed.retain(|&s| s <= keep_to);
        if self.committed.is_empty() {
            self.committed.insert(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_checkpoints_pause_then_commit_and_a_halt_abandons_the_one_in_flight() {
        // 1 s steps, checkpoint every 10 steps, 2 s pause, committed 5 s after the pause.
        let mut t = Training::new(1.0, 10, 2.0, 5.0, 3);
        t.advance(12.0);
        assert_eq!((t.progress, t.pause_total_s), (10.0, 2.0));
        assert_eq!(t.newest(), 0);
        t.advance(17.0);
        assert_eq!(t.newest(), 10);
        assert!((t.progress - 15.0).abs() < 1e-9);
        // Step 20 is reached at 22 s; its pause ends at 24 s; a fault at 26 s loses it.
        t.halt(26.0);
        assert!((t.progress - 22.0).abs() < 1e-9);
        assert_eq!(t.newest(), 10);
        assert_eq!((t.compute_s, t.pause_total_s), (22.0, 4.0));
        t.resume(30.0, 10.0);
        t.advance(40.0);
        assert!((t.progress - 20.0).abs() < 1e-9);
    }
}
