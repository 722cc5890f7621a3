//! Privileged lab tests for the tc counting path (run as root, one at a
//! time: `cargo xtask test`). Each test builds its own namespaces with
//! unique names; RAII guards remove them even when an assertion fails.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::Agent,
    expect::{self, counts_match, eventually, tc_filters, tcx_programs},
    metrics,
    node::{ComputeNode, FakeVm},
    testkit::require_root,
    unique_prefix, BRIDGE_ADDR,
};

const PORT: u16 = 9478;

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

fn lab_bin() -> String {
    env!("CARGO_BIN_EXE_hvnet-lab").to_owned()
}

fn start_agent(node: &ComputeNode, globs: &str, extra: &[&str]) -> anyhow::Result<Agent> {
    let mut args = vec!["--interfaces", globs];
    args.extend_from_slice(extra);
    Agent::start(&node.ns, PORT, &args, &node.dir.join("hvnet.log"))
}

fn interfaces(samples: &[metrics::Sample]) -> Option<f64> {
    metrics::value(samples, "hvnet_agent_interfaces", &[])
}

fn has_iface(samples: &[metrics::Sample], iface: &str) -> bool {
    metrics::value(samples, "hvnet_vm_info", &[("iface", iface)]).is_some()
}

/// DHCP, ARP, ICMP and broadcasts in both directions.
fn mixed_traffic(node: &ComputeNode, vm: &FakeVm) -> anyhow::Result<()> {
    vm.dhcp(&node.udhcpc_script())?;
    vm.ping(BRIDGE_ADDR, 4)?;
    vm.guest
        .exec_ok(&[&lab_bin(), "udp-broadcast", "--count", "3"])?;
    node.ns
        .exec_ok(&[&lab_bin(), "udp-broadcast", "--count", "2"])?;
    Ok(())
}

#[test]
fn counts_equal_what_the_vmm_relayed_per_direction_and_class() -> anyhow::Result<()> {
    require_root();
    counts_equal_what_the_vmm_relayed(&[], "tp_btf")
}

/// The raw tracepoints hvnet falls back to where the kernel refuses BTF
/// tracepoints count exactly the same.
#[test]
fn the_raw_tracepoint_fallback_counts_the_same() -> anyhow::Result<()> {
    require_root();
    counts_equal_what_the_vmm_relayed(&["env", "HVNET_TRACEPOINTS=raw"], "raw_tracepoint")
}

/// Mixed traffic through one fake VM: hvnet's per-class counts equal the
/// VMM's, and its dequeue tracepoint (attached as `tracepoint_kind`) saw
/// exactly the frames the VMM read.
fn counts_equal_what_the_vmm_relayed(
    wrapper: &[&str],
    tracepoint_kind: &str,
) -> anyhow::Result<()> {
    let mut node = ComputeNode::create(&unique_prefix("c"))?;
    node.start_dhcp_server("2m")?;
    let vm = node.add_vm("tapc0", 0, &fake_vmm())?;
    let agent = Agent::start_wrapped(
        &node.ns,
        PORT,
        wrapper,
        &["--interfaces", "tapc*"],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapc0 attached",
        |s| interfaces(s) == Some(1.0),
    )?;
    // Nothing crossed the tap before hvnet attached (no guest traffic yet).
    let baseline = vm.stats()?;
    mixed_traffic(&node, &vm)?;
    let relayed = counts_match(&agent, &node.ns, "tapc0", &vm.control, Some(&baseline))?;

    // The dequeue tracepoint saw exactly the frames the VMM read.
    let read_by_vmm = relayed.to_vm.total_packets() - baseline.to_vm.total_packets();
    let samples = agent.scrape(&node.ns)?;
    for probe in ["rx_dequeue", "skb_drop"] {
        assert_eq!(
            metrics::value(
                &samples,
                "hvnet_agent_probe_attached",
                &[("probe", probe), ("kind", tracepoint_kind)]
            ),
            Some(1.0),
            "{probe} not attached as {tracepoint_kind}:\n{}",
            agent.log_text()
        );
    }
    let dequeued = metrics::value(
        &samples,
        "hvnet_vm_dequeued_packets_total",
        &[("iface", "tapc0"), ("source", "tracepoint")],
    );
    assert_eq!(
        dequeued,
        Some(read_by_vmm as f64),
        "dequeue tracepoint vs VMM reads"
    );

    // The traffic really covered every class the test claims to check.
    use tracer_common::class;
    for (name, side) in [("to_vm", &relayed.to_vm), ("from_vm", &relayed.from_vm)] {
        for (cls, cls_name) in [
            (class::DHCP, "dhcp"),
            (class::ARP, "arp"),
            (class::BROADCAST, "broadcast"),
            (class::OTHER, "other"),
        ] {
            assert!(
                side.packets[usize::from(cls)] > 0,
                "no {name} {cls_name} traffic in the test: {relayed:?}"
            );
        }
    }
    Ok(())
}

