//! `beacon-bench`: Beacon's benchmark suite. With no subcommand it runs the workloads in
//! emulated regions on this machine (`--quick` for the smoke test CI runs), or against a
//! deployed router (`--router URL`), and writes a JSON file, a Markdown report and SVG
//! figures. `regions` only brings up emulated regions and holds them until Ctrl-C;
//! `regions --clean` removes what killed runs left.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use beacon_bench::cluster::{Binaries, Cluster, ClusterConfig};
use beacon_bench::engine;
use beacon_bench::load::Target;
use beacon_bench::minions::{self, Corpus, MinionsResult};
use beacon_bench::report::{Machine, Report, Setup};
use beacon_bench::suite::{self, Scale};
use beacon_bench::wan::{Wan, WanConfig, clean_stale};

#[derive(Parser)]
#[command(
    name = "beacon-bench",
    version,
    about = "Beacon's benchmark suite: speed, cost and trust across emulated regions",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Emulated regions on this machine: a network namespace per region, WAN round trips
    /// added in user space. Needs root.
    Regions(RegionsArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The smoke test: two regions, one provider each, short loads (minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Where the report goes (default: bench-results/<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Workloads to run, comma-separated (default: all).
    /// With --router: chat unless minions is named.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Workload>,
    /// Benchmark a deployed router at this base URL instead (chat load only).
    #[arg(long)]
    router: Option<String>,
    /// With --router: a provider node's base URL, called directly as the baseline.
    #[arg(long, requires = "router")]
    direct: Option<String>,
    /// Region names, comma-separated (default: us-east,eu-west,ap-south; --quick: the first two).
    #[arg(long, value_delimiter = ',')]
    regions: Vec<String>,
    /// Round trips in ms between the regions: rows by `;`, columns by `,`.
    #[arg(long)]
    rtt_ms: Option<String>,
    /// The region the router and the clients sit in (default: the first).
    #[arg(long)]
    operator_region: Option<String>,
    /// Honest providers per region.
    #[arg(long, default_value_t = 1)]
    per_region: usize,
    /// llama.cpp threads per provider (default: the cores shared among the providers).
    #[arg(long)]
    threads: Option<usize>,
    /// Parallel sequences per provider.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// The GGUF the providers serve (default: the test model ops/setup.sh caches).
    #[arg(long, env = "BEACON_TEST_MODEL")]
    model: Option<PathBuf>,
    /// Where beacon-node and beacon-router are (default: next to beacon-bench, then PATH).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The GGUF of the MinionS supervisor, served by a local node off the network (default:
    /// the providers' model, SmolLM2-135M-Instruct, as `ops/setup.sh` caches it).
    #[arg(long, env = "BEACON_SUPERVISOR_MODEL")]
    supervisor_model: Option<PathBuf>,
    /// A remote OpenAI-compatible API as the MinionS supervisor instead (its key, if any, in
    /// BEACON_REMOTE_API_KEY).
    #[arg(long, requires = "remote_model")]
    remote_base_url: Option<String>,
    /// The remote API's model.
    #[arg(long, requires = "remote_base_url")]
    remote_model: Option<String>,
    /// llama.cpp's own server: the baseline of the engine workload, which runs only with it
    /// (`ops/bench-inference.sh` builds one from llama.cpp's sources).
    #[arg(long, env = "BEACON_LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
}

#[derive(Args)]
struct RegionsArgs {
    /// Region names, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east,eu-west,ap-south"
    )]
    regions: Vec<String>,
    /// Round trips in milliseconds: rows separated by `;`, columns by `,` (default for the
    /// default regions: 75 ms us-east/eu-west, 190 ms us-east/ap-south, 120 ms eu-west/ap-south).
    #[arg(long)]
    rtt_ms: Option<String>,
    /// The region this machine's own namespace sits in (default: none, no delay).
    #[arg(long)]
    operator_region: Option<String>,
    /// Remove the regions of runs that were killed, then exit.
    #[arg(long)]
    clean: bool,
}

fn parse_matrix(s: &str) -> anyhow::Result<Vec<Vec<f64>>> {
    s.split(';')
        .map(|row| {
            row.split(',')
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .with_context(|| format!("--rtt-ms: {v:?} is not a number"))
                })
                .collect()
        })
        .collect()
}

