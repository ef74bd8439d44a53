//! A run's results: the JSON file, and the Markdown report with the figures that each
//! workload renders.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::workloads::audits::AuditCost;
use crate::workloads::chat::ChatResult;
use crate::workloads::dishonest::DishonestResult;
use crate::workloads::engine::EngineResult;
use crate::workloads::failures::FailureResult;
use crate::workloads::minions::MinionsResult;
use crate::workloads::placement::PlacementResult;
use crate::workloads::{
    Check, Scale, Section, audits, chat, dishonest, engine, failures, minions, placement,
};

/// Everything one run measured, written as `report.json`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// `quick`, `full` or `remote` (deployed routers given by address).
    pub mode: String,
    /// Unix seconds at the start.
    pub started: u64,
    pub seconds: f64,
    pub machine: Machine,
    pub setup: Setup,
    pub scale: Option<Scale>,
    /// The engine against llama-server, when one was given, else why not.
    pub engine: Option<EngineResult>,
    pub engine_skipped: Option<String>,
    pub chat: Option<ChatResult>,
    /// Workload 2 (MinionS jobs) when it ran, else why not.
    pub minions: Option<MinionsResult>,
    pub minions_skipped: Option<String>,
    pub placement: Option<PlacementResult>,
    pub failures: Vec<FailureResult>,
    pub dishonest: Option<DishonestResult>,
    /// What audits at the default rate cost honest traffic.
    pub audits: Option<AuditCost>,
    /// What must hold whatever the speed; a failed check fails the run.
    pub checks: Vec<Check>,
    /// Workloads that could not run, and why.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub model: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Setup {
    pub regions: Vec<String>,
    pub rtt_ms: Vec<Vec<f64>>,
    pub operator_region: Option<String>,
    /// The emulated WAN's subnet octet (`10.<octet>.0.0/16`).
    pub wan_octet: Option<u8>,
    pub providers: Vec<(String, String)>,
    pub threads: usize,
    pub parallel: usize,
    pub router: Option<String>,
    pub direct: Option<String>,
}