/// Frames counted by hvnet on one tap and direction, all classes (None:
/// no series).
fn frames(samples: &[metrics::Sample], iface: &str, direction: &str) -> Option<f64> {
    let mut series = samples.iter().filter(|s| {
        s.name == "hvnet_vm_packets_total"
            && s.labels.get("iface").map(String::as_str) == Some(iface)
            && s.labels.get("direction").map(String::as_str) == Some(direction)
    });
    let first = series.next()?.value;
    Some(first + series.map(|s| s.value).sum::<f64>())
}

/// The kernel's own (tx, rx) packet counts of an interface.
fn link_packets(ns: &hvnet_lab::netns::NetNs, dev: &str) -> anyhow::Result<(f64, f64)> {
    let json: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-s", "link", "show", "dev", dev])?)?;
    let stats = &json[0]["stats64"];
    match (
        stats["tx"]["packets"].as_f64(),
        stats["rx"]["packets"].as_f64(),
    ) {
        (Some(tx), Some(rx)) => Ok((tx, rx)),
        _ => anyhow::bail!("no stats64 for {dev}: {json}"),
    }
}

/// The tc programs look for a tap's counters at the slot its ifindex
/// suggests (`ifindex & 4095` by default) and find any other tap's through
/// the slot tables: TAP_SLOT below ifindex 65536, the TAP_SLOT_HIGH hash
/// above (a node that has created 65536 interfaces since boot). Two pairs
/// of taps whose ifindexes suggest the same slot, one pair above 65535:
/// one tap of each pair has to take another slot, and every tap's counts
/// are still exact.
#[test]
fn taps_outside_their_suggested_counter_slot_and_above_ifindex_65535_are_counted_exactly(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("h"))?;
    // (tap, ifindex): 70000 and 74096 both suggest slot 368; 60000 and
    // 55904 both suggest slot 2656.
    let taps = [
        ("taph0", 70000),
        ("taph1", 70000 + 4096),
        ("taph2", 60000),
        ("taph3", 60000 - 4096),
    ];
    let mut guests = Vec::new();
    for (n, (tap, ifindex)) in taps.iter().enumerate() {
        let guest = hvnet_lab::netns::NetNs::create(&format!("{}-g{n}", node.prefix))?;
        node.ns.veth_to(
            tap,
            Some(*ifindex),
            &format!("10.250.{}.1/24", 77 + n),
            &guest,
            &format!("10.250.{}.2/24", 77 + n),
        )?;
        guests.push(guest);
    }
    let agent = start_agent(&node, "taph*", &[])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "all four taps attached",
        |s| interfaces(s) == Some(taps.len() as f64),
    )?;
    let log = agent.log_text();
    assert!(log.contains("ifindex 70000"), "{log}");
    let mut expected = Vec::new();
    for (n, ((tap, _), guest)) in taps.iter().zip(&guests).enumerate() {
        let (sent_before, received_before) = link_packets(guest, "eth0")?;
        assert_eq!((sent_before, received_before), (0.0, 0.0), "{tap}");
        // A different number of pings per tap: counts landing in another
        // tap's slot would show.
        let count = (3 + n).to_string();
        guest.exec_ok(&[
            "busybox",
            "ping",
            "-c",
            &count,
            "-i",
            "0.2",
            "-W",
            "1",
            &format!("10.250.{}.1", 77 + n),
        ])?;
        let (sent, received) = link_packets(guest, "eth0")?;
        assert!(sent >= (3 + n) as f64, "{tap}: the ping sent nothing");
        expected.push((*tap, sent, received));
    }
    // Everything each guest end sent or received since its tap was
    // attached crossed hvnet's programs (IPv6 is off: nothing before).
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "hvnet's counts equal each veth's own",
        |s| {
            expected.iter().all(|(tap, sent, received)| {
                frames(s, tap, "from_vm") == Some(*sent)
                    && frames(s, tap, "to_vm") == Some(*received)
            })
        },
    )?;
    // Nothing was refused for want of a counter slot.
    let samples = agent.scrape(&node.ns)?;
    assert_eq!(
        metrics::value(
            &samples,
            "hvnet_agent_map_update_failures_total",
            &[("map", "VM_COUNTERS")]
        ),
        Some(0.0)
    );
    Ok(())
}

