//! VM_COUNTERS through a shared mapping: every tap's counters, one copy
//! per CPU (element `slot * cpus + cpu`), read each poll straight from
//! the memory the tc programs count into, and each slot's owner written
//! there. At 2000 taps a batch lookup
//! syscall copied ~0.5 MB through the kernel every second; reading the
//! mapping costs no syscall and no kernel time.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Array, IterableMap, MapData};
use tracer_common::{TapCounters, TrafficCounters};

use crate::kernel::collect::sum_cpus;

#[derive(Debug, thiserror::Error)]
pub enum CounterArrayError {
    #[error("possible CPUs ({path}): {reason}")]
    Cpus { path: &'static str, reason: String },
    #[error("VM_COUNTERS holds {entries} elements, not a whole number of slots of {cpus} CPUs")]
    Shape { entries: u32, cpus: u32 },
    #[error("mapping VM_COUNTERS into memory: {0}")]
    Mmap(std::io::Error),
}

/// The number of possible CPUs: how many copies each slot has. The same
/// count the kernel sizes per-CPU maps by; every CPU id is below it.
pub fn counter_cpus() -> Result<u32, CounterArrayError> {
    let cpus = aya::util::nr_cpus().map_err(|(path, err)| CounterArrayError::Cpus {
        path,
        reason: err.to_string(),
    })?;
    u32::try_from(cpus).map_err(|_| CounterArrayError::Cpus {
        path: "/sys/devices/system/cpu/possible",
        reason: format!("{cpus} CPUs"),
    })
}

/// The counter array, mapped read-write (a reused slot is zeroed through
/// the mapping).
pub struct CounterArray {
    /// Keeps the map alive for as long as the mapping is used.
    _map: Array<MapData, TapCounters>,
    base: NonNull<TapCounters>,
    mapped_len: usize,
    cpus: u32,
    slots: u32,
}

// SAFETY: the mapping is owned by this value alone and unmapped only on
// drop; reads through `&self` are volatile loads of memory the kernel also
// writes (aligned u64s: never torn), writes need `&mut self`.
unsafe impl Send for CounterArray {}
// SAFETY: see Send; shared references only read.
unsafe impl Sync for CounterArray {}

impl CounterArray {
    /// Maps `map` (created with BPF_F_MMAPABLE, `slots * cpus` elements).
    pub fn new(map: Array<MapData, TapCounters>, cpus: u32) -> Result<Self, CounterArrayError> {
        let entries = map.len();
        if cpus == 0 || !entries.is_multiple_of(cpus) {
            return Err(CounterArrayError::Shape { entries, cpus });
        }
        // The kernel lays elements out 8-byte aligned from the mapping's
        // start; TapCounters is a whole number of cache lines (so each
        // direction's line is one).
        const _: () = assert!(std::mem::size_of::<TapCounters>().is_multiple_of(64));
        let mapped_len = entries as usize * std::mem::size_of::<TapCounters>();
        // SAFETY: a fresh shared mapping of the map's fd, of the array's
        // value area (which the kernel page-aligns); checked for failure.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(CounterArrayError::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<TapCounters>())
            .ok_or_else(|| CounterArrayError::Mmap(std::io::Error::other("mmap returned null")))?;
        Ok(Self {
            _map: map,
            base,
            mapped_len,
            cpus,
            slots: entries / cpus,
        })
    }

    /// How many taps the array has room for.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn copies(&self, slot: u32) -> Option<*mut TapCounters> {
        if slot >= self.slots {
            return None;
        }
        // SAFETY: slot * cpus + cpus <= entries: inside the mapping.
        Some(unsafe { self.base.as_ptr().add(slot as usize * self.cpus as usize) })
    }

    /// One slot's counters, summed over the CPUs; None past the array.
    pub fn read(&self, slot: u32) -> Option<TrafficCounters> {
        let first = self.copies(slot)?;
        Some(sum_cpus((0..self.cpus as usize).map(|cpu| {
            // SAFETY: inside the mapping (see `copies`), aligned; the
            // kernel may be adding to it: a volatile copy of u64 fields.
            unsafe { std::ptr::read_volatile(first.add(cpu)) }.traffic()
        })))
    }

    /// Hands a slot to the tap `ifindex`: its copies zeroed (the last
    /// tap's counts must not become this one's), then owned by it, which
    /// is what lets the tc programs count there. Nothing counts into the
    /// slot meanwhile: its owner was cleared when it was freed.
    pub fn claim(&mut self, slot: u32, ifindex: u32) -> bool {
        let Some(first) = self.copies(slot) else {
            return false;
        };
        for cpu in 0..self.cpus as usize {
            // SAFETY: inside the mapping, aligned, writable.
            unsafe { std::ptr::write_volatile(first.add(cpu), TapCounters::default()) };
        }
        // The zeroes before the owner: a program that sees the owner must
        // count on top of zero, never be overwritten by it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.set_owner(first, ifindex);
        true
    }

    /// Frees a slot: the tc programs stop counting there at once (a
    /// program still attached to the old tap finds no slot and counts the
    /// frame as lost). Its counts stay until it is claimed again.
    pub fn release(&mut self, slot: u32) {
        if let Some(first) = self.copies(slot) {
            self.set_owner(first, 0);
        }
    }

    fn set_owner(&mut self, first: *mut TapCounters, owner: u32) {
        for cpu in 0..self.cpus as usize {
            for direction in 0..tracer_common::direction::COUNT {
                // SAFETY: inside the mapping (first is a slot's first copy
                // from `copies`), aligned, writable; a u32 store is atomic
                // on every target hvnet runs on.
                unsafe {
                    let line = std::ptr::addr_of_mut!((*first.add(cpu)).lines[direction].owner);
                    std::ptr::write_volatile(line, owner);
                }
            }
        }
    }
}

impl Drop for CounterArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}
