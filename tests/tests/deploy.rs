//! Deployment, for real: the container images (built on a base made with debootstrap, since
//! nothing can be pulled here), `provider-image/onboard.sh` (dry runs on a CPU host and on a
//! GPU host faked by a `nvidia-smi` stub on `PATH`; real onboardings in container and in
//! bare-metal mode that join a running network and become visible to a router; uninstall),
//! the Compose stack losing a provider in the middle of a MinionS job, and the Kubernetes
//! manifests against the Kubernetes schemas.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use beacon_harness::{
    ChildGuard, NodeCli, NodeServer, Registry, RouterServer, bin, free_port, http, http_within,
    test_model, wait_until,
};
use serde_json::{Value, json};

const TAG: &str = "test";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Builds beacon-base, beacon-node:test, beacon-router:test and beacon-registry:test once
/// per test process, from the binaries these tests were built with.
fn images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let bin_dir = bin("beacon-node").parent().unwrap().to_path_buf();
        let script = repo().join("ops/build-images.sh");
        let out = sh(
            script.to_str().unwrap(),
            &["--bin-dir", bin_dir.to_str().unwrap(), "--tag", TAG],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(text(&out))
        }
    });
    if let Err(e) = r {
        panic!("building the images failed:\n{e}");
    }
}

/// A running network to join: a registry holding the test model, a provider, a router.
struct TestNet {
    _registry: Registry,
    model_ref: String,
    provider: NodeServer,
    router: RouterServer,
}

fn test_net() -> TestNet {
    let registry = Registry::start();
    let model_ref = format!("{}/ai/smollm2:onboard", registry.host());
    let publisher = NodeCli::new();
    publisher.ok(&[
        "model",
        "package",
        "--gguf",
        test_model().to_str().unwrap(),
        "--push",
        &model_ref,
    ]);
    let provider = NodeServer::start(&["--region", "eu-west"]);
    let router = RouterServer::start(Some(&provider.bootstrap_addr()), &[]);
    let p = provider.peer_id();
    assert!(
        wait_until(Duration::from_secs(60), || router.providers().contains(&p)),
        "{}",
        router.log()
    );
    TestNet {
        _registry: registry,
        model_ref,
        provider,
        router,
    }
}

fn onboard_command(args: &[&str], path_prefix: Option<&Path>) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo().join("provider-image/onboard.sh"))
        .args(args)
        .current_dir(repo())
        .env("BEACON_LOG", "info");
    if let Some(dir) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", dir.display()));
    }
    c
}

fn onboard(args: &[&str], path_prefix: Option<&Path>) -> Output {
    onboard_command(args, path_prefix).output().unwrap()
}

/// The peer id an onboarding printed.
fn printed_peer_id(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("peer id"))
        .map(|s| s.trim().to_string())
        .filter(|s| s.starts_with("12D3"))
}

fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A folder whose `nvidia-smi` answers like a host with one H100 (`working`) or like a host
/// whose driver is not loaded.
fn fake_gpu(working: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = if working {
        "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15'\n"
    } else {
        "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n"
    };
    let path = dir.path().join("nvidia-smi");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Everything under `dir`, relative.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn scripts_are_shellcheck_clean() {
    let mut scripts = vec!["provider-image/onboard.sh".to_string()];
    for e in std::fs::read_dir(repo().join("ops")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sh") {
            scripts.push(format!("ops/{name}"));
        }
    }
    let args: Vec<&str> = scripts.iter().map(String::as_str).collect();
    let out = sh("shellcheck", &args);
    assert!(out.status.success(), "shellcheck:\n{}", text(&out));
}

