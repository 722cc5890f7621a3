//! VM_COUNTERS through a shared mapping: every tap's counters, one copy
//! per CPU (element `slot * cpus + cpu`), read each poll straight from
//! the memory the tc programs count into. At 2000 taps a batch lookup
//! syscall copied ~0.5 MB through the kernel every second; reading the
//! mapping costs no syscall and no kernel time.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Array, IterableMap, MapData};
use tracer_common::TrafficCounters;

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
    _map: Array<MapData, TrafficCounters>,
    base: NonNull<TrafficCounters>,
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
    pub fn new(map: Array<MapData, TrafficCounters>, cpus: u32) -> Result<Self, CounterArrayError> {
        let entries = map.len();
        if cpus == 0 || !entries.is_multiple_of(cpus) {
            return Err(CounterArrayError::Shape { entries, cpus });
        }
        // The kernel lays elements out 8-byte aligned from the mapping's
        // start; TrafficCounters is a whole number of u64s.
        const _: () = assert!(std::mem::size_of::<TrafficCounters>().is_multiple_of(8));
        let mapped_len = entries as usize * std::mem::size_of::<TrafficCounters>();
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
        let base = NonNull::new(addr.cast::<TrafficCounters>())
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

    fn copies(&self, slot: u32) -> Option<*mut TrafficCounters> {
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
            unsafe { std::ptr::read_volatile(first.add(cpu)) }
        })))
    }

    /// Zeroes a slot's copies before it is handed to another tap (nothing
    /// counts into it meanwhile: no tap points at it).
    pub fn zero(&mut self, slot: u32) -> bool {
        let Some(first) = self.copies(slot) else {
            return false;
        };
        for cpu in 0..self.cpus as usize {
            // SAFETY: inside the mapping, aligned, writable.
            unsafe { std::ptr::write_volatile(first.add(cpu), TrafficCounters::default()) };
        }
        true
    }
}

impl Drop for CounterArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
    }
}
