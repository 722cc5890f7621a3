//! Collector: frames and bytes per tap, direction and class, and who
//! each tap is (hvnet_vm_packets_total, hvnet_vm_bytes_total, hvnet_vm_info).

use super::text::{Family, MetricType};
use tracer_common::CounterValue;

use super::{
    class_label, direction_label, family, gauge, push_breakdown, Exposition, CLASSES, DIRECTIONS,
    DIRECTION_HELP,
};

/// Frames and bytes per tap, direction and class, and who each tap is.
pub(super) fn vm_traffic_families(view: &Exposition) -> Vec<Family> {
    let mut packets = family(
        "hvnet_vm_packets_total",
        &format!("Frames that crossed the VM's tap, by class; {DIRECTION_HELP}."),
        MetricType::COUNTER,
    );
    let mut bytes = family(
        "hvnet_vm_bytes_total",
        &format!("Bytes (Ethernet header included) that crossed the VM's tap; {DIRECTION_HELP}."),
        MetricType::COUNTER,
    );
    let mut info = family(
        "hvnet_vm_info",
        "Identity of the VM behind each monitored tap (join on iface): from libvirt's status XML, \
         else the QEMU process holding the tap, else the tap name. mac is the guest NIC's where a \
         source knows it, else the tap's own.",
        MetricType::GAUGE,
    );
    for vm in &view.vms {
        for dir in DIRECTIONS {
            for cls in CLASSES {
                let CounterValue {
                    packets: p,
                    bytes: b,
                } = vm.traffic.get(dir, cls);
                let labels = [
                    ("iface", vm.iface.as_str()),
                    ("direction", direction_label(dir)),
                    ("class", class_label(cls)),
                ];
                push_breakdown(&mut packets, view.full_detail, &labels, p as f64);
                push_breakdown(&mut bytes, view.full_detail, &labels, b as f64);
            }
        }
        let mut labels = vec![
            ("iface", vm.iface.as_str()),
            ("vm_uuid", vm.vm_uuid.as_str()),
            ("vm_name", vm.vm_name.as_str()),
            ("mac", vm.mac.as_str()),
        ];
        // Opt-in: a project label multiplies series per tenant.
        if view.project_label {
            labels.push(("project", vm.identity.project.as_str()));
        }
        info.push(gauge(&labels, 1.0));
    }
    vec![packets, bytes, info]
}
