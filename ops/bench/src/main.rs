//! `beacon-bench`: Beacon's benchmark suite. With no subcommand it runs the workloads in
//! emulated regions on this machine (`--quick` for the smoke test CI runs), or against a
//! deployed router (`--router URL`), and writes a JSON file, a Markdown report and SVG
//! figures. `regions` only brings up emulated regions and holds them until Ctrl-C;
//! `regions --clean` removes what killed runs left.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use beacon_bench::cluster::{Cluster, ClusterConfig};
use beacon_bench::report::{Machine, Report, Setup};
use beacon_bench::wan::{Wan, WanConfig, clean_stale};
use beacon_bench::workloads::{
    Ctx, Scale, Workload, audits, chat, dishonest, engine, failures, minions, placement,
};
use beacon_harness::Binaries;
use beacon_harness::corpus::Corpus;
use beacon_harness::load::Target;

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
        let m = minions::measure(
            &routed.base,
            "the router's configured supervisor",
            &corpus,
            scale.minions_rounds,
            scale.minions_max_jobs,
            say,
        );
        report.checks.extend(minions::checks(&m));
        report.minions = Some(m);
    } else {
        report.minions_skipped =
            Some("with --router, MinionS runs only when named (--only chat,minions)".into());
    }
    if wants(a, Workload::Chat) {
        let c = chat::measure(&routed, direct.as_ref(), scale, say);
        report.checks.extend(chat::checks(&c));
        report.chat = Some(c);
    }
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

/// The suite on emulated regions: the engine against llama-server, then a cluster of
/// providers and a router, and every selected workload on it in turn.
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
        .unwrap_or_else(beacon_harness::models::default_test_model);
    anyhow::ensure!(
        model.is_file(),
        "model {} missing: run ops/setup.sh or pass --model",
        model.display()
    );
    let wan = wan_config(a)?;
    let faults = dishonest::attacks(a.quick);
    let providers = wan.regions.len() * a.per_region.max(1) + faults.len();
    let threads = a
        .threads
        .unwrap_or((cores() / wan.regions.len().max(1)).max(1));
    report.machine.model = model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    report.setup = setup(&wan, threads, a.parallel);
    if wants(a, Workload::Engine) {
        engine_workload(a, &bins, &model, scale, report, say);
    }
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
    let mut ctx = Ctx {
        cluster: &mut cluster,
        main,
        honest,
        timeout,
        op,
        scale,
        quick: a.quick,
        say,
    };
    for &w in Workload::value_variants() {
        if w != Workload::Engine
            && wants(a, w)
            && let Err(e) = on_cluster(w, &mut ctx, a, faults, report)
        {
            let name = w.to_possible_value().map(|v| v.get_name().to_string());
            report
                .problems
                .push(format!("{}: {e:#}", name.unwrap_or_default()));
        }
    }
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

/// Runs workload `w` on the cluster: its result and its checks into the report.
fn on_cluster(
    w: Workload,
    ctx: &mut Ctx,
    a: &RunArgs,
    faults: &[&str],
    report: &mut Report,
) -> anyhow::Result<()> {
    match w {
        Workload::Engine => {}
        Workload::Chat => {
            let c = chat::run(ctx)?;
            report.checks.extend(chat::checks(&c));
            report.chat = Some(c);
        }
        Workload::Minions => {
            let supervisor = match (&a.remote_base_url, &a.remote_model) {
                (Some(url), Some(model)) => minions::Supervisor::Remote {
                    url: url.clone(),
                    model: model.clone(),
                },
                // The supervisor and the providers take turns (plan, jobs, aggregate): it
                // may use every core.
                _ => minions::Supervisor::Local {
                    gguf: a
                        .supervisor_model
                        .clone()
                        .or_else(|| a.model.clone())
                        .unwrap_or_else(beacon_harness::models::default_test_model),
                    threads: cores(),
                },
            };
            let m = minions::run(ctx, &supervisor)?;
            report.checks.extend(minions::checks(&m));
            report.minions = Some(m);
        }
        Workload::Placement => {
            let p = placement::run(ctx)?;
            report.checks.extend(placement::checks(&p));
            report.placement = Some(p);
        }
        Workload::Audits => {
            let c = audits::run(ctx)?;
            report.checks.extend(audits::checks(&c, ctx.quick));
            report.audits = Some(c);
        }
        Workload::Dishonest => {
            let d = dishonest::run(ctx, faults)?;
            report.checks.extend(dishonest::checks(&d));
            report.dishonest = Some(d);
        }
        Workload::Failures => {
            let f = failures::run(ctx)?;
            report.checks.extend(failures::checks(&f));
            report.failures = f;
        }
    }
    Ok(())
}

/// beacon-node against llama-server, same model and settings (when a llama-server is given).
fn engine_workload(
    a: &RunArgs,
    bins: &Binaries,
    model: &std::path::Path,
    scale: &Scale,
    report: &mut Report,
    say: &dyn Fn(&str),
) {
    let Some(server) = &a.llama_server else {
        report.engine_skipped = Some(
            "no llama-server to compare with: pass --llama-server (`ops/bench-inference.sh` builds one)".into(),
        );
        return;
    };
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
            report.checks.extend(engine::checks(&e));
            report.engine = Some(e);
        }
        Err(e) => report.problems.push(format!("engine: {e:#}")),
    }
}

fn wants(a: &RunArgs, w: Workload) -> bool {
    a.only.is_empty() || a.only.contains(&w)
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
