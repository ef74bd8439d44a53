//! The workspace's binaries: next to the running executable (`target/<profile>/`, one
//! level up for test and bench executables in `deps/`), else from a directory named by
//! the caller, else from `PATH`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The `beacon-node` and `beacon-router` binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub node: PathBuf,
    pub router: PathBuf,
}

impl Binaries {
    /// From `dir`, else next to this executable, else from `PATH`.
    pub fn find(dir: Option<&Path>) -> anyhow::Result<Binaries> {
        Ok(Binaries {
            node: find(dir, "beacon-node")?,
            router: find(dir, "beacon-router")?,
        })
    }

    /// The ones built alongside the running test (panics when they are not built).
    pub fn built() -> Binaries {
        Binaries {
            node: bin("beacon-node"),
            router: bin("beacon-router"),
        }
    }
}

/// Path of a workspace binary built alongside the tests (`target/<profile>/<name>`);
/// panics when it is not built.
pub fn bin(name: &str) -> PathBuf {
    next_to_exe(name).unwrap_or_else(|| {
        panic!(
            "{name} not built next to the test: run `cargo build --workspace` (ops/test.sh does)"
        )
    })
}

fn next_to_exe(name: &str) -> Option<PathBuf> {
    let here = std::env::current_exe().ok()?;
    let dir = here.parent()?;
    // Test and bench executables live one level down, in `deps/`.
    [dir.to_path_buf(), dir.join("..")]
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find(dir: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(d) = dir {
        let p = d.join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            bail!("{} not found (--bin-dir)", p.display())
        };
    }
    if let Some(p) = next_to_exe(name) {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found next to this executable or on PATH: build the workspace or pass --bin-dir")
        })
}
