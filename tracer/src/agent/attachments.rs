//! Which taps are attached: reconciling with the interfaces that exist,
//! within the kernel maps' capacity and the open-file limit; detaching.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use super::{lock, AgentState, WaitReason};
use crate::{
    analysis::vm::VmRecord,
    config::Config,
    export::VmView,
    interfaces::links::{self, LinkInfo},
};

impl AgentState {
    /// Brings attachments in line with the interfaces that exist now.
    pub(crate) fn reconcile(&self, present: &[LinkInfo], config: &Config) {
        // Most polls only bring new counters: the plans (taps and hops)
        // depend on the links' names and topology alone, so they are made
        // again only when those change or something waits to be retried.
        // At 2000 taps planning every poll was a third of the idle CPU.
        let topology_changed = {
            let mut planned = lock(&self.planned_topology);
            let same = planned.as_ref().is_some_and(|t| t.same_as(present));
            if !same {
                *planned = Some(links::Topology::of(present));
            }
            !same
        };
        let replan = topology_changed || !lock(&self.waiting).is_empty();
        if replan {
            self.plan_and_attach(present, config);
        } else {
            self.refresh_identities_if_due(false);
        }
        // Keep oper state, stats and MAC current for interfaces that stay.
        let mut attached = lock(&self.attached);
        for link in present {
            if let Some(known) = attached.get_mut(&link.ifindex) {
                // Most polls change nothing on most taps: no clone then.
                if known.name == link.name && known != link {
                    known.clone_from(link);
                }
            }
        }
    }

    fn plan_and_attach(&self, present: &[LinkInfo], config: &Config) {
        let attached_names: BTreeMap<u32, String> = lock(&self.attached)
            .iter()
            .map(|(i, l)| (*i, l.name.clone()))
            .collect();
        // Forget failures of interfaces that are gone, so a new interface
        // reusing the ifindex gets its own attempt.
        lock(&self.failed).retain(|ifindex, name| {
            present
                .iter()
                .any(|l| l.ifindex == *ifindex && &l.name == name)
        });
        let plan = links::plan(
            &attached_names,
            present,
            &config.interfaces,
            &lock(&self.failed),
        );
        let changed = !plan.attach.is_empty() || !plan.detach.is_empty();
        self.keep_final_counters(&plan.detach);
        for &ifindex in &plan.detach {
            self.forget(ifindex);
        }
        lock(&self.maps).forget_interfaces(&plan.detach);
        self.attach_within_limits(plan.attach);
        self.refresh_identities_if_due(changed);
        // After the taps and who is behind them: a hop only lengthens the
        // path hvnet can show (each TCX attach waits a grace period).
        self.reconcile_hops(present, config);
    }

    /// Attaches what the kernel maps and the open-file limit allow; the
    /// rest waits (retried every poll) instead of failing or being counted
    /// nowhere. Beyond max_interfaces the maps are full: a tap attached
    /// anyway would lose its counts. And running out of descriptors
    /// mid-attach would also break the polls of every tap already attached.
    fn attach_within_limits(&self, links: Vec<LinkInfo>) {
        if links.is_empty() {
            lock(&self.waiting).clear();
            return;
        }
        let room = self
            .max_interfaces
            .saturating_sub(lock(&self.attached).len());
        // Cannot tell: try them all.
        let (fd_budget, open, limit) =
            crate::kernel::fd_limit::attach_budget().unwrap_or((u64::MAX, 0, 0));
        let mut waiting = BTreeMap::new();
        // Counters left by earlier interfaces with these ifindexes are not
        // theirs: cleared in one pass before attaching.
        let fresh: Vec<u32> = links.iter().map(|l| l.ifindex).collect();
        lock(&self.maps).forget_interfaces(&fresh);
        let mut tried = 0usize;
        for link in links {
            if tried >= room {
                waiting.insert(link.ifindex, (link.name, WaitReason::Capacity));
                continue;
            }
            if tried as u64 >= fd_budget {
                waiting.insert(link.ifindex, (link.name, WaitReason::FdLimit));
                continue;
            }
            tried += 1;
            if let Some(name) = self.attach(link.clone()) {
                waiting.insert(link.ifindex, (name, WaitReason::FdLimit));
            }
        }
        let mut known = lock(&self.waiting);
        if waiting.keys().ne(known.keys()) {
            let count = |reason| waiting.values().filter(|(_, r)| *r == reason).count();
            let (fds, capacity) = (count(WaitReason::FdLimit), count(WaitReason::Capacity));
            if fds > 0 {
                log::warn!(
                    "{fds} interface(s) wait for file descriptors: the open-file limit is reached ({open} of {limit} in use, {} kept for polling); raise LimitNOFILE (about {} per tap); retrying every poll",
                    crate::kernel::fd_limit::FD_RESERVE,
                    crate::kernel::fd_limit::FDS_PER_ATTACH
                );
            }
            if capacity > 0 {
                log::warn!(
                    "{capacity} interface(s) not attached: max_interfaces ({}) taps are attached and the kernel maps hold no more; raise max_interfaces; retrying every poll",
                    self.max_interfaces
                );
            }
        }
        *known = waiting;
    }