/// Blocks SIGINT and SIGTERM in every thread (call before any is spawned) and returns a
/// function that waits for one.
#[allow(unsafe_code)] // signal masks through libc, SAFETY below
fn block_signals() -> impl FnOnce() {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use; the mask is set
    // on this thread, which every later thread inherits.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    move || {
        let mut sig = 0;
        // SAFETY: `set` is initialised; sigwait writes one int.
        unsafe { libc::sigwait(&set, &mut sig) };
    }
}

fn regions(a: RegionsArgs) -> anyhow::Result<()> {
    if a.clean {
        let n = clean_stale(std::time::Duration::ZERO);
        println!("removed {n} emulated WAN(s) left by killed runs");
        return Ok(());
    }
    let default = WanConfig::three_regions();
    let rtt_ms = match &a.rtt_ms {
        Some(m) => parse_matrix(m)?,
        None if a.regions == default.regions => default.rtt_ms,
        None => anyhow::bail!("--rtt-ms is needed for regions other than the default three"),
    };
    let wait = block_signals();
    let wan = Wan::up(WanConfig {
        regions: a.regions,
        rtt_ms,
        operator_region: a.operator_region,
    })?;
    println!("operator (this namespace): {}", wan.operator_address());
    for r in wan.regions() {
        let ns = wan.namespace(r).unwrap_or_default();
        let ip = wan.address(r).map(|i| i.to_string()).unwrap_or_default();
        println!("{r:<12} namespace {ns:<18} address {ip}");
        println!(
            "    ip netns exec {ns} beacon-node serve --region {r} --listen {ip}:12434 \
             --p2p-listen /ip4/{ip}/udp/4001/quic-v1 --data-plane {ip}:4433"
        );
    }
    println!("holding the regions; Ctrl-C removes them");
    wait();
    drop(wan);
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// A model as `ops/setup.sh` caches it.
fn cached_model(file: &str) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    std::env::var_os("BEACON_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/beacon"))
        .join("models")
        .join(file)
}

