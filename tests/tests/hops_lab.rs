//! Privileged lab tests: DHCP replies followed across the node's bridge,
//! not only the tap, with dnsmasq and busybox udhcpc. A reply that reaches
//! the node and dies before one VM's tap is `reply_lost_on_node`, named by
//! the hop that last saw it and the kernel's drop reason; a server that
//! never answers stays `no_reply` with nothing lost on the node.

use std::{path::PathBuf, time::Duration};

use hvnet_lab::{
    agent::Agent,
    expect::eventually,
    metrics::{self, Sample},
    network_node::NetworkNode,
    node::ComputeNode,
    testkit::require_root,
};

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

fn series(s: &[Sample], name: &str, iface: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let mut labels = vec![("iface", iface)];
    labels.extend_from_slice(extra);
    metrics::value(s, name, &labels)
}

/// One udhcpc attempt from the guest that gives up after four tries
/// (its failure is the point when replies cannot reach it).
fn try_dhcp(vm: &hvnet_lab::node::FakeVm, script: &std::path::Path) -> bool {
    vm.dhcp_tries(script, 4).is_ok()
}

/// hvnet on `node` with `args`, once it follows `count` hops of `role`.
fn agent_following(
    node: &ComputeNode,
    args: &[&str],
    role: &str,
    count: f64,
) -> anyhow::Result<Agent> {
    let agent = Agent::start(&node.ns, 9478, args, &node.dir.join("hvnet.log"))?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        &format!("{count} {role} hop(s) followed"),
        |s| metrics::value(s, "hvnet_agent_hops", &[("role", role)]) == Some(count),
    )?;
    Ok(agent)
}

#[test]
fn a_reply_dropped_by_a_bridge_rule_is_lost_on_node_for_that_vm_only() -> anyhow::Result<()> {
    require_root();
    let mut node = ComputeNode::create(&hvnet_lab::unique_prefix("b"))?;
    node.start_dhcp_server("2m")?;
    let healthy = node.add_vm("tapb0", 0, &fake_vmm())?;
    let blocked = node.add_vm("tapb1", 1, &fake_vmm())?;
    let agent = agent_following(&node, &["--interfaces", "tapb*"], "bridge", 1.0)?;
    // dnsmasq answers from br0 itself: its replies leave through the
    // bridge's output hook, where this rule drops the ones toward tapb1.
    node.ns.exec_ok(&[
        "nft",
        "add table bridge hvnet_lab_drop; \
         add chain bridge hvnet_lab_drop out { type filter hook output priority 0; }; \
         add rule bridge hvnet_lab_drop out oifname \"tapb1\" udp sport 67 drop",
    ])?;

    assert!(
        try_dhcp(&healthy, &node.udhcpc_script()),
        "the healthy VM got no lease"
    );
    assert!(
        !try_dhcp(&blocked, &node.udhcpc_script()),
        "the blocked VM got a lease through the drop rule"
    );
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "tapb1's replies lost on the node",
        |s| {
            series(s, "hvnet_dhcp_replies_lost_on_node_total", "tapb1", &[])
                .is_some_and(|v| v >= 1.0)
        },
    )?;
    let s = agent.scrape(&node.ns)?;
    assert_eq!(
        series(
            s.as_slice(),
            "hvnet_dhcp_replies_lost_on_node_total",
            "tapb0",
            &[]
        ),
        Some(0.0),
        "the healthy VM lost nothing"
    );
    assert!(
        metrics::value(
            &s,
            "hvnet_hop_dhcp_packets_total",
            &[("hop", "br0"), ("role", "bridge"), ("direction", "egress")]
        )
        .is_some_and(|v| v >= 2.0),
        "br0's egress saw the OFFERs"
    );
    // The verdict, once udhcpc's transaction has gone quiet.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(25),
        "tapb1's verdict reply_lost_on_node",
        |s| {
            series(
                s,
                "hvnet_dhcp_transactions_total",
                "tapb1",
                &[("verdict", "reply_lost_on_node")],
            )
            .is_some_and(|v| v >= 1.0)
        },
    )?;
    let explained = agent.explain(&node.ns, "tapb1")?;
    assert!(
        explained.contains("OFFER xid")
            && explained.contains("seen on br0, dropped before tapb1 (reason netfilter_drop)"),
        "{explained}"
    );
    // The lab's agent shows every breakdown from 0: present, and 0.
    assert_eq!(
        series(
            &agent.scrape(&node.ns)?,
            "hvnet_dhcp_transactions_total",
            "tapb0",
            &[("verdict", "reply_lost_on_node")]
        ),
        Some(0.0),
        "the healthy VM has no lost-on-node verdict"
    );
    Ok(())
}