#[test]
fn taps_created_after_start_are_attached_and_removed_ones_disappear() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("h"))?;
    let agent = start_agent(&node, "taph*", &["--series-grace", "3s"])?;
    assert_eq!(interfaces(&agent.scrape(&node.ns)?), Some(0.0));

    let vm0 = node.add_vm("taph0", 0, &fake_vmm())?;
    let created = Instant::now();
    let latency = eventually(
        &agent,
        &node.ns,
        Duration::from_secs(2),
        "taph0 attached",
        |s| has_iface(s, "taph0"),
    )?;
    eprintln!(
        "taph0 attached {latency:?} after the first scrape poll ({:?} after creation)",
        created.elapsed()
    );
    let vm1 = node.add_vm("taph1", 1, &fake_vmm())?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(2),
        "both taps attached",
        |s| interfaces(s) == Some(2.0),
    )?;

    // No identity source knows these VMs (the fake VMM is no QEMU): the
    // tap's own MAC, from netlink, is the mac label.
    let link = node.ns.ip(&["-o", "link", "show", "taph1"])?;
    let tap_mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    // The tap may be attached between its creation and its MAC being set
    // (as libvirt does it too): the MAC change is a link event of its own.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(2),
        &format!("hvnet_vm_info for taph1 carries the tap's MAC {tap_mac}"),
        |s| {
            metrics::value(
                s,
                "hvnet_vm_info",
                &[("iface", "taph1"), ("vm_name", "taph1"), ("mac", &tap_mac)],
            ) == Some(1.0)
        },
    )?;

    let base0 = vm0.stats()?;
    vm0.guest
        .ip(&["addr", "add", "10.250.0.50/24", "dev", "eth0"])?;
    vm0.ping(BRIDGE_ADDR, 3)?;
    counts_match(&agent, &node.ns, "taph0", &vm0.control, Some(&base0))?;
    let final_other = |s: &[metrics::Sample]| {
        metrics::value(
            s,
            "hvnet_vm_packets_total",
            &[
                ("iface", "taph0"),
                ("direction", "to_vm"),
                ("class", "other"),
            ],
        )
    };
    let counted = final_other(&agent.scrape(&node.ns)?);
    assert!(counted.is_some_and(|v| v >= 3.0), "{counted:?}");

    // Removed: detached at once, gauges gone, the final counters stay for
    // the grace period (3 s here) so the next scrape still sees them...
    vm0.delete_tap()?;
    let removed = Instant::now();
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(2),
        "taph0 detached, its final counters kept",
        |s| {
            interfaces(s) == Some(1.0)
                && metrics::value(s, "hvnet_vm_state", &[("iface", "taph0")]).is_none()
                && final_other(s) == counted
                && has_iface(s, "taph0")
                && has_iface(s, "taph1")
        },
    )?;
    // ...then nothing of it is left.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(6),
        "taph0's series gone",
        |s| {
            !has_iface(s, "taph0")
                && metrics::value(s, "hvnet_vm_packets_total", &[("iface", "taph0")]).is_none()
                && has_iface(s, "taph1")
        },
    )?;
    let gone_after = removed.elapsed().as_secs_f64();
    assert!(
        (2.5..5.0).contains(&gone_after),
        "series removed {gone_after:.1} s after the tap, grace is 3 s"
    );
    drop(vm1);
    Ok(())
}

