//! The simulated ASIC: chips that live in a [`crate::probe::DirProbe`] directory.
//!
//! `ninelives agent run --simulate N` creates N chip directories and advances their heartbeats;
//! `ninelives agent inject --chips-dir DIR CHIP FAULT` (or [`inject`]) changes their files the way a
//! faulty chip would. Because the simulator only writes the documented files, the agent under test
//! runs exactly the code that reads real hardware.
//!
//! A hung chip is marked by a `sim_hang` file in its directory: the simulator stops advancing its
//! heartbeat while the file exists.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::faults;
use crate::probe::write_value;

/// A fault (or the recovery from all faults) injected into a simulated chip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Uncorrectable HBM ECC error.
    HbmEcc,
    /// A link is down.
    LinkDown,
    /// The chip hangs: its heartbeat stops.
    Hang,
    /// Temperature far over the threshold.
    OverTemperature,
    /// Sub-health: the chip runs slow.
    Slow,
    /// A burst of correctable errors (adds 1,000 to the counter).
    CorrectableBurst,
    /// A host-level fault that isolates the whole node.
    HostFault,
    /// Any vendor code, e.g. one the fault table does not know.
    Code(String),
    /// Every fault cleared: `ok`, normal temperature, heartbeat advancing, online.
    Recover,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ecc" | "hbm-ecc" => Fault::HbmEcc,
            "link-down" => Fault::LinkDown,
            "hang" => Fault::Hang,
            "over-temp" | "over-temperature" => Fault::OverTemperature,
            "slow" => Fault::Slow,
            "ce-burst" => Fault::CorrectableBurst,
            "host-fault" => Fault::HostFault,
            "recover" => Fault::Recover,
            other => match other.strip_prefix("code=") {
                Some(code) if !code.is_empty() && !code.chars().any(char::is_whitespace) => {
                    Fault::Code(code.to_string())
                }
                _ => {
                    return Err(format!(
                        "unknown fault {other:?}; expected one of ecc, link-down, hang, over-temp, slow, \
                         ce-burst, host-fault, recover, code=<vendor-code>"
                    ));
                }
            },
        })
    }
}

/// Normal operating temperature of a simulated chip.
pub const NORMAL_TEMPERATURE_C: f64 = 45.0;

/// N simulated chips in a directory.
#[derive(Clone, Debug)]
pub struct SimulatedAsic {
    dir: PathBuf,
    count: u32,
}

impl SimulatedAsic {
    /// Creates (or resets) `count` healthy chips under `dir`.
    pub fn create(dir: &Path, count: u32) -> std::io::Result<Self> {
        for index in 0..count {
            let chip = dir.join(index.to_string());
            std::fs::create_dir_all(&chip)?;
            let _ = std::fs::remove_file(chip.join("sim_hang"));
            write_value(&chip, "error_code", faults::OK)?;
            write_value(&chip, "temperature_c", &NORMAL_TEMPERATURE_C.to_string())?;
            write_value(&chip, "heartbeat", "0")?;
            write_value(&chip, "correctable_errors", "0")?;
            write_value(&chip, "state", "online")?;
        }
        Ok(Self { dir: dir.to_path_buf(), count })
    }

