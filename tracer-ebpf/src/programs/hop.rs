//! tc programs on the node's other hops: the bridges the taps are
//! enslaved to, their ports (the veth pairs of a hybrid plug) and the
//! uplinks. They follow DHCP messages only (plain, VLAN-tagged, or inside
//! VXLAN/Geneve) so that a reply that reached the node but never the tap
//! can be told from one that was never sent.
//!
//! An uplink carries all of the node's traffic: these programs count
//! nothing and touch no map for any other frame; the shared locator
//! rejects TCP after one byte read. Fail-open like the tap programs:
//! always TC_ACT_UNSPEC ("continue"), the frame is never changed.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use tracer_common::{
    event_kind, hop::locate_hop_dhcp, hop::Inner, hop_hook, parse, parse_flag, DevKey,
};

use crate::programs::dhcp::{emit, emit_with_options, TcFrame};

/// Frames the hop device transmits.
#[classifier]
pub fn hvnet_hop_egress(ctx: TcContext) -> i32 {
    follow_dhcp(&ctx, hop_hook::EGRESS);
    TC_ACT_UNSPEC
}

/// Frames the hop device receives.
#[classifier]
pub fn hvnet_hop_ingress(ctx: TcContext) -> i32 {
    follow_dhcp(&ctx, hop_hook::INGRESS);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn follow_dhcp(ctx: &TcContext, hook: u8) {
    let frame = TcFrame::new(ctx);
    let Some(found) = locate_hop_dhcp(&frame) else {
        return;
    };
    let inner = Inner {
        outer: &frame,
        offset: found.inner,
    };
    let mut ev = parse::parse_dhcp_header(&inner, found.at);
    ev.kind = event_kind::DHCP_HOP;
    ev.tunnel = found.tunnel;
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed to this program.
    let skb = unsafe { &*ctx.skb.skb };
    if ev.vlan == 0 && found.inner == 0 && skb.vlan_present != 0 {
        // The tag is not in the packet: the NIC (or veth) carries it beside
        // the frame (VLAN offload), where a VLAN device put it or took it.
        ev.vlan = (skb.vlan_tci & 0x0fff) as u16;
    }
    let ifindex = skb.ifindex;
    let dev = DevKey { netns: 0, ifindex };
    if ev.parse_flags & parse_flag::TRUNCATED != 0 {
        // No fixed header, so no options either (as on the tap).
        emit(ev, dev, hook);
    } else {
        emit_with_options(ctx, ev, dev, hook, found.cookie_offset());
    }
}
