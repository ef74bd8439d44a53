//! A Beacon network in emulated regions: provider nodes started in their regions'
//! namespaces, routers in the operator's, each a real `beacon-node` / `beacon-router`
//! process with its own data directory. Dropping a [`Cluster`] kills every process it
//! started, then removes the regions.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::http::{http, wait_for_http};
use crate::load::MODEL;
use crate::wan::{Wan, WanConfig};

/// The `beacon-node` and `beacon-router` binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub node: PathBuf,
    pub router: PathBuf,
}

impl Binaries {
    /// From `dir`, else next to this executable (`target/<profile>/`), else from `PATH`.
    pub fn find(dir: Option<&Path>) -> anyhow::Result<Binaries> {
        let here = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let look = |name: &str| -> anyhow::Result<PathBuf> {
            if let Some(d) = dir {
                let p = d.join(name);
                return if p.is_file() {
                    Ok(p)
                } else {
                    bail!("{} not found (--bin-dir)", p.display())
                };
            }
            // Test executables live one level down, in `deps/`.
            for d in here.iter().flat_map(|h| [h.clone(), h.join("..")]) {
                let p = d.join(name);
                if p.is_file() {
                    return Ok(p);
                }
            }
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!("{name} not found next to beacon-bench or on PATH: build the workspace or pass --bin-dir")
                })
        };
        Ok(Binaries {
            node: look("beacon-node")?,
            router: look("beacon-router")?,
        })
    }
}

/// A child process killed (SIGKILL) when dropped, and when this process dies, however it
/// dies (the kernel's parent-death signal), so an interrupted run leaves no providers behind.
pub(crate) struct Proc(Child);

impl Proc {
    /// Starts `c` with its stderr appended to `log` (stdout dropped). The kernel kills it
    /// when the thread that started it exits: start it from the main thread.
    #[allow(unsafe_code)] // prctl in pre_exec, SAFETY below
    pub(crate) fn spawn(c: &mut Command, log: &Path) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(Proc(c.stdout(Stdio::null()).stderr(log).spawn()?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the providers are run.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub wan: WanConfig,
    /// Providers in each region.
    pub per_region: usize,
    /// The GGUF every provider serves (packaged as [`MODEL`]).
    pub model: PathBuf,
    /// llama.cpp threads per provider.
    pub threads: usize,
    /// Parallel sequences per provider.
    pub parallel: usize,
    pub ctx_size: usize,
    pub bins: Binaries,
}

/// One provider node.
pub struct Provider {
    pub name: String,
    pub region: String,
    pub http: SocketAddr,
    pub peer_id: String,
    pub fault: Option<String>,
    /// Its own llama.cpp threads and parallel sequences, where not the cluster's.
    pub shape: Option<(usize, usize)>,
    data: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Provider {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }

    pub fn alive(&self) -> bool {
        self.proc.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("serve.log")).unwrap_or_default()
    }
}

/// One router in the operator's namespace.
pub struct Router {
    pub addr: SocketAddr,
    pub args: Vec<String>,
    /// Environment set for it (secrets such as the supervisor's API key go here, never in
    /// `args`, which the report shows).
    env: Vec<(String, String)>,
    data: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Router {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("router.log")).unwrap_or_default()
    }

    /// `GET /v1/providers`, or nothing when the router does not answer.
    pub fn providers(&self) -> Vec<serde_json::Value> {
        http("GET", &self.url("/v1/providers"), None, &[])
            .try_json()
            .and_then(|v| v["providers"].as_array().cloned())
            .unwrap_or_default()
    }

