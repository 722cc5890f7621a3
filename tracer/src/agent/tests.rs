//! The agent's orchestration over a fake kernel side: which taps are
//! attached, which wait and why, what is retried, what a scrape shows, and
//! what is left behind when taps go.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tracer_common::{class, direction, CounterValue, TrafficCounters};

use super::{AgentState, ProbeInfo, TapAttachments, TapCounters};
use crate::{
    config::{Config, FileConfig, FlagOverrides},
    interfaces::links::LinkInfo,
    kernel::collect::KernelSnapshot,
};

/// What the fake kernel side was asked, and how it answers.
#[derive(Default)]
struct Kernel {
    attached: BTreeMap<u32, String>,
    attach_attempts: BTreeMap<String, u32>,
    /// Tap name -> the error its next attaches return.
    attach_errors: BTreeMap<String, String>,
    /// ifindexes that get no counter slot.
    no_slot: BTreeSet<u32>,
    monitored: BTreeSet<u32>,
    forgotten: Vec<u32>,
    traffic: BTreeMap<u32, TrafficCounters>,
    /// Hops with programs attached, and hops the drop probe follows.
    hops: BTreeMap<u32, String>,
    followed: BTreeSet<u32>,
}

type Shared = Arc<Mutex<Kernel>>;

struct FakeAttachments(Shared);
struct FakeCounters(Shared);

fn kernel(shared: &Shared) -> std::sync::MutexGuard<'_, Kernel> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TapAttachments for FakeAttachments {
    fn attach(&mut self, ifindex: u32, name: &str) -> Result<(), String> {
        let mut k = kernel(&self.0);
        *k.attach_attempts.entry(name.to_owned()).or_default() += 1;
        if let Some(err) = k.attach_errors.get(name) {
            return Err(err.clone());
        }
        k.attached.insert(ifindex, name.to_owned());
        Ok(())
    }

    fn attach_hop(&mut self, ifindex: u32, name: &str) -> Result<(), String> {
        kernel(&self.0).hops.insert(ifindex, name.to_owned());
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) -> Option<String> {
        let mut k = kernel(&self.0);
        k.attached
            .remove(&ifindex)
            .or_else(|| k.hops.remove(&ifindex))
    }

    fn detach_all(&mut self) -> usize {
        let mut k = kernel(&self.0);
        let count = k.attached.len();
        k.attached.clear();
        count
    }
}

impl TapCounters for FakeCounters {
    fn monitor(&mut self, ifindex: u32) -> Result<(), String> {
        let mut k = kernel(&self.0);
        if k.no_slot.contains(&ifindex) {
            return Err("VM_COUNTERS is full".into());
        }
        k.monitored.insert(ifindex);
        Ok(())
    }

    fn forget_interfaces(&mut self, ifindexes: &[u32]) {
        let mut k = kernel(&self.0);
        for ifindex in ifindexes {
            k.monitored.remove(ifindex);
            k.traffic.remove(ifindex);
        }
        k.forgotten.extend_from_slice(ifindexes);
    }

    fn follow_hop(&mut self, ifindex: u32) -> Result<(), String> {
        kernel(&self.0).followed.insert(ifindex);
        Ok(())
    }

    fn forget_hop(&mut self, ifindex: u32) {
        kernel(&self.0).followed.remove(&ifindex);
    }

    fn read(&self) -> KernelSnapshot {
        let k = kernel(&self.0);
        KernelSnapshot {
            traffic: k
                .traffic
                .iter()
                .filter(|(ifindex, _)| k.monitored.contains(ifindex))
                .map(|(i, t)| (*i, *t))
                .collect(),
            map_update_failures: Some(Default::default()),
            probe_read_errors: Some(0),
            ..Default::default()
        }
    }
}

