//! Types shared by the eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has no `bool` (the kernel has no
//! such type) and carries explicit padding, so both sides agree on the layout
//! byte for byte. Sizes are asserted at compile time.
#![no_std]

pub mod classify;

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

/// Key of the per-CPU packet counter map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Interface index in the agent's network namespace.
    pub ifindex: u32,
    /// One of [`direction`].
    pub direction: u8,
    /// One of [`class`].
    pub class: u8,
    pub _pad: [u8; 2],
}

/// Value of the per-CPU packet counter map (one per CPU, summed by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// A network device, unique on the host: ifindex is only unique within a
/// network namespace, so the namespace's inode number is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Most monitored devices (taps) per host.
pub const MAX_MONITORED: u32 = 4096;
/// Distinct (device, drop reason) pairs tracked.
pub const DROP_MAP_ENTRIES: u32 = MAX_MONITORED * 8;

/// Most (ifindex, direction, class) keys the counter map holds: 2048 taps.
pub const COUNTER_MAP_ENTRIES: u32 = 2048 * (direction::COUNT * class::COUNT) as u32;

const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);
const _: () = assert!(core::mem::size_of::<DevKey>() == 8);
const _: () = assert!(core::mem::size_of::<DropKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), Copy, made of integers only, and have
    // no implicit padding (sizes asserted above), so any byte pattern is valid.
    unsafe impl aya::Pod for super::CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CounterValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropKey {}
}
