//! Host-wide raw tracepoints, filtered to monitored taps: frames the VMM
//! dequeued, and frames the kernel dropped (with the reason).
//!
//! Raw tracepoints need no tracefs (it is often not mounted, and `ip netns
//! exec` hides it) and read the tracepoint's C arguments directly.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::{direction, event_kind, map_slot, DevKey, DropKey};

use crate::{
    bump,
    maps::{DEQUEUED, DROPS},
    programs::{
        dhcp::{emit, locate_dhcp, parse_dhcp},
        kernel::{skb_device, skb_len, skb_linear_frame, skb_owner, socket_family},
    },
};

/// Two MAC addresses: tun_put_user copies a VLAN-offloaded frame in two
/// calls, the first exactly this long; only the second one counts.
const VLAN_SPLIT_LEN: u64 = 12;
const AF_PACKET: u16 = 17;

/// skb_copy_datagram_iovec(const struct sk_buff *skb, int len): fires when
/// tun_put_user copies a frame out of the tap's ring to the VMM (read(2) by
/// QEMU, or vhost-net's tun_recvmsg).
#[raw_tracepoint(tracepoint = "skb_copy_datagram_iovec")]
pub fn hvnet_dequeue(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let len: u64 = ctx.arg(1);
    // This fires for every TCP socket read on the host: the cheapest test
    // that rejects a frame of no monitored tap comes first.
    let Some(dev) = skb_device(skb) else {
        return 0;
    };
    // tcpdump on the tap (AF_PACKET) reads its own copies of the tap's
    // frames: those must not pass for the VMM draining the queue.
    let Some(owner) = skb_owner(skb) else {
        return 0;
    };
    if owner != 0 && socket_family(owner) == Some(AF_PACKET) {
        return 0;
    }
    if len == VLAN_SPLIT_LEN && skb_len(skb).is_some_and(|total| u64::from(total) > VLAN_SPLIT_LEN)
    {
        return 0;
    }
    bump!(DEQUEUED, &dev, map_slot::DEQUEUED);
    dhcp_event(skb, dev, event_kind::DHCP_DEQUEUED, 0);
    0
}

/// A DHCP frame that was dequeued or dropped: which message it was (xid,
/// client MAC), so the agent can say whether a reply reached the VM.
#[inline(always)]
fn dhcp_event(skb: u64, dev: DevKey, kind: u8, reason: u32) {
    let Some(frame) = skb_linear_frame(skb) else {
        return;
    };
    let Some(at) = locate_dhcp(&frame) else {
        return;
    };
    let mut ev = parse_dhcp(&frame, at);
    ev.kind = kind;
    ev.drop_reason = reason;
    emit(ev, dev, direction::TO_VM);
}

/// kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason
/// reason, struct sock *rx_sk): every dropped frame, with its reason.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn hvnet_drop(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    let Some(dev) = skb_device(skb) else {
        return 0;
    };
    let key = DropKey {
        dev,
        reason: reason as u32,
        _pad: 0,
    };
    bump!(DROPS, &key, map_slot::DROPS);
    dhcp_event(skb, dev, event_kind::DHCP_DROPPED, reason as u32);
    0
}

/// Does nothing: the baseline the cost benchmark measures hvnet_dequeue
/// against, on the same tracepoint in the same run.
#[raw_tracepoint(tracepoint = "skb_copy_datagram_iovec")]
pub fn hvnet_empty_dequeue(_ctx: RawTracePointContext) -> i32 {
    0
}

/// Does nothing: the baseline for hvnet_drop.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn hvnet_empty_drop(_ctx: RawTracePointContext) -> i32 {
    0
}
