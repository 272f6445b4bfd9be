//! The commands that run against a configured device — `enrol`, `sync`, `status`,
//! `serve` — and the sync loop's schedule (pure, so backoff and probing are tested
//! without sleeping).

#![allow(
    clippy::print_stdout,
    reason = "these functions are the commands' output"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use sync_protocol::audit::{AuditEvent, KeyEvent};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::device::views::{AdminView, SyncDriver};
use crate::device::{Device, DeviceError};
use crate::store;
use crate::transport::backoff;

/// Opens the configured device (asking for the passphrase if that is the key source).
pub fn open(config_path: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Device> {
    open_config(Config::load(config_path)?, clock)
}

/// [`open`] with the configuration already read.
fn open_config(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Device> {
    let source = config.key.source()?;
    let root = store::unlock(&config.data_dir, &source)
        .with_context(|| format!("unlocking {}", config.data_dir.display()))?;
    Ok(Device::open(config, &root, clock)?)
}

/// `carecache enrol`.
pub fn enrol(config_path: &Path, token: &str, renew: bool) -> anyhow::Result<()> {
    let device = open(config_path, Arc::new(SystemClock::new()))?;
    if renew {
        let id = device.re_enrol(token)?;
        println!("re-certified {id}; audit waiting on the device goes up at the next sync");
        return Ok(());
    }
    let id = device.enrol(token)?;
    println!(
        "enrolled as {id}; the hub CA in {} is pinned from now on",
        device.config().hub.ca_file.display()
    );
    Ok(())
}

/// `carecache sync`: one round, with a progress bar on a terminal; `stats` adds a line of
/// figures (time, bytes, peak memory) for benchmarks and capacity checks.
pub fn sync(config_path: &Path, stats: bool) -> anyhow::Result<()> {
    if !stats {
        return command(
            config_path,
            &crate::admin::Request::Sync,
            &mut std::io::stdout().lock(),
        );
    }
    // Figures of this process's own sync (benchmarks): never through the daemon.
    let device = open(config_path, Arc::new(SystemClock::new())).context(
        "opening the device (`sync --stats` measures this process: stop the daemon first)",
    )?;
    let started = std::time::Instant::now();
    let device = Arc::new(device);
    let result = sync_with_progress(&AdminView::of(&device));
    device
        .audit_blocking(AuditEvent::Admin {
            command: sync_protocol::audit::AdminCommand::SyncNow,
            uid: None,
            ok: result.is_ok(),
        })
        .context("the sync ran, but its audit entry could not be written")?;
    let s = result?;
    println!("{}", crate::admin::synced_line(&s, started.elapsed()));
    println!(
        "stats: elapsed_ms={} bytes={} batches={} upserts={} peak_rss_kib={}",
        started.elapsed().as_millis(),
        s.bytes,
        s.batches,
        s.upserts,
        peak_rss_kib().unwrap_or(0)
    );
    Ok(())
}

/// One sync round with a progress bar: patients held of those the hub expects, bytes
/// received, batches, and the time left at the rate so far (drawn only on a terminal).
pub fn sync_with_progress(device: &AdminView) -> Result<crate::sync::Summary, DeviceError> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} patients, {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let result = device.sync_once(&mut |s, c| {
        if let Some(e) = c.expected {
            bar.set_length(u64::from(e).max(c.held));
        } else {
            bar.set_length(c.held);
        }
        bar.set_position(c.held);
        bar.set_message(format!(
            "{:.1} MB, {} batches{}",
            s.bytes as f64 / 1e6,
            s.batches,
            c.eta_secs
                .map(|t| format!(", about {} left", crate::clock::human(t)))
                .unwrap_or_default()
        ));
    });
    bar.finish_and_clear();
    result
}

/// An operator command: over the admin channel when the daemon runs, else on the data
/// directory (unlocking it). `out` is where the command's output goes (standard output,
/// or the export file).
pub fn command(
    config_path: &Path,
    request: &crate::admin::Request,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let mut err = std::io::stderr().lock();
    match crate::admin::call(&config.admin_socket, request, out, &mut err) {
        Ok(()) => return Ok(()),
        Err(crate::admin::ChannelError::NotRunning) => {}
        Err(e) => return Err(e.into()),
    }
    drop(err);
    let device = Arc::new(open_config(config, Arc::new(SystemClock::new()))?);
    let result = crate::admin::execute(
        &AdminView::of(&device),
        request,
        crate::admin::Via::Direct,
        out,
        &mut std::io::stderr().lock(),
    );
    device.audit().close();
    result
}

/// `carecache serve`: the local API, the policy tick and the sync loop, until SIGINT or
/// SIGTERM. Under systemd (`Type=notify`) it says `READY=1` once the API listens and
/// `STOPPING=1` when asked to stop.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let clock = Arc::new(SystemClock::new());
    let device = Arc::new(open(config_path, clock.clone())?);
    let stop = stop_on_signals()?;
    let result = run(device, clock, &stop, |_| {
        notify(&[sd_notify::NotifyState::Ready])
    });
    notify(&[sd_notify::NotifyState::Stopping]);
    result
}

