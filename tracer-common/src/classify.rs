//! The frame classification rules, as plain Rust over a byte slice.
//!
//! The eBPF program implements the same rules over packet pointers (it cannot
//! call this code: the verifier needs explicit bounds checks). This version is
//! the reference: the lab's fake VMM uses it to count what it relays, and the
//! privileged tests run both over the same golden frames.

use crate::class;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const BOOTPS: u16 = 67;
const BOOTPC: u16 = 68;

/// Classifies an Ethernet frame: DHCP (IPv4 UDP between ports 67/68, first
/// fragment, optionally behind one 802.1Q/802.1ad tag), ARP, other
/// broadcast (destination ff:ff:ff:ff:ff:ff), or other. Short or malformed
/// frames are `other`: they still cross the tap and must be counted.
pub fn classify_frame(frame: &[u8]) -> u8 {
    if frame.len() < ETH_HLEN {
        return class::OTHER;
    }
    let mut ethertype = be16(frame, 12);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if frame.len() < ETH_HLEN + 4 {
            return broadcast_or_other(frame);
        }
        ethertype = be16(frame, 16);
        l3 += 4;
    }
    if ethertype == ETH_P_ARP {
        return class::ARP;
    }
    if ethertype == ETH_P_IP && is_dhcp_ipv4(frame, l3) {
        return class::DHCP;
    }
    broadcast_or_other(frame)
}

fn is_dhcp_ipv4(frame: &[u8], l3: usize) -> bool {
    if frame.len() < l3 + 20 {
        return false;
    }
    let version_ihl = frame[l3];
    if version_ihl >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 || frame[l3 + 9] != IPPROTO_UDP {
        return false;
    }
    // Only the first fragment carries the UDP header.
    if be16(frame, l3 + 6) & 0x1fff != 0 {
        return false;
    }
    let l4 = l3 + ihl;
    if frame.len() < l4 + 4 {
        return false;
    }
    is_dhcp_port_pair(be16(frame, l4), be16(frame, l4 + 2))
}

/// Client->server, server->client, and relay->server (67->67).
pub fn is_dhcp_port_pair(src: u16, dst: u16) -> bool {
    (src == BOOTPC || src == BOOTPS) && (dst == BOOTPS || dst == BOOTPC)
}

fn broadcast_or_other(frame: &[u8]) -> u8 {
    if frame[..6].iter().all(|b| *b == 0xff) {
        class::BROADCAST
    } else {
        class::OTHER
    }
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}
