//! A TCP relay that plays a network between clients and a server: slow, or cutting
//! transfers short.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
