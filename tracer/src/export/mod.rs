//! Prometheus exposition: turns one consistent view of the agent's state
//! into the text format. Counters come straight from the kernel maps at
//! scrape time (const metrics, as node_exporter does), so a scrape always
//! shows the kernel's current totals.

mod agent;
mod api_json;
mod dhcp;
mod hops;
mod text;
mod vm_health;
mod vm_traffic;

pub use api_json::vms_json;
pub use hops::HopView;

use text::{Family, MetricType, Sample};
use tracer_common::{class, direction};

use crate::{
    analysis::dhcp::{DhcpCounters, Verdict},
    analysis::stall::VmState,
    kernel::collect::TrafficCounters,
    kernel::optional_probes::ProbeStatus,
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
    /// The hops followed besides the taps.
    pub hops: Vec<HopView>,
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

/// Every metric family hvnet exports, derived from the code that renders
/// them (the families exist whether or not they have samples); the
/// dashboard lint checks panels against it.
pub fn metric_names() -> Vec<String> {
    families(&Exposition::default())
        .iter()
        .map(|f| f.name().to_owned())
        .collect()
}

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
fn push_breakdown(family: &mut Family, full: bool, labels: &[(&str, &str)], value: f64) {
    if full || value != 0.0 {
        family.push(counter(labels, value));
    }
}

pub fn render(view: &Exposition) -> String {
    let families = families(view);
    // About 52 bytes a series at 2000 taps: one allocation, not dozens.
    let series: usize = families.iter().map(|f| f.samples().len()).sum();
    let mut out = String::with_capacity(series * 64 + 8192);
    for family in &families {
        family.write_to(&mut out);
    }
    out
}

/// One collector per area, as node_exporter has: each builds its own
/// families from the view, in the order they are exposed.
fn families(view: &Exposition) -> Vec<Family> {
    // Moved, never cloned: at 2000 taps a scrape is 32k series.
    let all = [
        vm_traffic::vm_traffic_families(view),
        vm_health::vm_health_families(view),
        dhcp::dhcp_families(view),
        agent::agent_families(view),
        hops::hop_families(view),
    ]
    .into_iter()
    .flatten();
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
    all.filter(|f| {
        !hidden
            .iter()
            .any(|(map, name)| f.name() == *name && !view.map_readable(map))
    })
    .map(|mut f| {
        if f.name() == "hvnet_vm_dequeued_packets_total" && !view.map_readable("DEQUEUED") {
            f.retain(|sample| !sample.has_label("source", "tracepoint"));
        }
        f
    })
    .collect()
}

fn family(name: &str, help: &str, kind: MetricType) -> Family {
    Family::new(name, help, kind)
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Sample {
    Sample::new(pairs, value)
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Sample {
    Sample::new(pairs, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::CounterValue;

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
            hops: vec![HopView {
                name: "br0".into(),
                role: "bridge",
                dhcp_messages: [3, 1],
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
            map_reads: crate::kernel::collect::SNAPSHOT_MAPS
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
            source: "libvirt".into(),
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
            let text = render(&view);
            let path = dir.join(file);
            if std::env::var_os("HVNET_UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; create it with HVNET_UPDATE_GOLDEN=1",
                    path.display()
                )
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
    fn default_detail_keeps_an_idle_tap_to_seventeen_series_and_full_shows_all() {
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
        let full = tap_series(&render(&view), "vnet0");
        view.full_detail = false;
        let default = tap_series(&render(&view), "vnet0");
        assert_eq!(default.len(), 17, "{default:#?}");
        assert_eq!(full.len(), 62, "{full:#?}");
        // What alerts read is there at 0, and every state one-hot.
        for kept in [
            "hvnet_dhcp_retries_during_stall_total{iface=\"vnet0\"} 0",
            "hvnet_dhcp_replies_undelivered_total{iface=\"vnet0\"} 0",
            "hvnet_dhcp_replies_lost_on_node_total{iface=\"vnet0\"} 0",
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
        let text = render(&view);
        assert!(text.contains(
            "hvnet_vm_packets_total{iface=\"vnet0\",direction=\"from_vm\",class=\"arp\"} 1"
        ));
        assert_eq!(tap_series(&text, "vnet0").len(), 19);
    }

    #[test]
    fn an_unreadable_map_leaves_out_its_series_and_nothing_else() {
        let mut view = sample();
        for (map, ok) in &mut view.map_reads {
            if *map == "VM_COUNTERS" || *map == "DEQUEUED" {
                *ok = false;
            }
        }
        let text = render(&view);
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
        let text = render(&sample());
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
        let text = render(&view);
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
        let text = render(&sample());
        let mut rendered: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        rendered.sort_unstable();
        let mut listed = metric_names();
        listed.sort_unstable();
        assert_eq!(rendered, listed);
        assert!(listed.len() >= 30, "{listed:?}");
    }

    #[test]
    fn the_project_label_is_opt_in() {
        let mut view = sample();
        view.vms[0].identity.project = "payments".into();
        assert!(!render(&view).contains("project="));
        view.project_label = true;
        let text = render(&view);
        assert!(text.contains(",project=\"payments\"} 1"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut view = sample();
        view.vms[0].vm_name = "a\"b\\c\nd".into();
        let text = render(&view);
        assert!(text.contains(r#"vm_name="a\"b\\c\nd""#), "{text}");
    }

    #[test]
    fn no_vms_still_renders_agent_metrics() {
        let text = render(&Exposition::default());
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
