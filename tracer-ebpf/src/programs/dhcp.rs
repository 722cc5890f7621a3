//! DHCP and ARP events: how the programs read a frame (the tc packet, an
//! sk_buff's data from a tracepoint) for the shared parser in
//! `tracer_common::parse`, and how events reach userspace (per-tap budget,
//! ring buffer, loss counted). Every read is checked, there is no loop, and
//! any failure yields a flagged event or none, never a fault. Only DHCP/ARP
//! frames pay for this.
//!
//! DHCP options are not walked here: the tc programs copy them (a bounded
//! length, one helper call) and userspace walks them with
//! `tracer_common::dhcp_options`. A data-dependent walk is what older
//! verifiers cannot prune (6.1 gave up after a million instructions).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use tracer_common::{
    dhcp_options::{EventWithOptions, OPTIONS_CAPTURE},
    direction,
    frame::FrameBytes,
    parse::{arp_offset, locate_dhcp, parse_arp, parse_dhcp_header},
    parse_flag, DevKey, PacketEvent,
};

use crate::maps::{EVENTS, EVENTS_LOST};

/// A tc program's packet. Reads inside the linear part are plain loads
/// after a bounds check against data_end (what the verifier wants for
/// direct packet access); reads past it (headers not linear, e.g. some
/// GSO frames from a guest) fall back to bpf_skb_load_bytes, which
/// bounds-checks for us. data and data_end are read once: no helper the
/// parser calls moves the packet.
pub struct TcFrame<'a> {
    ctx: &'a TcContext,
    data: usize,
    end: usize,
}

impl<'a> TcFrame<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// `N` bytes from `offset` by a plain load, if the linear part holds
    /// `checked` (>= N) bytes there.
    #[inline(always)]
    fn plain<const N: usize>(&self, offset: usize, checked: usize) -> Option<[u8; N]> {
        let at = self.data + offset;
        if at + checked <= self.end {
            // SAFETY: [at, at + checked) lies inside the packet (checked
            // just above, as the verifier requires) and N <= checked;
            // unaligned reads are fine.
            return Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) });
        }
        None
    }
}

impl FrameBytes for TcFrame<'_> {
    #[inline(always)]
    fn linear_bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.plain(offset, N)
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // LLVM turns `at + 1 <= end` into `at < end`, and the verifier
        // learns no range from `pkt < pkt_end` when the pointer's constant
        // offset is 0: one-byte reads check for two bytes. A frame whose
        // last byte is the one read takes the helper path: same answer.
        let fast_len = if N < 2 { 2 } else { N };
        if let Some(value) = self.plain(offset, fast_len) {
            return Some(value);
        }
        // Headers past the linear part are rare: kept off the straight
        // line of code the common frame runs through.
        core::hint::cold_path();
        self.ctx.load::<[u8; N]>(offset).ok()
    }
}

/// The event's time if the tap's budget admits one more event on this CPU;
/// otherwise counts it as throttled.
#[inline(always)]
fn admit(dev: DevKey) -> Option<u64> {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if within_budget(dev.ifindex, now) {
        return Some(now);
    }
    crate::bump!(
        crate::maps::EVENTS_THROTTLED,
        &dev.ifindex,
        tracer_common::map_slot::EVENTS_THROTTLED
    );
    None
}

#[inline(always)]
fn count_lost() {
    if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *lost += 1 };
    }
}

/// Sends an event; a full ring buffer counts a loss and never blocks.
#[inline(always)]
pub fn emit(mut ev: PacketEvent, dev: DevKey, dir: u8) {
    let Some(now) = admit(dev) else {
        return;
    };
    ev.ts_ns = now;
    ev.dev = dev;
    ev.direction = dir;
    match EVENTS.reserve::<PacketEvent>(0) {
        Some(mut entry) => {
            entry.write(ev);
            entry.submit(0);
        }
        None => count_lost(),
    }
}

