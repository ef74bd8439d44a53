//! `beacon-node`: the command line on a store of its own, and `serve` processes on
//! loopback or inside a region's network namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::http::{http, http_up};
use crate::models::{SUPERVISOR_MODEL_REF, TEST_MODEL_REF, test_model};
use crate::proc::{ChildGuard, log_filter, tail};
use crate::{bins, free_port};

/// A `beacon-node` command with its own data directory and an empty Docker config (so the
/// developer's `~/.docker/config.json` never leaks into a test).
pub struct NodeCli {
    pub data: tempfile::TempDir,
    pub docker_config: tempfile::TempDir,
    program: PathBuf,
}

impl Default for NodeCli {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeCli {
    /// On the `beacon-node` built alongside the running test.
    pub fn new() -> NodeCli {
        Self::with_program(bins::bin("beacon-node"))
    }

    /// On the `beacon-node` at `program`.
    pub fn with_program(program: PathBuf) -> NodeCli {
        NodeCli {
            data: tempfile::Builder::new()
                .prefix("beacon-node")
                .tempdir()
                .expect("a temporary directory"),
            docker_config: tempfile::tempdir().expect("a temporary directory"),
            program,
        }
    }

    pub fn command(&self) -> Command {
        self.command_in(None)
    }

    /// The command, run inside network namespace `netns` when given (`ip netns exec`).
    pub fn command_in(&self, netns: Option<&str>) -> Command {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        c.env("BEACON_DATA_DIR", self.data.path())
            .env("DOCKER_CONFIG", self.docker_config.path())
            .env("BEACON_LOG", log_filter())
            // Packaging a model anywhere gives the same digest, as a registry would.
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("BEACON_FAULT")
            .env_remove("BEACON_REGISTRY_USERNAME")
            .env_remove("BEACON_REGISTRY_PASSWORD");
        c
    }

    /// Packages the test model into this store as [`TEST_MODEL_REF`].
    pub fn package_test_model(&self) {
        self.ok(&[
            "model",
            "package",
            "--gguf",
            test_model().to_str().expect("a UTF-8 path"),
            TEST_MODEL_REF,
        ]);
    }

    /// Packages `gguf` into this store as `reference`.
    pub fn package(&self, gguf: &Path, reference: &str) -> anyhow::Result<()> {
        let out = self
            .command()
            .args(["model", "package", "--gguf"])
            .arg(gguf)
            .arg(reference)
            .output()
            .context("running beacon-node model package")?;
        if !out.status.success() {
            bail!(
                "packaging {}: {}",
                gguf.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The manifest digest of `reference` in this store.
    pub fn digest_of(&self, reference: &str) -> String {
        self.ok(&["model", "inspect", "--digest", reference])
            .trim()
            .to_string()
    }

    /// Runs `beacon-node ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("running beacon-node")
    }

    /// Runs and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "beacon-node {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and asserts failure, returning stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "beacon-node {args:?} unexpectedly succeeded"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn store(&self) -> PathBuf {
        self.data.path().join("models")
    }

    /// Names of the files in `blobs/sha256`.
    pub fn blobs(&self) -> Vec<String> {
        list_dir(&self.store().join("blobs/sha256"))
    }

    /// Names of the files in `tmp` other than lock files.
    pub fn partials(&self) -> Vec<String> {
        list_dir(&self.store().join("tmp"))
            .into_iter()
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    }

    /// `model ls --json`, parsed.
    pub fn models(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["model", "ls", "--json"])).expect("model ls --json")
    }
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// How a node is served: where its API listens, inside which network namespace, with
/// which flags and environment. Flags the harness sets by default (context, parallel
/// sequences, one engine thread, peer-to-peer and data-plane listeners on the API's
/// address, a 2 s advert interval) give way to the caller's.
#[derive(Clone, Debug)]
pub struct Serve {
    pub listen: SocketAddr,
    pub netns: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// How long to wait for its API to answer.
    pub wait: Duration,
}

impl Serve {
    /// On a free loopback port, with `args`.
    pub fn loopback(args: &[&str]) -> Serve {
        Serve {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            netns: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            wait: Duration::from_secs(30),
        }
    }

    fn command_line(&self) -> Vec<String> {
        let ip = self.listen.ip();
        let p2p = format!("/ip4/{ip}/udp/0/quic-v1,/ip4/{ip}/tcp/0");
        let data_plane = format!("{ip}:0");
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            self.listen.to_string(),
        ];
        for (flag, default) in [
            ("--ctx-size", "2048"),
            ("--parallel", "4"),
            // One engine thread: a test runs several nodes, and tests run two at a time on
            // a 2-core CI machine, where engines using every core spin against each other.
            ("--threads", "1"),
            ("--p2p-listen", p2p.as_str()),
            ("--data-plane", data_plane.as_str()),
            ("--advert-interval", "2"),
        ] {
            if !self.args.iter().any(|a| a == flag) {
                args.extend([flag.to_string(), default.to_string()]);
            }
        }
        args.extend(self.args.iter().cloned());
        args
    }
}

/// A running `beacon-node serve`; killed when dropped.
pub struct NodeServer {
    pub cli: NodeCli,
    pub addr: SocketAddr,
    serve: Serve,
    child: Option<ChildGuard>,
}

