//! A TCP proxy between a device and its hub that misbehaves on demand: refuses
//! connections (the link is down before anything is sent), forwards only the first N
//! bytes the device sends on a connection and then breaks it (a cut in the middle of a
//! request), dribbles the hub's answer a byte at a time (slow-loris), or gives a share of
//! connections one random fault each — drop, delay, truncate, reset, stall, duplicate.
//! TLS runs end to end through it; it sees only ciphertext.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

/// What the proxy does with the next connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forward both ways.
    Pass,
    /// Accept and close at once: nothing reaches the hub.
    Refuse,
    /// Forward the first `n` bytes from the device on each connection, then cut it.
    CutUpstreamAfter(usize),
    /// Forward the device's bytes; send the hub's one byte per interval.
    Dribble(Duration),
    /// This percentage of connections get one random [`Fault`]; the rest pass.
    Random(u8),
}

/// What a faulty connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// Accept, swallow what the device sends, close: nothing reaches the hub.
    Drop,
    /// Forward both ways, each chunk 20–200 ms late.
    Delay,
    /// Forward the hub's first bytes (up to 4 KiB), then close both sides.
    Truncate,
    /// Forward some bytes, then reset both sides (TCP RST).
    Reset,
    /// Forward some bytes, then nothing more either way until the device gives up.
    Stall,
    /// Forward both ways, sending one of the hub's chunks twice.
    Duplicate,
}

const FAULTS: [Fault; 6] = [
    Fault::Drop,
    Fault::Delay,
    Fault::Truncate,
    Fault::Reset,
    Fault::Stall,
    Fault::Duplicate,
];

pub(crate) struct FaultProxy {
    pub(crate) addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Connections cut by `CutUpstreamAfter`.
    pub(crate) cuts: Arc<AtomicU64>,
    /// Connections, and faults injected by `Random`, by kind.
    pub(crate) connections: Arc<AtomicU64>,
    pub(crate) faults: Arc<Mutex<std::collections::BTreeMap<Fault, u64>>>,
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
        let connections = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (mode, cuts, stop) = (mode.clone(), cuts.clone(), stop.clone());
            let (connections, faults) = (connections.clone(), faults.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let m = *mode.lock().unwrap();
                    let cuts = cuts.clone();
                    if let Mode::Random(percent) = m {
                        let mut rng = rand::rng();
                        if rng.random_range(0..100u8) < percent {
                            let f = FAULTS[rng.random_range(0..FAULTS.len())];
                            *faults.lock().unwrap().entry(f).or_insert(0) += 1;
                            std::thread::spawn(move || misbehave(client, upstream, f));
                            continue;
                        }
                    }
                    std::thread::spawn(move || relay(client, upstream, m, &cuts));
                }
            })
        };
        Self {
            addr,
            mode,
            cuts,
            connections,
            faults,
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
    let down = match mode {
        Mode::Dribble(every) => std::thread::spawn(move || dribble(s2, c2, every)),
        _ => std::thread::spawn(move || pump(s2, c2, None)),
    };
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

/// Sends `from`'s bytes to `to` one at a time, `every` apart, until either side closes.
fn dribble(mut from: TcpStream, mut to: TcpStream, every: Duration) -> bool {
    let mut byte = [0u8; 1];
    while let Ok(1) = from.read(&mut byte) {
        if to.write_all(&byte).is_err() {
            break;
        }
        std::thread::sleep(every);
    }
    let _ = to.shutdown(Shutdown::Both);
    false
}

/// One connection with `fault`.
fn misbehave(client: TcpStream, upstream: SocketAddr, fault: Fault) {
    let mut rng = rand::rng();
    if fault == Fault::Drop {
        let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = (&client).read(&mut [0u8; 4096]);
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    // Bytes each way before the fault shows (truncate, reset, stall).
    let after: usize = rng.random_range(0..6000);
    let dup_at: usize = rng.random_range(0..4);
    let up = {
        let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || faulty_pump(c, s, fault, after, usize::MAX))
    };
    faulty_pump(
        server.try_clone().unwrap(),
        client.try_clone().unwrap(),
        fault,
        after,
        dup_at,
    );
    let _ = up.join();
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

fn faulty_pump(mut from: TcpStream, mut to: TcpStream, fault: Fault, after: usize, dup_at: usize) {
    let mut rng = rand::rng();
    let _ = from.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 4096];
    let mut sent = 0usize;
    let mut chunk = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        match fault {
            Fault::Delay => std::thread::sleep(Duration::from_millis(rng.random_range(20..200))),
            Fault::Truncate | Fault::Reset | Fault::Stall if sent + n > after => {
                data = &buf[..after - sent];
                let _ = to.write_all(data);
                if fault == Fault::Stall {
                    // Hold the connection open, forwarding nothing, until the device
                    // gives up (its own deadline) or the 10 s read timeout passes.
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                if fault == Fault::Reset {
                    let _ = rustix::net::sockopt::set_socket_linger(&to, Some(Duration::ZERO));
                    let _ = rustix::net::sockopt::set_socket_linger(&from, Some(Duration::ZERO));
                }
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if to.write_all(data).is_err() {
            break;
        }
        if fault == Fault::Duplicate && chunk == dup_at && to.write_all(data).is_err() {
            break;
        }
        sent += data.len();
        chunk += 1;
    }
    let _ = to.shutdown(Shutdown::Write);
}
