//! Reading kernel structs without CO-RE: the agent resolves member offsets
//! from this kernel's BTF and sets these globals before loading.
//!
//! The globals live in `.rodata`, which aya freezes read-only: the verifier
//! then knows each offset as a constant, so a BTF-typed program (tp_btf,
//! fentry) may read `skb + SKB_DEV_OFF` with a plain load that it checks
//! against the kernel's own struct layout. Two ways to read, one code path:
//! [`DirectLoad`] for BTF-typed programs, [`ProbeRead`] for the rest.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tracer_common::{frame::FrameBytes, DevKey};

use aya_ebpf::maps::{Array, HashMap};

use crate::maps::{
    DROP_IFINDEX, HOPS, MONITORED, MONITORED_IFINDEX, PERCPU_ERRORS_INDEX, PROBE_ERRORS,
};

#[unsafe(no_mangle)]
static SKB_DEV_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKB_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKB_LEN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SK_FAMILY_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKB_DATA_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKB_DATA_LEN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static DEV_IFINDEX_OFF: u32 = 0;
#[unsafe(no_mangle)]
static DEV_NET_OFF: u32 = 0;
#[unsafe(no_mangle)]
static NET_INUM_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TFILE_SOCKET_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TFILE_TUN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TUN_DEV_OFF: u32 = 0;

/// Reads a load-time global (volatile: the compiler must not fold the 0).
#[inline(always)]
pub fn global(value: &u32) -> u64 {
    // SAFETY: reading our own static.
    u64::from(unsafe { core::ptr::read_volatile(value) })
}

#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one is an
    // error, never a fault.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// How a program reads a kernel struct member.
pub trait KernelMemory {
    fn read<T: Copy>(addr: u64) -> Option<T>;
}

/// bpf_probe_read_kernel: any program type, any address. A helper call
/// each (about 20 ns here), which on a hook that fires for every socket
/// read on the host is most of the cost of rejecting a non-tap skb.
pub struct ProbeRead;

impl KernelMemory for ProbeRead {
    #[inline(always)]
    fn read<T: Copy>(addr: u64) -> Option<T> {
        read::<T>(addr)
    }
}

/// A plain load, for BTF-typed programs only (tp_btf, fentry): the
/// verifier follows the pointer's BTF type through each constant offset
/// and makes the load fault-safe (BPF_PROBE_MEM: a bad pointer reads 0).
pub struct DirectLoad;

impl KernelMemory for DirectLoad {
    #[inline(always)]
    fn read<T: Copy>(addr: u64) -> Option<T> {
        // SAFETY: only reached from BTF-typed programs, where the verifier
        // checked this access against the struct's BTF and the kernel
        // handles a fault (the value reads as 0).
        Some(unsafe { core::ptr::read_volatile(addr as *const T) })
    }
}