#[test]
fn dry_run_on_a_cpu_host_prints_every_action_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (prefix, data, state) = (r.join("bin"), r.join("data"), r.join("state"));
    let node = bin("beacon-node");
    let common = [
        "--dry-run",
        "--region",
        "eu-west",
        "--bootstrap",
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        "--model",
        "localhost:5000/ai/smollm2:135M-Q4_1",
        "--min-disk-gb",
        "1",
    ];
    let dirs = [
        "--binary",
        node.to_str().unwrap(),
        "--prefix",
        prefix.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];

    // Review L6: a reference with a quote rewrote the JSON body of /models/create.
    let out = onboard(
        &["--dry-run", "--model", r#"x","from":"evil.example/a:b"#],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a model reference"),
        "{}",
        text(&out)
    );

    // Bare metal, as a systemd unit (printed, not written: there is no systemd here).
    let mut args = common.to_vec();
    args.extend(dirs);
    args.extend(["--mode", "bare-metal", "--service", "systemd"]);
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("no NVIDIA GPU"), "{t}");
    assert!(
        t.contains(&format!("install -D -m 0755 {}", node.display())),
        "{t}"
    );
    assert!(t.contains("model pull --progress none localhost:5000/ai/smollm2:135M-Q4_1"));
    assert!(t.contains("[Service]") && t.contains("serve"), "{t}");
    assert!(t.contains("Environment=\"BEACON_REGION=eu-west\""), "{t}");
    assert!(t.contains("systemctl daemon-reload"), "{t}");
    assert!(!t.contains("BEACON_GPU_LAYERS"), "{t}");
    assert!(t.contains("nothing was changed"), "{t}");
    // Review M10: as root, the unit runs as its own user in a sandbox, not as root.
    if is_root() {
        for line in [
            "User=beacon",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "NoNewPrivileges=yes",
            "MemoryMax=",
        ] {
            assert!(t.contains(line), "the unit lacks {line:?}: {t}");
        }
        assert!(
            t.contains(&format!("chown -R beacon:beacon {}", data.display())),
            "{t}"
        );
    }
    // On loopback the API keeps no token; beyond it, the node makes one in its data dir
    // (review H5: it refuses to listen beyond loopback without one).
    assert!(!t.contains("BEACON_API_TOKEN_FILE"), "{t}");
    let mut args = common.to_vec();
    args.extend(dirs);
    args.extend([
        "--mode",
        "bare-metal",
        "--service",
        "systemd",
        "--api-listen",
        "0.0.0.0:12434",
        "--allow-routers",
        "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
    ]);
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "Environment=\"BEACON_API_TOKEN_FILE={}/api-token\"",
            data.display()
        )),
        "{t}"
    );
    assert!(
        t.contains("BEACON_DATA_PLANE_ALLOW=12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
        "{t}"
    );

    // Bare metal in the foreground.
    let mut args = common.to_vec();
    args.extend(dirs);
    args.extend(["--mode", "bare-metal", "--service", "foreground"]);
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("serve   (in the foreground"), "{t}");

    // Container mode: the plan names every docker command, without --gpus.
    let name = format!("beacon-dry-{}", std::process::id());
    let mut args = common.to_vec();
    args.extend([
        "--mode",
        "container",
        "--image",
        "beacon-node:absent-here",
        "--name",
        &name,
        "--volume",
        &name,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("docker pull beacon-node:absent-here"), "{t}");
    assert!(t.contains(&format!("docker volume create {name}")), "{t}");
    assert!(
        t.contains(&format!(
            "docker run -d --name {name} --restart unless-stopped"
        )),
        "{t}"
    );
    assert!(!t.contains("--gpus"), "{t}");

    // Nothing was made: no files, no volume, no container.
    assert!(tree(r).is_empty(), "{:?}", tree(r));
    assert!(!docker_ok(&["volume", "inspect", &name]));
    assert!(!docker_ok(&["container", "inspect", &name]));
}

