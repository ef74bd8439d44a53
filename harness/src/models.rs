//! The real models the harness serves, and the names they are packaged under.

use std::path::PathBuf;

/// The name the test model is packaged under (every node the harness starts, and the
/// cluster's providers).
pub const TEST_MODEL_REF: &str = "ai/smollm2:test";

/// The name the supervisor model is packaged under by [`crate::NodeServer::supervisor`].
pub const SUPERVISOR_MODEL_REF: &str = "ai/smollm2:supervisor";

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `ops/setup.sh` caches (`BEACON_TEST_MODEL`
/// when set). Tests that need it fail (never skip) when it is missing.
pub fn test_model() -> PathBuf {
    let path = default_test_model();
    assert!(
        path.is_file(),
        "test model {} missing: run ops/setup.sh (or set BEACON_TEST_MODEL)",
        path.display()
    );
    path
}

/// Where the test model is expected, whether or not it is there.
pub fn default_test_model() -> PathBuf {
    std::env::var_os("BEACON_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("BEACON_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .unwrap_or_default()
                        .join(".cache/beacon")
                });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// The MinionS tests' supervisor: `BEACON_SUPERVISOR_MODEL` when set, else the test model
/// itself, SmolLM2-135M-Instruct (the one instruction-tuned GGUF the package registries
/// offer at a size two CPU cores run; a pretrained model continues text instead of
/// following a supervisor's instructions).
pub fn supervisor_model() -> PathBuf {
    match std::env::var_os("BEACON_SUPERVISOR_MODEL") {
        Some(p) if !p.is_empty() => {
            let path = PathBuf::from(p);
            assert!(
                path.is_file(),
                "supervisor model {} (BEACON_SUPERVISOR_MODEL) missing",
                path.display()
            );
            path
        }
        _ => test_model(),
    }
}
