//! Shared helpers for Beacon's end-to-end tests: locating the built binaries and the test
//! model, and starting real processes that are stopped when their guard drops.

use std::path::PathBuf;

/// Path of a workspace binary built alongside the tests (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop(); // test binary name
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