fn run(a: RunArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let say = move |m: &str| eprintln!("[bench {:>6.1}s] {m}", t0.elapsed().as_secs_f64());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-results/{started}")));
    let scale = if a.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let mut report = Report {
        mode: if a.router.is_some() {
            "remote".into()
        } else if a.quick {
            "quick".into()
        } else {
            "full".into()
        },
        started,
        machine: Machine {
            cores: cores(),
            memory_mib: memory_mib(),
            model: String::new(),
        },
        scale: Some(scale.clone()),
        ..Report::default()
    };
    if let Some(url) = &a.router {
        remote(&a, url, &scale, &mut report, &say);
    } else {
        local(&a, &out, &scale, &mut report, &say)?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.write(&out)?;
    for c in report.checks.iter().filter(|c| !c.passed) {
        say(&format!("CHECK FAILED: {}: {}", c.name, c.detail));
    }
    for p in &report.problems {
        say(&format!("WORKLOAD FAILED: {p}"));
    }
    say(&format!(
        "report: {} ({} checks, {} failed)",
        out.join("report.md").display(),
        report.checks.len(),
        report.checks.iter().filter(|c| !c.passed).count() + report.problems.len()
    ));
    Ok(report.passed())
}

/// Chat load against a deployed router (and optionally one of its providers directly).
fn remote(a: &RunArgs, url: &str, scale: &Scale, report: &mut Report, say: &dyn Fn(&str)) {
    let base = |u: &str| u.trim_end_matches('/').trim_end_matches("/v1").to_string();
    let routed = Target {
        name: "router",
        base: base(url),
        pid: 0,
    };
    let direct = a.direct.as_deref().map(|d| Target {
        name: "the provider",
        base: base(d),
        pid: 0,
    });
    report.setup.router = Some(routed.base.clone());
    report.setup.direct = direct.as_ref().map(|d| d.base.clone());
    // A deployed router may have no supervisor: MinionS runs when asked for by name.
    if a.only.contains(&Workload::Minions) {
        let corpus = Corpus::northport(scale.minions_chars, scale.minions_questions);
        let m = minions::run(
            &routed.base,
            "the router's configured supervisor",
            &corpus,
            scale.minions_rounds,
            scale.minions_max_jobs,
            say,
        );
        minions_checks(report, &m);
        report.minions = Some(m);
    } else {
        report.minions_skipped =
            Some("with --router, MinionS runs only when named (--only chat,minions)".into());
    }
    if wants(a, Workload::Chat) {
        let c = suite::chat(&routed, direct.as_ref(), scale, say);
        let errors: usize = c.levels.iter().map(|l| l.routed.errors).sum();
        report.check(
            "routed chat answered",
            errors == 0,
            format!("{errors} routed requests failed"),
        );
        report.chat = Some(c);
    }
}

fn minions_checks(report: &mut Report, m: &MinionsResult) {
    let asked = m.questions.len();
    report.check(
        "every MinionS job answered",
        asked > 0 && m.completed == asked,
        format!("{} of {asked} jobs answered", m.completed),
    );
    report.check(
        "every local MinionS job verified",
        m.jobs > 0 && m.unverified_jobs == 0,
        format!(
            "{} of {} local jobs came back signed and verified",
            m.jobs - m.unverified_jobs,
            m.jobs
        ),
    );
}

/// Workload 2 on the cluster: the supervisor (a local node unless a remote API is named),
/// a router that uses it, and the jobs.
fn minions_workload(
    a: &RunArgs,
    cluster: &mut Cluster,
    honest: usize,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> anyhow::Result<MinionsResult> {
    let (url, model, env) = match (&a.remote_base_url, &a.remote_model) {
        (Some(u), Some(m)) => {
            let env: Vec<(String, String)> = std::env::var("BEACON_REMOTE_API_KEY")
                .ok()
                .map(|k| ("BEACON_REMOTE_API_KEY".to_string(), k))
                .into_iter()
                .collect();
            (u.clone(), m.clone(), env)
        }
        _ => {
            let gguf = a
                .supervisor_model
                .clone()
                .or_else(|| a.model.clone())
                .unwrap_or_else(|| cached_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
            anyhow::ensure!(
                gguf.is_file(),
                "supervisor model {} missing: run ops/setup.sh, pass --supervisor-model, or \
                 name a remote API with --remote-base-url",
                gguf.display()
            );
            // The supervisor and the providers take turns (plan, jobs, aggregate): it may
            // use every core.
            cluster.add_supervisor(&gguf, cores())?;
            let s = cluster.supervisor.as_ref().context("supervisor")?;
            say(&format!("supervisor {} up at {}", s.model, s.addr));
            (s.base_url(), s.model.clone(), Vec::new())
        }
    };
    let router = cluster.add_router_env(
        &[
            "--audit-rate",
            "0",
            // A CPU worker reading a chunk, or a CPU supervisor reading the whole report
            // for the baseline, can pass the default attempt timeout.
            "--attempt-timeout",
            "600",
            "--remote-base-url",
            &url,
            "--remote-model",
            &model,
        ],
        &env,
        honest,
    )?;
    let corpus = Corpus::northport(scale.minions_chars, scale.minions_questions);
    say(&format!(
        "minions: {} question(s) on {} ({} characters), supervisor {model}",
        corpus.questions.len(),
        corpus.name,
        corpus.chars
    ));
    let m = minions::run(
        &cluster.routers[router].url(""),
        &format!("{model} at {url}"),
        &corpus,
        scale.minions_rounds,
        scale.minions_max_jobs,
        say,
    );
    cluster.remove_router(router);
    Ok(m)
}

/// The regions, their round-trip times and the operator's region, from the defaults and
/// the options.
fn wan_config(a: &RunArgs) -> anyhow::Result<WanConfig> {
    let mut wan = WanConfig::three_regions();
    if a.quick {
        wan.regions.truncate(2);
        wan.rtt_ms = vec![vec![0.0, 75.0], vec![75.0, 0.0]];
    }
    if !a.regions.is_empty() {
        wan.rtt_ms = match &a.rtt_ms {
            Some(m) => parse_matrix(m)?,
            None if wan.regions.starts_with(&a.regions) => wan
                .rtt_ms
                .iter()
                .take(a.regions.len())
                .map(|r| r[..a.regions.len()].to_vec())
                .collect(),
            None => anyhow::bail!("--rtt-ms is needed for regions other than the default ones"),
        };
        wan.regions = a.regions.clone();
    } else if let Some(m) = &a.rtt_ms {
        wan.rtt_ms = parse_matrix(m)?;
    }
    wan.operator_region = Some(
        a.operator_region
            .clone()
            .unwrap_or_else(|| wan.regions[0].clone()),
    );
    Ok(wan)
}

/// The report's account of the network it measured.
fn setup(wan: &WanConfig, threads: usize, parallel: usize) -> Setup {
    Setup {
        regions: wan.regions.clone(),
        rtt_ms: wan.rtt_ms.clone(),
        operator_region: wan.operator_region.clone(),
        threads,
        parallel,
        ..Setup::default()
    }
}

/// One dishonest provider per attack (`beacon-node --fault`); the quick run keeps the two
/// that each stand for a way of being caught (audit, refusal).
fn attacks(quick: bool) -> &'static [&'static str] {
    if quick {
        &["tamper", "wrong-model"]
    } else {
        &[
            "tamper",
            "wrong-model",
            "text",
            "empty",
            "guess-audits",
            "stream",
            "resample",
            "lying-auditor",
            "q3-swap",
            "q2-swap",
        ]
    }
}

fn local(
    a: &RunArgs,
    out: &std::path::Path,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let bins = Binaries::find(a.bin_dir.as_deref())?;
    let model = a
        .model
        .clone()
        .unwrap_or_else(|| cached_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
    anyhow::ensure!(
        model.is_file(),
        "model {} missing: run ops/setup.sh or pass --model",
        model.display()
    );
    let wan = wan_config(a)?;
    let dishonest_faults = attacks(a.quick);
    let providers = wan.regions.len() * a.per_region.max(1) + dishonest_faults.len();
    let threads = a
        .threads
        .unwrap_or((cores() / wan.regions.len().max(1)).max(1));
    report.machine.model = model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    report.setup = setup(&wan, threads, a.parallel);
    engine_workload(a, &bins, &model, scale, report, say);
    say(&format!(
        "bringing up {} regions, {} honest provider(s) each (up to {providers} processes with the dishonest ones)",
        wan.regions.len(),
        a.per_region.max(1)
    ));
    let mut cluster = Cluster::up(
        ClusterConfig {
            wan,
            per_region: a.per_region.max(1),
            model,
            threads,
            parallel: a.parallel,
            ctx_size: 2048,
            bins,
        },
        say,
    )?;
    report.setup.wan_octet = Some(cluster.wan.octet());
    let honest = cluster.providers.len();
    let timeout = scale.attempt_timeout.to_string();
    let main = cluster.add_router(
        &["--audit-rate", "0", "--attempt-timeout", &timeout],
        honest,
    )?;
    say(&format!("router up, placing on {honest} providers"));
    let op = cluster
        .wan
        .operator_region()
        .unwrap_or_default()
        .to_string();

    chat_workload(a, &cluster, main, &op, scale, report, say)?;
    if wants(a, Workload::Minions) {
        match minions_workload(a, &mut cluster, honest, scale, say) {
            Ok(m) => {
                minions_checks(report, &m);
                report.minions = Some(m);
            }
            Err(e) => report.problems.push(format!("minions: {e:#}")),
        }
    }

    placement_workload(a, &mut cluster, main, honest, scale, report, say)?;

    audits_workload(a, &mut cluster, main, honest, &timeout, scale, report, say)?;

    dishonest_workload(
        a,
        &mut cluster,
        honest,
        &timeout,
        &op,
        dishonest_faults,
        scale,
        report,
        say,
    )?;

    failures_workload(a, &mut cluster, main, scale, report, say);
    if let Err(e) = cluster.save_logs(&out.join("logs")) {
        say(&format!("could not save the logs: {e}"));
    }
    report.setup.providers = cluster
        .providers
        .iter()
        .map(|p| (p.name.clone(), p.fault.clone().unwrap_or_default()))
        .collect();
    Ok(())
}

/// Runs beacon-node against llama-server, same model and settings (when a llama-server is given).
#[allow(clippy::too_many_arguments)]
fn engine_workload(
    a: &RunArgs,
    bins: &Binaries,
    model: &std::path::Path,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) {
    if !wants(a, Workload::Engine) {
        return;
    }
    match &a.llama_server {
        Some(server) => {
            say("engine: beacon-node against llama-server, same model and settings");
            match engine::run(
                bins,
                server,
                model,
                a.parallel,
                cores(),
                &scale.concurrency,
                scale.per_client,
                scale.max_tokens,
                say,
            ) {
                Ok(e) => {
                    let errors: usize = e
                        .levels
                        .iter()
                        .map(|l| l.beacon.errors + l.llama_server.errors)
                        .sum();
                    report.check(
                        "engine answered every request",
                        errors == 0,
                        format!("{errors} requests failed (both servers)"),
                    );
                    report.engine = Some(e);
                }
                Err(e) => report.problems.push(format!("engine: {e:#}")),
            }
        }
        None => {
            report.engine_skipped = Some(
                "no llama-server to compare with: pass --llama-server (`ops/bench-inference.sh` builds one)".into(),
            )
        }
    }
}

/// Chat load through the router and to the provider in its region, same run.
#[allow(clippy::too_many_arguments)]
fn chat_workload(
    a: &RunArgs,
    cluster: &Cluster,
    main: usize,
    op: &str,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    if !wants(a, Workload::Chat) {
        return Ok(());
    }
    let routed = Target {
        name: "router",
        base: cluster.routers[main].url(""),
        pid: 0,
    };
    let near = cluster
        .providers
        .iter()
        .find(|p| p.region == op)
        .context("no provider in the operator's region")?;
    let direct = Target {
        name: "the provider in the router's region",
        base: format!("http://{}", near.http),
        pid: 0,
    };
    let c = suite::chat(&routed, Some(&direct), scale, say);
    let errors: usize = c.levels.iter().map(|l| l.routed.errors).sum();
    report.check(
        "chat load without failures",
        errors == 0,
        format!("{errors} routed requests failed with every provider up"),
    );
    report.chat = Some(c);
    Ok(())
}

/// Placement and residency: a router pinned to each region, against the unpinned one.
#[allow(clippy::too_many_arguments)]
fn placement_workload(
    a: &RunArgs,
    cluster: &mut Cluster,
    main: usize,
    honest: usize,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    if !wants(a, Workload::Placement) {
        return Ok(());
    }
    let regions = cluster.wan.regions().to_vec();
    let mut pinned = Vec::new();
    for r in &regions {
        let i = cluster.add_router(&["--audit-rate", "0", "--allowed-regions", r], honest)?;
        pinned.push((r.clone(), i));
    }
    let p = suite::placement(cluster, main, &pinned, scale, say);
    let worst = p
        .pinned
        .iter()
        .map(|r| r.in_region_share)
        .fold(1.0, f64::min);
    report.check(
        "residency: pinned work stays in its region",
        worst >= 1.0,
        format!(
            "lowest share of answers from inside the pinned region: {:.0}%",
            worst * 100.0
        ),
    );
    report.placement = Some(p);
    for (_, i) in pinned.into_iter().rev() {
        cluster.remove_router(i);
    }
    Ok(())
}

/// What audits at the default rate cost honest traffic, against a router that never audits.
#[allow(clippy::too_many_arguments)]
fn audits_workload(
    a: &RunArgs,
    cluster: &mut Cluster,
    main: usize,
    honest: usize,
    timeout: &str,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    if !wants(a, Workload::Audits) {
        return Ok(());
    }
    // The router's default rate (`--audit-rate` 0.05), stated so the report says it.
    const DEFAULT_AUDIT_RATE: f64 = 0.05;
    let rate = DEFAULT_AUDIT_RATE.to_string();
    let auditing = cluster.add_router(
        &["--audit-rate", &rate, "--attempt-timeout", timeout],
        honest,
    )?;
    let c = suite::audit_cost(cluster, auditing, main, DEFAULT_AUDIT_RATE, scale, say);
    // A quick run sends a few dozen requests: at a 5 % rate that is one or two audits,
    // too few for a share to mean anything, so only the full run checks it.
    if !a.quick {
        report.check(
            "audits cost at most 10 % of served tokens",
            c.audits > 0.0 && c.cost_share <= 0.10,
            format!(
                "{:.0} audits scored {:.0} tokens: {:.1} % of {:.0} served",
                c.audits,
                c.audit_tokens,
                100.0 * c.cost_share,
                c.served_tokens
            ),
        );
    }
    report.audits = Some(c);
    cluster.remove_router(auditing);
    Ok(())
}

/// One dishonest provider per attack next to the honest ones, behind an auditing router.
#[allow(clippy::too_many_arguments)]
fn dishonest_workload(
    a: &RunArgs,
    cluster: &mut Cluster,
    honest: usize,
    timeout: &str,
    op: &str,
    dishonest_faults: &[&str],
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    if !wants(a, Workload::Dishonest) {
        return Ok(());
    }
    let rate = scale.audit_rate.to_string();
    // Honest providers differ in thread count and batch shape, as on a real network
    // (their logits differ a little): one more with two threads and one sequence, in
    // full runs (a quick run keeps its time).
    let shaped = if a.quick {
        None
    } else {
        Some(cluster.add_provider_shaped(op, None, Some((2, 1)))?)
    };
    let auditor = cluster.add_router(
        &["--audit-rate", &rate, "--attempt-timeout", timeout],
        honest + usize::from(shaped.is_some()),
    )?;
    let other = cluster
        .wan
        .regions()
        .iter()
        .find(|r| **r != op)
        .cloned()
        .unwrap_or(op.to_string());
    // The tampering provider sits next to the router, where placement favours it; the
    // others alternate between the far region and the router's.
    let faults: Vec<(&str, &str)> = dishonest_faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                if i.is_multiple_of(2) {
                    op
                } else {
                    other.as_str()
                },
                *f,
            )
        })
        .collect();
    match suite::dishonest(cluster, auditor, &faults, scale, say) {
        Ok(d) => {
            report.check(
                "no honest provider quarantined",
                d.false_quarantines == 0,
                format!(
                    "{} of {} honest providers quarantined",
                    d.false_quarantines, d.honest
                ),
            );
            let caught = d.providers.iter().filter(|v| v.caught()).count();
            report.check(
                "dishonest providers quarantined (a lying auditor: or never given a vote)",
                caught == d.providers.len(),
                format!(
                    "{caught} of {} within {} requests",
                    d.providers.len(),
                    d.requests
                ),
            );
            report.dishonest = Some(d);
        }
        Err(e) => report.problems.push(format!("dishonest: {e:#}")),
    }
    cluster.remove_router(auditor);
    if let Some(i) = shaped {
        cluster.kill_provider(i);
    }
    Ok(())
}