/// A flag set by SIGINT or SIGTERM.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    Ok(stop)
}

/// Tells the service manager, if one is listening (`$NOTIFY_SOCKET`); otherwise nothing.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "telling the service manager failed");
    }
}

/// Runs an opened device — the local API, the audit uploader, the policy tick and the
/// sync loop — until `stop` is set or the hub revokes it. `ready` is called once the API
/// listens, with its TCP address if it has one.
pub fn run(
    device: Arc<Device>,
    clock: Arc<dyn Clock>,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(Option<std::net::SocketAddr>),
) -> anyhow::Result<()> {
    device
        .audit_blocking(AuditEvent::Key(KeyEvent::Unlocked))
        .context(
            "writing the first audit entry (the daemon does not serve without an audit log)",
        )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listeners = rt.block_on(bind(&device.config().api))?;
    let tcp = listeners.iter().find_map(|l| match l {
        crate::api::Listener::Tcp(t) => t.local_addr().ok(),
        crate::api::Listener::Unix(..) => None,
    });
    let api = crate::api::Api::new(&device);
    let stopping = Arc::clone(stop);
    let server = rt.spawn(crate::api::serve(api, listeners, async move {
        while !stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }));
    tracing::info!(hub = %device.config().hub.url, "serving");
    let admin = crate::admin::Server::start(
        AdminView::of(&device),
        &device.config().admin_socket,
        Arc::clone(stop),
    );
    let admin = match admin {
        Ok(a) => a,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            let _ = rt.block_on(server);
            return Err(e);
        }
    };
    let uploader = {
        let (device, clock, stop) = (
            SyncDriver::of(&device),
            Arc::clone(&clock),
            Arc::clone(stop),
        );
        std::thread::Builder::new()
            .name("audit-upload".into())
            .spawn(move || upload_loop(&device, clock.as_ref(), &stop))
            .context("starting the audit uploader")?
    };
    ready(tcp);
    let result = run_loop(&SyncDriver::of(&device), clock.as_ref(), stop);
    stop.store(true, Ordering::SeqCst);
    admin.finish();
    if uploader.join().is_err() {
        tracing::error!("the audit uploader panicked");
    }
    match rt.block_on(server) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the local API stopped with an error"),
        Err(e) => tracing::error!(error = %e, "the local API task failed"),
    }
    device.audit().close();
    result
}

