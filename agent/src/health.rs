//! Chip health decisions: a pure state machine fed by probe readings and time.
//!
//! [`ChipHealth::observe`] turns one reading into the chip's [`Verdict`] (state, code, action).
//! It synthesises the agent's own codes (heartbeat stalled, over-temperature, correctable-error
//! burst, offline, unreadable), judges every active code through the [`FaultTable`] and keeps the
//! most severe. It also counts *fault onsets* (usable → failed): a chip with `flap_limit` onsets
//! within `flap_window` is quarantined and stays so, whatever it reports, until [`ChipHealth::clear`]
//! (an operator's `clear` request). No I/O and no clock: time is passed in, so tests drive it.

use std::collections::VecDeque;
use std::time::Duration;

use ninelives_core::keyspace::ChipState;

use crate::faults::{self, FaultAction, FaultTable};
use crate::probe::{ChipReading, ProbeError};

/// Thresholds of the health decisions.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthPolicy {
    /// A heartbeat that has not advanced for this long means the chip hung.
    pub hang_after: Duration,
    /// Temperature at or above which the chip is over-temperature.
    pub over_temperature_c: f64,
    /// Corrected errors within `burst_window` that make a burst.
    pub burst_errors: u64,
    /// Window of the correctable-error burst count.
    pub burst_window: Duration,
    /// Fault onsets within `flap_window` that quarantine a chip.
    pub flap_limit: usize,
    /// Window of the flap count.
    pub flap_window: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            hang_after: Duration::from_secs(2),
            over_temperature_c: 95.0,
            burst_errors: 100,
            burst_window: Duration::from_secs(60),
            flap_limit: 3,
            flap_window: Duration::from_secs(600),
        }
    }
}

/// The judged health of a chip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// State to publish.
    pub state: ChipState,
    /// The code behind it (`ok` when healthy).
    pub code: String,
    /// The action taken.
    pub action: FaultAction,
}

impl Verdict {
    /// A healthy chip.
    pub fn healthy() -> Self {
        Self { state: ChipState::Healthy, code: faults::OK.to_string(), action: FaultAction::Ignore }
    }
}

/// What one observation changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Verdict before.
    pub from: Verdict,
    /// Verdict after.
    pub to: Verdict,
    /// Codes the fault table does not know, seen in this observation (already judged
    /// conservatively; the caller reports them).
    pub unknown_codes: Vec<String>,
    /// True when this transition is the chip entering quarantine.
    pub quarantined: bool,
}

/// The health state machine of one chip.
#[derive(Clone, Debug)]
pub struct ChipHealth {
    policy: HealthPolicy,
    verdict: Verdict,
    /// Last heartbeat value and when it last advanced.
    heartbeat: Option<(u64, Duration)>,
    /// (time, cumulative count) samples of corrected errors within the burst window.
    corrected: VecDeque<(Duration, u64)>,
    /// Fault onsets within the flap window.
    onsets: VecDeque<Duration>,
    quarantined: bool,
}

