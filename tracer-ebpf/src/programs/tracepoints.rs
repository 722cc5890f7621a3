//! Host-wide tracepoints, filtered to monitored taps: frames the VMM
//! dequeued, and frames the kernel dropped (with the reason).
//!
//! Each hook has two programs with one body: a BTF tracepoint (tp_btf),
//! whose plain loads of skb->dev and dev->ifindex make rejecting a non-tap
//! skb almost free, and a raw tracepoint reading through
//! bpf_probe_read_kernel, the fallback where the kernel refuses the first.
//! Neither needs tracefs (often not mounted; `ip netns exec` hides it).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use tracer_common::{
    direction, event_kind, map_slot,
    parse::{locate_dhcp, locate_dhcp_in_ip, parse_dhcp_header},
    DevKey, DropKey,
};

use crate::{
    bump,
    maps::{DEQUEUED, DROPS},
    programs::{
        dhcp::emit,
        kernel::{
            known_device, skb_dev, skb_device, skb_len, skb_linear_frame, skb_owner, socket_family,
            DirectLoad, KernelMemory, Known, ProbeRead,
        },
    },
};

/// Two MAC addresses: tun_put_user copies a VLAN-offloaded frame in two
/// calls, the first exactly this long; only the second one counts.
const VLAN_SPLIT_LEN: u64 = 12;
const AF_PACKET: u16 = 17;

/// skb_copy_datagram_iovec(const struct sk_buff *skb, int len): fires when
/// tun_put_user copies a frame out of the tap's ring to the VMM (read(2) by
/// QEMU, or vhost-net's tun_recvmsg).
#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn hvnet_dequeue(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let len: u32 = ctx.arg(1);
    count_dequeue::<DirectLoad>(skb, u64::from(len));
    0
}

/// hvnet_dequeue for kernels that refuse the BTF tracepoint.
#[raw_tracepoint(tracepoint = "skb_copy_datagram_iovec")]
pub fn hvnet_dequeue_raw(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let len: u64 = ctx.arg(1);
    count_dequeue::<ProbeRead>(skb, len & 0xffff_ffff);
    0
}

#[inline(always)]
fn count_dequeue<M: KernelMemory>(skb: u64, len: u64) {
    // This fires for every TCP socket read on the host: the cheapest test
    // that rejects a frame of no monitored tap comes first.
    let Some(dev) = skb_device::<M>(skb) else {
        return;
    };
    // tcpdump on the tap (AF_PACKET) reads its own copies of the tap's
    // frames: those must not pass for the VMM draining the queue.
    let Some(owner) = skb_owner::<M>(skb) else {
        return;
    };
    if owner != 0 && socket_family::<M>(owner) == Some(AF_PACKET) {
        return;
    }
    if len == VLAN_SPLIT_LEN
        && skb_len::<M>(skb).is_some_and(|total| u64::from(total) > VLAN_SPLIT_LEN)
    {
        return;
    }
    bump!(DEQUEUED, &dev, map_slot::DEQUEUED);
    dhcp_event::<M>(skb, dev, event_kind::DHCP_DEQUEUED, 0);
}

/// A DHCP frame that was dequeued or dropped: which message it was (xid,
/// client MAC), so the agent can say whether a reply reached the VM.
#[inline(always)]
fn dhcp_event<M: KernelMemory>(skb: u64, dev: DevKey, kind: u8, reason: u32) {
    let Some(frame) = skb_linear_frame::<M>(skb) else {
        return;
    };
    // Where the device's driver or the bridge already pulled the Ethernet
    // header, the data starts at the IP header.
    let Some(at) = locate_dhcp(&frame).or_else(|| locate_dhcp_in_ip(&frame)) else {
        return;
    };
    let mut ev = parse_dhcp_header(&frame, at);
    ev.kind = kind;
    ev.drop_reason = reason;
    emit(ev, dev, direction::TO_VM);
}

/// kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason
/// reason, struct sock *rx_sk): every dropped frame, with its reason.
#[btf_tracepoint(function = "kfree_skb")]
pub fn hvnet_drop(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    count_drop::<DirectLoad>(skb, reason);
    0
}

/// hvnet_drop for kernels that refuse the BTF tracepoint.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn hvnet_drop_raw(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    count_drop::<ProbeRead>(skb, reason as u32);
    0
}

#[inline(always)]
fn count_drop<M: KernelMemory>(skb: u64, reason: u32) {
    let Some(dev) = skb_dev::<M>(skb) else {
        return;
    };
    match known_device::<M>(dev) {
        Some(Known::Tap(dev)) => {
            let key = DropKey {
                dev,
                reason,
                _pad: 0,
            };
            bump!(DROPS, &key, map_slot::DROPS);
            dhcp_event::<M>(skb, dev, event_kind::DHCP_DROPPED, reason);
        }
        // On a hop only DHCP drops matter (which reply died where): an
        // uplink's other drops are not hvnet's to count.
        Some(Known::Hop(dev)) => dhcp_event::<M>(skb, dev, event_kind::DHCP_DROPPED, reason),
        None => {}
    }
}

/// Does nothing: the baseline the cost benchmark measures hvnet_dequeue
/// against, on the same tracepoint in the same run.
#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn hvnet_empty_dequeue(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// Does nothing: the baseline for hvnet_drop.
#[btf_tracepoint(function = "kfree_skb")]
pub fn hvnet_empty_drop(_ctx: BtfTracePointContext) -> i32 {
    0
}
