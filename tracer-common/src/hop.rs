//! DHCP on the node's other hops (the bridges a tap is enslaved to, their
//! ports, the uplinks): a DHCP message in the frame itself (behind up to
//! two VLAN tags), or inside a VXLAN or Geneve tunnel (the overlay case:
//! the DHCP server lives on a network node). Written over [`FrameBytes`]
//! like the rest, run by the hop tc programs and by userspace tests.
//!
//! Ordered for an uplink's common frame (TCP, or UDP that is neither DHCP
//! nor a tunnel): the fewest reads before it is rejected.

use crate::{
    classify::{
        common_frame, ether_payload, udp_offset, udp_ports, COMMON_HEAD, ETH_HLEN, ETH_P_IP,
    },
    frame::FrameBytes,
    parse::{locate_dhcp, DhcpLocation},
};

/// Tunnel kinds in [`crate::PacketEvent::tunnel`] (bits 24..32; the VNI
/// is in bits 0..24).
pub mod tunnel_kind {
    pub const NONE: u32 = 0;
    pub const VXLAN: u32 = 1;
    pub const GENEVE: u32 = 2;
}

/// IANA's VXLAN port, and the Linux default when none is given.
const VXLAN_PORTS: [u16; 2] = [4789, 8472];
const GENEVE_PORT: u16 = 6081;
const UDP_HLEN: usize = 8;
/// VXLAN and Geneve headers without options are 8 bytes.
const TUNNEL_HLEN: usize = 8;
/// Geneve's protocol type for an Ethernet payload.
const ETH_P_TEB: u16 = 0x6558;
/// Most bytes of headers in front of an inner frame that are followed
/// (outer Ethernet + VLANs + IPv4 options + UDP + Geneve options): a
/// bound the verifier can see on every offset derived from it.
const MAX_INNER_OFFSET: usize = 512;

/// A DHCP message found on a hop: where its Ethernet frame starts
/// (`inner`, 0 when not tunnelled), where the message sits inside that
/// frame, and the tunnel it came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopDhcp {
    pub inner: usize,
    pub at: DhcpLocation,
    /// `(kind << 24) | VNI`, 0 when not tunnelled (see [`tunnel_kind`]).
    pub tunnel: u32,
}

impl HopDhcp {
    /// Where the options start, from the start of the outer frame.
    #[inline(always)]
    pub fn cookie_offset(&self) -> usize {
        self.inner + self.at.cookie_offset()
    }
}

/// The frame a tunnel carries, read at offsets from its own start.
pub struct Inner<'a, F: ?Sized> {
    pub outer: &'a F,
    pub offset: usize,
}

impl<F: FrameBytes + ?Sized> FrameBytes for Inner<'_, F> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.outer.bytes::<N>(self.offset + offset)
    }
}

/// Finds a DHCP message on a hop, plain or tunnelled; None for anything
/// else (what an uplink carries almost always).
#[inline(always)]
pub fn locate_hop_dhcp<F: FrameBytes + ?Sized>(frame: &F) -> Option<HopDhcp> {
    if frame
        .linear_bytes::<COMMON_HEAD>(0)
        .is_some_and(|head| holds_nothing_to_follow(&head))
    {
        return None;
    }
    locate_hop_dhcp_any(frame)
}

/// [`locate_hop_dhcp`] for any frame, read field by field.
#[inline(always)]
fn locate_hop_dhcp_any<F: FrameBytes + ?Sized>(frame: &F) -> Option<HopDhcp> {
    let payload = ether_payload(frame)?;
    if payload.ethertype != ETH_P_IP {
        return None;
    }
    let l4 = udp_offset(frame, payload.offset)?;
    let (src, dst) = udp_ports(frame, l4)?;
    if crate::classify::is_dhcp_port_pair(src, dst) {
        return Some(HopDhcp {
            inner: 0,
            at: locate_dhcp(frame)?,
            tunnel: 0,
        });
    }
    let (inner, tunnel) = tunnel_payload(frame, l4 + UDP_HLEN, dst)?;
    let at = locate_dhcp(&Inner {
        outer: frame,
        offset: inner,
    })?;
    Some(HopDhcp { inner, at, tunnel })
}

