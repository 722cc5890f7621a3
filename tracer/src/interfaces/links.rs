//! Which interfaces exist: the kernel's link events (RTNLGRP_LINK, through
//! rtnetlink) say when to look again, so that taps that appear are attached
//! within a moment and taps that vanish are forgotten; the look itself is a
//! dump (`link_dump`). `plan` decides what to change; it is pure so that
//! reconciliation is unit-tested without privileges.

use std::collections::BTreeMap;

use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{AsyncSocket, SocketAddr};

use crate::interfaces::ifmatch::InterfaceMatcher;

/// RTNLGRP_LINK as a legacy multicast group bit (1 << (group - 1)).
const RTMGRP_LINK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("subscribing to link events: {0}")]
    Subscribe(std::io::Error),
}

/// The kernel's own interface counters (IFLA_STATS64), tap's view:
/// tx = toward the VM, rx = from the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetdevStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

/// What hvnet needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub oper_state: String,
    pub admin_up: bool,
    /// IFF_LOWER_UP: for a tap, whether a VMM holds its fd (NO-CARRIER if not).
    pub carrier: bool,
    pub txqueuelen: u32,
    pub stats: Option<NetdevStats>,
    /// IFLA_MASTER: the bridge (or bond, OVS) this interface is a port of.
    pub master: Option<u32>,
    /// IFLA_LINK within this namespace: a veth's peer, a VLAN's lower device.
    pub link: Option<u32>,
    /// IFLA_INFO_KIND: "bridge", "veth", "vxlan", "openvswitch", ... (empty
    /// for a physical device).
    pub kind: String,
}

impl LinkInfo {
    pub fn mac_string(&self) -> String {
        self.mac.map(|m| format_mac(&m)).unwrap_or_default()
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a link event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// RTM_NEWLINK: the link appeared or changed (name, state, carrier).
    Changed(u32),
    /// RTM_DELLINK: the link is gone.
    Removed(u32),
    /// Something else (a message hvnet cannot read): list everything again.
    Unknown,
}

impl LinkChange {
    fn of(message: &NetlinkMessage<RouteNetlinkMessage>) -> Self {
        match &message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                Self::Changed(link.header.index)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Self::Removed(link.header.index)
            }
            _ => Self::Unknown,
        }
    }
}

/// Applies link events to the known links, fetching each changed link
/// alone (`fetch`); None when a full listing is needed instead (an unknown
/// event, or a burst where one dump is cheaper than many requests).
pub fn apply_changes(
    mut links: Vec<LinkInfo>,
    changes: &[LinkChange],
    mut fetch: impl FnMut(u32) -> std::io::Result<Option<LinkInfo>>,
) -> Option<Vec<LinkInfo>> {
    /// More changed links than this: one dump.
    const MAX_SINGLE_FETCHES: usize = 32;
    if changes.len() > MAX_SINGLE_FETCHES || changes.contains(&LinkChange::Unknown) {
        return None;
    }
    for change in changes {
        match *change {
            LinkChange::Removed(ifindex) => links.retain(|l| l.ifindex != ifindex),
            LinkChange::Changed(ifindex) => {
                links.retain(|l| l.ifindex != ifindex);
                // Gone again by now (ENODEV): nothing to add.
                if let Some(link) = fetch(ifindex).ok()? {
                    links.push(link);
                }
            }
            LinkChange::Unknown => return None,
        }
    }
    Some(links)
}

/// What plans are made from: each link's ifindex, name, bridge, peer and
/// kind, not its counters or state. The same topology -> the same plans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology(Vec<LinkShape>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkShape {
    ifindex: u32,
    name: String,
    master: Option<u32>,
    link: Option<u32>,
    kind: String,
}

impl LinkShape {
    fn is(&self, link: &LinkInfo) -> bool {
        self.ifindex == link.ifindex
            && self.master == link.master
            && self.link == link.link
            && self.name == link.name
            && self.kind == link.kind
    }
}

impl Topology {
    pub fn of(present: &[LinkInfo]) -> Self {
        Self(
            present
                .iter()
                .map(|l| LinkShape {
                    ifindex: l.ifindex,
                    name: l.name.clone(),
                    master: l.master,
                    link: l.link,
                    kind: l.kind.clone(),
                })
                .collect(),
        )
    }

    /// Compared in place: no allocation on the common poll.
    pub fn same_as(&self, present: &[LinkInfo]) -> bool {
        self.0.len() == present.len() && self.0.iter().zip(present).all(|(s, l)| s.is(l))
    }
}

/// The changes that bring the attached set in line with what exists.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub detach: Vec<u32>,
    pub attach: Vec<LinkInfo>,
}

/// Compares attached interfaces (ifindex -> name) with present ones. An
/// ifindex whose name changed is detached and re-evaluated: it may be a new
/// interface that reused the number, or a rename out of the globs.
pub fn plan(
    attached: &BTreeMap<u32, String>,
    present: &[LinkInfo],
    matcher: &InterfaceMatcher,
    skip: &BTreeMap<u32, String>,
) -> Plan {
    // An attached link under the same name matched before (the globs do
    // not change at run time): only the others are matched.
    let wanted: BTreeMap<u32, &LinkInfo> = present
        .iter()
        .filter(|l| attached.get(&l.ifindex) == Some(&l.name) || matcher.matches(&l.name))
        .map(|l| (l.ifindex, l))
        .collect();
    let detach: Vec<u32> = attached
        .iter()
        .filter(|(ifindex, name)| wanted.get(ifindex).is_none_or(|l| &l.name != *name))
        .map(|(ifindex, _)| *ifindex)
        .collect();
    let attach = wanted
        .values()
        .filter(|l| {
            let keeps = attached.get(&l.ifindex) == Some(&l.name);
            let skipped = skip.get(&l.ifindex) == Some(&l.name);
            !keeps && !skipped
        })
        .map(|l| (*l).clone())
        .collect();
    Plan { detach, attach }
}

