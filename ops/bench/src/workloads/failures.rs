//! Workload 4: failures injected under load (a provider killed, a region cut off, the
//! router restarted): every request still completes, and every provider comes back.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use beacon_harness::load::{Load, Sample, Target, run_load, run_load_observed};
use plotters::prelude::*;
use serde::Serialize;

use super::{Check, Ctx, Scale, Section, by_region, question};
use crate::chart::{Svg, err, legend};
use crate::cluster::{Cluster, routable};

/// Workload 4: one failure injected a third of the way into a load.
#[derive(Debug, Default, Serialize)]
pub struct FailureResult {
    pub scenario: String,
    /// Seconds into the load when the failure was injected.
    pub event_at_s: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Extra attempts the router made (placed again after a failure).
    pub retries: u64,
    /// From the event to the first success of a request that started after it.
    pub recover_s: Option<f64>,
    /// The slowest answer, against the p50 of the answers before the event.
    pub max_ms: f64,
    pub p50_before_ms: f64,
    pub samples: Vec<Sample>,
    pub note: String,
    /// Every honest provider could be placed on again within two minutes after it.
    pub rejoined: bool,
}

/// Runs a load on router `r` and calls `inject` once a third of it is done.
fn with_failure(
    cluster: &Cluster,
    r: usize,
    scale: &Scale,
    scenario: &str,
    inject: &(dyn Fn() -> String + Sync),
) -> FailureResult {
    let target = Target {
        name: "router",
        base: cluster.routers[r].url(""),
        pid: 0,
    };
    let n = scale.failure_requests;
    let fired = AtomicBool::new(false);
    let event = Mutex::new((None::<Instant>, String::new()));
    let start = Instant::now();
    let load = run_load_observed(
        &target,
        scale.failure_concurrency,
        n,
        question,
        scale.max_tokens,
        |done, _| {
            if done >= n / 3 && !fired.swap(true, Ordering::SeqCst) {
                let note = inject();
                *event.lock().unwrap_or_else(|p| p.into_inner()) = (Some(Instant::now()), note);
            }
        },
    );
    let (at, note) = event.into_inner().unwrap_or_else(|p| p.into_inner());
    let event_at_s = at.map(|t| (t - start).as_secs_f64()).unwrap_or(0.0);
    // Where the work went before and after: a failure nobody's work met proves nothing.
    let (before, after): (Vec<Sample>, Vec<Sample>) = load
        .samples
        .iter()
        .cloned()
        .partition(|s| s.at_s < event_at_s);
    let show = |v: &[(String, usize)]| {
        v.iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = format!(
        "{note}; answered from {} before, {} after",
        show(&by_region(&before)),
        show(&by_region(&after))
    );
    summarize_failure(scenario, event_at_s, load, note)
}

fn summarize_failure(scenario: &str, event_at_s: f64, load: Load, note: String) -> FailureResult {
    let recover_s = load
        .samples
        .iter()
        .filter(|s| s.ok() && s.at_s >= event_at_s)
        .map(|s| s.at_s + s.ms / 1000.0 - event_at_s)
        .min_by(f64::total_cmp);
    let mut before: Vec<f64> = load
        .samples
        .iter()
        .filter(|s| s.ok() && s.at_s + s.ms / 1000.0 <= event_at_s)
        .map(|s| s.ms)
        .collect();
    before.sort_by(f64::total_cmp);
    FailureResult {
        scenario: scenario.to_string(),
        event_at_s,
        requests: load.requests,
        completed: load.requests - load.errors,
        failed: load.errors,
        retries: load
            .samples
            .iter()
            .map(|s| s.attempts.saturating_sub(1))
            .sum(),
        recover_s,
        max_ms: load.samples.iter().map(|s| s.ms).fold(0.0, f64::max),
        p50_before_ms: beacon_harness::load::percentile(&before, 0.5),
        samples: load.samples,
        note,
        rejoined: false,
    }
}

/// Kills a provider mid-load, cuts a region off mid-load, then restarts the router.
pub fn run(ctx: &mut Ctx) -> anyhow::Result<Vec<FailureResult>> {
    let (cluster, r, scale, say) = (&mut *ctx.cluster, ctx.main, ctx.scale, ctx.say);
    let mut out = Vec::new();
    let honest: Vec<usize> = (0..cluster.providers.len())
        .filter(|&i| cluster.providers[i].alive() && cluster.providers[i].fault.is_none())
        .collect();
    let expect = honest.len();
    // A provider outside the operator's region dies (SIGKILL), the rest carry on.
    let op = cluster.wan.operator_region().map(str::to_string);
    let victim = *honest
        .iter()
        .find(|&&i| Some(&cluster.providers[i].region) != op.as_ref())
        .unwrap_or(&honest[0]);
    let victim_name = cluster.providers[victim].name.clone();
    let pid = cluster.providers[victim].pid();
    let res = with_failure(cluster, r, scale, "provider killed", &|| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL)
            };
        }
        format!("{victim_name} killed with SIGKILL")
    });
    let mut res = res;
    cluster.kill_provider(victim);
    cluster.start_provider(victim)?;
    res.rejoined = wait_routable(cluster, r, expect, say);
    say(&failure_line(&res));
    out.push(res);

    // A whole region cut off: every packet to or from it dropped.
    let cut = cluster
        .wan
        .regions()
        .iter()
        .find(|x| Some(*x) != op.as_ref())
        .cloned();
    if let Some(region) = cut {
        let wan = &cluster.wan;
        let res = with_failure(cluster, r, scale, "region cut off", &|| {
            let _ = wan.set_cut(&region, true);
            format!("{region} cut off")
        });
        let mut res = res;
        cluster.wan.set_cut(&region, false)?;
        res.rejoined = wait_routable(cluster, r, expect, say);
        say(&failure_line(&res));
        out.push(res);
    }

    // The router killed and started again on its data directory.
    let before = Instant::now();
    let t = cluster.restart_router(r, expect)?;
    let target = Target {
        name: "router",
        base: cluster.routers[r].url(""),
        pid: 0,
    };
    let first = run_load(&target, 1, 1, question, scale.max_tokens);
    let recovered = before.elapsed().as_secs_f64();
    let load = run_load(
        &target,
        scale.failure_concurrency,
        scale.failure_requests / 2,
        question,
        scale.max_tokens,
    );
    let mut res = summarize_failure("router restarted", 0.0, load, String::new());
    res.recover_s = first.samples.first().filter(|s| s.ok()).map(|_| recovered);
    res.rejoined = true; // restart_router waited for every provider
    res.note = format!(
        "SIGKILL, then started on its data directory: knew all {expect} providers again after {:.1} s; \
         the load ran after the restart",
        t.as_secs_f64()
    );
    say(&failure_line(&res));
    out.push(res);
    Ok(out)
}

