//! Chip discovery and raw health readings.
//!
//! [`ChipProbe`] is what the agent polls. [`DirProbe`] reads a sysfs-style directory that real
//! vendor tooling (an `npu-smi`/`hl-smi` exporter, a device plugin sidecar) can feed:
//!
//! ```text
//! <chips-dir>/<index>/              one directory per chip, named by its decimal index
//!     error_code                    current fault code, `ok` when none        (required)
//!     temperature_c                 degrees Celsius, decimal                   (optional)
//!     heartbeat                     counter the chip firmware advances; a counter
//!                                   that stops advancing means the chip hung  (optional)
//!     correctable_errors            cumulative count of corrected ECC errors  (optional)
//!     state                         `online` or `offline`                      (optional)
//!     clear                         created by an operator to lift a quarantine;
//!                                   the agent removes it when it has acted    (optional)
//! ```
//!
//! Each file holds one value and a trailing newline. Writers must replace files atomically
//! (write a temporary file in the same directory, then rename), so a reader never sees half a
//! value. A chip directory that disappears or holds unparsable values is reported as
//! [`crate::faults::PROBE_UNREADABLE`] (isolated), never silently treated as healthy.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// One raw reading of a chip.
#[derive(Clone, Debug, PartialEq)]
pub struct ChipReading {
    /// The vendor fault code, [`crate::faults::OK`] when none.
    pub error_code: String,
    /// Temperature in degrees Celsius, when reported.
    pub temperature_c: Option<f64>,
    /// Firmware heartbeat counter, when reported.
    pub heartbeat: Option<u64>,
    /// Cumulative corrected-error count, when reported.
    pub correctable_errors: Option<u64>,
    /// False when the vendor reports the chip offline.
    pub online: bool,
}

impl ChipReading {
    /// A reading of a healthy chip with heartbeat `beat`.
    pub fn healthy(beat: u64) -> Self {
        Self {
            error_code: crate::faults::OK.to_string(),
            temperature_c: Some(45.0),
            heartbeat: Some(beat),
            correctable_errors: Some(0),
            online: true,
        }
    }
}

/// Why a chip could not be read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("chip {index}: {reason}")]
pub struct ProbeError {
    /// The chip index.
    pub index: u32,
    /// What went wrong.
    pub reason: String,
}

/// Source of chip readings on one node.
pub trait ChipProbe: Send + Sync {
    /// Indices of the chips present, sorted.
    fn discover(&self) -> Result<Vec<u32>, ProbeError>;

    /// Reads one chip.
    fn read(&self, index: u32) -> Result<ChipReading, ProbeError>;

    /// Whether an operator asked to lift the chip's quarantine; consumes the request.
    fn take_clear_request(&self, index: u32) -> bool;
}

/// The sysfs-style directory backend (layout in the module docs).
#[derive(Clone, Debug)]
pub struct DirProbe {
    dir: PathBuf,
}

impl DirProbe {
    /// A probe over `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory of chip `index`.
    pub fn chip_dir(&self, index: u32) -> PathBuf {
        self.dir.join(index.to_string())
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_value(dir: &Path, file: &str) -> Result<Option<String>, String> {
    match std::fs::read_to_string(dir.join(file)) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{file}: {e}")),
    }
}

fn parse_opt<T: std::str::FromStr>(dir: &Path, file: &str) -> Result<Option<T>, String> {
    match read_value(dir, file)? {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| format!("{file}: not a number: {text:?}")),
    }
}

