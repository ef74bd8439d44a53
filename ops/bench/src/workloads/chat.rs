//! Workload 1: chat load through a router and, as the baseline, straight to one provider
//! (the one in the router's region), same run.

use std::fmt::Write as _;

use anyhow::Context;
use beacon_harness::load::{Load, Target, run_load};
use plotters::prelude::*;
use serde::Serialize;

use super::{ADVERT_SETTLE, Check, Ctx, Scale, Section, by_region, question};
use crate::chart::{Svg, err, legend, line};

/// Workload 1: chat load through a router and, as the baseline, straight to one provider.
#[derive(Debug, Default, Serialize)]
pub struct ChatResult {
    /// What the baseline is.
    pub baseline: String,
    pub levels: Vec<ChatLevel>,
    /// One-token answers at concurrency 1: the latency the router adds.
    pub overhead: Option<ChatLevel>,
    /// The router's `/v1/providers` at the end: what placement knew (RTTs, throughput).
    pub providers: serde_json::Value,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLevel {
    pub concurrency: usize,
    pub direct: Option<Load>,
    pub routed: Load,
    /// Routed requests per region.
    pub regions: Vec<(String, usize)>,
}

/// Chat load through the cluster's main router and to the provider in its region.
pub fn run(ctx: &mut Ctx) -> anyhow::Result<ChatResult> {
    let routed = Target {
        name: "router",
        base: ctx.cluster.routers[ctx.main].url(""),
        pid: 0,
    };
    let near = ctx
        .cluster
        .providers
        .iter()
        .find(|p| p.region == ctx.op)
        .context("no provider in the operator's region")?;
    let direct = Target {
        name: "the provider in the router's region",
        base: format!("http://{}", near.http),
        pid: 0,
    };
    Ok(measure(&routed, Some(&direct), ctx.scale, ctx.say))
}

/// The load through `routed` and, when given, `direct`, at each concurrency, and the
/// latency the router adds to one-token answers.
pub fn measure(
    routed: &Target,
    direct: Option<&Target>,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> ChatResult {
    let mut out = ChatResult {
        baseline: direct
            .map(|d| format!("{} called directly", d.name))
            .unwrap_or_else(|| "none (no --direct given)".into()),
        ..ChatResult::default()
    };
    // Warm both paths (model load, QUIC connections) outside the measurement.
    let _ = run_load(routed, 2, 4, question, 4);
    if let Some(d) = direct {
        let _ = run_load(d, 2, 4, question, 4);
    }
    for (k, &c) in scale.concurrency.iter().enumerate() {
        let n = scale.min_requests.max(scale.per_client * c);
        // Alternate which goes first, so neither always runs on a warmer machine. Between
        // the two, one advert interval passes: the direct load makes its provider look busy
        // in its adverts, which would push the routed load elsewhere.
        let pause = || std::thread::sleep(ADVERT_SETTLE);
        let run_direct = || direct.map(|d| run_load(d, c, n, question, scale.max_tokens));
        let (d, r) = if k % 2 == 0 {
            let d = run_direct();
            pause();
            (d, run_load(routed, c, n, question, scale.max_tokens))
        } else {
            let r = run_load(routed, c, n, question, scale.max_tokens);
            pause();
            (run_direct(), r)
        };
        pause();
        if let Some(e) = r.samples.iter().find_map(|s| s.error.as_deref()) {
            say(&format!("chat c={c}: a routed request failed: {e}"));
        }
        say(&format!(
            "chat c={c}: routed {:.1} tok/s p50 {:.0} ms ({} errors){}",
            r.tokens_per_second,
            r.p50_ms,
            r.errors,
            d.as_ref()
                .map(|d| format!(
                    ", direct {:.1} tok/s p50 {:.0} ms ({} errors)",
                    d.tokens_per_second, d.p50_ms, d.errors
                ))
                .unwrap_or_default()
        ));
        out.levels.push(ChatLevel {
            concurrency: c,
            regions: by_region(&r.samples),
            direct: d,
            routed: r,
        });
    }
    let n = scale.min_requests.max(10);
    let d = direct.map(|d| run_load(d, 1, n, question, 1));
    std::thread::sleep(ADVERT_SETTLE);
    let r = run_load(routed, 1, n, question, 1);
    say(&format!(
        "chat 1-token: routed p50 {:.1} ms{}",
        r.p50_ms,
        d.as_ref()
            .map(|d| format!(", direct p50 {:.1} ms", d.p50_ms))
            .unwrap_or_default()
    ));
    out.overhead = Some(ChatLevel {
        concurrency: 1,
        regions: by_region(&r.samples),
        direct: d,
        routed: r,
    });
    out.providers =
        beacon_harness::http("GET", &format!("{}/v1/providers", routed.base), None, &[])
            .try_json()
            .unwrap_or_default();
    out
}

pub fn checks(c: &ChatResult) -> Vec<Check> {
    let errors: usize = c.levels.iter().map(|l| l.routed.errors).sum();
    vec![Check::new(
        "chat load without failures",
        errors == 0,
        format!("{errors} routed requests failed with every provider up"),
    )]
}

pub fn render(c: &ChatResult) -> Section {
    Section::new(|m| markdown(m, c), Some(("chat.svg", figure(c))))
}

fn markdown(m: &mut String, c: &ChatResult) {
    let _ = writeln!(
        m,
        "\n## 1. Routed chat load\n\nBaseline, same run: {}. The router may spread a load over \
         every provider; the baseline is one.\n",
        c.baseline
    );
    let _ = writeln!(
        m,
        "| concurrency | routed tok/s | direct tok/s | ratio | routed p50 / p99 ms | direct p50 / p99 ms | errors routed / direct | routed by region | hedged |\n|---|---|---|---|---|---|---|---|---|"
    );
    for l in c.levels.iter().chain(c.overhead.iter()) {
        let r = &l.routed;
        let (dt, dl, de, ratio) = match &l.direct {
            Some(d) => (
                format!("{:.1}", d.tokens_per_second),
                format!("{:.0} / {:.0}", d.p50_ms, d.p99_ms),
                d.errors.to_string(),
                format!(
                    "{:.2}x",
                    r.tokens_per_second / d.tokens_per_second.max(1e-9)
                ),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let label = if std::ptr::eq(l, c.overhead.as_ref().map_or(std::ptr::null(), |o| o)) {
            "1 (1-token answers)".to_string()
        } else {
            l.concurrency.to_string()
        };
        let regions: Vec<String> = l.regions.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            m,
            "| {label} | {:.1} | {dt} | {ratio} | {:.0} / {:.0} | {dl} | {} / {de} | {} | {} |",
            r.tokens_per_second,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            regions.join(", "),
            r.hedged
        );
    }
    if let Some(o) = &c.overhead
        && let Some(d) = &o.direct
    {
        let _ = writeln!(
            m,
            "\nThe router adds **{:.1} ms** at the median to a 1-token answer (routed {:.1} ms, direct {:.1} ms).",
            o.routed.p50_ms - d.p50_ms,
            o.routed.p50_ms,
            d.p50_ms
        );
    }
    let _ = writeln!(m, "\n![chat throughput and latency](chat.svg)");
}

fn figure(c: &ChatResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(450);
        let max_c = c.levels.iter().map(|l| l.concurrency).max().unwrap_or(1) as f64;
        let series = |f: &dyn Fn(&Load) -> f64, direct: bool| -> Vec<(f64, f64)> {
            c.levels
                .iter()
                .filter_map(|l| {
                    let load = if direct {
                        l.direct.as_ref()?
                    } else {
                        &l.routed
                    };
                    Some((l.concurrency as f64, f(load)))
                })
                .collect()
        };
        for (area, title, y, f) in [
            (
                &left,
                "Throughput",
                "tokens/s",
                (&|l: &Load| l.tokens_per_second) as &dyn Fn(&Load) -> f64,
            ),
            (&right, "Median latency", "ms", &|l: &Load| l.p50_ms),
        ] {
            let routed = series(f, false);
            let direct = series(f, true);
            let top = routed
                .iter()
                .chain(&direct)
                .map(|p| p.1)
                .fold(1.0, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(0.5..max_c + 0.5, 0.0..top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("concurrency")
                .y_desc(y)
                .draw()
                .map_err(err)?;
            for (name, pts, color) in [("routed", routed, RED), ("direct (baseline)", direct, BLUE)]
            {
                if !pts.is_empty() {
                    line(&mut chart, name, &pts, color)?;
                }
            }
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}
