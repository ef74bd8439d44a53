//! HTTP exchanges made with `curl`, as an operator would make them: the same client for the
//! router, a provider called directly and llama.cpp's own server, so no figure favours one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// An HTTP exchange made with `curl`. `status` is 0 when no answer came (refused, cut off,
/// timed out); `body` then holds curl's reason.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON; panics with the body when it is not (for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The body as JSON, if it is.
    pub fn try_json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `curl` with a method, optional JSON body and extra headers, within 120 s.
pub fn http(method: &str, url: &str, body: Option<&str>, headers: &[&str]) -> HttpReply {
    http_within(method, url, body, headers, 120)
}

/// [`http`] with a time limit in seconds (for long jobs).
pub fn http_within(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[&str],
    seconds: u32,
) -> HttpReply {
    let failed = |why: String| HttpReply {
        status: 0,
        headers: String::new(),
        body: why,
    };
    let seconds = seconds.to_string();
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-S",
        "-N",
        "-X",
        method,
        "-D",
        "-",
        "--max-time",
        &seconds,
        "-H",
        "Expect:",
    ]);
    for h in headers {
        c.args(["-H", h]);
    }
    // The body goes through a file: a long document does not fit on a command line.
    let tmp = match tempfile::NamedTempFile::new() {
        Ok(t) => t,
        Err(e) => return failed(format!("temporary file: {e}")),
    };
    if let Some(b) = body {
        if let Err(e) = std::fs::write(tmp.path(), b) {
            return failed(format!("temporary file: {e}"));
        }
        c.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", tmp.path().display()));
    }
    let out = match c.arg(url).output() {
        Ok(o) => o,
        Err(e) => return failed(format!("running curl: {e}")),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Skip interim answers (100 Continue) to the final head.
    let mut rest = text.as_str();
    let (mut head, mut body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    while head.starts_with("HTTP/1.1 1") && !body.is_empty() {
        rest = body;
        (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 0 {
        return failed(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    HttpReply {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

/// Waits until `addr` answers `GET path` with any HTTP status; panics after `timeout`.
pub fn wait_for_http(addr: SocketAddr, path: &str, timeout: Duration) {
    assert!(
        http_up(addr, path, timeout),
        "{addr}{path} did not answer within {timeout:?}"
    );
}

/// Waits until `addr` answers `GET path` with any HTTP status; false when `timeout` passes.
pub fn http_up(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let mut buf = [0u8; 12];
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_exact(&mut buf).is_ok()
                && buf.starts_with(b"HTTP/")
            {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
