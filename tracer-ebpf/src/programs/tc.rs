//! tc programs on each VM's tap: count every frame per direction and class.
//!
//! Fail-open and cooperative: every program returns TC_ACT_UNSPEC, which is
//! "continue" both for TCX links (TCX_NEXT: the next program in the chain
//! runs, and the frame passes when none is left) and for legacy cls_bpf
//! filters (the next filter runs). TC_ACT_OK would end a TCX chain early and
//! silently skip programs that other tools attached after ours.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tracer_common::{class, direction, CounterKey, CounterValue};

use crate::{maps::VM_COUNTERS, programs::dhcp};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const BOOTPS: u16 = 67;
const BOOTPC: u16 = 68;
/// BPF_ANY: on a per-CPU hash it writes only this CPU's slot, so two CPUs
/// racing to create the same key both keep their count.
const BPF_ANY: u64 = 0;

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
    let key = CounterKey {
        ifindex,
        direction,
        class,
        _pad: [0; 2],
    };
    if class == class::DHCP || class == class::ARP {
        dhcp::tc_event(ctx, ifindex, direction, class == class::DHCP);
    }
    let len = u64::from(ctx.len());
    match VM_COUNTERS.get_ptr_mut(key) {
        Some(value) => {
            // SAFETY: the pointer is this CPU's slot of a live map element;
            // no other CPU writes it and the program is not re-entered on it.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += len;
            }
        }
        None => {
            let inserted = VM_COUNTERS.insert(
                key,
                CounterValue {
                    packets: 1,
                    bytes: len,
                },
                BPF_ANY,
            );
            if inserted.is_err() {
                crate::programs::kernel::note_update_failure(tracer_common::map_slot::VM_COUNTERS);
            }
        }
    }
}

/// Same rules as `tracer_common::classify::classify_frame`, over packet
/// pointers with the bounds checks the verifier needs.
#[inline(always)]
fn classify(ctx: &TcContext) -> u8 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return class::OTHER;
    }
    let mut ethertype = u16::from_be(read_u16(data + 12));
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if data + ETH_HLEN + 4 > end {
            return broadcast_or_other(data);
        }
        ethertype = u16::from_be(read_u16(data + 16));
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
fn is_dhcp_ipv4(ctx: &TcContext, l3: usize) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    let ip = data + l3;
    // Fast path: headers in the linear part of the skb, read directly.
    // Slow path (headers not linear, e.g. some GSO frames from a guest):
    // bpf_skb_load_bytes, which also bounds-checks for us.
    let (version_ihl, protocol, frag) = if ip + 20 <= end {
        (read_u8(ip), read_u8(ip + 9), u16::from_be(read_u16(ip + 6)))
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
        read_u32(l4).to_ne_bytes()
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
    // Caller checked that 14 bytes are in bounds.
    let low = read_u32(data);
    let high = read_u16(data + 4);
    if low == u32::MAX && high == u16::MAX {
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

#[inline(always)]
fn read_u16(addr: usize) -> u16 {
    // SAFETY: callers bounds-check addr+2 against data_end first.
    unsafe { core::ptr::read_unaligned(addr as *const u16) }
}

#[inline(always)]
fn read_u32(addr: usize) -> u32 {
    // SAFETY: callers bounds-check addr+4 against data_end first.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}
