//! Collector: the agent itself: probes, attachments, map reads, losses,
//! build.

use super::text::{Family, MetricType};

use super::{counter, family, gauge, Exposition};

/// The agent itself: probes, attachments, map reads, losses, build.
pub(super) fn agent_families(view: &Exposition) -> Vec<Family> {
    let mut lost = family(
        "hvnet_agent_events_lost_total",
        "DHCP/ARP events the kernel could not hand to the agent (ring buffer full).",
        MetricType::COUNTER,
    );
    lost.push(counter(&[], view.events_lost as f64));

    let mut interfaces = family(
        "hvnet_agent_interfaces",
        "Interfaces hvnet's tc programs are attached to.",
        MetricType::GAUGE,
    );
    interfaces.push(gauge(&[], view.attached_count() as f64));

    let mut probes = family(
        "hvnet_agent_probe_attached",
        "1 if the probe is loaded and in use, 0 if this kernel refused it (see the agent log); \
         kind says which mechanism was used or tried.",
        MetricType::GAUGE,
    );
    for status in &view.probes {
        probes.push(gauge(
            &[("probe", status.probe), ("kind", status.kind)],
            if status.attached { 1.0 } else { 0.0 },
        ));
    }

    let mut failures = family(
        "hvnet_agent_attach_failures_total",
        "Interfaces matching the globs that hvnet could not attach to (reason in the log).",
        MetricType::COUNTER,
    );
    failures.push(counter(&[], view.attach_failures as f64));

    let mut events = family(
        "hvnet_agent_link_events_total",
        "rtnetlink link events received (interfaces appearing, changing, vanishing).",
        MetricType::COUNTER,
    );
    events.push(counter(&[], view.link_events as f64));

    let mut map_reads = family(
        "hvnet_agent_map_read_success",
        "1 if this scrape read the kernel map, 0 if the read failed (the map's series are left \
         out of this scrape, never shown as zero; the log says why).",
        MetricType::GAUGE,
    );
    for (map, ok) in &view.map_reads {
        map_reads.push(gauge(&[("map", map)], if *ok { 1.0 } else { 0.0 }));
    }

    let mut waiting = family(
        "hvnet_agent_interfaces_waiting",
        "Interfaces matching the globs that wait to be attached, by reason (fd_limit: the \
         open-file limit is reached, raise LimitNOFILE; capacity: max_interfaces taps are \
         attached, raise max_interfaces). Retried every poll.",
        MetricType::GAUGE,
    );
    for (reason, count) in &view.waiting {
        waiting.push(gauge(&[("reason", reason)], *count as f64));
    }
    let mut update_failures = family(
        "hvnet_agent_map_update_failures_total",
        "Inserts into a kernel map that the kernel refused (the map was full): counts that were \
         lost. Should stay 0; the maps are sized for max_interfaces taps.",
        MetricType::COUNTER,
    );
    if let Some(failures) = view.map_update_failures {
        for (map, count) in tracer_common::map_slot::NAMES.iter().zip(failures) {
            update_failures.push(counter(&[("map", map)], count as f64));
        }
    }
    let mut read_errors = family(
        "hvnet_agent_probe_read_errors_total",
        "Kernel memory reads that failed in hvnet's tracepoints (a device the probe could not \
         identify; its frame is not attributed).",
        MetricType::COUNTER,
    );
    if let Some(errors) = view.probe_read_errors {
        read_errors.push(counter(&[], errors as f64));
    }

    let mut build = family(
        "hvnet_build_info",
        "hvnet's version and the tc attach mechanism in use.",
        MetricType::GAUGE,
    );
    build.push(gauge(
        &[
            ("version", view.version.as_str()),
            ("attach_mechanism", view.attach_mechanism.as_str()),
        ],
        1.0,
    ));
    vec![
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
    ]
}
