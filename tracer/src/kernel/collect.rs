//! Reads hvnet's kernel maps into per-interface totals, and keeps the
//! MONITORED map (which taps the host-wide tracepoints care about) in step
//! with the attachments.

use std::collections::BTreeMap;

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    Ebpf,
};
use tracer_common::{map_slot, DevKey, DropKey, SLOT_ARRAY_IFINDEXES};

use crate::kernel::{counter_array::CounterArray, slot_table::SlotTable};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("map {map} missing from the eBPF object or of the wrong type: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("reading map {map}: {reason}")]
    Read { map: &'static str, reason: String },
    #[error("updating the MONITORED map: {0}")]
    Monitor(String),
    #[error("no counter slot free: all {0} are held by monitored taps (max_interfaces)")]
    NoSlot(u32),
    #[error("giving ifindex {ifindex} counter slot {slot}: {reason}")]
    Slot {
        ifindex: u32,
        slot: u32,
        reason: String,
    },
}

pub use tracer_common::TrafficCounters;

/// Sums one tap's per-CPU copies. Each copy only grows, so the sum is the
/// total.
pub fn sum_cpus(copies: impl IntoIterator<Item = TrafficCounters>) -> TrafficCounters {
    copies
        .into_iter()
        .fold(TrafficCounters::default(), |mut acc, copy| {
            acc.accumulate(&copy);
            acc
        })
}

/// Everything the kernel side counted, for this agent's netns, by ifindex.
#[derive(Debug, Clone, Default)]
pub struct KernelSnapshot {
    pub traffic: BTreeMap<u32, TrafficCounters>,
    /// Frames the VMM read from the tap (dequeue tracepoint).
    pub dequeued: BTreeMap<u32, u64>,
    /// Drops by kernel drop reason number.
    pub drops: BTreeMap<u32, BTreeMap<u32, u64>>,
    /// tun_recvmsg calls (vhost-net RX work), where the probe attached.
    pub vhost_rx: BTreeMap<u32, u64>,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Maps that could not be read this time, with why: their part of the
    /// snapshot is empty and must not be shown as zero.
    pub unreadable: Vec<(&'static str, String)>,
    /// DHCP/ARP events not sent because the tap was over its budget.
    pub events_throttled: BTreeMap<u32, u64>,
    /// Inserts the kernel refused, per map (None: unreadable).
    pub map_update_failures: Option<[u64; map_slot::COUNT as usize]>,
    /// Failed kernel memory reads in the tracepoints (None: unreadable).
    pub probe_read_errors: Option<u64>,
}

/// The maps a snapshot is read from (for per-map read status).
pub const SNAPSHOT_MAPS: [&str; 5] = [
    "VM_COUNTERS",
    "DEQUEUED",
    "DROPS",
    "VHOST_RX",
    "EVENTS_LOST",
];

impl KernelSnapshot {
    pub fn readable(&self, map: &str) -> bool {
        !self.unreadable.iter().any(|(name, _)| *name == map)
    }
}

/// hvnet's maps, owned by the agent.
pub struct KernelMaps {
    netns: u32,
    counters: CounterArray,
    tap_slot: Array<MapData, u32>,
    tap_slot_high: HashMap<MapData, u32, u32>,
    slots: SlotTable,
    monitored: HashMap<MapData, DevKey, u8>,
    monitored_ifindex: Array<MapData, u64>,
    hops: HashMap<MapData, DevKey, u8>,
    /// Taps and hops: the drop tracepoint's first filter.
    drop_ifindex: Array<MapData, u64>,
    dequeued: PerCpuHashMap<MapData, DevKey, u64>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    vhost_rx: PerCpuHashMap<MapData, DevKey, u64>,
    events_lost: PerCpuArray<MapData, u64>,
    update_failures: PerCpuArray<MapData, u64>,
    probe_errors: PerCpuArray<MapData, u64>,
    throttled: PerCpuHashMap<MapData, u32, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CollectError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| CollectError::Map {
        map: name,
        reason: "missing".into(),
    })?;
    T::try_from(map).map_err(|e| CollectError::Map {
        map: name,
        reason: e.to_string(),
    })
}

fn read_u64_map<K: aya::Pod + Ord>(
    map: &PerCpuHashMap<MapData, K, u64>,
    name: &'static str,
) -> Result<Vec<(K, u64)>, CollectError> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok((key, per_cpu)) => out.push((key, sum_u64(&per_cpu))),
            // Deleted between the key walk and the lookup: skip it.
            Err(MapError::KeyNotFound) => continue,
            Err(err) => {
                return Err(CollectError::Read {
                    map: name,
                    reason: err.to_string(),
                })
            }
        }
    }
    Ok(out)
}

