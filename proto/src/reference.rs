//! Model references, parsed and normalised exactly like `docker model` does.
//!
//! `smollm2` → `index.docker.io/ai/smollm2:latest`: a name without `/` gets the `ai/`
//! namespace, the tag defaults to `latest`, the name is lower-cased while the tag keeps its
//! case, `@sha256:<64 hex>` pins a digest, and a first component with a `.` or `:` or equal to
//! `localhost` is a registry (`localhost:5000/x/y:t`). The grammar is the one of
//! `distribution/reference`; anything outside it is rejected with the reason.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Digest, ProtoError};

/// Docker Hub, as `docker model` (go-containerregistry) names it.
pub const DEFAULT_REGISTRY: &str = "index.docker.io";
/// The namespace Docker Hub's model catalogue lives in; bare names get it.
pub const DEFAULT_NAMESPACE: &str = "ai";
/// The tag a reference without tag or digest gets.
pub const DEFAULT_TAG: &str = "latest";
/// Longest repository name (registry + path) distribution accepts.
const MAX_NAME_LEN: usize = 255;
/// Longest tag distribution accepts.
const MAX_TAG_LEN: usize = 128;

/// A normalised model reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelRef {
    /// Registry host with optional port, lower-case (`index.docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path inside the registry, lower-case (`ai/smollm2`).
    pub repository: String,
    /// Tag, case kept. `None` only when the reference pins a digest without a tag.
    pub tag: Option<String>,
    /// Pinned manifest digest.
    pub digest: Option<Digest>,
}

impl ModelRef {
    /// Parses and normalises a reference the way `docker model` does.
    pub fn parse(input: &str) -> Result<Self, ProtoError> {
        let err = |reason: String| ProtoError::InvalidReference {
            reference: input.chars().take(300).collect(),
            reason,
        };
        if input.is_empty() {
            return Err(err("reference is empty".into()));
        }
        if input.len() > MAX_NAME_LEN + MAX_TAG_LEN + 80 {
            return Err(err(format!(
                "reference is longer than {MAX_NAME_LEN} characters"
            )));
        }
        if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(format!(
                "contains whitespace or control character {c:?}"
            )));
        }

        // name [":" tag] ["@" digest]
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                let digest = digest.parse::<Digest>().map_err(|e| match e {
                    ProtoError::InvalidDigest { reason, .. } => {
                        err(format!("invalid digest after '@': {reason}"))
                    }
                    other => err(other.to_string()),
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(err)?;
        }
        if name.is_empty() {
            return Err(err("repository name is empty".into()));
        }

        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_ascii_lowercase(), remainder)
            }
            _ => (DEFAULT_REGISTRY.to_string(), name),
        };
        let registry = if registry == "docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        validate_registry(&registry).map_err(err)?;

        let mut path = path.to_lowercase();
        if !path.contains('/') && registry == DEFAULT_REGISTRY {
            path = format!("{DEFAULT_NAMESPACE}/{path}");
        }
        validate_path(&path).map_err(err)?;
        if registry.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(err(format!(
                "repository name is longer than {MAX_NAME_LEN} characters"
            )));
        }

        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(ModelRef {
            registry,
            repository: path,
            tag,
            digest,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form `docker model ls` shows: Docker Hub's registry left out.
    pub fn familiar(&self) -> String {
        let mut s = if self.registry == DEFAULT_REGISTRY {
            self.repository.clone()
        } else {
            self.name()
        };
        if let Some(tag) = &self.tag {
            s.push(':');
            s.push_str(tag);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }

    /// The tag, or the digest string when only a digest is pinned: what to ask the registry
    /// for.
    pub fn reference_part(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The registry's host, without port or IPv6 brackets.
    fn registry_host(&self) -> &str {
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// True for registries at `localhost` or a loopback IP (`127.0.0.0/8`, `[::1]`), which
    /// may use plain HTTP. A name that merely starts with `127.` is not one.
    pub fn is_loopback_registry(&self) -> bool {
        let host = self.registry_host();
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback())
    }

    /// True for registries on a private network, whose names a provider should not gossip
    /// to the world (review L4): an address that is not public ([`crate::ip::is_public`]) nor
    /// loopback, or a name under a suffix kept for private networks (`.local`, `.internal`,
    /// `.lan`, `.home.arpa`, `.intranet`, `.corp`, `.private`). Loopback, `localhost` and
    /// single-label names (Compose and Kubernetes service names) mean nothing elsewhere and
    /// are not counted.
    pub fn is_private_registry(&self) -> bool {
        const SUFFIXES: [&str; 7] = [
            ".local",
            ".internal",
            ".lan",
            ".home.arpa",
            ".intranet",
            ".corp",
            ".private",
        ];
        let host = self.registry_host().to_ascii_lowercase();
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                !crate::ip::is_public(ip) && !ip.is_loopback() && !ip.is_unspecified()
            }
            Err(_) => {
                let name = host.trim_end_matches('.');
                SUFFIXES.iter().any(|s| name.ends_with(s))
            }
        }
    }

    /// This reference with a tag (and no digest): what `tag` and `push` store under.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ProtoError> {
        validate_tag(tag).map_err(|reason| ProtoError::InvalidReference {
            reference: format!("{}:{tag}", self.name()),
            reason,
        })?;
        Ok(ModelRef {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("tag after ':' is empty".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("tag is longer than {MAX_TAG_LEN} characters"));
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let first = tag.chars().next().unwrap_or('-');
    if !word(first) {
        return Err(format!(
            "tag must start with a letter, digit or '_', not {first:?}"
        ));
    }
    if let Some(c) = tag.chars().find(|&c| !(word(c) || c == '.' || c == '-')) {
        return Err(format!(
            "tag contains {c:?}; allowed are letters, digits, '_', '.', '-'"
        ));
    }
    Ok(())
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) if !registry.ends_with(']') => (h, Some(p)),
        _ => (registry, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(format!("registry port {port:?} is not a number"));
        }
        if port.parse::<u32>().map_or(true, |p| p == 0 || p > 65535) {
            return Err(format!("registry port {port} is out of range"));
        }
    }
    if host.starts_with('[') {
        let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        return match inner {
            Some(ip)
                if !ip.is_empty() && ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') =>
            {
                Ok(())
            }
            _ => Err(format!(
                "registry host {host:?} is not a valid IPv6 literal"
            )),
        };
    }
    if host.is_empty() {
        return Err("registry host is empty".into());
    }
    for component in host.split('.') {
        let ok = !component.is_empty()
            && component
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !component.starts_with('-')
            && !component.ends_with('-');
        if !ok {
            return Err(format!("registry host {host:?} is not a valid host name"));
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), String> {
    for component in path.split('/') {
        if component.is_empty() {
            return Err("repository path has an empty component ('//' or a trailing '/')".into());
        }
        validate_component(component)?;
    }
    Ok(())
}

/// `[a-z0-9]+ (([._]|__|-+) [a-z0-9]+)*`
fn validate_component(component: &str) -> Result<(), String> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "repository component {component:?} must start and end with a letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let valid = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !valid {
            return Err(format!(
                "repository component {component:?} has invalid separator {sep:?} \
                 (allowed: '.', '_', '__', or dashes; letters and digits otherwise)"
            ));
        }
    }
    Ok(())
}

