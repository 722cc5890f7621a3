//! Types shared by the eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has no `bool` (the kernel has no
//! such type) and carries explicit padding, so both sides agree on the layout
//! byte for byte. Sizes are asserted at compile time.
#![no_std]

pub mod classify;
pub mod dhcp_options;
pub mod frame;
pub mod hop;
pub mod parse;

/// Traffic direction, always from the VM's point of view.
///
/// `ToVm` is the tap's transmit side (tc egress): frames the host offers to
/// the VMM. `FromVm` is the tap's receive side (tc ingress): frames the VMM
/// wrote on behalf of the guest. libvirt's own interface stats swap these.
pub mod direction {
    pub const TO_VM: u8 = 0;
    pub const FROM_VM: u8 = 1;
    pub const COUNT: usize = 2;
}

/// Traffic class of a frame; see [`classify`] for the exact rules.
pub mod class {
    pub const DHCP: u8 = 0;
    pub const ARP: u8 = 1;
    pub const BROADCAST: u8 = 2;
    pub const OTHER: u8 = 3;
    pub const COUNT: usize = 4;
}

/// Packets and bytes of one (direction, class) of one tap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Every counter of one tap, indexed `[direction][class]`: what the agent
/// reads out of the [`TapCounters`] copies (one per CPU) and sums.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub by_direction_class: [[CounterValue; class::COUNT]; direction::COUNT],
}

impl TrafficCounters {
    /// One (direction, class); zero for numbers out of range.
    pub fn get(&self, direction: u8, class: u8) -> CounterValue {
        self.by_direction_class
            .get(usize::from(direction))
            .and_then(|row| row.get(usize::from(class)))
            .copied()
            .unwrap_or_default()
    }

    /// Packets in one direction, all classes.
    pub fn packets(&self, direction: u8) -> u64 {
        self.by_direction_class
            .get(usize::from(direction))
            .map_or(0, |row| row.iter().map(|v| v.packets).sum())
    }

    /// Adds another CPU's copy (wrapping: a u64 wrap must not panic).
    pub fn accumulate(&mut self, other: &TrafficCounters) {
        let rows = self.by_direction_class.iter_mut();
        for (row, other_row) in rows.zip(other.by_direction_class.iter()) {
            for (slot, add) in row.iter_mut().zip(other_row.iter()) {
                slot.packets = slot.packets.wrapping_add(add.packets);
                slot.bytes = slot.bytes.wrapping_add(add.bytes);
            }
        }
    }
}

/// A network device, unique on the host: ifindex is only unique within a
/// network namespace, so the namespace's inode number is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevKey {
    pub netns: u32,
    pub ifindex: u32,
}

/// Key of the per-CPU drop counter map: a device and a kernel drop reason
/// (`enum skb_drop_reason`, whose numbers differ between kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub dev: DevKey,
    pub reason: u32,
    pub _pad: u32,
}

/// Words of the MONITORED_IFINDEX bitmap: ifindexes below 65536 (a higher
/// ifindex skips the shortcut and takes the full check).
pub const IFINDEX_BITMAP_WORDS: u32 = 1024;

/// The map flag that lets userspace mmap an array (linux/bpf.h).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Most monitored devices (taps) per host.
pub const MAX_MONITORED: u32 = 4096;
/// Most hops (bridges, bridge ports, uplinks) followed per host: a
/// Neutron hybrid plug has three per VM (qbr, qvb, qvo) besides the tap.
pub const MAX_HOPS: u32 = 3 * MAX_MONITORED + 64;
/// Distinct (device, drop reason) pairs tracked.
pub const DROP_MAP_ENTRIES: u32 = MAX_MONITORED * DROP_REASONS_PER_TAP;

/// What the tc programs count into for one tap on one CPU (an element of
/// VM_COUNTERS), laid out so that a common frame touches one cache line
/// and no slot table: its direction's line holds the tap that owns the slot
/// and the two common classes. The programs look for a tap at slot
/// `ifindex & SLOT_MASK` and count there when that line's `owner` is the
/// tap's ifindex (the agent puts a tap there whenever it can); only a tap
/// whose slot is elsewhere pays for the TAP_SLOT lookup. DHCP and ARP
/// (rare, and sent as events besides) live in a line of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapCounters {
    pub lines: [DirectionLine; direction::COUNT],
    /// `[direction][class]` for DHCP (0) and ARP (1).
    pub rare: [[CounterValue; 2]; direction::COUNT],
}

/// One direction's line of [`TapCounters`]: 64 bytes, and the mapping the
/// agent reads is page-aligned, so it is one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionLine {
    /// ifindex of the tap that holds this slot; 0 while it is free.
    pub owner: u32,
    pub _pad: u32,
    /// Broadcast, then other (`class - class::BROADCAST`).
    pub common: [CounterValue; 2],
    pub _tail: [u64; 3],
}

