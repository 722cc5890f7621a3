//! Collector: each VM's DHCP exchanges, retries, verdicts and lease.

use super::text::{Family, MetricType};

use super::{counter, family, gauge, push_breakdown, Exposition};
use crate::analysis::dhcp::{ClientState, MessageType, Verdict};

/// Each VM's DHCP exchanges, retries, verdicts and lease.
pub(super) fn dhcp_families(view: &Exposition) -> Vec<Family> {
    let mut dhcp_packets = family(
        "hvnet_dhcp_packets_total",
        "DHCP messages that crossed the VM's tap, by message type; direction from the VM's point of view.",
        MetricType::COUNTER,
    );
    let mut retries = family(
        "hvnet_dhcp_retries_total",
        "Client messages the VM sent again without having received an answer, by the client state they reveal.",
        MetricType::COUNTER,
    );
    let mut retries_stall = family(
        "hvnet_dhcp_retries_during_stall_total",
        "DHCP retries the VM sent while its receive path was stalled: answers cannot reach it.",
        MetricType::COUNTER,
    );
    let mut undelivered = family(
        "hvnet_dhcp_replies_undelivered_total",
        "DHCP replies to the VM that the VMM did not dequeue in time or that were dropped on the tap.",
        MetricType::COUNTER,
    );
    let mut unprocessed = family(
        "hvnet_dhcp_replies_unprocessed_total",
        "DHCP ACKs the VMM dequeued after which the VM asked again within seconds (same xid): they \
         reached the guest's RX ring but the guest never processed them (an RX path stuck inside \
         the VM, before the tap queue backs up).",
        MetricType::COUNTER,
    );
    let mut lost_on_node = family(
        "hvnet_dhcp_replies_lost_on_node_total",
        "DHCP replies for the VM seen on this node's bridges or uplinks that never reached its tap: \
         lost on the node (a bridge or netfilter rule, a VLAN or port mistake), not at the server. \
         `hvnet explain` names the hops and the drop reason.",
        MetricType::COUNTER,
    );
    let mut lease = family(
        "hvnet_dhcp_lease_remaining_seconds",
        "Seconds left on the lease the VM holds, from the last ACK that actually reached it (0: expired).",
        MetricType::GAUGE,
    );
    let mut transactions = family(
        "hvnet_dhcp_transactions_total",
        "Finished DHCP exchanges by verdict: delivered, reply_undelivered (stall), reply_dropped, \
         reply_lost_on_node (seen on a bridge or uplink, never on the tap), no_reply (seen on no \
         hop: server side), nak.",
        MetricType::COUNTER,
    );
    let mut malformed = family(
        "hvnet_dhcp_malformed_total",
        "Malformed DHCP frames on the VM's tap (bad cookie, truncation, option overflow...).",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        let iface = vm.iface.as_str();
        let Some(dhcp) = &vm.dhcp else { continue };
        let c = &dhcp.counters;
        for (d, dir) in ["to_vm", "from_vm"].into_iter().enumerate() {
            for (i, t) in MessageType::ALL.iter().enumerate() {
                push_breakdown(
                    &mut dhcp_packets,
                    view.full_detail,
                    &[("iface", iface), ("direction", dir), ("type", t.as_str())],
                    c.packets[d][i] as f64,
                );
            }
        }
        for (i, s) in ClientState::ALL.iter().enumerate() {
            push_breakdown(
                &mut retries,
                view.full_detail,
                &[("iface", iface), ("state", s.as_str())],
                c.retries[i] as f64,
            );
        }
        retries_stall.push(counter(&[("iface", iface)], c.retries_during_stall as f64));
        undelivered.push(counter(&[("iface", iface)], c.replies_undelivered as f64));
        unprocessed.push(counter(&[("iface", iface)], c.replies_unprocessed as f64));
        lost_on_node.push(counter(&[("iface", iface)], c.replies_lost_on_node as f64));
        if let Some(remaining) = dhcp.lease_remaining.filter(|_| !vm.departed) {
            lease.push(gauge(&[("iface", iface)], remaining));
        }
        for (i, v) in Verdict::ALL.iter().enumerate() {
            push_breakdown(
                &mut transactions,
                view.full_detail,
                &[("iface", iface), ("verdict", v.as_str())],
                c.transactions[i] as f64,
            );
        }
        push_breakdown(
            &mut malformed,
            view.full_detail,
            &[("iface", iface)],
            c.malformed as f64,
        );
    }
    vec![
        dhcp_packets,
        retries,
        retries_stall,
        undelivered,
        unprocessed,
        lost_on_node,
        lease,
        transactions,
        malformed,
    ]
}
