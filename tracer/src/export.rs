//! Prometheus exposition: turns one consistent view of the agent's state
//! into the text format. Counters come straight from the kernel maps at
//! scrape time (const metrics, as node_exporter does), so a scrape always
//! shows the kernel's current totals.

use prometheus::{
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
    Encoder, TextEncoder,
};
use tracer_common::{class, direction, CounterValue};

use crate::{
    api,
    collect::TrafficCounters,
    dhcp::{ClientState, DhcpCounters, MessageType, Verdict},
    optional_probes::ProbeStatus,
    stall::VmState,
};

/// Everything one scrape shows, gathered under the agent's locks and then
/// rendered without them.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub vms: Vec<VmView>,
    pub probes: Vec<ProbeStatus>,
    pub attach_failures: u64,
    pub link_events: u64,
    pub version: String,
    pub attach_mechanism: String,
    pub events_lost: u64,
    /// Whether hvnet_vm_info carries the VM's project (config `project_label`).
    pub project_label: bool,
    /// `metrics_detail = full`: every breakdown series from 0. Otherwise
    /// breakdowns appear once non-zero (see config::MetricsDetail).
    pub full_detail: bool,
    /// Each kernel map this scrape read, and whether the read worked. The
    /// series of an unreadable map are left out, never shown as zero.
    pub map_reads: Vec<(&'static str, bool)>,
    /// Matching interfaces not attached yet, by reason (fd_limit, capacity).
    pub waiting: Vec<(&'static str, usize)>,
    /// Inserts the kernel refused (map full), per map (tracer_common::map_slot).
    pub map_update_failures: Option<[u64; tracer_common::map_slot::COUNT as usize]>,
    /// Probe reads of kernel memory that failed in the tracepoints.
    pub probe_read_errors: Option<u64>,
}

impl Exposition {
    fn map_readable(&self, map: &str) -> bool {
        !self.map_reads.iter().any(|(name, ok)| *name == map && !ok)
    }
}

impl Exposition {
    /// Taps attached now (departed ones within their grace excluded).
    pub fn attached_count(&self) -> usize {
        self.vms.iter().filter(|vm| !vm.departed).count()
    }
}

/// A VM's DHCP picture at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DhcpView {
    pub counters: DhcpCounters,
    /// Seconds left on the lease the VM holds (from the last ACK it got).
    pub lease_remaining: Option<f64>,
    pub lease_address: Option<String>,
    pub last_verdict: Option<Verdict>,
}

/// One monitored tap and what crossed it (served in /api/v1/vms as
/// [`api::Vm`]).
#[derive(Debug, Clone, Default)]
pub struct VmView {
    pub iface: String,
    pub ifindex: u32,
    /// The guest NIC's MAC where an identity source knows it, else the tap's.
    pub mac: String,
    /// The tap's own MAC (libvirt: the guest's with fe: in front).
    pub tap_mac: String,
    pub identity: crate::identity::Identity,
    pub oper_state: String,
    pub vm_uuid: String,
    pub vm_name: String,
    pub traffic: TrafficCounters,
    pub drops: Vec<DropCount>,
    /// Frames the dequeue tracepoint saw the VMM read (None: probe unavailable).
    pub dequeued: Option<u64>,
    /// The tap's own tx_packets (frames the VMM read), as of the last poll.
    pub netdev_tx_packets: Option<u64>,
    /// tun_recvmsg calls, where the vhost probe attached.
    pub vhost_rx: Option<u64>,
    /// DHCP/ARP events not sent: the tap was over its event budget.
    pub events_throttled: u64,
    /// The tap's txqueuelen: the most frames that can wait toward the VM.
    pub queue_len: u32,
    /// None until the first poll evaluated this VM.
    pub health: Option<VmHealth>,
    pub dhcp: Option<DhcpView>,
    /// The tap is gone; its final counters are shown for the grace period
    /// (gauges are not: they would describe a VM that no longer exists).
    pub departed: bool,
}

/// Frames dropped on a VM's tap for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCount {
    pub direction: &'static str,
    pub reason: String,
    pub packets: u64,
}

/// The stall detector's view of a VM at the last poll.
#[derive(Debug, Clone, PartialEq)]
pub struct VmHealth {
    pub state: VmState,
    pub backlog: u64,
    pub stalls_total: u64,
    pub stall_seconds: f64,
}

