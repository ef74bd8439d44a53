//! The engine alone: `beacon-node` serving the test model off the network against llama.cpp's
//! own `llama-server`, same model, same parallel sequences, context per sequence and
//! threads, measured in the same run with the same client. Both run on loopback in this
//! namespace, one at a time under load.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde::Serialize;

use super::{Check, Section, question};
use crate::chart::{Svg, err, legend, line};
use beacon_harness::load::{Load, Target, run_load};
use beacon_harness::node::{NodeCli, NodeServer, Serve};
use beacon_harness::proc::{ChildGuard, tail};
use beacon_harness::{Binaries, TEST_MODEL_REF};

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
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let llama_addr = free_addr()?;
    let llama_log = dir.join("llama-server.log");
    let total_ctx = (parallel * CTX_PER_SEQUENCE).to_string();
    let llama = ChildGuard::spawn(
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
        let ok = beacon_harness::http("GET", &format!("http://{llama_addr}/health"), None, &[])
            .status
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
    let cli = NodeCli::with_program(bins.node.clone());
    cli.package(model, TEST_MODEL_REF)?;
    let (p, t, ctx) = (
        parallel.to_string(),
        threads.to_string(),
        CTX_PER_SEQUENCE.to_string(),
    );
    let node = NodeServer::launch(
        cli,
        Serve {
            wait: Duration::from_secs(60),
            env: vec![("BEACON_LOG".into(), "warn".into())],
            ..Serve::loopback(&[
                "--no-network",
                "--keep-alive=-1",
                "--parallel",
                &p,
                "--ctx-size",
                &ctx,
                "--threads",
                &t,
            ])
        },
    )?;
    let node_addr = node.addr;
    let (_llama, llama_addr) =
        start_llama_server(llama_server, model, parallel, &p, &t, node.cli.data.path())?;
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

pub fn checks(e: &EngineResult) -> Vec<Check> {
    let errors: usize = e
        .levels
        .iter()
        .map(|l| l.beacon.errors + l.llama_server.errors)
        .sum();
    vec![Check::new(
        "engine answered every request",
        errors == 0,
        format!("{errors} requests failed (both servers)"),
    )]
}

pub fn render(e: &EngineResult) -> Section {
    Section::new(|m| markdown(m, e), Some(("engine.svg", figure(e))))
}

fn markdown(m: &mut String, e: &EngineResult) {
    let _ = writeln!(
        m,
        "\n## Engine\n\nbeacon-node off the network against llama.cpp's own server (`{}`), same \
         model, {} parallel sequences, {} threads, {}-token answers, one server under load at a \
         time, same client.\n",
        e.llama_server, e.parallel, e.threads, e.max_tokens
    );
    let _ = writeln!(
        m,
        "| concurrency | beacon-node tok/s | llama-server tok/s | ratio | beacon-node p50 / p99 ms | llama-server p50 / p99 ms | errors |\n|---|---|---|---|---|---|---|"
    );
    for l in &e.levels {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {:.1} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {} / {} |",
            l.concurrency,
            l.beacon.tokens_per_second,
            l.llama_server.tokens_per_second,
            l.ratio(),
            l.beacon.p50_ms,
            l.beacon.p99_ms,
            l.llama_server.p50_ms,
            l.llama_server.p99_ms,
            l.beacon.errors,
            l.llama_server.errors
        );
    }
    let _ = writeln!(m, "\n![engine throughput](engine.svg)");
}

fn figure(e: &EngineResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (600, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let max_c = e.levels.iter().map(|l| l.concurrency).max().unwrap_or(1) as f64;
        let pts = |f: &dyn Fn(&EngineLevel) -> f64| -> Vec<(f64, f64)> {
            e.levels
                .iter()
                .map(|l| (l.concurrency as f64, f(l)))
                .collect()
        };
        let beacon = pts(&|l| l.beacon.tokens_per_second);
        let llama = pts(&|l| l.llama_server.tokens_per_second);
        let top = beacon.iter().chain(&llama).map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption("Engine throughput", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.5..max_c + 0.5, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .y_desc("tokens/s")
            .draw()
            .map_err(err)?;
        line(&mut chart, "beacon-node", &beacon, RED)?;
        line(&mut chart, "llama-server (baseline)", &llama, BLUE)?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(err)?;
    }
    Ok(s)
}
