//! The `/api/v1` wire types: what the agent serves, and what the CLI and
//! the lab tests read back (one definition, so the two cannot drift).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    analysis::dhcp::{DhcpCounters, Verdict},
    analysis::stall::VmState,
    identity::Identity,
};

/// The API's error body: `{"error": "...", "status": 404}` (plus the
/// candidates when a VM name is ambiguous).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub error: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
}

/// One monitored tap (and the VM behind it) in `/api/v1/vms`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub iface: String,
    pub ifindex: u32,
    /// The guest NIC's MAC where an identity source knows it, else the tap's.
    pub mac: String,
    /// The tap's own MAC (libvirt: the guest's with fe: in front).
    pub tap_mac: String,
    /// Who the VM is, and which source (libvirt, qemu, neutron_name,
    /// tap) said so.
    pub identity: Identity,
    pub oper_state: String,
    pub vm_uuid: String,
    pub vm_name: String,
    pub drops: Vec<Drops>,
    /// Frames the dequeue tracepoint saw the VMM read (None: probe unavailable).
    pub dequeued: Option<u64>,
    /// The tap's own tx_packets (frames the VMM read), as of the last poll.
    pub netdev_tx_packets: Option<u64>,
    /// tun_recvmsg calls, where the vhost probe attached.
    pub vhost_rx: Option<u64>,
    /// DHCP/ARP events not sent: the tap was over its event budget.
    pub events_throttled: u64,
    /// The tap's txqueuelen: the most frames that can wait toward the VM.
    pub queue_len: u32,
    /// None until the first poll evaluated this VM.
    pub health: Option<Health>,
    pub dhcp: Option<Dhcp>,
    /// The tap is gone; its final counters are shown for the grace period.
    pub departed: bool,
    /// Frames the host offered to the VM (tap transmit).
    pub to_vm: Traffic,
    /// Frames the VM sent (tap receive).
    pub from_vm: Traffic,
}

/// Frames dropped on a tap for one reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// to_vm or from_vm.
    pub direction: String,
    pub reason: String,
    pub packets: u64,
}

/// The stall detector's view of a VM at the last poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub state: VmState,
    pub backlog: u64,
    pub stalls_total: u64,
    pub stall_seconds: f64,
}

/// A VM's DHCP picture.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dhcp {
    pub counters: DhcpCounters,
    /// Seconds left on the lease the VM holds (from the last ACK it got).
    pub lease_remaining: Option<f64>,
    pub lease_address: Option<String>,
    pub last_verdict: Option<Verdict>,
}

/// Packets and bytes one way through a tap, in total and per class
/// (dhcp, arp, broadcast, other).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub by_class: BTreeMap<String, Counter>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// One line of a VM's timeline (`/api/v1/vms/{name}/timeline`, and the
/// `timeline` of `hvnet explain --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Unix time (seconds) of the first occurrence.
    pub at: f64,
    pub iface: String,
    /// stall, dhcp, arp, ...
    pub kind: String,
    pub text: String,
    pub repeats: u32,
    /// Unix time of the latest repeat (equals `at` when none).
    pub last_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::TimelineEntry;
    use crate::analysis::timeline::Entry;

    /// The agent serves its own timeline entries; the CLI reads them back
    /// as the wire type, field for field.
    #[test]
    fn served_timeline_entries_read_back_as_the_wire_type() {
        let served = Entry {
            at: 1_764_000_000.5,
            mono: 12.0,
            iface: "tap0".into(),
            kind: "dhcp",
            text: "ACK xid 0x1 undelivered".into(),
            repeats: 2,
            last_at: 1_764_000_009.5,
            detail: Some(serde_json::json!({"xid": 1})),
        };
        let json = serde_json::to_string(&[&served]).expect("serializable");
        let read: Vec<TimelineEntry> = serde_json::from_str(&json).expect("the wire type");
        assert_eq!(
            read,
            [TimelineEntry {
                at: served.at,
                iface: served.iface.clone(),
                kind: served.kind.to_owned(),
                text: served.text.clone(),
                repeats: 2,
                last_at: served.last_at,
                detail: served.detail.clone(),
            }]
        );
    }
}
