//! DHCP (BOOTP over UDP 67/68) and ARP parsing for events, bounded and
//! verifier-safe: every read is a checked load (bpf_skb_load_bytes in tc,
//! bpf_probe_read_kernel within skb->len in tracepoints), there is no loop,
//! and any failure yields a flagged event or none, never a fault. Only
//! DHCP/ARP frames pay for this.
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
    direction, event_kind, parse_flag, DevKey, PacketEvent,
};

use crate::{
    maps::{EVENTS, EVENTS_LOST},
    programs::kernel::read,
};

const BOOTP_FIXED: usize = 236;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;

/// Reads a frame at byte offsets, whatever holds it.
pub trait Frame {
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

pub struct TcFrame<'a>(pub &'a TcContext);

impl Frame for TcFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }
}

/// A frame in kernel memory (an sk_buff's linear data) seen from a tracepoint.
pub struct KernelFrame {
    pub data: u64,
    pub len: usize,
}

impl Frame for KernelFrame {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        if offset + core::mem::size_of::<T>() > self.len {
            return None;
        }
        read::<T>(self.data + offset as u64)
    }
}

/// Where a DHCP message sits in a frame.
#[derive(Clone, Copy)]
pub struct DhcpLocation {
    pub l3: usize,
    pub l4: usize,
    pub vlan: u16,
}

/// Finds a DHCP message (IPv4, first fragment, UDP between 67/68, one
/// optional VLAN tag), or None.
#[inline(always)]
pub fn locate_dhcp<F: Frame>(frame: &F) -> Option<DhcpLocation> {
    let mut ethertype = u16::from_be(frame.load::<u16>(12)?);
    let mut l3 = 14;
    let mut vlan = 0;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        vlan = u16::from_be(frame.load::<u16>(14)?) & 0x0fff;
        ethertype = u16::from_be(frame.load::<u16>(16)?);
        l3 = 18;
    }
    if ethertype != ETH_P_IP {
        return None;
    }
    let head = frame.load::<[u8; 10]>(l3)?;
    if head[0] >> 4 != 4 || head[9] != IPPROTO_UDP {
        return None;
    }
    let ihl = usize::from(head[0] & 0x0f) * 4;
    if ihl < 20 || u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
        return None;
    }
    let ports = frame.load::<[u8; 4]>(l3 + ihl)?;
    let src = u16::from_be_bytes([ports[0], ports[1]]);
    let dst = u16::from_be_bytes([ports[2], ports[3]]);
    if !((src == 67 || src == 68) && (dst == 67 || dst == 68)) {
        return None;
    }
    Some(DhcpLocation {
        l3,
        l4: l3 + ihl,
        vlan,
    })
}

/// Fills a DHCP event from the fixed BOOTP header of the message at `at`.
/// Always returns an event: what could not be read is in parse_flags.
#[inline(always)]
pub fn parse_dhcp<F: Frame>(frame: &F, at: DhcpLocation) -> PacketEvent {
    let mut ev = PacketEvent {
        kind: event_kind::DHCP,
        vlan: at.vlan,
        ..Default::default()
    };
    if let Some(mac) = frame.load::<[u8; 6]>(0) {
        ev.dst_mac = mac;
    }
    if let Some(addrs) = frame.load::<[u8; 8]>(at.l3 + 12) {
        ev.src_ip = [addrs[0], addrs[1], addrs[2], addrs[3]];
        ev.dst_ip = [addrs[4], addrs[5], addrs[6], addrs[7]];
    }
    let Some(fixed) = frame.load::<[u8; 44]>(at.l4 + 8) else {
        ev.parse_flags |= parse_flag::TRUNCATED;
        return ev;
    };
    ev.op = fixed[0];
    ev.xid = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    ev.secs = u16::from_be_bytes([fixed[8], fixed[9]]);
    ev.flags = u16::from_be_bytes([fixed[10], fixed[11]]);
    ev.ciaddr = [fixed[12], fixed[13], fixed[14], fixed[15]];
    ev.yiaddr = [fixed[16], fixed[17], fixed[18], fixed[19]];
    ev.chaddr = [
        fixed[28], fixed[29], fixed[30], fixed[31], fixed[32], fixed[33],
    ];
    ev
}

/// Where the magic cookie (and the options) of the message at `at` start.
#[inline(always)]
fn cookie_offset(at: DhcpLocation) -> usize {
    at.l4 + 8 + BOOTP_FIXED
}

/// An ARP frame's opcode and addresses (Ethernet/IPv4 ARP only).
#[inline(always)]
pub fn parse_arp<F: Frame>(frame: &F, l3: usize) -> Option<PacketEvent> {
    let arp = frame.load::<[u8; 28]>(l3)?;
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    if arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mut ev = PacketEvent {
        kind: event_kind::ARP,
        msg_type: arp[7],
        ..Default::default()
    };
    ev.chaddr = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
    ev.src_ip = [arp[14], arp[15], arp[16], arp[17]];
    ev.dst_ip = [arp[24], arp[25], arp[26], arp[27]];
    if let Some(mac) = frame.load::<[u8; 6]>(0) {
        ev.dst_mac = mac;
    }
    Some(ev)
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
fn emit_with_options(ctx: &TcContext, mut ev: PacketEvent, dev: DevKey, dir: u8, cookie: usize) {
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
    let frame = TcFrame(ctx);
    let dev = DevKey { netns: 0, ifindex };
    if is_dhcp {
        if let Some(at) = locate_dhcp(&frame) {
            let ev = parse_dhcp(&frame, at);
            if ev.parse_flags & parse_flag::TRUNCATED != 0 {
                // No fixed header, so no options either.
                emit(ev, dev, dir);
            } else {
                emit_with_options(ctx, ev, dev, dir, cookie_offset(at));
            }
        }
        return;
    }
    // ARP: everything the VM sends, and only replies toward it (requests
    // for other hosts are flooded to every tap and say nothing about it).
    let l3 = match frame.load::<u16>(12).map(u16::from_be) {
        Some(0x0806) => 14,
        Some(ETH_P_8021Q) | Some(ETH_P_8021AD) => 18,
        _ => return,
    };
    if let Some(ev) = parse_arp(&frame, l3) {
        if dir == direction::FROM_VM || ev.msg_type == 2 {
            emit(ev, dev, dir);
        }
    }
}