#[inline(always)]
fn note_read_error() {
    if let Some(slot) = PROBE_ERRORS.get_ptr_mut(PERCPU_ERRORS_INDEX) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

/// The (netns, ifindex) of a net_device if the agent monitors it as a tap.
#[inline(always)]
pub fn monitored_device<M: KernelMemory>(dev: u64) -> Option<DevKey> {
    let ifindex = device_ifindex::<M>(dev)?;
    member::<M>(dev, ifindex, &MONITORED_IFINDEX, &MONITORED)
}

/// A device the agent knows, and whether it is a tap or a hop.
pub enum Known {
    Tap(DevKey),
    Hop(DevKey),
}

/// A tap or a hop, one read of the ifindex and one bitmap load for any
/// other device; taps are told from hops by their own bitmap.
#[inline(always)]
pub fn known_device<M: KernelMemory>(dev: u64) -> Option<Known> {
    let ifindex = device_ifindex::<M>(dev)?;
    if !maybe_in(&DROP_IFINDEX, ifindex) {
        return None;
    }
    if maybe_in(&MONITORED_IFINDEX, ifindex) {
        if let Some(key) = in_set::<M>(dev, ifindex, &MONITORED) {
            return Some(Known::Tap(key));
        }
    }
    in_set::<M>(dev, ifindex, &HOPS).map(Known::Hop)
}

#[inline(always)]
fn device_ifindex<M: KernelMemory>(dev: u64) -> Option<u32> {
    if dev == 0 {
        return None;
    }
    let ifindex = M::read::<u32>(dev + global(&DEV_IFINDEX_OFF));
    if ifindex.is_none() {
        note_read_error();
    }
    ifindex
}

/// Whether (netns of `dev`, ifindex) is in `set`; the bitmap rejects
/// almost every other device with one array load, before the reads and
/// the hash lookup.
#[inline(always)]
fn member<M: KernelMemory>(
    dev: u64,
    ifindex: u32,
    bitmap: &Array<u64>,
    set: &HashMap<DevKey, u8>,
) -> Option<DevKey> {
    if !maybe_in(bitmap, ifindex) {
        return None;
    }
    in_set::<M>(dev, ifindex, set)
}

/// False when the bitmap rules the ifindex out; true when its bit is set
/// or the ifindex is past the bitmap (the hash decides then).
#[inline(always)]
fn maybe_in(bitmap: &Array<u64>, ifindex: u32) -> bool {
    if ifindex >= tracer_common::IFINDEX_BITMAP_WORDS * 64 {
        return true;
    }
    let word = bitmap.get(ifindex / 64).copied().unwrap_or(0);
    word & (1u64 << (ifindex % 64)) != 0
}

#[inline(always)]
fn in_set<M: KernelMemory>(dev: u64, ifindex: u32, set: &HashMap<DevKey, u8>) -> Option<DevKey> {
    let net = M::read::<u64>(dev + global(&DEV_NET_OFF))?;
    let netns = M::read::<u32>(net + global(&NET_INUM_OFF))?;
    let key = DevKey { netns, ifindex };
    // SAFETY: the value is only checked for presence.
    unsafe { set.get(key) }.map(|_| key)
}

/// The monitored device an sk_buff belongs to.
#[inline(always)]
pub fn skb_device<M: KernelMemory>(skb: u64) -> Option<DevKey> {
    monitored_device::<M>(skb_dev::<M>(skb)?)
}

/// An sk_buff's net_device pointer.
#[inline(always)]
pub fn skb_dev<M: KernelMemory>(skb: u64) -> Option<u64> {
    M::read::<u64>(skb + global(&SKB_DEV_OFF))
}

#[inline(always)]
pub fn skb_owner<M: KernelMemory>(skb: u64) -> Option<u64> {
    M::read::<u64>(skb + global(&SKB_SK_OFF))
}

/// A frame in kernel memory (an sk_buff's linear data) seen from a tracepoint.
pub struct KernelFrame {
    pub data: u64,
    pub len: usize,
}

impl FrameBytes for KernelFrame {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if offset + N > self.len {
            return None;
        }
        read::<[u8; N]>(self.data + offset as u64)
    }
}

/// The linear part of an sk_buff (where the frame's headers are), capped
/// at one Ethernet frame: enough for any DHCP header.
#[inline(always)]
pub fn skb_linear_frame<M: KernelMemory>(skb: u64) -> Option<KernelFrame> {
    let data = M::read::<u64>(skb + global(&SKB_DATA_OFF))?;
    let len = M::read::<u32>(skb + global(&SKB_LEN_OFF))?;
    let paged = M::read::<u32>(skb + global(&SKB_DATA_LEN_OFF))?;
    let linear = len.saturating_sub(paged).min(1518);
    Some(KernelFrame {
        data,
        len: linear as usize,
    })
}

/// The address family of a socket (sk->__sk_common.skc_family).
#[inline(always)]
pub fn socket_family<M: KernelMemory>(sk: u64) -> Option<u16> {
    M::read::<u16>(sk + global(&SK_FAMILY_OFF))
}

#[inline(always)]
pub fn skb_len<M: KernelMemory>(skb: u64) -> Option<u32> {
    M::read::<u32>(skb + global(&SKB_LEN_OFF))
}

/// The tap behind tun_recvmsg's `struct socket *` (embedded in a tun_file).
#[inline(always)]
pub fn tun_socket_device(sock: u64) -> Option<DevKey> {
    let tfile = sock.checked_sub(global(&TFILE_SOCKET_OFF))?;
    let tun = read::<u64>(tfile + global(&TFILE_TUN_OFF))?;
    if tun == 0 {
        return None;
    }
    monitored_device::<ProbeRead>(read::<u64>(tun + global(&TUN_DEV_OFF))?)
}

/// Counts an insert the kernel refused (the map is full) in slot `slot`.
#[inline(always)]
pub fn note_update_failure(slot: u32) {
    if let Some(count) = crate::maps::MAP_UPDATE_FAILURES.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *count += 1 };
    }
}

/// Adds one to a per-CPU u64 counter keyed by `key`; a refused insert is
/// counted in MAP_UPDATE_FAILURES slot `$slot`.
#[macro_export]
macro_rules! bump {
    ($map:expr, $key:expr, $slot:expr) => {
        match $map.get_ptr_mut($key) {
            // SAFETY: this CPU's slot of a live map element.
            Some(value) => unsafe { *value += 1 },
            None => {
                if $map.insert($key, 1u64, 0).is_err() {
                    $crate::programs::kernel::note_update_failure($slot);
                }
            }
        }
    };
}
