//! A bounded per-VM history of what happened, in words, for `hvnet
//! explain` and the event stream. Memory bound: at most `MAX_ENTRIES`
//! entries per VM; a repeat of the last entry is folded into it ("x12").

use std::{collections::VecDeque, time::SystemTime};

use serde::Serialize;

use crate::{
    analysis::dhcp::{ClientState, DhcpNote, MessageType},
    analysis::stall::{Transition, VmState},
};

pub const MAX_ENTRIES: usize = 128;
/// How far back (entries) and how long ago (seconds) a repeat may fold.
const FOLD_LOOKBACK: usize = 4;
const FOLD_WINDOW: f64 = 600.0;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Unix time (seconds) of the first occurrence.
    pub at: f64,
    /// Agent-monotonic seconds, for ordering and durations.
    #[serde(skip)]
    pub mono: f64,
    pub iface: String,
    pub kind: &'static str,
    pub text: String,
    pub repeats: u32,
    /// Unix time of the latest repeat (equals `at` when none).
    pub last_at: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Default)]
pub struct Timeline {
    entries: VecDeque<Entry>,
}

/// Unix seconds for an agent-monotonic instant.
pub fn wall_clock(mono: f64, now_mono: f64) -> f64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    now - (now_mono - mono)
}

/// HH:MM:SS (UTC) of a unix time.
pub fn clock(unix: f64) -> String {
    let secs = unix.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

impl Timeline {
    pub fn push(&mut self, entry: Entry) -> &Entry {
        // Fold a repeat into a recent identical entry (not just the last:
        // ARP requests and replies alternate during a stall).
        let recent = self.entries.iter().rev().take(FOLD_LOOKBACK).position(|e| {
            e.kind == entry.kind && e.text == entry.text && entry.mono - e.mono < FOLD_WINDOW
        });
        if let Some(back) = recent {
            let index = self.entries.len() - 1 - back;
            self.entries[index].repeats += 1;
            self.entries[index].last_at = entry.at;
            return &self.entries[index];
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
        // Non-empty here by construction.
        &self.entries[self.entries.len() - 1]
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn hex(xid: u32) -> String {
    format!("0x{xid:08x}")
}

fn state_words(state: Option<ClientState>) -> &'static str {
    match state {
        Some(ClientState::Selecting) => "discovery",
        Some(ClientState::Requesting) => "request for the offered address",
        Some(ClientState::Renewing) => "renewal",
        Some(ClientState::Rebinding) => "rebinding request",
        Some(ClientState::Rebooting) => "init-reboot request",
        None => "message",
    }
}

/// Words for a stall detector transition.
pub fn describe_transition(t: &Transition) -> String {
    match t.to {
        VmState::RxStalled => format!(
            "RX stalled (backlog {}, {} frames offered and none dequeued for {:.0} s, {} dropped; the VM still sends)",
            t.backlog, t.offered_while_stuck, t.stuck_for, t.dropped_while_stuck
        ),
        VmState::Ok if t.from == VmState::RxStalled => "RX recovered: the VMM dequeues again".to_owned(),
        _ => format!("{} -> {}: {}", t.from.as_str(), t.to.as_str(), t.describe()),
    }
}

/// Words for a DHCP note.
pub fn describe_note(note: &DhcpNote) -> String {
    match note {
        DhcpNote::ClientMessage {
            message,
            state,
            xid,
            to,
            retry,
            during_stall,
        } => {
            let what = match message {
                MessageType::Request | MessageType::Discover => state_words(*state).to_owned(),
                other => other.as_str().to_uppercase(),
            };
            let how = if to == "255.255.255.255" {
                "broadcast".to_owned()
            } else {
                format!("unicast to {to}")
            };
            let retry = if *retry > 0 {
                format!(" (retry #{retry})")
            } else {
                String::new()
            };
            let stall = if *during_stall {
                " while RX is stalled"
            } else {
                ""
            };
            format!("{what} xid {} sent {how}{retry}{stall}", hex(*xid))
        }
        DhcpNote::ReplyQueued {
            message,
            xid,
            yiaddr,
            path,
        } => {
            let via = if path.is_empty() {
                String::new()
            } else {
                format!(" (seen on {})", join_hops(path))
            };
            format!(
                "{} xid {} for {yiaddr} queued toward the VM{via}",
                message.as_str().to_uppercase(),
                hex(*xid)
            )
        }
        DhcpNote::ReplyLostOnNode {
            message,
            xid,
            path,
            dropped_at,
            at_hop,
            reason,
        } => {
            let fate = match (dropped_at, reason) {
                (Some(at), Some(reason)) if *at_hop => format!("dropped at {at} (reason {reason})"),
                (Some(at), Some(reason)) => format!("dropped before {at} (reason {reason})"),
                _ => "never reached the tap (no drop reason from the kernel)".to_owned(),
            };
            format!(
                "{} xid {} seen on {}, {fate}: lost on this node",
                reply_name(*message),
                hex(*xid),
                join_hops(path)
            )
        }
        DhcpNote::ReplyDelivered {
            message,
            xid,
            after_secs,
            late,
        } => {
            let late = if *late {
                format!(" late, after {after_secs:.0} s")
            } else {
                String::new()
            };
            format!(
                "{} xid {} dequeued by the VMM (delivered{late})",
                message.as_str().to_uppercase(),
                hex(*xid)
            )
        }
        DhcpNote::ReplyUndelivered {
            message,
            xid,
            waiting_secs,
            vm_state,
        } => format!(
            "{} xid {} not dequeued after {waiting_secs:.0} s (VM {})",
            message.as_str().to_uppercase(),
            hex(*xid),
            vm_state.as_str()
        ),
        DhcpNote::ReplyDropped {
            message,
            xid,
            reason,
            vm_state,
        } => format!(
            "{} xid {} dropped before reaching the VM ({reason}, VM {})",
            reply_name(*message),
            hex(*xid),
            vm_state.as_str()
        ),
        DhcpNote::ReplyUnprocessed { xid, after_secs } => format!(
            "the VM asked again {after_secs:.0} s after the VMM dequeued ACK xid {}: the guest never \
             took it in (its RX ring is not being processed; once, it may be a guest that dropped it)",
            hex(*xid)
        ),
        DhcpNote::TransactionDone {
            xid,
            verdict,
            attempts,
            request_path,
            ..
        } => {
            let left = if request_path.is_empty() {
                String::new()
            } else {
                format!(" (the request was seen on {})", join_hops(request_path))
            };
            format!(
                "transaction xid {} ended: {} after {attempts} attempt(s){left}",
                hex(*xid),
                verdict.as_str()
            )
        }
        DhcpNote::LeaseGranted {
            address,
            secs,
            server,
        } => {
            format!("lease {address} for {secs} s from {server} reached the VM")
        }
        DhcpNote::LeaseExpired { address } => {
            format!("lease on {address} expired: the VM has lost its address")
        }
        DhcpNote::Released { address } => format!("the VM released {address}"),
    }
}

/// "ACK", or "reply" when only a drop reported it (the drop tracepoint
/// reads no options, so no message type).
fn reply_name(message: MessageType) -> String {
    match message {
        MessageType::Other => "reply".to_owned(),
        known => known.as_str().to_uppercase(),
    }
}

/// "eth0 (VLAN 100) and br-int", "eth0, br-int and qbr1".
fn join_hops(path: &[String]) -> String {
    match path {
        [] => "no hop".to_owned(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

pub fn note_kind(note: &DhcpNote) -> &'static str {
    match note {
        DhcpNote::ClientMessage { .. } => "dhcp_client",
        DhcpNote::ReplyQueued { .. } => "dhcp_reply_queued",
        DhcpNote::ReplyDelivered { .. } => "dhcp_reply_delivered",
        DhcpNote::ReplyUndelivered { .. } => "dhcp_reply_undelivered",
        DhcpNote::ReplyDropped { .. } => "dhcp_reply_dropped",
        DhcpNote::ReplyLostOnNode { .. } => "dhcp_reply_lost_on_node",
        DhcpNote::ReplyUnprocessed { .. } => "dhcp_reply_unprocessed",
        DhcpNote::TransactionDone { .. } => "dhcp_verdict",
        DhcpNote::LeaseGranted { .. } => "dhcp_lease",
        DhcpNote::LeaseExpired { .. } => "dhcp_lease_expired",
        DhcpNote::Released { .. } => "dhcp_release",
    }
}

/// What `hvnet explain` prints for one VM.
pub struct Explanation<'a> {
    pub iface: &'a str,
    pub vm_name: &'a str,
    pub state: Option<VmState>,
    pub stuck_since: Option<f64>,
    pub retries_during_stall: u64,
    pub replies_undelivered: u64,
    pub replies_unprocessed: u64,
    /// Replies seen on the node's hops that never reached the tap.
    pub replies_lost_on_node: u64,
    /// Why the path beyond the tap is not visible (e.g. an OVS port).
    pub unseen_path: Option<&'a str>,
    pub lease: Option<(String, f64, bool)>,
    pub now_unix: f64,
    /// Who the VM is beyond its name (uuid, MAC, VMM pid, vhost workers),
    /// printed under the headline when known.
    pub identity: &'a str,
}

pub fn render_explanation(e: &Explanation<'_>, timeline: &Timeline) -> String {
    let mut out = String::new();
    let state = e.state.map_or("unknown", VmState::as_str);
    let mut headline = format!("VM {} ({}): {state}", e.vm_name, e.iface);
    if let (Some(VmState::RxStalled), Some(since)) = (e.state, e.stuck_since) {
        headline.push_str(&format!(" since {} UTC", clock(since)));
    }
    if e.retries_during_stall > 0 || e.replies_undelivered > 0 {
        headline.push_str(&format!(
            "; {} DHCP retries during RX stalls, {} replies never delivered",
            e.retries_during_stall, e.replies_undelivered
        ));
    }
    if e.replies_unprocessed > 0 {
        headline.push_str(&format!(
            "; {} ACKs handed to the VM were asked for again (the guest is not processing its RX ring)",
            e.replies_unprocessed
        ));
    }
    if e.replies_lost_on_node > 0 {
        headline.push_str(&format!(
            "; {} DHCP replies reached this node but were lost before the tap",
            e.replies_lost_on_node
        ));
    }
    let lease_gone = e
        .lease
        .as_ref()
        .is_some_and(|(_, remaining, expired)| *expired || *remaining <= 0.0);
    match &e.lease {
        Some((address, _, _)) if lease_gone => {
            headline.push_str(&format!("; lease on {address} EXPIRED"))
        }
        Some((address, remaining, _)) => {
            headline.push_str(&format!("; lease on {address} expires in {remaining:.0} s"))
        }
        None => headline.push_str("; lease unknown (no ACK seen reaching the VM yet)"),
    }
    out.push_str(&headline);
    out.push('\n');
    if !e.identity.is_empty() {
        out.push_str(&format!("  ({})\n", e.identity));
    }
    if let Some(why) = e.unseen_path {
        out.push_str(&format!(
            "  (the path beyond the tap is not visible: {why}; hvnet follows Linux bridges only, \
             so a lost reply there reads as no_reply)\n"
        ));
    }
    for entry in timeline.entries() {
        let repeats = if entry.repeats > 0 {
            format!(" (x{})", entry.repeats + 1)
        } else {
            String::new()
        };
        out.push_str(&format!("  {} {}{repeats}\n", clock(entry.at), entry.text));
    }
    match (&e.lease, e.state) {
        (Some((address, _, _)), _) if lease_gone => out.push_str(&format!(
            "  now: the VM has no lease on {address}; it will DISCOVER again once it can receive\n"
        )),
        (Some((address, remaining, _)), Some(VmState::RxStalled)) => out.push_str(&format!(
            "  {} lease on {address} expires - the VM will lose its address unless its RX queue drains\n",
            clock(e.now_unix + remaining)
        )),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str, mono: f64) -> Entry {
        Entry {
            at: 1_764_000_000.0 + mono,
            mono,
            iface: "tap0".into(),
            kind: "test",
            text: text.into(),
            repeats: 0,
            last_at: 1_764_000_000.0 + mono,
            detail: None,
        }
    }

    #[test]
    fn repeats_fold_and_the_history_is_bounded() {
        let mut t = Timeline::default();
        t.push(entry("ARP who-has 10.250.0.1", 0.0));
        t.push(entry("ARP reply 10.250.0.1", 0.5));
        t.push(entry("ARP who-has 10.250.0.1", 1.0));
        t.push(entry("ARP reply 10.250.0.1", 1.5));
        assert_eq!(t.len(), 2, "alternating repeats fold");
        assert_eq!(t.entries().next().unwrap().repeats, 1);
        for i in 0..10_000 {
            t.push(entry(&format!("event {i}"), f64::from(i)));
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        assert_eq!(t.entries().last().unwrap().text, "event 9999");
    }

    #[test]
    fn clock_is_utc_hh_mm_ss() {
        assert_eq!(clock(3600.0 * 10.0 + 62.0), "10:01:02");
    }

    #[test]
    fn a_lost_reply_names_its_hops_and_an_unseen_path_is_said() {
        let note = DhcpNote::ReplyLostOnNode {
            message: MessageType::Ack,
            xid: 0x1b4c_1072,
            path: vec!["eth0 (VLAN 100)".into(), "br-int".into()],
            dropped_at: Some("tap3".into()),
            at_hop: false,
            reason: Some("netfilter_drop".into()),
        };
        assert_eq!(
            describe_note(&note),
            "ACK xid 0x1b4c1072 seen on eth0 (VLAN 100) and br-int, dropped before tap3 \
             (reason netfilter_drop): lost on this node"
        );
        let mut t = Timeline::default();
        t.push(entry("DISCOVER xid 0x1 sent broadcast", 0.0));
        let text = render_explanation(
            &Explanation {
                iface: "tap3",
                vm_name: "db-3",
                state: Some(VmState::Ok),
                stuck_since: None,
                retries_during_stall: 0,
                replies_undelivered: 0,
                replies_unprocessed: 0,
                replies_lost_on_node: 2,
                unseen_path: Some("its master ovs-system is openvswitch"),
                lease: None,
                now_unix: 0.0,
                identity: "",
            },
            &t,
        );
        assert!(
            text.contains("; 2 DHCP replies reached this node but were lost before the tap"),
            "{text}"
        );
        assert!(
            text.contains(
                "the path beyond the tap is not visible: its master ovs-system is openvswitch"
            ),
            "{text}"
        );
    }

    #[test]
    fn explanation_names_the_stall_retries_and_the_lease_deadline() {
        let mut t = Timeline::default();
        t.push(entry("RX stalled (backlog 1000, ...)", 0.0));
        let text = render_explanation(
            &Explanation {
                iface: "tap0",
                vm_name: "web-1",
                state: Some(VmState::RxStalled),
                stuck_since: Some(36_000.0 + 133.0),
                retries_during_stall: 3,
                replies_undelivered: 3,
                replies_unprocessed: 0,
                replies_lost_on_node: 0,
                unseen_path: None,
                lease: Some(("10.250.0.150".into(), 41.0, false)),
                now_unix: 36_000.0 + 200.0,
                identity: "uuid u-1, VMM pid 4242",
            },
            &t,
        );
        assert!(
            text.starts_with("VM web-1 (tap0): rx_stalled since 10:02:13 UTC; 3 DHCP retries"),
            "{text}"
        );
        assert!(text.contains("expires in 41 s"));
        assert!(text.contains("\n  (uuid u-1, VMM pid 4242)\n"), "{text}");
        assert!(
            text.contains("10:04:01 lease on 10.250.0.150 expires - the VM will lose its address"),
            "{text}"
        );
    }
}
