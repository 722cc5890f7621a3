//! Reads the first elements of a per-CPU array in one `BPF_MAP_LOOKUP_BATCH`
//! call (aya has no batch operations). The counter array is read every
//! poll; one lookup syscall per tap was most of the agent's idle CPU at
//! 2000 taps.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{IterableMap, MapData, PerCpuArray},
    Pod,
};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("BPF_MAP_LOOKUP_BATCH: {0}")]
    Syscall(std::io::Error),
    #[error("possible CPUs: {0}")]
    Cpus(String),
    #[error("the kernel returned {got} elements, {wanted} asked")]
    Short { got: u32, wanted: u32 },
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements `0..count` of `array`, each as its per-CPU copies
/// (`result[index][cpu]`). Errors when the kernel has no batch operations
/// for arrays (before 5.6): the caller falls back to single lookups.
pub fn read_per_cpu<V: Pod + Default>(
    array: &PerCpuArray<MapData, V>,
    count: u32,
) -> Result<Vec<Vec<V>>, BatchError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| BatchError::Cpus(e.to_string()))?;
    // The kernel lays out each element's copies 8-byte aligned.
    let stride = std::mem::size_of::<V>().next_multiple_of(8);
    let elements = count as usize;
    let mut values = vec![0u64; elements * cpus * stride / 8];
    let mut keys = vec![0u32; elements];
    let mut next_key = 0u32;
    let mut attr = BatchAttr {
        out_batch: std::ptr::from_mut(&mut next_key) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: array.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at buffers sized for `count` keys and values of
    // this map's value size on every possible CPU; they outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        // ENOENT: the walk reached the end of the array; `count` says how
        // far it got.
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(BatchError::Syscall(err));
        }
    }
    if attr.count != count {
        return Err(BatchError::Short {
            got: attr.count,
            wanted: count,
        });
    }
    let bytes: &[u8] = as_bytes(&values);
    Ok((0..elements)
        .map(|element| {
            (0..cpus)
                .map(|cpu| {
                    let at = (element * cpus + cpu) * stride;
                    // SAFETY: `at + size_of::<V>()` is within `values`
                    // (sized above); V is Pod (any bytes are a value) and
                    // read_unaligned copes with any alignment.
                    unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast::<V>()) }
                })
                .collect()
        })
        .collect())
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; the byte view covers exactly the same
    // memory and lives as long as the borrow.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}