impl FromStr for ModelRef {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        ModelRef::parse(s)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn norm(s: &str) -> String {
        ModelRef::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_string()
    }

    #[test]
    fn normalises_like_docker_model() {
        assert_eq!(norm("smollm2"), "index.docker.io/ai/smollm2:latest");
        assert_eq!(norm("ai/smollm2"), "index.docker.io/ai/smollm2:latest");
        assert_eq!(norm("SmolLM2:Q4_K_M"), "index.docker.io/ai/smollm2:Q4_K_M");
        assert_eq!(norm("myorg/Model:v1"), "index.docker.io/myorg/model:v1");
        assert_eq!(
            norm("docker.io/ai/gemma3"),
            "index.docker.io/ai/gemma3:latest"
        );
        assert_eq!(norm("localhost:5000/x/y:t"), "localhost:5000/x/y:t");
        assert_eq!(norm("localhost/y"), "localhost/y:latest");
        assert_eq!(
            norm("Registry.Example.com:8443/A/B"),
            "registry.example.com:8443/a/b:latest"
        );
        assert_eq!(norm("127.0.0.1:5000/m"), "127.0.0.1:5000/m:latest");
        assert_eq!(
            norm(&format!("smollm2@{D}")),
            format!("index.docker.io/ai/smollm2@{D}")
        );
        assert_eq!(
            norm(&format!("smollm2:360M@{D}")),
            format!("index.docker.io/ai/smollm2:360M@{D}")
        );
        assert_eq!(
            norm("a/b__c.d-e---f_g"),
            "index.docker.io/a/b__c.d-e---f_g:latest"
        );
    }

    /// Issue 19 / review H6: plain HTTP (and with it credentials in the clear) only for a
    /// registry whose host is a loopback IP or `localhost`, never for a name that merely
    /// starts with `127.`.
    #[test]
    fn private_registries_are_told_apart() {
        for (r, private) in [
            ("ai/smollm2:135M", false),
            ("registry.example.net/a/b:t", false),
            ("127.0.0.1:5000/a", false),
            ("localhost:5000/a", false),
            ("registry:5000/a", false),
            ("8.8.8.8/a", false),
            ("10.1.2.3:5000/a/b:t", true),
            ("192.168.0.10/a", true),
            ("172.20.0.5:5000/a", true),
            ("100.70.0.1/a", true),
            ("169.254.1.1/a", true),
            ("[fd00::1]:5000/a", true),
            ("[fe80::1]/a", true),
            ("registry.corp.internal/a", true),
            ("Registry.LOCAL:5000/a", true),
            ("nas.home.arpa/a", true),
            ("internal.example.com/a", false),
        ] {
            let parsed = ModelRef::parse(r).unwrap();
            assert_eq!(parsed.is_private_registry(), private, "{r}");
        }
    }

