//! Pull throughput of a large model blob from a loopback `docker-registry`, against
//! `skopeo copy` and `curl` of the same artifact measured in the same run, reported as
//! ratios. Not a test: run with `ops/bench-pull.sh` (release build).
//!
//! `BEACON_BENCH_PULL_MIB` sets the blob size (default 1024), `BEACON_BENCH_RUNS` the
//! repetitions per tool (default 3; the median counts).

use std::process::Command;
use std::time::Instant;

use beacon_harness::{NodeCli, Registry, sha256_file};
use beacon_proto::gguf::{TensorInfo, Value, write_header};

fn main() {
    let mib: usize = std::env::var("BEACON_BENCH_PULL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("BEACON_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();

    let gguf = work.path().join("big.gguf");
    let digest = big_gguf(&gguf, mib);
    let reference = format!("{}/bench/big:1", registry.host());
    NodeCli::new().ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        "--push",
        &reference,
    ]);
    println!(
        "blob: {mib} MiB, {runs} runs per tool, loopback docker-registry {}",
        registry.host()
    );

    let beacon = median(runs, || {
        let node = NodeCli::new();
        let t = Instant::now();
        node.ok(&["model", "pull", &reference]);
        let s = t.elapsed().as_secs_f64();
        assert_eq!(
            sha256_file(&node.store().join("blobs/sha256").join(&digest)),
            digest
        );
        s
    });
    let skopeo = median(runs, || {
        let dest = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let st = Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--src-tls-verify=false",
                &format!("docker://{reference}"),
            ])
            .arg(format!("dir:{}", dest.path().join("img").display()))
            .status()
            .expect("skopeo (Debian package) is needed: run ops/setup.sh");
        assert!(st.success());
        t.elapsed().as_secs_f64()
    });
    let curl = median(runs, || {
        let dest = tempfile::NamedTempFile::new().unwrap();
        let t = Instant::now();
        let st = Command::new("curl")
            .args(["-sf", "-o"])
            .arg(dest.path())
            .arg(format!(
                "http://{}/v2/bench/big/blobs/sha256:{digest}",
                registry.host()
            ))
            .status()
            .unwrap();
        assert!(st.success());
        t.elapsed().as_secs_f64()
    });
    print_table(mib, beacon, skopeo, curl);
    let json = serde_json::json!({
        "blob_mib": mib, "runs": runs,
        "seconds": {"beacon": beacon, "skopeo": skopeo, "curl": curl},
        "ratio_vs_skopeo": skopeo / beacon, "ratio_vs_curl": curl / beacon,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("pull.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}

/// Writes a valid GGUF header followed by `mib` MiB of incompressible pseudo-random bytes
/// to `gguf`; returns its digest.
fn big_gguf(gguf: &std::path::Path, mib: usize) -> String {
    let mut bytes = write_header(
        &[
            ("general.architecture".into(), Value::Str("llama".into())),
            ("general.file_type".into(), Value::U32(7)),
        ],
        &[TensorInfo {
            name: "w".into(),
            dims: vec![(mib as u64) << 20],
            ggml_type: 24,
            offset: 0,
        }],
    );
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    bytes.reserve(mib << 20);
    for _ in 0..(mib << 17) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(gguf, &bytes).unwrap();
    sha256_file(gguf)
}

/// The three tools' times and throughputs, and the ratios.
fn print_table(mib: usize, beacon: f64, skopeo: f64, curl: f64) {
    let mbps = |s: f64| mib as f64 / s;
    println!("{:<28} {:>9} {:>10}", "tool", "seconds", "MiB/s");
    println!(
        "{:<28} {:>9.3} {:>10.1}",
        "beacon-node model pull",
        beacon,
        mbps(beacon)
    );
    println!(
        "{:<28} {:>9.3} {:>10.1}",
        "skopeo copy (verifies)",
        skopeo,
        mbps(skopeo)
    );
    println!(
        "{:<28} {:>9.3} {:>10.1}",
        "curl blob (no verification)",
        curl,
        mbps(curl)
    );
    println!("ratio beacon/skopeo throughput: {:.2}x", skopeo / beacon);
    println!("ratio beacon/curl throughput:   {:.2}x", curl / beacon);
}

fn median(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..runs).map(|_| f()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
