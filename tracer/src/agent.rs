//! The agent's state: which taps are attached, what the kernel maps say,
//! each VM's stall and DHCP analysis, who the VMs are; and the consistent
//! views of it that /metrics and /api/v1 serve. `daemon` drives it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::sync::broadcast;
use tracer_common::direction;

use crate::{
    collect::{CollectError, KernelMaps, KernelSnapshot},
    config::Config,
    departed::DepartedSeries,
    drops::{drop_direction, reason_name},
    events::{interpret, Observed},
    export::{DhcpView, DropCount, Exposition, VmHealth, VmView},
    identity::{Identity, IdentityResolver},
    links::{self, LinkInfo},
    loader::{monotonic_now, TcProbes},
    optional_probes::ProbeStatus,
    optional_probes::{DEQUEUE_PROBE, DROP_PROBE},
    stall::{Observation, VmState},
    timeline::{render_explanation, wall_clock, Entry, Explanation},
    vm::VmRecord,
};

/// Lines kept for slow /api/v1/events readers before they skip ahead.
const EVENT_STREAM_BACKLOG: usize = 1024;

/// Why a matching tap is not attached yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// The open-file limit is reached.
    FdLimit,
    /// max_interfaces taps are attached already (the maps are full).
    Capacity,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FdLimit => "fd_limit",
            Self::Capacity => "capacity",
        }
    }
}

/// Why a VM name given to explain/timeline matched no single VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no monitored VM or interface named {0:?}")]
    NotFound(String),
    #[error("{name:?} names more than one monitored interface: {}", candidates.join(", "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
}

/// State shared by the poll loop and the HTTP handlers. Locks are held
/// only for map reads and attach calls, never across an await.
pub struct AgentState {
    probes: Mutex<TcProbes>,
    maps: Mutex<KernelMaps>,
    attached: Mutex<BTreeMap<u32, LinkInfo>>,
    failed: Mutex<BTreeMap<u32, String>>,
    /// Taps not attached yet, and why (retried every poll).
    waiting: Mutex<BTreeMap<u32, (String, WaitReason)>>,
    /// Most taps attached at once (the kernel maps hold this many).
    max_interfaces: usize,
    records: Mutex<BTreeMap<u32, VmRecord>>,
    stream: broadcast::Sender<String>,
    attach_failures: AtomicU64,
    pub(crate) link_events: AtomicU64,
    probe_statuses: Vec<ProbeStatus>,
    drop_reasons: HashMap<u32, String>,
    has_dequeue_probe: bool,
    has_drop_probe: bool,
    mechanism: &'static str,
    stall_after: Duration,
    resolver: IdentityResolver,
    identities: Mutex<HashMap<String, Identity>>,
    identity_refreshed: Mutex<f64>,
    project_label: bool,
    metrics_detail: crate::config::MetricsDetail,
    departed: Mutex<DepartedSeries>,
}

