//! Privileged lab tests tying DHCP retries to RX stalls, with real clients
//! (busybox udhcpc, ISC dhclient) against dnsmasq.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::hvnet_bin,
    expect::eventually,
    metrics::{self, Sample},
    node::{ComputeNode, FakeVm},
    testkit::{lab_with_one_vm, require_root, Background},
    vmm::VmmMode,
    BRIDGE_ADDR, PEER_ADDR,
};

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

/// One series of one tap; None when it is missing (never read as 0).
fn value(s: &[Sample], name: &str, iface: &str, extra: &[(&str, &str)]) -> Option<f64> {
    let mut labels = vec![("iface", iface)];
    labels.extend_from_slice(extra);
    metrics::value(s, name, &labels)
}

/// The series exists and is at least `min`.
fn at_least(value: Option<f64>, min: f64) -> bool {
    value.is_some_and(|v| v >= min)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// The VM keeps sending (ping to a peer, not to its DHCP server: a VM's
/// own traffic goes elsewhere, so its ARP entry for the server stays
/// usable and its unicast renewal can leave), as a VM with a stalled RX
/// does. Waits for the DHCP client to have configured the address first
/// (hvnet sees the ACK reach the VM a moment before the client applies it).
fn keep_sending(vm: &FakeVm) -> anyhow::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.ipv4()?.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest never configured its lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.ping(BRIDGE_ADDR, 1)?;
    vm.keep_pinging(PEER_ADDR)
}

/// The incident's load: a steady UDP stream from the node toward the VM's
/// leased address. A vhost-net guest that stops taking RX buffers still has
/// a ring of them posted (256 here, as virtio-net posts): the worker fills
/// those first, and only then does the tap back up. Under load that takes a
/// moment, as in the incident; with a couple of pings a second, minutes.
fn load_toward(node: &ComputeNode, vm: &FakeVm) -> anyhow::Result<Child> {
    let ip = vm
        .ipv4()?
        .ok_or_else(|| anyhow::anyhow!("the guest has no address to load"))?;
    Ok(node
        .ns
        .command(env!("CARGO_BIN_EXE_hvnet-lab"))
        .args(["udp-send", "--to", &format!("{ip}:9"), "--pps", "300"])
        .args(["--seconds", "120"])
        .stdout(Stdio::null())
        .spawn()?)
}

