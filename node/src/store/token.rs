//! Exchanges a Docker identity token (an OAuth2 refresh token from `docker login`) for a
//! registry access token, the way the Docker CLI does: read the registry's `Bearer`
//! challenge from `GET /v2/`, then `POST` the refresh token to the challenge's realm.

use beacon_proto::ModelRef;
use serde::Deserialize;

use super::StoreError;

/// A parsed `WWW-Authenticate: Bearer realm="…",service="…"` challenge.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
}

/// Parses a Bearer challenge; `None` for other schemes or a challenge without a realm.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let rest = header
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| header.trim().strip_prefix("bearer "))?;
    let mut realm = None;
    let mut service = None;
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next()),
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        match key.trim() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
    }
    Some(Challenge {
        realm: realm?,
        service,
    })
}

fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Returns an access token for `r` (scope pull, plus push when `push`).
pub async fn exchange(
    r: &ModelRef,
    plain_http: bool,
    identity_token: &str,
    push: bool,
) -> Result<String, StoreError> {
    let registry = r.registry.clone();
    let fail = |message: String| StoreError::Registry {
        registry: registry.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| fail(format!("http client: {e}")))?;
    let scheme = if plain_http { "http" } else { "https" };
    let host = if r.registry == beacon_proto::reference::DEFAULT_REGISTRY {
        "registry-1.docker.io"
    } else {
        &r.registry
    };
    let resp = client
        .get(format!("{scheme}://{host}/v2/"))
        .send()
        .await
        .map_err(|e| fail(format!("cannot reach the registry: {e}")))?;
    let challenge = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)
        .ok_or_else(|| {
            fail("an identity token is configured but the registry offers no token service".into())
        })?;
    let scope = format!(
        "repository:{}:{}",
        r.repository,
        if push { "pull,push" } else { "pull" }
    );
    let mut body = format!(
        "grant_type=refresh_token&client_id=beacon&scope={}&refresh_token={}",
        form_escape(&scope),
        form_escape(identity_token)
    );
    if let Some(service) = &challenge.service {
        body.push_str(&format!("&service={}", form_escape(service)));
    }
    let resp = client
        .post(&challenge.realm)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| fail(format!("token service {}: {e}", challenge.realm)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(StoreError::Unauthorized {
            registry: r.registry.clone(),
            had_credentials: true,
        });
    }
    if !status.is_success() {
        return Err(fail(format!(
            "token service {} answered {status}",
            challenge.realm
        )));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| fail(format!("token service: {e}")))?;
    if bytes.len() > 1 << 20 {
        return Err(fail("token service answer is too large".into()));
    }
    let t: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("token service answer: {e}")))?;
    t.access_token
        .or(t.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| fail("token service returned no token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#
            ),
            Some(Challenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer service="s", realm="http://x/t",scope="repository:a:pull""#),
            Some(Challenge {
                realm: "http://x/t".into(),
                service: Some("s".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_challenge("Bearer service=\"s\""), None);
        assert_eq!(
            parse_challenge("Bearer realm=\"unterminated"),
            Some(Challenge {
                realm: "unterminated".into(),
                service: None
            })
        );
    }

    #[test]
    fn escapes_form_values() {
        assert_eq!(
            form_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