impl TapCounters {
    /// The counter of one (direction, class); indices out of range wrap.
    #[inline(always)]
    pub fn value_mut(&mut self, direction: usize, class: u8) -> &mut CounterValue {
        let direction = direction % direction::COUNT;
        if class >= class::BROADCAST {
            &mut self.lines[direction].common[usize::from(class - class::BROADCAST) % 2]
        } else {
            &mut self.rare[direction][usize::from(class) % 2]
        }
    }

    /// The counts by (direction, class), without the owner.
    pub fn traffic(&self) -> TrafficCounters {
        let mut traffic = TrafficCounters::default();
        for (direction, row) in traffic.by_direction_class.iter_mut().enumerate() {
            let line = &self.lines[direction];
            row[usize::from(class::DHCP)] = self.rare[direction][0];
            row[usize::from(class::ARP)] = self.rare[direction][1];
            row[usize::from(class::BROADCAST)] = line.common[0];
            row[usize::from(class::OTHER)] = line.common[1];
        }
        traffic
    }
}

/// The mask that gives a tap its preferred counter slot (`ifindex & mask`)
/// among `slots`: the largest power of two that fits, minus one. The agent
/// and the tc programs (global SLOT_MASK) use the same one.
pub const fn slot_mask(slots: u32) -> u32 {
    if slots == 0 {
        0
    } else {
        (1u32 << (31 - slots.leading_zeros())) - 1
    }
}

/// ifindexes below this find their counter slot in the TAP_SLOT array (one
/// load on the packet path); higher ones (a node that has created 65536
/// interfaces since boot) in the TAP_SLOT_HIGH hash. Values in both are
/// slot + 1, so 0 (the array's default) means "no slot".
pub const SLOT_ARRAY_IFINDEXES: u32 = 65536;
/// (device, drop reason) pairs kept per tap.
pub const DROP_REASONS_PER_TAP: u32 = 8;

/// Slots of the MAP_UPDATE_FAILURES per-CPU array: inserts the kernel
/// refused (map full), per map, so a loss is counted, never silent.
pub mod map_slot {
    pub const VM_COUNTERS: u32 = 0;
    pub const DEQUEUED: u32 = 1;
    pub const DROPS: u32 = 2;
    pub const VHOST_RX: u32 = 3;
    pub const EVENTS_THROTTLED: u32 = 4;
    pub const COUNT: u32 = 5;
    /// Names as exported in `hvnet_agent_map_update_failures_total{map}`.
    pub const NAMES: [&str; COUNT as usize] = [
        "VM_COUNTERS",
        "DEQUEUED",
        "DROPS",
        "VHOST_RX",
        "EVENTS_THROTTLED",
    ];
}

/// Each tap's share of the event ring buffer: a token bucket per tap and
/// CPU, so one VM flooding DHCP or ARP cannot crowd out its neighbours'
/// events. DHCP and ARP of a healthy VM are a few frames a second.
pub mod event_budget {
    /// One event per this many nanoseconds, per tap and CPU (100/s).
    pub const INTERVAL_NS: u64 = 10_000_000;
    /// Events a tap may send at once after a quiet spell, per CPU.
    pub const BURST: u64 = 200;
}

const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 128);
const _: () = assert!(core::mem::size_of::<DirectionLine>() == 64);
const _: () = assert!(core::mem::size_of::<TapCounters>() == 192);
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);
const _: () = assert!(core::mem::size_of::<DevKey>() == 8);
const _: () = assert!(core::mem::size_of::<DropKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), Copy, made of integers only, and have
    // no implicit padding (sizes asserted above), so any byte pattern is valid.
    unsafe impl aya::Pod for super::CounterValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TapCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropKey {}
}

/// What a [`PacketEvent`] reports.
pub mod event_kind {
    /// A DHCP message crossed the tap's tc hook (direction says which way).
    pub const DHCP: u8 = 1;
    /// A DHCP message toward the VM was read by the VMM (dequeue tracepoint).
    pub const DHCP_DEQUEUED: u8 = 2;
    /// A DHCP message on the tap was dropped by the kernel (with a reason).
    pub const DHCP_DROPPED: u8 = 3;
    /// An ARP frame crossed the tap's tc hook.
    pub const ARP: u8 = 4;
    /// A DHCP message crossed a hop (bridge, bridge port, uplink); the
    /// direction is the hook ([`crate::hop_hook`]).
    pub const DHCP_HOP: u8 = 5;
}

/// Which tc hook of a hop saw a frame (a hop has no "toward the VM": the
/// same uplink carries every VM's traffic both ways).
pub mod hop_hook {
    /// Transmitted by the hop device.
    pub const EGRESS: u8 = 0;
    /// Received by the hop device.
    pub const INGRESS: u8 = 1;
}

