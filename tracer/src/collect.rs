//! Reads the per-CPU counter map into per-interface totals.

use std::collections::BTreeMap;

use aya::maps::{Map, MapData, PerCpuHashMap};
use tracer_common::{class, direction, CounterKey, CounterValue};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("the counter map has an unexpected type: {0}")]
    MapType(String),
    #[error("reading the counter map: {0}")]
    Read(String),
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

/// Folds (key, per-CPU values) entries into per-ifindex totals.
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

/// The kernel's VM_COUNTERS map, owned by the agent.
pub struct CounterMap {
    map: PerCpuHashMap<MapData, CounterKey, CounterValue>,
}

impl CounterMap {
    pub fn new(map: Map) -> Result<Self, CollectError> {
        let map = PerCpuHashMap::try_from(map).map_err(|e| CollectError::MapType(e.to_string()))?;
        Ok(Self { map })
    }

    /// Current totals per ifindex (summed over CPUs).
    pub fn read(&self) -> Result<BTreeMap<u32, TrafficCounters>, CollectError> {
        let mut entries = Vec::new();
        for item in self.map.iter() {
            match item {
                Ok((key, per_cpu)) => entries.push((key, sum_cpus(&per_cpu))),
                // A key deleted between the key walk and the lookup: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(err) => return Err(CollectError::Read(err.to_string())),
            }
        }
        Ok(fold_entries(entries))
    }

    /// Drops every counter of an interface that went away, so that a new
    /// interface reusing its ifindex starts from zero instead of inheriting
    /// another VM's totals.
    pub fn forget_interface(&mut self, ifindex: u32) -> Result<usize, CollectError> {
        let keys: Vec<CounterKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        let mut removed = 0;
        for key in &keys {
            match self.map.remove(key) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(CollectError::Read(err.to_string())),
            }
        }
        Ok(removed)
    }
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
}
