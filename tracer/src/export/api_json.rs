//! `/api/v1/vms`: the exposition's VMs as the API's wire type.

use tracer_common::direction;

use super::{class_label, Exposition, VmView, CLASSES};
use crate::api;

/// `/api/v1/vms`: every VM's view as the API's wire type.
pub fn vms_json(view: &Exposition) -> Vec<api::Vm> {
    view.vms.iter().map(api_vm).collect()
}

fn api_vm(vm: &VmView) -> api::Vm {
    let traffic = |dir: u8| {
        let by_class = CLASSES
            .iter()
            .map(|&cls| {
                let v = vm.traffic.get(dir, cls);
                (
                    class_label(cls).to_owned(),
                    api::Counter {
                        packets: v.packets,
                        bytes: v.bytes,
                    },
                )
            })
            .collect();
        api::Traffic {
            packets: vm.traffic.packets(dir),
            bytes: CLASSES.iter().map(|&c| vm.traffic.get(dir, c).bytes).sum(),
            by_class,
        }
    };
    api::Vm {
        iface: vm.iface.clone(),
        ifindex: vm.ifindex,
        mac: vm.mac.clone(),
        tap_mac: vm.tap_mac.clone(),
        identity: vm.identity.clone(),
        oper_state: vm.oper_state.clone(),
        vm_uuid: vm.vm_uuid.clone(),
        vm_name: vm.vm_name.clone(),
        drops: vm
            .drops
            .iter()
            .map(|d| api::Drops {
                direction: d.direction.to_owned(),
                reason: d.reason.clone(),
                packets: d.packets,
            })
            .collect(),
        dequeued: vm.dequeued,
        netdev_tx_packets: vm.netdev_tx_packets,
        vhost_rx: vm.vhost_rx,
        events_throttled: vm.events_throttled,
        queue_len: vm.queue_len,
        health: vm.health.as_ref().map(|h| api::Health {
            state: h.state,
            backlog: h.backlog,
            stalls_total: h.stalls_total,
            stall_seconds: h.stall_seconds,
        }),
        dhcp: vm.dhcp.as_ref().map(|d| api::Dhcp {
            counters: d.counters.clone(),
            lease_remaining: d.lease_remaining,
            lease_address: d.lease_address.clone(),
            last_verdict: d.last_verdict,
        }),
        departed: vm.departed,
        to_vm: traffic(direction::TO_VM),
        from_vm: traffic(direction::FROM_VM),
    }
}
