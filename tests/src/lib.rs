//! The embedded lab: an emulated compute node in network namespaces.
//!
//! Layout (all names unique per lab so that labs never collide):
//!
//! ```text
//!  <prefix>-node netns                     <prefix>-vmN netns ("the guest")
//!  br0 10.250.0.1/24 + dnsmasq             eth0 (a tap the fake VMM owns)
//!   |- tapN  <-- fake-vmm relays frames -->  udhcpc, ping, traffic
//!   `- hvnet run (attached to tap*)
//! ```
//!
//! The fake VMM does what QEMU's tap backend does: it holds the host tap's
//! fd, reads frames meant for the VM and writes frames from the VM. Here the
//! "VM" is a second tap in the guest netns, so real clients (udhcpc,
//! dhclient, ping) run as the guest.

pub mod agent;
pub mod cost;
pub mod dashboards;
pub mod expect;
pub mod guest;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod network_node;
pub mod node;
pub mod nodevm;
pub mod pki;
pub mod promstack;
pub mod raw_frames;
pub mod scale;
pub mod tap;
pub mod testkit;
pub mod vhost;
pub mod vmm;

/// The subnet the lab uses; tests send traffic nowhere else.
pub const LAB_SUBNET: &str = "10.250.0.0/24";
pub const BRIDGE_ADDR: &str = "10.250.0.1";
/// A second address on the node's bridge: a peer the guests talk to that
/// is not their DHCP server (as a VM's traffic usually is).
pub const PEER_ADDR: &str = "10.250.0.2";

/// A name prefix unique to this process and call, short enough that
/// "<prefix>-vm12" stays a valid netns name and taps fit in 15 bytes.
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("hvl{}{}-{n}", tag, std::process::id() % 100_000)
}