#[test]
fn dry_run_on_a_gpu_host_uses_the_gpus_and_explains_what_is_missing() {
    let gpu = fake_gpu(true);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let node = bin("beacon-node");
    let state = r.join("state");
    let (prefix, data) = (r.join("bin"), r.join("data"));
    let bare = [
        "--dry-run",
        "--mode",
        "bare-metal",
        "--service",
        "systemd",
        "--binary",
        node.to_str().unwrap(),
        "--prefix",
        prefix.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--min-disk-gb",
        "1",
    ];
    let out = onboard(&bare, Some(gpu.path()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("GPU: NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15"),
        "{t}"
    );
    assert!(t.contains("Environment=\"BEACON_GPU_LAYERS=999\""), "{t}");

    // Container mode needs the NVIDIA container toolkit to hand the GPUs to the container.
    let name = format!("beacon-dry-gpu-{}", std::process::id());
    let container = [
        "--dry-run",
        "--mode",
        "container",
        "--name",
        &name,
        "--volume",
        &name,
        "--state-dir",
        state.to_str().unwrap(),
        "--min-disk-gb",
        "1",
    ];
    let out = onboard(&container, Some(gpu.path()));
    let t = text(&out);
    let toolkit = Command::new("docker")
        .args(["info", "--format", "{{json .Runtimes}}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("nvidia"))
        .unwrap_or(false);
    if toolkit {
        assert!(out.status.success(), "{t}");
        assert!(
            t.contains("--gpus all") && t.contains("beacon-node:cuda"),
            "{t}"
        );
    } else {
        assert!(!out.status.success(), "{t}");
        assert!(t.contains("NVIDIA container toolkit is missing"), "{t}");
        assert!(t.contains("fix: install nvidia-container-toolkit"), "{t}");
        assert!(t.contains("nothing was changed"), "{t}");
    }

    // A driver that does not answer: a warning and the CPU, or an error with --gpus all.
    let broken = fake_gpu(false);
    let out = onboard(&bare, Some(broken.path()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("no working GPU driver"), "{t}");
    assert!(!t.contains("BEACON_GPU_LAYERS"), "{t}");
    let mut all = bare.to_vec();
    all.extend(["--gpus", "all"]);
    let out = onboard(&all, Some(broken.path()));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("cannot talk to the NVIDIA driver"), "{t}");
    assert!(t.contains("fix: install the NVIDIA driver"), "{t}");

    assert!(tree(r).is_empty(), "{:?}", tree(r));
    assert!(!docker_ok(&["volume", "inspect", &name]));
}

/// Runs a foreground onboarding until it reports the node on the network.
fn onboard_foreground(args: &[&str], log: &Path) -> (ChildGuard, String) {
    let file = std::fs::File::create(log).unwrap();
    let child = onboard_command(args, None)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let ok = wait_until(Duration::from_secs(240), || {
        let t = std::fs::read_to_string(log).unwrap_or_default();
        t.contains("this provider is on the network") || matches!(guard.0.try_wait(), Ok(Some(_)))
    });
    let t = std::fs::read_to_string(log).unwrap_or_default();
    assert!(ok && t.contains("this provider is on the network"), "{t}");
    let peer = printed_peer_id(&t).unwrap_or_else(|| panic!("no peer id in:\n{t}"));
    (guard, peer)
}

/// SIGTERM, as Ctrl-C or a service manager would stop it; the script stops its node.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stopped = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(stopped, "onboard.sh did not stop on SIGTERM");
}

fn assert_visible(router: &RouterServer, peer: &str, region: &str) {
    let seen = wait_until(Duration::from_secs(90), || {
        let v = http("GET", &router.url("/v1/providers"), None, &[]).json();
        v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == peer && p["region"] == region)
    });
    assert!(seen, "{peer} never reached the router:\n{}", router.log());
}

#[test]
fn bare_metal_onboarding_joins_the_network_and_uninstall_leaves_nothing() {
    let net = test_net();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (prefix, data, state) = (r.join("bin"), r.join("data"), r.join("state"));
    let work = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let (p2p, dp) = (free_port().to_string(), free_port().to_string());
    let node = bin("beacon-node");
    let boot = net.provider.bootstrap_addr();
    let dirs = [
        "--prefix",
        prefix.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut args = vec![
        "--mode",
        "bare-metal",
        "--service",
        "foreground",
        "--binary",
        node.to_str().unwrap(),
        "--region",
        "ap-south",
        "--bootstrap",
        &boot,
        "--model",
        &net.model_ref,
        "--api-listen",
        &api,
        "--p2p-port",
        &p2p,
        "--data-plane-port",
        &dp,
        "--public-host",
        "127.0.0.1",
        "--min-disk-gb",
        "1",
    ];
    args.extend(dirs);

    let log = work.path().join("onboard.log");
    let (mut first, peer) = onboard_foreground(&args, &log);
    assert_visible(&net.router, &peer, "ap-south");
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(t.contains("a new identity is created"), "{t}");
    assert!(prefix.join("beacon-node").is_file());
    // The onboarded node serves the starter model through the router.
    let body = json!({
        "model": net.model_ref,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8, "temperature": 0
    });
    let reply = http_within(
        "POST",
        &format!("http://{api}/engines/v1/chat/completions"),
        Some(&body.to_string()),
        &[],
        120,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    terminate(&mut first.0);
    assert!(
        !wait_until(Duration::from_secs(2), || {
            std::net::TcpStream::connect(&api).is_ok()
        }),
        "the node outlived its onboarding"
    );

    // Again: the identity and the installed binary are kept.
    let (mut second, peer2) = onboard_foreground(&args, &log);
    assert_eq!(peer, peer2);
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(t.contains("keeping the identity"), "{t}");
    assert!(t.contains("is up to date"), "{t}");
    terminate(&mut second.0);

    // Uninstall keeps models and identity; --purge removes them too.
    let mut un = vec!["--uninstall"];
    un.extend(dirs);
    let out = onboard(&un, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!prefix.join("beacon-node").exists());
    assert!(!state.exists());
    assert!(data.join("identity.key").is_file());
    un.push("--purge");
    let out = onboard(&un, None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(tree(r), vec!["bin".to_string()], "left behind");
}

/// Removes a test's container and volume, whatever happened.
struct DockerCleanup(String);

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn container_onboarding_joins_the_network_and_uninstall_leaves_nothing() {
    images();
    let net = test_net();
    let name = format!("beacon-onboard-{}", std::process::id());
    let _cleanup = DockerCleanup(name.clone());
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("state");
    let api = format!("127.0.0.1:{}", free_port());
    let (p2p, dp) = (free_port().to_string(), free_port().to_string());
    let boot = net.provider.bootstrap_addr();
    let image = format!("beacon-node:{TAG}");
    let args = [
        "--mode",
        "container",
        "--image",
        &image,
        "--name",
        &name,
        "--volume",
        &name,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--region",
        "ap-south",
        "--bootstrap",
        &boot,
        "--model",
        &net.model_ref,
        "--api-listen",
        &api,
        "--p2p-port",
        &p2p,
        "--data-plane-port",
        &dp,
        "--public-host",
        "127.0.0.1",
        "--min-disk-gb",
        "1",
    ];
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let peer = printed_peer_id(&t).unwrap_or_else(|| panic!("no peer id in:\n{t}"));
    assert_visible(&net.router, &peer, "ap-south");
    assert!(t.contains("model       "), "capabilities not printed:\n{t}");

    // Non-root, and Docker's own healthcheck (beacon-node healthcheck) passes.
    let user = sh("docker", &["inspect", "-f", "{{.Config.User}}", &name]);
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "beacon");
    let healthy = wait_until(Duration::from_secs(120), || {
        let o = sh(
            "docker",
            &["inspect", "-f", "{{.State.Health.Status}}", &name],
        );
        String::from_utf8_lossy(&o.stdout).trim() == "healthy"
    });
    assert!(
        healthy,
        "{}",
        text(&sh("docker", &["logs", "--tail", "30", &name]))
    );

    // Again: nothing changes, the identity stays.
    let out = onboard(&args, None);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("already running with this configuration"), "{t}");
    assert_eq!(printed_peer_id(&t).as_deref(), Some(peer.as_str()));

    // Uninstall: the container goes, the volume (models, identity) stays until --purge.
    let un = [
        "--uninstall",
        "--name",
        &name,
        "--volume",
        &name,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    let out = onboard(&un, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!docker_ok(&["container", "inspect", &name]));
    assert!(docker_ok(&["volume", "inspect", &name]));
    assert!(!state_dir.exists());
    let mut purge = un.to_vec();
    purge.push("--purge");
    let out = onboard(&purge, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!docker_ok(&["volume", "inspect", &name]));
    assert!(tree(state.path()).is_empty());
}

/// A Compose project, taken down (with its volumes) when dropped.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Output {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &self.project, "-f", "ops/compose.yaml"])
            .args(args)
            .current_dir(repo());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.output().expect("docker-compose")
    }

    fn logs(&self) -> String {
        text(&self.cmd(&["logs", "--no-color", "--tail", "40"]))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.cmd(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// The model the stack publishes (the providers' and the supervisor's), in a folder of its
/// own (a hard link, or a copy across filesystems).
fn models_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir_in(repo().join("target")).unwrap();
    let src = test_model();
    let name = src.file_name().unwrap().to_string_lossy().into_owned();
    let dst = dir.path().join(&name);
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst).unwrap();
    }
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, name)
}

