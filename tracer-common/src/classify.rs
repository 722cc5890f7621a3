//! The frame classification rules, written once over [`FrameBytes`]: the
//! tc programs run this code on the packet (the verifier checks every
//! read), userspace runs it on byte slices (the lab's fake VMM counts what
//! it relays with it, `hvnet bench` and the tests check frames with it).

use crate::{class, frame::FrameBytes};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const BOOTPS: u16 = 67;
const BOOTPC: u16 = 68;

/// Classifies an Ethernet frame: DHCP (IPv4 UDP between ports 67/68, first
/// fragment, optionally behind one or two 802.1Q/802.1ad tags), ARP, other
/// broadcast (destination ff:ff:ff:ff:ff:ff), or other. Short or malformed
/// frames are `other`: they still cross the tap and must be counted.
///
/// The common frame (untagged IPv4 without options: a VM's TCP and UDP) is
/// decided from one read of its first [`COMMON_HEAD`] bytes; every other
/// frame takes the general path, read field by field.
#[inline(always)]
pub fn classify<F: FrameBytes + ?Sized>(frame: &F) -> u8 {
    if let Some(class) = frame
        .linear_bytes::<COMMON_HEAD>(0)
        .and_then(|head| classify_common(&head))
    {
        return class;
    }
    classify_any(frame)
}

/// Ethernet header, IPv4 header without options, UDP ports: every byte
/// the rules read in an untagged IPv4 frame with a 20-byte header.
pub const COMMON_HEAD: usize = ETH_HLEN + 20 + 4;

/// The class of an untagged IPv4 frame with a 20-byte header, from its
/// first [`COMMON_HEAD`] bytes; None for any other frame. The same rules
/// as [`classify_any`], run on the head: for such a frame each read they
/// make lies inside it. Where the head is packet memory this is one
/// bounds check, and only the bytes the rules use are loaded.
#[inline(always)]
fn classify_common(head: &[u8; COMMON_HEAD]) -> Option<u8> {
    let frame = common_frame(head)?;
    let is_dhcp = udp_offset(frame, ETH_HLEN).is_some_and(|l4| is_dhcp_udp(frame, l4));
    Some(if is_dhcp {
        class::DHCP
    } else {
        broadcast_or_other(frame)
    })
}

/// The head as a frame the rules can read, if it is the head of an
/// untagged IPv4 frame with a 20-byte header: then every read the rules
/// make on such a frame (Ethernet, IPv4, UDP ports) lies inside it.
#[inline(always)]
pub(crate) fn common_frame(head: &[u8; COMMON_HEAD]) -> Option<&[u8]> {
    const IPV4_NO_OPTIONS: u8 = 0x45;
    (u16::from_be_bytes([head[12], head[13]]) == ETH_P_IP && head[ETH_HLEN] == IPV4_NO_OPTIONS)
        .then_some(head.as_slice())
}

/// [`classify`] for any frame, read field by field.
///
/// Ordered for the common frame (unicast TCP/UDP): the fewest bytes read
/// before it is known to be neither ARP, DHCP nor broadcast.
#[inline(always)]
fn classify_any<F: FrameBytes + ?Sized>(frame: &F) -> u8 {
    let Some(payload) = ether_payload(frame) else {
        return class::OTHER;
    };
    if payload.ethertype == ETH_P_ARP {
        return class::ARP;
    }
    if payload.ethertype == ETH_P_IP
        && udp_offset(frame, payload.offset).is_some_and(|l4| is_dhcp_udp(frame, l4))
    {
        return class::DHCP;
    }
    broadcast_or_other(frame)
}

/// An Ethernet frame's EtherType and where its payload starts, looked up
/// behind at most two 802.1Q/802.1ad tags.
pub(crate) struct EtherPayload {
    pub ethertype: u16,
    pub offset: usize,
    /// The tag's VLAN id, 0 if untagged.
    pub vlan: u16,
}

/// The payload of an Ethernet frame; None if the frame ends inside its
/// Ethernet header. A tag the frame cuts short leaves EtherType 0 (neither
/// ARP nor IP): the frame is still classified by its destination.
#[inline(always)]
pub(crate) fn ether_payload<F: FrameBytes + ?Sized>(frame: &F) -> Option<EtherPayload> {
    let ethertype = frame.be16_at(12)?;
    if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
        return Some(EtherPayload {
            ethertype,
            offset: ETH_HLEN,
            vlan: 0,
        });
    }
    let (vlan, inner) = match frame.bytes::<4>(ETH_HLEN) {
        Some(tag) => (
            u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff,
            u16::from_be_bytes([tag[2], tag[3]]),
        ),
        None => (0, 0),
    };
    if inner != ETH_P_8021Q {
        return Some(EtherPayload {
            ethertype: inner,
            offset: ETH_HLEN + 4,
            vlan,
        });
    }
    // QinQ (an 802.1ad or 802.1Q service tag, then the customer's 802.1Q
    // tag): the outer VLAN is the one the node's uplink is configured with.
    let inner = frame.bytes::<2>(ETH_HLEN + 6).map_or(0, u16::from_be_bytes);
    Some(EtherPayload {
        ethertype: inner,
        offset: ETH_HLEN + 8,
        vlan,
    })
}

