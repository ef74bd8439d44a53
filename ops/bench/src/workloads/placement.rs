//! Workload 3: where the router places work, against the best it could have done, and
//! residency: a router pinned to each region keeps its work there.

use std::fmt::Write as _;

use beacon_harness::load::{Load, Target, run_load};
use plotters::prelude::*;
use serde::Serialize;

use super::{Check, Ctx, Scale, Section, by_region, question};
use crate::chart::{Svg, err};
use crate::cluster::Cluster;

/// Workload 3: where the router places work, against the best it could have done.
#[derive(Debug, Default, Serialize)]
pub struct PlacementResult {
    /// The region the router (and the clients) sit in.
    pub operator_region: String,
    /// Each region alone (a router pinned to it): the expected completion time there.
    pub pinned: Vec<PinnedRegion>,
    /// The unpinned router at concurrency 1 and at the load level.
    pub chosen: Vec<Chosen>,
}

#[derive(Debug, Default, Serialize)]
pub struct PinnedRegion {
    pub region: String,
    pub load: Load,
    /// Share of the pinned router's answers that came from inside its region (must be 1).
    pub in_region_share: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Chosen {
    pub concurrency: usize,
    pub load: Load,
    /// Best single region's p50 at this concurrency.
    pub best_region: String,
    pub best_p50_ms: f64,
    /// Chosen p50 / best p50 (1: as good as the best region; below 1: spreading beat it).
    pub ratio: f64,
    pub regions: Vec<(String, usize)>,
}

/// A router pinned to each region (`--allowed-regions`) next to the unpinned main one.
pub fn run(ctx: &mut Ctx) -> anyhow::Result<PlacementResult> {
    let regions = ctx.cluster.wan.regions().to_vec();
    let mut pinned = Vec::new();
    for r in &regions {
        let i = ctx
            .cluster
            .add_router(&["--audit-rate", "0", "--allowed-regions", r], ctx.honest)?;
        pinned.push((r.clone(), i));
    }
    let p = measure(ctx.cluster, ctx.main, &pinned, ctx.scale, ctx.say);
    for (_, i) in pinned.into_iter().rev() {
        ctx.cluster.remove_router(i);
    }
    Ok(p)
}

fn measure(
    cluster: &Cluster,
    unpinned: usize,
    pinned: &[(String, usize)],
    scale: &Scale,
    say: &dyn Fn(&str),
) -> PlacementResult {
    let target = |i: usize, name: &'static str| Target {
        name,
        base: cluster.routers[i].url(""),
        pid: 0,
    };
    let levels = [1, scale.failure_concurrency];
    let n = scale.placement_requests;
    let mut out = PlacementResult {
        operator_region: cluster.wan.operator_region().unwrap_or("none").to_string(),
        ..PlacementResult::default()
    };
    let mut best: Vec<(usize, String, f64)> = Vec::new();
    for &c in &levels {
        for (region, i) in pinned {
            let t = target(*i, "pinned");
            let _ = run_load(&t, 1, 2, question, 4);
            let load = run_load(&t, c, n.max(2 * c), question, scale.max_tokens);
            let inside = load
                .samples
                .iter()
                .filter(|s| s.ok() && s.region.as_deref() == Some(region.as_str()))
                .count();
            let ok = load.samples.iter().filter(|s| s.ok()).count();
            let share = if ok == 0 {
                0.0
            } else {
                inside as f64 / ok as f64
            };
            say(&format!(
                "placement c={c}: pinned to {region}: p50 {:.0} ms, {:.0}% in region, {} errors",
                load.p50_ms,
                share * 100.0,
                load.errors
            ));
            if load.errors < load.requests {
                best.push((c, region.clone(), load.p50_ms));
            }
            out.pinned.push(PinnedRegion {
                region: format!("{region} (c={c})"),
                load,
                in_region_share: share,
            });
        }
        let t = target(unpinned, "unpinned");
        let load = run_load(&t, c, n.max(2 * c), question, scale.max_tokens);
        let (best_region, best_p50) = best
            .iter()
            .filter(|b| b.0 == c)
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|b| (b.1.clone(), b.2))
            .unwrap_or_default();
        let ratio = if best_p50 > 0.0 {
            load.p50_ms / best_p50
        } else {
            0.0
        };
        say(&format!(
            "placement c={c}: chosen p50 {:.0} ms vs best region {best_region} {best_p50:.0} ms ({ratio:.2}x)",
            load.p50_ms
        ));
        out.chosen.push(Chosen {
            concurrency: c,
            regions: by_region(&load.samples),
            load,
            best_region,
            best_p50_ms: best_p50,
            ratio,
        });
    }
    out
}

pub fn checks(p: &PlacementResult) -> Vec<Check> {
    let worst = p
        .pinned
        .iter()
        .map(|r| r.in_region_share)
        .fold(1.0, f64::min);
    vec![Check::new(
        "residency: pinned work stays in its region",
        worst >= 1.0,
        format!(
            "lowest share of answers from inside the pinned region: {:.0}%",
            worst * 100.0
        ),
    )]
}

pub fn render(p: &PlacementResult) -> Section {
    Section::new(|m| markdown(m, p), Some(("placement.svg", figure(p))))
}

fn markdown(m: &mut String, p: &PlacementResult) {
    let _ = writeln!(
        m,
        "\n## 3. Placement\n\nThe router and the clients sit in {}. Each region alone is measured \
         with a router pinned to it (`--allowed-regions`), in the same run: the best of them is \
         the best possible single-region placement.\n",
        p.operator_region
    );
    let _ = writeln!(
        m,
        "| pinned to | p50 / p99 ms | errors | answers from inside the region |\n|---|---|---|---|"
    );
    for r in &p.pinned {
        let _ = writeln!(
            m,
            "| {} | {:.0} / {:.0} | {} | {:.0}% |",
            r.region,
            r.load.p50_ms,
            r.load.p99_ms,
            r.load.errors,
            r.in_region_share * 100.0
        );
    }
    let _ = writeln!(
        m,
        "\n| concurrency | chosen p50 ms | best region | best p50 ms | chosen / best | placed in | hedged |\n|---|---|---|---|---|---|---|"
    );
    for c in &p.chosen {
        let regions: Vec<String> = c.regions.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            m,
            "| {} | {:.0} | {} | {:.0} | {:.2}x | {} | {} |",
            c.concurrency,
            c.load.p50_ms,
            c.best_region,
            c.best_p50_ms,
            c.ratio,
            regions.join(", "),
            c.load.hedged
        );
    }
    let _ = writeln!(m, "\n![placement](placement.svg)");
}

fn figure(p: &PlacementResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (700, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        // One bar per pinned region and per unpinned level, in the order measured.
        let mut bars: Vec<(String, f64, RGBColor)> = p
            .pinned
            .iter()
            .map(|r| (format!("pinned {}", r.region), r.load.p50_ms, BLUE))
            .collect();
        bars.extend(
            p.chosen
                .iter()
                .map(|c| (format!("chosen (c={})", c.concurrency), c.load.p50_ms, RED)),
        );
        let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
        let n = bars.len();
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Median latency: pinned regions vs the router's choice",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(52)
            .build_cartesian_2d(0..n, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
            .y_desc("p50 ms")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let mut r = Rectangle::new([(i, 0.0), (i + 1, b.1)], b.2.mix(0.6).filled());
                r.set_margin(0, 0, 8, 8);
                r
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(s)
}