impl ChipProbe for DirProbe {
    fn discover(&self) -> Result<Vec<u32>, ProbeError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| ProbeError { index: 0, reason: format!("{}: {e}", self.dir.display()) })?;
        let mut chips: Vec<u32> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse().ok()))
            .collect();
        chips.sort_unstable();
        Ok(chips)
    }

    fn read(&self, index: u32) -> Result<ChipReading, ProbeError> {
        let dir = self.chip_dir(index);
        let fail = |reason: String| ProbeError { index, reason };
        let error_code = read_value(&dir, "error_code")
            .map_err(fail)?
            .ok_or_else(|| ProbeError { index, reason: format!("{}/error_code missing", dir.display()) })?;
        if error_code.is_empty() || error_code.len() > 128 || error_code.chars().any(char::is_whitespace) {
            return Err(ProbeError { index, reason: format!("error_code: malformed {error_code:?}") });
        }
        let online = match read_value(&dir, "state").map_err(fail)?.as_deref() {
            None | Some("online") => true,
            Some("offline") => false,
            Some(other) => return Err(ProbeError { index, reason: format!("state: unknown {other:?}") }),
        };
        // `NaN` and `inf` parse as f64 but are no temperature: a NaN would never trip the
        // over-temperature threshold, so it is unreadable, not healthy.
        let temperature_c: Option<f64> = parse_opt(&dir, "temperature_c").map_err(fail)?;
        if let Some(t) = temperature_c.filter(|t| !t.is_finite()) {
            return Err(ProbeError { index, reason: format!("temperature_c: not a finite number: {t}") });
        }
        Ok(ChipReading {
            error_code,
            temperature_c,
            heartbeat: parse_opt(&dir, "heartbeat").map_err(fail)?,
            correctable_errors: parse_opt(&dir, "correctable_errors").map_err(fail)?,
            online,
        })
    }

    fn take_clear_request(&self, index: u32) -> bool {
        std::fs::remove_file(self.chip_dir(index).join("clear")).is_ok()
    }
}

/// Replaces `dir/file` atomically with `value` and a newline.
pub fn write_value(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, format!("{value}\n"))?;
    std::fs::rename(tmp, dir.join(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = DirProbe::new(tmp.path());
        for i in [0u32, 1, 10] {
            std::fs::create_dir(probe.chip_dir(i)).unwrap();
            write_value(&probe.chip_dir(i), "error_code", "ok").unwrap();
        }
        std::fs::create_dir(tmp.path().join("not-a-chip")).unwrap();
        assert_eq!(probe.discover().unwrap(), vec![0, 1, 10]);

        let d = probe.chip_dir(1);
        write_value(&d, "error_code", "link-down").unwrap();
        write_value(&d, "temperature_c", "71.5").unwrap();
        write_value(&d, "heartbeat", "42").unwrap();
        write_value(&d, "correctable_errors", "3").unwrap();
        write_value(&d, "state", "offline").unwrap();
        let r = probe.read(1).unwrap();
        assert_eq!(r.error_code, "link-down");
        assert_eq!(
            (r.temperature_c, r.heartbeat, r.correctable_errors, r.online),
            (Some(71.5), Some(42), Some(3), false)
        );

        let minimal = probe.read(0).unwrap();
        assert_eq!((minimal.heartbeat, minimal.online), (None, true));
    }

    #[test]
    fn unreadable_chips_are_errors_not_healthy() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = DirProbe::new(tmp.path());
        assert!(probe.read(3).is_err(), "missing chip dir");
        std::fs::create_dir(probe.chip_dir(3)).unwrap();
        assert!(probe.read(3).is_err(), "missing error_code");
        write_value(&probe.chip_dir(3), "error_code", "ok").unwrap();
        write_value(&probe.chip_dir(3), "heartbeat", "many").unwrap();
        assert!(probe.read(3).is_err(), "non-numeric heartbeat");
        write_value(&probe.chip_dir(3), "heartbeat", "1").unwrap();
        write_value(&probe.chip_dir(3), "error_code", "two words").unwrap();
        assert!(probe.read(3).is_err(), "malformed code");
        write_value(&probe.chip_dir(3), "error_code", "ok").unwrap();
        for bad in ["NaN", "inf", "-inf"] {
            write_value(&probe.chip_dir(3), "temperature_c", bad).unwrap();
            assert!(probe.read(3).is_err(), "temperature {bad}");
        }
        write_value(&probe.chip_dir(3), "temperature_c", "-5.5").unwrap();
        assert_eq!(probe.read(3).unwrap().temperature_c, Some(-5.5));
    }

    #[test]
    fn clear_requests_are_consumed_once() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = DirProbe::new(tmp.path());
        std::fs::create_dir(probe.chip_dir(0)).unwrap();
        assert!(!probe.take_clear_request(0));
        std::fs::write(probe.chip_dir(0).join("clear"), "").unwrap();
        assert!(probe.take_clear_request(0));
        assert!(!probe.take_clear_request(0));
    }
}
