//! Emulated regions on one machine: a network namespace per region, all joined to a hub
//! namespace whose policy routes send every packet that crosses regions through a TUN
//! device. A user-space thread reads each packet, holds it for half the round-trip time
//! configured between its source and destination regions, and writes it back, so the kernel
//! forwards it on. `tc netem` does not exist on these machines; `/dev/net/tun` does.
//!
//! Addresses: a [`Wan`] owns `10.<octet>.0.0/16`. Region `i` (1-based, in the order given)
//! is `10.<octet>.<i>.0/24` with hosts from `.2`; the namespace the harness runs in (the
//! operator) is `10.<octet>.0.2` and sits in [`WanConfig::operator_region`] (or has no delay).
//! A region can be cut off: every packet to or from it is dropped until it is restored.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` from iproute2 and `/dev/net/tun`;
//! [`Wan::up`] says which is missing.

// Namespaces, TUN and poll are Linux syscalls without a safe wrapper here; each unsafe
// block says why it is sound.
#![allow(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the emulated WAN could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("bad WAN configuration: {0}")]
    Config(String),
    #[error("emulated regions need root (network namespaces, veth pairs and a TUN device): {0}")]
    Privilege(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Regions and the round-trip times between them.
#[derive(Clone, Debug)]
pub struct WanConfig {
    pub regions: Vec<String>,
    /// `rtt_ms[a][b]`: round trip between regions `a` and `b` (symmetric; the diagonal is
    /// unused, traffic inside a region never leaves its namespace).
    pub rtt_ms: Vec<Vec<f64>>,
    /// The region the harness's own namespace sits in; `None`: no delay to any region.
    pub operator_region: Option<String>,
}

impl WanConfig {
    /// Three regions with round trips like those between public cloud regions.
    pub fn three_regions() -> WanConfig {
        WanConfig {
            regions: vec!["us-east".into(), "eu-west".into(), "ap-south".into()],
            rtt_ms: vec![
                vec![0.0, 75.0, 190.0],
                vec![75.0, 0.0, 120.0],
                vec![190.0, 120.0, 0.0],
            ],
            operator_region: None,
        }
    }

    fn check(&self) -> Result<(), WanError> {
        let n = self.regions.len();
        if n == 0 || n > 200 {
            return Err(WanError::Config(format!("{n} regions (1 to 200)")));
        }
        let names: BTreeSet<&String> = self.regions.iter().collect();
        if names.len() != n {
            return Err(WanError::Config("region names repeat".into()));
        }
        if let Some(r) = self.regions.iter().find(|r| {
            r.is_empty()
                || r.len() > 32
                || !r
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        }) {
            return Err(WanError::Config(format!(
                "region name {r:?}: 1 to 32 of [A-Za-z0-9_-]"
            )));
        }
        if self.rtt_ms.len() != n || self.rtt_ms.iter().any(|row| row.len() != n) {
            return Err(WanError::Config(format!("the RTT matrix must be {n}x{n}")));
        }
        for a in 0..n {
            for b in 0..n {
                let v = self.rtt_ms[a][b];
                if !(0.0..=10_000.0).contains(&v) {
                    return Err(WanError::Config(format!(
                        "RTT {} -> {} = {v} ms (0 to 10000)",
                        self.regions[a], self.regions[b]
                    )));
                }
                if a != b && (v - self.rtt_ms[b][a]).abs() > f64::EPSILON {
                    return Err(WanError::Config(format!(
                        "RTT {} <-> {} is not symmetric",
                        self.regions[a], self.regions[b]
                    )));
                }
            }
        }
        if let Some(o) = &self.operator_region
            && !self.regions.contains(o)
        {
            return Err(WanError::Config(format!(
                "operator region {o:?} is not a region"
            )));
        }
        Ok(())
    }
}

/// What the delay thread consults for every packet.
struct Links {
    /// One-way delay in microseconds between address indexes (0: the operator, i: region i).
    one_way_us: Vec<Vec<u64>>,
    cut: BTreeSet<usize>,
}

/// Packet counters, for reports and tests.
#[derive(Default, Debug)]
pub struct WanStats {
    pub delayed: AtomicU64,
    pub dropped_cut: AtomicU64,
    pub passed: AtomicU64,
}

/// A running emulated WAN. Dropping it stops the delay thread and removes every namespace
/// (and with them every interface) it created.
pub struct Wan {
    octet: u8,
    config: WanConfig,
    links: Arc<Mutex<Links>>,
    stats: Arc<WanStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    next_host: Mutex<Vec<u8>>,
    hub: String,
    root_veth: String,
}

const TABLE: &str = "177";
/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn run(args: &[&str]) -> Result<String, WanError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| {
            WanError::Privilege(format!("cannot run {}: {e} (install iproute2)", args[0]))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
            return Err(WanError::Privilege(stderr));
        }
        return Err(WanError::Command {
            command: args.join(" "),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns`: sockets it opens
/// live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WanError> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| WanError::Config(format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an open namespace file descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(WanError::Privilege(format!(
                "setns: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| WanError::Config("the namespace thread panicked".into()))?
}

impl Wan {
    /// Creates the namespaces, links, routes and the delay thread.
    pub fn up(config: WanConfig) -> Result<Wan, WanError> {
        config.check()?;
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(WanError::Privilege("/dev/net/tun does not exist".into()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(WanError::Privilege("not running as root".into()));
        }
        clean_stale(Duration::from_secs(60));
        // Creating the hub namespace claims its octet's subnet (the name is taken
        // atomically), so several runs (and parallel tests) never share one.
        let mut claimed = None;
        for octet in 200u8..=250 {
            let hub = format!("beacon-wan{octet}-hub");
            match run(&["ip", "netns", "add", &hub]) {
                Ok(_) => {
                    // The owner's pid: a later run removes what a killed one left.
                    let _ = std::fs::write(owner_file(octet), std::process::id().to_string());
                    claimed = Some((octet, format!("bwan{octet}"), hub));
                    break;
                }
                Err(WanError::Command { stderr, .. }) if stderr.contains("exists") => continue,
                Err(e) => return Err(e),
            }
        }
        let Some((octet, root_veth, hub)) = claimed else {
            return Err(WanError::Config(
                "no free 10.x.0.0/16 subnet in 10.200-10.250".into(),
            ));
        };
        let n = config.regions.len();
        let mut wan = Wan {
            octet,
            links: Arc::new(Mutex::new(Links {
                one_way_us: vec![vec![0; n + 1]; n + 1],
                cut: BTreeSet::new(),
            })),
            config,
            stats: Arc::new(WanStats::default()),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            next_host: Mutex::new(vec![3; n + 1]),
            hub,
            root_veth,
        };
        // From here on, Drop removes whatever exists.
        wan.build()?;
        wan.set_rtt_matrix(&wan.config.rtt_ms.clone())?;
        Ok(wan)
    }

    fn build(&mut self) -> Result<(), WanError> {
        let o = self.octet;
        let hub = self.hub.clone();
        run(&["ip", "-n", &hub, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &hub,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        // The operator's link: root namespace <-> hub.
        run(&[
            "ip",
            "link",
            "add",
            &self.root_veth,
            "type",
            "veth",
            "peer",
            "name",
            "r0",
            "netns",
            &hub,
        ])?;
        let root_ip = format!("10.{o}.0.2/24");
        run(&["ip", "addr", "add", &root_ip, "dev", &self.root_veth])?;
        run(&["ip", "link", "set", &self.root_veth, "up"])?;
        hub_side(&hub, "r0", o, 0)?;
        run(&[
            "ip",
            "route",
            "add",
            &format!("10.{o}.0.0/16"),
            "via",
            &format!("10.{o}.0.1"),
        ])?;
        for (i, region) in self.config.regions.clone().iter().enumerate() {
            let i = i + 1;
            let ns = self.namespace(region).unwrap_or_default();
            let hub_if = format!("r{i}");
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "-n", &hub, "link", "add", &hub_if, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            hub_side(&hub, &hub_if, o, i)?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{o}.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{o}.{i}.1"),
            ])?;
        }
        // The TUN device, created from a thread inside the hub so it lives there.
        let tun = in_netns(&hub, open_tun)??;
        run(&["ip", "-n", &hub, "link", "set", "wan0", "up"])?;
        run(&[
            "ip", "-n", &hub, "route", "add", "default", "dev", "wan0", "table", TABLE,
        ])?;
        let tun = Arc::new(tun);
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (reader, links, stats, stop) = (
            tun.clone(),
            self.links.clone(),
            self.stats.clone(),
            self.stop.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            read_loop(&reader, o, &links, &stats, &stop, tx)
        }));
        self.threads
            .push(std::thread::spawn(move || write_loop(&tun, rx)));
        Ok(())
    }

    /// The namespace of `region`, for `ip netns exec` or [`in_netns`].
    pub fn namespace(&self, region: &str) -> Option<String> {
        self.index(region)
            .map(|i| format!("beacon-wan{}-{}", self.octet, i))
    }

    fn index(&self, region: &str) -> Option<usize> {
        self.config
            .regions
            .iter()
            .position(|r| r == region)
            .map(|i| i + 1)
    }

    /// The second octet of this WAN's `10.<octet>.0.0/16` (its namespaces are named
    /// `beacon-wan<octet>-…`).
    pub fn octet(&self) -> u8 {
        self.octet
    }

    /// The region the operator's namespace sits in, if any.
    pub fn operator_region(&self) -> Option<&str> {
        self.config.operator_region.as_deref()
    }

    pub fn regions(&self) -> &[String] {
        &self.config.regions
    }

    /// The region's first address (`10.<octet>.<i>.2`).
    pub fn address(&self, region: &str) -> Option<Ipv4Addr> {
        self.index(region)
            .map(|i| Ipv4Addr::new(10, self.octet, i as u8, 2))
    }

    /// The operator's (this namespace's) address on the emulated WAN.
    pub fn operator_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 2)
    }

    /// Adds another address in `region`, for one more host there (processes in one region
    /// share its namespace; their own addresses keep their ports apart).
    pub fn add_host(&self, region: &str) -> Result<Ipv4Addr, WanError> {
        let i = self
            .index(region)
            .ok_or_else(|| WanError::Config(format!("no region {region:?}")))?;
        let host = {
            let mut next = self.next_host.lock().unwrap_or_else(|p| p.into_inner());
            if next[i] == 254 {
                return Err(WanError::Config(format!("region {region} is full")));
            }
            next[i] += 1;
            next[i] - 1
        };
        let ip = Ipv4Addr::new(10, self.octet, i as u8, host);
        let ns = self.namespace(region).unwrap_or_default();
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        Ok(ip)
    }

    /// A command that runs `program` inside `region`'s namespace.
    pub fn command(&self, region: &str, program: &std::path::Path) -> Option<Command> {
        let ns = self.namespace(region)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns]).arg(program);
        Some(c)
    }

    /// Replaces the round-trip matrix (same shape as the configuration's).
    pub fn set_rtt_matrix(&self, rtt_ms: &[Vec<f64>]) -> Result<(), WanError> {
        let mut c = self.config.clone();
        c.rtt_ms = rtt_ms.to_vec();
        c.check()?;
        let n = c.regions.len();
        let op = c.operator_region.as_ref().and_then(|r| self.index(r));
        // Index 0 is the operator, which has its region's delays (or none).
        let region_of = |i: usize| if i == 0 { op } else { Some(i) };
        let one_way: Vec<Vec<u64>> = (0..=n)
            .map(|a| {
                (0..=n)
                    .map(|b| match (region_of(a), region_of(b)) {
                        (Some(ra), Some(rb)) if ra != rb => {
                            (c.rtt_ms[ra - 1][rb - 1] * 500.0) as u64
                        }
                        _ => 0,
                    })
                    .collect()
            })
            .collect();
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .one_way_us = one_way;
        Ok(())
    }

    /// Cuts `region` off (`true`) or restores it: while cut, every packet to or from it is
    /// dropped, the operator's included.
    pub fn set_cut(&self, region: &str, cut: bool) -> Result<(), WanError> {
        let i = self
            .index(region)
            .ok_or_else(|| WanError::Config(format!("no region {region:?}")))?;
        let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if cut {
            l.cut.insert(i);
        } else {
            l.cut.remove(&i);
        }
        Ok(())
    }

    pub fn stats(&self) -> &WanStats {
        &self.stats
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Deleting a namespace deletes its interfaces, the TUN device and the hub's end of
        // the operator's veth (and so its root end) with it.
        for region in self.config.regions.clone() {
            if let Some(ns) = self.namespace(&region) {
                let _ = run(&["ip", "netns", "del", &ns]);
            }
        }
        let _ = run(&["ip", "netns", "del", &self.hub]);
        let _ = run(&["ip", "link", "del", &self.root_veth]);
        let _ = std::fs::remove_file(owner_file(self.octet));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The hub's end of a link to subnet `10.<o>.<i>.0/24`: its gateway address, up, and a
/// rule that sends whatever arrives on it through the delay device.
fn hub_side(hub: &str, dev: &str, o: u8, i: usize) -> Result<(), WanError> {
    let gateway = format!("10.{o}.{i}.1/24");
    run(&["ip", "-n", hub, "addr", "add", &gateway, "dev", dev])?;
    run(&["ip", "-n", hub, "link", "set", dev, "up"])?;
    run(&[
        "ip", "-n", hub, "rule", "add", "iif", dev, "lookup", TABLE, "pref", "100",
    ])?;
    Ok(())
}

fn owner_file(octet: u8) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/beacon-wan{octet}.pid"))
}

/// Removes the namespaces of emulated WANs whose process is gone (killed before its drop
/// ran). A WAN claimed less than `min_age` ago is left alone: its owner may not have written
/// its pid yet. Returns how many WANs were removed.
pub fn clean_stale(min_age: Duration) -> usize {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return 0;
    };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(octet) = name
            .strip_prefix("beacon-wan")
            .and_then(|r| r.strip_suffix("-hub"))
            .and_then(|o| o.parse::<u8>().ok())
        else {
            continue;
        };
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < min_age);
        let owner_alive = std::fs::read_to_string(owner_file(octet))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if young || owner_alive {
            continue;
        }
        let prefix = format!("beacon-wan{octet}-");
        if let Ok(all) = std::fs::read_dir("/run/netns") {
            for ns in all.flatten() {
                let ns = ns.file_name().to_string_lossy().into_owned();
                if ns.starts_with(&prefix) && ns != name {
                    let _ = run(&["ip", "netns", "del", &ns]);
                }
            }
        }
        let _ = run(&["ip", "netns", "del", &name]);
        let _ = run(&["ip", "link", "del", &format!("bwan{octet}")]);
        let _ = std::fs::remove_file(owner_file(octet));
        removed += 1;
    }
    removed
}

fn open_tun() -> Result<File, WanError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..4].copy_from_slice(b"wan0");
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq lays out.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc != 0 {
        return Err(WanError::Privilege(format!(
            "TUNSETIFF: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(file)
}

/// Which address index (0: operator, i: region i) an IPv4 address of this WAN has.
fn index_of(addr: &[u8], octet: u8) -> Option<usize> {
    (addr[0] == 10 && addr[1] == octet).then_some(addr[2] as usize)
}

fn read_loop(
    tun: &File,
    octet: u8,
    links: &Mutex<Links>,
    stats: &WanStats,
    stop: &AtomicBool,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 65_536];
    let mut reader = tun;
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let packet = &buf[..n];
        if n < 20 || packet[0] >> 4 != 4 {
            continue; // IPv4 only; the WAN routes nothing else.
        }
        let (src, dst) = (
            index_of(&packet[12..16], octet),
            index_of(&packet[16..20], octet),
        );
        let delay = {
            let l = links.lock().unwrap_or_else(|p| p.into_inner());
            if src.is_some_and(|s| l.cut.contains(&s)) || dst.is_some_and(|d| l.cut.contains(&d)) {
                stats.dropped_cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match (src, dst) {
                (Some(s), Some(d)) if s < l.one_way_us.len() && d < l.one_way_us.len() => {
                    l.one_way_us[s][d]
                }
                _ => 0,
            }
        };
        if delay > 0 {
            stats.delayed.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.passed.fetch_add(1, Ordering::Relaxed);
        }
        let due = Instant::now() + Duration::from_micros(delay);
        if tx.send((due, packet.to_vec())).is_err() {
            return;
        }
    }
}

fn write_loop(tun: &File, rx: mpsc::Receiver<(Instant, Vec<u8>)>) {
    let mut writer = tun;
    let mut seq = 0u64;
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            if let Some(Reverse((_, _, p))) = queue.pop() {
                // A packet the kernel refuses (its route vanished) is lost, as on a WAN.
                let _ = writer.write(&p);
            }
        }
        let next = match queue.peek() {
            Some(Reverse((due, _, _))) => rx.recv_timeout(due.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((due, p)) => {
                seq += 1;
                queue.push(Reverse((due, seq, p)));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_are_checked() {
        assert!(WanConfig::three_regions().check().is_ok());
        let mut c = WanConfig::three_regions();
        c.rtt_ms[0][1] = 10.0;
        assert!(c.check().unwrap_err().to_string().contains("symmetric"));
        let mut c = WanConfig::three_regions();
        c.rtt_ms.pop();
        assert!(c.check().unwrap_err().to_string().contains("3x3"));
        let mut c = WanConfig::three_regions();
        c.regions[1] = "us-east".into();
        assert!(c.check().unwrap_err().to_string().contains("repeat"));
        let mut c = WanConfig::three_regions();
        c.regions[2] = "ap south".into();
        assert!(c.check().is_err());
        let mut c = WanConfig::three_regions();
        c.operator_region = Some("mars".into());
        assert!(c.check().unwrap_err().to_string().contains("mars"));
        let mut c = WanConfig::three_regions();
        c.rtt_ms[2][2] = -1.0;
        assert!(c.check().is_err());
    }

    #[test]
    fn addresses_map_to_regions() {
        assert_eq!(index_of(&[10, 201, 3, 2], 201), Some(3));
        assert_eq!(index_of(&[10, 201, 0, 2], 201), Some(0));
        assert_eq!(index_of(&[10, 202, 3, 2], 201), None);
        assert_eq!(index_of(&[127, 0, 0, 1], 201), None);
    }
}
