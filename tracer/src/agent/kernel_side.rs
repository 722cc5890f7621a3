//! What the agent needs from the kernel side, as two small traits: the
//! loader's tc attachments and the kernel maps implement them, and the
//! orchestration tests drive the agent with fakes instead.

use std::collections::HashMap;

use crate::kernel::{
    collect::{KernelMaps, KernelSnapshot},
    loader::{TcProbes, TcRole},
    optional_probes::{ProbeStatus, DEQUEUE_PROBE, DROP_PROBE},
};

/// hvnet's tc programs on each tap.
pub trait TapAttachments: Send {
    /// Attaches both directions to one tap; the error says why not.
    fn attach(&mut self, ifindex: u32, name: &str) -> Result<(), String>;
    /// Attaches the hop programs to a bridge, bridge port or uplink.
    fn attach_hop(&mut self, ifindex: u32, name: &str) -> Result<(), String>;
    /// Detaches one tap; its name if it was attached.
    fn detach(&mut self, ifindex: u32) -> Option<String>;
    /// Detaches every tap; how many were attached.
    fn detach_all(&mut self) -> usize;
}

/// The kernel maps keyed per tap.
pub trait TapCounters: Send {
    /// Gives a tap a counter slot and adds it to the tracepoints' filter.
    fn monitor(&mut self, ifindex: u32) -> Result<(), String>;
    /// Releases the slots and clears the counters of these ifindexes.
    fn forget_interfaces(&mut self, ifindexes: &[u32]);
    /// Makes the drop tracepoint report DHCP frames dropped on a hop.
    fn follow_hop(&mut self, ifindex: u32) -> Result<(), String>;
    /// Stops following a hop.
    fn forget_hop(&mut self, ifindex: u32);
    /// One read of every map.
    fn read(&self) -> KernelSnapshot;
}

/// What the loaded object can do on this kernel, fixed at start-up.
#[derive(Debug, Clone, Default)]
pub struct ProbeInfo {
    pub statuses: Vec<ProbeStatus>,
    /// tcx or netlink.
    pub mechanism: &'static str,
    pub drop_reasons: HashMap<u32, String>,
    pub has_dequeue_probe: bool,
    pub has_drop_probe: bool,
}

impl ProbeInfo {
    pub fn of(probes: &TcProbes) -> Self {
        Self {
            statuses: probes.probe_statuses(),
            mechanism: probes.mechanism().as_str(),
            drop_reasons: probes.drop_reasons().clone(),
            has_dequeue_probe: probes.has_probe(DEQUEUE_PROBE),
            has_drop_probe: probes.has_probe(DROP_PROBE),
        }
    }
}

impl TapAttachments for TcProbes {
    fn attach(&mut self, ifindex: u32, name: &str) -> Result<(), String> {
        TcProbes::attach(self, ifindex, name, TcRole::Tap).map_err(|err| format!("{err:#}"))
    }

    fn attach_hop(&mut self, ifindex: u32, name: &str) -> Result<(), String> {
        TcProbes::attach(self, ifindex, name, TcRole::Hop).map_err(|err| format!("{err:#}"))
    }

    fn detach(&mut self, ifindex: u32) -> Option<String> {
        TcProbes::detach(self, ifindex)
    }

    fn detach_all(&mut self) -> usize {
        TcProbes::detach_all(self)
    }
}

impl TapCounters for KernelMaps {
    fn monitor(&mut self, ifindex: u32) -> Result<(), String> {
        KernelMaps::monitor(self, ifindex).map_err(|err| err.to_string())
    }

    fn forget_interfaces(&mut self, ifindexes: &[u32]) {
        KernelMaps::forget_interfaces(self, ifindexes)
    }

    fn read(&self) -> KernelSnapshot {
        KernelMaps::read(self)
    }

    fn follow_hop(&mut self, ifindex: u32) -> Result<(), String> {
        KernelMaps::follow_hop(self, ifindex).map_err(|err| err.to_string())
    }

    fn forget_hop(&mut self, ifindex: u32) {
        KernelMaps::forget_hop(self, ifindex)
    }
}
