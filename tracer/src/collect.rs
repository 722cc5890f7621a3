//! Reads hvnet's kernel maps into per-interface totals, and keeps the
//! MONITORED map (which taps the host-wide tracepoints care about) in step
//! with the attachments.

use std::collections::BTreeMap;

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    Ebpf,
};
use tracer_common::{class, direction, map_slot, CounterKey, CounterValue, DevKey, DropKey};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("map {map} missing from the eBPF object or of the wrong type: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("reading map {map}: {reason}")]
    Read { map: &'static str, reason: String },
    #[error("updating the MONITORED map: {0}")]
    Monitor(String),
}

/// Packets and bytes of one interface, indexed `[direction][class]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub by_direction_class: [[CounterValue; class::COUNT]; direction::COUNT],
}

impl TrafficCounters {
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

    fn add(&mut self, key: &CounterKey, value: CounterValue) {
        if let Some(slot) = self
            .by_direction_class
            .get_mut(usize::from(key.direction))
            .and_then(|row| row.get_mut(usize::from(key.class)))
        {
            slot.packets = slot.packets.wrapping_add(value.packets);
            slot.bytes = slot.bytes.wrapping_add(value.bytes);
        }
    }
}

/// Sums one key's per-CPU slots. Each slot only grows, so the sum is the
/// total; wrapping add keeps a (theoretical) u64 wrap from panicking.
pub fn sum_cpus(values: &[CounterValue]) -> CounterValue {
    values
        .iter()
        .fold(CounterValue::default(), |acc, v| CounterValue {
            packets: acc.packets.wrapping_add(v.packets),
            bytes: acc.bytes.wrapping_add(v.bytes),
        })
}

/// Folds (key, summed value) entries into per-ifindex totals.
pub fn fold_entries<I>(entries: I) -> BTreeMap<u32, TrafficCounters>
where
    I: IntoIterator<Item = (CounterKey, CounterValue)>,
{
    let mut totals: BTreeMap<u32, TrafficCounters> = BTreeMap::new();
    for (key, value) in entries {
        totals.entry(key.ifindex).or_default().add(&key, value);
    }
    totals
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
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    monitored: HashMap<MapData, DevKey, u8>,
    monitored_ifindex: Array<MapData, u64>,
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
    /// of the agent's network namespace (tracepoints see every namespace).
    pub fn take(ebpf: &mut Ebpf, netns: u32) -> Result<Self, CollectError> {
        Ok(Self {
            netns,
            counters: take(ebpf, "VM_COUNTERS")?,
            monitored: take(ebpf, "MONITORED")?,
            monitored_ifindex: take(ebpf, "MONITORED_IFINDEX")?,
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

    /// Makes the host-wide probes count this interface.
    pub fn monitor(&mut self, ifindex: u32) -> Result<(), CollectError> {
        let key = self.dev(ifindex);
        // The shortcut bit first: a tap in MONITORED but not in the bitmap
        // would be missed, the reverse only costs the full check.
        self.set_ifindex_bit(ifindex, true)?;
        self.monitored
            .insert(key, 1, 0)
            .map_err(|e| CollectError::Monitor(e.to_string()))
    }

    fn set_ifindex_bit(&mut self, ifindex: u32, on: bool) -> Result<(), CollectError> {
        if ifindex >= tracer_common::IFINDEX_BITMAP_WORDS * 64 {
            return Ok(());
        }
        let index = ifindex / 64;
        let bit = 1u64 << (ifindex % 64);
        let word = self
            .monitored_ifindex
            .get(&index, 0)
            .map_err(|e| CollectError::Monitor(e.to_string()))?;
        let word = if on { word | bit } else { word & !bit };
        self.monitored_ifindex
            .set(index, word, 0)
            .map_err(|e| CollectError::Monitor(e.to_string()))
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
        let mut entries = Vec::new();
        for item in self.counters.iter() {
            match item {
                Ok((key, per_cpu)) => entries.push((key, sum_cpus(&per_cpu))),
                Err(MapError::KeyNotFound) => continue,
                Err(err) => {
                    note(CollectError::Read {
                        map: "VM_COUNTERS",
                        reason: err.to_string(),
                    });
                    entries.clear();
                    break;
                }
            }
        }
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
            traffic: fold_entries(entries),
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

    /// Stops counting an interface and drops all its counters, so that a
    /// new interface reusing the ifindex starts from zero instead of
    /// inheriting another VM's totals.
    /// Removes every trace of these interfaces from the maps: one pass over
    /// the maps keyed by more than the interface, however many interfaces
    /// (a node starting with 2000 taps, or an evacuation removing them all,
    /// must not walk the maps once per tap).
    pub fn forget_interfaces(&mut self, ifindexes: &[u32]) {
        if ifindexes.is_empty() {
            return;
        }
        let wanted: std::collections::HashSet<u32> = ifindexes.iter().copied().collect();
        let devs: std::collections::HashSet<DevKey> =
            ifindexes.iter().map(|i| self.dev(*i)).collect();
        for &ifindex in ifindexes {
            let dev = self.dev(ifindex);
            let _ = self.monitored.remove(&dev);
            let _ = self.set_ifindex_bit(ifindex, false);
            let _ = self.dequeued.remove(&dev);
            let _ = self.vhost_rx.remove(&dev);
            let _ = self.throttled.remove(&ifindex);
        }
        let counter_keys: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| wanted.contains(&k.ifindex))
            .collect();
        for key in &counter_keys {
            let _ = self.counters.remove(key);
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

    fn key(ifindex: u32, direction: u8, class: u8) -> CounterKey {
        CounterKey {
            ifindex,
            direction,
            class,
            _pad: [0; 2],
        }
    }

    #[test]
    fn cpus_are_summed_and_interfaces_kept_apart() {
        let per_cpu = [
            CounterValue {
                packets: 2,
                bytes: 120,
            },
            CounterValue {
                packets: 3,
                bytes: 180,
            },
        ];
        let totals = fold_entries([
            (key(7, direction::TO_VM, class::DHCP), sum_cpus(&per_cpu)),
            (
                key(7, direction::FROM_VM, class::ARP),
                CounterValue {
                    packets: 1,
                    bytes: 42,
                },
            ),
            (
                key(9, direction::TO_VM, class::OTHER),
                CounterValue {
                    packets: 4,
                    bytes: 400,
                },
            ),
        ]);
        let vm7 = totals[&7];
        assert_eq!(
            vm7.get(direction::TO_VM, class::DHCP),
            CounterValue {
                packets: 5,
                bytes: 300
            }
        );
        assert_eq!(vm7.get(direction::FROM_VM, class::ARP).packets, 1);
        assert_eq!(vm7.packets(direction::TO_VM), 5);
        assert_eq!(totals[&9].packets(direction::TO_VM), 4);
        assert_eq!(totals[&9].packets(direction::FROM_VM), 0);
    }

    #[test]
    fn out_of_range_keys_from_a_newer_kernel_object_are_ignored() {
        let totals = fold_entries([(
            key(3, 9, 9),
            CounterValue {
                packets: 1,
                bytes: 1,
            },
        )]);
        assert_eq!(totals[&3], TrafficCounters::default());
    }

    #[test]
    fn netns_inode_is_readable() {
        assert!(current_netns_inum().unwrap() > 0);
    }
}
