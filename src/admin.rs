//! The admin channel: the operator's commands (`status`, `sync`, `leases`, `clients`,
//! `audit`) against a running daemon, over a unix socket only the daemon's user can use.
//!
//! The daemon holds the store's exclusive lock, so while it runs a command cannot open
//! the data directory; it asks the daemon instead. The socket is `admin.sock` in the data
//! directory (or `[admin] socket`), mode 0600, and every connection's peer credentials
//! are checked: only the daemon's own user and root are served. With the daemon stopped
//! (no socket, or one nobody listens on) the command opens the data directory itself.
//! Either way the same code ([`execute`]) carries it out, and every command is audited
//! ([`AuditEvent::Admin`]; client token changes as the key events they always were).
//!
//! Wire format, one command per connection: the client sends one JSON line (a
//! [`Request`], at most [`MAX_REQUEST`] bytes); the daemon answers with frames of a tag
//! byte and a big-endian `u32` length: [`OUT`] and [`ERR`] carry the command's standard
//! output and error, and [`DONE`] (empty) or [`FAILED`] (the error in words) ends the
//! answer.

#![allow(
    clippy::print_stdout,
    reason = "the direct commands' output goes to standard output"
)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sync_protocol::audit::{AdminCommand, AuditEvent};

use crate::device::views::AdminView;
use crate::device::{DeviceError, render_status};

/// Largest request line.
pub const MAX_REQUEST: usize = 4096;
/// Frame: standard output.
pub const OUT: u8 = 1;
/// Frame: standard error.
pub const ERR: u8 = 2;
/// Frame: the command succeeded (last frame).
pub const DONE: u8 = 3;
/// Frame: the command failed; the error in words (last frame).
pub const FAILED: u8 = 4;
/// Largest frame the client accepts.
const MAX_FRAME: usize = 1 << 20;
/// Connections served at once; more are refused with a message.
const MAX_CONNECTIONS: usize = 4;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One operator command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// `carecache status [--json]`.
    Status {
        /// Machine-readable.
        json: bool,
    },
    /// `carecache sync`: a round now.
    Sync,
    /// `carecache leases [--json]`.
    Leases {
        /// Machine-readable.
        json: bool,
    },
    /// `carecache clients add NAME`.
    ClientsAdd {
        /// The client's name.
        name: String,
    },
    /// `carecache clients list`.
    ClientsList,
    /// `carecache clients revoke NAME`.
    ClientsRevoke {
        /// The client's name.
        name: String,
    },
    /// `carecache audit verify`.
    AuditVerify,
    /// `carecache audit export` (the client writes the file).
    AuditExport,
    /// `carecache audit tail -n N`.
    AuditTail {
        /// How many entries.
        lines: u64,
    },
}

impl Request {
    /// How the audit names it; `None` for the client token changes, audited as key
    /// events.
    fn audited_as(&self) -> Option<AdminCommand> {
        Some(match self {
            Self::Status { .. } => AdminCommand::Status,
            Self::Sync => AdminCommand::SyncNow,
            Self::Leases { .. } => AdminCommand::Leases,
            Self::ClientsList => AdminCommand::ClientsList,
            Self::AuditVerify => AdminCommand::AuditVerify,
            Self::AuditExport => AdminCommand::AuditExport,
            Self::AuditTail { lines } => AdminCommand::AuditTail {
                lines: u32::try_from(*lines).unwrap_or(u32::MAX),
            },
            Self::ClientsAdd { .. } | Self::ClientsRevoke { .. } => return None,
        })
    }
}

/// Who asked: an operator over the channel (their user id) or a command that opened the
/// data directory itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Over the admin channel.
    Channel {
        /// The peer's user id.
        uid: u32,
    },
    /// The daemon is stopped; the command opened the store.
    Direct,
}

/// Carries out `request` on `device`, writing what the command prints to `out` and
/// `err`, and audits it (a command whose audit entry cannot be written fails).
pub fn execute(
    device: &AdminView,
    request: &Request,
    via: Via,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let result = run(device, request, via, out, err);
    if let Some(command) = request.audited_as() {
        let uid = match via {
            Via::Channel { uid } => Some(uid),
            Via::Direct => None,
        };
        let entry = device.audit_blocking(AuditEvent::Admin {
            command,
            uid,
            ok: result.is_ok(),
        });
        // A wiped device has no audit log any more: the command's own error says so.
        if let (Err(e), Ok(())) = (entry, &result) {
            return Err(e).context("the command ran, but its audit entry could not be written");
        }
    }
    result
}