#[test]
fn udhcpc_renewals_during_a_stall_are_retries_with_undelivered_acks_then_delivered_after_recovery(
) -> anyhow::Result<()> {
    require_root();
    let (node, vm, agent) = lab_with_one_vm("u", "tapu0", true, &fake_vmm())?;
    let udhcpc = vm.spawn_dhcp_client(&node.udhcpc_script())?;
    let mut background = Background(vec![udhcpc]);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(15),
        "a delivered lease",
        |s| {
            metrics::value(
                s,
                "hvnet_dhcp_lease_remaining_seconds",
                &[("iface", "tapu0")],
            )
            .is_some_and(|v| v > 100.0)
                && at_least(
                    value(
                        s,
                        "hvnet_dhcp_transactions_total",
                        "tapu0",
                        &[("verdict", "delivered")],
                    ),
                    1.0,
                )
        },
    )?;
    background.0.push(keep_sending(&vm)?);
    background.0.push(load_toward(&node, &vm)?);

    // `hvnet events` follows the live stream for the rest of the test.
    let events_log = node.dir.join("events.jsonl");
    let follower = node
        .ns
        .command(&hvnet_bin().display().to_string())
        .args(["events", "--agent", "127.0.0.1:9478"])
        .stdout(std::fs::File::create(&events_log)?)
        .stderr(Stdio::null())
        .spawn()?;
    background.0.push(follower);
    vm.set_mode(VmmMode::RxStall)?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(8),
        "rx_stalled",
        |s| value(s, "hvnet_vm_rx_stalled", "tapu0", &[]) == Some(1.0),
    )?;
    let hvnet = hvnet_bin().display().to_string();
    let top = node
        .ns
        .exec_ok(&[&hvnet, "top", "--once", "--agent", "127.0.0.1:9478"])?;
    let row = top
        .lines()
        .find(|l| l.starts_with("tapu0"))
        .unwrap_or_default()
        .to_owned();
    assert!(row.contains("rx_stalled"), "hvnet top: {top}");
    // Force a renewal: unicast REQUEST, then broadcast REQUESTs every 2 s.
    signal(&background.0[0], libc::SIGUSR1);
    let took = eventually(
        &agent,
        &node.ns,
        Duration::from_secs(20),
        "retries during the stall and undelivered ACKs",
        |s| {
            at_least(
                value(s, "hvnet_dhcp_retries_during_stall_total", "tapu0", &[]),
                2.0,
            ) && at_least(
                value(s, "hvnet_dhcp_replies_undelivered_total", "tapu0", &[]),
                2.0,
            )
        },
    )?;
    eprintln!("retries + undelivered ACKs seen {took:?} after the forced renewal");
    let s = agent.scrape(&node.ns)?;
    assert!(at_least(
        value(
            &s,
            "hvnet_dhcp_packets_total",
            "tapu0",
            &[("direction", "to_vm"), ("type", "ack")]
        ),
        2.0
    ));
    let text = agent.explain(&node.ns, "tapu0")?;
    eprintln!("--- hvnet explain tapu0 ---\n{text}---");
    assert!(
        // Named by the tap, or (vhost datapath) by the VMM's -name.
        text.starts_with("VM ") && text.contains(" (tapu0): rx_stalled since"),
        "{text}"
    );
    assert!(text.contains("RX stalled (backlog"), "{text}");
    assert!(
        text.contains("renewal xid 0x") && text.contains("unicast to 10.250.0.1"),
        "{text}"
    );
    assert!(
        text.contains("(retry #") && text.contains("while RX is stalled"),
        "{text}"
    );
    assert!(
        text.contains("ACK xid")
            && (text.contains("not dequeued after")
                || text.contains("dropped before reaching the VM")),
        "{text}"
    );
    assert!(text.contains("expires"), "{text}");
    // The hop path: dnsmasq answers from br0, which hvnet follows; the
    // ACKs reached the tap, so none is lost on the node: still the stall.
    assert!(
        text.contains("ACK xid") && text.contains("queued toward the VM (seen on br0)"),
        "{text}"
    );
    assert_eq!(
        value(
            &agent.scrape(&node.ns)?,
            "hvnet_dhcp_replies_lost_on_node_total",
            "tapu0",
            &[]
        ),
        Some(0.0)
    );

    vm.set_mode(VmmMode::Running)?;
    eventually(&agent, &node.ns, Duration::from_secs(5), "recovery", |s| {
        value(s, "hvnet_vm_rx_stalled", "tapu0", &[]) == Some(0.0)
    })?;
    let delivered_before = value(
        &agent.scrape(&node.ns)?,
        "hvnet_dhcp_transactions_total",
        "tapu0",
        &[("verdict", "delivered")],
    )
    .ok_or_else(|| anyhow::anyhow!("no delivered transactions series for tapu0"))?;
    std::thread::sleep(Duration::from_secs(1));
    signal(&background.0[0], libc::SIGUSR1);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "the next renewal delivered",
        |s| {
            value(
                s,
                "hvnet_dhcp_transactions_total",
                "tapu0",
                &[("verdict", "delivered")],
            )
            .is_some_and(|v| v > delivered_before)
        },
    )?;
    let text = agent.explain(&node.ns, "tapu0")?;
    assert!(text.contains("RX recovered"), "{text}");
    assert!(text.contains("reached the VM"), "{text}");
    let stream = std::fs::read_to_string(&events_log)?;
    let lines: Vec<serde_json::Value> = stream
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
    for wanted in ["stall", "dhcp_client", "dhcp_reply_queued"] {
        assert!(
            kinds.contains(&wanted),
            "no {wanted} in `hvnet events`: {kinds:?}"
        );
    }
    // Under load the tap's queue is full: an ACK is dropped there (the
    // incident), or, with room left, waits undelivered. Either way, said.
    assert!(
        kinds.contains(&"dhcp_reply_undelivered") || kinds.contains(&"dhcp_reply_dropped"),
        "no undelivered or dropped reply in `hvnet events`: {kinds:?}"
    );
    assert!(lines.iter().all(|l| l["iface"] == "tapu0"));
    Ok(())
}