/// [`classify`] for a byte slice.
pub fn classify_frame(frame: &[u8]) -> u8 {
    classify(frame)
}

/// Where the UDP header of the IPv4 packet at `l3` starts, if the packet is
/// UDP and its first fragment (only that one carries the UDP header).
///
/// The header's first ten bytes in one read: one bounds check where they
/// are packet memory, and only the bytes used are loaded (the protocol
/// first: it rejects TCP with one load).
#[inline(always)]
pub(crate) fn udp_offset<F: FrameBytes + ?Sized>(frame: &F, l3: usize) -> Option<usize> {
    let head = frame.bytes::<10>(l3)?;
    if head[9] != IPPROTO_UDP {
        return None;
    }
    let version_ihl = head[0];
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 || u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
        return None;
    }
    Some(l3 + ihl)
}

/// Whether the UDP header at `l4` is between the DHCP ports. The ports are
/// read here rather than through [`udp_ports`]: through it, LLVM orders the
/// tap programs' port checks worse (two more stack spills on the path of
/// every UDP frame, seen in the disassembly).
#[inline(always)]
pub(crate) fn is_dhcp_udp<F: FrameBytes + ?Sized>(frame: &F, l4: usize) -> bool {
    let Some(ports) = frame.bytes::<4>(l4) else {
        return false;
    };
    is_dhcp_port_pair(
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    )
}

/// The (source, destination) ports of the UDP header at `l4`, in one read.
#[inline(always)]
pub(crate) fn udp_ports<F: FrameBytes + ?Sized>(frame: &F, l4: usize) -> Option<(u16, u16)> {
    let ports = frame.bytes::<4>(l4)?;
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

/// Client->server, server->client, and relay->server (67->67).
#[inline(always)]
pub fn is_dhcp_port_pair(src: u16, dst: u16) -> bool {
    (src == BOOTPC || src == BOOTPS) && (dst == BOOTPS || dst == BOOTPC)
}

#[inline(always)]
fn broadcast_or_other<F: FrameBytes + ?Sized>(frame: &F) -> u8 {
    // A unicast destination (group bit clear) is decided by its first byte.
    match frame.u8_at(0) {
        Some(first) if first & 1 == 1 => {}
        _ => return class::OTHER,
    }
    if frame.bytes::<6>(0) == Some([u8::MAX; 6]) {
        class::BROADCAST
    } else {
        class::OTHER
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, classify_any, classify_common, COMMON_HEAD};
    use crate::class;

    /// The one-read path and the field-by-field path agree on every frame,
    /// the common ones included (IPv4 without options, UDP or not, between
    /// the DHCP ports or not, broadcast or not, fragments, cut short).
    #[test]
    fn the_common_frame_path_agrees_with_the_general_one() {
        // Frames the one-read path decided, by class.
        let mut common = [0usize; class::COUNT];
        for seed in 0..200_000u64 {
            let len = (seed % 80) as usize;
            let mut bytes = crate::frame::test_frames::noise(seed);
            let frame = &mut bytes[..len];
            if len >= COMMON_HEAD && seed % 4 != 0 {
                // Steer most frames to untagged IPv4 without options.
                frame[12..15].copy_from_slice(&[0x08, 0x00, 0x45]);
                if seed % 3 == 0 {
                    frame[23] = 17;
                    frame[20..22].copy_from_slice(&[0, 0]);
                    let ports: [[u8; 4]; 3] = [[0, 68, 0, 67], [0, 67, 0, 68], [0, 67, 0, 67]];
                    if seed % 5 != 0 {
                        frame[34..38].copy_from_slice(&ports[(seed / 3 % 3) as usize]);
                    }
                }
                if seed % 7 == 0 {
                    frame[0..6].copy_from_slice(&[0xff; 6]);
                }
            }
            if let Ok(head) = <[u8; COMMON_HEAD]>::try_from(&frame[..len.min(COMMON_HEAD)]) {
                if let Some(decided) = classify_common(&head) {
                    common[usize::from(decided)] += 1;
                }
            }
            assert_eq!(
                classify(&*frame),
                classify_any(&*frame),
                "frame {frame:02x?}"
            );
        }
        // The one-read path decided most steered frames, of every class it can.
        assert!(common.iter().sum::<usize>() > 70_000, "{common:?}");
        for decided in [class::DHCP, class::BROADCAST, class::OTHER] {
            assert!(common[usize::from(decided)] > 1_000, "{common:?}");
        }
    }
}
