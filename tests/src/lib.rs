//! Shared helpers for Beacon's end-to-end tests: the built binaries, the real test model, a
//! real OCI registry process (Debian `docker-registry`) on a loopback port, and a TCP relay
//! that can slow a connection down or cut it, to play a slow or failing network. Every
//! process started here is killed when its guard drops.

pub use beacon_bench::load as bench;

pub mod data_plane;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Path of a workspace binary built alongside the tests (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop(); // test binary name
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --workspace` (ops/test.sh does)",
        path.display()
    );
    path
}

/// The MinionS tests' supervisor: `BEACON_SUPERVISOR_MODEL` when set, else the test model
/// itself, SmolLM2-135M-Instruct (the one instruction-tuned GGUF the package registries
/// offer at a size two CPU cores run; a pretrained model continues text instead of
/// following a supervisor's instructions).
pub fn supervisor_model() -> PathBuf {
    match std::env::var_os("BEACON_SUPERVISOR_MODEL") {
        Some(p) if !p.is_empty() => {
            let path = PathBuf::from(p);
            assert!(
                path.is_file(),
                "supervisor model {} (BEACON_SUPERVISOR_MODEL) missing",
                path.display()
            );
            path
        }
        _ => test_model(),
    }
}

/// The name the supervisor model is packaged under by [`NodeServer::supervisor`].
pub const SUPERVISOR_MODEL_REF: &str = "ai/smollm2:supervisor";

/// A data-plane request for the test model (`digest`), asking for token ids back.
pub fn infer_request(
    digest: beacon_proto::Digest,
    messages: Vec<beacon_proto::ChatMessage>,
    sampling: beacon_proto::Sampling,
) -> beacon_proto::InferRequest {
    beacon_proto::InferRequest {
        prompt: None,
        request_id: beacon_proto::Id::random(),
        job_id: None,
        model: beacon_proto::ModelSpec {
            reference: TEST_MODEL_REF.into(),
            digest,
        },
        messages,
        sampling,
        json_schema: None,
        deadline_ms: None,
        return_tokens: true,
    }
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `ops/setup.sh` caches. Tests that need it fail
/// (never skip) when it is missing.
pub fn test_model() -> PathBuf {
    let path = std::env::var_os("BEACON_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/beacon/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "test model {} missing: run ops/setup.sh (or set BEACON_TEST_MODEL)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real `docker-registry` (distribution 2.x) on a loopback port.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl Registry {
    pub fn start() -> Registry {
        Self::spawn(None)
    }

    /// With htpasswd basic auth for one user.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Self::spawn(Some((user, password)))
    }

    /// With token auth: `docker-registry` trusts JWTs from `tokens` (a [`TokenServer`]).
    pub fn start_with_token_auth(tokens: &TokenServer) -> Registry {
        let extra = format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.addr,
            TokenServer::SERVICE,
            TokenServer::ISSUER,
            tokens.cert_pem.display()
        );
        Self::spawn_with(None, Some(extra))
    }

    fn spawn(auth: Option<(&str, &str)>) -> Registry {
        Self::spawn_with(auth, None)
    }

    fn spawn_with(auth: Option<(&str, &str)>, extra: Option<String>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is needed for auth tests: run ops/setup.sh");
            assert!(out.status.success(), "htpasswd failed");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: beacon-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(extra) = extra {
            config.push_str(&extra);
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package) is needed: run ops/setup.sh");
        let guard = ChildGuard(child);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_http(addr, "/v2/", Duration::from_secs(20));
        Registry {
            addr,
            dir,
            _child: guard,
        }
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the registry keeps a blob's bytes (to corrupt them in tests).
    pub fn blob_data_path(&self, digest_hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&digest_hex[..2])
            .join(digest_hex)
            .join("data")
    }
}

/// Blocks until `GET path` on `addr` answers with any HTTP status.
pub use beacon_bench::http::{HttpReply, http, http_within};

/// Waits until `addr` answers HTTP on `path`; panics after `timeout`.
pub fn wait_for_http(addr: SocketAddr, path: &str, timeout: Duration) {
    assert!(
        beacon_bench::http::wait_for_http(addr, path, timeout),
        "{addr}{path} did not answer within {timeout:?}"
    );
}

/// Plays a network between clients and `target`: optionally slow (bytes per second from
/// the server), and optionally cutting the first `cut_first` server->client transfers after
/// `cut_after` bytes. Stops accepting when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RelayOptions {
    pub bytes_per_sec: Option<u64>,
    pub cut_after: Option<u64>,
    pub cut_first: usize,
}

impl Relay {
    pub fn start(target: SocketAddr, opts: RelayOptions) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let cut = match opts.cut_after {
                            Some(n) if cuts.fetch_add(1, Ordering::SeqCst) < opts.cut_first => {
                                Some(n)
                            }
                            _ => None,
                        };
                        relay_pair(client, server, opts.bytes_per_sec, cut, stop2.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay { addr, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay_pair(
    client: TcpStream,
    server: TcpStream,
    rate: Option<u64>,
    cut: Option<u64>,
    stop: Arc<AtomicBool>,
) {
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let n = match s_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let n = match cut {
                Some(limit) if sent + n as u64 >= limit => (limit - sent) as usize,
                _ => n,
            };
            if c_write.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            if cut.is_some_and(|limit| sent >= limit) {
                break;
            }
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let _ = c_write.shutdown(std::net::Shutdown::Both);
        let _ = s_read.shutdown(std::net::Shutdown::Both);
    });
}

/// A `beacon-node` command with its own data directory and an empty Docker config (so the
/// developer's `~/.docker/config.json` never leaks into a test).
pub struct NodeCli {
    pub data: tempfile::TempDir,
    pub docker_config: tempfile::TempDir,
}

impl Default for NodeCli {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeCli {
    pub fn new() -> NodeCli {
        NodeCli {
            data: tempfile::tempdir().unwrap(),
            docker_config: tempfile::tempdir().unwrap(),
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("beacon-node"));
        c.env("BEACON_DATA_DIR", self.data.path())
            .env("DOCKER_CONFIG", self.docker_config.path())
            .env("BEACON_LOG", "info")
            // Packaging the test model anywhere gives the same digest, as a registry would.
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("BEACON_REGISTRY_USERNAME")
            .env_remove("BEACON_REGISTRY_PASSWORD");
        c
    }

    /// Packages the test model into this store as [`TEST_MODEL_REF`].
    pub fn package_test_model(&self) {
        let model = test_model();
        self.ok(&[
            "model",
            "package",
            "--gguf",
            model.to_str().unwrap(),
            TEST_MODEL_REF,
        ]);
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
        serde_json::from_str(&self.ok(&["model", "ls", "--json"])).unwrap()
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

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap();
    beacon_proto::Digest::of(&bytes).hex()
}

/// Pushes a hand-made artifact with `curl` (monolithic blob uploads, then the manifest), to
/// test what other tools may push. Returns the manifest digest.
pub fn push_raw(
    registry: &str,
    repo: &str,
    tag: &str,
    config_media_type: &str,
    config: &[u8],
    layers: &[(&str, Vec<u8>, &str)],
) -> String {
    let upload = |bytes: &[u8]| {
        let digest = beacon_proto::Digest::of(bytes);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        // Start an upload session, then finish it in one PUT (distribution 2.x style).
        let out = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-D", "-", "-X", "POST"])
            .arg(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
            .output()
            .unwrap();
        assert!(out.status.success(), "upload start failed: {out:?}");
        let headers = String::from_utf8_lossy(&out.stdout).into_owned();
        let location = headers
            .lines()
            .find_map(|l| {
                l.strip_prefix("Location: ")
                    .or_else(|| l.strip_prefix("location: "))
            })
            .expect("Location header")
            .trim()
            .to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", tmp.path().display()))
            .arg(format!("{location}{sep}digest={digest}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "blob upload failed: {out:?}");
        (digest.to_string(), bytes.len())
    };
    let (config_digest, config_size) = upload(config);
    let layer_json: Vec<serde_json::Value> = layers
        .iter()
        .map(|(mt, bytes, path)| {
            let (d, s) = upload(bytes);
            serde_json::json!({"mediaType": mt, "digest": d, "size": s,
                "annotations": {"org.cncf.model.filepath": path}})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config_media_type, "digest": config_digest, "size": config_size},
        "layers": layer_json,
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &body).unwrap();
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
        ])
        .arg(format!("@{}", tmp.path().display()))
        .arg(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "manifest upload failed: {out:?}");
    beacon_proto::Digest::of(&body).to_string()
}

/// A minimal OAuth2 token service, as Docker Hub runs one: it takes a refresh token (a
/// Docker "identity token") at `POST /token` and answers with a JWT signed by its own
/// certificate (RS256 via `openssl`, the cert in the `x5c` header), which a real
/// `docker-registry` configured with `auth.token` verifies.
pub struct TokenServer {
    pub addr: SocketAddr,
    pub cert_pem: PathBuf,
    _dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
}

impl TokenServer {
    pub const SERVICE: &'static str = "beacon-test-registry";
    pub const ISSUER: &'static str = "beacon-test-issuer";

    /// Accepts exactly `refresh_token`.
    pub fn start(refresh_token: &str) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert_pem = dir.path().join("cert.pem");
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=beacon-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert_pem)
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed for token-auth tests");
        assert!(st.success());
        let der = Command::new("openssl")
            .args(["x509", "-outform", "der", "-in"])
            .arg(&cert_pem)
            .output()
            .unwrap();
        assert!(der.status.success());
        let x5c = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, refresh, key2) = (stop.clone(), refresh_token.to_string(), key.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let body = read_http_body(&mut s);
                        let form: std::collections::HashMap<String, String> = body
                            .split('&')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_string(), percent_decode(v)))
                            .collect();
                        let ok = form.get("grant_type").map(String::as_str)
                            == Some("refresh_token")
                            && form.get("refresh_token") == Some(&refresh);
                        let resp = if ok {
                            let scope = form.get("scope").cloned().unwrap_or_default();
                            let jwt = sign_jwt(&key2, &x5c, &scope);
                            let json = format!(r#"{{"access_token":"{jwt}","expires_in":600}}"#);
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                                json.len()
                            )
                        } else {
                            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                        };
                        let _ = s.write_all(resp.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TokenServer {
            addr,
            cert_pem,
            _dir: dir,
            stop,
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_http_body(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            }
        }
    }
    String::new()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sign_jwt(key: &Path, x5c: &str, scope: &str) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // scope = repository:NAME:ACTIONS
    let mut parts = scope.splitn(3, ':');
    let (_, name, actions) = (
        parts.next(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let actions: Vec<String> = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(|a| format!("\"{a}\""))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = format!(r#"{{"alg":"RS256","typ":"JWT","x5c":["{x5c}"]}}"#);
    let claims = format!(
        r#"{{"iss":"{}","sub":"beacon","aud":"{}","exp":{},"nbf":{},"iat":{now},"jti":"{now}-{}","access":[{{"type":"repository","name":"{name}","actions":[{}]}}]}}"#,
        TokenServer::ISSUER,
        TokenServer::SERVICE,
        now + 600,
        now - 10,
        std::process::id(),
        actions.join(",")
    );
    let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let sig = child.wait_with_output().unwrap().stdout;
    format!("{signing_input}.{}", b64(&sig))
}

/// `TEST_MODEL_REF=<digest>`: the pin a router needs to serve the test model by name.
/// Packaging is deterministic, so the digest is worked out once, in a scratch store.
pub fn test_model_pin() -> String {
    static PIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PIN.get_or_init(|| {
        let cli = NodeCli::new();
        cli.package_test_model();
        let digest = cli.ok(&["model", "inspect", "--digest", TEST_MODEL_REF]);
        format!("{TEST_MODEL_REF}={}", digest.trim())
    })
    .clone()
}

/// A running `beacon-node serve` with the test model packaged as `ai/smollm2:test`.
pub struct NodeServer {
    pub cli: NodeCli,
    pub addr: SocketAddr,
    child: ChildGuard,
}

/// The name the test model is packaged under in a [`NodeServer`].
pub const TEST_MODEL_REF: &str = "ai/smollm2:test";

impl NodeServer {
    /// Starts `beacon-node serve` with extra flags. Unless told otherwise it joins a network
    /// on loopback with ephemeral ports and advertises every 2 s; its log goes to
    /// `serve.log` in its data dir.
    pub fn start(extra: &[&str]) -> NodeServer {
        let cli = NodeCli::new();
        cli.package_test_model();
        Self::start_with_store(cli, extra)
    }

    /// A node off the network serving the supervisor model ([`supervisor_model`], with the
    /// chat template its GGUF carries) as [`SUPERVISOR_MODEL_REF`]: a stand-in for a remote
    /// OpenAI-compatible API. Its context is SmolLM2's trained length.
    pub fn supervisor() -> NodeServer {
        let cli = NodeCli::new();
        cli.ok(&[
            "model",
            "package",
            "--gguf",
            supervisor_model().to_str().unwrap(),
            SUPERVISOR_MODEL_REF,
        ]);
        Self::start_with_store(
            cli,
            &["--no-network", "--parallel", "1", "--ctx-size", "8192"],
        )
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

    /// Like [`NodeServer::start`], on a store prepared by the caller.
    pub fn start_with_store(cli: NodeCli, extra: &[&str]) -> NodeServer {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen];
        for (flag, default) in [
            ("--ctx-size", "2048"),
            ("--parallel", "4"),
            // One engine thread: a test runs several nodes, and tests run two at a time on
            // a 2-core CI machine, where engines using every core spin against each other.
            ("--threads", "1"),
            (
                "--p2p-listen",
                "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0",
            ),
            ("--data-plane", "127.0.0.1:0"),
            ("--advert-interval", "2"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, default]);
            }
        }
        let log = std::fs::File::create(cli.data.path().join("serve.log")).unwrap();
        let child = cli
            .command()
            .args(&args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let guard = ChildGuard(child);
        let addr: SocketAddr = listen.parse().unwrap();
        wait_for_http(addr, "/healthz", Duration::from_secs(30));
        NodeServer {
            cli,
            addr,
            child: guard,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /beacon/node`: peer id, listen addresses, data-plane address.
    pub fn node_info(&self) -> serde_json::Value {
        http("GET", &self.url("/beacon/node"), None, &[]).json()
    }

    pub fn peer_id(&self) -> String {
        self.node_info()["peer_id"].as_str().unwrap().to_string()
    }

    /// A libp2p address others can bootstrap from (the QUIC one).
    pub fn bootstrap_addr(&self) -> String {
        let info = self.node_info();
        info["listen_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .find(|a| a.contains("quic-v1"))
            .expect("a QUIC listen address")
    }

    pub fn data_plane(&self) -> SocketAddr {
        self.node_info()["data_plane"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Peer ids of the providers this node knows from adverts.
    pub fn known_providers(&self) -> Vec<String> {
        http("GET", &self.url("/beacon/providers"), None, &[]).json()["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["peer_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The manifest digest of the packaged test model.
    pub fn model_digest(&self) -> String {
        let v = http("GET", &self.url("/models"), None, &[]).json();
        v.as_array().unwrap()[0]["id"].as_str().unwrap().to_string()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.cli.data.path().join("serve.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Kills the process with SIGKILL (no goodbye to its peers).
    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

/// Polls `check` every 250 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    check()
}

/// A `beacon-router serve` process on loopback.
pub struct RouterServer {
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    child: ChildGuard,
}

impl RouterServer {
    /// Starts a router that bootstraps from `bootstrap` (if any) with extra flags.
    pub fn start(bootstrap: Option<&str>, extra: &[&str]) -> RouterServer {
        Self::start_in(tempfile::tempdir().unwrap(), bootstrap, extra)
    }

    /// Starts a router whose MinionS supervisor is the node `sup` (see
    /// [`NodeServer::supervisor`]), with extra flags.
    pub fn with_supervisor(
        bootstrap: Option<&str>,
        sup: &NodeServer,
        extra: &[&str],
    ) -> RouterServer {
        Self::with_remote(
            bootstrap,
            &sup.url("/engines/v1"),
            SUPERVISOR_MODEL_REF,
            extra,
        )
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

    /// Starts a router on an existing data dir (a restart).
    pub fn start_in(
        data: tempfile::TempDir,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> RouterServer {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut c = Command::new(bin("beacon-router"));
        c.args([
            "serve",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--listen",
            &listen,
            "--p2p-listen",
            "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0",
            "--advert-expiry",
            "8",
        ]);
        if let Some(b) = bootstrap {
            c.args(["--bootstrap", b]);
        }
        // Like an operator, the router trusts the test model's name only at its digest.
        if !extra.contains(&"--model-pin") {
            c.args(["--model-pin", &test_model_pin()]);
        }
        let log = std::fs::File::create(data.path().join("router.log")).unwrap();
        let child = c
            .args(extra)
            .env("BEACON_LOG", "info")
            .env_remove("BEACON_ROUTER_API_KEYS")
            .env_remove("BEACON_REMOTE_API_KEY")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr: SocketAddr = listen.parse().unwrap();
        let child = ChildGuard(child);
        wait_for_http(addr, "/healthz", Duration::from_secs(30));
        RouterServer { addr, data, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("router.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Peer ids of the providers the router knows.
    pub fn providers(&self) -> Vec<String> {
        http("GET", &self.url("/v1/providers"), None, &[]).json()["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["peer_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `/v1/providers`' entry for `peer` (null when the router does not list it).
    pub fn provider(&self, peer: &str) -> serde_json::Value {
        let v = http("GET", &self.url("/v1/providers"), None, &[]).json();
        v["providers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["peer_id"] == peer))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// Stops the router and hands back its data dir, for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.kill();
        self.data
    }
}

pub use beacon_net::now_ms;

/// An advert of `peer` that serves nothing (for tests that publish their own, honest or
/// forged).
pub fn advert_of(
    peer: beacon_proto::PeerId,
    timestamp_ms: u64,
    seq: u64,
) -> beacon_proto::ProviderAdvert {
    beacon_proto::ProviderAdvert {
        peer_id: peer,
        region: "test-region".into(),
        listen_addrs: vec![],
        data_plane: Some("127.0.0.1:1".into()),
        version: "test".into(),
        accelerators: vec![],
        host: beacon_proto::HostInfo::default(),
        engines: vec![],
        models: vec![],
        slots: beacon_proto::Slots {
            total: 1,
            busy: 0,
            queued: 0,
        },
        throughput: vec![],
        price: None,
        seq,
        timestamp_ms,
    }
}

/// An OpenAI-compatible endpoint that answers every chat completion with the next of its
/// replies, in turn: a remote supervisor that an attacker has persuaded (through a task or a
/// document it reads) to answer what the attacker wants. Used to stage attacks on the
/// router's handling of plans; the honest supervisor in the other tests is a real model.
pub struct ScriptedRemote {
    pub addr: SocketAddr,
    /// Chat completions answered so far.
    pub calls: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl ScriptedRemote {
    pub fn start(replies: Vec<String>) -> ScriptedRemote {
        Self::start_slow(replies, Duration::ZERO)
    }

    /// Like [`ScriptedRemote::start`], taking `delay` over every reply, as a remote model
    /// takes time to generate.
    pub fn start_slow(replies: Vec<String>, delay: Duration) -> ScriptedRemote {
        assert!(!replies.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (stop2, calls2) = (stop.clone(), calls.clone());
        let replies = Arc::new(replies);
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (calls, replies) = (calls2.clone(), replies.clone());
                std::thread::spawn(move || {
                    // A remote model runs elsewhere: it takes no time from the test's own.
                    data_plane::deprioritise_this_thread();
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    // Every chat completion has a JSON body; none means the connection ended.
                    if read_http_body(&mut conn).is_empty() {
                        return;
                    }
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    let body = serde_json::json!({
                        "id": format!("scripted-{n}"),
                        "object": "chat.completion",
                        "created": 0,
                        "model": "scripted",
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": replies[n % replies.len()]},
                            "finish_reason": "stop"
                        }],
                        "usage": {"prompt_tokens": 200, "completion_tokens": 60, "total_tokens": 260}
                    })
                    .to_string();
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        ScriptedRemote { addr, calls, stop }
    }

    /// The base URL a router's `--remote-base-url` takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for ScriptedRemote {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
