//! Who may publish a job's generations: the writer record at
//! [`JobKeys::writer`](crate::keyspace::JobKeys::writer).
//!
//! A driver (an operator leader, a demo driver) claims the job with its leadership *epoch*
//! before it publishes anything, and every publication compares the record it claimed. A newer
//! leader claims a higher epoch, so a paused or deposed driver's transactions all fail: it can
//! never overwrite what its successor wrote, whatever it read before it was paused.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::keyspace::MalformedValue;

/// The value at [`JobKeys::writer`](crate::keyspace::JobKeys::writer).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WriterRecord {
    /// The driver's identity (operator pod name, `demo-<pid>`), for humans reading etcd.
    pub holder: String,
    /// The driver's leadership epoch: strictly higher for every later leadership term.
    pub epoch: u64,
}

/// What a claim finds in the writer key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No writer yet, or an older epoch: take it.
    Take,
    /// This writer holds it already (a driver restarted within the same term).
    Held,
    /// A writer of this epoch or newer holds it: this one is deposed.
    Refused,
}

/// The epoch of a driver that starts at `since_unix_epoch` without an election (the demo
/// driver): its start time in microseconds, so a later process supersedes an earlier one. The
/// operator's epochs (`ninelives_operator::leader::lease_epoch`) are on
/// the same scale (a Lease's creation second × 10⁶ plus its transitions).
pub fn epoch_at(since_unix_epoch: std::time::Duration) -> u64 {
    u64::try_from(since_unix_epoch.as_micros()).unwrap_or(u64::MAX)
}

impl WriterRecord {
    /// A writer `holder` at `epoch`.
    pub fn new(holder: impl Into<String>, epoch: u64) -> Self {
        Self { holder: holder.into(), epoch }
    }

    /// Parses a writer value read from etcd.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, MalformedValue> {
        serde_json::from_slice(bytes)
            .map_err(|e| MalformedValue { key: key.to_string(), reason: e.to_string() })
    }

    /// The JSON written at the key. Publications compare these exact bytes.
    pub fn to_json(&self) -> String {
        // A struct of a string and an integer always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What claiming the key does when it holds `current` (`None`: absent). Equal epochs of two
    /// holders are refused: epochs come from one leadership counter, so that is a misconfiguration,
    /// and refusing keeps the first writer.
    pub fn claim_over(&self, current: Option<&WriterRecord>) -> Claim {
        match current {
            None => Claim::Take,
            Some(c) if c == self => Claim::Held,
            Some(c) if c.epoch < self.epoch => Claim::Take,
            Some(_) => Claim::Refused,
        }
    }
}

impl fmt::Display for WriterRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at epoch {}", self.holder, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_older_epoch_is_taken_over() {
        let me = WriterRecord::new("op-b", 7);
        assert_eq!(me.claim_over(None), Claim::Take);
        assert_eq!(me.claim_over(Some(&WriterRecord::new("op-a", 6))), Claim::Take);
        assert_eq!(me.claim_over(Some(&me.clone())), Claim::Held);
        assert_eq!(me.claim_over(Some(&WriterRecord::new("op-a", 7))), Claim::Refused);
        assert_eq!(me.claim_over(Some(&WriterRecord::new("op-a", 8))), Claim::Refused);
        assert_eq!(me.claim_over(Some(&WriterRecord::new("op-b", 8))), Claim::Refused);
    }

    #[test]
    fn a_later_start_is_a_higher_epoch() {
        use std::time::Duration;
        assert_eq!(epoch_at(Duration::from_secs(1_800_000_000)), 1_800_000_000_000_000);
        assert!(epoch_at(Duration::from_micros(5)) < epoch_at(Duration::from_micros(6)));
    }

    #[test]
    fn the_record_round_trips_and_malformed_values_are_errors() {
        let me = WriterRecord::new("op-b", 7);
        assert_eq!(me.to_json(), r#"{"holder":"op-b","epoch":7}"#);
        assert_eq!(WriterRecord::parse("k", me.to_json().as_bytes()), Ok(me));
        for bad in [&b"{}"[..], br#"{"holder":"a","epoch":-1}"#, b"\xff", b""] {
            assert!(WriterRecord::parse("k", bad).is_err());
        }
    }
}