/// Providers killed, partitioned and restarted under load.
#[allow(clippy::too_many_arguments)]
fn failures_workload(
    a: &RunArgs,
    cluster: &mut Cluster,
    main: usize,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) {
    if !wants(a, Workload::Failures) {
        return;
    }
    match suite::failures(cluster, main, scale, say) {
        Ok(f) => {
            for r in &f {
                report.check(
                    &format!("every request completes: {}", r.scenario),
                    r.failed == 0,
                    format!(
                        "{} of {} completed, {} retries",
                        r.completed, r.requests, r.retries
                    ),
                );
                report.check(
                    &format!("every provider back after: {}", r.scenario),
                    r.rejoined,
                    if r.rejoined {
                        "placed on again within two minutes".into()
                    } else {
                        "a provider could not be placed on two minutes later".into()
                    },
                );
            }
            report.failures = f;
        }
        Err(e) => report.problems.push(format!("failures: {e:#}")),
    }
}

fn wants(a: &RunArgs, w: Workload) -> bool {
    a.only.is_empty() || a.only.contains(&w)
}

/// The suite's workloads, as `--only` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// beacon-node against llama-server, same model and settings.
    Engine,
    /// Chat load through the router and direct.
    Chat,
    /// MinionS jobs and their remote-only baseline.
    Minions,
    /// Placement and residency.
    Placement,
    /// What audits cost honest traffic.
    Audits,
    /// One dishonest provider per attack.
    Dishonest,
    /// Providers killed, partitioned and restarted under load.
    Failures,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Regions(a)) => regions(a),
        None => {
            if !run(cli.run)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
