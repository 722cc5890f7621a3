//! Consistent views of the agent's state for /metrics, /api/v1 and
//! `hvnet explain`: gathered under the locks, rendered without them.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use super::{lock, AgentState, LookupError, WaitReason};
use crate::{
    analysis::timeline::{render_explanation, wall_clock, Entry, Explanation},
    analysis::vm::VmRecord,
    export::{DhcpView, DropCount, Exposition, VmHealth, VmView},
    interfaces::links::LinkInfo,
    kernel::collect::{CollectError, KernelSnapshot},
    kernel::drops::{drop_direction, reason_name},
};

impl AgentState {
    /// One consistent view for a scrape or an API call.
    pub fn exposition(&self) -> Result<Exposition, CollectError> {
        let hops = self.hop_views();
        let attached = lock(&self.attached).clone();
        let snapshot = lock(&self.maps).read();
        for (map, reason) in &snapshot.unreadable {
            log::debug!("scrape: map {map} unreadable ({reason}); its series are left out");
        }
        let now = self.now();
        let records = lock(&self.records);
        let mut vms: Vec<VmView> = attached
            .values()
            .map(|link| self.view(link, &snapshot, records.get(&link.ifindex), now))
            .collect();
        drop(records);
        let names: Vec<&str> = attached.values().map(|l| l.name.as_str()).collect();
        vms.extend(lock(&self.departed).visible(now, &names));
        Ok(Exposition {
            vms,
            probes: self.probe_statuses.clone(),
            attach_failures: self.attach_failures.load(Ordering::Relaxed),
            link_events: self.link_events.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mechanism: self.mechanism.to_owned(),
            events_lost: snapshot.events_lost,
            project_label: self.project_label,
            full_detail: self.metrics_detail == crate::config::MetricsDetail::Full,
            waiting: {
                let waiting = lock(&self.waiting);
                [WaitReason::FdLimit, WaitReason::Capacity]
                    .map(|reason| {
                        (
                            reason.as_str(),
                            waiting.values().filter(|(_, r)| *r == reason).count(),
                        )
                    })
                    .to_vec()
            },
            map_update_failures: snapshot.map_update_failures,
            probe_read_errors: snapshot.probe_read_errors,
            map_reads: crate::kernel::collect::SNAPSHOT_MAPS
                .iter()
                .map(|map| (*map, snapshot.readable(map)))
                .collect(),
            hops,
        })
    }

    /// What one attached tap shows.
    pub(super) fn view(
        &self,
        link: &LinkInfo,
        snapshot: &KernelSnapshot,
        record: Option<&VmRecord>,
        now: f64,
    ) -> VmView {
        let identity = self.identity(&link.name);
        // Without an identity source, the tap's own MAC (from netlink) is
        // the best handle left: libvirt's is the guest's with fe: in front.
        let mac = if identity.mac.is_empty() {
            link.mac_string()
        } else {
            identity.mac.clone()
        };
        VmView {
            iface: link.name.clone(),
            ifindex: link.ifindex,
            mac,
            tap_mac: link.mac_string(),
            oper_state: link.oper_state.clone(),
            vm_uuid: identity.vm_uuid.clone(),
            vm_name: identity.vm_name.clone(),
            identity,
            traffic: snapshot
                .traffic
                .get(&link.ifindex)
                .copied()
                .unwrap_or_default(),
            drops: self.drop_counts(snapshot, link),
            dequeued: self
                .has_dequeue_probe
                .then(|| snapshot.dequeued.get(&link.ifindex).copied().unwrap_or(0)),
            netdev_tx_packets: link.stats.map(|s| s.tx_packets),
            vhost_rx: snapshot.vhost_rx.get(&link.ifindex).copied(),
            events_throttled: snapshot
                .events_throttled
                .get(&link.ifindex)
                .copied()
                .unwrap_or(0),
            queue_len: link.txqueuelen,
            health: record.map(|r| VmHealth {
                state: r.detector.state(),
                backlog: r.detector.backlog(),
                stalls_total: r.detector.stalls_total(),
                stall_seconds: r.detector.stall_seconds(),
            }),
            dhcp: record.map(|r| DhcpView {
                counters: r.dhcp.counters().clone(),
                lease_remaining: r.dhcp.lease().map(|l| l.remaining(now)),
                lease_address: r.dhcp.lease().map(|l| l.address.clone()),
                last_verdict: r.dhcp.last_verdict(),
            }),
            departed: false,
        }
    }