#[test]
fn a_stopped_server_is_no_reply_not_blamed_on_the_vm() -> anyhow::Result<()> {
    require_root();
    let (mut node, vm, agent) = lab_with_one_vm("r", "tapr0", true, &fake_vmm())?;
    let mut background = Background(vec![vm.spawn_dhcp_client(&node.udhcpc_script())?]);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(15),
        "a delivered lease",
        |s| {
            at_least(
                value(
                    s,
                    "hvnet_dhcp_transactions_total",
                    "tapr0",
                    &[("verdict", "delivered")],
                ),
                1.0,
            )
        },
    )?;
    // Let udhcpc apply the lease and settle in BOUND before it is asked to
    // renew (a signal during its hook script is not a renewal).
    let bound = Instant::now() + Duration::from_secs(5);
    while vm.ipv4()?.is_none() && Instant::now() < bound {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    node.stop_dhcp_server();
    signal(&background.0[0], libc::SIGUSR1);
    std::thread::sleep(Duration::from_secs(7));
    // The client gives up for now; silence concludes the exchange.
    let client = background.0.remove(0);
    drop(Background(vec![client]));
    let verdict = eventually(
        &agent,
        &node.ns,
        Duration::from_secs(35),
        "a no_reply verdict",
        |s| {
            at_least(
                value(
                    s,
                    "hvnet_dhcp_transactions_total",
                    "tapr0",
                    &[("verdict", "no_reply")],
                ),
                1.0,
            )
        },
    );
    if verdict.is_err() {
        eprintln!(
            "--- hvnet explain tapr0 ---\n{}---",
            agent.explain(&node.ns, "tapr0")?
        );
    }
    verdict?;
    let s = agent.scrape(&node.ns)?;
    assert!(
        at_least(
            value(
                &s,
                "hvnet_dhcp_retries_total",
                "tapr0",
                &[("state", "rebinding")]
            ),
            1.0
        ),
        "the client retried"
    );
    assert_eq!(
        value(&s, "hvnet_dhcp_retries_during_stall_total", "tapr0", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "hvnet_dhcp_replies_undelivered_total", "tapr0", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "hvnet_vm_rx_stalls_total", "tapr0", &[]),
        Some(0.0)
    );
    let text = agent.explain(&node.ns, "tapr0")?;
    assert!(text.contains("ended: no_reply"), "{text}");
    Ok(())
}

#[test]
fn dhclient_loses_its_lease_during_a_long_stall_and_the_timeline_says_so() -> anyhow::Result<()> {
    require_root();
    let (node, vm, agent) = lab_with_one_vm("x", "tapx0", true, &fake_vmm())?;
    let mut background = Background(vec![vm.spawn_dhclient(&node.dhclient_script(), &node.dir)?]);
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(20),
        "dhclient's lease",
        |s| {
            metrics::value(
                s,
                "hvnet_dhcp_lease_remaining_seconds",
                &[("iface", "tapx0")],
            )
            .is_some_and(|v| v > 100.0)
        },
    )?;
    let granted = Instant::now();
    background.0.push(keep_sending(&vm)?);
    vm.set_mode(VmmMode::RxStall)?;
    // dnsmasq's 2-minute lease: T1 at 60 s (renew), T2 at 105 s (rebind),
    // expiry at 120 s. The VM never hears an answer.
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(135),
        "the lease expiring",
        |s| {
            metrics::value(
                s,
                "hvnet_dhcp_lease_remaining_seconds",
                &[("iface", "tapx0")],
            ) == Some(0.0)
        },
    )?;
    eprintln!("lease expired {:?} after it was granted", granted.elapsed());
    // The expiry line lands on the agent's next poll.
    let mut text = agent.explain(&node.ns, "tapx0")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !text.contains("expired: the VM has lost its address") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        text = agent.explain(&node.ns, "tapx0")?;
    }
    eprintln!("--- hvnet explain tapx0 ---\n{text}---");
    let s = agent.scrape(&node.ns)?;
    assert!(at_least(
        value(&s, "hvnet_dhcp_retries_during_stall_total", "tapx0", &[]),
        1.0
    ));
    assert!(at_least(
        value(&s, "hvnet_dhcp_replies_undelivered_total", "tapx0", &[]),
        1.0
    ));
    assert!(
        text.contains("lease on 10.250.0.") && text.contains("EXPIRED"),
        "{text}"
    );
    assert!(
        text.contains("expired: the VM has lost its address"),
        "{text}"
    );
    assert!(text.contains("renewal xid"), "{text}");
    // The guest really lost it (dhclient's expiry timer runs its EXPIRE
    // hook a moment after the lease's end).
    let lost = Instant::now() + Duration::from_secs(15);
    while vm.ipv4()?.is_some() && Instant::now() < lost {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vm.ipv4()?, None, "the guest still has an address");
    Ok(())
}
