//! A network node behind a VXLAN tunnel, as in an overlay cloud where the
//! DHCP server (Neutron's dnsmasq) lives on another host: its own netns,
//! an underlay veth pair to the compute node (upl0 on both sides,
//! 10.250.99.0/30), a VXLAN device on each side (br0's port on the compute
//! node, brn's on the network node) and dnsmasq on brn (10.250.0.3).

use std::process::Child;

use crate::{
    netns::NetNs,
    node::{spawn_dnsmasq, ComputeNode},
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
    /// Builds the network node and the tunnel with `vni` to `compute`.
    pub fn behind_vxlan(compute: &ComputeNode, vni: u32) -> anyhow::Result<Self> {
        let ns = NetNs::create(&format!("{}-net", compute.prefix))?;
        let vni = vni.to_string();
        compute.ns.ip(&[
            "link",
            "add",
            "upl0",
            "type",
            "veth",
            "peer",
            "name",
            "upl0",
            "netns",
            ns.name(),
        ])?;
        for (side, local, remote, bridge) in [
            (&compute.ns, COMPUTE_UNDERLAY, NETWORK_UNDERLAY, "br0"),
            (&ns, NETWORK_UNDERLAY, COMPUTE_UNDERLAY, "brn"),
        ] {
            side.ip(&["addr", "add", &format!("{local}/30"), "dev", "upl0"])?;
            side.ip(&["link", "set", "upl0", "up"])?;
            if bridge == "brn" {
                side.ip(&[
                    "link",
                    "add",
                    "brn",
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                ])?;
                side.ip(&["addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "brn"])?;
                side.ip(&["link", "set", "brn", "up"])?;
            }
            side.ip(&[
                "link", "add", "vxlan0", "type", "vxlan", "id", &vni, "local", local, "remote",
                remote, "dstport", "4789", "dev", "upl0",
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
