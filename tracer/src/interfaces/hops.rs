//! Which hops a DHCP reply crosses on this node before it reaches a tap:
//! the Linux bridges the taps are ports of, those bridges' other ports
//! (veth pairs, as in Neutron's hybrid plug tap -> qbr -> qvb/qvo ->
//! br-int), the bridge behind a veth's peer, and the uplinks the operator
//! names with globs. Pure: computed from one link listing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::interfaces::{ifmatch::InterfaceMatcher, links::LinkInfo};

/// Bridges followed away from a tap: the tap's own, and one behind a
/// veth pair (qbr -> br-int). Beyond that a bridge leads to other
/// tenants' plumbing, not this VM's path.
const MAX_BRIDGE_DEPTH: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HopRole {
    /// A Linux bridge device a tap (or a bridge on its path) is a port of.
    Bridge,
    /// A port of such a bridge that is not a VM's tap (veth, vxlan, NIC).
    BridgePort,
    /// An interface named by the uplink globs.
    Uplink,
}

impl HopRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::BridgePort => "bridge_port",
            Self::Uplink => "uplink",
        }
    }

    pub const ALL: [HopRole; 3] = [Self::Bridge, Self::BridgePort, Self::Uplink];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub name: String,
    pub role: HopRole,
}

/// What hvnet follows besides the taps, and the taps whose path it cannot
/// see (their master is not a Linux bridge, e.g. an Open vSwitch port).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HopPlan {
    pub hops: BTreeMap<u32, Hop>,
    /// tap name -> "its master <name> is <kind>".
    pub unseen: BTreeMap<String, String>,
}

/// The hops of `taps` among `present` links.
pub fn plan_hops(
    present: &[LinkInfo],
    taps: &BTreeSet<u32>,
    follow_bridges: bool,
    uplinks: Option<&InterfaceMatcher>,
    limit: usize,
) -> HopPlan {
    let by_index: BTreeMap<u32, &LinkInfo> = present.iter().map(|l| (l.ifindex, l)).collect();
    let mut plan = HopPlan::default();
    let add = |plan: &mut HopPlan, link: &LinkInfo, role: HopRole| {
        if plan.hops.len() < limit && !taps.contains(&link.ifindex) {
            plan.hops.entry(link.ifindex).or_insert_with(|| Hop {
                name: link.name.clone(),
                role,
            });
        }
    };
    if let Some(uplinks) = uplinks {
        for link in present.iter().filter(|l| uplinks.matches(&l.name)) {
            add(&mut plan, link, HopRole::Uplink);
        }
    }
    if !follow_bridges {
        return plan;
    }
    let mut ports: BTreeMap<u32, Vec<&LinkInfo>> = BTreeMap::new();
    for link in present {
        if let Some(master) = link.master {
            ports.entry(master).or_default().push(link);
        }
    }
    let mut queue = VecDeque::new();
    for &tap in taps {
        let Some((tap_name, master)) = by_index
            .get(&tap)
            .and_then(|t| Some((t.name.clone(), t.master?)))
        else {
            continue;
        };
        match by_index.get(&master) {
            Some(bridge) if bridge.kind == "bridge" => queue.push_back((master, 1)),
            Some(other) => {
                let kind = if other.kind.is_empty() {
                    "no Linux bridge"
                } else {
                    other.kind.as_str()
                };
                plan.unseen
                    .insert(tap_name, format!("its master {} is {kind}", other.name));
            }
            None => {}
        }
    }
    let mut seen = BTreeSet::new();
    while let Some((bridge, depth)) = queue.pop_front() {
        if !seen.insert(bridge) {
            continue;
        }
        let Some(link) = by_index.get(&bridge) else {
            continue;
        };
        add(&mut plan, link, HopRole::Bridge);
        for port in ports.get(&bridge).into_iter().flatten() {
            // Taps are VMs (watched or not), never a hop.
            if port.kind == "tun" || taps.contains(&port.ifindex) {
                continue;
            }
            add(&mut plan, port, HopRole::BridgePort);
            if depth >= MAX_BRIDGE_DEPTH {
                continue;
            }
            let Some(peer) = port.link.and_then(|p| by_index.get(&p)) else {
                continue;
            };
            if port.kind != "veth" {
                continue;
            }
            add(&mut plan, peer, HopRole::BridgePort);
            if let Some(next) = peer
                .master
                .filter(|m| by_index.get(m).is_some_and(|b| b.kind == "bridge"))
            {
                queue.push_back((next, depth + 1));
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(
        ifindex: u32,
        name: &str,
        kind: &str,
        master: Option<u32>,
        peer: Option<u32>,
    ) -> LinkInfo {
        LinkInfo {
            ifindex,
            name: name.into(),
            kind: kind.into(),
            master,
            link: peer,
            ..Default::default()
        }
    }

    fn names(plan: &HopPlan) -> Vec<(&str, &str)> {
        plan.hops
            .values()
            .map(|h| (h.name.as_str(), h.role.as_str()))
            .collect()
    }

    #[test]
    fn a_hybrid_plug_is_followed_from_the_tap_to_br_int_and_the_uplink() {
        let present = vec![
            link(1, "lo", "", None, None),
            link(2, "eth0", "", None, None),
            link(3, "br-int", "bridge", None, None),
            link(4, "qbr1", "bridge", None, None),
            link(5, "tap1", "tun", Some(4), None),
            link(6, "qvb1", "veth", Some(4), Some(7)),
            link(7, "qvo1", "veth", Some(3), Some(6)),
            link(8, "tap9", "tun", Some(3), None),
            link(9, "vxlan0", "vxlan", Some(3), None),
        ];
        let taps = BTreeSet::from([5]);
        let uplinks = InterfaceMatcher::new(&["eth*"]).expect("globs");
        let plan = plan_hops(&present, &taps, true, Some(&uplinks), 100);
        assert_eq!(
            names(&plan),
            vec![
                ("eth0", "uplink"),
                ("br-int", "bridge"),
                ("qbr1", "bridge"),
                ("qvb1", "bridge_port"),
                ("qvo1", "bridge_port"),
                ("vxlan0", "bridge_port"),
            ],
            "another VM's tap (tap9) is no hop"
        );
        assert!(plan.unseen.is_empty());
    }

    #[test]
    fn without_bridges_only_uplinks_and_an_ovs_master_is_said_unseen() {
        let present = vec![
            link(2, "bond0", "bond", None, None),
            link(3, "ovs-system", "openvswitch", None, None),
            link(5, "tap1", "tun", Some(3), None),
        ];
        let taps = BTreeSet::from([5]);
        let uplinks = InterfaceMatcher::new(&["bond*"]).expect("globs");
        assert_eq!(
            names(&plan_hops(&present, &taps, false, Some(&uplinks), 100)),
            vec![("bond0", "uplink")]
        );
        let plan = plan_hops(&present, &taps, true, None, 100);
        assert!(plan.hops.is_empty());
        assert_eq!(plan.unseen["tap1"], "its master ovs-system is openvswitch");
    }

    #[test]
    fn the_limit_bounds_the_hops() {
        let mut present = vec![link(1, "br0", "bridge", None, None)];
        for i in 0..10 {
            present.push(link(10 + i, &format!("veth{i}"), "veth", Some(1), None));
        }
        present.push(link(99, "tap0", "tun", Some(1), None));
        let plan = plan_hops(&present, &BTreeSet::from([99]), true, None, 4);
        assert_eq!(plan.hops.len(), 4);
    }
}
