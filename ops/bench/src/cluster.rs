//! A Beacon network in emulated regions: provider nodes started in their regions'
//! namespaces, routers in the operator's, each a real `beacon-node` / `beacon-router`
//! process with its own data directory. Dropping a [`Cluster`] kills every process it
//! started, then removes the regions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use beacon_harness::node::{NodeCli, NodeServer, Serve};
use beacon_harness::router::{RouterServer, RouterSpec};
use beacon_harness::{Binaries, TEST_MODEL_REF};

use crate::wan::{Wan, WanConfig};

/// How the providers are run.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub wan: WanConfig,
    /// Providers in each region.
    pub per_region: usize,
    /// The GGUF every provider serves (packaged as [`TEST_MODEL_REF`]).
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
    /// Its process, until the bench kills it.
    pub node: NodeServer,
}

impl Provider {
    pub fn pid(&self) -> Option<u32> {
        self.node.running().then(|| self.node.pid())
    }

    pub fn alive(&self) -> bool {
        self.node.running()
    }

    pub fn log(&self) -> String {
        self.node.log()
    }
}

/// Providers in their regions, and the routers that use them.
pub struct Cluster {
    pub providers: Vec<Provider>,
    pub routers: Vec<RouterServer>,
    /// The MinionS supervisor when no remote API is named: a node off the network, in the
    /// operator's namespace, serving a model behind its OpenAI-compatible API.
    pub supervisor: Option<NodeServer>,
    config: ClusterConfig,
    bootstrap: Option<String>,
    /// `TEST_MODEL_REF=<digest>`: every router trusts the model's name only at this digest, as an
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
        let name = format!(
            "{region}-{}",
            self.providers.iter().filter(|p| p.region == region).count() + 1
        );
        // Packaging the model anywhere gives the same digest, as a registry would.
        let cli = NodeCli::with_program(self.config.bins.node.clone());
        cli.package(&self.config.model, TEST_MODEL_REF)?;
        // Attack (e): the verified blob swapped for a cheaper requantisation after the
        // pull, served by a node that skips its load-time check (`--fault unchecked`).
        if let Some(to) = fault.and_then(swap_target) {
            self.swap_blob(&cli, to)?;
        }
        if self.pin.is_none() {
            self.pin = Some(format!(
                "{TEST_MODEL_REF}={}",
                cli.digest_of(TEST_MODEL_REF)
            ));
        }
        let serve = self.serve(ip, region, fault, shape)?;
        let node = NodeServer::launch(cli, serve)
            .with_context(|| format!("starting provider {name} in {region}"))?;
        let info = node.try_info().context("GET /beacon/node")?;
        if self.bootstrap.is_none() {
            self.bootstrap = info["listen_addrs"].as_array().and_then(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .find(|x| x.contains("quic-v1"))
                    .map(str::to_string)
            });
        }
        self.providers.push(Provider {
            name,
            region: region.to_string(),
            http: node.addr,
            peer_id: info["peer_id"].as_str().unwrap_or_default().to_string(),
            fault: fault.map(str::to_string),
            shape,
            node,
        });
        Ok(self.providers.len() - 1)
    }

    /// How a provider in `region` at `ip` is served.
    fn serve(
        &mut self,
        ip: std::net::Ipv4Addr,
        region: &str,
        fault: Option<&str>,
        shape: Option<(usize, usize)>,
    ) -> anyhow::Result<Serve> {
        let c = &self.config;
        let (threads, parallel) = shape.unwrap_or((c.threads, c.parallel));
        let mut args: Vec<String> = [
            "--region",
            region,
            "--p2p-listen",
            &format!("/ip4/{ip}/udp/0/quic-v1"),
            "--advert-interval",
            "2",
            "--keep-alive=-1",
            // The API listens in the region's namespace, which only this bench reaches.
            "--api-open",
            "--threads",
            &threads.to_string(),
            "--parallel",
            &parallel.to_string(),
            "--ctx-size",
            &c.ctx_size.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(b) = &self.bootstrap {
            args.extend(["--bootstrap".into(), b.clone()]);
        }
        let env = fault
            .map(|f| {
                let f = if swap_target(f).is_some() {
                    "unchecked"
                } else {
                    f
                };
                vec![("BEACON_FAULT".to_string(), f.to_string())]
            })
            .unwrap_or_default();
        Ok(Serve {
            listen: SocketAddr::from((ip, self.port())),
            netns: Some(self.wan.namespace(region).context("region namespace")?),
            args,
            env,
            wait: Duration::from_secs(60),
        })
    }

    /// Starts provider `i` again after a kill: same data directory, same identity.
    pub fn start_provider(&mut self, i: usize) -> anyhow::Result<()> {
        self.providers[i].node.restart()
    }

    /// Replaces the model's GGUF blob in `cli`'s store with the model requantised `to`
    /// (llama.cpp's quantiser, through `beacon-node model requantize`).
    fn swap_blob(&self, cli: &NodeCli, to: &str) -> anyhow::Result<()> {
        let blobs = cli.store().join("blobs/sha256");
        let gguf = std::fs::read_dir(&blobs)
            .with_context(|| format!("reading {}", blobs.display()))?
            .filter_map(|e| e.ok())
            .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .map(|e| e.path())
            .context("no blobs in the store")?;
        let cheap = cli.data.path().join(format!("cheaper-{to}.gguf"));
        let out = cli
            .command()
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

    /// Kills provider `i` with SIGKILL (no goodbye to its peers).
    pub fn kill_provider(&mut self, i: usize) {
        self.providers[i].node.kill();
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
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // Its libp2p listener is on the operator's address, which the regions reach.
        args.extend([
            "--p2p-listen".into(),
            format!("/ip4/{}/udp/0/quic-v1", self.wan.operator_address()),
            // The bench's regions are network namespaces on private addresses.
            "--dial-private".into(),
            "true".into(),
        ]);
        if let Some(pin) = &self.pin
            && !extra.contains(&"--model-pin")
        {
            args.extend(["--model-pin".into(), pin.clone()]);
        }
        let spec = RouterSpec {
            program: self.config.bins.router.clone(),
            p2p_host: self.wan.operator_address().to_string(),
            bootstrap: self.bootstrap.clone(),
            args,
            env: env.to_vec(),
            wait: Duration::from_secs(60),
        };
        let r = RouterServer::launch(data, spec)?;
        wait_routable(&r, expect)?;
        self.routers.push(r);
        Ok(self.routers.len() - 1)
    }

    /// Kills router `i` (SIGKILL) and starts it again on the same data directory (and a new
    /// port); returns how long until it knew `expect` providers again.
    pub fn restart_router(&mut self, i: usize, expect: usize) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let r = &mut self.routers[i];
        r.restart()?;
        wait_routable(r, expect)?;
        Ok(start.elapsed())
    }

    /// Kills router `i` (SIGKILL) and forgets it.
    pub fn remove_router(&mut self, i: usize) {
        self.routers.remove(i);
    }

    /// Starts the local supervisor: `gguf` packaged as the supervisor model with the chat
    /// template it carries, served off the network on loopback with `threads` threads and
    /// SmolLM2's trained context.
    pub fn add_supervisor(&mut self, gguf: &Path, threads: usize) -> anyhow::Result<()> {
        let cli = NodeCli::with_program(self.config.bins.node.clone());
        self.supervisor = Some(NodeServer::supervisor_of(cli, gguf, threads)?);
        Ok(())
    }
}

/// Waits until `r` can place on `expect` providers (90 s at most).
fn wait_routable(r: &RouterServer, expect: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    while routable(r) < expect {
        if start.elapsed() > Duration::from_secs(90) {
            bail!(
                "the router knows {} of {expect} providers after 90 s:\n{}",
                routable(r),
                beacon_harness::proc::tail(&r.log(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
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

/// Providers a router can place on now: known, serving the model, not quarantined, circuit
/// closed, with a measured round trip (before that, placement cannot tell near from far).
pub fn routable(r: &RouterServer) -> usize {
    r.listing()
        .iter()
        .filter(|p| {
            !p["quarantined"].as_bool().unwrap_or(true)
                && !p["circuit_open"].as_bool().unwrap_or(true)
                && p["rtt_ms"].as_f64().is_some()
                && p["models"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.ends_with(TEST_MODEL_REF)))
                })
        })
        .count()
}

/// The quantisation a `q2-swap`/`q3-swap` fault swaps the model for.
fn swap_target(fault: &str) -> Option<&'static str> {
    match fault {
        "q2-swap" => Some("q2_k"),
        "q3-swap" => Some("q3_k_m"),
        _ => None,
    }
}