fn failure_line(r: &FailureResult) -> String {
    format!(
        "failure '{}': {} of {} completed, {} retries, recovered in {}{}",
        r.scenario,
        r.completed,
        r.requests,
        r.retries,
        r.recover_s
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "never".into()),
        if r.rejoined {
            ""
        } else {
            "; NOT every provider back within two minutes"
        }
    )
}

/// Waits (up to two minutes) until router `r` can place on `n` providers again.
fn wait_routable(cluster: &Cluster, r: usize, n: usize, say: &dyn Fn(&str)) -> bool {
    let start = Instant::now();
    while routable(&cluster.routers[r]) < n && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
    }
    if routable(&cluster.routers[r]) < n {
        let seen: Vec<String> = cluster.routers[r]
            .listing()
            .iter()
            .map(|p| {
                format!(
                    "{} rtt {:?} quarantined {} circuit open {}",
                    p["region"], p["rtt_ms"], p["quarantined"], p["circuit_open"]
                )
            })
            .collect();
        say(&format!(
            "the router can place on fewer than {n} providers after two minutes: {}",
            seen.join("; ")
        ));
        return false;
    }
    true
}

pub fn checks(f: &[FailureResult]) -> Vec<Check> {
    let mut out = Vec::new();
    for r in f {
        out.push(Check::new(
            format!("every request completes: {}", r.scenario),
            r.failed == 0,
            format!(
                "{} of {} completed, {} retries",
                r.completed, r.requests, r.retries
            ),
        ));
        out.push(Check::new(
            format!("every provider back after: {}", r.scenario),
            r.rejoined,
            if r.rejoined {
                "placed on again within two minutes".into()
            } else {
                "a provider could not be placed on two minutes later".into()
            },
        ));
    }
    out
}

pub fn render(f: &[FailureResult]) -> Section {
    Section::new(|m| markdown(m, f), Some(("failures.svg", figure(f))))
}

fn markdown(m: &mut String, f: &[FailureResult]) {
    let _ = writeln!(
        m,
        "\n## 4. Failure injection\n\nEach failure is injected a third of the way into a load; \
         the baseline is the same load's answers before it.\n"
    );
    let _ = writeln!(
        m,
        "| failure | completed | failed | retries | time to recover s | slowest ms | p50 before ms | what happened |\n|---|---|---|---|---|---|---|---|"
    );
    for r in f {
        let _ = writeln!(
            m,
            "| {} | {} of {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            r.scenario,
            r.completed,
            r.requests,
            r.failed,
            r.retries,
            r.recover_s
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "never".into()),
            r.max_ms,
            r.p50_before_ms,
            r.note
        );
    }
    let _ = writeln!(m, "\n![failures](failures.svg)");
}

fn figure(f: &[FailureResult]) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 300 * f.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (area, r) in root.split_evenly((f.len(), 1)).iter().zip(f) {
            let end = r
                .samples
                .iter()
                .map(|s| s.at_s + s.ms / 1000.0)
                .fold(1.0, f64::max);
            let top = r.samples.iter().map(|s| s.ms / 1000.0).fold(0.1, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{}: latency of each request by start time", r.scenario),
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(32)
                .y_label_area_size(52)
                .build_cartesian_2d(0.0..end * 1.02, 0.0..top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("request start, s")
                .y_desc("latency, s")
                .draw()
                .map_err(err)?;
            chart
                .draw_series(
                    r.samples
                        .iter()
                        .filter(|s| s.ok())
                        .map(|s| Circle::new((s.at_s, s.ms / 1000.0), 3, GREEN.filled())),
                )
                .map_err(err)?
                .label("answered")
                .legend(|(x, y)| Circle::new((x + 8, y), 3, GREEN.filled()));
            chart
                .draw_series(
                    r.samples
                        .iter()
                        .filter(|s| !s.ok())
                        .map(|s| Cross::new((s.at_s, s.ms / 1000.0), 5, RED.stroke_width(2))),
                )
                .map_err(err)?
                .label("failed")
                .legend(|(x, y)| Cross::new((x + 8, y), 4, RED.stroke_width(2)));
            if r.event_at_s > 0.0 {
                chart
                    .draw_series(LineSeries::new(
                        vec![(r.event_at_s, 0.0), (r.event_at_s, top)],
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?
                    .label("failure injected")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}