fn sum_u64(values: &PerCpuValues<u64>) -> u64 {
    values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v))
}

impl KernelMaps {
    /// Takes the maps out of the loaded object. `netns` is the inode number
    /// of the agent's network namespace (tracepoints see every namespace);
    /// `cpus` the copies per counter slot the programs were loaded with.
    pub fn take(ebpf: &mut Ebpf, netns: u32, cpus: u32) -> Result<Self, CollectError> {
        let counters =
            CounterArray::new(take(ebpf, "VM_COUNTERS")?, cpus).map_err(|e| CollectError::Map {
                map: "VM_COUNTERS",
                reason: e.to_string(),
            })?;
        let slots = SlotTable::new(counters.slots());
        Ok(Self {
            netns,
            counters,
            tap_slot: take(ebpf, "TAP_SLOT")?,
            tap_slot_high: take(ebpf, "TAP_SLOT_HIGH")?,
            slots,
            monitored: take(ebpf, "MONITORED")?,
            monitored_ifindex: take(ebpf, "MONITORED_IFINDEX")?,
            hops: take(ebpf, "HOPS")?,
            drop_ifindex: take(ebpf, "DROP_IFINDEX")?,
            dequeued: take(ebpf, "DEQUEUED")?,
            drops: take(ebpf, "DROPS")?,
            vhost_rx: take(ebpf, "VHOST_RX")?,
            events_lost: take(ebpf, "EVENTS_LOST")?,
            update_failures: take(ebpf, "MAP_UPDATE_FAILURES")?,
            probe_errors: take(ebpf, "PROBE_ERRORS")?,
            throttled: take(ebpf, "EVENTS_THROTTLED")?,
        })
    }

    fn dev(&self, ifindex: u32) -> DevKey {
        DevKey {
            netns: self.netns,
            ifindex,
        }
    }

    /// Gives this interface a zeroed counter slot and makes the host-wide
    /// probes count it. Called before its tc programs attach, so its first
    /// frame is counted.
    pub fn monitor(&mut self, ifindex: u32) -> Result<(), CollectError> {
        self.give_slot(ifindex)?;
        let key = self.dev(ifindex);
        // The shortcut bit first: a tap in MONITORED but not in the bitmap
        // would be missed, the reverse only costs the full check.
        self.set_ifindex_bit(ifindex, true)?;
        self.monitored
            .insert(key, 1, 0)
            .map_err(|e| CollectError::Monitor(e.to_string()))
    }

    fn give_slot(&mut self, ifindex: u32) -> Result<(), CollectError> {
        let capacity = self.counters.slots();
        let (slot, fresh) = self
            .slots
            .assign(ifindex)
            .ok_or(CollectError::NoSlot(capacity))?;
        let failed = |reason: String| CollectError::Slot {
            ifindex,
            slot,
            reason,
        };
        // A fresh slot: zeroed and made this tap's (see CounterArray::claim).
        if fresh && !self.counters.claim(slot, ifindex) {
            self.slots.release(ifindex);
            return Err(failed("past the counter array".into()));
        }
        let written = if ifindex < SLOT_ARRAY_IFINDEXES {
            self.tap_slot.set(ifindex, slot + 1, 0)
        } else {
            self.tap_slot_high.insert(ifindex, slot + 1, 0)
        };
        written.map_err(|err| {
            // Not this tap's after all: nothing may count there for it.
            if let Some(slot) = self.slots.release(ifindex) {
                self.counters.release(slot);
            }
            failed(err.to_string())
        })
    }

