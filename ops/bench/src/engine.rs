//! The engine alone: `beacon-node` serving the test model off the network against llama.cpp's
//! own `llama-server`, same model, same parallel sequences, context per sequence and
//! threads, measured in the same run with the same client. Both run on loopback in this
//! namespace, one at a time under load.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cluster::{Binaries, Proc, tail};
use crate::http::wait_for_http;
use crate::load::{Load, MODEL, Target, run_load};
use crate::suite::question;

/// Context per sequence, both servers.
const CTX_PER_SEQUENCE: usize = 2048;

#[derive(Debug, Default, Serialize)]
pub struct EngineResult {
    /// The llama-server binary measured against.
    pub llama_server: String,
    pub parallel: usize,
    pub threads: usize,
    pub max_tokens: u32,
    pub levels: Vec<EngineLevel>,
}

#[derive(Debug, Default, Serialize)]
pub struct EngineLevel {
    pub concurrency: usize,
    pub beacon: Load,
    pub llama_server: Load,
}

impl EngineLevel {
    /// beacon-node's throughput per llama-server's.
    pub fn ratio(&self) -> f64 {
        self.beacon.tokens_per_second / self.llama_server.tokens_per_second.max(1e-9)
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// llama-server with `parallel` sequences of `CTX_PER_SEQUENCE` tokens, once its health
/// says ok.
fn start_llama_server(
    llama_server: &Path,
    model: &Path,
    parallel: usize,
    p: &str,
    t: &str,
    dir: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let llama_addr = free_addr()?;
    let llama_log = dir.join("llama-server.log");
    let total_ctx = (parallel * CTX_PER_SEQUENCE).to_string();
    let llama = Proc::spawn(
        Command::new(llama_server)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(llama_addr.port().to_string())
            .args(["-np", p, "-c", &total_ctx, "-t", t, "-tb", t, "--no-webui"]),
        &llama_log,
    )
    .with_context(|| format!("starting {}", llama_server.display()))?;
    // llama-server answers 503 while it loads: wait for its health to say ok.
    let healthy = (0..240).any(|_| {
        let ok = crate::http::http("GET", &format!("http://{llama_addr}/health"), None, &[]).status
            == 200;
        if !ok {
            std::thread::sleep(Duration::from_millis(500));
        }
        ok
    });
    if !healthy {
        let log = std::fs::read_to_string(&llama_log).unwrap_or_default();
        bail!("llama-server did not become healthy:\n{}", tail(&log, 20));
    }
    Ok((llama, llama_addr))
}

/// Measures both servers at each concurrency in `levels`, `per_client` requests per client
/// (at least 6), alternating which goes first.
#[allow(clippy::too_many_arguments)]
pub fn run(
    bins: &Binaries,
    llama_server: &Path,
    model: &Path,
    parallel: usize,
    threads: usize,
    levels: &[usize],
    per_client: usize,
    max_tokens: u32,
    say: &dyn Fn(&str),
) -> anyhow::Result<EngineResult> {
    let data = tempfile::Builder::new()
        .prefix("beacon-bench-engine")
        .tempdir()?;
    let node_cmd = || {
        let mut c = Command::new(&bins.node);
        c.env("BEACON_DATA_DIR", data.path())
            .env("DOCKER_CONFIG", data.path().join("docker"))
            .env("BEACON_LOG", "warn")
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("BEACON_FAULT");
        c
    };
    let out = node_cmd()
        .args(["model", "package", "--gguf"])
        .arg(model)
        .arg(MODEL)
        .output()
        .context("running beacon-node model package")?;
    if !out.status.success() {
        bail!("packaging: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (p, t, ctx) = (
        parallel.to_string(),
        threads.to_string(),
        CTX_PER_SEQUENCE.to_string(),
    );
    let node_addr = free_addr()?;
    let node_log = data.path().join("engine-node.log");
    let _node = Proc::spawn(
        node_cmd()
            .args(["serve", "--no-network", "--keep-alive=-1", "--listen"])
            .arg(node_addr.to_string())
            .args(["--parallel", &p, "--ctx-size", &ctx, "--threads", &t]),
        &node_log,
    )
    .context("starting beacon-node")?;
    let (_llama, llama_addr) =
        start_llama_server(llama_server, model, parallel, &p, &t, data.path())?;
    if !wait_for_http(node_addr, "/healthz", Duration::from_secs(60)) {
        let log = std::fs::read_to_string(&node_log).unwrap_or_default();
        bail!("beacon-node did not start:\n{}", tail(&log, 20));
    }
    let targets = [
        Target {
            name: "beacon-node",
            base: format!("http://{node_addr}"),
            pid: 0,
        },
        Target {
            name: "llama-server",
            base: format!("http://{llama_addr}"),
            pid: 0,
        },
    ];
    for t in &targets {
        let _ = run_load(t, 2, 4, question, 8);
    }
    let mut out = EngineResult {
        llama_server: llama_server.display().to_string(),
        parallel,
        threads,
        max_tokens,
        levels: Vec::new(),
    };
    for (k, &c) in levels.iter().enumerate() {
        let n = (per_client * c).max(6);
        let (beacon, llama) = if k % 2 == 0 {
            let b = run_load(&targets[0], c, n, question, max_tokens);
            (b, run_load(&targets[1], c, n, question, max_tokens))
        } else {
            let l = run_load(&targets[1], c, n, question, max_tokens);
            (run_load(&targets[0], c, n, question, max_tokens), l)
        };
        let level = EngineLevel {
            concurrency: c,
            beacon,
            llama_server: llama,
        };
        say(&format!(
            "engine c={c}: beacon-node {:.1} tok/s, llama-server {:.1} tok/s ({:.2}x)",
            level.beacon.tokens_per_second,
            level.llama_server.tokens_per_second,
            level.ratio()
        ));
        out.levels.push(level);
    }
    Ok(out)
}
