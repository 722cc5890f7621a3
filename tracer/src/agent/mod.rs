//! The agent's state: which taps are attached, what the kernel maps say,
//! each VM's stall and DHCP analysis, who the VMs are; and the consistent
//! views of it that /metrics and /api/v1 serve. `daemon` drives it.
//!
//! One concern per file: `attachments` (reconcile taps with the kernel:
//! attach, detach, wait for capacity or descriptors), `analysis` (kernel
//! events and polls into each VM's record), `identities` (who is behind a
//! tap), `hops` (bridges, bridge ports and uplinks DHCP is followed
//! through), `views` (what scrapes, the API and `explain` see).
//!
//! Lock order: every lock is taken for a short section and released before
//! the next one is taken, except these nestings, always in this order:
//! `attached` then `records` (a poll evaluates every tap), `records` then
//! `identities` (a view or `explain` names the VM), and `identities` then
//! `identity_refreshed`. `hops` is never held with another lock. `maps`
//! and `probes` are never
//! held while another lock is taken (a guard is never kept in an `if let`
//! scrutinee whose block locks again). No lock is held across an await: the
//! poll loop runs these methods inside block_in_place and the HTTP handlers
//! inside spawn_blocking.

mod analysis;
mod attachments;
mod departed;
mod hops;
mod identities;
mod kernel_side;
#[cfg(test)]
mod tests;
mod views;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{atomic::AtomicU64, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::broadcast;

use self::departed::DepartedSeries;
pub use self::kernel_side::{ProbeInfo, TapAttachments, TapCounters};
use crate::{
    analysis::timeline::Entry,
    analysis::vm::VmRecord,
    config::Config,
    identity::{Identity, IdentityResolver},
    interfaces::links::LinkInfo,
    kernel::collect::KernelMaps,
    kernel::loader::{monotonic_now, TcProbes},
    kernel::optional_probes::ProbeStatus,
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
    probes: Mutex<Box<dyn TapAttachments>>,
    maps: Mutex<Box<dyn TapCounters>>,
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
    /// When the attached taps last changed (identity refresh cadence).
    taps_changed_at: Mutex<f64>,
    project_label: bool,
    metrics_detail: crate::config::MetricsDetail,
    departed: Mutex<DepartedSeries>,
    hops: Mutex<hops::HopState>,
    /// The links' names and topology as of the last plan (see
    /// `reconcile`): while they and the waiting list stay the same, a poll
    /// has nothing to plan.
    planned_topology: Mutex<Option<crate::interfaces::links::Topology>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AgentState {
    pub(crate) fn new(probes: TcProbes, maps: KernelMaps, config: &Config) -> Self {
        let info = ProbeInfo::of(&probes);
        Self::with_kernel_side(Box::new(probes), Box::new(maps), info, config)
    }

    /// The agent over any kernel side (the orchestration tests use fakes).
    pub fn with_kernel_side(
        probes: Box<dyn TapAttachments>,
        maps: Box<dyn TapCounters>,
        info: ProbeInfo,
        config: &Config,
    ) -> Self {
        let stall_after = config.stall_after;
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
            probe_statuses: info.statuses,
            drop_reasons: info.drop_reasons,
            has_dequeue_probe: info.has_dequeue_probe,
            has_drop_probe: info.has_drop_probe,
            mechanism: info.mechanism,
            stall_after,
            resolver: IdentityResolver::new(&config.libvirt_run_dir, &config.proc_root),
            identities: Mutex::new(HashMap::new()),
            identity_refreshed: Mutex::new(f64::NEG_INFINITY),
            taps_changed_at: Mutex::new(f64::NEG_INFINITY),
            project_label: config.project_label,
            metrics_detail: config.metrics_detail,
            departed: Mutex::new(DepartedSeries::new(config.series_grace)),
            hops: Mutex::new(hops::HopState::default()),
            planned_topology: Mutex::new(None),
        }
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

    pub fn interface_count(&self) -> usize {
        lock(&self.attached).len()
    }

    fn now(&self) -> f64 {
        monotonic_now()
    }
}
