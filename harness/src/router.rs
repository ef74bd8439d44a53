//! `beacon-router serve` processes on loopback (tests) or in the operator's namespace
//! (the bench's regions, where the router is dialled from the regions' addresses).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::http::{http, http_up};
use crate::models::SUPERVISOR_MODEL_REF;
use crate::node::{NodeServer, test_model_pin};
use crate::proc::{ChildGuard, log_filter, tail};
use crate::{bins, free_port};

/// How a router is started. The harness sets `--data-dir`, `--listen`, `--bootstrap` and,
/// unless `args` has them, `--p2p-listen` (on `p2p_host`) and `--advert-expiry 8`.
#[derive(Clone, Debug)]
pub struct RouterSpec {
    pub program: PathBuf,
    /// Where its libp2p listeners bind.
    pub p2p_host: String,
    pub bootstrap: Option<String>,
    pub args: Vec<String>,
    /// Environment set for it (secrets such as the supervisor's API key go here, never in
    /// `args`, which reports show).
    pub env: Vec<(String, String)>,
    /// How long to wait for its API to answer.
    pub wait: Duration,
}

/// A running `beacon-router serve`; killed when dropped.
pub struct RouterServer {
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    pub spec: RouterSpec,
    child: Option<ChildGuard>,
}

impl RouterServer {
    /// Starts a router that bootstraps from `bootstrap` (if any) with extra flags.
    pub fn start(bootstrap: Option<&str>, extra: &[&str]) -> RouterServer {
        Self::start_in(
            tempfile::tempdir().expect("a temporary directory"),
            bootstrap,
            extra,
        )
    }

    /// Starts a router whose MinionS supervisor is the node `sup` (see
    /// [`NodeServer::supervisor`]), with extra flags.
    pub fn with_supervisor(
        bootstrap: Option<&str>,
        sup: &NodeServer,
        extra: &[&str],
    ) -> RouterServer {
        Self::with_remote(bootstrap, &sup.base_url(), SUPERVISOR_MODEL_REF, extra)
    }

    /// Starts a router whose supervisor (remote API) is `model` at `base_url`, with extra
    /// flags.
    pub fn with_remote(
        bootstrap: Option<&str>,
        base_url: &str,
        model: &str,
        extra: &[&str],
    ) -> RouterServer {
        let mut flags = vec!["--remote-base-url", base_url, "--remote-model", model];
        flags.extend_from_slice(extra);
        Self::start(bootstrap, &flags)
    }

    /// Starts a router on loopback on an existing data dir (a restart keeps its
    /// reputations). Like an operator, it trusts the test model's name only at its digest
    /// unless `extra` pins models itself.
    pub fn start_in(
        data: tempfile::TempDir,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> RouterServer {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"--model-pin") {
            args.extend(["--model-pin".into(), test_model_pin()]);
        }
        let spec = RouterSpec {
            program: bins::bin("beacon-router"),
            p2p_host: "127.0.0.1".into(),
            bootstrap: bootstrap.map(str::to_string),
            args,
            env: Vec::new(),
            wait: Duration::from_secs(30),
        };
        Self::launch(data, spec).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts a router as `spec` says on a free loopback port, and waits until its API
    /// answers.
    pub fn launch(data: tempfile::TempDir, spec: RouterSpec) -> anyhow::Result<RouterServer> {
        let mut r = RouterServer {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data,
            spec,
            child: None,
        };
        r.spawn()?;
        Ok(r)
    }

    /// Kills the router (SIGKILL) and starts it again on the same data directory, on a new
    /// port (the old one may linger in TIME_WAIT).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let s = &self.spec;
        let mut c = Command::new(&s.program);
        c.arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--listen")
            .arg(self.addr.to_string());
        if !s.args.iter().any(|a| a == "--p2p-listen") {
            let h = &s.p2p_host;
            c.arg("--p2p-listen")
                .arg(format!("/ip4/{h}/udp/0/quic-v1,/ip4/{h}/tcp/0"));
        }
        if !s.args.iter().any(|a| a == "--advert-expiry") {
            c.args(["--advert-expiry", "8"]);
        }
        if let Some(b) = &s.bootstrap {
            c.args(["--bootstrap", b]);
        }
        c.args(&s.args)
            .env("BEACON_LOG", log_filter())
            .env_remove("BEACON_ROUTER_API_KEYS")
            .env_remove("BEACON_REMOTE_API_KEY")
            .env_remove("BEACON_ALLOWED_REGIONS")
            .envs(s.env.iter().map(|(k, v)| (k, v)));
        let log = self.data.path().join("router.log");
        self.child = Some(ChildGuard::spawn(&mut c, &log).context("starting beacon-router")?);
        if !http_up(self.addr, "/healthz", s.wait) {
            bail!(
                "beacon-router at {} did not answer within {:?}:\n{}",
                self.addr,
                s.wait,
                tail(&self.log(), 20)
            );
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("router.log")).unwrap_or_default()
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::id)
    }

    /// `GET /v1/providers`' entries, or none when the router does not answer.
    pub fn listing(&self) -> Vec<serde_json::Value> {
        http("GET", &self.url("/v1/providers"), None, &[])
            .try_json()
            .and_then(|v| v["providers"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Peer ids of the providers the router knows (panics when it does not answer).
    pub fn providers(&self) -> Vec<String> {
        self.strict_listing()
            .iter()
            .filter_map(|p| p["peer_id"].as_str().map(str::to_string))
            .collect()
    }

    /// `/v1/providers`' entry for `peer` (null when the router does not list it; panics
    /// when it does not answer).
    pub fn provider(&self, peer: &str) -> serde_json::Value {
        self.strict_listing()
            .into_iter()
            .find(|p| p["peer_id"] == peer)
            .unwrap_or(serde_json::Value::Null)
    }

    fn strict_listing(&self) -> Vec<serde_json::Value> {
        http("GET", &self.url("/v1/providers"), None, &[]).json()["providers"]
            .as_array()
            .expect("a provider list")
            .clone()
    }

    /// A counter or gauge from `/metrics`: the sum over its series whose labels contain
    /// `label` (`""` for all).
    pub fn metric(&self, name: &str, label: &str) -> f64 {
        let text = http("GET", &self.url("/metrics"), None, &[]).body;
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Stops the router and hands back its data dir, for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.kill();
        self.data
    }
}