/// Whether a frame starting with `head` is one the locator rejects (an
/// untagged IPv4 frame with a 20-byte header that is not UDP, or UDP
/// neither between the DHCP ports nor to a tunnel port), decided from one
/// read of its first bytes: an uplink's common frame. The locator's own
/// rules, run on the head; false means "look further".
#[inline(always)]
fn holds_nothing_to_follow(head: &[u8; COMMON_HEAD]) -> bool {
    let Some(frame) = common_frame(head) else {
        return false;
    };
    let Some(l4) = udp_offset(frame, ETH_HLEN) else {
        return true;
    };
    let Some((src, dst)) = udp_ports(frame, l4) else {
        return false;
    };
    !crate::classify::is_dhcp_port_pair(src, dst) && !is_vxlan_port(dst) && dst != GENEVE_PORT
}

#[inline(always)]
fn is_vxlan_port(port: u16) -> bool {
    port == VXLAN_PORTS[0] || port == VXLAN_PORTS[1]
}

/// Where the Ethernet frame inside a VXLAN or Geneve header at `header`
/// starts, and the tunnel's kind and VNI.
#[inline(always)]
fn tunnel_payload<F: FrameBytes + ?Sized>(
    frame: &F,
    header: usize,
    dst_port: u16,
) -> Option<(usize, u32)> {
    let head = frame.bytes::<8>(header)?;
    let vni = u32::from_be_bytes([0, head[4], head[5], head[6]]);
    let (kind, inner) = if is_vxlan_port(dst_port) {
        // RFC 7348: the I flag says the VNI is valid.
        if head[0] & 0x08 == 0 {
            return None;
        }
        (tunnel_kind::VXLAN, header + TUNNEL_HLEN)
    } else if dst_port == GENEVE_PORT {
        // RFC 8926: version 0, options length in 4-byte words, an
        // Ethernet payload (not IP: that has no MAC to follow).
        if head[0] >> 6 != 0 || u16::from_be_bytes([head[2], head[3]]) != ETH_P_TEB {
            return None;
        }
        let options = usize::from(head[0] & 0x3f) * 4;
        (tunnel_kind::GENEVE, header + TUNNEL_HLEN + options)
    } else {
        return None;
    };
    (inner <= MAX_INNER_OFFSET).then_some((inner, (kind << 24) | vni))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// An IPv4/UDP frame (no VLAN) from `sport` to `dport` with `payload`.
    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 250, 0, 1, 10, 250, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn dhcp_reply(xid: u32) -> Vec<u8> {
        let mut bootp = std::vec![0u8; 240];
        bootp[0] = 2;
        bootp[4..8].copy_from_slice(&xid.to_be_bytes());
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
        udp(67, 68, &bootp)
    }

    #[test]
    fn a_plain_dhcp_reply_is_found_where_it_is() {
        let frame = dhcp_reply(7);
        let found = locate_hop_dhcp(frame.as_slice()).expect("found");
        assert_eq!(found.inner, 0);
        assert_eq!(found.tunnel, 0);
        assert_eq!(found.cookie_offset(), 14 + 20 + 8 + 236);
    }

    #[test]
    fn a_reply_inside_vxlan_is_found_with_its_vni() {
        let inner = dhcp_reply(9);
        let mut payload = std::vec![0x08, 0, 0, 0, 0, 0x01, 0x02, 0];
        payload.extend_from_slice(&inner);
        let frame = udp(40000, 4789, &payload);
        let found = locate_hop_dhcp(frame.as_slice()).expect("found");
        assert_eq!(found.inner, 14 + 20 + 8 + 8);
        assert_eq!(found.tunnel, (tunnel_kind::VXLAN << 24) | 0x102);
        let parsed = crate::parse::parse_dhcp_frame(&frame[found.inner..]).expect("parsed");
        assert_eq!(parsed.xid, 9);
        // Without the I flag it is no VXLAN frame.
        let mut bad = frame.clone();
        bad[42] = 0;
        assert_eq!(locate_hop_dhcp(bad.as_slice()), None);
    }

    #[test]
    fn a_reply_inside_geneve_skips_its_options() {
        let inner = dhcp_reply(11);
        // Version 0, 2 words of options, protocol 0x6558, VNI 5.
        let mut payload = std::vec![0x02, 0, 0x65, 0x58, 0, 0, 5, 0];
        payload.extend_from_slice(&[0xaa; 8]);
        payload.extend_from_slice(&inner);
        let frame = udp(40000, 6081, &payload);
        let found = locate_hop_dhcp(frame.as_slice()).expect("found");
        assert_eq!(found.inner, 14 + 20 + 8 + 8 + 8);
        assert_eq!(found.tunnel, (tunnel_kind::GENEVE << 24) | 5);
    }

    #[test]
    fn qinq_tags_are_looked_behind_and_the_outer_vlan_kept() {
        let plain = dhcp_reply(3);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xa8, 0x00, 100, 0x81, 0x00, 0x00, 7]);
        tagged.extend_from_slice(&plain[12..]);
        let found = locate_hop_dhcp(tagged.as_slice()).expect("found");
        assert_eq!(found.at.vlan, 100);
        assert_eq!(found.at.l3, 22);
    }

    /// The one-read rejection never rejects what the field-by-field path
    /// finds: random frames, most made untagged IPv4 UDP to the DHCP, tunnel
    /// and other ports, with a DHCP reply or noise behind.
    #[test]
    fn the_common_frame_rejection_agrees_with_the_general_path() {
        let ports = [67, 68, 4789, 8472, 6081, 53, 40000];
        let (mut rejected, mut found) = (0, 0);
        for seed in 0..100_000u64 {
            let mut frame = crate::frame::test_frames::noise(seed).to_vec();
            if seed % 4 != 0 {
                frame[12..15].copy_from_slice(&[0x08, 0x00, 0x45]);
                frame[20..22].copy_from_slice(&[0, 0]);
                if seed % 3 != 0 {
                    frame[23] = 17;
                }
                let dst: u16 = ports[(seed / 4 % 7) as usize];
                let src: u16 = ports[(seed / 28 % 7) as usize];
                frame[34..36].copy_from_slice(&src.to_be_bytes());
                frame[36..38].copy_from_slice(&dst.to_be_bytes());
                if seed % 5 == 0 {
                    // A whole DHCP reply inside a VXLAN header.
                    frame.truncate(42);
                    frame.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
                    frame.extend_from_slice(&dhcp_reply(seed as u32));
                }
            }
            let len = frame.len() - (seed % 3) as usize * 20;
            let frame = &frame[..len];
            let head: Option<[u8; COMMON_HEAD]> = frame.bytes(0);
            rejected += usize::from(head.is_some_and(|h| holds_nothing_to_follow(&h)));
            found += usize::from(locate_hop_dhcp_any(frame).is_some());
            assert_eq!(
                locate_hop_dhcp(frame),
                locate_hop_dhcp_any(frame),
                "frame {frame:02x?}"
            );
        }
        assert!(rejected > 30_000, "only {rejected} rejected in one read");
        assert!(found > 300, "only {found} frames held DHCP");
        // What must be looked into is never rejected in one read.
        let reply = dhcp_reply(4);
        let head: [u8; COMMON_HEAD] = reply.as_slice().bytes(0).expect("long enough");
        assert!(!holds_nothing_to_follow(&head));
    }

    #[test]
    fn other_traffic_and_cut_frames_are_rejected() {
        assert_eq!(locate_hop_dhcp(udp(40000, 53, &[0; 32]).as_slice()), None);
        let frame = dhcp_reply(1);
        for cut in 0..frame.len() - 200 {
            let _ = locate_hop_dhcp(&frame[..cut]);
        }
        let mut vxlan = std::vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        vxlan.extend_from_slice(&dhcp_reply(2)[..30]);
        assert_eq!(locate_hop_dhcp(udp(1, 4789, &vxlan).as_slice()), None);
    }
}
