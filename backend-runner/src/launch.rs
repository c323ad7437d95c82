//! Starting llama-server so that it dies with the runner, on its own cores.
//!
//! Two things must be set inside the child, after `fork` and before llama-server runs:
//! - `PR_SET_PDEATHSIG = SIGKILL`, so the kernel kills the instance the moment the runner dies,
//!   even by `SIGKILL`, when no cleanup code can run. It survives `exec`.
//! - the CPU affinity mask, before llama-server starts its threads (threads inherit the mask
//!   they are created with, so pinning from outside after the start would miss them).
//!
//! Doing that between `fork` and `exec` takes `CommandExt::pre_exec`, which is `unsafe`, and this
//! workspace forbids unsafe code. Instead the runner starts *itself* as a tiny launcher:
//! `bitnet-runner __exec-instance PARENT_PID CPUS PROGRAM ARGS...`. The launcher is a fresh,
//! single-threaded process, so it can make both calls through safe wrappers and then replace
//! itself with llama-server by `exec` (same pid, same pipes, same process group).
//!
//! A race remains if the runner dies between `fork` and the launcher's `prctl`: the death signal
//! would never come. The launcher closes it by checking, after `prctl`, that its parent is still
//! the runner's pid it was given, and giving up otherwise.
//!
//! The kernel sends the death signal when the *thread* that forked the child exits, not the
//! process; the runner therefore spawns instances only from its main thread (it runs a
//! current-thread runtime).

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::unistd::getppid;

use crate::placement::{format_cpu_list, parse_cpu_list, pin_self};

/// First argument that turns `bitnet-runner` into the launcher. Not a documented flag: only
/// the runner passes it.
pub const EXEC_ARG: &str = "__exec-instance";

/// Placeholder for "no CPU pinning" in the launcher's arguments.
const NO_CPUS: &str = "-";

/// The executable used as the launcher: normally the running `bitnet-runner` itself.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: PathBuf,
}

/// Why the launcher could not become llama-server.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The arguments are not what the runner passes.
    #[error("{EXEC_ARG}: expected PARENT_PID CPUS PROGRAM [ARGS...]")]
    Usage,
    /// The runner died before the death signal was armed.
    #[error("the runner (pid {expected}) is gone; not starting")]
    ParentGone {
        /// The runner's pid.
        expected: i32,
    },
    /// `prctl(PR_SET_PDEATHSIG)` failed.
    #[error("cannot arm the parent-death signal: {0}")]
    DeathSignal(nix::Error),
    /// `sched_setaffinity` failed.
    #[error("cannot pin to cores {cpus}: {source}")]
    Pin {
        /// The cores.
        cpus: String,
        /// Why.
        source: nix::Error,
    },
    /// `exec` failed, e.g. the binary vanished or is not executable.
    #[error("cannot execute {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

// === impl Launcher ===

impl Launcher {
    /// The running executable, through `/proc/self/exe`, which keeps working even when the
    /// file on disk was replaced by an upgrade while the runner runs.
    pub fn this_executable() -> Launcher {
        Launcher {
            program: PathBuf::from("/proc/self/exe"),
        }
    }

    /// A specific `bitnet-runner` binary (for tests that drive the library in-process).
    pub fn at(program: impl Into<PathBuf>) -> Launcher {
        Launcher {
            program: program.into(),
        }
    }

    /// A command that runs `program args` through the launcher, with the parent-death signal
    /// armed for `parent` (this process's pid) and, if given, pinned to `cpus`.
    pub fn command(
        &self,
        parent: u32,
        cpus: Option<&[usize]>,
        program: &Path,
        args: &[OsString],
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg(EXEC_ARG)
            .arg(parent.to_string())
            .arg(cpus.map_or_else(|| NO_CPUS.to_owned(), format_cpu_list))
            .arg(program)
            .args(args);
        cmd
    }
}

/// Runs the launcher with the arguments after [`EXEC_ARG`]. Returns only on failure, after
/// which the process should exit non-zero; on success the process has become llama-server.
pub fn exec_instance(args: &[OsString]) -> LaunchError {
    let [parent, cpus, program, rest @ ..] = args else {
        return LaunchError::Usage;
    };
    let Some(parent) = parent.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        return LaunchError::Usage;
    };
    let cpus = match cpus.to_str() {
        Some(NO_CPUS) => None,
        Some(list) => match parse_cpu_list(list) {
            Some(c) => Some(c),
            None => return LaunchError::Usage,
        },
        None => return LaunchError::Usage,
    };

    if let Err(e) = set_pdeathsig(Signal::SIGKILL) {
        return LaunchError::DeathSignal(e);
    }
    if getppid().as_raw() != parent {
        return LaunchError::ParentGone { expected: parent };
    }
    if let Some(cpus) = cpus {
        if let Err(source) = pin_self(&cpus) {
            return LaunchError::Pin {
                cpus: format_cpu_list(&cpus),
                source,
            };
        }
    }
    let source = std::process::Command::new(program).args(rest).exec();
    LaunchError::Exec {
        program: display(program),
        source,
    }
}

fn display(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}
