//! Which tap holds which counter slot of VM_COUNTERS.

use std::collections::{BTreeMap, BTreeSet};

/// Counter slots of the VM_COUNTERS array: each monitored tap holds one
/// from before its tc programs attach until it is forgotten. A tap gets
/// the slot its ifindex suggests (`ifindex & slot_mask`) whenever that one
/// is free: the tc programs look there first, and a tap found there costs
/// them no slot-table lookup. A freed slot is zeroed when it is handed out
/// again (nothing counts into it meanwhile).
#[derive(Debug)]
pub struct SlotTable {
    by_ifindex: BTreeMap<u32, u32>,
    free: BTreeSet<u32>,
    mask: u32,
}

impl SlotTable {
    pub fn new(capacity: u32) -> Self {
        Self {
            by_ifindex: BTreeMap::new(),
            free: (0..capacity).collect(),
            mask: tracer_common::slot_mask(capacity),
        }
    }

    /// The slot this ifindex holds, and whether it was just handed out.
    pub fn assign(&mut self, ifindex: u32) -> Option<(u32, bool)> {
        if let Some(&slot) = self.by_ifindex.get(&ifindex) {
            return Some((slot, false));
        }
        let suggested = ifindex & self.mask;
        let slot = if self.free.remove(&suggested) {
            suggested
        } else {
            // The highest free slot: slots past the mask are nobody's
            // suggestion, so they go first.
            self.free.pop_last()?
        };
        self.by_ifindex.insert(ifindex, slot);
        Some((slot, true))
    }

    pub fn release(&mut self, ifindex: u32) -> Option<u32> {
        let slot = self.by_ifindex.remove(&ifindex)?;
        self.free.insert(slot);
        Some(slot)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.by_ifindex.iter().map(|(i, s)| (*i, *s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_reused_after_release_and_bounded() {
        let mut table = SlotTable::new(2);
        // Mask 1: ifindex 10 suggests slot 0, 11 slot 1.
        assert_eq!(table.assign(10), Some((0, true)));
        assert_eq!(table.assign(11), Some((1, true)));
        // Asking again keeps the slot (and its counts).
        assert_eq!(table.assign(10), Some((0, false)));
        // Full: refused, never shared.
        assert_eq!(table.assign(12), None);
        assert_eq!(table.release(10), Some(0));
        assert_eq!(table.release(10), None);
        // The freed slot goes to the next tap, marked fresh (to be zeroed).
        assert_eq!(table.assign(13), Some((0, true)));
        let held: Vec<_> = table.iter().collect();
        assert_eq!(held, vec![(11, 1), (13, 0)]);
    }

    #[test]
    fn a_tap_gets_the_slot_its_ifindex_suggests_when_free() {
        // 6 slots: mask 3, slots 4 and 5 are nobody's suggestion.
        let mut table = SlotTable::new(6);
        assert_eq!(table.assign(7), Some((3, true)));
        assert_eq!(table.assign(9), Some((1, true)));
        // 11 suggests 3, which 7 holds: a slot past the mask first.
        assert_eq!(table.assign(11), Some((5, true)));
        assert_eq!(table.assign(15), Some((4, true)));
        // Then the highest free one.
        assert_eq!(table.assign(19), Some((2, true)));
        // 8 suggests 0, still free.
        assert_eq!(table.assign(8), Some((0, true)));
        assert_eq!(table.assign(20), None);
        let slots: BTreeSet<u32> = table.iter().map(|(_, slot)| slot).collect();
        assert_eq!(slots.len(), 6);
    }
}
