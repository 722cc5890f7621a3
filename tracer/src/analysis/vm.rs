//! Everything the agent knows about one VM beyond its counters: the stall
//! detector, the DHCP tracker and the timeline that ties them together.

use crate::{
    analysis::dhcp::{flag_names, DhcpMessage, DhcpNote, DhcpTracker},
    analysis::stall::{Observation, RxStallDetector, Transition, VmState},
    analysis::timeline::{
        describe_note, describe_transition, note_kind, wall_clock, Entry, Timeline,
    },
};

pub struct VmRecord {
    pub iface: String,
    pub detector: RxStallDetector,
    pub dhcp: DhcpTracker,
    pub timeline: Timeline,
}

impl VmRecord {
    pub fn new(iface: &str, stall_after: std::time::Duration) -> Self {
        Self {
            iface: iface.to_owned(),
            detector: RxStallDetector::new(stall_after),
            dhcp: DhcpTracker::new(stall_after.as_secs_f64()).for_tap(iface),
            timeline: Timeline::default(),
        }
    }

    fn entry(
        &mut self,
        mono: f64,
        now: f64,
        kind: &'static str,
        text: String,
        detail: Option<serde_json::Value>,
    ) -> Entry {
        let at = wall_clock(mono, now);
        self.timeline
            .push(Entry {
                at,
                last_at: at,
                mono,
                iface: self.iface.clone(),
                kind,
                text,
                repeats: 0,
                detail,
            })
            .clone()
    }

    fn notes_to_entries(&mut self, notes: Vec<DhcpNote>, mono: f64, now: f64) -> Vec<Entry> {
        notes
            .into_iter()
            .map(|note| {
                let detail = serde_json::to_value(&note).ok();
                self.entry(mono, now, note_kind(&note), describe_note(&note), detail)
            })
            .collect()
    }

    /// One poll: the stall detector, then DHCP timeouts and lease expiry.
    pub fn poll(&mut self, observation: Observation, now: f64) -> (Option<Transition>, Vec<Entry>) {
        let transition = self.detector.observe(observation);
        let mut entries = Vec::new();
        if let Some(t) = &transition {
            let detail = serde_json::to_value(t).ok();
            // A stall began when dequeueing stopped, not when it was noticed.
            let at = if t.to == VmState::RxStalled {
                now - t.stuck_for
            } else {
                now
            };
            entries.push(self.entry(at, now, "stall", describe_transition(t), detail));
        }
        let notes = self.dhcp.tick(now, self.detector.state());
        entries.extend(self.notes_to_entries(notes, now, now));
        (transition, entries)
    }

    pub fn dhcp_message(&mut self, message: &DhcpMessage, mono: f64, now: f64) -> Vec<Entry> {
        let notes = self.dhcp.observe(message, mono, self.detector.state());
        self.notes_to_entries(notes, mono, now)
    }

    pub fn malformed(&mut self, mono: f64, now: f64, from_vm: bool, flags: u16) -> Entry {
        self.dhcp.note_malformed();
        let who = if from_vm {
            "from the VM"
        } else {
            "toward the VM"
        };
        let text = format!(
            "malformed DHCP frame {who} ({})",
            flag_names(flags).join(", ")
        );
        self.entry(mono, now, "dhcp_malformed", text, None)
    }

    /// ARP for its DHCP server matters while the VM cannot receive: its
    /// who-has requests go unanswered as far as it can tell, and without an
    /// answer its unicast renewal cannot even leave. Other ARP is not
    /// recorded (it would crowd the DHCP story out of the bounded history).
    pub fn arp(
        &mut self,
        mono: f64,
        now: f64,
        from_vm: bool,
        op: u8,
        sender: [u8; 4],
        target: [u8; 4],
    ) -> Option<Entry> {
        let state = self.detector.state();
        if !(state == VmState::RxStalled || state == VmState::Paused) {
            return None;
        }
        let server: std::net::Ipv4Addr = self.dhcp.lease()?.server.parse().ok()?;
        let text = match (from_vm, op) {
            (true, 1) if std::net::Ipv4Addr::from(target) == server => {
                format!("ARP who-has {server} (the DHCP server) from the VM")
            }
            (false, 2) if std::net::Ipv4Addr::from(sender) == server => {
                format!("ARP reply from {server} (the DHCP server) queued toward the VM")
            }
            _ => return None,
        };
        Some(self.entry(mono, now, "arp", text, None))
    }
}
