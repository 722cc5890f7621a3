//! DHCP and ARP parsing, written once over [`FrameBytes`] and run by both
//! sides: the eBPF programs locate a DHCP message and read its fixed BOOTP
//! header with this code (then copy the options for userspace to walk with
//! [`crate::dhcp_options::walk`]); userspace parses captured or built
//! frames with [`parse_dhcp_frame`], which is the same code plus that walk
//! over the same window. Bounded and loop-free: every read is checked,
//! failures become parse flags, never faults.

use crate::{
    classify::{ether_payload, is_dhcp_udp, udp_offset, ETH_P_ARP, ETH_P_IP},
    dhcp_options::{self, OPTIONS_CAPTURE},
    event_kind,
    frame::FrameBytes,
    parse_flag, PacketEvent,
};

/// The fixed BOOTP header, up to the magic cookie.
pub const BOOTP_FIXED: usize = 236;
/// UDP header length.
const UDP_HLEN: usize = 8;

/// Where a DHCP message sits in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DhcpLocation {
    pub l3: usize,
    pub l4: usize,
    /// 802.1Q/802.1ad VLAN id, 0 if untagged.
    pub vlan: u16,
}

impl DhcpLocation {
    /// Where the magic cookie (and the options) start.
    #[inline(always)]
    pub fn cookie_offset(&self) -> usize {
        self.l4 + UDP_HLEN + BOOTP_FIXED
    }
}

/// Finds a DHCP message (IPv4, first fragment, UDP between 67/68, one
/// optional VLAN tag), or None.
#[inline(always)]
pub fn locate_dhcp<F: FrameBytes + ?Sized>(frame: &F) -> Option<DhcpLocation> {
    let payload = ether_payload(frame)?;
    if payload.ethertype != ETH_P_IP {
        return None;
    }
    let l4 = udp_offset(frame, payload.offset)?;
    if !is_dhcp_udp(frame, l4) {
        return None;
    }
    Some(DhcpLocation {
        l3: payload.offset,
        l4,
        vlan: payload.vlan,
    })
}

/// Finds a DHCP message in a frame that starts at its IPv4 header: where
/// the kernel has pulled the Ethernet header already (a frame dropped on
/// a bridge's forward or local-out path).
#[inline(always)]
pub fn locate_dhcp_in_ip<F: FrameBytes + ?Sized>(frame: &F) -> Option<DhcpLocation> {
    let l4 = udp_offset(frame, 0)?;
    if !is_dhcp_udp(frame, l4) {
        return None;
    }
    Some(DhcpLocation { l3: 0, l4, vlan: 0 })
}

/// A DHCP event from the fixed BOOTP header of the message at `at`. Always
/// an event: what could not be read is in `parse_flags`. The options
/// fields stay empty (see [`parse_dhcp_frame`]).
#[inline(always)]
pub fn parse_dhcp_header<F: FrameBytes + ?Sized>(frame: &F, at: DhcpLocation) -> PacketEvent {
    let mut ev = PacketEvent {
        kind: event_kind::DHCP,
        vlan: at.vlan,
        ..Default::default()
    };
    // l3 == 0: the frame starts at its IP header (no MAC to read).
    if at.l3 != 0 {
        if let Some(mac) = frame.bytes::<6>(0) {
            ev.dst_mac = mac;
        }
    }
    if let Some(addrs) = frame.bytes::<8>(at.l3 + 12) {
        ev.src_ip = [addrs[0], addrs[1], addrs[2], addrs[3]];
        ev.dst_ip = [addrs[4], addrs[5], addrs[6], addrs[7]];
    }
    let Some(fixed) = frame.bytes::<44>(at.l4 + UDP_HLEN) else {
        ev.parse_flags |= parse_flag::TRUNCATED;
        return ev;
    };
    ev.op = fixed[0];
    ev.xid = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    ev.secs = u16::from_be_bytes([fixed[8], fixed[9]]);
    ev.flags = u16::from_be_bytes([fixed[10], fixed[11]]);
    ev.ciaddr = [fixed[12], fixed[13], fixed[14], fixed[15]];
    ev.yiaddr = [fixed[16], fixed[17], fixed[18], fixed[19]];
    ev.chaddr = [
        fixed[28], fixed[29], fixed[30], fixed[31], fixed[32], fixed[33],
    ];
    ev
}

/// Where an ARP packet starts, if the frame is ARP (untagged or behind one
/// VLAN tag).
#[inline(always)]
pub fn arp_offset<F: FrameBytes + ?Sized>(frame: &F) -> Option<usize> {
    let payload = ether_payload(frame)?;
    (payload.ethertype == ETH_P_ARP).then_some(payload.offset)
}

/// An ARP packet's opcode and addresses (Ethernet/IPv4 ARP only).
#[inline(always)]
pub fn parse_arp<F: FrameBytes + ?Sized>(frame: &F, l3: usize) -> Option<PacketEvent> {
    let arp = frame.bytes::<28>(l3)?;
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    if arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mut ev = PacketEvent {
        kind: event_kind::ARP,
        msg_type: arp[7],
        ..Default::default()
    };
    ev.chaddr = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
    ev.src_ip = [arp[14], arp[15], arp[16], arp[17]];
    ev.dst_ip = [arp[24], arp[25], arp[26], arp[27]];
    if let Some(mac) = frame.bytes::<6>(0) {
        ev.dst_mac = mac;
    }
    Some(ev)
}

/// The whole DHCP event for a frame in memory, as the kernel reports it: None
/// if the frame is not DHCP, otherwise the header read by
/// [`parse_dhcp_header`] and the options walked over the window the tc
/// programs copy (at most [`OPTIONS_CAPTURE`] bytes from the cookie on).
pub fn parse_dhcp_frame(frame: &[u8]) -> Option<PacketEvent> {
    let at = locate_dhcp(frame)?;
    let mut ev = parse_dhcp_header(frame, at);
    if ev.parse_flags & parse_flag::TRUNCATED != 0 {
        // No fixed header, so no options either (the kernel sends none).
        return Some(ev);
    }
    let cookie = at.cookie_offset();
    let end = frame.len().min(cookie + OPTIONS_CAPTURE);
    let window = frame.get(cookie..end).unwrap_or_default();
    dhcp_options::walk(window, frame.len() > end).apply(&mut ev);
    Some(ev)
}