#[test]
fn tcx_mode_coexists_with_a_foreign_filter_and_sigterm_removes_only_hvnet() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("f"))?;
    let vm = node.add_vm("tapf0", 0, &fake_vmm())?;
    // Somebody else's clsact qdisc and filter, there before hvnet.
    node.ns
        .exec_ok(&["tc", "qdisc", "add", "dev", "tapf0", "clsact"])?;
    node.ns.exec_ok(&[
        "tc", "filter", "add", "dev", "tapf0", "egress", "prio", "7", "protocol", "all", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ])?;

    let mut agent = start_agent(&node, "tapf*", &[])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapf0 attached",
        |s| interfaces(s) == Some(1.0),
    )?;
    let mut programs = tcx_programs(&node.ns, "tapf0")?;
    programs.sort();
    assert_eq!(programs, ["hvnet_egress", "hvnet_ingress"]);

    let base = vm.stats()?;
    vm.guest
        .ip(&["addr", "add", "10.250.0.51/24", "dev", "eth0"])?;
    vm.ping(BRIDGE_ADDR, 3)?;
    counts_match(&agent, &node.ns, "tapf0", &vm.control, Some(&base))?;

    let started = Instant::now();
    let status = agent.terminate(Duration::from_secs(5))?;
    assert!(status.success(), "hvnet exited with {status} on SIGTERM");
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    assert!(
        tcx_programs(&node.ns, "tapf0")?.is_empty(),
        "hvnet programs left on tapf0"
    );
    let qdiscs = node.ns.exec_ok(&["tc", "qdisc", "show", "dev", "tapf0"])?;
    assert!(
        qdiscs.contains("clsact"),
        "the foreign clsact qdisc was removed: {qdiscs}"
    );
    let filters = tc_filters(&node.ns, "tapf0", "egress")?;
    assert!(
        filters.contains("u32"),
        "the foreign filter was removed: {filters}"
    );
    vm.ping(BRIDGE_ADDR, 2)?;
    Ok(())
}

