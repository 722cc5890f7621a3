//! The RX-stall state machine: one `RxStallDetector` per VM tap, fed one
//! `Observation` (cumulative counters) per poll. Pure logic, no kernel.
//!
//! The incident's signature: frames are offered toward the VM (tc egress)
//! but the VMM dequeues none, while the VM keeps sending. Both directions
//! silent is a paused VM (or a guest that took its interface down); a tap
//! without carrier has no VMM at all. Neither is this fault.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Frames toward the VM are being dequeued (or there are none).
    Ok,
    /// Frames wait, none dequeued for stall-after, the VM still sends.
    RxStalled,
    /// Frames wait, none dequeued, and the VM sends nothing either.
    Paused,
    /// The tap has no carrier: no VMM holds it.
    NoCarrier,
    /// No traffic either way for stall-after.
    Idle,
}

impl VmState {
    pub const ALL: [VmState; 5] = [
        VmState::Ok,
        VmState::RxStalled,
        VmState::Paused,
        VmState::NoCarrier,
        VmState::Idle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RxStalled => "rx_stalled",
            Self::Paused => "paused",
            Self::NoCarrier => "no_carrier",
            Self::Idle => "idle",
        }
    }
}

/// Cumulative counters of one tap at one instant (seconds on a monotonic clock).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    pub at: f64,
    /// Frames offered toward the VM (tc egress).
    pub offered: u64,
    /// Frames from the VM (tc ingress).
    pub from_vm: u64,
    /// Frames the VMM dequeued (dequeue tracepoint, else netdev tx_packets).
    pub dequeued: u64,
    /// The tap's netdev tx_packets: a second witness of dequeue progress.
    pub netdev_dequeued: u64,
    /// Frames dropped on their way to the VM.
    pub dropped_to_vm: u64,
    /// Of those, dropped because the tap's queue was full.
    pub full_ring_drops: u64,
    pub carrier: bool,
    /// The tap's queue length (txqueuelen): the most a backlog can be.
    pub queue_len: u32,
}

/// What changed, with the numbers behind it, for the log and the event stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub from: VmState,
    pub to: VmState,
    pub at: f64,
    /// Seconds since dequeueing stopped (0 when not stuck).
    pub stuck_for: f64,
    pub offered_while_stuck: u64,
    pub from_vm_while_stuck: u64,
    pub dropped_while_stuck: u64,
    pub backlog: u64,
}