/// Parse findings the kernel reports with a DHCP event (bit flags).
pub mod parse_flag {
    /// The magic cookie is not 99.130.83.99: not DHCP (plain BOOTP or junk).
    pub const BAD_COOKIE: u16 = 1 << 0;
    /// The frame ended inside the BOOTP header or an option.
    pub const TRUNCATED: u16 = 1 << 1;
    /// An option's length runs past the end of the frame.
    pub const OPTION_OVERFLOW: u16 = 1 << 2;
    /// More options than the parser walks (or no end option): stopped.
    pub const OPTION_LIMIT: u16 = 1 << 3;
    /// No message type option (53).
    pub const NO_MESSAGE_TYPE: u16 = 1 << 4;
    /// Option 52 (overload): further options live in sname/file, not parsed.
    pub const OVERLOAD: u16 = 1 << 5;
    /// A known option with a wrong length (e.g. lease time not 4 bytes).
    pub const BAD_OPTION_LENGTH: u16 = 1 << 6;
    /// The options go on past what the kernel copies
    /// ([`crate::dhcp_options::OPTIONS_CAPTURE`]): later options not read.
    pub const CAPTURE_LIMIT: u16 = 1 << 7;
}

/// Most DHCP options the option walk reads before giving up.
pub const MAX_DHCP_OPTIONS: usize = 40;

/// One DHCP or ARP observation from the kernel, fixed size, sent over the
/// EVENTS ring buffer. IPv4 addresses are in network order as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketEvent {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub dev: DevKey,
    /// One of [`event_kind`].
    pub kind: u8,
    /// One of [`direction`] (for DEQUEUED/DROPPED: always TO_VM or as seen).
    pub direction: u8,
    /// DHCP option 53, 0 if absent; ARP: the ARP opcode.
    pub msg_type: u8,
    /// BOOTP op (1 request, 2 reply).
    pub op: u8,
    pub xid: u32,
    pub ciaddr: [u8; 4],
    pub yiaddr: [u8; 4],
    /// Option 54.
    pub server_id: [u8; 4],
    /// Option 50.
    pub requested_ip: [u8; 4],
    /// IPv4 source/destination of the frame; ARP: sender/target protocol address.
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    /// Option 51, 0 if absent.
    pub lease_secs: u32,
    /// Kernel drop reason (DHCP_DROPPED only).
    pub drop_reason: u32,
    pub flags: u16,
    pub secs: u16,
    /// BOOTP chaddr; ARP: sender hardware address.
    pub chaddr: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 802.1Q VLAN id, 0 if untagged.
    pub vlan: u16,
    /// [`parse_flag`] bits.
    pub parse_flags: u16,
    /// The tunnel a hop saw the message in: `(kind << 24) | VNI`
    /// ([`hop::tunnel_kind`]), 0 if none.
    pub tunnel: u32,
}

const _: () = assert!(core::mem::size_of::<PacketEvent>() == 80);

#[cfg(feature = "user")]
mod event_pod {
    // SAFETY: repr(C), Copy, integers and byte arrays only, explicit padding.
    unsafe impl aya::Pod for super::PacketEvent {}
    // SAFETY: as above; the options capture is integers and a byte array.
    unsafe impl aya::Pod for super::dhcp_options::EventWithOptions {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_direction_and_class_has_its_own_counter() {
        let mut counters = TapCounters::default();
        let mut expected = TrafficCounters::default();
        let mut n = 1;
        for d in 0..direction::COUNT {
            for c in [class::DHCP, class::ARP, class::BROADCAST, class::OTHER] {
                let value = counters.value_mut(d, c);
                value.packets += n;
                value.bytes += 100 * n;
                expected.by_direction_class[d][usize::from(c)] = CounterValue {
                    packets: n,
                    bytes: 100 * n,
                };
                n += 1;
            }
        }
        assert_eq!(counters.traffic(), expected);
        // The owners are not counts.
        counters.lines[0].owner = 7;
        counters.lines[1].owner = 7;
        assert_eq!(counters.traffic(), expected);
    }

    #[test]
    fn the_common_classes_sit_in_their_direction_line() {
        let mut counters = TapCounters::default();
        let base = core::ptr::addr_of!(counters) as usize;
        for d in 0..direction::COUNT {
            for c in [class::BROADCAST, class::OTHER] {
                let at = core::ptr::addr_of!(*counters.value_mut(d, c)) as usize - base;
                assert_eq!(at / 64, d, "direction {d} class {c} at byte {at}");
            }
        }
        assert_eq!(core::mem::offset_of!(DirectionLine, owner), 0);
    }

    #[test]
    fn the_slot_mask_is_the_largest_power_of_two_that_fits() {
        assert_eq!(slot_mask(0), 0);
        assert_eq!(slot_mask(1), 0);
        assert_eq!(slot_mask(2), 1);
        assert_eq!(slot_mask(3), 1);
        assert_eq!(slot_mask(4096), 4095);
        assert_eq!(slot_mask(4097), 4095);
        assert_eq!(slot_mask(u32::MAX), (1 << 31) - 1);
    }
}