    /// A VM by tap name, VM name or UUID.
    /// The record a name means: a tap name first, else a VM name or UUID.
    /// A VM with several NICs has several taps: its name is then ambiguous.
    fn find_record<'a>(
        &self,
        records: &'a BTreeMap<u32, VmRecord>,
        name: &str,
    ) -> Result<&'a VmRecord, LookupError> {
        if let Some(record) = records.values().find(|r| r.iface == name) {
            return Ok(record);
        }
        let identities = lock(&self.identities);
        let mut taps: Vec<&str> = identities
            .iter()
            .filter(|(_, id)| id.vm_name == name || (!id.vm_uuid.is_empty() && id.vm_uuid == name))
            .map(|(tap, _)| tap.as_str())
            .filter(|tap| records.values().any(|r| r.iface == *tap))
            .collect();
        taps.sort_unstable();
        match taps.as_slice() {
            [] => Err(LookupError::NotFound(name.to_owned())),
            [tap] => records
                .values()
                .find(|r| r.iface == *tap)
                .ok_or_else(|| LookupError::NotFound(name.to_owned())),
            several => Err(LookupError::Ambiguous {
                name: name.to_owned(),
                candidates: several.iter().map(|t| (*t).to_owned()).collect(),
            }),
        }
    }

    /// `hvnet explain` text for a VM (by iface; identity names come later).
    pub fn explain(&self, name: &str) -> Result<String, LookupError> {
        let now = self.now();
        let unseen = self.unseen_paths();
        let records = lock(&self.records);
        let record = self.find_record(&records, name)?;
        let unseen_path = unseen.get(&record.iface).map(String::as_str);
        let identity = self.identity(&record.iface);
        let stuck_since = record.detector.stuck_since().map(|m| wall_clock(m, now));
        let counters = record.dhcp.counters();
        let lease = record
            .dhcp
            .lease()
            .map(|l| (l.address.clone(), l.remaining(now), l.expired));
        Ok(render_explanation(
            &Explanation {
                iface: &record.iface,
                vm_name: &identity.vm_name,
                state: Some(record.detector.state()),
                stuck_since,
                retries_during_stall: counters.retries_during_stall,
                replies_undelivered: counters.replies_undelivered,
                replies_unprocessed: counters.replies_unprocessed,
                replies_lost_on_node: counters.replies_lost_on_node,
                unseen_path,
                lease,
                now_unix: wall_clock(now, now),
                identity: &identity.describe(),
            },
            &record.timeline,
        ))
    }

    pub fn timeline(&self, name: &str) -> Result<Vec<Entry>, LookupError> {
        let records = lock(&self.records);
        self.find_record(&records, name)
            .map(|r| r.timeline.entries().cloned().collect())
    }

    pub(super) fn drop_counts(&self, snapshot: &KernelSnapshot, link: &LinkInfo) -> Vec<DropCount> {
        if !self.has_drop_probe {
            // Fallback: the tap's own counter, almost always a full ring.
            return link
                .stats
                .map(|s| {
                    vec![DropCount {
                        direction: "to_vm",
                        reason: "netdev_tx_dropped".into(),
                        packets: s.tx_dropped,
                    }]
                })
                .unwrap_or_default();
        }
        snapshot
            .drops
            .get(&link.ifindex)
            .map(|by_reason| {
                by_reason
                    .iter()
                    .map(|(reason, packets)| {
                        let name = reason_name(&self.drop_reasons, *reason);
                        DropCount {
                            direction: drop_direction(&name),
                            reason: name,
                            packets: *packets,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
