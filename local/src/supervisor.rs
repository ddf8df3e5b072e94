//! Child processes that cannot outlive the run.
//!
//! Every child starts as the leader of its own process group (`setpgid(0, 0)` through
//! [`CommandExt::process_group`]), so a signal to the group reaches the child *and* everything it
//! started (a worker's threads' helpers, a shell's children). The group is killed with SIGKILL on
//! [`Supervisor::kill`], on [`Supervisor::shutdown`] and when the supervisor is dropped — also
//! while unwinding from a panic. Because the children are in their own groups, a Ctrl-C in the
//! terminal reaches only the demo process, which then drops its supervisor: the children die
//! with it instead of half of them getting the signal.
//!
//! Not covered: a SIGKILL of the supervising process itself (nothing runs to clean up; the
//! children's etcd leases expire and the temp directories stay). `PR_SET_PDEATHSIG` would cover
//! it but needs `unsafe` in `pre_exec`, which the workspace forbids.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::RuntimeError;

/// Handle of a supervised process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChildId(usize);

struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

/// Owns child processes and their logs (`<log dir>/<name>.log`).
pub struct Supervisor {
    log_dir: PathBuf,
    children: Vec<Supervised>,
}

impl Supervisor {
    /// A supervisor writing child logs into `log_dir` (created if missing).
    pub fn new(log_dir: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let log_dir = log_dir.into();
        std::fs::create_dir_all(&log_dir).map_err(|e| RuntimeError::io(&log_dir, e))?;
        Ok(Self { log_dir, children: Vec::new() })
    }

    /// Where child logs go.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts `command` as `name`, stdout and stderr appended to its log file.
    pub fn spawn(&mut self, name: &str, command: Command) -> Result<ChildId, RuntimeError> {
        let (id, _) = self.start(name, command, false)?;
        Ok(id)
    }

    /// Starts `command` as `name` with stdout piped to the caller (stderr to the log file).
    pub fn spawn_piped(
        &mut self,
        name: &str,
        command: Command,
    ) -> Result<(ChildId, ChildStdout), RuntimeError> {
        let (id, stdout) = self.start(name, command, true)?;
        let stdout = stdout.ok_or_else(|| RuntimeError::Spawn {
            what: name.to_string(),
            program: String::new(),
            source: std::io::Error::other("stdout was not captured"),
        })?;
        Ok((id, stdout))
    }

    fn start(
        &mut self,
        name: &str,
        mut command: Command,
        piped: bool,
    ) -> Result<(ChildId, Option<ChildStdout>), RuntimeError> {
        let log = self.log_dir.join(format!("{}.log", sanitize(name)));
        let file =
            File::options().create(true).append(true).open(&log).map_err(|e| RuntimeError::io(&log, e))?;
        let err = file.try_clone().map_err(|e| RuntimeError::io(&log, e))?;
        command.process_group(0).stdin(Stdio::null()).stderr(err);
        if piped {
            command.stdout(Stdio::piped());
        } else {
            command.stdout(file);
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command.spawn().map_err(|source| RuntimeError::Spawn {
            what: name.to_string(),
            program,
            source,
        })?;
        let stdout = child.stdout.take();
        self.children.push(Supervised { name: name.to_string(), child, log, status: None });
        Ok((ChildId(self.children.len() - 1), stdout))
    }

    fn get(&mut self, id: ChildId) -> Result<&mut Supervised, RuntimeError> {
        self.children.get_mut(id.0).ok_or(RuntimeError::UnknownChild(id.0))
    }

    /// The process id (= its process group id).
    pub fn pid(&self, id: ChildId) -> Option<u32> {
        self.children.get(id.0).map(|s| s.child.id())
    }

    /// The name it was started with.
    pub fn name(&self, id: ChildId) -> Option<&str> {
        self.children.get(id.0).map(|s| s.name.as_str())
    }

    /// Its exit status, once it has exited (reaps it; never blocks).
    pub fn exited(&mut self, id: ChildId) -> Result<Option<ExitStatus>, RuntimeError> {
        let s = self.get(id)?;
        if s.status.is_none() {
            s.status = s.child.try_wait().map_err(|e| RuntimeError::io(&s.log, e))?;
        }
        Ok(s.status)
    }

    /// SIGKILLs the process group and reaps the child (a fault injection, or cleanup).
    pub fn kill(&mut self, id: ChildId) -> Result<(), RuntimeError> {
        let s = self.get(id)?;
        signal_group(&s.child, Signal::SIGKILL);
        if s.status.is_none() {
            s.status = s.child.wait().ok();
        }
        Ok(())
    }

    /// SIGTERMs the process group, waits up to `grace` for the child to exit, then SIGKILLs the
    /// group. Returns the exit status.
    pub fn terminate(&mut self, id: ChildId, grace: Duration) -> Result<Option<ExitStatus>, RuntimeError> {
        let s = self.get(id)?;
        if s.status.is_none() {
            signal_group(&s.child, Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = s.child.try_wait() {
                    s.status = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever the leader did, nothing of its group may stay behind.
        signal_group(&s.child, Signal::SIGKILL);
        if s.status.is_none() {
            s.status = s.child.wait().ok();
        }
        Ok(s.status)
    }

    /// The last `lines` lines of a child's log (for error messages).
    pub fn log_tail(&self, id: ChildId, lines: usize) -> String {
        let Some(s) = self.children.get(id.0) else { return String::new() };
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills every process group and reaps every child. Idempotent.
    pub fn shutdown(&mut self) {
        for s in &mut self.children {
            signal_group(&s.child, Signal::SIGKILL);
        }
        for s in &mut self.children {
            if s.status.is_none() {
                s.status = s.child.wait().ok();
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn signal_group(child: &Child, signal: Signal) {
    let Ok(pid) = i32::try_from(child.id()) else { return };
    // ESRCH: the whole group is gone already, which is the goal.
    match killpg(Pid::from_raw(pid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => eprintln!("warning: cannot signal process group {pid}: {e}"),
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