/// An agent watching `tap*`, at most `max` taps, over a fake kernel; the
/// identity sources point at an empty directory.
fn agent(max: u64, grace: &str) -> (AgentState, Shared, Config) {
    let empty = std::env::temp_dir().join(format!("hvnet-agent-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&empty);
    let config = Config::resolve(
        FileConfig::default(),
        FlagOverrides {
            interfaces: Some("tap*".into()),
            max_interfaces: Some(max),
            series_grace: Some(grace.into()),
            libvirt_run_dir: Some(empty.clone()),
            proc_root: Some(empty),
            ..Default::default()
        },
    )
    .expect("a valid test configuration");
    let shared = Shared::default();
    let state = AgentState::with_kernel_side(
        Box::new(FakeAttachments(shared.clone())),
        Box::new(FakeCounters(shared.clone())),
        ProbeInfo {
            mechanism: "tcx",
            ..Default::default()
        },
        &config,
    );
    (state, shared, config)
}

fn tap(ifindex: u32, name: &str) -> LinkInfo {
    LinkInfo {
        ifindex,
        name: name.into(),
        oper_state: "up".into(),
        admin_up: true,
        carrier: true,
        txqueuelen: 1000,
        ..Default::default()
    }
}

fn waiting(state: &AgentState, reason: &str) -> usize {
    let view = state.exposition().expect("an exposition");
    view.waiting
        .iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| *n)
        .expect("every wait reason is reported")
}

#[test]
fn taps_beyond_capacity_wait_and_attach_when_room_frees() {
    let (state, shared, config) = agent(2, "0s");
    let present = vec![
        tap(10, "tap0"),
        tap(11, "tap1"),
        tap(12, "tap2"),
        tap(13, "eth0"),
    ];
    state.reconcile(&present, &config);
    assert_eq!(state.interface_count(), 2);
    assert_eq!(waiting(&state, "capacity"), 1);
    assert_eq!(waiting(&state, "fd_limit"), 0);
    // Every attached tap got its counter slot first; eth0 was never touched.
    let k = kernel(&shared);
    assert_eq!(k.attached.values().collect::<Vec<_>>(), ["tap0", "tap1"]);
    assert_eq!(k.monitored, BTreeSet::from([10, 11]));
    assert!(!k.attach_attempts.contains_key("eth0"));
    drop(k);

    // tap0 goes: it is detached and forgotten, and tap2 takes its place.
    state.reconcile(&present[1..], &config);
    let k = kernel(&shared);
    assert_eq!(k.attached.values().collect::<Vec<_>>(), ["tap1", "tap2"]);
    assert!(k.forgotten.contains(&10));
    assert!(!k.monitored.contains(&10));
    drop(k);
    assert_eq!(waiting(&state, "capacity"), 0);
}

#[test]
fn a_failed_attach_is_counted_once_and_retried_only_when_the_tap_is_recreated() {
    let (state, shared, config) = agent(16, "0s");
    kernel(&shared).attach_errors.insert(
        "tap1".into(),
        "attaching to tap1: Permission denied (os error 13)".into(),
    );
    let present = vec![tap(10, "tap0"), tap(11, "tap1")];
    state.reconcile(&present, &config);
    state.reconcile(&present, &config);
    assert_eq!(state.interface_count(), 1);
    assert_eq!(
        state.exposition().expect("an exposition").attach_failures,
        1
    );
    assert_eq!(kernel(&shared).attach_attempts["tap1"], 1, "not retried");
    // Its slot was handed back.
    assert!(!kernel(&shared).monitored.contains(&11));

    // Recreated (a new ifindex): a new attempt, which now works.
    kernel(&shared).attach_errors.clear();
    state.reconcile(&[tap(10, "tap0"), tap(21, "tap1")], &config);
    assert_eq!(kernel(&shared).attach_attempts["tap1"], 2);
    assert_eq!(state.interface_count(), 2);
}

#[test]
fn running_out_of_descriptors_waits_and_is_retried_every_poll() {
    let (state, shared, config) = agent(16, "0s");
    kernel(&shared).attach_errors.insert(
        "tap0".into(),
        "attaching to tap0: Too many open files (os error 24)".into(),
    );
    let present = vec![tap(10, "tap0")];
    state.reconcile(&present, &config);
    assert_eq!(state.interface_count(), 0);
    assert_eq!(waiting(&state, "fd_limit"), 1);
    assert_eq!(
        state.exposition().expect("an exposition").attach_failures,
        0
    );

    kernel(&shared).attach_errors.clear();
    state.reconcile(&present, &config);
    assert_eq!(state.interface_count(), 1);
    assert_eq!(waiting(&state, "fd_limit"), 0);
}

/// A tap that gets no counter slot is not attached (its counts would be
/// lost) and is counted as failed. This path once locked the maps twice.
#[test]
fn a_tap_without_a_counter_slot_is_refused_not_attached_blind() {
    let (state, shared, config) = agent(16, "0s");
    kernel(&shared).no_slot.insert(11);
    state.reconcile(&[tap(10, "tap0"), tap(11, "tap1")], &config);
    let k = kernel(&shared);
    assert!(!k.attach_attempts.contains_key("tap1"), "tc attach tried");
    assert!(k.forgotten.contains(&11));
    drop(k);
    assert_eq!(state.interface_count(), 1);
    assert_eq!(
        state.exposition().expect("an exposition").attach_failures,
        1
    );
}

#[test]
fn a_scrape_shows_each_taps_counters_and_a_departed_taps_final_ones() {
    let (state, shared, config) = agent(16, "60s");
    let mut traffic = TrafficCounters::default();
    traffic.by_direction_class[usize::from(direction::TO_VM)][usize::from(class::OTHER)] =
        CounterValue {
            packets: 7,
            bytes: 700,
        };
    state.reconcile(&[tap(10, "tap0"), tap(11, "tap1")], &config);
    kernel(&shared).traffic.insert(10, traffic);
    state.evaluate();
    let view = state.exposition().expect("an exposition");
    let tap0 = view
        .vms
        .iter()
        .find(|vm| vm.iface == "tap0")
        .expect("tap0 is shown");
    assert_eq!(tap0.traffic.packets(direction::TO_VM), 7);
    assert!(tap0.health.is_some(), "evaluated by the poll");
    assert_eq!(view.attached_count(), 2);

    // tap0 goes: its final counters stay visible (departed) for the grace
    // period, read before its slot was cleared.
    state.reconcile(&[tap(11, "tap1")], &config);
    let view = state.exposition().expect("an exposition");
    let gone = view
        .vms
        .iter()
        .find(|vm| vm.iface == "tap0")
        .expect("the departed tap is still shown");
    assert!(gone.departed);
    assert_eq!(gone.traffic.packets(direction::TO_VM), 7);
    assert_eq!(view.attached_count(), 1);
}

#[test]
fn detaching_everything_leaves_nothing_attached() {
    let (state, shared, config) = agent(16, "0s");
    state.reconcile(&[tap(10, "tap0"), tap(11, "tap1")], &config);
    assert_eq!(state.detach_everything(), 2);
    assert!(kernel(&shared).attached.is_empty());
    assert_eq!(state.interface_count(), 0);
}

#[test]
fn a_taps_bridge_is_followed_while_the_tap_lives_and_replies_lost_there_are_counted() {
    let (state, shared, config) = agent(8, "0s");
    let bridge = LinkInfo {
        kind: "bridge".into(),
        ..tap(5, "br0")
    };
    let enslaved = LinkInfo {
        master: Some(5),
        kind: "tun".into(),
        ..tap(10, "tap0")
    };
    state.reconcile(&[bridge.clone(), enslaved], &config);
    {
        let k = kernel(&shared);
        assert_eq!(k.hops.get(&5).map(String::as_str), Some("br0"));
        assert!(k.followed.contains(&5) && !k.monitored.contains(&5));
    }
    let view = state.exposition().expect("an exposition");
    assert_eq!(view.hops.len(), 1);
    assert_eq!(
        (view.hops[0].name.as_str(), view.hops[0].role),
        ("br0", "bridge")
    );

    // The VM's request on its tap, then the ACK on the bridge only.
    let mut request = tracer_common::PacketEvent {
        kind: tracer_common::event_kind::DHCP,
        direction: tracer_common::direction::FROM_VM,
        msg_type: 3,
        op: 1,
        xid: 0x1234,
        chaddr: [0x52, 0x54, 0, 0, 0, 1],
        dst_ip: [255; 4],
        ..Default::default()
    };
    request.dev.ifindex = 10;
    let mut ack = tracer_common::PacketEvent {
        kind: tracer_common::event_kind::DHCP_HOP,
        direction: tracer_common::hop_hook::EGRESS,
        msg_type: 5,
        op: 2,
        ..request
    };
    ack.dev.ifindex = 5;
    state.handle_events(&[request, ack]);
    let view = state.exposition().expect("an exposition");
    assert_eq!(view.hops[0].dhcp_messages, [1, 0]);
    // Never seen on the tap: lost on the node once the wait is over.
    let lost = |state: &AgentState| {
        let view = state.exposition().expect("an exposition");
        view.vms[0]
            .dhcp
            .as_ref()
            .map(|d| d.counters.replies_lost_on_node)
    };
    assert_eq!(lost(&state), Some(0));
    // The wait is the stall threshold (3 s by default): polled for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lost(&state) != Some(1) {
        assert!(std::time::Instant::now() < deadline, "{:?}", lost(&state));
        std::thread::sleep(std::time::Duration::from_millis(50));
        state.evaluate();
    }
    let explained = state.explain("tap0").expect("explained");
    assert!(
        explained.contains("ACK xid 0x00001234 seen on br0"),
        "{explained}"
    );

    // The tap goes: its bridge is no hop any more.
    state.reconcile(&[bridge], &config);
    assert!(kernel(&shared).hops.is_empty());
    assert!(kernel(&shared).followed.is_empty());
}