impl NodeServer {
    /// Starts `beacon-node serve` on loopback with the test model packaged as
    /// [`TEST_MODEL_REF`] and extra flags. Unless told otherwise it joins a network on
    /// loopback with ephemeral ports and advertises every 2 s; its log goes to `serve.log`
    /// in its data dir.
    pub fn start(extra: &[&str]) -> NodeServer {
        let cli = NodeCli::new();
        cli.package_test_model();
        Self::start_with_store(cli, extra)
    }

    /// A node off the network serving the supervisor model ([`crate::supervisor_model`],
    /// with the chat template its GGUF carries) as [`SUPERVISOR_MODEL_REF`]: a stand-in for
    /// a remote OpenAI-compatible API. Its context is SmolLM2's trained length.
    pub fn supervisor() -> NodeServer {
        Self::supervisor_of(NodeCli::new(), &crate::supervisor_model(), 1)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`NodeServer::supervisor`] on `cli`, serving `gguf` with `threads` threads.
    pub fn supervisor_of(cli: NodeCli, gguf: &Path, threads: usize) -> anyhow::Result<NodeServer> {
        cli.package(gguf, SUPERVISOR_MODEL_REF)?;
        let threads = threads.to_string();
        Self::launch(
            cli,
            Serve::loopback(&[
                "--no-network",
                "--parallel",
                "1",
                "--ctx-size",
                "8192",
                "--threads",
                &threads,
            ]),
        )
    }

    /// Like [`NodeServer::start`], on a store prepared by the caller.
    pub fn start_with_store(cli: NodeCli, extra: &[&str]) -> NodeServer {
        Self::launch(cli, Serve::loopback(extra)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Serves `cli`'s store as `serve` says, and waits until its API answers.
    pub fn launch(cli: NodeCli, serve: Serve) -> anyhow::Result<NodeServer> {
        let mut node = NodeServer {
            cli,
            addr: serve.listen,
            serve,
            child: None,
        };
        node.restart()?;
        Ok(node)
    }

    /// Starts the process (again, after a kill: same store, same identity, same flags).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let mut c = self.cli.command_in(self.serve.netns.as_deref());
        c.args(self.serve.command_line())
            .envs(self.serve.env.iter().map(|(k, v)| (k, v)));
        let log = self.cli.data.path().join("serve.log");
        self.child = Some(ChildGuard::spawn(&mut c, &log).context("starting beacon-node serve")?);
        if !http_up(self.addr, "/healthz", self.serve.wait) {
            bail!(
                "beacon-node serve at {} did not answer within {:?}:\n{}",
                self.addr,
                self.serve.wait,
                tail(&self.log(), 20)
            );
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its OpenAI-compatible base URL (a router's `--remote-base-url`).
    pub fn base_url(&self) -> String {
        self.url("/engines/v1")
    }

    /// `GET /beacon/node`: peer id, listen addresses, data-plane address.
    pub fn node_info(&self) -> serde_json::Value {
        http("GET", &self.url("/beacon/node"), None, &[]).json()
    }

    /// [`NodeServer::node_info`], or nothing when the node does not answer with JSON.
    pub fn try_info(&self) -> Option<serde_json::Value> {
        http("GET", &self.url("/beacon/node"), None, &[]).try_json()
    }

    pub fn peer_id(&self) -> String {
        self.node_info()["peer_id"]
            .as_str()
            .expect("a peer id")
            .to_string()
    }

    /// A libp2p address others can bootstrap from (the QUIC one).
    pub fn bootstrap_addr(&self) -> String {
        self.node_info()["listen_addrs"]
            .as_array()
            .expect("listen addresses")
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.contains("quic-v1"))
            .expect("a QUIC listen address")
            .to_string()
    }

    pub fn data_plane(&self) -> SocketAddr {
        self.node_info()["data_plane"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("a data-plane address")
    }

    /// Peer ids of the providers this node knows from adverts.
    pub fn known_providers(&self) -> Vec<String> {
        http("GET", &self.url("/beacon/providers"), None, &[]).json()["providers"]
            .as_array()
            .expect("a provider list")
            .iter()
            .filter_map(|p| p["peer_id"].as_str().map(str::to_string))
            .collect()
    }

    /// The manifest digest of the first model served (the packaged test model).
    pub fn model_digest(&self) -> String {
        let v = http("GET", &self.url("/models"), None, &[]).json();
        v[0]["id"].as_str().expect("a served model").to_string()
    }

    /// Requests this node is running now (its `beacon_in_flight` gauges summed).
    pub fn in_flight(&self) -> f64 {
        http("GET", &self.url("/metrics"), None, &[])
            .body
            .lines()
            .filter(|l| l.starts_with("beacon_in_flight{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.cli.data.path().join("serve.log")).unwrap_or_default()
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::id)
    }

    /// Whether the process was started and not killed since.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with SIGKILL (no goodbye to its peers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }
}

/// `TEST_MODEL_REF=<digest>`: the pin a router needs to serve the test model by name.
/// Packaging is deterministic, so the digest is worked out once, in a scratch store.
pub fn test_model_pin() -> String {
    static PIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PIN.get_or_init(|| {
        let cli = NodeCli::new();
        cli.package_test_model();
        format!("{TEST_MODEL_REF}={}", cli.digest_of(TEST_MODEL_REF))
    })
    .clone()
}
