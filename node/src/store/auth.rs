//! Registry credentials: from flags, or from Docker's `config.json` (`$DOCKER_CONFIG` or
//! `~/.docker/config.json`), the way `docker model` finds them. Secrets never reach logs:
//! `Credentials`' `Debug` redacts them.

use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;

use super::StoreError;

/// How to authenticate to one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token from `docker login` (`identitytoken`), exchanged for an
    /// access token at the registry's token service.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => write!(f, "Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The Docker config file in use: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Host part of an `auths` key: `https://localhost:5000/v1/` -> `localhost:5000`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let host = key_host(key);
    let hub = |h: &str| matches!(h, "index.docker.io" | "docker.io" | "registry-1.docker.io");
    host.eq_ignore_ascii_case(registry) || (hub(host) && hub(registry))
}

/// Looks `registry` up in a Docker config file's contents.
pub fn from_docker_config(json: &[u8], registry: &str) -> Result<Option<Credentials>, StoreError> {
    let config: DockerConfig = serde_json::from_slice(json)
        .map_err(|e| StoreError::Credentials(format!("docker config is not valid JSON: {e}")))?;
    let Some((_, entry)) = config
        .auths
        .iter()
        .find(|(k, _)| same_registry(k, registry))
    else {
        return Ok(None);
    };
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::IdentityToken(token.clone())));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| StoreError::Credentials(format!("auth for {registry} is not base64")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| StoreError::Credentials(format!("auth for {registry} is not UTF-8")))?;
        let (u, p) = text.split_once(':').ok_or_else(|| {
            StoreError::Credentials(format!("auth for {registry} is not user:password"))
        })?;
        return Ok(Some(Credentials::Basic {
            username: u.into(),
            password: p.into(),
        }));
    }
    Ok(None)
}

/// Credentials for `registry`: flags first, then the Docker config file, else anonymous.
pub fn resolve(
    registry: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Credentials, StoreError> {
    match (username, password) {
        (Some(u), Some(p)) => {
            return Ok(Credentials::Basic {
                username: u.into(),
                password: p.into(),
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(StoreError::Credentials(
                "give both --username and --password".into(),
            ));
        }
        (None, None) => {}
    }
    if let Some(path) = docker_config_path()
        && let Ok(bytes) = std::fs::read(&path)
        && let Some(c) = from_docker_config(&bytes, registry)
            .map_err(|e| StoreError::Credentials(format!("{}: {e}", path.display())))?
    {
        return Ok(c);
    }
    Ok(Credentials::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_forms() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "localhost:5000":{"username":"a","password":"b"},
            "http://127.0.0.1:6000/":{"identitytoken":"tok"}
        }}"#;
        assert_eq!(
            from_docker_config(json, "index.docker.io").unwrap(),
            Some(Credentials::Basic {
                username: "user".into(),
                password: "pass".into()
            })
        );
        assert_eq!(
            from_docker_config(json, "localhost:5000").unwrap(),
            Some(Credentials::Basic {
                username: "a".into(),
                password: "b".into()
            })
        );
        assert_eq!(
            from_docker_config(json, "127.0.0.1:6000").unwrap(),
            Some(Credentials::IdentityToken("tok".into()))
        );
        assert_eq!(from_docker_config(json, "other:1").unwrap(), None);
        assert!(from_docker_config(b"{nope", "x").is_err());
    }

    #[test]
    fn debug_redacts() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::IdentityToken("s3cret".into())).contains("s3cret"));
    }
}
