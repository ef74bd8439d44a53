//! A real `docker-registry` (Debian's distribution 2.x) on a loopback port, with basic or
//! token auth, a token service that plays Docker Hub's, and a raw pusher for artifacts
//! other tools make.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::free_port;
use crate::http::wait_for_http;
use crate::proc::ChildGuard;

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
        let guard = ChildGuard::spawn(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path),
            &dir.path().join("registry.log"),
        )
        .expect("docker-registry (Debian package) is needed: run ops/setup.sh");
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

pub(crate) fn read_http_body(s: &mut TcpStream) -> String {
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
