//! Collector: each VM's receive path: drops, backlog, stall state,
//! dequeues, vhost calls, throttled events.

use super::text::{Family, MetricType};

use super::{counter, family, gauge, push_breakdown, Exposition};
use crate::analysis::stall::VmState;

/// Each VM's receive path: drops, backlog, stall state, dequeues, vhost.
pub(super) fn vm_health_families(view: &Exposition) -> Vec<Family> {
    let mut dropped = family(
        "hvnet_vm_dropped_packets_total",
        "Frames the kernel dropped on the VM's tap, by kernel drop reason (from skb:kfree_skb; \
         netdev_tx_dropped when that probe is unavailable). direction is inferred from the reason: \
         to_vm = on the way to the VM (full_ring: the VMM is not draining).",
        MetricType::COUNTER,
    );
    let mut backlog = family(
        "hvnet_vm_rx_backlog_packets",
        "Frames offered to the VM and neither dequeued by the VMM nor dropped: the tap's queue \
         (to_vm). At the queue length the tap drops everything new.",
        MetricType::GAUGE,
    );
    let mut queue_len = family(
        "hvnet_vm_queue_length_packets",
        "The tap's queue length (txqueuelen): the most frames that can wait toward the VM.",
        MetricType::GAUGE,
    );
    let mut stalled = family(
        "hvnet_vm_rx_stalled",
        "1 while the VM's receive path is stalled: frames wait, the VMM dequeues none, the VM still sends.",
        MetricType::GAUGE,
    );
    let mut stalls = family(
        "hvnet_vm_rx_stalls_total",
        "RX stall episodes of the VM.",
        MetricType::COUNTER,
    );
    let mut stall_seconds = family(
        "hvnet_vm_rx_stall_seconds_total",
        "Seconds the VM's receive path spent stalled (from when dequeueing stopped).",
        MetricType::COUNTER,
    );
    let mut vm_state = family(
        "hvnet_vm_state",
        "1 for the VM's current state: ok, rx_stalled, paused (silent both ways), no_carrier (no \
         VMM holds the tap), idle.",
        MetricType::GAUGE,
    );
    let mut dequeued = family(
        "hvnet_vm_dequeued_packets_total",
        "Frames the VMM read from the tap (to_vm), by source: tracepoint (skb_copy_datagram_iovec) \
         or netdev (the tap's tx_packets).",
        MetricType::COUNTER,
    );
    let mut throttled = family(
        "hvnet_vm_events_throttled_total",
        "DHCP/ARP events from this tap that hvnet did not record: the tap was over its share of \
         the event ring (100 per second per CPU, bursts of 200), so a VM flooding DHCP or ARP \
         cannot blind hvnet to its neighbours. Its own DHCP verdicts may be incomplete meanwhile.",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        push_breakdown(
            &mut throttled,
            view.full_detail,
            &[("iface", vm.iface.as_str())],
            vm.events_throttled as f64,
        );
    }
    let mut vhost = family(
        "hvnet_vm_vhost_rx_calls_total",
        "tun_recvmsg calls for the VM's tap (vhost-net RX work), where the vhost probe attached.",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        let iface = vm.iface.as_str();
        for drop in &vm.drops {
            dropped.push(counter(
                &[
                    ("iface", iface),
                    ("direction", drop.direction),
                    ("reason", drop.reason.as_str()),
                ],
                drop.packets as f64,
            ));
        }
        if let Some(seen) = vm.dequeued {
            dequeued.push(counter(
                &[("iface", iface), ("source", "tracepoint")],
                seen as f64,
            ));
        }
        if let Some(read) = vm.netdev_tx_packets {
            dequeued.push(counter(
                &[("iface", iface), ("source", "netdev")],
                read as f64,
            ));
        }
        if let Some(calls) = vm.vhost_rx {
            vhost.push(counter(&[("iface", iface)], calls as f64));
        }
        if !vm.departed {
            queue_len.push(gauge(&[("iface", iface)], f64::from(vm.queue_len)));
        }
        let Some(health) = &vm.health else { continue };
        stalls.push(counter(&[("iface", iface)], health.stalls_total as f64));
        stall_seconds.push(counter(&[("iface", iface)], health.stall_seconds));
        if vm.departed {
            continue;
        }
        backlog.push(gauge(&[("iface", iface)], health.backlog as f64));
        let is_stalled = health.state == VmState::RxStalled;
        stalled.push(gauge(
            &[("iface", iface)],
            if is_stalled { 1.0 } else { 0.0 },
        ));
        for state in VmState::ALL {
            // One-hot in both details: "is it rx_stalled?" reads 0, never absent.
            let current = if state == health.state { 1.0 } else { 0.0 };
            vm_state.push(gauge(
                &[("iface", iface), ("state", state.as_str())],
                current,
            ));
        }
    }
    vec![
        dropped,
        backlog,
        queue_len,
        stalled,
        stalls,
        stall_seconds,
        vm_state,
        dequeued,
        vhost,
        throttled,
    ]
}