#[test]
fn a_stopped_server_is_no_reply_with_nothing_lost_on_the_node() -> anyhow::Result<()> {
    require_root();
    let mut node = ComputeNode::create(&hvnet_lab::unique_prefix("n"))?;
    let vm = node.add_vm("tapn0", 0, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapn*"],
        &node.dir.join("hvnet.log"),
    )?;
    node.stop_dhcp_server();
    assert!(
        !try_dhcp(&vm, &node.udhcpc_script()),
        "a lease with no server"
    );
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(25),
        "tapn0's verdict no_reply",
        |s| {
            series(
                s,
                "hvnet_dhcp_transactions_total",
                "tapn0",
                &[("verdict", "no_reply")],
            )
            .is_some_and(|v| v >= 1.0)
        },
    )?;
    let s = agent.scrape(&node.ns)?;
    assert_eq!(
        series(&s, "hvnet_dhcp_replies_lost_on_node_total", "tapn0", &[]),
        Some(0.0)
    );
    // The requests were seen leaving through the bridge.
    assert!(
        metrics::value(
            &s,
            "hvnet_hop_dhcp_packets_total",
            &[("hop", "br0"), ("role", "bridge"), ("direction", "ingress")]
        )
        .is_some_and(|v| v >= 1.0),
        "br0 saw the DISCOVERs"
    );
    Ok(())
}

/// A VM plugged the way Neutron's hybrid plug does it: tap -> qbr (a Linux
/// bridge of its own) -> veth qvb/qvo -> br0 (standing for br-int, where
/// the DHCP server answers).
#[test]
fn a_hybrid_plug_is_followed_end_to_end_and_a_drop_on_its_qbr_is_named() -> anyhow::Result<()> {
    require_root();
    let mut node = ComputeNode::create(&hvnet_lab::unique_prefix("y"))?;
    node.start_dhcp_server("2m")?;
    let vm = node.add_hybrid_vm("tapy0", 0, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapy*"],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "qbr0 and br0 followed as bridges, qvb0 and qvo0 as ports",
        |s| {
            metrics::value(s, "hvnet_agent_hops", &[("role", "bridge")]) == Some(2.0)
                && metrics::value(s, "hvnet_agent_hops", &[("role", "bridge_port")])
                    .is_some_and(|v| v >= 2.0)
        },
    )?;
    vm.dhcp(&node.udhcpc_script())?;
    // The ACK's way in: br0 sends it, qvo0 sends it into the pair, qvb0
    // receives it, qbr0 forwards it to the tap.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "the ACK seen on every hop of the plug",
        |s| {
            [("br0", "egress"), ("qvo0", "egress"), ("qvb0", "ingress")]
                .iter()
                .all(|(hop, direction)| {
                    metrics::value(
                        s,
                        "hvnet_hop_dhcp_packets_total",
                        &[("hop", hop), ("direction", direction)],
                    )
                    .is_some_and(|v| v >= 2.0)
                })
        },
    )?;
    let explained = agent.explain(&node.ns, "tapy0")?;
    assert!(
        explained.contains("queued toward the VM (seen on br0, qvo0 and qvb0)"),
        "{explained}"
    );

    // qbr0 now drops DHCP replies toward the tap (its forward hook).
    node.ns.exec_ok(&[
        "nft",
        "add table bridge hvnet_lab_qbr; \
         add chain bridge hvnet_lab_qbr forward_chain { type filter hook forward priority 0; }; \
         add rule bridge hvnet_lab_qbr forward_chain oifname \"tapy0\" udp sport 67 drop",
    ])?;
    assert!(
        !try_dhcp(&vm, &node.udhcpc_script()),
        "a lease through the drop rule"
    );
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "tapy0's replies lost on the node",
        |s| {
            series(s, "hvnet_dhcp_replies_lost_on_node_total", "tapy0", &[])
                .is_some_and(|v| v >= 1.0)
        },
    )?;
    let explained = agent.explain(&node.ns, "tapy0")?;
    assert!(
        explained
            .contains("seen on br0, qvo0 and qvb0, dropped before tapy0 (reason netfilter_drop)"),
        "{explained}"
    );
    Ok(())
}