/// An rtnetlink connection subscribed to link events (they arrive on
/// `events`).
pub struct LinkWatcher {
    // Never used for requests (the dump is `link_dump`), but the connection
    // task ends once every handle is gone: kept for the events.
    _handle: rtnetlink::Handle,
    events: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl LinkWatcher {
    /// Must be called inside a tokio runtime (the connection is spawned).
    pub fn start() -> Result<Self, LinksError> {
        let (mut connection, handle, events) =
            rtnetlink::new_connection().map_err(LinksError::Socket)?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_LINK))
            .map_err(LinksError::Subscribe)?;
        tokio::spawn(connection);
        Ok(Self {
            _handle: handle,
            events,
        })
    }

    /// Waits for the next link event; None when the socket closed.
    pub async fn changed(&mut self) -> Option<LinkChange> {
        self.events
            .next()
            .await
            .map(|(message, _)| LinkChange::of(&message))
    }

    /// The events already queued, so a burst causes one resync.
    pub fn drain(&mut self) -> Vec<LinkChange> {
        let mut changes = Vec::new();
        while let Ok((message, _)) = self.events.try_recv() {
            changes.push(LinkChange::of(&message));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ifindex: u32, name: &str) -> LinkInfo {
        LinkInfo {
            ifindex,
            name: name.into(),
            mac: Some([0xfe, 0x54, 0, 0, 0, ifindex as u8]),
            oper_state: "up".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_topology_ignores_counters_and_state_but_not_names_or_bridges() {
        let before = vec![link(10, "tap0"), link(11, "tap1")];
        let base = Topology::of(&before);
        assert!(base.same_as(&before));
        let mut busier = before.clone();
        busier[0].stats = Some(NetdevStats {
            tx_packets: 99,
            ..Default::default()
        });
        busier[1].oper_state = "down".into();
        busier[1].carrier = true;
        assert!(base.same_as(&busier));

        let mut renamed = before.clone();
        renamed[1].name = "tap9".into();
        let mut bridged = before.clone();
        bridged[0].master = Some(3);
        let mut peered = before.clone();
        peered[0].link = Some(4);
        let mut gone = before.clone();
        gone.pop();
        let mut reused = before.clone();
        reused[1].ifindex = 12;
        let mut kind = before.clone();
        kind[0].kind = "veth".into();
        for changed in [renamed, bridged, peered, gone, reused, kind] {
            assert!(!base.same_as(&changed), "{changed:?}");
        }
    }

    fn matcher() -> InterfaceMatcher {
        InterfaceMatcher::parse_list("tap*,vnet*").unwrap()
    }

    #[test]
    fn attaches_matching_new_interfaces_only() {
        let present = [
            link(1, "lo"),
            link(2, "eth0"),
            link(5, "vnet0"),
            link(6, "tapab"),
        ];
        let p = plan(&BTreeMap::new(), &present, &matcher(), &BTreeMap::new());
        assert!(p.detach.is_empty());
        let names: Vec<_> = p.attach.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["vnet0", "tapab"]);
    }

    #[test]
    fn detaches_vanished_and_reused_ifindexes() {
        let attached = BTreeMap::from([(5, "vnet0".to_string()), (6, "vnet1".to_string())]);
        // vnet0 gone; ifindex 6 now belongs to a different tap.
        let present = [link(6, "vnet7")];
        let p = plan(&attached, &present, &matcher(), &BTreeMap::new());
        assert_eq!(p.detach, [5, 6]);
        assert_eq!(p.attach, [link(6, "vnet7")]);
    }

    #[test]
    fn steady_state_changes_nothing_and_failed_ones_are_not_retried() {
        let attached = BTreeMap::from([(5, "vnet0".to_string())]);
        let skip = BTreeMap::from([(6, "vnet1".to_string())]);
        let present = [link(5, "vnet0"), link(6, "vnet1")];
        assert_eq!(
            plan(&attached, &present, &matcher(), &skip),
            Plan::default()
        );
    }

    #[test]
    fn link_events_update_the_known_links_one_by_one() {
        let known = vec![link(5, "tap0"), link(6, "tap1")];
        let changes = [
            LinkChange::Removed(5),
            LinkChange::Changed(7),
            LinkChange::Changed(6),
            LinkChange::Changed(9),
        ];
        let got = apply_changes(known.clone(), &changes, |i| {
            Ok(match i {
                7 => Some(link(7, "tap2")),
                6 => Some(link(6, "tap1-renamed")),
                _ => None, // 9: already gone again
            })
        })
        .unwrap();
        let names: Vec<_> = got.iter().map(|l| (l.ifindex, l.name.as_str())).collect();
        assert_eq!(names, [(7, "tap2"), (6, "tap1-renamed")]);
        // A failed fetch, an unknown event or a burst: list everything.
        assert!(
            apply_changes(known.clone(), &[LinkChange::Changed(7)], |_| Err(
                std::io::Error::other("boom")
            ))
            .is_none()
        );
        assert!(apply_changes(known.clone(), &[LinkChange::Unknown], |_| Ok(None)).is_none());
        let burst: Vec<_> = (0..40).map(LinkChange::Changed).collect();
        assert!(apply_changes(known, &burst, |_| Ok(None)).is_none());
    }

    #[test]
    fn formats_macs_like_ip_link() {
        assert_eq!(
            format_mac(&[0xfe, 0x54, 0, 0x1a, 0xb, 0xff]),
            "fe:54:00:1a:0b:ff"
        );
    }
}