fn run(
    device: &AdminView,
    request: &Request,
    via: Via,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    match request {
        Request::Status { json } => {
            let status = device.status()?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                write!(out, "{}", render_status(&status))?;
            }
        }
        Request::Leases { json } => {
            let status = device.status()?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status.leases)?)?;
            } else {
                write!(out, "{}", render_leases(&status.leases))?;
            }
        }
        Request::Sync => {
            let started = std::time::Instant::now();
            let s = sync_now(device, via)?;
            writeln!(out, "{}", synced_line(&s, started.elapsed()))?;
            writeln!(
                out,
                "synced: {} batches, {} records written, {} removals, {} lease changes, {:.2} MB{} in {} ms",
                s.batches,
                s.upserts,
                s.removals,
                s.lease_changes,
                s.bytes as f64 / 1e6,
                if s.resynced { " (full resync)" } else { "" },
                started.elapsed().as_millis()
            )?;
        }
        Request::ClientsAdd { name } => {
            let token = device.add_client(name)?;
            writeln!(
                out,
                "client {name} registered. Its token, shown only this once:"
            )?;
            writeln!(out)?;
            writeln!(out, "  {}", token.expose())?;
            writeln!(out)?;
            writeln!(
                out,
                "Send it as `Authorization: Bearer <token>` with every request."
            )?;
        }
        Request::ClientsList => {
            let clients = device.clients();
            if clients.list().is_empty() {
                writeln!(
                    out,
                    "no clients registered; add one with `carecache clients add NAME`"
                )?;
            }
            for c in clients.list() {
                writeln!(
                    out,
                    "{:<24} issued {}{}",
                    c.name,
                    c.created.utc_seconds(),
                    c.revoked
                        .map(|t| format!(", revoked {}", t.utc_seconds()))
                        .unwrap_or_default()
                )?;
            }
        }
        Request::ClientsRevoke { name } => {
            device.revoke_client(name)?;
            writeln!(
                out,
                "client {name} revoked; its token is refused from now on"
            )?;
        }
        Request::AuditVerify => crate::audit_tools::verify_command(device.store(), out)?,
        Request::AuditExport => {
            let id = device_name(device)?;
            crate::audit_tools::export_command(device.store(), &id, out, err)?;
        }
        Request::AuditTail { lines } => {
            let id = device_name(device)?;
            crate::audit_tools::tail_command(device.store(), &id, *lines, out)?;
        }
    }
    Ok(())
}

/// What a sync round did, in one line.
pub(crate) fn synced_line(s: &crate::sync::Summary, took: Duration) -> String {
    format!(
        "synced: {} batches, {} records written, {} removals, {} lease changes, {:.2} MB{} in {} ms",
        s.batches,
        s.upserts,
        s.removals,
        s.lease_changes,
        s.bytes as f64 / 1e6,
        if s.resynced { " (full resync)" } else { "" },
        took.as_millis()
    )
}

/// A round now. A hub that asks for a moment (its rate limit: the daemon's own round
/// or upload may just have run) is given it, a few times, rather than failing the
/// operator's command.
fn sync_now(device: &AdminView, via: Via) -> Result<crate::sync::Summary, DeviceError> {
    let mut tries = 0;
    loop {
        let result = match via {
            Via::Direct => crate::daemon::sync_with_progress(device),
            Via::Channel { .. } => device.sync_once(&mut |_, _| {}),
        };
        tries += 1;
        match result {
            Err(DeviceError::Sync(crate::sync::SyncError::Refused {
                retry_after_secs: Some(secs @ 0..=5),
                ..
            })) if tries < 4 => {
                std::thread::sleep(Duration::from_secs(u64::from(secs).max(1)));
            }
            other => return other,
        }
    }
}

fn device_name(device: &AdminView) -> Result<String, DeviceError> {
    Ok(device
        .device_id()?
        .unwrap_or_else(|| "unenrolled".to_owned()))
}

/// The leases as a table: id, label, view, patients, standing and time left.
pub fn render_leases(leases: &[crate::device::LeaseStatus]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if leases.is_empty() {
        s.push_str("no leases held\n");
        return s;
    }
    let _ = writeln!(
        s,
        "{:<8} {:<28} {:<12} {:>8}  {:<20} {:<22} left",
        "lease", "label", "view", "patients", "standing", "until"
    );
    for l in leases {
        let _ = writeln!(
            s,
            "{:<8} {:<28} {:<12} {:>8}  {:<20} {:<22} {}",
            l.id,
            l.label,
            l.view,
            l.patients,
            l.standing,
            l.not_after,
            l.seconds_left
                .map_or_else(|| "-".to_owned(), crate::clock::human)
        );
    }
    s
}

/// Why the channel could not carry a command.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No daemon listens (no socket, or a stale one): open the data directory instead.
    #[error("the daemon is not running")]
    NotRunning,
    /// The socket is there but this user may not use it.
    #[error(
        "the daemon's admin socket {0} refused this user: run the command as the daemon's user (or root)"
    )]
    Denied(PathBuf),
    /// The daemon answered something that is not the channel's format, or hung up.
    #[error("the daemon's answer on {path} was cut short or malformed: {why}")]
    Broken {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// The command ran and failed; the daemon's words.
    #[error("{0}")]
    Failed(String),
}

