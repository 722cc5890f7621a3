//! tc programs on each VM's tap: count every frame per direction and class.
//!
//! Fail-open and cooperative: every program returns TC_ACT_UNSPEC, which is
//! "continue" both for TCX links (TCX_NEXT: the next program in the chain
//! runs, and the frame passes when none is left) and for legacy cls_bpf
//! filters (the next filter runs). TC_ACT_OK would end a TCX chain early and
//! silently skip programs that other tools attached after ours.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tracer_common::{class, direction, map_slot, SLOT_ARRAY_IFINDEXES};

use crate::{
    maps::{TAP_SLOT, TAP_SLOT_HIGH, VM_COUNTERS},
    programs::{dhcp, kernel::note_update_failure},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const BOOTPS: u16 = 67;
const BOOTPC: u16 = 68;

/// Frames toward the VM (the tap transmits them to the VMM).
#[classifier]
pub fn hvnet_egress(ctx: TcContext) -> i32 {
    count_frame(&ctx, direction::TO_VM);
    TC_ACT_UNSPEC
}

/// Frames from the VM (the VMM wrote them into the tap).
#[classifier]
pub fn hvnet_ingress(ctx: TcContext) -> i32 {
    count_frame(&ctx, direction::FROM_VM);
    TC_ACT_UNSPEC
}

/// Does nothing: the baseline `hvnet bench` measures hvnet's programs against.
#[classifier]
pub fn hvnet_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count_frame(ctx: &TcContext, direction: u8) {
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let class = classify(ctx);
    if class == class::DHCP || class == class::ARP {
        dhcp::tc_event(ctx, ifindex, direction, class == class::DHCP);
    }
    let counters = tap_slot(ifindex).and_then(|slot| VM_COUNTERS.get_ptr_mut(slot));
    let Some(counters) = counters else {
        // The agent gives every tap a slot before attaching to it: a frame
        // without one is a count lost, and counted as such.
        note_update_failure(map_slot::VM_COUNTERS);
        return;
    };
    let row = usize::from(direction) % direction::COUNT;
    let column = usize::from(class) % class::COUNT;
    let len = u64::from(ctx.len());
    // SAFETY: the pointer is this CPU's copy of a live array element; no
    // other CPU writes it and the program is not re-entered on it. The
    // indices are reduced into range above.
    unsafe {
        let value = &mut (*counters).by_direction_class[row][column];
        value.packets += 1;
        value.bytes += len;
    }
}

/// The counter slot the agent gave this tap.
#[inline(always)]
fn tap_slot(ifindex: u32) -> Option<u32> {
    let plus_one = if ifindex < SLOT_ARRAY_IFINDEXES {
        *TAP_SLOT.get(ifindex)?
    } else {
        // SAFETY: a plain hash value, copied out at once.
        unsafe { *TAP_SLOT_HIGH.get(ifindex)? }
    };
    plus_one.checked_sub(1)
}

/// Same rules as `tracer_common::classify::classify_frame`, over packet
/// pointers with the bounds checks the verifier needs. Ordered for the
/// common frame (unicast TCP/UDP): the fewest packet bytes read before it
/// is known to be neither ARP, DHCP nor broadcast. Byte loads: the BPF
/// target splits unaligned wider loads into bytes anyway.
#[inline(always)]
fn classify(ctx: &TcContext) -> u8 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return class::OTHER;
    }
    let mut ethertype = be16_at(data + 12);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if data + ETH_HLEN + 4 > end {
            return broadcast_or_other(data);
        }
        ethertype = be16_at(data + 16);
        l3 += 4;
    }
    if ethertype == ETH_P_ARP {
        return class::ARP;
    }
    if ethertype == ETH_P_IP && is_dhcp_ipv4(ctx, l3) {
        return class::DHCP;
    }
    broadcast_or_other(data)
}

#[inline(always)]
fn be16_at(addr: usize) -> u16 {
    u16::from_be_bytes([read_u8(addr), read_u8(addr + 1)])
}

#[inline(always)]
fn is_dhcp_ipv4(ctx: &TcContext, l3: usize) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    let ip = data + l3;
    // Fast path: headers in the linear part of the skb, read directly, the
    // protocol first (it rejects TCP at once). Slow path (headers not
    // linear, e.g. some GSO frames from a guest): bpf_skb_load_bytes,
    // which also bounds-checks for us.
    let (version_ihl, protocol, frag) = if ip + 20 <= end {
        if read_u8(ip + 9) != IPPROTO_UDP {
            return false;
        }
        (read_u8(ip), IPPROTO_UDP, be16_at(ip + 6))
    } else {
        let Ok(head) = ctx.load::<[u8; 10]>(l3) else {
            return false;
        };
        (head[0], head[9], u16::from_be_bytes([head[6], head[7]]))
    };
    if version_ihl >> 4 != 4 || protocol != IPPROTO_UDP {
        return false;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    // Only the first fragment carries the UDP header.
    if ihl < 20 || frag & 0x1fff != 0 {
        return false;
    }
    let l4 = ip + ihl;
    let ports = if l4 + 4 <= end {
        [
            read_u8(l4),
            read_u8(l4 + 1),
            read_u8(l4 + 2),
            read_u8(l4 + 3),
        ]
    } else {
        match ctx.load::<[u8; 4]>(l3 + ihl) {
            Ok(ports) => ports,
            Err(_) => return false,
        }
    };
    let src = u16::from_be_bytes([ports[0], ports[1]]);
    let dst = u16::from_be_bytes([ports[2], ports[3]]);
    (src == BOOTPC || src == BOOTPS) && (dst == BOOTPS || dst == BOOTPC)
}

#[inline(always)]
fn broadcast_or_other(data: usize) -> u8 {
    // Caller checked that 14 bytes are in bounds. A unicast destination
    // (group bit clear) is decided by its first byte.
    if read_u8(data) & 1 == 0 {
        return class::OTHER;
    }
    let all_ones = (0..6).all(|i| read_u8(data + i) == u8::MAX);
    if all_ones {
        class::BROADCAST
    } else {
        class::OTHER
    }
}

#[inline(always)]
fn read_u8(addr: usize) -> u8 {
    // SAFETY: callers bounds-check addr+1 against data_end first.
    unsafe { core::ptr::read(addr as *const u8) }
}
