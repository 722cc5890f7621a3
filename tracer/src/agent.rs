//! `hvnet run`: wires config, loader, links, collect and export together.
//!
//! Start-up order matters for "bad input loses nothing": everything that
//! can fail without touching the kernel (config, capabilities, the listen
//! port, BTF) is checked before a single program is attached.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    collect::{CollectError, CounterMap},
    config::Config,
    export::{Exposition, VmView},
    http,
    links::{self, LinkInfo, LinkWatcher},
    loader::{ProbeStatus, TcProbes},
    privileges,
};

/// How often the interface list is re-read even without netlink events, in
/// case an event was lost (netlink drops them under memory pressure).
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Link events come in bursts (create, set master, set up): wait this long
/// after the first one and handle the burst once.
const EVENT_SETTLE: Duration = Duration::from_millis(20);

/// State shared by the reconcile loop and the HTTP handlers. Locks are held
/// only for map reads and attach calls, never across an await.
pub struct AgentState {
    probes: Mutex<TcProbes>,
    counters: Mutex<CounterMap>,
    attached: Mutex<BTreeMap<u32, LinkInfo>>,
    failed: Mutex<BTreeMap<u32, String>>,
    attach_failures: AtomicU64,
    link_events: AtomicU64,
    probe_statuses: Vec<ProbeStatus>,
    mechanism: &'static str,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AgentState {
    fn new(probes: TcProbes, counters: CounterMap) -> Self {
        let probe_statuses = probes.probe_statuses();
        let mechanism = probes.mechanism().as_str();
        Self {
            probes: Mutex::new(probes),
            counters: Mutex::new(counters),
            attached: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            attach_failures: AtomicU64::new(0),
            link_events: AtomicU64::new(0),
            probe_statuses,
            mechanism,
        }
    }

    /// One consistent view for a scrape or an API call.
    pub fn exposition(&self) -> Result<Exposition, CollectError> {
        let attached = lock(&self.attached).clone();
        let totals = lock(&self.counters).read()?;
        let vms = attached
            .values()
            .map(|link| VmView {
                iface: link.name.clone(),
                ifindex: link.ifindex,
                mac: link.mac_string(),
                oper_state: link.oper_state.clone(),
                vm_uuid: String::new(),
                vm_name: link.name.clone(),
                traffic: totals.get(&link.ifindex).copied().unwrap_or_default(),
            })
            .collect();
        Ok(Exposition {
            vms,
            probes: self.probe_statuses.clone(),
            attach_failures: self.attach_failures.load(Ordering::Relaxed),
            link_events: self.link_events.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mechanism: self.mechanism.to_owned(),
        })
    }

    pub fn interface_count(&self) -> usize {
        lock(&self.attached).len()
    }

    /// Brings attachments in line with the interfaces that exist now.
    fn reconcile(&self, present: &[LinkInfo], config: &Config) {
        let attached_names: BTreeMap<u32, String> = lock(&self.attached)
            .iter()
            .map(|(i, l)| (*i, l.name.clone()))
            .collect();
        // Forget failures of interfaces that are gone, so a new interface
        // reusing the ifindex gets its own attempt.
        lock(&self.failed).retain(|ifindex, name| {
            present
                .iter()
                .any(|l| l.ifindex == *ifindex && &l.name == name)
        });
        let plan = links::plan(
            &attached_names,
            present,
            &config.interfaces,
            &lock(&self.failed),
        );
        for ifindex in plan.detach {
            self.forget(ifindex);
        }
        for link in plan.attach {
            self.attach(link);
        }
        // Keep oper state and MAC current for interfaces that stay.
        let mut attached = lock(&self.attached);
        for link in present {
            if let Some(known) = attached.get_mut(&link.ifindex) {
                if known.name == link.name {
                    *known = link.clone();
                }
            }
        }
    }

    fn attach(&self, link: LinkInfo) {
        // Counters left by an earlier interface with this ifindex are not ours.
        if let Err(err) = lock(&self.counters).forget_interface(link.ifindex) {
            log::warn!("{}: clearing old counters: {err}", link.name);
        }
        let result = lock(&self.probes).attach(link.ifindex, &link.name);
        match result {
            Ok(()) => {
                log::info!(
                    "attached to {} (ifindex {}, mac {}, {})",
                    link.name,
                    link.ifindex,
                    link.mac_string(),
                    self.mechanism
                );
                lock(&self.attached).insert(link.ifindex, link);
            }
            Err(err) => {
                log::warn!("{err}; hvnet will not retry this interface until it is recreated");
                self.attach_failures.fetch_add(1, Ordering::Relaxed);
                lock(&self.failed).insert(link.ifindex, link.name);
            }
        }
    }

    fn forget(&self, ifindex: u32) {
        let name = lock(&self.probes).detach(ifindex);
        lock(&self.attached).remove(&ifindex);
        if let Err(err) = lock(&self.counters).forget_interface(ifindex) {
            log::warn!("ifindex {ifindex}: clearing counters: {err}");
        }
        if let Some(name) = name {
            log::info!("detached from {name} (ifindex {ifindex}): interface gone or renamed");
        }
    }

    fn detach_everything(&self) -> usize {
        lock(&self.attached).clear();
        lock(&self.probes).detach_all()
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    privileges::check()?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another hvnet or exporter using it? choose another with --listen",
            config.listen
        )
    })?;
    let (probes, counters) = TcProbes::load(&config.btf, config.attach_mode)?;
    let statuses = probes.probe_statuses();
    for status in &statuses {
        log::info!(
            "probe {} ({}): {} - {}",
            status.probe,
            status.kind,
            if status.attached {
                "in use"
            } else {
                "unavailable"
            },
            status.detail
        );
    }
    let state = Arc::new(AgentState::new(probes, counters));

    let mut watcher = LinkWatcher::start()?;
    let present = watcher.dump().await?;
    state.reconcile(&present, &config);
    log::info!(
        "hvnet {} watching {} ({} attached), serving http://{}/metrics",
        env!("CARGO_PKG_VERSION"),
        config.interfaces.globs().join(","),
        state.interface_count(),
        config.listen
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, state.clone(), shutdown_rx));

    let outcome = watch_links(&state, &config, &mut watcher).await;

    let detached = state.detach_everything();
    log::info!("detached from {detached} interface(s); exiting");
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(err))) => log::warn!("http server: {err}"),
        Ok(Err(err)) => log::warn!("http server task: {err}"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    outcome
}

/// Reacts to link events and periodic resyncs until SIGTERM or SIGINT.
async fn watch_links(
    state: &AgentState,
    config: &Config,
    watcher: &mut LinkWatcher,
) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); return Ok(()); }
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); return Ok(()); }
            alive = watcher.changed() => {
                if !alive {
                    anyhow::bail!("the rtnetlink event socket closed unexpectedly");
                }
                state.link_events.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(EVENT_SETTLE).await;
                watcher.drain();
            }
            _ = resync.tick() => {}
        }
        match watcher.dump().await {
            Ok(present) => state.reconcile(&present, config),
            Err(err) => log::warn!("{err}; keeping the current attachments"),
        }
    }
}
