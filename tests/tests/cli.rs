//! Every binary starts and documents itself.

use std::process::Command;

#[test]
fn binaries_print_help() {
    for (bin, expect) in [("beacon-node", "model"), ("beacon-router", "serve")] {
        let out = Command::new(beacon_tests::bin(bin))
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