/// The DHCP server on a network node behind a VXLAN tunnel (the OVS
/// tunnel case, with Linux's own VXLAN): the compute node's uplink
/// carries the replies encapsulated; hvnet looks inside and counts them
/// exactly.
#[test]
fn replies_through_a_vxlan_uplink_are_followed_inside_the_tunnel_and_counted_exactly(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&hvnet_lab::unique_prefix("x"))?;
    let network = NetworkNode::behind_vxlan(&node, 42)?;
    let vm = node.add_vm("tapx0", 0, &fake_vmm())?;
    let agent = agent_following(
        &node,
        &["--interfaces", "tapx*", "--uplinks", "upl*"],
        "uplink",
        1.0,
    )?;
    vm.dhcp(&node.udhcpc_script())?;
    let replies_on_tap = |s: &[Sample]| -> Option<f64> {
        let offers = series(
            s,
            "hvnet_dhcp_packets_total",
            "tapx0",
            &[("direction", "to_vm"), ("type", "offer")],
        )?;
        let acks = series(
            s,
            "hvnet_dhcp_packets_total",
            "tapx0",
            &[("direction", "to_vm"), ("type", "ack")],
        )?;
        Some(offers + acks)
    };
    let on_uplink = |s: &[Sample]| {
        metrics::value(
            s,
            "hvnet_hop_dhcp_packets_total",
            &[
                ("hop", "upl0"),
                ("role", "uplink"),
                ("direction", "ingress"),
            ],
        )
    };
    // Every reply reached the tap (the VM has its lease): the uplink saw
    // each of them inside the tunnel, and no more.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "the uplink's count of tunnelled replies equals the tap's",
        |s| {
            let tap = replies_on_tap(s);
            tap.is_some_and(|t| t >= 2.0) && on_uplink(s) == tap
        },
    )?;
    let explained = agent.explain(&node.ns, "tapx0")?;
    assert!(
        explained.contains("queued toward the VM (seen on upl0 (VXLAN 42)"),
        "{explained}"
    );
    drop(network);
    Ok(())
}

/// A VLAN mistake: the server's reply reaches the node's uplink tagged
/// with a VLAN the node has no device for, and the kernel drops it there.
/// Hand-built frames (this machine's kernel has no 802.1Q devices): the
/// VM's DISCOVER from its guest, the tagged OFFER from the far end of the
/// uplink.
#[test]
fn a_reply_on_a_vlan_the_node_does_not_carry_is_lost_at_the_uplink_with_its_vlan_named(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&hvnet_lab::unique_prefix("w"))?;
    let far = hvnet_lab::netns::NetNs::create(&format!("{}-far", node.prefix))?;
    node.ns.link_to("upl0", &far)?;
    let vm = node.add_vm("tapw0", 0, &fake_vmm())?;
    let agent = agent_following(
        &node,
        &["--interfaces", "tapw*", "--uplinks", "upl0"],
        "uplink",
        1.0,
    )?;
    let lab = env!("CARGO_BIN_EXE_hvnet-lab");
    let frame = |ns: &hvnet_lab::netns::NetNs, args: &[&str]| -> anyhow::Result<()> {
        let mut argv = vec![lab, "dhcp-frame", "--xid", "0x5eed0042", "--client-mac"];
        argv.push(&vm.guest_mac);
        argv.extend_from_slice(args);
        ns.exec_ok(&argv).map(|_| ())
    };
    frame(&vm.guest, &["--iface", "eth0", "--type", "1"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "the DISCOVER seen on the tap",
        |s| {
            series(
                s,
                "hvnet_dhcp_packets_total",
                "tapw0",
                &[("direction", "from_vm"), ("type", "discover")],
            )
            .is_some_and(|v| v >= 1.0)
        },
    )?;
    frame(
        &far,
        &["--iface", "upl0", "--reply", "--type", "2", "--vlan", "100"],
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "the tagged OFFER lost on the node",
        |s| {
            series(s, "hvnet_dhcp_replies_lost_on_node_total", "tapw0", &[])
                .is_some_and(|v| v >= 1.0)
        },
    )?;
    let explained = agent.explain(&node.ns, "tapw0")?;
    assert!(
        explained
            .contains("OFFER xid 0x5eed0042 seen on upl0 (VLAN 100), dropped at upl0 (reason "),
        "{explained}"
    );
    Ok(())
}
