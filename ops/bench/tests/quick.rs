//! `beacon-bench --quick`, the suite's smoke test, end to end: real nodes and routers in
//! two emulated regions, every workload, and the report. Needs root (namespaces), the
//! workspace's `beacon-node` and `beacon-router` next to `beacon-bench`, the test model and
//! the supervisor model (`ops/setup.sh --supervisor-model`; `BEACON_TEST_MODEL`,
//! `BEACON_SUPERVISOR_MODEL`).

use std::process::Command;

#[test]
fn quick_suite_runs_every_workload_and_its_checks_pass() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_beacon-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    let report_md = std::fs::read_to_string(out.path().join("report.md")).unwrap_or_default();
    assert!(run.status.success(), "{log}\n{report_md}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["mode"], "quick");
    // Every workload ran and measured something.
    let levels = report["chat"]["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{report}");
    for l in levels {
        assert!(l["routed"]["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(l["direct"]["tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    // MinionS: every question answered as a job, with the remote-only baseline run too.
    let m = &report["minions"];
    let questions = m["questions"].as_array().unwrap();
    assert!(!questions.is_empty(), "{report}");
    for q in questions {
        assert_eq!(q["status"], 200, "{q}");
        assert!(q["remote_tokens"].as_u64().unwrap() > 0, "{q}");
        assert!(q["remote_only_tokens"].as_u64().unwrap() > 0, "{q}");
        assert!(q["jobs"].as_u64().unwrap() > 0, "{q}");
        assert!(
            q["remote_only_answer"]
                .as_str()
                .is_some_and(|a| !a.is_empty()),
            "{q}"
        );
    }
    assert_eq!(report["placement"]["pinned"].as_array().unwrap().len(), 4);
    let failures: Vec<&str> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        failures,
        ["provider killed", "region cut off", "router restarted"]
    );
    assert_eq!(
        report["dishonest"]["providers"].as_array().unwrap().len(),
        2
    );
    // The audit-cost workload measured both routers on honest traffic (too few requests
    // for its share of audit tokens to be checked: the full run checks it).
    let a = &report["audits"];
    assert!(a["served_tokens"].as_f64().unwrap() > 0.0, "{a}");
    assert!(a["throughput_ratio"].as_f64().unwrap() > 0.0, "{a}");
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 12, "{report}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{report_md}");
    // The Markdown report and its figures.
    for section in [
        "## 1. Routed chat",
        "## 2. MinionS",
        "## 3. Placement",
        "## 4. Failure",
        "## 5. Dishonest",
        "## 6. What audits cost",
    ] {
        assert!(report_md.contains(section), "{report_md}");
    }
    for svg in ["chat.svg", "minions.svg", "placement.svg", "failures.svg"] {
        let s = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("</svg>"), "{svg}");
    }
    // Nothing left behind: no emulated WAN of this run, no node or router process.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    let mine = format!("beacon-wan{}", report["setup"]["wan_octet"]);
    assert!(
        !ns.lines().any(|l| l.starts_with(&format!("{mine}-"))),
        "{ns}"
    );
}
