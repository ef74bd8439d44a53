//! The emulated WAN with real sockets in real network namespaces: configured round trips
//! between regions, reachability inside a region and from the operator, a region cut off
//! and restored, and nothing left behind. Needs root, like CI.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use beacon_bench::wan::{Wan, WanConfig, in_netns};

/// An echo server bound to `ip` inside `region`'s namespace.
fn echo_server(wan: &Wan, region: &str, ip: Ipv4Addr) -> SocketAddr {
    let ns = wan.namespace(region).unwrap();
    let listener = in_netns(&ns, move || TcpListener::bind((ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The smallest of five echo round trips to `to`, from `region`'s namespace (or the
/// operator's, with `None`).
fn min_rtt(wan: &Wan, from: Option<&str>, to: SocketAddr) -> std::io::Result<Duration> {
    let probe = move || -> std::io::Result<Duration> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            best = best.min(t.elapsed());
        }
        Ok(best)
    };
    match from {
        Some(r) => in_netns(&wan.namespace(r).unwrap(), probe).unwrap(),
        None => probe(),
    }
}

fn up(config: WanConfig) -> Wan {
    Wan::up(config).unwrap_or_else(|e| panic!("the emulated WAN needs root here: {e}"))
}

#[test]
fn regions_get_the_configured_round_trips() {
    let config = WanConfig::three_regions();
    let wan = up(config.clone());
    let servers: Vec<SocketAddr> = config
        .regions
        .iter()
        .map(|r| echo_server(&wan, r, wan.address(r).unwrap()))
        .collect();
    for (a, from) in config.regions.iter().enumerate() {
        for (b, to) in servers.iter().enumerate() {
            if a == b {
                continue;
            }
            let rtt = min_rtt(&wan, Some(from), *to).unwrap();
            let want = Duration::from_secs_f64(config.rtt_ms[a][b] / 1000.0);
            // A packet cannot arrive before its delay: every round trip is at least the
            // configured one.
            assert!(
                rtt >= want,
                "{from} -> {}: {rtt:?} < configured {want:?}",
                config.regions[b]
            );
        }
        // The operator has no region here: it reaches every region, undelayed.
        min_rtt(&wan, None, servers[a]).unwrap();
    }
    // A second host in a region reaches the first inside the region's namespace, and is
    // reachable from elsewhere at the region's round trip.
    let second = wan.add_host("eu-west").unwrap();
    assert_ne!(second, wan.address("eu-west").unwrap());
    let s2 = echo_server(&wan, "eu-west", second);
    min_rtt(&wan, Some("eu-west"), servers[1]).unwrap();
    assert!(min_rtt(&wan, Some("us-east"), s2).unwrap() >= Duration::from_millis(75));
    assert!(
        wan.stats()
            .delayed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // The matrix can change while running.
    let mut m = config.rtt_ms.clone();
    m[0][2] = 400.0;
    m[2][0] = 400.0;
    wan.set_rtt_matrix(&m).unwrap();
    assert!(min_rtt(&wan, Some("us-east"), servers[2]).unwrap() >= Duration::from_millis(400));
    m[0][1] = 5.0;
    assert!(
        wan.set_rtt_matrix(&m).is_err(),
        "an asymmetric matrix is refused"
    );
}

#[test]
fn the_operator_sits_in_its_region() {
    let mut config = WanConfig::three_regions();
    config.operator_region = Some("ap-south".into());
    let wan = up(config);
    let us = echo_server(&wan, "us-east", wan.address("us-east").unwrap());
    let ap = echo_server(&wan, "ap-south", wan.address("ap-south").unwrap());
    assert!(min_rtt(&wan, None, us).unwrap() >= Duration::from_millis(190));
    // Inside its own region the operator's traffic is not delayed by the WAN; what this
    // checks is reachability, not speed.
    min_rtt(&wan, None, ap).unwrap();
}

#[test]
fn a_cut_region_is_unreachable_until_restored() {
    let wan = up(WanConfig::three_regions());
    let ap = echo_server(&wan, "ap-south", wan.address("ap-south").unwrap());
    let eu = echo_server(&wan, "eu-west", wan.address("eu-west").unwrap());
    min_rtt(&wan, Some("us-east"), ap).unwrap();
    wan.set_cut("ap-south", true).unwrap();
    assert!(min_rtt(&wan, Some("us-east"), ap).is_err());
    assert!(min_rtt(&wan, None, ap).is_err());
    // Other regions are untouched.
    min_rtt(&wan, Some("us-east"), eu).unwrap();
    assert!(
        wan.stats()
            .dropped_cut
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    wan.set_cut("ap-south", false).unwrap();
    min_rtt(&wan, Some("us-east"), ap).unwrap();
    assert!(wan.set_cut("mars", true).is_err());
}

/// What `ip ARGS` prints.
fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dropping_the_wan_removes_every_namespace_and_link() {
    let wan = up(WanConfig::three_regions());
    let names: Vec<String> = wan
        .regions()
        .iter()
        .map(|r| wan.namespace(r).unwrap())
        .collect();
    let listed = ip(&["netns", "list"]);
    for n in &names {
        assert!(listed.contains(n.as_str()), "{n} missing while up");
    }
    let operator = wan.operator_address();
    drop(wan);
    let listed = ip(&["netns", "list"]);
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind");
    }
    assert!(
        !ip(&["-4", "addr"]).contains(&operator.to_string()),
        "the operator's link is left behind"
    );
}
