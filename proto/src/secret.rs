//! Secrets (API keys, bearer tokens, registry passwords) as a type that never prints: its
//! `Debug` and `Display` say `[redacted]`, so a derived `Debug` of a config or of parsed
//! command-line flags cannot leak one into a log.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// A secret string; [`Secret::expose`] is the one way to read it. It can be read from
/// JSON (a key in a request) but is never written to it.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends or compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(Secret(s.to_string()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s: Secret = "sk-live-123".parse().unwrap();
        assert_eq!(
            format!("{s:?} {s} {:?}", Some(vec![s.clone()])),
            "[redacted] [redacted] Some([[redacted]])"
        );
        assert_eq!(s.expose(), "sk-live-123");
    }
}