/// Binds the configured listeners and logs where they are.
async fn bind(cfg: &crate::config::ApiConfig) -> anyhow::Result<Vec<crate::api::Listener>> {
    let mut out = Vec::new();
    if let Some(addr) = cfg.listen {
        let l = crate::api::bind_tcp(addr)
            .with_context(|| format!("binding the local API to {addr}"))?;
        let local = l.local_addr().context("reading the bound address")?;
        tracing::info!(addr = %local, "local API listening");
        out.push(crate::api::Listener::Tcp(l));
    }
    if let Some(path) = &cfg.socket {
        let l = crate::api::Listener::bind_unix(path)
            .with_context(|| format!("binding the local API socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "local API listening");
        out.push(l);
    }
    Ok(out)
}

/// The loop `serve` runs; returns when `stop` is set or the device is revoked.
pub fn run_loop(device: &SyncDriver, clock: &dyn Clock, stop: &AtomicBool) -> anyhow::Result<()> {
    let cfg = device.config().sync.clone();
    let mut schedule = Schedule::new(&cfg, clock.monotonic());
    while !stop.load(Ordering::SeqCst) {
        let now = clock.monotonic();
        match schedule.next(now) {
            Action::Tick => {
                match device.tick() {
                    Ok(r) if !r.ended.is_empty() => {
                        tracing::info!(ended = r.ended.len(), purged = r.purged, "leases ended");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "policy tick failed"),
                }
                schedule.ticked(now);
            }
            Action::Probe => {
                let up = device.probe();
                schedule.probed(now, up);
            }
            Action::Sync => match device.sync_once(&mut |_, _| {}) {
                Ok(s) => {
                    tracing::info!(
                        batches = s.batches,
                        upserts = s.upserts,
                        bytes = s.bytes,
                        "sync finished"
                    );
                    schedule.synced(now, None);
                }
                Err(DeviceError::Revoked) => {
                    anyhow::bail!("the hub revoked this device; its data has been destroyed");
                }
                Err(e) => {
                    let offline = matches!(&e, DeviceError::Transport(t) if t.is_offline());
                    let retry_after = match &e {
                        DeviceError::Sync(crate::sync::SyncError::Refused {
                            retry_after_secs,
                            ..
                        }) => retry_after_secs.map(|s| Duration::from_secs(u64::from(s))),
                        _ => None,
                    };
                    schedule.synced(
                        now,
                        Some(Failure {
                            offline,
                            retry_after,
                            unit: random_unit(),
                        }),
                    );
                }
            },
            Action::Wait(d) => std::thread::sleep(d.min(Duration::from_millis(250))),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The audit upload schedule, beside the uploads every sync round makes: every
/// `audit.upload_interval` while entries wait (an upload with none waiting does nothing);
/// after a failure, backoff with jitter from that interval up to `sync.retry_max`.
/// Returns when `stop` is set or the device is revoked.
pub fn upload_loop(device: &SyncDriver, clock: &dyn Clock, stop: &AtomicBool) {
    let interval = device.config().audit.upload_interval;
    let cap = device.config().sync.retry_max.max(interval);
    // The first sync round uploads at once; this schedule starts one interval later.
    let mut next = clock.monotonic() + interval;
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let now = clock.monotonic();
        if now >= next {
            let wait = match device.upload_audit() {
                Ok(_) => {
                    failures = 0;
                    interval
                }
                Err(DeviceError::Revoked) => return,
                Err(_) => {
                    failures = failures.saturating_add(1);
                    backoff(failures - 1, interval, cap, random_unit())
                }
            };
            next = now + wait;
        }
        std::thread::sleep(next.saturating_sub(now).min(Duration::from_millis(250)));
    }
}

/// This process's peak resident set (Linux `VmHWM`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the policy tick.
    Tick,
    /// Run a sync round.
    Sync,
    /// See whether the hub is reachable again.
    Probe,
    /// Nothing due for this long.
    Wait(Duration),
}

/// How a sync round failed, for the schedule.
#[derive(Clone, Copy, Debug)]
pub struct Failure {
    /// The network was the problem.
    pub offline: bool,
    /// The hub asked for this delay.
    pub retry_after: Option<Duration>,
    /// A random draw in [0, 1) for jitter.
    pub unit: f64,
}

/// When to tick, sync and probe, on the monotonic clock.
#[derive(Debug)]
pub struct Schedule {
    tick: Duration,
    interval: Duration,
    probe: Duration,
    retry_min: Duration,
    retry_max: Duration,
    next_tick: Duration,
    next_sync: Duration,
    next_probe: Option<Duration>,
    failures: u32,
}

impl Schedule {
    /// A schedule that ticks and syncs at once.
    pub fn new(cfg: &crate::config::SyncConfig, now: Duration) -> Self {
        Self {
            tick: cfg.tick,
            interval: cfg.interval,
            probe: cfg.probe,
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            next_tick: now,
            next_sync: now,
            next_probe: None,
            failures: 0,
        }
    }

    /// The next action at `now`.
    pub fn next(&self, now: Duration) -> Action {
        if now >= self.next_tick {
            return Action::Tick;
        }
        if now >= self.next_sync {
            return Action::Sync;
        }
        if let Some(p) = self.next_probe
            && now >= p
        {
            return Action::Probe;
        }
        let mut wake = self.next_tick.min(self.next_sync);
        if let Some(p) = self.next_probe {
            wake = wake.min(p);
        }
        Action::Wait(wake.saturating_sub(now))
    }

    /// The tick ran.
    pub fn ticked(&mut self, now: Duration) {
        self.next_tick = now + self.tick;
    }

    /// A sync round ended.
    pub fn synced(&mut self, now: Duration, failure: Option<Failure>) {
        match failure {
            None => {
                self.failures = 0;
                self.next_probe = None;
                self.next_sync = now + self.interval;
            }
            Some(f) => {
                let wait = backoff(self.failures, self.retry_min, self.retry_max, f.unit);
                self.failures = self.failures.saturating_add(1);
                self.next_sync = now + f.retry_after.map_or(wait, |r| r.max(wait));
                // Offline: probe cheaply meanwhile, and sync as soon as the hub answers.
                self.next_probe = (f.offline && f.retry_after.is_none())
                    .then(|| now + self.probe)
                    .filter(|p| *p < self.next_sync);
            }
        }
    }

    /// A probe ran; `up` if the hub answered.
    pub fn probed(&mut self, now: Duration, up: bool) {
        if up {
            self.next_probe = None;
            self.next_sync = now;
        } else {
            let p = now + self.probe;
            self.next_probe = (p < self.next_sync).then_some(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncConfig;

    fn cfg() -> SyncConfig {
        SyncConfig {
            interval: Duration::from_secs(300),
            tick: Duration::from_secs(60),
            max_clock_skew: Duration::from_secs(900),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(900),
            probe: Duration::from_secs(15),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ticks_every_tick_and_syncs_every_interval() {
        let mut s = Schedule::new(&cfg(), S(0));
        assert_eq!(s.next(S(0)), Action::Tick);
        s.ticked(S(0));
        assert_eq!(s.next(S(0)), Action::Sync);
        s.synced(S(0), None);
        assert_eq!(s.next(S(1)), Action::Wait(S(59)));
        assert_eq!(s.next(S(60)), Action::Tick);
        s.ticked(S(60));
        assert_eq!(
            s.next(S(299)),
            Action::Tick,
            "ticks keep coming between syncs"
        );
        s.ticked(S(299));
        assert_eq!(s.next(S(299)), Action::Wait(S(1)));
        assert_eq!(s.next(S(300)), Action::Sync);
    }

    #[test]
    fn offline_backs_off_with_jitter_and_probes_until_the_hub_is_back() {
        let mut s = Schedule::new(&cfg(), S(0));
        s.ticked(S(0));
        let mut now = S(0);
        let mut waits = Vec::new();
        for _ in 0..8 {
            s.synced(
                now,
                Some(Failure {
                    offline: true,
                    retry_after: None,
                    unit: 0.999,
                }),
            );
            waits.push(s.next_sync - now);
            now = s.next_sync;
            s.next_tick = now + S(1000);
        }
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(*waits.last().unwrap() <= S(900));
        // Between retries the loop probes; a successful probe syncs at once.
        s.synced(
            now,
            Some(Failure {
                offline: true,
                retry_after: None,
                unit: 0.999,
            }),
        );
        assert_eq!(s.next(now + S(15)), Action::Probe);
        s.probed(now + S(15), false);
        assert_eq!(s.next(now + S(30)), Action::Probe);
        s.probed(now + S(30), true);
        assert_eq!(s.next(now + S(30)), Action::Sync);
        s.synced(now + S(30), None);
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn the_hubs_retry_after_is_respected() {
        let mut s = Schedule::new(&cfg(), S(0));
        s.ticked(S(0));
        s.next_tick = S(10_000);
        s.synced(
            S(0),
            Some(Failure {
                offline: false,
                retry_after: Some(S(120)),
                unit: 0.0,
            }),
        );
        assert_eq!(s.next(S(119)), Action::Wait(S(1)));
        assert_eq!(s.next(S(120)), Action::Sync);
    }
}
