//! Fair under floods: one guest flooding ARP (a broken or hostile VM) must
//! not blind hvnet to its neighbours. Each tap has its own share of the
//! event ring in the kernel; what a tap sends beyond it is counted
//! (hvnet_vm_events_throttled_total) and not recorded. Meanwhile a
//! neighbour renews its lease during an RX stall and hvnet still says so.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::Agent,
    expect::eventually,
    metrics,
    node::ComputeNode,
    testkit::{require_root, Background},
    unique_prefix,
    vmm::VmmMode,
    PEER_ADDR,
};

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

#[test]
fn a_flooding_vm_is_throttled_and_its_neighbours_dhcp_verdicts_stay_right() -> anyhow::Result<()> {
    require_root();
    let mut node = ComputeNode::create(&unique_prefix("n"))?;
    node.start_dhcp_server("2m")?;
    let flooder = node.add_vm("tapn0", 0, &fake_vmm())?;
    let neighbour = node.add_vm("tapn1", 1, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapn*"],
        &node.dir.join("hvnet.log"),
    )?;
    flooder.dhcp(&node.udhcpc_script())?;
    let mut background = Background(vec![neighbour.spawn_dhcp_client(&node.udhcpc_script())?]);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(15),
        "the neighbour's lease",
        |s| {
            metrics::value(
                s,
                "hvnet_dhcp_lease_remaining_seconds",
                &[("iface", "tapn1")],
            )
            .is_some()
        },
    )?;
    // hvnet sees the ACK before udhcpc's script configures the address.
    hvnet_lab::testkit::poll_until(
        "the neighbour's address",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok(neighbour.ipv4()?.is_some()),
    )?;
    let neighbour_ip = neighbour.ipv4()?.unwrap_or_default();

    // The flood: ARP requests out of the flooder's eth0, as fast as it goes.
    let flood = flooder
        .guest
        .command(env!("CARGO_BIN_EXE_hvnet-lab"))
        .args(["arp-flood", "--iface", "eth0", "--seconds", "40"])
        .stdout(Stdio::piped())
        .spawn()?;
    background.0.push(flood);
    // The neighbour keeps sending (a stalled VM still transmits) ...
    background.0.push(neighbour.keep_pinging(PEER_ADDR)?);
    // ... and the incident hits it under load.
    background.0.push(hvnet_lab::testkit::udp_load(
        &node.ns,
        env!("CARGO_BIN_EXE_hvnet-lab"),
        &neighbour_ip,
        300,
        120,
    )?);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "the flood throttled",
        |s| {
            metrics::value(s, "hvnet_vm_events_throttled_total", &[("iface", "tapn0")])
                .is_some_and(|t| t > 1000.0)
        },
    )?;
    neighbour.set_mode(VmmMode::RxStall)?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(20),
        "the neighbour rx_stalled",
        |s| metrics::value(s, "hvnet_vm_rx_stalled", &[("iface", "tapn1")]) == Some(1.0),
    )?;
    let renewed = Instant::now();
    // SAFETY: kill(2) on our own child: udhcpc renews on SIGUSR1.
    unsafe { libc::kill(background.0[0].id() as i32, libc::SIGUSR1) };
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(30),
        "the neighbour's retries during the stall and its undelivered ACKs",
        |s| {
            metrics::value(
                s,
                "hvnet_dhcp_retries_during_stall_total",
                &[("iface", "tapn1")],
            )
            .is_some_and(|r| r >= 1.0)
                && metrics::value(
                    s,
                    "hvnet_dhcp_replies_undelivered_total",
                    &[("iface", "tapn1")],
                )
                .is_some_and(|u| u >= 1.0)
        },
    )?;
    let samples = agent.scrape(&node.ns)?;
    let value = |name: &str, labels: &[(&str, &str)]| metrics::value(&samples, name, labels);
    let flood_arp = value(
        "hvnet_vm_packets_total",
        &[
            ("iface", "tapn0"),
            ("direction", "from_vm"),
            ("class", "arp"),
        ],
    );
    eprintln!(
        "flood: {flood_arp:?} ARP frames from tapn0, {:?} events throttled; events lost {:?}; neighbour: verdict found {:?} after the renewal, {:?} retries during stall, {:?} undelivered",
        value("hvnet_vm_events_throttled_total", &[("iface", "tapn0")]),
        value("hvnet_agent_events_lost_total", &[]),
        renewed.elapsed(),
        value("hvnet_dhcp_retries_during_stall_total", &[("iface", "tapn1")]),
        value("hvnet_dhcp_replies_undelivered_total", &[("iface", "tapn1")]),
    );
    // The neighbour was never throttled: its events all arrived.
    assert_eq!(
        value("hvnet_vm_events_throttled_total", &[("iface", "tapn1")]),
        Some(0.0)
    );
    let text = agent.explain(&node.ns, "tapn1")?;
    assert!(text.contains("while RX is stalled"), "{text}");
    neighbour.set_mode(VmmMode::Running)?;
    Ok(())
}
