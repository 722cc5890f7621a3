//! Collector: the hops hvnet follows DHCP through besides the taps
//! (bridges, their ports, uplinks). Bounded: one series per hop and hook,
//! never per frame, xid or VM.

use super::text::{Family, MetricType};

use super::{counter, family, gauge, Exposition};
use crate::interfaces::hops::HopRole;

/// One followed hop as a scrape shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HopView {
    pub name: String,
    pub role: &'static str,
    /// DHCP messages its tc programs saw, [egress, ingress].
    pub dhcp_messages: [u64; 2],
}

pub(super) fn hop_families(view: &Exposition) -> Vec<Family> {
    let mut hops = family(
        "hvnet_agent_hops",
        "Interfaces besides the taps that hvnet follows DHCP through, by role: bridge (a tap's \
         Linux bridge), bridge_port (its other ports, e.g. a hybrid plug's veth pair), uplink \
         (named by --uplinks).",
        MetricType::GAUGE,
    );
    for role in HopRole::ALL {
        let count = view.hops.iter().filter(|h| h.role == role.as_str()).count();
        hops.push(gauge(&[("role", role.as_str())], count as f64));
    }
    let mut messages = family(
        "hvnet_hop_dhcp_packets_total",
        "DHCP messages (plain, VLAN-tagged or in VXLAN/Geneve) that crossed a hop, by the hop's \
         own direction (ingress: received by it, egress: sent by it).",
        MetricType::COUNTER,
    );
    for hop in &view.hops {
        for (i, direction) in ["egress", "ingress"].into_iter().enumerate() {
            messages.push(counter(
                &[
                    ("hop", hop.name.as_str()),
                    ("role", hop.role),
                    ("direction", direction),
                ],
                hop.dhcp_messages[i] as f64,
            ));
        }
    }
    vec![hops, messages]
}