/// Every metric family hvnet exports (checked against `render` by a test;
/// the dashboard lint checks panels against it).
pub const METRIC_NAMES: &[&str] = &[
    "hvnet_vm_packets_total",
    "hvnet_vm_bytes_total",
    "hvnet_vm_info",
    "hvnet_vm_dropped_packets_total",
    "hvnet_vm_rx_backlog_packets",
    "hvnet_vm_queue_length_packets",
    "hvnet_vm_rx_stalled",
    "hvnet_vm_rx_stalls_total",
    "hvnet_vm_rx_stall_seconds_total",
    "hvnet_vm_state",
    "hvnet_vm_dequeued_packets_total",
    "hvnet_vm_vhost_rx_calls_total",
    "hvnet_vm_events_throttled_total",
    "hvnet_dhcp_packets_total",
    "hvnet_dhcp_retries_total",
    "hvnet_dhcp_retries_during_stall_total",
    "hvnet_dhcp_replies_undelivered_total",
    "hvnet_dhcp_replies_unprocessed_total",
    "hvnet_dhcp_lease_remaining_seconds",
    "hvnet_dhcp_transactions_total",
    "hvnet_dhcp_malformed_total",
    "hvnet_agent_events_lost_total",
    "hvnet_agent_interfaces",
    "hvnet_agent_probe_attached",
    "hvnet_agent_attach_failures_total",
    "hvnet_agent_link_events_total",
    "hvnet_agent_map_read_success",
    "hvnet_agent_interfaces_waiting",
    "hvnet_agent_map_update_failures_total",
    "hvnet_agent_probe_read_errors_total",
    "hvnet_build_info",
];

pub fn direction_label(direction: u8) -> &'static str {
    match direction {
        direction::TO_VM => "to_vm",
        _ => "from_vm",
    }
}

pub fn class_label(class: u8) -> &'static str {
    match class {
        class::DHCP => "dhcp",
        class::ARP => "arp",
        class::BROADCAST => "broadcast",
        _ => "other",
    }
}

const DIRECTIONS: [u8; direction::COUNT] = [direction::TO_VM, direction::FROM_VM];
const CLASSES: [u8; class::COUNT] = [class::DHCP, class::ARP, class::BROADCAST, class::OTHER];

const DIRECTION_HELP: &str = "direction is from the VM's point of view: to_vm = frames the host \
offered to the VM (tap transmit, tc egress), from_vm = frames the VM sent (tap receive, tc \
ingress); libvirt's domifstat swaps these";

/// A breakdown series (by class, DHCP type, verdict...): always in full
/// detail, else only once it has counted something. Series that alerts
/// read without a breakdown label are always exported.
fn push_breakdown(family: &mut MetricFamily, full: bool, labels: &[(&str, &str)], value: f64) {
    if full || value != 0.0 {
        family.mut_metric().push(counter(labels, value));
    }
}