    /// Attaches one tap; Some(name) when it ran out of file descriptors
    /// (to be retried), None otherwise.
    fn attach(&self, link: LinkInfo) -> Option<String> {
        // A departed VM's series under this name end now: the name's
        // series are the new tap's from its first scrape.
        lock(&self.departed).forget_name(&link.name);
        // Counter slot and tracepoint filter first, so the first frame the
        // tc programs see is counted.
        // Bound first: a lock guard in an `if let` scrutinee would live
        // through the block, and the block takes the same lock again.
        let monitored = lock(&self.maps).monitor(link.ifindex);
        if let Err(err) = monitored {
            lock(&self.maps).forget_interfaces(&[link.ifindex]);
            log::warn!(
                "{}: not attached, its counters have no place in the kernel maps: {err}; hvnet will not retry this interface until it is recreated",
                link.name
            );
            self.attach_failures.fetch_add(1, Ordering::Relaxed);
            lock(&self.failed).insert(link.ifindex, link.name);
            return None;
        }
        let result = lock(&self.probes).attach(link.ifindex, &link.name);
        if result.is_err() {
            lock(&self.maps).forget_interfaces(&[link.ifindex]);
        }
        match result {
            Ok(()) => {
                log::info!(
                    "attached to {} (ifindex {}, mac {}, {})",
                    link.name,
                    link.ifindex,
                    link.mac_string(),
                    self.mechanism
                );
                lock(&self.records)
                    .insert(link.ifindex, VmRecord::new(&link.name, self.stall_after));
                // Scrapes run while taps attach: a tap is attached or
                // waiting, never both at once.
                lock(&self.waiting).remove(&link.ifindex);
                lock(&self.attached).insert(link.ifindex, link);
                None
            }
            Err(err) if crate::kernel::fd_limit::is_fd_exhaustion(&err) => {
                log::warn!("{err}: out of file descriptors; retrying next poll");
                Some(link.name)
            }
            Err(err) => {
                log::warn!("{err}; hvnet will not retry this interface until it is recreated");
                self.attach_failures.fetch_add(1, Ordering::Relaxed);
                lock(&self.failed).insert(link.ifindex, link.name);
                None
            }
        }
    }

    pub(super) fn forget(&self, ifindex: u32) {
        let name = lock(&self.probes).detach(ifindex);
        lock(&self.attached).remove(&ifindex);
        lock(&self.records).remove(&ifindex);
        if let Some(name) = name {
            log::info!("detached from {name} (ifindex {ifindex}): interface gone or renamed");
        }
    }

    /// Keeps vanishing taps' final counters for the series grace period,
    /// from one read of the maps however many go at once (an evacuated
    /// host loses hundreds of taps in one burst).
    pub(super) fn keep_final_counters(&self, ifindexes: &[u32]) {
        if ifindexes.is_empty() || lock(&self.departed).grace().is_zero() {
            return;
        }
        let snapshot = lock(&self.maps).read();
        if !snapshot.readable("VM_COUNTERS") {
            log::warn!("final counters of removed taps not kept: VM_COUNTERS unreadable");
            return;
        }
        let now = self.now();
        let links: Vec<LinkInfo> = {
            let attached = lock(&self.attached);
            ifindexes
                .iter()
                .filter_map(|ifindex| attached.get(ifindex).cloned())
                .collect()
        };
        let views: Vec<VmView> = {
            let records = lock(&self.records);
            links
                .iter()
                .map(|link| self.view(link, &snapshot, records.get(&link.ifindex), now))
                .collect()
        };
        let mut departed = lock(&self.departed);
        for view in views {
            departed.keep(view, now);
        }
    }

    pub(crate) fn detach_everything(&self) -> usize {
        lock(&self.attached).clear();
        lock(&self.probes).detach_all()
    }
}