    #[test]
    fn only_loopback_addresses_count_as_loopback() {
        for (r, loopback) in [
            ("127.0.0.1:5000/a/b:t", true),
            ("127.8.9.10/a", true),
            ("[::1]:5000/a", true),
            ("localhost:5000/a", true),
            ("127.evil.example:5000/a", false),
            ("127.0.0.1.nip.io/a", false),
            ("localhost.evil.example/a", false),
            ("10.0.0.1:5000/a", false),
            ("registry.example.net/a", false),
        ] {
            let parsed = ModelRef::parse(r).unwrap();
            assert_eq!(parsed.is_loopback_registry(), loopback, "{r}");
        }
    }

    #[test]
    fn familiar_and_parts() {
        let r = ModelRef::parse("smollm2").unwrap();
        assert_eq!(r.familiar(), "ai/smollm2:latest");
        assert_eq!(r.reference_part(), "latest");
        assert!(!r.is_loopback_registry());
        let r = ModelRef::parse("localhost:5000/a/b:t").unwrap();
        assert_eq!(r.familiar(), "localhost:5000/a/b:t");
        assert!(r.is_loopback_registry());
        let r = ModelRef::parse(&format!("x@{D}")).unwrap();
        assert_eq!(r.reference_part(), D);
        assert_eq!(
            r.with_tag("v2").unwrap().to_string(),
            "index.docker.io/ai/x:v2"
        );
    }

    #[test]
    fn rejects_with_reason() {
        let cases = [
            ("", "empty"),
            ("a b", "whitespace"),
            ("smollm2:", "tag after ':' is empty"),
            ("smollm2:-x", "tag must start"),
            ("smollm2:a/b", "registry port \"a\" is not a number"),
            ("smollm2@sha256:abc", "invalid digest"),
            ("smollm2@md5:abc", "only sha256"),
            ("a//b", "empty component"),
            ("a/b/", "empty component"),
            ("a/-b", "must start and end"),
            ("a/b..c", "invalid separator"),
            ("a/b___c", "invalid separator"),
            ("localhost:99999/a", "out of range"),
            ("localhost:port/a", "not a number"),
            ("bad_host.com/a", "not a valid host"),
            ("a/b:xü", "tag contains"),
            ("a/é", "must start and end"),
        ];
        for (input, want) in cases {
            match ModelRef::parse(input) {
                Ok(r) => panic!("{input:?} accepted as {r}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{input:?}: {e} lacks {want:?}"
                ),
            }
        }
        let long = format!("a/{}", "b".repeat(300));
        assert!(
            ModelRef::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(
            ModelRef::parse(&long_tag)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
    }

    /// A path component; with a '.' it may only follow the first (registry) component.
    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}(([._]|__|-{1,2})[a-z0-9]{1,8}){0,2}"
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = ModelRef::parse(&s);
        }

        #[test]
        fn normalised_form_is_a_fixed_point(s in "[A-Za-z0-9._:/@-]{0,60}") {
            if let Ok(r) = ModelRef::parse(&s) {
                let again = ModelRef::parse(&r.to_string()).expect("normalised form reparses");
                prop_assert_eq!(&again, &r);
                prop_assert!(r.tag.is_some() || r.digest.is_some());
                prop_assert_eq!(r.repository.to_lowercase(), r.repository.clone());
            }
        }

        #[test]
        fn valid_names_parse(
            ns in "[a-z0-9]{1,8}((_|__|-{1,2})[a-z0-9]{1,8}){0,2}", name in component(), tag in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            port in proptest::option::of(1u16..)
        ) {
            let registry = port.map(|p| format!("localhost:{p}/"));
            let input = format!("{}{ns}/{name}:{tag}", registry.clone().unwrap_or_default());
            let r = ModelRef::parse(&input).unwrap();
            prop_assert_eq!(r.tag.as_deref(), Some(tag.as_str()));
            prop_assert_eq!(r.repository, format!("{ns}/{name}"));
            match registry {
                Some(reg) => prop_assert_eq!(format!("{}/", r.registry), reg),
                None => prop_assert_eq!(r.registry, DEFAULT_REGISTRY),
            }
        }

        #[test]
        fn bare_names_get_ai_namespace(name in component()) {
            let r = ModelRef::parse(&name.to_uppercase()).unwrap();
            prop_assert_eq!(r.repository, format!("ai/{name}"));
            prop_assert_eq!(r.tag.as_deref(), Some("latest"));
        }
    }
}
