//! Per-VM analysis: kernel DHCP/ARP events into each VM's record, and
//! every poll the counters into each VM's stall detector.

use std::collections::BTreeMap;

use tracer_common::{direction, event_kind, hop_hook, PacketEvent};

use super::{lock, AgentState};
use crate::{
    analysis::dhcp::{DhcpMessage, Seen},
    analysis::stall::{Observation, VmState},
    interfaces::links::LinkInfo,
    kernel::collect::KernelSnapshot,
    kernel::drops::{drop_direction, reason_name},
    kernel::events::{interpret, Observed},
};

/// A DHCP event from a hop, named and made the tracker's input: a
/// sighting (counted per hop and hook) or a drop there. None for what a
/// hop's events cannot say (a dequeue: hops have no VMM).
fn on_hop(
    mut message: DhcpMessage,
    hop: &str,
    ev: &PacketEvent,
    sightings: &mut Vec<(u32, bool)>,
) -> Option<DhcpMessage> {
    match &mut message.seen {
        Seen::OnHop { sighting } => {
            sighting.hop = hop.to_owned();
            sightings.push((ev.dev.ifindex, ev.direction == hop_hook::INGRESS));
        }
        Seen::Dropped { reason } if ev.kind == event_kind::DHCP_DROPPED => {
            message.seen = Seen::DroppedOnHop {
                reason: reason.clone(),
                hop: hop.to_owned(),
            };
        }
        _ => return None,
    }
    Some(message)
}

impl AgentState {
    /// Handles one batch of kernel DHCP/ARP events.
    pub(crate) fn handle_events(&self, batch: &[tracer_common::PacketEvent]) {
        let now = self.now();
        let mut published = Vec::new();
        // Hop names first (no lock nesting): a hop event names its hop.
        let hop_names: BTreeMap<u32, String> = {
            let hops = lock(&self.hops);
            batch
                .iter()
                .filter_map(|ev| {
                    let name = hops.name(ev.dev.ifindex)?;
                    Some((ev.dev.ifindex, name.to_owned()))
                })
                .collect()
        };
        let mut hop_sightings = Vec::new();
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
                    } else if let Some(hop) = hop_names.get(&ifindex) {
                        let Some(message) = on_hop(message, hop, ev, &mut hop_sightings) else {
                            continue;
                        };
                        // Which VM: the one whose DHCP client has this MAC.
                        let vm = records
                            .values_mut()
                            .find(|r| r.dhcp.client_mac() == Some(message.chaddr));
                        if let Some(record) = vm {
                            published.extend(record.dhcp_message(&message, mono, now));
                        }
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
        if !hop_sightings.is_empty() {
            let mut hops = lock(&self.hops);
            for (ifindex, ingress) in hop_sightings {
                hops.count(ifindex, ingress);
            }
        }
        self.publish(&published);
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
        // attached, then records (the documented order): read in place,
        // not cloned, every poll.
        let attached = lock(&self.attached);
        let mut published = Vec::new();
        let mut records = lock(&self.records);
        for (ifindex, link) in attached.iter() {
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
        drop(attached);
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
}
