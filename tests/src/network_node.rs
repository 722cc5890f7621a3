//! A network node where the DHCP server (Neutron's dnsmasq) lives on
//! another host than the VMs: its own netns, a veth pair to the compute
//! node (upl0 on both sides, 10.250.99.0/30), and on each side a VXLAN
//! device over it (the overlay case), a port of the bridge (br0 on the
//! compute node, brn on the network node). dnsmasq answers on brn
//! (10.250.0.3).

use std::process::Child;

use crate::{
    netns::NetNs,
    node::{add_quiet_bridge, spawn_dnsmasq, ComputeNode},
};

const COMPUTE_UNDERLAY: &str = "10.250.99.1";
const NETWORK_UNDERLAY: &str = "10.250.99.2";
/// The network node's address on the tenant network (the compute node's
/// bridge holds .1 and .2).
const SERVER_ADDR: &str = "10.250.0.3";

pub struct NetworkNode {
    dnsmasq: Child,
    // Dropped last: deleting the namespace removes its ends of the links.
    _ns: NetNs,
}

impl NetworkNode {
    /// Builds the network node, joined to `compute` by a VXLAN tunnel
    /// with `vni` over the upl0 veth pair.
    pub fn behind_vxlan(compute: &ComputeNode, vni: u32) -> anyhow::Result<Self> {
        let ns = NetNs::create(&format!("{}-net", compute.prefix))?;
        compute.ns.link_to("upl0", &ns)?;
        for (side, local, remote, bridge) in [
            (&compute.ns, COMPUTE_UNDERLAY, NETWORK_UNDERLAY, "br0"),
            (&ns, NETWORK_UNDERLAY, COMPUTE_UNDERLAY, "brn"),
        ] {
            side.ip(&["addr", "add", &format!("{local}/30"), "dev", "upl0"])?;
            if bridge == "brn" {
                add_quiet_bridge(side, "brn")?;
                side.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "brn"])?;
                side.ip(&["link", "set", "brn", "up"])?;
            }
            side.ip(&[
                "link",
                "add",
                "vxlan0",
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "local",
                local,
                "remote",
                remote,
                "dstport",
                "4789",
                "dev",
                "upl0",
            ])?;
            side.ip(&["link", "set", "vxlan0", "master", bridge, "up"])?;
        }
        let dnsmasq = spawn_dnsmasq(&ns, "brn", &compute.dir, "2m")?;
        Ok(Self { dnsmasq, _ns: ns })
    }
}

impl Drop for NetworkNode {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
    }
}
