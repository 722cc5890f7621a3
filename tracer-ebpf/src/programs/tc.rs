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
use tracer_common::{
    class, classify::classify, direction, map_slot, TapCounters, SLOT_ARRAY_IFINDEXES,
};

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
    let row = usize::from(direction) % direction::COUNT;
    // The tap's counters first: the line's load is under way while the
    // classifier reads the packet. Null rather than an Option: one register
    // to keep across the classifier, not a pointer and a flag.
    let counters = tap_counters(ifindex, row);
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
    let len = u64::from(ctx.len());
    // SAFETY: the pointer is this CPU's copy of a live array element (not
    // null: checked above); no other CPU writes it and the program is not
    // re-entered on it. value_mut keeps its indices in range.
    unsafe {
        let value = (*counters).value_mut(row, class);
        value.packets += 1;
        value.bytes += len;
    }
}

/// The number of possible CPUs: the stride of a slot's copies in
/// VM_COUNTERS. Set by the agent at load time.
#[unsafe(no_mangle)]
static COUNTER_CPUS: u32 = 0;

/// `tracer_common::slot_mask` of the slots VM_COUNTERS has: a tap's
/// preferred slot is `ifindex & SLOT_MASK`. Set by the agent at load time.
#[unsafe(no_mangle)]
static SLOT_MASK: u32 = 0;

/// This CPU's copy of the tap's counters, or null if the tap holds no
/// slot. The slot its ifindex suggests first: the line that proves it
/// holds the slot is the line this frame is counted in, so a tap there
/// costs one cache line. Any other tap's slot is found through TAP_SLOT.
#[inline(always)]
fn tap_counters(ifindex: u32, row: usize) -> *mut TapCounters {
    let cpus = global(&COUNTER_CPUS) as u32;
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // Past the CPUs the agent sized the array for, an element would be
    // another slot's copy.
    if cpu >= cpus {
        return core::ptr::null_mut();
    }
    let owned_copy = |slot: u32| {
        let copy = VM_COUNTERS.get_ptr_mut(slot.wrapping_mul(cpus).wrapping_add(cpu))?;
        // SAFETY: a live array element; the owner is a plain u32 the agent
        // writes before the tap's programs attach.
        (unsafe { (*copy).lines[row].owner } == ifindex).then_some(copy)
    };
    if let Some(copy) = owned_copy(ifindex & global(&SLOT_MASK) as u32) {
        return copy;
    }
    // Its suggested slot was taken when the tap came: rare on a node whose
    // ifindexes are mostly its taps'.
    core::hint::cold_path();
    tap_slot(ifindex)
        .and_then(owned_copy)
        .unwrap_or(core::ptr::null_mut())
}

/// The counter slot the agent gave this tap (any slot, not only the one
/// its ifindex suggests).
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
