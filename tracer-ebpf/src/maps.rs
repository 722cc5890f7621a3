use aya_ebpf::{macros::map, maps::PerCpuHashMap};
use tracer_common::{CounterKey, CounterValue, COUNTER_MAP_ENTRIES};

/// Packets and bytes per (ifindex, direction, class), one slot per CPU so
/// the hot path needs no atomics. The agent sums the CPUs at scrape time.
#[map]
pub static VM_COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::with_max_entries(COUNTER_MAP_ENTRIES, 0);
