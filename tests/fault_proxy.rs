//! A TCP proxy between a device and its hub that misbehaves on demand: refuses
//! connections (the link is down before anything is sent), or forwards only the first N
//! bytes the device sends on a connection and then breaks it (a cut in the middle of a
//! request). TLS runs end to end through it; it sees only ciphertext.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with the next connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forward both ways.
    Pass,
    /// Accept and close at once: nothing reaches the hub.
    Refuse,
    /// Forward the first `n` bytes from the device on each connection, then cut it.
    CutUpstreamAfter(usize),
}

pub(crate) struct FaultProxy {
    pub(crate) addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Connections cut by `CutUpstreamAfter`.
    pub(crate) cuts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on 127.0.0.1 to `upstream`.
    pub(crate) fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let cuts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (mode, cuts, stop) = (mode.clone(), cuts.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let m = *mode.lock().unwrap();
                    let cuts = cuts.clone();
                    std::thread::spawn(move || relay(client, upstream, m, &cuts));
                }
            })
        };
        Self {
            addr,
            mode,
            cuts,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// `https://localhost:PORT` (the hub's certificate names localhost).
    pub(crate) fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(client: TcpStream, upstream: SocketAddr, mode: Mode, cuts: &AtomicU64) {
    if mode == Mode::Refuse {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let limit = match mode {
        Mode::CutUpstreamAfter(n) => Some(n),
        _ => None,
    };
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let down = std::thread::spawn(move || pump(s2, c2, None));
    let cut = pump(
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        limit,
    );
    if cut {
        cuts.fetch_add(1, Ordering::SeqCst);
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
    let _ = down.join();
}

/// Copies `from` → `to` until EOF, or until `limit` bytes have gone (then returns true).
fn pump(mut from: TcpStream, mut to: TcpStream, limit: Option<usize>) -> bool {
    let _ = from.set_read_timeout(Some(Duration::from_secs(30)));
    let mut sent = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) => n.min(l - sent),
            None => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
        if limit.is_some_and(|l| sent >= l) {
            return true;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    false
}