/// How often identities are re-read without a tap change (a VM renamed,
/// libvirt restarted).
const IDENTITY_REFRESH_SECS: f64 = 30.0;
/// ...and while some tap is known only by name: a VM that is starting has
/// its tap before its QEMU process and its libvirt status file.
const WEAK_IDENTITY_REFRESH_SECS: f64 = 3.0;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AgentState {
    pub(crate) fn new(probes: TcProbes, maps: KernelMaps, config: &Config) -> Self {
        let stall_after = config.stall_after;
        let probe_statuses = probes.probe_statuses();
        let mechanism = probes.mechanism().as_str();
        let drop_reasons = probes.drop_reasons().clone();
        let has_dequeue_probe = probes.has_probe(DEQUEUE_PROBE);
        let has_drop_probe = probes.has_probe(DROP_PROBE);
        Self {
            probes: Mutex::new(probes),
            maps: Mutex::new(maps),
            attached: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            waiting: Mutex::new(BTreeMap::new()),
            max_interfaces: config.max_interfaces as usize,
            records: Mutex::new(BTreeMap::new()),
            stream: broadcast::channel(EVENT_STREAM_BACKLOG).0,
            attach_failures: AtomicU64::new(0),
            link_events: AtomicU64::new(0),
            probe_statuses,
            drop_reasons,
            has_dequeue_probe,
            has_drop_probe,
            mechanism,
            stall_after,
            resolver: IdentityResolver::new(&config.libvirt_run_dir, &config.proc_root),
            identities: Mutex::new(HashMap::new()),
            identity_refreshed: Mutex::new(f64::NEG_INFINITY),
            project_label: config.project_label,
            metrics_detail: config.metrics_detail,
            departed: Mutex::new(DepartedSeries::new(config.series_grace)),
        }
    }

    /// Re-reads who is behind each attached tap.
    fn refresh_identities(&self) {
        let names: Vec<String> = lock(&self.attached)
            .values()
            .map(|l| l.name.clone())
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (found, skipped) = self.resolver.resolve(&refs);
        let mut known = lock(&self.identities);
        for (tap, identity) in &found {
            if known.get(tap) != Some(identity) {
                log::info!(
                    "{tap} is VM {:?} ({})",
                    identity.vm_name,
                    identity.describe()
                );
            }
        }
        for s in skipped {
            if !known.contains_key(&s.device) {
                log::debug!("{} of VM {}: skipped: {}", s.device, s.domain, s.reason);
            }
        }
        *known = found;
        *lock(&self.identity_refreshed) = self.now();
    }

    pub fn identity(&self, iface: &str) -> Identity {
        lock(&self.identities)
            .get(iface)
            .cloned()
            .unwrap_or_else(|| Identity {
                vm_name: iface.to_owned(),
                source: "tap",
                ..Default::default()
            })
    }

    /// One consistent view for a scrape or an API call.
    pub fn exposition(&self) -> Result<Exposition, CollectError> {
        let attached = lock(&self.attached).clone();
        let snapshot = lock(&self.maps).read();
        for (map, reason) in &snapshot.unreadable {
            log::debug!("scrape: map {map} unreadable ({reason}); its series are left out");
        }
        let now = self.now();
        let records = lock(&self.records);
        let mut vms: Vec<VmView> = attached
            .values()
            .map(|link| self.view(link, &snapshot, records.get(&link.ifindex), now))
            .collect();
        drop(records);
        let names: Vec<&str> = attached.values().map(|l| l.name.as_str()).collect();
        vms.extend(lock(&self.departed).visible(now, &names));
        Ok(Exposition {
            vms,
            probes: self.probe_statuses.clone(),
            attach_failures: self.attach_failures.load(Ordering::Relaxed),
            link_events: self.link_events.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mechanism: self.mechanism.to_owned(),
            events_lost: snapshot.events_lost,
            project_label: self.project_label,
            full_detail: self.metrics_detail == crate::config::MetricsDetail::Full,
            waiting: {
                let waiting = lock(&self.waiting);
                [WaitReason::FdLimit, WaitReason::Capacity]
                    .map(|reason| {
                        (
                            reason.as_str(),
                            waiting.values().filter(|(_, r)| *r == reason).count(),
                        )
                    })
                    .to_vec()
            },
            map_update_failures: snapshot.map_update_failures,
            probe_read_errors: snapshot.probe_read_errors,
            map_reads: crate::collect::SNAPSHOT_MAPS
                .iter()
                .map(|map| (*map, snapshot.readable(map)))
                .collect(),
        })
    }

    /// What one attached tap shows.
    fn view(
        &self,
        link: &LinkInfo,
        snapshot: &KernelSnapshot,
        record: Option<&VmRecord>,
        now: f64,
    ) -> VmView {
        let identity = self.identity(&link.name);
        // Without an identity source, the tap's own MAC (from netlink) is
        // the best handle left: libvirt's is the guest's with fe: in front.
        let mac = if identity.mac.is_empty() {
            link.mac_string()
        } else {
            identity.mac.clone()
        };
        VmView {
            iface: link.name.clone(),
            ifindex: link.ifindex,
            mac,
            tap_mac: link.mac_string(),
            oper_state: link.oper_state.clone(),
            vm_uuid: identity.vm_uuid.clone(),
            vm_name: identity.vm_name.clone(),
            identity,
            traffic: snapshot
                .traffic
                .get(&link.ifindex)
                .copied()
                .unwrap_or_default(),
            drops: self.drop_counts(snapshot, link),
            dequeued: self
                .has_dequeue_probe
                .then(|| snapshot.dequeued.get(&link.ifindex).copied().unwrap_or(0)),
            netdev_tx_packets: link.stats.map(|s| s.tx_packets),
            vhost_rx: snapshot.vhost_rx.get(&link.ifindex).copied(),
            events_throttled: snapshot
                .events_throttled
                .get(&link.ifindex)
                .copied()
                .unwrap_or(0),
            queue_len: link.txqueuelen,
            health: record.map(|r| VmHealth {
                state: r.detector.state(),
                backlog: r.detector.backlog(),
                stalls_total: r.detector.stalls_total(),
                stall_seconds: r.detector.stall_seconds(),
            }),
            dhcp: record.map(|r| DhcpView {
                counters: r.dhcp.counters().clone(),
                lease_remaining: r.dhcp.lease().map(|l| l.remaining(now)),
                lease_address: r.dhcp.lease().map(|l| l.address.clone()),
                last_verdict: r.dhcp.last_verdict(),
            }),
            departed: false,
        }
    }

    /// A VM by tap name, VM name or UUID.
    /// The record a name means: a tap name first, else a VM name or UUID.
    /// A VM with several NICs has several taps: its name is then ambiguous.
    fn find_record<'a>(
        &self,
        records: &'a BTreeMap<u32, VmRecord>,
        name: &str,
    ) -> Result<&'a VmRecord, LookupError> {
        if let Some(record) = records.values().find(|r| r.iface == name) {
            return Ok(record);
        }
        let identities = lock(&self.identities);
        let mut taps: Vec<&str> = identities
            .iter()
            .filter(|(_, id)| id.vm_name == name || (!id.vm_uuid.is_empty() && id.vm_uuid == name))
            .map(|(tap, _)| tap.as_str())
            .filter(|tap| records.values().any(|r| r.iface == *tap))
            .collect();
        taps.sort_unstable();
        match taps.as_slice() {
            [] => Err(LookupError::NotFound(name.to_owned())),
            [tap] => records
                .values()
                .find(|r| r.iface == *tap)
                .ok_or_else(|| LookupError::NotFound(name.to_owned())),
            several => Err(LookupError::Ambiguous {
                name: name.to_owned(),
                candidates: several.iter().map(|t| (*t).to_owned()).collect(),
            }),
        }
    }

    /// `hvnet explain` text for a VM (by iface; identity names come later).
    pub fn explain(&self, name: &str) -> Result<String, LookupError> {
        let now = self.now();
        let records = lock(&self.records);
        let record = self.find_record(&records, name)?;
        let identity = self.identity(&record.iface);
        let stuck_since = record.detector.stuck_since().map(|m| wall_clock(m, now));
        let counters = record.dhcp.counters();
        let lease = record
            .dhcp
            .lease()
            .map(|l| (l.address.clone(), l.remaining(now), l.expired));
        Ok(render_explanation(
            &Explanation {
                iface: &record.iface,
                vm_name: &identity.vm_name,
                state: Some(record.detector.state()),
                stuck_since,
                retries_during_stall: counters.retries_during_stall,
                replies_undelivered: counters.replies_undelivered,
                replies_unprocessed: counters.replies_unprocessed,
                lease,
                now_unix: wall_clock(now, now),
                identity: &identity.describe(),
            },
            &record.timeline,
        ))
    }

    pub fn timeline(&self, name: &str) -> Result<Vec<Entry>, LookupError> {
        let records = lock(&self.records);
        self.find_record(&records, name)
            .map(|r| r.timeline.entries().cloned().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.stream.subscribe()
    }

    fn publish(&self, entries: &[Entry]) {
        for entry in entries {
            if let Ok(line) = serde_json::to_string(entry) {
                // No subscriber is fine.
                let _ = self.stream.send(line);
            }
        }
    }

    /// Handles one batch of kernel DHCP/ARP events.
    pub(crate) fn handle_events(&self, batch: &[tracer_common::PacketEvent]) {
        let now = self.now();
        let mut published = Vec::new();
        let mut records = lock(&self.records);
        for ev in batch {
            let Some(observed) = interpret(ev, |r| reason_name(&self.drop_reasons, r)) else {
                continue;
            };
            match observed {
                Observed::Dhcp {
                    ifindex,
                    mono,
                    message,
                } => {
                    if let Some(record) = records.get_mut(&ifindex) {
                        published.extend(record.dhcp_message(&message, mono, now));
                    }
                }
                Observed::MalformedDhcp {
                    ifindex,
                    mono,
                    from_vm,
                    flags,
                } => {
                    if let Some(record) = records.get_mut(&ifindex) {
                        published.push(record.malformed(mono, now, from_vm, flags));
                    }
                }
                Observed::Arp {
                    ifindex,
                    mono,
                    from_vm,
                    op,
                    sender,
                    target,
                } => {
                    if let Some(record) = records.get_mut(&ifindex) {
                        published.extend(record.arp(mono, now, from_vm, op, sender, target));
                    }
                }
            }
        }
        drop(records);
        self.publish(&published);
    }

    fn drop_counts(&self, snapshot: &KernelSnapshot, link: &LinkInfo) -> Vec<DropCount> {
        if !self.has_drop_probe {
            // Fallback: the tap's own counter, almost always a full ring.
            return link
                .stats
                .map(|s| {
                    vec![DropCount {
                        direction: "to_vm",
                        reason: "netdev_tx_dropped".into(),
                        packets: s.tx_dropped,
                    }]
                })
                .unwrap_or_default();
        }
        snapshot
            .drops
            .get(&link.ifindex)
            .map(|by_reason| {
                by_reason
                    .iter()
                    .map(|(reason, packets)| {
                        let name = reason_name(&self.drop_reasons, *reason);
                        DropCount {
                            direction: drop_direction(&name),
                            reason: name,
                            packets: *packets,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn interface_count(&self) -> usize {
        lock(&self.attached).len()
    }

    fn now(&self) -> f64 {
        monotonic_now()
    }

    /// Brings attachments in line with the interfaces that exist now.
    pub(crate) fn reconcile(&self, present: &[LinkInfo], config: &Config) {
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
        let changed = !plan.attach.is_empty() || !plan.detach.is_empty();
        self.keep_final_counters(&plan.detach);
        for &ifindex in &plan.detach {
            self.forget(ifindex);
        }
        lock(&self.maps).forget_interfaces(&plan.detach);
        self.attach_within_limits(plan.attach);
        let any_weak = lock(&self.identities).values().any(Identity::is_weak);
        let every = if any_weak {
            WEAK_IDENTITY_REFRESH_SECS
        } else {
            IDENTITY_REFRESH_SECS
        };
        if changed || self.now() - *lock(&self.identity_refreshed) >= every {
            self.refresh_identities();
        }
        // Keep oper state, stats and MAC current for interfaces that stay.
        let mut attached = lock(&self.attached);
        for link in present {
            if let Some(known) = attached.get_mut(&link.ifindex) {
                if known.name == link.name {
                    *known = link.clone();
                }
            }
        }
    }

    /// Attaches what the kernel maps and the open-file limit allow; the
    /// rest waits (retried every poll) instead of failing or being counted
    /// nowhere. Beyond max_interfaces the maps are full: a tap attached
    /// anyway would lose its counts. And running out of descriptors
    /// mid-attach would also break the polls of every tap already attached.
    fn attach_within_limits(&self, links: Vec<LinkInfo>) {
        if links.is_empty() {
            lock(&self.waiting).clear();
            return;
        }
        let room = self
            .max_interfaces
            .saturating_sub(lock(&self.attached).len());
        // Cannot tell: try them all.
        let (fd_budget, open, limit) = crate::fd_limit::attach_budget().unwrap_or((u64::MAX, 0, 0));
        let mut waiting = BTreeMap::new();
        // Counters left by earlier interfaces with these ifindexes are not
        // theirs: cleared in one pass before attaching.
        let fresh: Vec<u32> = links.iter().map(|l| l.ifindex).collect();
        lock(&self.maps).forget_interfaces(&fresh);
        let mut tried = 0usize;
        for link in links {
            if tried >= room {
                waiting.insert(link.ifindex, (link.name, WaitReason::Capacity));
                continue;
            }
            if tried as u64 >= fd_budget {
                waiting.insert(link.ifindex, (link.name, WaitReason::FdLimit));
                continue;
            }
            tried += 1;
            if let Some(name) = self.attach(link.clone()) {
                waiting.insert(link.ifindex, (name, WaitReason::FdLimit));
            }
        }
        let mut known = lock(&self.waiting);
        if waiting.keys().ne(known.keys()) {
            let count = |reason| waiting.values().filter(|(_, r)| *r == reason).count();
            let (fds, capacity) = (count(WaitReason::FdLimit), count(WaitReason::Capacity));
            if fds > 0 {
                log::warn!(
                    "{fds} interface(s) wait for file descriptors: the open-file limit is reached ({open} of {limit} in use, {} kept for polling); raise LimitNOFILE (about {} per tap); retrying every poll",
                    crate::fd_limit::FD_RESERVE,
                    crate::fd_limit::FDS_PER_ATTACH
                );
            }
            if capacity > 0 {
                log::warn!(
                    "{capacity} interface(s) not attached: max_interfaces ({}) taps are attached and the kernel maps hold no more; raise max_interfaces; retrying every poll",
                    self.max_interfaces
                );
            }
        }
        *known = waiting;
    }

    /// Attaches one tap; Some(name) when it ran out of file descriptors
    /// (to be retried), None otherwise.
    fn attach(&self, link: LinkInfo) -> Option<String> {
        // A departed VM's series under this name end now: the name's
        // series are the new tap's from its first scrape.
        lock(&self.departed).forget_name(&link.name);
        // Counter slot and tracepoint filter first, so the first frame the
        // tc programs see is counted.
        if let Err(err) = lock(&self.maps).monitor(link.ifindex) {
            lock(&self.maps).forget_interfaces(&[link.ifindex]);
            log::warn!(
                "{}: not attached, its counters have no place in the kernel maps: {err}; hvnet will not retry this interface until it is recreated",
                link.name
            );
            self.attach_failures.fetch_add(1, Ordering::Relaxed);
            lock(&self.failed).insert(link.ifindex, link.name);
            return None;
        }
        let result = lock(&self.probes).attach(link.ifindex, &link.name);
        if result.is_err() {
            lock(&self.maps).forget_interfaces(&[link.ifindex]);
        }
        match result {
            Ok(()) => {
                log::info!(
                    "attached to {} (ifindex {}, mac {}, {})",
                    link.name,
                    link.ifindex,
                    link.mac_string(),
                    self.mechanism
                );
                lock(&self.records)
                    .insert(link.ifindex, VmRecord::new(&link.name, self.stall_after));
                // Scrapes run while taps attach: a tap is attached or
                // waiting, never both at once.
                lock(&self.waiting).remove(&link.ifindex);
                lock(&self.attached).insert(link.ifindex, link);
                None
            }
            Err(err) if crate::fd_limit::is_fd_exhaustion(&format!("{err:#}")) => {
                log::warn!("{err}: out of file descriptors; retrying next poll");
                Some(link.name)
            }
            Err(err) => {
                log::warn!("{err}; hvnet will not retry this interface until it is recreated");
                self.attach_failures.fetch_add(1, Ordering::Relaxed);
                lock(&self.failed).insert(link.ifindex, link.name);
                None
            }
        }
    }

    fn forget(&self, ifindex: u32) {
        let name = lock(&self.probes).detach(ifindex);
        lock(&self.attached).remove(&ifindex);
        lock(&self.records).remove(&ifindex);
        if let Some(name) = name {
            log::info!("detached from {name} (ifindex {ifindex}): interface gone or renamed");
        }
    }

    /// Keeps vanishing taps' final counters for the series grace period,
    /// from one read of the maps however many go at once (an evacuated
    /// host loses hundreds of taps in one burst).
    fn keep_final_counters(&self, ifindexes: &[u32]) {
        if ifindexes.is_empty() || lock(&self.departed).grace().is_zero() {
            return;
        }
        let snapshot = lock(&self.maps).read();
        if !snapshot.readable("VM_COUNTERS") {
            log::warn!("final counters of removed taps not kept: VM_COUNTERS unreadable");
            return;
        }
        let now = self.now();
        let links: Vec<LinkInfo> = {
            let attached = lock(&self.attached);
            ifindexes
                .iter()
                .filter_map(|ifindex| attached.get(ifindex).cloned())
                .collect()
        };
        let views: Vec<VmView> = {
            let records = lock(&self.records);
            links
                .iter()
                .map(|link| self.view(link, &snapshot, records.get(&link.ifindex), now))
                .collect()
        };
        let mut departed = lock(&self.departed);
        for view in views {
            departed.keep(view, now);
        }
    }

    /// One poll: counters -> per-VM state machines -> health for export.
    pub(crate) fn evaluate(&self) {
        let snapshot = lock(&self.maps).read();
        for (map, reason) in &snapshot.unreadable {
            log::warn!("reading map {map}: {reason}");
        }
        // Judging stalls on a partial picture would read as counters
        // going back to zero: wait for the next poll instead.
        if !snapshot.readable("VM_COUNTERS") || !snapshot.readable("DROPS") {
            return;
        }
        let now = self.now();
        lock(&self.departed).prune(now);
        let attached = lock(&self.attached).clone();
        let mut published = Vec::new();
        let mut records = lock(&self.records);
        for (ifindex, link) in &attached {
            let Some(record) = records.get_mut(ifindex) else {
                continue;
            };
            let observation = self.observation(&snapshot, link, now);
            let (transition, entries) = record.poll(observation, now);
            if let Some(transition) = transition {
                let message = format!(
                    "VM on {}: {} -> {}: {}",
                    link.name,
                    transition.from.as_str(),
                    transition.to.as_str(),
                    transition.describe()
                );
                if transition.to == VmState::RxStalled {
                    log::warn!("{message}");
                } else {
                    log::info!("{message}");
                }
            }
            published.extend(entries);
        }
        drop(records);
        self.publish(&published);
    }

    fn observation(&self, snapshot: &KernelSnapshot, link: &LinkInfo, now: f64) -> Observation {
        let traffic = snapshot
            .traffic
            .get(&link.ifindex)
            .copied()
            .unwrap_or_default();
        let stats = link.stats.unwrap_or_default();
        let (dropped_to_vm, full_ring_drops) = if self.has_drop_probe {
            let by_reason = snapshot.drops.get(&link.ifindex);
            let mut to_vm = 0;
            let mut full_ring = 0;
            for (reason, count) in by_reason.into_iter().flatten() {
                let name = reason_name(&self.drop_reasons, *reason);
                if drop_direction(&name) == "to_vm" {
                    to_vm += count;
                }
                if name == "full_ring" {
                    full_ring += count;
                }
            }
            (to_vm, full_ring)
        } else {
            (stats.tx_dropped, stats.tx_dropped)
        };
        Observation {
            at: now,
            offered: traffic.packets(direction::TO_VM),
            from_vm: traffic.packets(direction::FROM_VM),
            // The tap's tx_packets is incremented in tun_put_user, i.e. only
            // for frames the VMM really read: the authoritative count. The
            // tracepoint is the witness where netdev stats are missing.
            dequeued: match (link.stats, self.has_dequeue_probe) {
                (Some(stats), _) => stats.tx_packets,
                (None, true) => snapshot.dequeued.get(&link.ifindex).copied().unwrap_or(0),
                (None, false) => 0,
            },
            netdev_dequeued: stats.tx_packets,
            dropped_to_vm,
            full_ring_drops,
            carrier: link.admin_up && link.carrier,
            queue_len: link.txqueuelen,
        }
    }

    pub(crate) fn detach_everything(&self) -> usize {
        lock(&self.attached).clear();
        lock(&self.probes).detach_all()
    }
}