#[test]
fn netlink_mode_filters_sit_beside_foreign_ones_and_survive_kill_9_then_restart_cleans_up(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("n"))?;
    let vm = node.add_vm("tapn0", 0, &fake_vmm())?;
    vm.guest
        .ip(&["addr", "add", "10.250.0.52/24", "dev", "eth0"])?;
    node.ns
        .exec_ok(&["tc", "qdisc", "add", "dev", "tapn0", "clsact"])?;
    node.ns.exec_ok(&[
        "tc", "filter", "add", "dev", "tapn0", "egress", "prio", "7", "protocol", "all", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ])?;
    // The tap's bridge is a hop hvnet follows DHCP through: the same rules
    // hold there (beside a foreign filter, cleaned after kill -9).
    node.ns
        .exec_ok(&["tc", "qdisc", "add", "dev", "br0", "clsact"])?;
    node.ns.exec_ok(&[
        "tc", "filter", "add", "dev", "br0", "ingress", "prio", "7", "protocol", "all", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ])?;
    let hop_attached = |s: &[metrics::Sample]| {
        metrics::value(s, "hvnet_agent_hops", &[("role", "bridge")]) == Some(1.0)
    };

    let mut agent = start_agent(&node, "tapn*", &["--attach-mode", "netlink"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapn0 and its bridge attached",
        |s| interfaces(s) == Some(1.0) && hop_attached(s),
    )?;
    let bridge = tc_filters(&node.ns, "br0", "ingress")?;
    assert!(
        bridge.contains("hvnet_hop_ingress") && bridge.contains("u32"),
        "{bridge}"
    );
    let filters = tc_filters(&node.ns, "tapn0", "egress")?;
    assert!(
        filters.contains("hvnet_egress") && filters.contains("u32"),
        "{filters}"
    );

    agent.kill9()?;
    // Fail-open: the orphaned filter still passes traffic.
    let filters = tc_filters(&node.ns, "tapn0", "egress")?;
    assert!(
        filters.contains("hvnet_egress"),
        "expected the killed agent's filter to remain: {filters}"
    );
    vm.ping(BRIDGE_ADDR, 2)?;

    let mut agent = start_agent(&node, "tapn*", &["--attach-mode", "netlink"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapn0 and its bridge re-attached",
        |s| interfaces(s) == Some(1.0) && hop_attached(s),
    )?;
    assert!(
        agent
            .log_text()
            .contains("removed a stale hvnet_egress filter"),
        "{}",
        agent.log_text()
    );
    for hook in ["egress", "ingress"] {
        let filters = tc_filters(&node.ns, "tapn0", hook)?;
        // One filter line per hvnet filter (the line names the program twice).
        let hvnet_lines = filters
            .lines()
            .filter(|l| l.contains(&format!("hvnet_{hook}")))
            .count();
        assert_eq!(hvnet_lines, 1, "stale filters not cleaned: {filters}");
        let filters = tc_filters(&node.ns, "br0", hook)?;
        let hop_lines = filters
            .lines()
            .filter(|l| l.contains(&format!("hvnet_hop_{hook}")))
            .count();
        assert_eq!(hop_lines, 1, "stale hop filters not cleaned: {filters}");
    }
    // The ping above leaves the node a neighbour probe to send a few
    // seconds later, which may cross after the restart: the baseline is
    // what the VMM relayed that hvnet has not counted, at a quiet moment.
    let base = expect::quiet_baseline(&agent, &node.ns, "tapn0", &vm.control)?;
    vm.ping(BRIDGE_ADDR, 3)?;
    counts_match(&agent, &node.ns, "tapn0", &vm.control, Some(&base))?;

    let status = agent.terminate(Duration::from_secs(5))?;
    assert!(status.success());
    let egress = tc_filters(&node.ns, "tapn0", "egress")?;
    let ingress = tc_filters(&node.ns, "tapn0", "ingress")?;
    assert!(
        !egress.contains("hvnet") && !ingress.contains("hvnet"),
        "hvnet filters left: {egress} {ingress}"
    );
    assert!(
        egress.contains("u32"),
        "the foreign filter was removed: {egress}"
    );
    let qdiscs = node.ns.exec_ok(&["tc", "qdisc", "show", "dev", "tapn0"])?;
    assert!(qdiscs.contains("clsact"), "{qdiscs}");
    for hook in ["egress", "ingress"] {
        let filters = tc_filters(&node.ns, "br0", hook)?;
        assert!(!filters.contains("hvnet"), "hop filters left: {filters}");
    }
    let bridge = tc_filters(&node.ns, "br0", "ingress")?;
    assert!(
        bridge.contains("u32"),
        "the bridge's foreign filter was removed: {bridge}"
    );
    vm.ping(BRIDGE_ADDR, 2)?;
    Ok(())
}

#[test]
fn kill_9_in_tcx_mode_leaves_nothing_attached_and_a_restart_counts_again() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("k"))?;
    let vm = node.add_vm("tapk0", 0, &fake_vmm())?;
    vm.guest
        .ip(&["addr", "add", "10.250.0.53/24", "dev", "eth0"])?;
    let mut agent = start_agent(&node, "tapk*", &[])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapk0 attached",
        |s| interfaces(s) == Some(1.0),
    )?;
    agent.kill9()?;
    assert!(
        tcx_programs(&node.ns, "tapk0")?.is_empty(),
        "TCX links must die with the agent"
    );
    vm.ping(BRIDGE_ADDR, 2)?;

    let agent = start_agent(&node, "tapk*", &[])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapk0 re-attached",
        |s| interfaces(s) == Some(1.0),
    )?;
    let base = vm.stats()?;
    vm.ping(BRIDGE_ADDR, 3)?;
    counts_match(&agent, &node.ns, "tapk0", &vm.control, Some(&base))?;
    Ok(())
}