/// Sends a DHCP event seen by tc with its options copied from `cookie` on
/// (built in the ring buffer: the record is too large for the stack).
#[inline(always)]
pub fn emit_with_options(
    ctx: &TcContext,
    mut ev: PacketEvent,
    dev: DevKey,
    dir: u8,
    cookie: usize,
) {
    let Some(now) = admit(dev) else {
        return;
    };
    ev.ts_ns = now;
    ev.dev = dev;
    ev.direction = dir;
    let Some(mut entry) = EVENTS.reserve::<EventWithOptions>(0) else {
        count_lost();
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` is the reserved, writable ring buffer entry; every
    // field written through it lies inside it.
    unsafe {
        core::ptr::addr_of_mut!((*record).event).write(ev);
        let bytes = core::ptr::addr_of_mut!((*record).options.bytes).cast::<u8>();
        let (len, more) = copy_options(ctx, cookie, bytes);
        core::ptr::addr_of_mut!((*record).options.len).write(len);
        core::ptr::addr_of_mut!((*record).options.more).write(more);
        core::ptr::addr_of_mut!((*record).options._pad).write(0);
    }
    entry.submit(0);
}

/// Copies up to OPTIONS_CAPTURE bytes of the frame from `cookie` on into
/// `dst`; returns how many, and 1 if the frame goes on past them.
#[inline(always)]
fn copy_options(ctx: &TcContext, cookie: usize, dst: *mut u8) -> (u16, u8) {
    let frame_len = ctx.len() as usize;
    if cookie >= frame_len || cookie > 0xffff {
        return (0, 0);
    }
    let available = frame_len - cookie;
    let more = u8::from(available > OPTIONS_CAPTURE);
    // len in [1, OPTIONS_CAPTURE], written so that older verifiers see the
    // lower bound too (6.1 learns nothing from `cookie < frame_len`, nor
    // from `!= 0`): cap available - 1, then add the 1 back.
    let mut len = available.wrapping_sub(1);
    if len > OPTIONS_CAPTURE - 1 {
        len = OPTIONS_CAPTURE - 1;
    }
    let len = len + 1;
    // SAFETY: dst has OPTIONS_CAPTURE writable bytes; the helper checks the
    // frame's bounds itself.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), cookie as u32, dst.cast(), len as u32) };
    if rc != 0 {
        return (0, 0);
    }
    (len as u16, more)
}

/// Takes one event's worth of the tap's budget on this CPU (a token
/// bucket kept in nanoseconds of credit: no division on this path).
#[inline(always)]
fn within_budget(ifindex: u32, now: u64) -> bool {
    use tracer_common::event_budget::{BURST, INTERVAL_NS};
    let full = BURST * INTERVAL_NS;
    match crate::maps::EVENT_BUDGET.get_ptr_mut(ifindex) {
        Some(budget) => {
            // SAFETY: this CPU's slot of a live map element.
            let [credit, last] = unsafe { *budget };
            let earned = now.saturating_sub(last);
            let credit = if credit + earned > full {
                full
            } else {
                credit + earned
            };
            let allowed = credit >= INTERVAL_NS;
            let left = if allowed {
                credit - INTERVAL_NS
            } else {
                credit
            };
            // SAFETY: as above.
            unsafe { *budget = [left, now] };
            allowed
        }
        None => {
            // First event of this tap on this CPU: a full bucket, minus this one.
            let _ = crate::maps::EVENT_BUDGET.insert(ifindex, [full - INTERVAL_NS, now], 0);
            true
        }
    }
}

/// tc side: a DHCP or ARP frame crossing the tap.
#[inline(always)]
pub fn tc_event(ctx: &TcContext, ifindex: u32, dir: u8, is_dhcp: bool) {
    let frame = TcFrame::new(ctx);
    let dev = DevKey { netns: 0, ifindex };
    if is_dhcp {
        if let Some(at) = locate_dhcp(&frame) {
            let ev = parse_dhcp_header(&frame, at);
            if ev.parse_flags & parse_flag::TRUNCATED != 0 {
                // No fixed header, so no options either.
                emit(ev, dev, dir);
            } else {
                emit_with_options(ctx, ev, dev, dir, at.cookie_offset());
            }
        }
        return;
    }
    // ARP: everything the VM sends, and only replies toward it (requests
    // for other hosts are flooded to every tap and say nothing about it).
    let Some(ev) = arp_offset(&frame).and_then(|l3| parse_arp(&frame, l3)) else {
        return;
    };
    if dir == direction::FROM_VM || ev.msg_type == 2 {
        emit(ev, dev, dir);
    }
}