/// Sends `request` to the daemon listening on `socket` and copies its output to `out` and
/// `err`. [`ChannelError::NotRunning`] means the caller should open the store itself.
pub fn call(
    socket: &Path,
    request: &Request,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ChannelError> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ChannelError::NotRunning);
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(ChannelError::Denied(socket.to_owned()));
        }
        Err(e) => {
            return Err(ChannelError::Broken {
                path: socket.to_owned(),
                why: e.to_string(),
            });
        }
    };
    let broken = |why: String| ChannelError::Broken {
        path: socket.to_owned(),
        why,
    };
    let mut line = serde_json::to_vec(request).map_err(|e| broken(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| broken(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = [0u8; 5];
        if let Err(e) = reader.read_exact(&mut head) {
            return Err(broken(format!("the daemon hung up ({e})")));
        }
        let [tag, len @ ..] = head;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(broken(format!("a frame of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        reader
            .read_exact(&mut body)
            .map_err(|e| broken(format!("a frame cut short ({e})")))?;
        match tag {
            OUT => out.write_all(&body).map_err(|e| broken(e.to_string()))?,
            ERR => err.write_all(&body).map_err(|e| broken(e.to_string()))?,
            DONE => return Ok(()),
            FAILED => {
                return Err(ChannelError::Failed(
                    String::from_utf8_lossy(&body).into_owned(),
                ));
            }
            other => return Err(broken(format!("unknown frame tag {other}"))),
        }
    }
}

/// Frames written to the socket for one stream (standard output or error).
struct Framed<'a> {
    stream: &'a UnixStream,
    tag: u8,
}

impl Write for Framed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let buf = buf.get(..buf.len().min(MAX_FRAME)).unwrap_or(buf);
        frame(self.stream, self.tag, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn frame(mut stream: &UnixStream, tag: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_be_bytes());
    stream.write_all(&head)?;
    stream.write_all(body)
}

/// The daemon's side: the listening socket and its acceptor thread.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    active: Arc<AtomicUsize>,
}

impl Server {
    /// Binds `path` (mode 0600; a stale socket left by a daemon that died is replaced,
    /// anything else there is refused) and serves `device` until `stop` is set.
    pub fn start(device: AdminView, path: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<Self> {
        // A socket some daemon still answers on is not stale (the store's lock keeps a
        // second daemon out; this names the cause).
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon answers on the admin socket {}",
                path.display()
            );
        }
        // Peer credentials are checked on every connection as well: the mode is the
        // first fence, not the only one.
        let listener = crate::api::bind_socket_file(path, 0o600).with_context(|| {
            format!(
                "binding the admin socket {} (or set admin.socket)",
                path.display()
            )
        })?;
        listener
            .set_nonblocking(true)
            .context("configuring the admin socket")?;
        let active = Arc::new(AtomicUsize::new(0));
        let thread = {
            let active = Arc::clone(&active);
            std::thread::Builder::new()
                .name("admin".into())
                .spawn(move || accept_loop(&listener, &device, &stop, &active))
                .context("starting the admin channel")?
        };
        tracing::info!(socket = %path.display(), "admin channel listening");
        Ok(Self {
            path: path.to_owned(),
            thread: Some(thread),
            active,
        })
    }

    /// Stops accepting, waits a little for commands in flight, removes the socket.
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the admin channel panicked");
        }
        for _ in 0..50 {
            if self.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    device: &AdminView,
    stop: &AtomicBool,
    active: &Arc<AtomicUsize>,
) {
    let me = rustix::process::geteuid().as_raw();
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin channel: accept failed");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let uid = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(cred) => cred.uid.as_raw(),
            Err(e) => {
                tracing::warn!(error = %e, "admin channel: peer credentials unreadable; refused");
                continue;
            }
        };
        if uid != me && uid != 0 {
            tracing::warn!(uid, "admin channel: a connection from another user refused");
            let _ = frame(
                &stream,
                FAILED,
                b"refused: only the daemon's user and root may use the admin channel",
            );
            continue;
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = frame(
                &stream,
                FAILED,
                b"busy: other admin commands are running; try again",
            );
            continue;
        }
        let (device, running) = (device.clone(), Arc::clone(active));
        let spawned = std::thread::Builder::new()
            .name("admin-command".into())
            .spawn(move || {
                serve_one(&stream, &device, uid);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "admin channel: no thread for a command");
        }
    }
}

fn serve_one(stream: &UnixStream, device: &AdminView, uid: u32) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let request = match read_request(stream) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(uid, %why, "admin channel: a request refused");
            let _ = frame(stream, FAILED, why.as_bytes());
            return;
        }
    };
    let mut out = Framed { stream, tag: OUT };
    let mut err = Framed { stream, tag: ERR };
    let result = execute(device, &request, Via::Channel { uid }, &mut out, &mut err);
    let audited = request.audited_as().map_or("clients", AdminCommand::words);
    match result {
        Ok(()) => {
            tracing::info!(uid, command = audited, "admin command carried out");
            let _ = frame(stream, DONE, b"");
        }
        Err(e) => {
            tracing::warn!(uid, command = audited, error = %e, "admin command failed");
            let _ = frame(stream, FAILED, format!("{e:#}").as_bytes());
        }
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("the request could not be read ({e})"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("a request longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("a request cut short (no end of line)".to_owned());
    }
    serde_json::from_slice(&line).map_err(|e| format!("not a command this daemon knows ({e})"))
}