impl Report {
    pub fn check(&mut self, name: &str, passed: bool, detail: String) {
        self.checks.push(Check::new(name, passed, detail));
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// Writes `report.json`, `report.md` and the figures into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        for (file, svg) in self.sections().into_iter().filter_map(|s| s.figure) {
            std::fs::write(dir.join(file), svg?)?;
        }
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# Beacon benchmark: {} run\n", self.mode);
        let _ = writeln!(
            m,
            "{} cores, {} MiB memory; model `{}`; {:.0} s in all.\n",
            self.machine.cores, self.machine.memory_mib, self.machine.model, self.seconds
        );
        let s = &self.setup;
        if !s.regions.is_empty() {
            let _ = writeln!(
                m,
                "Regions (round trips in ms; the router and the clients sit in {}):\n",
                s.operator_region.as_deref().unwrap_or("no region")
            );
            let _ = writeln!(m, "| | {} |", s.regions.join(" | "));
            let _ = writeln!(m, "|---|{}", "---|".repeat(s.regions.len()));
            for (r, row) in s.regions.iter().zip(&s.rtt_ms) {
                let cells: Vec<String> = row.iter().map(|v| format!("{v:.0}")).collect();
                let _ = writeln!(m, "| {r} | {} |", cells.join(" | "));
            }
            let _ = writeln!(
                m,
                "\nProviders: {} ({} llama.cpp threads, {} parallel sequences each).\n",
                s.providers
                    .iter()
                    .map(|(n, f)| if f.is_empty() {
                        n.clone()
                    } else {
                        format!("{n} ({f})")
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                s.threads,
                s.parallel
            );
        }
        if let Some(r) = &s.router {
            let _ = writeln!(
                m,
                "Router under test: {r}; direct baseline: {}.\n",
                s.direct.as_deref().unwrap_or("none")
            );
        }
        let _ = writeln!(m, "## Checks\n\n| check | result | detail |\n|---|---|---|");
        for c in &self.checks {
            let _ = writeln!(
                m,
                "| {} | {} | {} |",
                c.name,
                if c.passed { "pass" } else { "**FAIL**" },
                c.detail
            );
        }
        for p in &self.problems {
            let _ = writeln!(m, "| workload | **FAIL** | {p} |");
        }
        if let (None, Some(why)) = (&self.engine, &self.engine_skipped) {
            let _ = writeln!(m, "\n## Engine\n\nNot run: {why}.");
        }
        // Every workload's section in order, the MinionS heading (said even when it did
        // not run) after the chat load's.
        let before_minions = usize::from(self.engine.is_some()) + usize::from(self.chat.is_some());
        let sections = self.sections();
        for (i, s) in sections.iter().enumerate() {
            if i == before_minions {
                minions_heading(&mut m, self);
            }
            m.push_str(&s.markdown);
        }
        if sections.len() <= before_minions {
            minions_heading(&mut m, self);
        }
        m
    }

    /// The workloads' sections, in the report's order.
    fn sections(&self) -> Vec<Section> {
        let mut out = Vec::new();
        out.extend(self.engine.as_ref().map(engine::render));
        out.extend(self.chat.as_ref().map(chat::render));
        out.extend(self.minions.as_ref().map(minions::render));
        out.extend(self.placement.as_ref().map(placement::render));
        if !self.failures.is_empty() {
            out.push(failures::render(&self.failures));
        }
        out.extend(self.dishonest.as_ref().map(dishonest::render));
        out.extend(self.audits.as_ref().map(audits::render));
        out
    }
}

/// The MinionS heading, and why the workload did not run when it did not.
fn minions_heading(m: &mut String, r: &Report) {
    let _ = writeln!(m, "\n## 2. MinionS jobs\n");
    match (&r.minions, &r.minions_skipped) {
        (Some(_), _) => {}
        (None, Some(why)) => {
            let _ = writeln!(m, "Not run: {why}");
        }
        (None, None) => {
            let _ = writeln!(m, "Not run.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::engine::EngineLevel;
    use crate::workloads::minions::Question;
    use beacon_harness::corpus::Corpus;
    use beacon_harness::load::Load;

    fn load(tps: f64) -> Load {
        Load {
            tokens_per_second: tps,
            p50_ms: 100.0,
            ..Load::default()
        }
    }

    #[test]
    fn minions_and_engine_sections_and_figures() {
        let answered = Question {
            question: "How much?".into(),
            expect: vec!["61.5".into()],
            status: 200,
            answer: "61.5 million euros".into(),
            correct: true,
            remote_tokens: 900,
            remote_only_tokens: 3000,
            minions_ms: 40_000.0,
            remote_only_ms: 20_000.0,
            jobs: 8,
            verified: 8,
            jobs_by_region: vec![("eu-west".into(), 3), ("us-east".into(), 5)],
            ..Question::default()
        };
        let failed = Question {
            question: "Who?".into(),
            status: 502,
            error: Some("supervisor | down".into()),
            ..Question::default()
        };
        let report = Report {
            mode: "quick".into(),
            minions: Some(MinionsResult {
                supervisor: "ai/smollm2:supervisor".into(),
                corpus: Some(Corpus::northport(8_300, 2)),
                max_rounds: 2,
                max_jobs_per_round: Some(12),
                questions: vec![answered, failed],
                completed: 1,
                correct: 1,
                remote_tokens: 900,
                remote_only_tokens: 3000,
                jobs: 8,
                ..MinionsResult::default()
            }),
            engine: Some(EngineResult {
                llama_server: "llama-server".into(),
                parallel: 4,
                threads: 2,
                max_tokens: 16,
                levels: vec![EngineLevel {
                    concurrency: 1,
                    beacon: load(90.0),
                    llama_server: load(100.0),
                }],
            }),
            ..Report::default()
        };
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## 2. MinionS jobs"), "{md}");
        assert!(
            md.contains("| How much? | right | wrong | no | 0 of 0 | 900 / 3000 (0.30x)"),
            "{md}"
        );
        // A failed job is a row of its own, its message kept from breaking the table.
        assert!(md.contains("**failed** (502): supervisor / down"), "{md}");
        assert!(md.contains("at most 12 local jobs per round"), "{md}");
        assert!(md.contains("| 1 | 90.0 | 100.0 | 0.90x |"), "{md}");
        for svg in ["minions.svg", "engine.svg"] {
            let s = std::fs::read_to_string(dir.path().join(svg)).unwrap();
            assert!(s.starts_with("<svg") && s.contains("</svg>"), "{svg}");
        }
    }
}