    /// A counter or gauge from `/metrics` (the sum over its labels matching `label`).
    pub fn metric(&self, name: &str, label: &str) -> f64 {
        let text = http("GET", &self.url("/metrics"), None, &[]).body;
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The MinionS supervisor when no remote API is named: a node off the network, in the
/// operator's namespace, serving a model behind its OpenAI-compatible API.
pub struct Supervisor {
    pub addr: SocketAddr,
    /// The model reference it serves.
    pub model: String,
    data: tempfile::TempDir,
    _proc: Proc,
}

impl Supervisor {
    /// The OpenAI-compatible base URL (`--remote-base-url` of a router).
    pub fn base_url(&self) -> String {
        format!("http://{}/engines/v1", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("serve.log")).unwrap_or_default()
    }
}

/// The reference the local supervisor's model is packaged under.
pub const SUPERVISOR_MODEL: &str = "ai/smollm2:supervisor";

/// Providers in their regions, and the routers that use them.
pub struct Cluster {
    pub providers: Vec<Provider>,
    pub routers: Vec<Router>,
    pub supervisor: Option<Supervisor>,
    config: ClusterConfig,
    bootstrap: Option<String>,
    /// `MODEL=<digest>`: every router trusts the model's name only at this digest, as an
    /// operator pins it (set when the first provider packages the model).
    pin: Option<String>,
    next_port: u16,
    // Declared last: dropped after every process is killed.
    pub wan: Wan,
}

impl Cluster {
    /// Brings up the regions and `per_region` honest providers in each, joined into one
    /// network; `say` is told each step.
    pub fn up(config: ClusterConfig, say: &dyn Fn(&str)) -> anyhow::Result<Cluster> {
        let wan = Wan::up(config.wan.clone())?;
        let mut c = Cluster {
            providers: Vec::new(),
            routers: Vec::new(),
            supervisor: None,
            config,
            bootstrap: None,
            pin: None,
            next_port: 12000,
            wan,
        };
        let regions = c.wan.regions().to_vec();
        for r in &regions {
            for _ in 0..c.config.per_region {
                let i = c.add_provider(r, None)?;
                say(&format!(
                    "provider {} up in {r} ({})",
                    c.providers[i].name, c.providers[i].http
                ));
            }
        }
        Ok(c)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    /// Starts a provider in `region`, honest or with a `fault`: any of `beacon-node
    /// --fault`, or `q2-swap`/`q3-swap` (its blob swapped for a Q2_K or Q3_K_M
    /// requantisation, served by a node that does not check); returns its index.
    pub fn add_provider(&mut self, region: &str, fault: Option<&str>) -> anyhow::Result<usize> {
        self.add_provider_shaped(region, fault, None)
    }

    /// [`Cluster::add_provider`] with its own `(threads, parallel)`: another batch shape
    /// and thread count than the others (their logits differ a little, as on a real
    /// network).
    pub fn add_provider_shaped(
        &mut self,
        region: &str,
        fault: Option<&str>,
        shape: Option<(usize, usize)>,
    ) -> anyhow::Result<usize> {
        let ip = self
            .wan
            .address(region)
            .with_context(|| format!("no region {region}"))?;
        let data = tempfile::Builder::new()
            .prefix("beacon-bench-node")
            .tempdir()?;
        let name = format!(
            "{region}-{}",
            self.providers.iter().filter(|p| p.region == region).count() + 1
        );
        // Packaging the model anywhere gives the same digest, as a registry would.
        let out = self
            .node_command(data.path())
            .args(["model", "package", "--gguf"])
            .arg(&self.config.model)
            .arg(MODEL)
            .output()
            .context("running beacon-node model package")?;
        if !out.status.success() {
            bail!(
                "packaging {}: {}",
                self.config.model.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Attack (e): the verified blob swapped for a cheaper requantisation after the
        // pull, served by a node that skips its load-time check (`--fault unchecked`).
        if let Some(to) = fault.and_then(swap_target) {
            self.swap_blob(data.path(), to)?;
        }
        if self.pin.is_none() {
            let out = self
                .node_command(data.path())
                .args(["model", "inspect", "--digest", MODEL])
                .output()
                .context("running beacon-node model inspect")?;
            let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || digest.is_empty() {
                bail!(
                    "no digest for {MODEL}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            self.pin = Some(format!("{MODEL}={digest}"));
        }
        let http_addr = SocketAddr::from((ip, self.port()));
        self.providers.push(Provider {
            name,
            region: region.to_string(),
            http: http_addr,
            peer_id: String::new(),
            fault: fault.map(str::to_string),
            shape,
            data,
            proc: None,
        });
        let i = self.providers.len() - 1;
        self.start_provider(i)?;
        Ok(i)
    }

    /// Starts provider `i` (again, after a kill: same data directory, same identity).
    pub fn start_provider(&mut self, i: usize) -> anyhow::Result<()> {
        let p = &self.providers[i];
        let ip = p.http.ip();
        let mut cmd = self
            .wan
            .command(&p.region, &self.config.bins.node)
            .context("region namespace")?;
        self.node_env(&mut cmd, p.data.path());
        cmd.args(["serve", "--region", &p.region, "--listen"])
            .arg(p.http.to_string())
            .arg("--p2p-listen")
            .arg(format!("/ip4/{ip}/udp/0/quic-v1"))
            .arg("--data-plane")
            .arg(format!("{ip}:0"))
            .args(["--advert-interval", "2", "--keep-alive=-1"])
            // The API listens in the region's namespace, which only this bench reaches.
            .arg("--api-open")
            .arg("--threads")
            .arg(p.shape.map_or(self.config.threads, |s| s.0).to_string())
            .arg("--parallel")
            .arg(p.shape.map_or(self.config.parallel, |s| s.1).to_string())
            .arg("--ctx-size")
            .arg(self.config.ctx_size.to_string());
        if let Some(b) = &self.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        if let Some(f) = &p.fault {
            let f = if swap_target(f).is_some() {
                "unchecked"
            } else {
                f
            };
            cmd.env("BEACON_FAULT", f);
        }
        let proc = Proc::spawn(&mut cmd, &p.data.path().join("serve.log"))
            .context("starting beacon-node in its region")?;
        if !wait_for_http(p.http, "/healthz", Duration::from_secs(60)) {
            bail!("provider {} did not start:\n{}", p.name, tail(&p.log(), 20));
        }
        let info = http("GET", &format!("http://{}/beacon/node", p.http), None, &[])
            .try_json()
            .context("GET /beacon/node")?;
        if self.bootstrap.is_none() {
            self.bootstrap = info["listen_addrs"].as_array().and_then(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .find(|x| x.contains("quic-v1"))
                    .map(str::to_string)
            });
        }
        let p = &mut self.providers[i];
        p.peer_id = info["peer_id"].as_str().unwrap_or_default().to_string();
        p.proc = Some(proc);
        Ok(())
    }

    fn node_command(&self, data: &Path) -> Command {
        let mut c = Command::new(&self.config.bins.node);
        self.node_env(&mut c, data);
        c
    }

    /// Replaces the model's GGUF blob in the store under `data` with the model
    /// requantised `to` (llama.cpp's quantiser, through `beacon-node model requantize`).
    fn swap_blob(&self, data: &Path, to: &str) -> anyhow::Result<()> {
        let blobs = data.join("models/blobs/sha256");
        let gguf = std::fs::read_dir(&blobs)
            .with_context(|| format!("reading {}", blobs.display()))?
            .filter_map(|e| e.ok())
            .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .map(|e| e.path())
            .context("no blobs in the store")?;
        let cheap = data.join(format!("cheaper-{to}.gguf"));
        let out = self
            .node_command(data)
            .args(["model", "requantize", "--to", to])
            .arg(&self.config.model)
            .arg(&cheap)
            .output()
            .context("running beacon-node model requantize")?;
        if !out.status.success() {
            bail!(
                "requantising to {to}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::rename(&cheap, &gguf).context("swapping the blob")?;
        Ok(())
    }

    fn node_env(&self, c: &mut Command, data: &Path) {
        c.env("BEACON_DATA_DIR", data)
            .env("DOCKER_CONFIG", data.join("docker"))
            .env("BEACON_LOG", log_filter())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("BEACON_FAULT")
            .env_remove("BEACON_REGISTRY_USERNAME")
            .env_remove("BEACON_REGISTRY_PASSWORD");
    }

    /// Kills provider `i` with SIGKILL (no goodbye to its peers).
    pub fn kill_provider(&mut self, i: usize) {
        self.providers[i].proc = None;
    }

    /// Starts a router in the operator's namespace with extra flags, and waits until it
    /// knows `expect` providers; returns its index.
    pub fn add_router(&mut self, extra: &[&str], expect: usize) -> anyhow::Result<usize> {
        self.add_router_env(extra, &[], expect)
    }

    /// [`Cluster::add_router`] with environment variables set for the router.
    pub fn add_router_env(
        &mut self,
        extra: &[&str],
        env: &[(String, String)],
        expect: usize,
    ) -> anyhow::Result<usize> {
        let data = tempfile::Builder::new()
            .prefix("beacon-bench-router")
            .tempdir()?;
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut r = Router {
            addr,
            args,
            env: env.to_vec(),
            data,
            proc: None,
        };
        self.start_router(&mut r, expect)?;
        self.routers.push(r);
        Ok(self.routers.len() - 1)
    }

    fn start_router(&self, r: &mut Router, expect: usize) -> anyhow::Result<()> {
        let mut c = Command::new(&self.config.bins.router);
        c.arg("serve")
            .arg("--data-dir")
            .arg(r.data.path())
            .arg("--listen")
            .arg(r.addr.to_string())
            .arg("--p2p-listen")
            .arg(format!(
                "/ip4/{}/udp/0/quic-v1",
                self.wan.operator_address()
            ))
            .args(["--advert-expiry", "8"])
            // The bench's regions are network namespaces on private addresses.
            .args(["--dial-private", "true"]);
        if let Some(b) = &self.bootstrap {
            c.args(["--bootstrap", b]);
        }
        if let Some(pin) = &self.pin
            && !r.args.iter().any(|a| a == "--model-pin")
        {
            c.args(["--model-pin", pin]);
        }
        c.args(&r.args)
            .env("BEACON_LOG", log_filter())
            .env_remove("BEACON_ROUTER_API_KEYS")
            .env_remove("BEACON_REMOTE_API_KEY")
            .env_remove("BEACON_ALLOWED_REGIONS")
            .envs(r.env.iter().map(|(k, v)| (k, v)));
        r.proc = Some(
            Proc::spawn(&mut c, &r.data.path().join("router.log"))
                .context("starting beacon-router")?,
        );
        if !wait_for_http(r.addr, "/healthz", Duration::from_secs(60)) {
            bail!("router did not start:\n{}", tail(&r.log(), 20));
        }
        let start = Instant::now();
        while routable(r) < expect {
            if start.elapsed() > Duration::from_secs(90) {
                bail!(
                    "the router knows {} of {expect} providers after 90 s:\n{}",
                    routable(r),
                    tail(&r.log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// Kills router `i` (SIGKILL) and starts it again on the same data directory (and a new
    /// port); returns how long until it knew `expect` providers again.
    pub fn restart_router(&mut self, i: usize, expect: usize) -> anyhow::Result<Duration> {
        let mut r = self.routers.remove(i);
        r.proc = None;
        let start = Instant::now();
        // A new port: the old one may linger in TIME_WAIT.
        r.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let res = self.start_router(&mut r, expect);
        self.routers.insert(i, r);
        res.map(|()| start.elapsed())
    }

    /// Kills router `i` (SIGKILL) and forgets it.
    pub fn remove_router(&mut self, i: usize) {
        self.routers.remove(i);
    }

    /// Starts the local supervisor: `gguf` packaged as [`SUPERVISOR_MODEL`] with the chat
    /// template it carries, served off the network on loopback with `threads` threads and
    /// SmolLM2's trained context.
    pub fn add_supervisor(&mut self, gguf: &Path, threads: usize) -> anyhow::Result<()> {
        let data = tempfile::Builder::new()
            .prefix("beacon-bench-supervisor")
            .tempdir()?;
        let out = self
            .node_command(data.path())
            .args(["model", "package", "--gguf"])
            .arg(gguf)
            .arg(SUPERVISOR_MODEL)
            .output()
            .context("running beacon-node model package")?;
        if !out.status.success() {
            bail!(
                "packaging {}: {}",
                gguf.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = self.node_command(data.path());
        cmd.args(["serve", "--no-network", "--listen"])
            .arg(addr.to_string())
            .args(["--parallel", "1", "--ctx-size", "8192", "--threads"])
            .arg(threads.to_string());
        let proc = Proc::spawn(&mut cmd, &data.path().join("serve.log"))
            .context("starting the supervisor node")?;
        let s = Supervisor {
            addr,
            model: SUPERVISOR_MODEL.into(),
            data,
            _proc: proc,
        };
        if !wait_for_http(addr, "/healthz", Duration::from_secs(60)) {
            bail!("the supervisor did not start:\n{}", tail(&s.log(), 20));
        }
        self.supervisor = Some(s);
        Ok(())
    }
}

impl Cluster {
    /// Copies every provider's and router's log into `dir` (`<name>.log`, `router-<i>.log`).
    pub fn save_logs(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for p in &self.providers {
            std::fs::write(dir.join(format!("{}.log", p.name)), p.log())?;
        }
        for (i, r) in self.routers.iter().enumerate() {
            std::fs::write(dir.join(format!("router-{i}.log")), r.log())?;
        }
        if let Some(s) = &self.supervisor {
            std::fs::write(dir.join("supervisor.log"), s.log())?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.routers.clear();
        self.providers.clear();
        self.supervisor = None;
    }
}

/// The log filter of every process started: `BEACON_BENCH_LOG`, else `info`.
fn log_filter() -> String {
    std::env::var("BEACON_BENCH_LOG").unwrap_or_else(|_| "info".into())
}

/// Providers a router can place on now: known, serving the model, not quarantined, circuit
/// closed, with a measured round trip (before that, placement cannot tell near from far).
pub fn routable(r: &Router) -> usize {
    r.providers()
        .iter()
        .filter(|p| {
            !p["quarantined"].as_bool().unwrap_or(true)
                && !p["circuit_open"].as_bool().unwrap_or(true)
                && p["rtt_ms"].as_f64().is_some()
                && p["models"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.ends_with(MODEL)))
                })
        })
        .count()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The quantisation a `q2-swap`/`q3-swap` fault swaps the model for.
fn swap_target(fault: &str) -> Option<&'static str> {
    match fault {
        "q2-swap" => Some("q2_k"),
        "q3-swap" => Some("q3_k_m"),
        _ => None,
    }
}