    /// Stops the tc programs counting for this ifindex and frees its slot.
    fn take_slot(&mut self, ifindex: u32) {
        let Some(slot) = self.slots.release(ifindex) else {
            return;
        };
        self.counters.release(slot);
        if ifindex < SLOT_ARRAY_IFINDEXES {
            let _ = self.tap_slot.set(ifindex, 0, 0);
        } else {
            let _ = self.tap_slot_high.remove(&ifindex);
        }
    }

    /// A tap's bits: the tracepoints' filter, and the drop filter's.
    fn set_ifindex_bit(&mut self, ifindex: u32, on: bool) -> Result<(), CollectError> {
        set_bit(&mut self.drop_ifindex, ifindex, on)?;
        set_bit(&mut self.monitored_ifindex, ifindex, on)
    }

    /// Makes kfree_skb report DHCP frames dropped on this hop (its tc
    /// programs report the ones that cross it). Hops have no counter slot.
    pub fn follow_hop(&mut self, ifindex: u32) -> Result<(), CollectError> {
        set_bit(&mut self.drop_ifindex, ifindex, true)?;
        let key = self.dev(ifindex);
        self.hops
            .insert(key, 1, 0)
            .map_err(|e| CollectError::Monitor(e.to_string()))
    }

    /// Stops following a hop.
    pub fn forget_hop(&mut self, ifindex: u32) {
        let _ = set_bit(&mut self.drop_ifindex, ifindex, false);
        let dev = self.dev(ifindex);
        let _ = self.hops.remove(&dev);
        let _ = self.throttled.remove(&ifindex);
    }

    /// Every monitored tap's counters, read from the shared mapping.
    fn read_traffic(&self) -> Result<BTreeMap<u32, TrafficCounters>, CollectError> {
        self.slots
            .iter()
            .map(|(ifindex, slot)| {
                self.counters
                    .read(slot)
                    .map(|counters| (ifindex, counters))
                    .ok_or_else(|| CollectError::Read {
                        map: "VM_COUNTERS",
                        reason: format!("slot {slot} past the array"),
                    })
            })
            .collect()
    }

    /// Reads every map; a map that cannot be read is listed in
    /// `unreadable` and the rest is still returned (one bad read must not
    /// blank a whole scrape).
    pub fn read(&self) -> KernelSnapshot {
        let mut unreadable = Vec::new();
        let mut note = |err: CollectError| {
            if let CollectError::Read { map, reason } = err {
                unreadable.push((map, reason));
            }
        };
        let traffic = match self.read_traffic() {
            Ok(traffic) => traffic,
            Err(err) => {
                note(err);
                BTreeMap::new()
            }
        };
        let ours = |dev: &DevKey| dev.netns == self.netns;
        let mut drops: BTreeMap<u32, BTreeMap<u32, u64>> = BTreeMap::new();
        match read_u64_map(&self.drops, "DROPS") {
            Ok(pairs) => {
                for (key, count) in pairs {
                    if ours(&key.dev) {
                        *drops
                            .entry(key.dev.ifindex)
                            .or_default()
                            .entry(key.reason)
                            .or_default() += count;
                    }
                }
            }
            Err(err) => note(err),
        }
        let by_ifindex = |pairs: Vec<(DevKey, u64)>| {
            pairs
                .into_iter()
                .filter(|(dev, _)| ours(dev))
                .map(|(dev, count)| (dev.ifindex, count))
                .collect()
        };
        let dequeued = read_u64_map(&self.dequeued, "DEQUEUED")
            .map(by_ifindex)
            .unwrap_or_else(|err| {
                note(err);
                BTreeMap::new()
            });
        let vhost_rx = read_u64_map(&self.vhost_rx, "VHOST_RX")
            .map(by_ifindex)
            .unwrap_or_else(|err| {
                note(err);
                BTreeMap::new()
            });
        let events_lost = self
            .events_lost
            .get(&0, 0)
            .map(|per_cpu| sum_u64(&per_cpu))
            .unwrap_or_else(|e| {
                note(CollectError::Read {
                    map: "EVENTS_LOST",
                    reason: e.to_string(),
                });
                0
            });
        let mut update_failures = [0u64; map_slot::COUNT as usize];
        let mut failures_read = true;
        for (slot, total) in (0u32..).zip(update_failures.iter_mut()) {
            match self.update_failures.get(&slot, 0) {
                Ok(per_cpu) => *total = sum_u64(&per_cpu),
                Err(_) => failures_read = false,
            }
        }
        let probe_read_errors = self.probe_errors.get(&0, 0).ok().map(|v| sum_u64(&v));
        let events_throttled = read_u64_map(&self.throttled, "EVENTS_THROTTLED")
            .map(|pairs| pairs.into_iter().collect())
            .unwrap_or_else(|err| {
                note(err);
                BTreeMap::new()
            });
        KernelSnapshot {
            traffic,
            dequeued,
            drops,
            vhost_rx,
            events_lost,
            unreadable,
            map_update_failures: failures_read.then_some(update_failures),
            probe_read_errors,
            events_throttled,
        }
    }