    /// Advances the heartbeat of every chip that is not hung.
    pub fn tick(&self) -> std::io::Result<()> {
        for index in 0..self.count {
            let chip = self.dir.join(index.to_string());
            if chip.join("sim_hang").exists() {
                continue;
            }
            let beat: u64 = std::fs::read_to_string(chip.join("heartbeat"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            // The file may hold anything a test or an operator wrote; a counter wraps.
            write_value(&chip, "heartbeat", &beat.wrapping_add(1).to_string())?;
        }
        Ok(())
    }
}

/// Injects `fault` into chip `index` under `dir` (the chip must exist).
pub fn inject(dir: &Path, index: u32, fault: &Fault) -> std::io::Result<()> {
    let chip = dir.join(index.to_string());
    if !chip.join("error_code").exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no chip {index} under {} (is the agent running with --simulate?)", dir.display()),
        ));
    }
    match fault {
        Fault::HbmEcc => write_value(&chip, "error_code", faults::HBM_ECC_UNCORRECTABLE),
        Fault::LinkDown => write_value(&chip, "error_code", faults::LINK_DOWN),
        Fault::Slow => write_value(&chip, "error_code", faults::SUBHEALTH_SLOW),
        Fault::HostFault => write_value(&chip, "error_code", faults::HOST_FAULT),
        Fault::Code(code) => write_value(&chip, "error_code", code),
        Fault::Hang => std::fs::write(chip.join("sim_hang"), ""),
        Fault::OverTemperature => write_value(&chip, "temperature_c", "110"),
        Fault::CorrectableBurst => {
            let count: u64 = std::fs::read_to_string(chip.join("correctable_errors"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            write_value(&chip, "correctable_errors", &count.saturating_add(1000).to_string())
        }
        Fault::Recover => {
            match std::fs::remove_file(chip.join("sim_hang")) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            write_value(&chip, "error_code", faults::OK)?;
            write_value(&chip, "temperature_c", &NORMAL_TEMPERATURE_C.to_string())?;
            write_value(&chip, "state", "online")
        }
    }
}

/// Asks the agent to lift chip `index`'s quarantine (creates its `clear` file).
pub fn request_clear(dir: &Path, index: u32) -> std::io::Result<()> {
    std::fs::write(dir.join(index.to_string()).join("clear"), "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ChipProbe, DirProbe};

    #[test]
    fn injected_faults_show_in_probe_readings() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimulatedAsic::create(tmp.path(), 4).unwrap();
        let probe = DirProbe::new(tmp.path());
        assert_eq!(probe.discover().unwrap(), vec![0, 1, 2, 3]);
        sim.tick().unwrap();
        assert_eq!(probe.read(2).unwrap().heartbeat, Some(1));

        inject(tmp.path(), 0, &Fault::HbmEcc).unwrap();
        inject(tmp.path(), 1, &Fault::Hang).unwrap();
        inject(tmp.path(), 2, &Fault::OverTemperature).unwrap();
        inject(tmp.path(), 3, &Fault::CorrectableBurst).unwrap();
        sim.tick().unwrap();
        assert_eq!(probe.read(0).unwrap().error_code, faults::HBM_ECC_UNCORRECTABLE);
        assert_eq!(probe.read(1).unwrap().heartbeat, Some(1), "hung chip's heartbeat advanced");
        assert_eq!(probe.read(2).unwrap().temperature_c, Some(110.0));
        assert_eq!(probe.read(3).unwrap().correctable_errors, Some(1000));

        inject(tmp.path(), 1, &Fault::Recover).unwrap();
        sim.tick().unwrap();
        assert_eq!(probe.read(1).unwrap().heartbeat, Some(2));
        assert!(inject(tmp.path(), 9, &Fault::HbmEcc).is_err());
    }

    #[test]
    fn counters_at_their_limit_do_not_overflow() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimulatedAsic::create(tmp.path(), 1).unwrap();
        let probe = DirProbe::new(tmp.path());
        write_value(&probe.chip_dir(0), "heartbeat", &u64::MAX.to_string()).unwrap();
        write_value(&probe.chip_dir(0), "correctable_errors", &u64::MAX.to_string()).unwrap();
        sim.tick().unwrap();
        inject(tmp.path(), 0, &Fault::CorrectableBurst).unwrap();
        let reading = probe.read(0).unwrap();
        assert_eq!((reading.heartbeat, reading.correctable_errors), (Some(0), Some(u64::MAX)));
    }

    #[test]
    fn fault_names_parse() {
        assert_eq!("ecc".parse(), Ok(Fault::HbmEcc));
        assert_eq!("code=vendor-0x1".parse(), Ok(Fault::Code("vendor-0x1".into())));
        assert!("code=".parse::<Fault>().is_err());
        assert!("meltdown".parse::<Fault>().is_err());
    }
}
