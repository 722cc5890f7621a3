//! tc programs on each VM's tap: count every frame per direction and class.
//!
//! Fail-open and cooperative: every program returns TC_ACT_UNSPEC, which is
//! "continue" both for TCX links (TCX_NEXT: the next program in the chain
//! runs, and the frame passes when none is left) and for legacy cls_bpf
//! filters (the next filter runs). TC_ACT_OK would end a TCX chain early and
//! silently skip programs that other tools attached after ours.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_get_smp_processor_id, macros::classifier,
    programs::TcContext,
};
use tracer_common::{class, classify::classify, direction, map_slot, SLOT_ARRAY_IFINDEXES};

use crate::{
    maps::{TAP_SLOT, TAP_SLOT_HIGH, VM_COUNTERS},
    programs::{
        dhcp,
        kernel::{global, note_update_failure},
    },
};

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
    // The tap's counters first: their loads are under way while the
    // classifier reads the packet. Null rather than an Option: one register
    // to keep across the classifier, not a pointer and a flag.
    let counters = tap_slot(ifindex)
        .and_then(|slot| VM_COUNTERS.get_ptr_mut(this_cpu_element(slot)?))
        .unwrap_or(core::ptr::null_mut());
    // The shared classifier, run on the packet (fast path: plain loads).
    let class = classify(&dhcp::TcFrame::new(ctx));
    if class == class::DHCP || class == class::ARP {
        // A few frames per VM and minute: off the common frame's path.
        core::hint::cold_path();
        dhcp::tc_event(ctx, ifindex, direction, class == class::DHCP);
    }
    if counters.is_null() {
        // The agent gives every tap a slot before attaching to it: a frame
        // without one is a count lost, and counted as such.
        core::hint::cold_path();
        note_update_failure(map_slot::VM_COUNTERS);
        return;
    }
    let row = usize::from(direction) % direction::COUNT;
    let column = usize::from(class) % class::COUNT;
    let len = u64::from(ctx.len());
    // SAFETY: the pointer is this CPU's copy of a live array element (not
    // null: checked above); no other CPU writes it and the program is not
    // re-entered on it. The indices are reduced into range above.
    unsafe {
        let value = &mut (*counters).by_direction_class[row][column];
        value.packets += 1;
        value.bytes += len;
    }
}

/// The number of possible CPUs: the stride of a slot's copies in
/// VM_COUNTERS. Set by the agent at load time.
#[unsafe(no_mangle)]
static COUNTER_CPUS: u32 = 0;

/// The VM_COUNTERS element of this CPU's copy of counter slot `slot`;
/// None past the CPUs the agent sized the array for (it would be another
/// slot's copy).
#[inline(always)]
fn this_cpu_element(slot: u32) -> Option<u32> {
    let cpus = global(&COUNTER_CPUS) as u32;
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if cpu >= cpus {
        return None;
    }
    Some(slot.wrapping_mul(cpus).wrapping_add(cpu))
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