pub fn render(view: &Exposition) -> Result<String, prometheus::Error> {
    // The text encoder refuses families without samples (no VMs yet).
    let families: Vec<MetricFamily> = families(view)
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

fn families(view: &Exposition) -> Vec<MetricFamily> {
    let mut packets = family(
        "hvnet_vm_packets_total",
        &format!("Frames that crossed the VM's tap, by class; {DIRECTION_HELP}."),
        MetricType::COUNTER,
    );
    let mut bytes = family(
        "hvnet_vm_bytes_total",
        &format!("Bytes (Ethernet header included) that crossed the VM's tap; {DIRECTION_HELP}."),
        MetricType::COUNTER,
    );
    let mut info = family(
        "hvnet_vm_info",
        "Identity of the VM behind each monitored tap (join on iface): from libvirt's status XML, \
         else the QEMU process holding the tap, else the tap name. mac is the guest NIC's where a \
         source knows it, else the tap's own.",
        MetricType::GAUGE,
    );
    for vm in &view.vms {
        for dir in DIRECTIONS {
            for cls in CLASSES {
                let CounterValue {
                    packets: p,
                    bytes: b,
                } = vm.traffic.get(dir, cls);
                let labels = [
                    ("iface", vm.iface.as_str()),
                    ("direction", direction_label(dir)),
                    ("class", class_label(cls)),
                ];
                push_breakdown(&mut packets, view.full_detail, &labels, p as f64);
                push_breakdown(&mut bytes, view.full_detail, &labels, b as f64);
            }
        }
        let mut labels = vec![
            ("iface", vm.iface.as_str()),
            ("vm_uuid", vm.vm_uuid.as_str()),
            ("vm_name", vm.vm_name.as_str()),
            ("mac", vm.mac.as_str()),
        ];
        // Opt-in: a project label multiplies series per tenant.
        if view.project_label {
            labels.push(("project", vm.identity.project.as_str()));
        }
        info.mut_metric().push(gauge(&labels, 1.0));
    }

    let mut dropped = family(
        "hvnet_vm_dropped_packets_total",
        "Frames the kernel dropped on the VM's tap, by kernel drop reason (from skb:kfree_skb; \
         netdev_tx_dropped when that probe is unavailable). direction is inferred from the reason: \
         to_vm = on the way to the VM (full_ring: the VMM is not draining).",
        MetricType::COUNTER,
    );
    let mut backlog = family(
        "hvnet_vm_rx_backlog_packets",
        "Frames offered to the VM and neither dequeued by the VMM nor dropped: the tap's queue \
         (to_vm). At the queue length the tap drops everything new.",
        MetricType::GAUGE,
    );
    let mut queue_len = family(
        "hvnet_vm_queue_length_packets",
        "The tap's queue length (txqueuelen): the most frames that can wait toward the VM.",
        MetricType::GAUGE,
    );
    let mut stalled = family(
        "hvnet_vm_rx_stalled",
        "1 while the VM's receive path is stalled: frames wait, the VMM dequeues none, the VM still sends.",
        MetricType::GAUGE,
    );
    let mut stalls = family(
        "hvnet_vm_rx_stalls_total",
        "RX stall episodes of the VM.",
        MetricType::COUNTER,
    );
    let mut stall_seconds = family(
        "hvnet_vm_rx_stall_seconds_total",
        "Seconds the VM's receive path spent stalled (from when dequeueing stopped).",
        MetricType::COUNTER,
    );
    let mut vm_state = family(
        "hvnet_vm_state",
        "1 for the VM's current state: ok, rx_stalled, paused (silent both ways), no_carrier (no \
         VMM holds the tap), idle.",
        MetricType::GAUGE,
    );
    let mut dequeued = family(
        "hvnet_vm_dequeued_packets_total",
        "Frames the VMM read from the tap (to_vm), by source: tracepoint (skb_copy_datagram_iovec) \
         or netdev (the tap's tx_packets).",
        MetricType::COUNTER,
    );
    let mut throttled = family(
        "hvnet_vm_events_throttled_total",
        "DHCP/ARP events from this tap that hvnet did not record: the tap was over its share of \
         the event ring (100 per second per CPU, bursts of 200), so a VM flooding DHCP or ARP \
         cannot blind hvnet to its neighbours. Its own DHCP verdicts may be incomplete meanwhile.",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        push_breakdown(
            &mut throttled,
            view.full_detail,
            &[("iface", vm.iface.as_str())],
            vm.events_throttled as f64,
        );
    }
    let mut vhost = family(
        "hvnet_vm_vhost_rx_calls_total",
        "tun_recvmsg calls for the VM's tap (vhost-net RX work), where the vhost probe attached.",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        let iface = vm.iface.as_str();
        for drop in &vm.drops {
            dropped.mut_metric().push(counter(
                &[
                    ("iface", iface),
                    ("direction", drop.direction),
                    ("reason", drop.reason.as_str()),
                ],
                drop.packets as f64,
            ));
        }
        if let Some(seen) = vm.dequeued {
            dequeued.mut_metric().push(counter(
                &[("iface", iface), ("source", "tracepoint")],
                seen as f64,
            ));
        }
        if let Some(read) = vm.netdev_tx_packets {
            dequeued.mut_metric().push(counter(
                &[("iface", iface), ("source", "netdev")],
                read as f64,
            ));
        }
        if let Some(calls) = vm.vhost_rx {
            vhost
                .mut_metric()
                .push(counter(&[("iface", iface)], calls as f64));
        }
        if !vm.departed {
            queue_len
                .mut_metric()
                .push(gauge(&[("iface", iface)], f64::from(vm.queue_len)));
        }
        let Some(health) = &vm.health else { continue };
        stalls
            .mut_metric()
            .push(counter(&[("iface", iface)], health.stalls_total as f64));
        stall_seconds
            .mut_metric()
            .push(counter(&[("iface", iface)], health.stall_seconds));
        if vm.departed {
            continue;
        }
        backlog
            .mut_metric()
            .push(gauge(&[("iface", iface)], health.backlog as f64));
        let is_stalled = health.state == VmState::RxStalled;
        stalled.mut_metric().push(gauge(
            &[("iface", iface)],
            if is_stalled { 1.0 } else { 0.0 },
        ));
        for state in VmState::ALL {
            // One-hot in both details: "is it rx_stalled?" reads 0, never absent.
            let current = if state == health.state { 1.0 } else { 0.0 };
            vm_state.mut_metric().push(gauge(
                &[("iface", iface), ("state", state.as_str())],
                current,
            ));
        }
    }

    let mut dhcp_packets = family(
        "hvnet_dhcp_packets_total",
        "DHCP messages that crossed the VM's tap, by message type; direction from the VM's point of view.",
        MetricType::COUNTER,
    );
    let mut retries = family(
        "hvnet_dhcp_retries_total",
        "Client messages the VM sent again without having received an answer, by the client state they reveal.",
        MetricType::COUNTER,
    );
    let mut retries_stall = family(
        "hvnet_dhcp_retries_during_stall_total",
        "DHCP retries the VM sent while its receive path was stalled: answers cannot reach it.",
        MetricType::COUNTER,
    );
    let mut undelivered = family(
        "hvnet_dhcp_replies_undelivered_total",
        "DHCP replies to the VM that the VMM did not dequeue in time or that were dropped on the tap.",
        MetricType::COUNTER,
    );
    let mut unprocessed = family(
        "hvnet_dhcp_replies_unprocessed_total",
        "DHCP ACKs the VMM dequeued after which the VM asked again within seconds (same xid): they \
         reached the guest's RX ring but the guest never processed them (an RX path stuck inside \
         the VM, before the tap queue backs up).",
        MetricType::COUNTER,
    );
    let mut lease = family(
        "hvnet_dhcp_lease_remaining_seconds",
        "Seconds left on the lease the VM holds, from the last ACK that actually reached it (0: expired).",
        MetricType::GAUGE,
    );
    let mut transactions = family(
        "hvnet_dhcp_transactions_total",
        "Finished DHCP exchanges by verdict: delivered, reply_undelivered (stall), reply_dropped, \
         no_reply (server side), nak.",
        MetricType::COUNTER,
    );
    let mut malformed = family(
        "hvnet_dhcp_malformed_total",
        "Malformed DHCP frames on the VM's tap (bad cookie, truncation, option overflow...).",
        MetricType::COUNTER,
    );
    for vm in &view.vms {
        let iface = vm.iface.as_str();
        let Some(dhcp) = &vm.dhcp else { continue };
        let c = &dhcp.counters;
        for (d, dir) in ["to_vm", "from_vm"].into_iter().enumerate() {
            for (i, t) in MessageType::ALL.iter().enumerate() {
                push_breakdown(
                    &mut dhcp_packets,
                    view.full_detail,
                    &[("iface", iface), ("direction", dir), ("type", t.as_str())],
                    c.packets[d][i] as f64,
                );
            }
        }
        for (i, s) in ClientState::ALL.iter().enumerate() {
            push_breakdown(
                &mut retries,
                view.full_detail,
                &[("iface", iface), ("state", s.as_str())],
                c.retries[i] as f64,
            );
        }
        retries_stall
            .mut_metric()
            .push(counter(&[("iface", iface)], c.retries_during_stall as f64));
        undelivered
            .mut_metric()
            .push(counter(&[("iface", iface)], c.replies_undelivered as f64));
        unprocessed
            .mut_metric()
            .push(counter(&[("iface", iface)], c.replies_unprocessed as f64));
        if let Some(remaining) = dhcp.lease_remaining.filter(|_| !vm.departed) {
            lease
                .mut_metric()
                .push(gauge(&[("iface", iface)], remaining));
        }
        for (i, v) in Verdict::ALL.iter().enumerate() {
            push_breakdown(
                &mut transactions,
                view.full_detail,
                &[("iface", iface), ("verdict", v.as_str())],
                c.transactions[i] as f64,
            );
        }
        push_breakdown(
            &mut malformed,
            view.full_detail,
            &[("iface", iface)],
            c.malformed as f64,
        );
    }

    let mut lost = family(
        "hvnet_agent_events_lost_total",
        "DHCP/ARP events the kernel could not hand to the agent (ring buffer full).",
        MetricType::COUNTER,
    );
    lost.mut_metric()
        .push(counter(&[], view.events_lost as f64));

    let mut interfaces = family(
        "hvnet_agent_interfaces",
        "Interfaces hvnet's tc programs are attached to.",
        MetricType::GAUGE,
    );
    interfaces
        .mut_metric()
        .push(gauge(&[], view.attached_count() as f64));

    let mut probes = family(
        "hvnet_agent_probe_attached",
        "1 if the probe is loaded and in use, 0 if this kernel refused it (see the agent log); \
         kind says which mechanism was used or tried.",
        MetricType::GAUGE,
    );
    for status in &view.probes {
        probes.mut_metric().push(gauge(
            &[("probe", status.probe), ("kind", status.kind)],
            if status.attached { 1.0 } else { 0.0 },
        ));
    }

    let mut failures = family(
        "hvnet_agent_attach_failures_total",
        "Interfaces matching the globs that hvnet could not attach to (reason in the log).",
        MetricType::COUNTER,
    );
    failures
        .mut_metric()
        .push(counter(&[], view.attach_failures as f64));

    let mut events = family(
        "hvnet_agent_link_events_total",
        "rtnetlink link events received (interfaces appearing, changing, vanishing).",
        MetricType::COUNTER,
    );
    events
        .mut_metric()
        .push(counter(&[], view.link_events as f64));

    let mut map_reads = family(
        "hvnet_agent_map_read_success",
        "1 if this scrape read the kernel map, 0 if the read failed (the map's series are left \
         out of this scrape, never shown as zero; the log says why).",
        MetricType::GAUGE,
    );
    for (map, ok) in &view.map_reads {
        map_reads
            .mut_metric()
            .push(gauge(&[("map", map)], if *ok { 1.0 } else { 0.0 }));
    }

    let mut waiting = family(
        "hvnet_agent_interfaces_waiting",
        "Interfaces matching the globs that wait to be attached, by reason (fd_limit: the \
         open-file limit is reached, raise LimitNOFILE; capacity: max_interfaces taps are \
         attached, raise max_interfaces). Retried every poll.",
        MetricType::GAUGE,
    );
    for (reason, count) in &view.waiting {
        waiting
            .mut_metric()
            .push(gauge(&[("reason", reason)], *count as f64));
    }
    let mut update_failures = family(
        "hvnet_agent_map_update_failures_total",
        "Inserts into a kernel map that the kernel refused (the map was full): counts that were \
         lost. Should stay 0; the maps are sized for max_interfaces taps.",
        MetricType::COUNTER,
    );
    if let Some(failures) = view.map_update_failures {
        for (map, count) in tracer_common::map_slot::NAMES.iter().zip(failures) {
            update_failures
                .mut_metric()
                .push(counter(&[("map", map)], count as f64));
        }
    }
    let mut read_errors = family(
        "hvnet_agent_probe_read_errors_total",
        "Kernel memory reads that failed in hvnet's tracepoints (a device the probe could not \
         identify; its frame is not attributed).",
        MetricType::COUNTER,
    );
    if let Some(errors) = view.probe_read_errors {
        read_errors.mut_metric().push(counter(&[], errors as f64));
    }

    let mut build = family(
        "hvnet_build_info",
        "hvnet's version and the tc attach mechanism in use.",
        MetricType::GAUGE,
    );
    build.mut_metric().push(gauge(
        &[
            ("version", view.version.as_str()),
            ("attach_mechanism", view.attach_mechanism.as_str()),
        ],
        1.0,
    ));

    let all = vec![
        packets,
        bytes,
        info,
        dropped,
        backlog,
        queue_len,
        stalled,
        stalls,
        stall_seconds,
        vm_state,
        dequeued,
        vhost,
        throttled,
        dhcp_packets,
        retries,
        retries_stall,
        undelivered,
        unprocessed,
        lease,
        transactions,
        malformed,
        lost,
        interfaces,
        probes,
        failures,
        events,
        build,
        map_reads,
        waiting,
        update_failures,
        read_errors,
    ];
    // A map this scrape could not read: its series are left out rather
    // than shown as zero (a counter dropping to zero reads as a reset).
    let hidden: &[(&str, &str)] = &[
        ("VM_COUNTERS", "hvnet_vm_packets_total"),
        ("VM_COUNTERS", "hvnet_vm_bytes_total"),
        ("DROPS", "hvnet_vm_dropped_packets_total"),
        ("VHOST_RX", "hvnet_vm_vhost_rx_calls_total"),
        ("EVENTS_LOST", "hvnet_agent_events_lost_total"),
        ("EVENTS_THROTTLED", "hvnet_vm_events_throttled_total"),
    ];
    all.into_iter()
        .filter(|f| {
            !hidden
                .iter()
                .any(|(map, name)| f.name() == *name && !view.map_readable(map))
        })
        .map(|mut f| {
            if f.name() == "hvnet_vm_dequeued_packets_total" && !view.map_readable("DEQUEUED") {
                let kept: Vec<Metric> = f
                    .take_metric()
                    .into_iter()
                    .filter(|m| {
                        !m.get_label()
                            .iter()
                            .any(|l| l.name() == "source" && l.value() == "tracepoint")
                    })
                    .collect();
                f.set_metric(kept);
            }
            f
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut metric = Metric::default();
    metric.set_label(labels(pairs));
    metric.set_counter(c);
    metric
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut metric = Metric::default();
    metric.set_label(labels(pairs));
    metric.set_gauge(g);
    metric
}

/// `/api/v1/vms`: every VM's view as the API's wire type.
pub fn vms_json(view: &Exposition) -> Vec<api::Vm> {
    view.vms.iter().map(api_vm).collect()
}

fn api_vm(vm: &VmView) -> api::Vm {
    let traffic = |dir: u8| {
        let by_class = CLASSES
            .iter()
            .map(|&cls| {
                let v = vm.traffic.get(dir, cls);
                (
                    class_label(cls).to_owned(),
                    api::Counter {
                        packets: v.packets,
                        bytes: v.bytes,
                    },
                )
            })
            .collect();
        api::Traffic {
            packets: vm.traffic.packets(dir),
            bytes: CLASSES.iter().map(|&c| vm.traffic.get(dir, c).bytes).sum(),
            by_class,
        }
    };
    let id = &vm.identity;
    api::Vm {
        iface: vm.iface.clone(),
        ifindex: vm.ifindex,
        mac: vm.mac.clone(),
        tap_mac: vm.tap_mac.clone(),
        identity: api::VmIdentity {
            vm_name: id.vm_name.clone(),
            vm_uuid: id.vm_uuid.clone(),
            mac: id.mac.clone(),
            project: id.project.clone(),
            flavor: id.flavor.clone(),
            domain: id.domain.clone(),
            neutron_port: id.neutron_port.clone(),
            source: id.source.to_owned(),
            vmm_pid: id.vmm_pid,
            vhost_workers: id.vhost_workers.clone(),
        },
        oper_state: vm.oper_state.clone(),
        vm_uuid: vm.vm_uuid.clone(),
        vm_name: vm.vm_name.clone(),
        drops: vm
            .drops
            .iter()
            .map(|d| api::Drops {
                direction: d.direction.to_owned(),
                reason: d.reason.clone(),
                packets: d.packets,
            })
            .collect(),
        dequeued: vm.dequeued,
        netdev_tx_packets: vm.netdev_tx_packets,
        vhost_rx: vm.vhost_rx,
        events_throttled: vm.events_throttled,
        queue_len: vm.queue_len,
        health: vm.health.as_ref().map(|h| api::Health {
            state: h.state,
            backlog: h.backlog,
            stalls_total: h.stalls_total,
            stall_seconds: h.stall_seconds,
        }),
        dhcp: vm.dhcp.as_ref().map(|d| api::Dhcp {
            counters: d.counters.clone(),
            lease_remaining: d.lease_remaining,
            lease_address: d.lease_address.clone(),
            last_verdict: d.last_verdict,
        }),
        departed: vm.departed,
        to_vm: traffic(direction::TO_VM),
        from_vm: traffic(direction::FROM_VM),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Exposition {
        let mut traffic = TrafficCounters::default();
        traffic.by_direction_class[usize::from(direction::TO_VM)][usize::from(class::DHCP)] =
            CounterValue {
                packets: 3,
                bytes: 1026,
            };
        traffic.by_direction_class[usize::from(direction::FROM_VM)][usize::from(class::ARP)] =
            CounterValue {
                packets: 2,
                bytes: 84,
            };
        Exposition {
            vms: vec![VmView {
                iface: "vnet0".into(),
                ifindex: 7,
                mac: "fe:54:00:12:34:56".into(),
                tap_mac: "fe:54:00:12:34:56".into(),
                identity: Default::default(),
                oper_state: "up".into(),
                vm_uuid: String::new(),
                vm_name: "vnet0".into(),
                traffic,
                drops: vec![DropCount {
                    direction: "to_vm",
                    reason: "full_ring".into(),
                    packets: 412,
                }],
                health: Some(VmHealth {
                    state: VmState::RxStalled,
                    backlog: 1000,
                    stalls_total: 1,
                    stall_seconds: 12.5,
                }),
                dequeued: Some(50),
                netdev_tx_packets: Some(50),
                vhost_rx: Some(7),
                events_throttled: 0,
                queue_len: 1000,
                dhcp: Some(DhcpView {
                    counters: DhcpCounters {
                        retries_during_stall: 3,
                        replies_undelivered: 3,
                        ..Default::default()
                    },
                    lease_remaining: Some(41.0),
                    lease_address: Some("10.250.0.150".into()),
                    last_verdict: None,
                }),
                departed: false,
            }],
            probes: vec![ProbeStatus {
                probe: "tc_egress",
                kind: "tcx",
                attached: true,
                detail: String::new(),
            }],
            attach_failures: 0,
            link_events: 4,
            version: "0.1.0".into(),
            attach_mechanism: "tcx".into(),
            events_lost: 2,
            project_label: false,
            full_detail: true,
            map_reads: crate::collect::SNAPSHOT_MAPS
                .iter()
                .map(|m| (*m, true))
                .collect(),
            waiting: vec![("fd_limit", 0), ("capacity", 0)],
            map_update_failures: Some([0, 0, 1, 0, 0]),
            probe_read_errors: Some(0),
        }
    }

    /// The whole `/metrics` page for a fixed state (a stalled VM with DHCP
    /// trouble, a healthy VM named by libvirt, a departed tap), held
    /// against committed files: a renamed, dropped or relabelled series
    /// fails here. After a deliberate change, regenerate and review the
    /// diff: `HVNET_UPDATE_GOLDEN=1 cargo test -p tracer golden`.
    #[test]
    fn golden_metrics_pages() {
        let mut view = sample();
        let mut healthy = view.vms[0].clone();
        healthy.iface = "tap1a2b".into();
        healthy.ifindex = 9;
        healthy.vm_name = "web-1".into();
        healthy.vm_uuid = "4f1c2f9e-0000-4000-8000-000000000001".into();
        healthy.identity = crate::identity::Identity {
            vm_name: "web-1".into(),
            vm_uuid: healthy.vm_uuid.clone(),
            project: "tenant-a".into(),
            source: "libvirt",
            ..Default::default()
        };
        healthy.drops.clear();
        healthy.health = Some(VmHealth {
            state: VmState::Ok,
            backlog: 0,
            stalls_total: 0,
            stall_seconds: 0.0,
        });
        if let Some(dhcp) = healthy.dhcp.as_mut() {
            dhcp.counters = DhcpCounters::default();
            dhcp.last_verdict = Some(Verdict::Delivered);
        }
        let mut departed = view.vms[0].clone();
        departed.iface = "tapgone".into();
        departed.ifindex = 11;
        departed.vm_name = "tapgone".into();
        departed.departed = true;
        view.vms.extend([healthy, departed]);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics");
        for (file, full_detail, project_label) in
            [("default.prom", false, false), ("full.prom", true, true)]
        {
            view.full_detail = full_detail;
            view.project_label = project_label;
            let text = render(&view).unwrap();
            let path = dir.join(file);
            if std::env::var_os("HVNET_UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e}; create it with HVNET_UPDATE_GOLDEN=1", path.display())
            });
            let first_difference = text
                .lines()
                .zip(want.lines())
                .position(|(got, want)| got != want);
            assert!(
                text == want,
                "{file}: /metrics differs from the golden page (first differing line {:?}: got {:?}, want {:?}; {} vs {} lines)",
                first_difference.map(|i| i + 1),
                first_difference.and_then(|i| text.lines().nth(i)),
                first_difference.and_then(|i| want.lines().nth(i)),
                text.lines().count(),
                want.lines().count()
            );
        }
    }

    /// Series that carry the tap's iface label.
    fn tap_series(text: &str, iface: &str) -> Vec<String> {
        let needle = format!("iface=\"{iface}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn default_detail_keeps_an_idle_tap_to_sixteen_series_and_full_shows_all() {
        let mut view = sample();
        let vm = &mut view.vms[0];
        vm.traffic = TrafficCounters::default();
        vm.drops.clear();
        vm.vhost_rx = None;
        vm.health = Some(VmHealth {
            state: VmState::Idle,
            backlog: 0,
            stalls_total: 0,
            stall_seconds: 0.0,
        });
        vm.dhcp = Some(DhcpView {
            counters: DhcpCounters::default(),
            lease_remaining: None,
            lease_address: None,
            last_verdict: None,
        });
        view.full_detail = true;
        let full = tap_series(&render(&view).unwrap(), "vnet0");
        view.full_detail = false;
        let default = tap_series(&render(&view).unwrap(), "vnet0");
        assert_eq!(default.len(), 16, "{default:#?}");
        assert_eq!(full.len(), 60, "{full:#?}");
        // What alerts read is there at 0, and every state one-hot.
        for kept in [
            "hvnet_dhcp_retries_during_stall_total{iface=\"vnet0\"} 0",
            "hvnet_dhcp_replies_undelivered_total{iface=\"vnet0\"} 0",
            "hvnet_vm_rx_stalled{iface=\"vnet0\"} 0",
            "hvnet_vm_state{iface=\"vnet0\",state=\"idle\"} 1",
            "hvnet_vm_state{iface=\"vnet0\",state=\"rx_stalled\"} 0",
        ] {
            assert!(
                default.iter().any(|l| l == kept),
                "{kept} missing: {default:#?}"
            );
        }
        assert!(!default.iter().any(|l| l.contains("class=")));
        // A breakdown appears once it counts something.
        view.vms[0].traffic.by_direction_class[usize::from(direction::FROM_VM)]
            [usize::from(class::ARP)] = CounterValue {
            packets: 1,
            bytes: 42,
        };
        let text = render(&view).unwrap();
        assert!(text.contains(
            "hvnet_vm_packets_total{iface=\"vnet0\",direction=\"from_vm\",class=\"arp\"} 1"
        ));
        assert_eq!(tap_series(&text, "vnet0").len(), 18);
    }

    #[test]
    fn an_unreadable_map_leaves_out_its_series_and_nothing_else() {
        let mut view = sample();
        for (map, ok) in &mut view.map_reads {
            if *map == "VM_COUNTERS" || *map == "DEQUEUED" {
                *ok = false;
            }
        }
        let text = render(&view).unwrap();
        // Not zero: absent (a counter that drops to zero reads as a reset).
        assert!(!text.contains("hvnet_vm_packets_total{"), "{text}");
        assert!(!text.contains("hvnet_vm_bytes_total{"), "{text}");
        assert!(!text.contains("source=\"tracepoint\""), "{text}");
        assert!(text.contains("source=\"netdev\""), "{text}");
        // Everything else is still there, and the failure is said.
        for kept in [
            "hvnet_vm_info{",
            "hvnet_vm_rx_stalled{",
            "hvnet_vm_dropped_packets_total{",
            "hvnet_dhcp_lease_remaining_seconds{",
            "hvnet_agent_events_lost_total 2",
        ] {
            assert!(text.contains(kept), "{kept} missing:\n{text}");
        }
        assert!(text.contains("hvnet_agent_map_read_success{map=\"VM_COUNTERS\"} 0"));
        assert!(text.contains("hvnet_agent_map_read_success{map=\"DROPS\"} 1"));
    }

    #[test]
    fn renders_the_contract_metrics_with_their_labels() {
        let text = render(&sample()).unwrap();
        assert!(
            text.contains(
                "hvnet_vm_packets_total{iface=\"vnet0\",direction=\"to_vm\",class=\"dhcp\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "hvnet_vm_bytes_total{iface=\"vnet0\",direction=\"from_vm\",class=\"arp\"} 84\n"
        ));
        // Every direction x class exists from the first scrape, zero or not.
        assert_eq!(text.matches("hvnet_vm_packets_total{").count(), 8);
        assert!(text.contains("# TYPE hvnet_vm_packets_total counter"));
        assert!(text.contains("hvnet_vm_info{iface=\"vnet0\",vm_uuid=\"\",vm_name=\"vnet0\",mac=\"fe:54:00:12:34:56\"} 1"));
        assert!(text.contains("hvnet_agent_interfaces 1\n"));
        assert!(text.contains("hvnet_agent_probe_attached{probe=\"tc_egress\",kind=\"tcx\"} 1"));
        assert!(text.contains("hvnet_build_info{version=\"0.1.0\",attach_mechanism=\"tcx\"} 1"));
        assert!(text.contains("to_vm = frames the host offered"));
        assert!(!text.contains("instance=") && !text.contains("job="));
        assert!(text.contains("hvnet_vm_dropped_packets_total{iface=\"vnet0\",direction=\"to_vm\",reason=\"full_ring\"} 412"));
        assert!(text.contains("hvnet_vm_rx_backlog_packets{iface=\"vnet0\"} 1000"));
        assert!(text.contains("hvnet_vm_rx_stalled{iface=\"vnet0\"} 1"));
        assert!(text.contains("hvnet_vm_rx_stalls_total{iface=\"vnet0\"} 1"));
        assert!(text.contains("hvnet_vm_rx_stall_seconds_total{iface=\"vnet0\"} 12.5"));
        assert!(text.contains("hvnet_vm_state{iface=\"vnet0\",state=\"rx_stalled\"} 1"));
        assert!(text.contains("hvnet_vm_state{iface=\"vnet0\",state=\"ok\"} 0"));
        assert_eq!(text.matches("hvnet_vm_state{").count(), 5);
        assert!(text.contains("hvnet_dhcp_retries_during_stall_total{iface=\"vnet0\"} 3"));
        assert!(text.contains("hvnet_dhcp_replies_undelivered_total{iface=\"vnet0\"} 3"));
        assert!(text.contains("hvnet_dhcp_replies_unprocessed_total{iface=\"vnet0\"} 0"));
        assert!(text.contains("hvnet_dhcp_lease_remaining_seconds{iface=\"vnet0\"} 41"));
        assert!(text.contains(
            "hvnet_dhcp_packets_total{iface=\"vnet0\",direction=\"to_vm\",type=\"ack\"} 0"
        ));
        assert!(text.contains("hvnet_dhcp_retries_total{iface=\"vnet0\",state=\"renewing\"} 0"));
        assert!(
            text.contains("hvnet_dhcp_transactions_total{iface=\"vnet0\",verdict=\"no_reply\"} 0")
        );
        assert!(text.contains("hvnet_agent_events_lost_total 2"));
        assert!(text.contains("hvnet_vm_queue_length_packets{iface=\"vnet0\"} 1000"));
        assert!(text.contains("hvnet_vm_vhost_rx_calls_total{iface=\"vnet0\"} 7"));
    }

    #[test]
    fn a_departed_tap_keeps_its_counters_but_no_gauges() {
        let mut view = sample();
        view.vms[0].departed = true;
        let text = render(&view).unwrap();
        assert!(text.contains(
            "hvnet_vm_packets_total{iface=\"vnet0\",direction=\"to_vm\",class=\"dhcp\"} 3\n"
        ));
        assert!(text.contains("hvnet_vm_dropped_packets_total{iface=\"vnet0\",direction=\"to_vm\",reason=\"full_ring\"} 412"));
        assert!(text.contains("hvnet_vm_rx_stalls_total{iface=\"vnet0\"} 1"));
        assert!(text.contains("hvnet_dhcp_replies_undelivered_total{iface=\"vnet0\"} 3"));
        assert!(text.contains("hvnet_vm_info{iface=\"vnet0\""));
        for gauge in [
            "hvnet_vm_state{",
            "hvnet_vm_rx_stalled{",
            "hvnet_vm_rx_backlog_packets{",
            "hvnet_vm_queue_length_packets{",
            "hvnet_dhcp_lease_remaining_seconds{",
        ] {
            assert!(!text.contains(gauge), "{gauge} shown for a departed tap");
        }
        assert!(text.contains("hvnet_agent_interfaces 0\n"));
    }

    #[test]
    fn metric_names_lists_exactly_what_is_rendered() {
        let text = render(&sample()).unwrap();
        let mut rendered: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        rendered.sort_unstable();
        let mut listed = METRIC_NAMES.to_vec();
        listed.sort_unstable();
        assert_eq!(rendered, listed);
    }

    #[test]
    fn the_project_label_is_opt_in() {
        let mut view = sample();
        view.vms[0].identity.project = "payments".into();
        assert!(!render(&view).unwrap().contains("project="));
        view.project_label = true;
        let text = render(&view).unwrap();
        assert!(text.contains(",project=\"payments\"} 1"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut view = sample();
        view.vms[0].vm_name = "a\"b\\c\nd".into();
        let text = render(&view).unwrap();
        assert!(text.contains(r#"vm_name="a\"b\\c\nd""#), "{text}");
    }

    #[test]
    fn no_vms_still_renders_agent_metrics() {
        let text = render(&Exposition::default()).unwrap();
        assert!(text.contains("hvnet_agent_interfaces 0"));
        assert!(!text.contains("hvnet_vm_packets_total{"));
    }

    #[test]
    fn json_totals_add_up() {
        let view = sample();
        let vms = vms_json(&view);
        assert_eq!(vms[0].to_vm.packets, 3);
        assert_eq!(vms[0].to_vm.bytes, 1026);
        assert_eq!(vms[0].from_vm.by_class["arp"].packets, 2);
        // The view's own fields sit beside the per-direction traffic, and
        // the JSON reads back as the same API type (what the CLI does).
        let json = serde_json::to_string(&vms).unwrap();
        let back: Vec<crate::api::Vm> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vms);
        assert_eq!(back[0].iface, "vnet0");
        assert_eq!(
            back[0].health.as_ref().map(|h| h.state),
            Some(VmState::RxStalled)
        );
        assert!(!back[0].departed);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value[0]["health"]["state"], "rx_stalled");
        assert!(value[0].get("traffic").is_none());
    }
}
