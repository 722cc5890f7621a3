//! Everything the agent knows about one VM beyond its counters: the stall
//! detector, the DHCP tracker and the timeline that ties them together.

use crate::{
    dhcp::{DhcpMessage, DhcpNote, DhcpTracker},
    events::flag_names,
    stall::{Observation, RxStallDetector, Transition, VmState},
    timeline::{describe_note, describe_transition, note_kind, wall_clock, Entry, Timeline},
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
            dhcp: DhcpTracker::new(stall_after.as_secs_f64()),
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
        self.timeline
            .push(Entry {
                at: wall_clock(mono, now),
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

    /// ARP matters while the VM cannot receive: its who-has requests go
    /// unanswered as far as it can tell. Recorded only then, to keep the
    /// timeline about the incident.
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
        let text = match (from_vm, op) {
            (true, 1) => format!(
                "ARP who-has {} from the VM",
                std::net::Ipv4Addr::from(target)
            ),
            (false, 2) => format!(
                "ARP reply {} is-at ... queued toward the VM",
                std::net::Ipv4Addr::from(sender)
            ),
            _ => return None,
        };
        Some(self.entry(mono, now, "arp", text, None))
    }
}
