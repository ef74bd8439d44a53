//! `beacon-bench`: the benchmark suite's command line. Built so far: `regions`, which brings
//! up emulated regions and holds them until Ctrl-C (processes are started in them by hand
//! with `ip netns exec`), and `regions --clean`, which removes what killed runs left.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use beacon_bench::wan::{Wan, WanConfig, clean_stale};

#[derive(Parser)]
#[command(name = "beacon-bench", version, about = "Beacon's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Emulated regions on this machine: a network namespace per region, WAN round trips
    /// added in user space. Needs root.
    Regions(RegionsArgs),
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Regions(a) => regions(a),
    }
}
