use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    DevKey, DropKey, TapCounters, DROP_MAP_ENTRIES, MAX_MONITORED, SLOT_ARRAY_IFINDEXES,
};

/// Each monitored tap's counters ([`TapCounters`]): element
/// `slot * COUNTER_CPUS + cpu`, one copy per CPU so the hot path needs no
/// atomics. A plain array striped by CPU rather than a per-CPU array: it
/// can be mmapped (BPF_F_MMAPABLE), so the agent reads every tap's counters
/// each poll from shared memory, without a syscall or a kernel-side copy,
/// and writes the slot's owner there. The agent sizes it (taps x CPUs),
/// sums the CPUs and zeroes a slot before reuse.
#[map]
pub static VM_COUNTERS: Array<TapCounters> =
    Array::with_max_entries(MAX_MONITORED, tracer_common::BPF_F_MMAPABLE);

/// ifindex -> counter slot + 1 (0: not monitored), for ifindexes below
/// [`SLOT_ARRAY_IFINDEXES`], for the taps whose slot is not the one their
/// ifindex suggests (see [`TapCounters`]).
#[map]
pub static TAP_SLOT: Array<u32> = Array::with_max_entries(SLOT_ARRAY_IFINDEXES, 0);

/// ifindex -> counter slot + 1 for the rare higher ifindexes.
#[map]
pub static TAP_SLOT_HIGH: HashMap<u32, u32> = HashMap::with_max_entries(MAX_MONITORED, 0);

/// The taps the agent watches; the host-wide tracepoints ignore every
/// other device. Maintained by the agent on attach/detach.
#[map]
pub static MONITORED: HashMap<DevKey, u8> = HashMap::with_max_entries(MAX_MONITORED, 0);

/// One bit per ifindex below 65536 that a monitored tap has: the
/// host-wide tracepoints reject almost every other device with one array
/// lookup, before the reads and the hash lookup MONITORED needs.
#[map]
pub static MONITORED_IFINDEX: Array<u64> =
    Array::with_max_entries(tracer_common::IFINDEX_BITMAP_WORDS, 0);

/// The hops the agent follows DHCP through (the taps' bridges, their
/// ports, uplinks): kfree_skb reports a DHCP frame dropped on one. Kept
/// apart from MONITORED so that the dequeue tracepoint, which fires for
/// every socket read on the host, never pays for an uplink's traffic.
#[map]
pub static HOPS: HashMap<DevKey, u8> = HashMap::with_max_entries(tracer_common::MAX_HOPS, 0);

/// One bit per ifindex below 65536 of a monitored tap or a followed hop:
/// kfree_skb, which fires for every drop on the host, rejects every other
/// device with this one load (as MONITORED_IFINDEX does for taps alone).
#[map]
pub static DROP_IFINDEX: Array<u64> =
    Array::with_max_entries(tracer_common::IFINDEX_BITMAP_WORDS, 0);

/// Frames the VMM read from each monitored tap (the RX queue draining).
#[map]
pub static DEQUEUED: PerCpuHashMap<DevKey, u64> = PerCpuHashMap::with_max_entries(MAX_MONITORED, 0);

/// Frames the kernel dropped on a monitored tap, by drop reason.
#[map]
pub static DROPS: PerCpuHashMap<DropKey, u64> =
    PerCpuHashMap::with_max_entries(DROP_MAP_ENTRIES, 0);

/// tun_recvmsg calls (vhost-net's RX work) per monitored tap, where the
/// kernel lets the optional vhost probes attach.
#[map]
pub static VHOST_RX: PerCpuHashMap<DevKey, u64> = PerCpuHashMap::with_max_entries(MAX_MONITORED, 0);

pub const PERCPU_ERRORS_INDEX: u32 = 0;

/// Tracepoint hits on devices whose netns/ifindex could not be read (for
/// the agent's self-diagnosis): index 0 = probe read failures.
#[map]
pub static PROBE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// DHCP and ARP observations for the agent (fixed-size PacketEvents).
/// Never blocks: when full, the event is counted in EVENTS_LOST.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Inserts the kernel refused (map full), per map (see `map_slot`).
#[map]
pub static MAP_UPDATE_FAILURES: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(tracer_common::map_slot::COUNT, 0);

/// Each tap's event budget on this CPU: (credit in ns, last refill ns).
/// LRU: taps come and go, their ifindexes are not reused soon.
#[map]
pub static EVENT_BUDGET: LruPerCpuHashMap<u32, [u64; 2]> =
    LruPerCpuHashMap::with_max_entries(MAX_MONITORED, 0);

/// DHCP/ARP events a tap was over its budget for (not sent), per tap.
#[map]
pub static EVENTS_THROTTLED: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(MAX_MONITORED, 0);

/// Events that did not fit in the ring buffer.
#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