impl ChipHealth {
    /// A chip believed healthy until observed.
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            policy,
            verdict: Verdict::healthy(),
            heartbeat: None,
            corrected: VecDeque::new(),
            onsets: VecDeque::new(),
            quarantined: false,
        }
    }

    /// The current verdict.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// Whether the chip is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined
    }

    /// Puts the chip in quarantine without counting flaps: used at start-up when etcd says a
    /// previous run of the agent quarantined it, so a restart does not lift a quarantine.
    pub fn restore_quarantine(&mut self, code: &str) {
        self.quarantined = true;
        self.verdict = Verdict {
            state: ChipState::Quarantined,
            code: code.to_string(),
            action: FaultAction::IsolateChip,
        };
    }

    /// Lifts a quarantine (operator request). Returns the transition when the chip was
    /// quarantined; its next observation decides its state afresh.
    pub fn clear(&mut self) -> Option<Transition> {
        if !self.quarantined {
            return None;
        }
        self.quarantined = false;
        self.onsets.clear();
        let from = std::mem::replace(&mut self.verdict, Verdict::healthy());
        Some(Transition { from, to: self.verdict.clone(), unknown_codes: Vec::new(), quarantined: false })
    }

    /// Feeds one reading taken at `now` (monotonic time since any fixed origin).
    /// Returns the transition when the verdict changed.
    pub fn observe(
        &mut self,
        reading: Result<&ChipReading, &ProbeError>,
        now: Duration,
        table: &FaultTable,
    ) -> Option<Transition> {
        let codes = self.active_codes(reading, now);
        let mut unknown_codes = Vec::new();
        let mut judged = Verdict::healthy();
        for code in codes {
            let judgement = table.judge(&code);
            if !judgement.known {
                unknown_codes.push(code.clone());
            }
            // Ignored codes are not published; otherwise the most severe wins and the first of
            // equal severity keeps its code.
            if judgement.action != FaultAction::Ignore
                && (judged.code == faults::OK || judgement.action > judged.action)
            {
                judged = Verdict { state: judgement.action.chip_state(), code, action: judgement.action };
            }
        }

        if self.quarantined {
            // Readings still run (to keep heartbeat and error windows current) but change nothing.
            return None;
        }

        let mut quarantined = false;
        if judged.state == ChipState::Failed && self.verdict.state.usable() {
            self.onsets.push_back(now);
            while self.onsets.front().is_some_and(|&t| now.saturating_sub(t) > self.policy.flap_window) {
                self.onsets.pop_front();
            }
            if self.onsets.len() >= self.policy.flap_limit {
                self.quarantined = true;
                quarantined = true;
                judged = Verdict {
                    state: ChipState::Quarantined,
                    code: format!("{}:{}", faults::FLAPPING, judged.code),
                    action: FaultAction::IsolateChip,
                };
            }
        }

        // Edge-triggered: a persisting fault (also an unknown code) is reported once.
        if judged == self.verdict {
            return None;
        }
        let from = std::mem::replace(&mut self.verdict, judged);
        Some(Transition { from, to: self.verdict.clone(), unknown_codes, quarantined })
    }

    /// Every fault code active in this reading, vendor code first.
    fn active_codes(&mut self, reading: Result<&ChipReading, &ProbeError>, now: Duration) -> Vec<String> {
        let reading = match reading {
            Ok(reading) => reading,
            Err(_) => {
                // Unknown heartbeat position: restart hang detection when the chip is readable again.
                self.heartbeat = None;
                return vec![faults::PROBE_UNREADABLE.to_string()];
            }
        };
        let mut codes = Vec::new();
        if reading.error_code != faults::OK {
            codes.push(reading.error_code.clone());
        }
        if !reading.online {
            codes.push(faults::CHIP_OFFLINE.to_string());
        }
        if let Some(beat) = reading.heartbeat {
            match self.heartbeat {
                Some((last, since)) if last == beat => {
                    if now.saturating_sub(since) >= self.policy.hang_after {
                        codes.push(faults::HEARTBEAT_STALLED.to_string());
                    }
                }
                _ => self.heartbeat = Some((beat, now)),
            }
        }
        if reading.temperature_c.is_some_and(|t| t >= self.policy.over_temperature_c) {
            codes.push(faults::OVER_TEMPERATURE.to_string());
        }
        if let Some(count) = reading.correctable_errors {
            self.corrected.push_back((now, count));
            while self
                .corrected
                .front()
                .is_some_and(|&(t, _)| now.saturating_sub(t) > self.policy.burst_window)
            {
                self.corrected.pop_front();
            }
            let oldest = self.corrected.front().map_or(count, |&(_, c)| c);
            if count.saturating_sub(oldest) >= self.policy.burst_errors {
                codes.push(faults::CORRECTABLE_ERROR_BURST.to_string());
            }
        }
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn with_code(beat: u64, code: &str) -> ChipReading {
        ChipReading { error_code: code.to_string(), ..ChipReading::healthy(beat) }
    }

    #[test]
    fn healthy_chip_never_transitions() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        for i in 0..100 {
            assert_eq!(chip.observe(Ok(&ChipReading::healthy(i)), secs(i as f64 * 0.1), &table), None);
        }
        assert_eq!(chip.verdict(), &Verdict::healthy());
    }

    #[test]
    fn vendor_codes_map_through_the_table_and_recover() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        let t = chip.observe(Ok(&with_code(1, faults::HBM_ECC_UNCORRECTABLE)), secs(0.0), &table).unwrap();
        assert_eq!((t.to.state, t.to.code.as_str()), (ChipState::Failed, faults::HBM_ECC_UNCORRECTABLE));
        assert_eq!(chip.observe(Ok(&with_code(2, faults::HBM_ECC_UNCORRECTABLE)), secs(0.1), &table), None);
        let t = chip.observe(Ok(&with_code(3, faults::SUBHEALTH_SLOW)), secs(0.2), &table).unwrap();
        assert_eq!(t.to.state, ChipState::Degraded);
        let t = chip.observe(Ok(&ChipReading::healthy(4)), secs(0.3), &table).unwrap();
        assert_eq!(t.to, Verdict::healthy());
    }

    #[test]
    fn the_most_severe_of_several_codes_wins() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        let hot_and_slow = ChipReading { temperature_c: Some(120.0), ..with_code(1, faults::SUBHEALTH_SLOW) };
        let t = chip.observe(Ok(&hot_and_slow), secs(0.0), &table).unwrap();
        assert_eq!((t.to.state, t.to.code.as_str()), (ChipState::Failed, faults::OVER_TEMPERATURE));
    }

    #[test]
    fn stalled_heartbeat_is_a_hang_after_the_policy_delay() {
        let table = FaultTable::default();
        let policy = HealthPolicy { hang_after: secs(2.0), ..HealthPolicy::default() };
        let mut chip = ChipHealth::new(policy);
        assert_eq!(chip.observe(Ok(&ChipReading::healthy(7)), secs(10.0), &table), None);
        assert_eq!(chip.observe(Ok(&ChipReading::healthy(7)), secs(11.9), &table), None);
        let t = chip.observe(Ok(&ChipReading::healthy(7)), secs(12.0), &table).unwrap();
        assert_eq!(t.to.code, faults::HEARTBEAT_STALLED);
        let t = chip.observe(Ok(&ChipReading::healthy(8)), secs(12.1), &table).unwrap();
        assert_eq!(t.to, Verdict::healthy());
    }

    #[test]
    fn correctable_error_bursts_degrade_then_age_out() {
        let table = FaultTable::default();
        let policy = HealthPolicy { burst_errors: 100, burst_window: secs(60.0), ..HealthPolicy::default() };
        let mut chip = ChipHealth::new(policy);
        let ce =
            |beat: u64, n: u64| ChipReading { correctable_errors: Some(n), ..ChipReading::healthy(beat) };
        assert_eq!(chip.observe(Ok(&ce(1, 5)), secs(0.0), &table), None);
        assert_eq!(chip.observe(Ok(&ce(2, 50)), secs(10.0), &table), None, "45 errors is no burst");
        let t = chip.observe(Ok(&ce(3, 1050)), secs(20.0), &table).unwrap();
        assert_eq!((t.to.state, t.to.code.as_str()), (ChipState::Degraded, faults::CORRECTABLE_ERROR_BURST));
        let t = chip.observe(Ok(&ce(4, 1050)), secs(81.0), &table).unwrap();
        assert_eq!(t.to, Verdict::healthy(), "burst must age out of the window");
    }

    #[test]
    fn unknown_codes_are_isolated_and_reported() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        let t = chip.observe(Ok(&with_code(1, "vendor-0xbeef")), secs(0.0), &table).unwrap();
        assert_eq!(t.to.state, ChipState::Failed);
        assert_eq!(t.to.action, FaultAction::IsolateChip);
        assert_eq!(t.unknown_codes, vec!["vendor-0xbeef".to_string()]);
    }

    #[test]
    fn unreadable_chips_are_isolated() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        let err = ProbeError { index: 0, reason: "gone".into() };
        let t = chip.observe(Err(&err), secs(0.0), &table).unwrap();
        assert_eq!((t.to.state, t.to.code.as_str()), (ChipState::Failed, faults::PROBE_UNREADABLE));
    }

    #[test]
    fn flapping_chip_is_quarantined_until_cleared() {
        let table = FaultTable::default();
        let policy = HealthPolicy { flap_limit: 3, flap_window: secs(60.0), ..HealthPolicy::default() };
        let mut chip = ChipHealth::new(policy);
        let mut beat = 0;
        let mut step = |chip: &mut ChipHealth, code: &str, t: f64| {
            beat += 1;
            chip.observe(Ok(&with_code(beat, code)), secs(t), &table)
        };
        for (i, t) in [0.0, 10.0].into_iter().enumerate() {
            assert_eq!(
                step(&mut chip, faults::LINK_DOWN, t).unwrap().to.state,
                ChipState::Failed,
                "onset {i}"
            );
            assert_eq!(step(&mut chip, faults::OK, t + 1.0).unwrap().to.state, ChipState::Healthy);
        }
        let t = step(&mut chip, faults::LINK_DOWN, 20.0).unwrap();
        assert!(t.quarantined);
        assert_eq!(t.to.state, ChipState::Quarantined);
        assert_eq!(t.to.code, "flapping:link-down");
        assert_eq!(step(&mut chip, faults::OK, 21.0), None, "quarantine ignores recovery");
        assert_eq!(step(&mut chip, faults::OK, 5000.0), None, "quarantine does not expire");

        let cleared = chip.clear().unwrap();
        assert_eq!(cleared.from.state, ChipState::Quarantined);
        assert!(chip.clear().is_none());
        assert_eq!(step(&mut chip, faults::OK, 5001.0), None);
        assert_eq!(step(&mut chip, faults::LINK_DOWN, 5002.0).unwrap().to.state, ChipState::Failed);
    }

    #[test]
    fn onsets_outside_the_window_do_not_quarantine() {
        let table = FaultTable::default();
        let policy = HealthPolicy { flap_limit: 3, flap_window: secs(60.0), ..HealthPolicy::default() };
        let mut chip = ChipHealth::new(policy);
        for (n, t) in [0.0, 100.0, 200.0, 300.0].into_iter().enumerate() {
            let beat = n as u64 * 2;
            let t1 = chip.observe(Ok(&with_code(beat, faults::LINK_DOWN)), secs(t), &table).unwrap();
            assert_eq!(t1.to.state, ChipState::Failed);
            chip.observe(Ok(&with_code(beat + 1, faults::OK)), secs(t + 1.0), &table).unwrap();
        }
        assert!(!chip.is_quarantined());
    }

    #[test]
    fn restored_quarantine_survives_healthy_readings() {
        let table = FaultTable::default();
        let mut chip = ChipHealth::new(HealthPolicy::default());
        chip.restore_quarantine("flapping:link-down");
        assert_eq!(chip.observe(Ok(&ChipReading::healthy(1)), secs(0.0), &table), None);
        assert_eq!(chip.verdict().state, ChipState::Quarantined);
    }
}