impl Transition {
    pub fn describe(&self) -> String {
        match self.to {
            VmState::RxStalled => format!(
                "RX stalled: {} frames offered to the VM and none dequeued for {:.1}s while the VM \
                 sent {}; backlog {}, {} dropped",
                self.offered_while_stuck,
                self.stuck_for,
                self.from_vm_while_stuck,
                self.backlog,
                self.dropped_while_stuck
            ),
            VmState::Paused => format!(
                "silent both ways: {} frames wait undequeued for {:.1}s and the VM sent nothing \
                 (paused VM or guest interface down, not an RX stall)",
                self.offered_while_stuck, self.stuck_for
            ),
            VmState::NoCarrier => "tap has no carrier: no VMM holds it".to_owned(),
            VmState::Idle => "no traffic either way".to_owned(),
            VmState::Ok if self.from == VmState::RxStalled || self.from == VmState::Paused => {
                format!("dequeueing again (was {})", self.from.as_str())
            }
            VmState::Ok => "traffic flowing".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct StuckWindow {
    since: f64,
    offered: u64,
    from_vm: u64,
    dropped: u64,
}

/// Per-VM detector. Counters only ever grow; one going backwards (agent
/// map reset, interface recreated, wrap) rebases instead of producing a
/// huge or negative delta.
#[derive(Debug, Clone)]
pub struct RxStallDetector {
    stall_after: f64,
    prev: Option<Observation>,
    state: VmState,
    stuck: Option<StuckWindow>,
    last_activity: Option<f64>,
    /// Lowest offered - dequeued - dropped seen: the empty-queue baseline.
    backlog_floor: i128,
    backlog: u64,
    stalls_total: u64,
    stall_seconds: f64,
}

/// Polls run on a fixed grid; a few ms of timer jitter must not cost a
/// whole extra poll before a stall is reported.
const JITTER_TOLERANCE: f64 = 0.05;

fn delta(new: u64, old: u64) -> (u64, bool) {
    match new.checked_sub(old) {
        Some(d) => (d, false),
        None => (0, true),
    }
}

fn raw_backlog(o: &Observation) -> i128 {
    i128::from(o.offered) - i128::from(o.dequeued) - i128::from(o.dropped_to_vm)
}

impl RxStallDetector {
    pub fn new(stall_after: std::time::Duration) -> Self {
        Self {
            stall_after: stall_after.as_secs_f64(),
            prev: None,
            state: VmState::Idle,
            stuck: None,
            last_activity: None,
            backlog_floor: 0,
            backlog: 0,
            stalls_total: 0,
            stall_seconds: 0.0,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }
    pub fn backlog(&self) -> u64 {
        self.backlog
    }
    pub fn stalls_total(&self) -> u64 {
        self.stalls_total
    }
    pub fn stall_seconds(&self) -> f64 {
        self.stall_seconds
    }
    /// When frames started waiting undequeued, if they are.
    pub fn stuck_since(&self) -> Option<f64> {
        self.stuck.map(|s| s.since)
    }

    /// Feeds one poll's counters; returns the transition, if any.
    pub fn observe(&mut self, obs: Observation) -> Option<Transition> {
        let Some(prev) = self.prev.replace(obs) else {
            self.backlog_floor = raw_backlog(&obs);
            let initial = if obs.carrier {
                VmState::Idle
            } else {
                VmState::NoCarrier
            };
            return self.enter(initial, &obs);
        };
        let dt = (obs.at - prev.at).max(0.0);
        let (offered, r1) = delta(obs.offered, prev.offered);
        let (from_vm, r2) = delta(obs.from_vm, prev.from_vm);
        let (dequeued, r3) = delta(obs.dequeued, prev.dequeued);
        let (netdev_dequeued, r4) = delta(obs.netdev_dequeued, prev.netdev_dequeued);
        let (dropped, r5) = delta(obs.dropped_to_vm, prev.dropped_to_vm);
        let (full_ring, r6) = delta(obs.full_ring_drops, prev.full_ring_drops);
        let reset = r1 || r2 || r3 || r4 || r5 || r6;

        let raw = raw_backlog(&obs);
        self.backlog_floor = if reset {
            raw
        } else {
            self.backlog_floor.min(raw)
        };
        let mut backlog = u64::try_from(raw - self.backlog_floor).unwrap_or(0);
        if obs.queue_len > 0 {
            backlog = backlog.min(u64::from(obs.queue_len));
        }
        if full_ring > 0 {
            // Drops for a full ring mean the queue is at its limit, whatever
            // the counters since start say (e.g. an agent started mid-stall).
            backlog = backlog.max(u64::from(obs.queue_len));
        }
        self.backlog = backlog;

        if offered + from_vm + dequeued + netdev_dequeued > 0 {
            self.last_activity = Some(obs.at);
        }

        let progress = dequeued > 0 || netdev_dequeued > 0;
        let waiting = backlog > 0 || offered > 0 || full_ring > 0;
        if !obs.carrier || progress || !waiting {
            self.stuck = None;
        } else {
            let window = self.stuck.get_or_insert(StuckWindow {
                since: prev.at,
                ..Default::default()
            });
            window.offered += offered;
            window.from_vm += from_vm;
            window.dropped += dropped;
        }

        let stuck_for = self.stuck.map_or(0.0, |s| obs.at - s.since);
        let next = if !obs.carrier {
            VmState::NoCarrier
        } else if let Some(window) = self
            .stuck
            .filter(|_| stuck_for + JITTER_TOLERANCE >= self.stall_after)
        {
            if window.from_vm > 0 {
                VmState::RxStalled
            } else {
                VmState::Paused
            }
        } else if self
            .last_activity
            .is_some_and(|t| obs.at - t < self.stall_after)
        {
            VmState::Ok
        } else if self.state == VmState::RxStalled || self.state == VmState::Paused {
            // No longer stuck: that is recovery, even if nothing moves now.
            VmState::Ok
        } else {
            VmState::Idle
        };

        if self.state == VmState::RxStalled {
            // The stall lasted at least until the last poll and ended (if
            // it did) somewhere in this interval: count the interval.
            self.stall_seconds += dt;
        }
        self.enter(next, &obs)
    }

    fn enter(&mut self, next: VmState, obs: &Observation) -> Option<Transition> {
        if next == self.state {
            return None;
        }
        let window = self.stuck.unwrap_or_default();
        let stuck_for = self.stuck.map_or(0.0, |s| obs.at - s.since);
        if next == VmState::RxStalled {
            self.stalls_total += 1;
            // The stall began when dequeueing stopped, not when it was noticed.
            self.stall_seconds += stuck_for;
        }
        let transition = Transition {
            from: self.state,
            to: next,
            at: obs.at,
            stuck_for,
            offered_while_stuck: window.offered,
            from_vm_while_stuck: window.from_vm,
            dropped_while_stuck: window.dropped,
            backlog: self.backlog,
        };
        self.state = next;
        Some(transition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A scripted tap: per-second deltas applied to running totals.
    struct Tape {
        det: RxStallDetector,
        obs: Observation,
        transitions: Vec<Transition>,
    }

    impl Tape {
        fn new() -> Self {
            let obs = Observation {
                carrier: true,
                queue_len: 1000,
                ..Default::default()
            };
            let mut det = RxStallDetector::new(Duration::from_secs(3));
            let transitions = det.observe(obs).into_iter().collect();
            Self {
                det,
                obs,
                transitions,
            }
        }

        /// One poll, one second later: offered, dequeued, from the VM, full-ring drops.
        fn tick(&mut self, offered: u64, dequeued: u64, from_vm: u64, full_ring: u64) -> VmState {
            self.obs.at += 1.0;
            self.obs.offered += offered;
            self.obs.dequeued += dequeued;
            self.obs.netdev_dequeued += dequeued;
            self.obs.from_vm += from_vm;
            self.obs.dropped_to_vm += full_ring;
            self.obs.full_ring_drops += full_ring;
            if let Some(t) = self.det.observe(self.obs) {
                self.transitions.push(t);
            }
            self.det.state()
        }

        fn states(&self) -> Vec<VmState> {
            self.transitions.iter().map(|t| t.to).collect()
        }
    }

    #[test]
    fn healthy_traffic_is_ok_and_heavy_load_never_stalls() {
        let mut tape = Tape::new();
        for _ in 0..600 {
            // Line rate, with the VMM a little behind and the ring dropping:
            // still dequeueing, so never a stall.
            assert_eq!(tape.tick(90_000, 85_000, 80_000, 5_000), VmState::Ok);
        }
        assert_eq!(tape.det.stalls_total(), 0);
        assert_eq!(tape.states(), [VmState::Ok]);
    }

    #[test]
    fn a_stall_is_reported_within_stall_after_plus_two_polls_and_recovers_at_once() {
        let mut tape = Tape::new();
        for _ in 0..5 {
            tape.tick(50, 50, 40, 0);
        }
        // t=5: the VMM stops reading; the VM keeps sending.
        let stalled_at = tape.obs.at;
        let mut detected = None;
        for _ in 0..10 {
            if tape.tick(50, 0, 40, 0) == VmState::RxStalled && detected.is_none() {
                detected = Some(tape.obs.at);
            }
        }
        let latency = detected.expect("stall never detected") - stalled_at;
        assert!(latency <= 3.0 + 2.0, "detected after {latency}s");
        assert_eq!(tape.det.backlog(), 500);
        // Recovery: the VMM drains again.
        assert_eq!(tape.tick(50, 550, 40, 0), VmState::Ok);
        assert_eq!(tape.det.backlog(), 0);
        assert_eq!(tape.det.stalls_total(), 1);
        assert!(
            tape.det.stall_seconds() >= 9.0,
            "{}",
            tape.det.stall_seconds()
        );
        let stall = tape
            .transitions
            .iter()
            .find(|t| t.to == VmState::RxStalled)
            .unwrap();
        assert!(
            stall.describe().contains("none dequeued"),
            "{}",
            stall.describe()
        );
    }

    #[test]
    fn backlog_fills_to_the_queue_length_then_drops_and_one_episode_counts_once() {
        let mut tape = Tape::new();
        tape.tick(10, 10, 5, 0);
        for _ in 0..4 {
            tape.tick(300, 0, 5, 0);
        }
        assert_eq!(tape.det.backlog(), 1000, "capped at txqueuelen");
        for _ in 0..20 {
            tape.tick(300, 0, 5, 300);
        }
        assert_eq!(tape.det.state(), VmState::RxStalled);
        assert_eq!(tape.det.backlog(), 1000);
        assert_eq!(tape.det.stalls_total(), 1);
        tape.tick(10, 1010, 5, 0);
        for _ in 0..5 {
            tape.tick(300, 0, 5, 0);
        }
        assert_eq!(tape.det.stalls_total(), 2, "a second episode counts again");
    }

    #[test]
    fn a_paused_vm_is_paused_never_rx_stalled_even_with_a_full_queue() {
        let mut tape = Tape::new();
        tape.tick(10, 10, 10, 0);
        for _ in 0..30 {
            tape.tick(300, 0, 0, 300);
        }
        assert_eq!(tape.det.state(), VmState::Paused);
        assert!(!tape.states().contains(&VmState::RxStalled));
        assert_eq!(tape.tick(10, 1000, 10, 0), VmState::Ok);
    }

    #[test]
    fn a_quiet_stalled_vm_is_caught_when_it_sends_its_next_retry() {
        let mut tape = Tape::new();
        tape.tick(1, 1, 1, 0);
        // One DHCP ACK offered, never dequeued; the VM is silent for a while.
        tape.tick(1, 0, 0, 0);
        for _ in 0..4 {
            tape.tick(0, 0, 0, 0);
        }
        assert_eq!(tape.det.state(), VmState::Paused);
        // Its renewal retry goes out: the VM is alive, its RX is not.
        assert_eq!(tape.tick(0, 0, 1, 0), VmState::RxStalled);
    }

    #[test]
    fn idle_and_slow_but_draining_vms_do_not_stall() {
        let mut tape = Tape::new();
        for _ in 0..10 {
            assert_ne!(tape.tick(0, 0, 0, 0), VmState::RxStalled);
        }
        assert_eq!(tape.det.state(), VmState::Idle);
        // A slow VMM: one frame every two seconds, but it does drain.
        for i in 0..30 {
            let deq = if i % 2 == 0 { 1 } else { 0 };
            tape.tick(1, deq, 1, 0);
        }
        assert_ne!(tape.det.state(), VmState::RxStalled);
        assert_eq!(tape.det.stalls_total(), 0);
    }

    #[test]
    fn no_carrier_wins_and_is_not_a_stall() {
        let mut tape = Tape::new();
        tape.tick(10, 10, 10, 0);
        tape.obs.carrier = false;
        for _ in 0..10 {
            assert_eq!(tape.tick(50, 0, 0, 50), VmState::NoCarrier);
        }
        assert_eq!(tape.det.stalls_total(), 0);
    }

    #[test]
    fn counters_going_backwards_rebase_without_false_alarms() {
        let mut tape = Tape::new();
        for _ in 0..5 {
            tape.tick(100, 100, 100, 0);
        }
        // The map was cleared (or a counter wrapped): everything restarts low.
        tape.obs.offered = 3;
        tape.obs.dequeued = 0;
        tape.obs.netdev_dequeued = 0;
        tape.obs.from_vm = 2;
        assert_ne!(tape.tick(0, 0, 0, 0), VmState::RxStalled);
        for _ in 0..5 {
            assert_eq!(tape.tick(100, 100, 100, 0), VmState::Ok);
        }
        assert_eq!(tape.det.backlog(), 0);
        assert_eq!(tape.det.stalls_total(), 0);
    }

    #[test]
    fn an_agent_restarted_mid_stall_sees_the_stall_from_full_ring_drops() {
        // Fresh detector, the tap's queue already full: every offered frame
        // is dropped, nothing dequeued, the VM still sends.
        let mut tape = Tape::new();
        let mut detected = None;
        for _ in 0..8 {
            if tape.tick(200, 0, 3, 200) == VmState::RxStalled && detected.is_none() {
                detected = Some(tape.obs.at);
            }
        }
        assert!(detected.is_some_and(|t| t <= 5.0), "{detected:?}");
        assert_eq!(tape.det.backlog(), 1000);
    }

    #[test]
    fn netdev_progress_alone_counts_as_dequeueing() {
        let mut tape = Tape::new();
        for _ in 0..10 {
            tape.obs.netdev_dequeued += 50;
            assert_ne!(tape.tick(50, 0, 10, 0), VmState::RxStalled);
        }
    }
}