#[test]
fn compose_stack_serves_chat_and_a_minions_job_through_the_loss_of_a_provider() {
    images();
    let (models, local) = models_dir();
    let port = free_port();
    let compose = Compose {
        project: format!("beacontest{}", std::process::id()),
        env: vec![
            ("BEACON_IMAGE_TAG".into(), TAG.into()),
            ("BEACON_ROUTER_PORT".into(), port.to_string()),
            (
                "BEACON_MODELS_DIR".into(),
                models.path().display().to_string(),
            ),
            ("BEACON_LOCAL_GGUF".into(), local),
            // Debug builds on two cores are slow; this test is about losing a provider.
            ("BEACON_ATTEMPT_TIMEOUT".into(), "600".into()),
        ],
    };
    let up = compose.cmd(&["up", "-d"]);
    assert!(up.status.success(), "{}\n{}", text(&up), compose.logs());
    let router = format!("http://127.0.0.1:{port}");
    let providers = || -> Vec<Value> {
        let r = http_within("GET", &format!("{router}/v1/providers"), None, &[], 10);
        if r.status != 200 {
            return Vec::new();
        }
        r.json()["providers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(300), || providers().len() == 2),
        "the router never saw both providers:\n{}",
        compose.logs()
    );
    let model = "registry:5000/ai/smollm2:135M-Q4_1";

    // A chat request, routed to a provider and verified.
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Name a large city in Europe."}],
        "max_tokens": 16, "temperature": 0
    });
    let r = http_within(
        "POST",
        &format!("{router}/v1/chat/completions"),
        Some(&body.to_string()),
        &[],
        300,
    );
    assert_eq!(r.status, 200, "{}\n{}", r.body, compose.logs());
    let v = r.json();
    assert_eq!(v["beacon"]["verified"], true, "{v}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    // A MinionS job, streamed; one provider container is killed once jobs are running.
    let paragraph = |i: usize| {
        format!(
            "Section {i}. The depot reviewed its maintenance schedule and staff training. \
             Rainfall was close to the ten-year average and the library kept its hours."
        )
    };
    let mut paras: Vec<String> = (0..12).map(paragraph).collect();
    paras.insert(
        6,
        "The launch code for Project Heron is BLUE-4471, set by the chief engineer.".into(),
    );
    let job = json!({
        "task": "What is the launch code for Project Heron?",
        "context": [paras.join("\n\n")],
        "max_rounds": 1,
        "stream": true,
        "policy": {"worker_max_tokens": 32, "max_jobs_per_round": 64}
    });
    let events = tempfile::NamedTempFile::new().unwrap();
    let mut body_file = tempfile::NamedTempFile::new().unwrap();
    body_file.write_all(job.to_string().as_bytes()).unwrap();
    let curl = Command::new("curl")
        .args([
            "-s",
            "-N",
            "--max-time",
            "900",
            "-H",
            "Content-Type: application/json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", body_file.path().display()))
        .arg(format!("{router}/v1/minions"))
        .stdout(events.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut curl = ChildGuard(curl);
    let read = || std::fs::read_to_string(events.path()).unwrap_or_default();
    let running = wait_until(Duration::from_secs(600), || {
        read().contains("event: job_finished") || matches!(curl.0.try_wait(), Ok(Some(_)))
    });
    assert!(
        running && read().contains("event: job_finished"),
        "{}\n{}",
        read(),
        compose.logs()
    );
    let kill = compose.cmd(&["kill", "-s", "SIGKILL", "provider-2"]);
    assert!(kill.status.success(), "{}", text(&kill));
    let done = wait_until(Duration::from_secs(900), || {
        matches!(curl.0.try_wait(), Ok(Some(_)))
    });
    assert!(done, "the job never finished:\n{}", read());
    let stream = read();
    let answer: Value = stream
        .split("\n\n")
        .find_map(|e| {
            e.strip_prefix("event: answer\ndata: ")
                .and_then(|d| serde_json::from_str(d).ok())
        })
        .unwrap_or_else(|| panic!("no answer event:\n{stream}\n{}", compose.logs()));
    let jobs = answer["jobs"].as_array().unwrap();
    assert!(!jobs.is_empty(), "{answer}");
    assert!(jobs.iter().all(|j| j["verified"] == true), "{answer}");
    assert_eq!(answer["verification"]["failed_jobs"], 0, "{answer}");
    assert!(answer["answer"].as_str().is_some(), "{answer}");
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    let dir = repo().join("ops/k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    // kubernetes-validate (PyPI) checks each resource against the Kubernetes JSON schemas.
    let mut args = vec!["-m", "kubernetes_validate", "--strict", "-k", "1.31.0"];
    args.extend(files.iter().map(String::as_str));
    let out = sh("python3", &args);
    assert!(out.status.success(), "{}", text(&out));

    // What the deployment needs, beyond what the schemas can say.
    let check = r#"
import sys, yaml
docs = {}
for path in sys.argv[1:]:
    for d in yaml.safe_load_all(open(path)):
        if d:
            docs[(d["kind"], d["metadata"]["name"])] = d
ds = docs[("DaemonSet", "beacon-provider")]["spec"]["template"]
c = ds["spec"]["containers"][0]
assert ds["spec"]["nodeSelector"], "no node selector"
assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
assert ds["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
assert any(v["name"] == "store" and "hostPath" in v for v in ds["spec"]["volumes"])
assert ds["spec"]["securityContext"]["runAsNonRoot"] is True
# Review M11: the store is handed to the image's user before anything writes to it.
init = ds["spec"]["initContainers"]
assert init[0]["name"] == "prepare-store" and "chown 10001:10001 /var/lib/beacon" in init[0]["command"][-1]
assert init[0]["securityContext"]["capabilities"]["add"] == ["CHOWN", "FOWNER"]
# Review H5: the API listens beyond loopback, with a token from a Secret (or the node's own).
env = {e["name"]: e for e in c["env"]}
assert env["BEACON_LISTEN"]["value"].startswith("0.0.0.0:")
assert env["BEACON_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "beacon-node-api"
cm = docs[("ConfigMap", "beacon-network")]["data"]
assert cm["BEACON_BOOTSTRAP"].startswith("/dns4/beacon-router-p2p.")
assert any(e.get("configMapRef", {}).get("name") == "beacon-network" for e in c["envFrom"])
dep = docs[("Deployment", "beacon-router")]["spec"]["template"]
assert dep["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
keys = [e for e in dep["spec"]["containers"][0]["env"] if e["name"] == "BEACON_ROUTER_API_KEYS"]
assert keys and not keys[0]["valueFrom"]["secretKeyRef"].get("optional"), "router without keys"
svc = docs[("Service", "beacon-router")]
assert all(dep["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
p2p = docs[("Service", "beacon-router-p2p")]
assert {p["protocol"] for p in p2p["spec"]["ports"]} == {"TCP", "UDP"}
print("ok", len(docs))
"#;
    let mut args = vec!["-c", check];
    args.extend(files.iter().map(String::as_str));
    let out = sh("python3", &args);
    assert!(out.status.success(), "{}", text(&out));
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
