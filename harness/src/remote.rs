//! A scripted OpenAI-compatible endpoint: the remote supervisor an attacker persuaded.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::data_plane;
use crate::registry::read_http_body;

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
