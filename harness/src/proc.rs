//! Child processes that cannot outlive their harness: killed (SIGKILL) when their guard
//! drops, and by the kernel when the harness's process dies however it dies (the
//! parent-death signal), so an interrupted test or benchmark leaves no node behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Kills its child when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Starts `c` with the parent-death signal set, its stderr appended to `log` and its
    /// stdout dropped.
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
        c.stdout(Stdio::null()).stderr(log);
        let c = std::mem::replace(c, Command::new("true"));
        Ok(ChildGuard(spawn_from_keeper(c)?))
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

/// A spawn request for the keeper thread, and where its child goes.
type Job = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `c` from one thread that lives as long as this process. The kernel sends the
/// parent-death signal when the *thread* that forked a child exits, and tests start nodes
/// from threads that end before the node should (tokio's blocking pool, helper threads):
/// forked from the keeper, a child dies exactly when the process does.
fn spawn_from_keeper(c: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut c, reply) in rx {
                    let _ = reply.send(c.spawn());
                }
            })
            .expect("the harness's spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((c, tx))
        .map_err(|_| std::io::Error::other("the harness's spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the harness's spawner thread is gone"))?
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
