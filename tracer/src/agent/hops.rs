//! The hops DHCP is followed through besides the taps (bridges, their
//! ports, uplinks): attached and detached with the taps they serve, and
//! what their programs saw. A failed hop never blocks a tap: the VM is
//! still watched, only the path beyond its tap is shorter.

use std::collections::{BTreeMap, BTreeSet};

use super::{lock, AgentState};
use crate::{
    config::Config,
    export::HopView,
    interfaces::{
        hops::{plan_hops, Hop},
        links::LinkInfo,
    },
};

#[derive(Default)]
pub(super) struct HopState {
    attached: BTreeMap<u32, Hop>,
    /// Hops that refused to attach, by ifindex (retried once recreated).
    failed: BTreeMap<u32, String>,
    /// DHCP messages each attached hop's programs saw, [egress, ingress].
    seen: BTreeMap<u32, [u64; 2]>,
    /// Taps (by name) whose path hvnet cannot see (master not a Linux bridge).
    unseen: BTreeMap<String, String>,
}

impl HopState {
    pub(super) fn name(&self, ifindex: u32) -> Option<&str> {
        self.attached.get(&ifindex).map(|h| h.name.as_str())
    }

    pub(super) fn count(&mut self, ifindex: u32, ingress: bool) {
        if self.attached.contains_key(&ifindex) {
            self.seen.entry(ifindex).or_default()[usize::from(ingress)] += 1;
        }
    }
}

impl AgentState {
    /// Brings the followed hops in line with the taps attached now.
    pub(crate) fn reconcile_hops(&self, present: &[LinkInfo], config: &Config) {
        if !config.bridge_hops && config.uplinks.is_none() {
            return;
        }
        let taps: BTreeSet<u32> = lock(&self.attached).keys().copied().collect();
        let limit = tracer_common::MAX_HOPS as usize;
        let plan = plan_hops(
            present,
            &taps,
            config.bridge_hops,
            config.uplinks.as_ref(),
            limit,
        );
        let (stale, new) = {
            let mut hops = lock(&self.hops);
            hops.failed
                .retain(|i, name| plan.hops.get(i).is_some_and(|h| &h.name == name));
            for (tap, why) in &plan.unseen {
                if !hops.unseen.contains_key(tap) {
                    log::info!(
                        "the path beyond {tap} is not visible: {why} (only Linux bridges are \
                         followed)"
                    );
                }
            }
            hops.unseen = plan.unseen.clone();
            let stale: Vec<u32> = hops
                .attached
                .iter()
                .filter(|(i, h)| plan.hops.get(i).is_none_or(|p| p.name != h.name))
                .map(|(i, _)| *i)
                .collect();
            let new: Vec<(u32, Hop)> = plan
                .hops
                .iter()
                .filter(|(i, _)| !hops.attached.contains_key(i) && !hops.failed.contains_key(i))
                .map(|(i, h)| (*i, h.clone()))
                .collect();
            (stale, new)
        };
        for ifindex in stale {
            lock(&self.probes).detach(ifindex);
            lock(&self.maps).forget_hop(ifindex);
            let mut hops = lock(&self.hops);
            hops.seen.remove(&ifindex);
            if let Some(hop) = hops.attached.remove(&ifindex) {
                log::info!("stopped following DHCP through {}", hop.name);
            }
        }
        for (ifindex, hop) in new {
            // The drop tracepoint first, so a reply dropped on the hop is
            // reported from the moment its tc programs see replies.
            let followed = lock(&self.maps).follow_hop(ifindex);
            let attached =
                followed.and_then(|()| lock(&self.probes).attach_hop(ifindex, &hop.name));
            let mut hops = lock(&self.hops);
            match attached {
                Ok(()) => {
                    log::info!(
                        "following DHCP through {} ({}, ifindex {ifindex})",
                        hop.name,
                        hop.role.as_str()
                    );
                    hops.attached.insert(ifindex, hop);
                }
                Err(err) => {
                    drop(hops);
                    lock(&self.maps).forget_hop(ifindex);
                    log::warn!(
                        "cannot follow DHCP through {} ({}): {err}; its VMs are still watched \
                         on their taps",
                        hop.name,
                        hop.role.as_str()
                    );
                    lock(&self.hops).failed.insert(ifindex, hop.name);
                }
            }
        }
    }

    pub(super) fn hop_views(&self) -> Vec<HopView> {
        let hops = lock(&self.hops);
        hops.attached
            .iter()
            .map(|(ifindex, hop)| HopView {
                name: hop.name.clone(),
                role: hop.role.as_str(),
                dhcp_messages: hops.seen.get(ifindex).copied().unwrap_or_default(),
            })
            .collect()
    }

    /// Taps whose path beyond them is not visible, and why.
    pub(super) fn unseen_paths(&self) -> BTreeMap<String, String> {
        lock(&self.hops).unseen.clone()
    }
}