/// Runs hvnet expecting a start-up failure; returns its stderr.
fn failing_run(node: &ComputeNode, prefix_cmd: &[&str], args: &[&str]) -> anyhow::Result<String> {
    let bin = hvnet_lab::agent::hvnet_bin().display().to_string();
    let mut cmd = node.ns.command(prefix_cmd.first().copied().unwrap_or(&bin));
    if !prefix_cmd.is_empty() {
        cmd.args(&prefix_cmd[1..]).arg(&bin);
    }
    let out = cmd.arg("run").args(args).output()?;
    assert!(
        !out.status.success(),
        "hvnet should have failed with {args:?}"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_input_is_one_clear_error_line_and_attaches_nothing() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("b"))?;
    let _vm = node.add_vm("tapb0", 0, &fake_vmm())?;
    let one_line = |stderr: &str, needle: &str| {
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
        assert!(
            lines[0].contains(needle),
            "error line lacks {needle:?}: {stderr}"
        );
    };

    // Busy port: something already listens on the agent's address.
    let listener = node
        .ns
        .enter(|| Ok(std::net::TcpListener::bind(("127.0.0.1", PORT))?))?;
    let err = failing_run(
        &node,
        &[],
        &["--listen", "127.0.0.1:9478", "--interfaces", "tapb*"],
    )?;
    one_line(&err, "cannot listen on 127.0.0.1:9478");
    drop(listener);

    let err = failing_run(
        &node,
        &[],
        &["--btf", "/nonexistent/vmlinux", "--interfaces", "tapb*"],
    )?;
    one_line(&err, "BTF");
    let err = failing_run(&node, &[], &["--interfaces", "tapb["])?;
    one_line(&err, "invalid interface glob \"tapb[\"");
    let config = node.dir.join("typo.toml");
    std::fs::write(&config, "listn = \"127.0.0.1:9478\"\n")?;
    let err = failing_run(&node, &[], &["--config", &config.display().to_string()])?;
    one_line(&err, "listn");
    let err = failing_run(&node, &[], &["--poll-interval", "1"])?;
    one_line(&err, "poll_interval");
    // Web config (exporter-toolkit format): a missing certificate, a typo.
    let web = node.dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: /nonexistent/node.crt\n  key_file: /nonexistent/node.key\n",
    )?;
    let web_arg = web.display().to_string();
    let err = failing_run(&node, &[], &["--web.config.file", &web_arg])?;
    one_line(&err, "/nonexistent/node.crt");
    std::fs::write(&web, "basic_auth_user:\n  prom: x\n")?;
    let err = failing_run(&node, &[], &["--web.config.file", &web_arg])?;
    one_line(&err, "basic_auth_user");

    // No capabilities: an unprivileged user.
    let err = failing_run(
        &node,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ],
        &["--interfaces", "tapb*"],
    )?;
    one_line(&err, "CAP_NET_ADMIN");

    assert!(
        tcx_programs(&node.ns, "tapb0")?.is_empty(),
        "a failed start left programs attached"
    );
    let egress = expect::tc_filters(&node.ns, "tapb0", "egress").unwrap_or_default();
    assert!(!egress.contains("hvnet"));
    Ok(())
}

/// `auto` may pick netlink at one start (many taps) and TCX at the next: a
/// TCX-mode start removes the filters a killed netlink-mode hvnet left, so
/// no orphaned program keeps running on the tap.
#[test]
fn a_tcx_start_removes_the_filters_a_killed_netlink_run_left() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("m"))?;
    let vm = node.add_vm("tapm0", 0, &fake_vmm())?;
    vm.guest
        .ip(&["addr", "add", "10.250.0.53/24", "dev", "eth0"])?;
    let mut agent = start_agent(&node, "tapm*", &["--attach-mode", "netlink"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapm0 attached with netlink",
        |s| interfaces(s) == Some(1.0),
    )?;
    agent.kill9()?;
    let left = tc_filters(&node.ns, "tapm0", "egress")?;
    assert!(left.contains("hvnet_egress"), "{left}");

    let agent = start_agent(&node, "tapm*", &["--attach-mode", "tcx"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapm0 attached with TCX",
        |s| interfaces(s) == Some(1.0),
    )?;
    for hook in ["egress", "ingress"] {
        let filters = tc_filters(&node.ns, "tapm0", hook)?;
        assert!(
            !filters.contains("hvnet"),
            "the killed run's {hook} filter is still there: {filters}"
        );
    }
    let programs = tcx_programs(&node.ns, "tapm0")?;
    assert!(
        programs.iter().any(|p| p == "hvnet_egress")
            && programs.iter().any(|p| p == "hvnet_ingress"),
        "{programs:?}"
    );
    let base = vm.stats()?;
    vm.ping(BRIDGE_ADDR, 3)?;
    counts_match(&agent, &node.ns, "tapm0", &vm.control, Some(&base))?;
    Ok(())
}
