//! A WAN whose process died without dropping it (kill -9) is removed by the next run. In a
//! file of its own: the clean-up it triggers must not race other tests' fresh WANs.

use std::time::Duration;

use beacon_bench::wan::{Wan, WanConfig, clean_stale};

fn netns_list() -> String {
    String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn a_wan_left_by_a_killed_process_is_cleaned_up() {
    let wan = Wan::up(WanConfig::three_regions())
        .unwrap_or_else(|e| panic!("the emulated WAN needs root here: {e}"));
    let names: Vec<String> = wan
        .regions()
        .iter()
        .map(|r| wan.namespace(r).unwrap())
        .collect();
    let octet = wan.operator_address().octets()[1];
    // As if killed: no drop runs, and the owner recorded is a process that has exited.
    std::mem::forget(wan);
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(format!("/run/beacon-wan{octet}.pid"), dead.to_string()).unwrap();
    for n in &names {
        assert!(netns_list().contains(n.as_str()));
    }
    assert!(clean_stale(Duration::ZERO) >= 1);
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind");
    }
    assert!(!listed.contains(&format!("beacon-wan{octet}-hub")));
    assert!(!std::path::Path::new(&format!("/run/beacon-wan{octet}.pid")).exists());
}
