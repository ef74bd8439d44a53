//! Child processes that cannot outlive their harness: killed (SIGKILL) when their guard
//! drops, and by the kernel when the thread that started them dies however it dies (the
//! parent-death signal), so an interrupted test or benchmark leaves no node behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Kills its child when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Starts `c` with the parent-death signal set, its stderr appended to `log` and its
    /// stdout dropped. The kernel kills it when the thread that started it exits: start it
    /// from the thread that owns the guard (a test's own, or a benchmark's main thread).
    #[allow(unsafe_code)] // prctl in pre_exec, SAFETY below
    pub fn spawn(c: &mut Command, log: &Path) -> std::io::Result<ChildGuard> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(ChildGuard(c.stdout(Stdio::null()).stderr(log).spawn()?))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Kills the process with SIGKILL (no goodbye to its peers) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The log filter of every Beacon process the harness starts: `BEACON_BENCH_LOG`, else
/// `info`.
pub fn log_filter() -> String {
    std::env::var("BEACON_BENCH_LOG").unwrap_or_else(|_| "info".into())
}