    /// Removes every trace of these interfaces from the maps: one pass over
    /// the maps keyed by more than the interface, however many interfaces
    /// (a node starting with 2000 taps, or an evacuation removing them all,
    /// must not walk the maps once per tap).
    pub fn forget_interfaces(&mut self, ifindexes: &[u32]) {
        if ifindexes.is_empty() {
            return;
        }
        let devs: std::collections::HashSet<DevKey> =
            ifindexes.iter().map(|i| self.dev(*i)).collect();
        for &ifindex in ifindexes {
            self.take_slot(ifindex);
            let dev = self.dev(ifindex);
            let _ = self.monitored.remove(&dev);
            let _ = self.set_ifindex_bit(ifindex, false);
            let _ = self.dequeued.remove(&dev);
            let _ = self.vhost_rx.remove(&dev);
            let _ = self.throttled.remove(&ifindex);
        }
        let drop_keys: Vec<DropKey> = self
            .drops
            .keys()
            .filter_map(Result::ok)
            .filter(|k| devs.contains(&k.dev))
            .collect();
        for key in &drop_keys {
            let _ = self.drops.remove(key);
        }
    }
}

/// Sets or clears one ifindex's bit in a device bitmap (ifindexes past
/// the bitmap take the hash lookup alone).
fn set_bit(bitmap: &mut Array<MapData, u64>, ifindex: u32, on: bool) -> Result<(), CollectError> {
    if ifindex >= tracer_common::IFINDEX_BITMAP_WORDS * 64 {
        return Ok(());
    }
    let index = ifindex / 64;
    let bit = 1u64 << (ifindex % 64);
    let word = bitmap
        .get(&index, 0)
        .map_err(|e| CollectError::Monitor(e.to_string()))?;
    let word = if on { word | bit } else { word & !bit };
    bitmap
        .set(index, word, 0)
        .map_err(|e| CollectError::Monitor(e.to_string()))
}

/// The inode number of this process's network namespace, as the kernel's
/// `net->ns.inum` holds it.
pub fn current_netns_inum() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/net")?.ino();
    u32::try_from(ino).map_err(|_| std::io::Error::other("netns inode does not fit 32 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use tracer_common::{class, direction, CounterValue};

    #[test]
    fn cpus_are_summed_per_direction_and_class() {
        let mut cpu0 = TrafficCounters::default();
        cpu0.by_direction_class[0][usize::from(class::DHCP)] = CounterValue {
            packets: 2,
            bytes: 120,
        };
        let mut cpu1 = TrafficCounters::default();
        cpu1.by_direction_class[0][usize::from(class::DHCP)] = CounterValue {
            packets: 3,
            bytes: 180,
        };
        cpu1.by_direction_class[1][usize::from(class::ARP)] = CounterValue {
            packets: 1,
            bytes: 42,
        };
        let total = sum_cpus([cpu0, cpu1]);
        assert_eq!(
            total.get(direction::TO_VM, class::DHCP),
            CounterValue {
                packets: 5,
                bytes: 300
            }
        );
        assert_eq!(total.get(direction::FROM_VM, class::ARP).packets, 1);
        assert_eq!(total.packets(direction::TO_VM), 5);
        assert_eq!(total.packets(direction::FROM_VM), 1);
        // Numbers from a newer kernel object read as zero, not a panic.
        assert_eq!(total.get(9, 9), CounterValue::default());
    }

    #[test]
    fn netns_inode_is_readable() {
        assert!(current_netns_inum().unwrap() > 0);
    }
}
