//! Every binary starts and documents itself.

use std::process::Command;

#[test]
fn binaries_print_help() {
    for (bin, expect) in [("beacon-node", "model"), ("beacon-router", "serve")] {
        let out = Command::new(beacon_harness::bin(bin))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin} --help failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(expect),
            "{bin} --help lacks {expect:?}: {text}"
        );
    }
}

/// `beacon-node run MODEL PROMPT` answers once; without PROMPT it holds a conversation on
/// stdin until EOF; an unknown model is a clear error.
#[test]
fn run_answers_from_the_terminal() {
    use std::io::Write;
    let cli = beacon_harness::NodeCli::new();
    cli.package_test_model();
    let flags = [
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--ctx-size",
        "1024",
    ];

    let mut args = vec![
        "run",
        "ai/smollm2:test",
        "Say the word \"apple\" and nothing else.",
    ];
    args.extend(flags);
    let out = cli.ok(&args);
    assert!(out.to_lowercase().contains("apple"), "{out}");

    let mut args = vec!["run", "ai/smollm2:test"];
    args.extend(flags);
    let mut child = cli
        .command()
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say the word \"river\" and nothing else.\n\nSay the word \"cloud\" and nothing else.\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("river") && text.contains("cloud"), "{text}");

    let err = cli.fails(&["run", "ai/nothing-here", "hi"]);
    assert!(
        err.contains("not found") || err.contains("nothing-here"),
        "{err}"
    );
}
