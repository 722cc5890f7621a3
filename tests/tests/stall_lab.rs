//! Privileged lab tests of RX-stall detection with the fake VMM's faults.
//! Defaults as shipped: poll 1 s, stall-after 3 s.

use std::{path::PathBuf, process::Stdio, time::Duration};

use hvnet_lab::{
    agent::Agent,
    expect::{eventually, watch},
    metrics::{self, Sample},
    node::{ComputeNode, FakeVm},
    testkit::{require_root, Background},
    unique_prefix,
    vmm::VmmMode,
    BRIDGE_ADDR,
};

const PORT: u16 = 9478;
const STALL_AFTER: f64 = 3.0;
const POLL: f64 = 1.0;
/// A scrape every 100 ms adds up to this much to a measured latency.
const SCRAPE_SLACK: f64 = 0.3;

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

fn gauge(samples: &[Sample], name: &str, iface: &str) -> f64 {
    metrics::value(samples, name, &[("iface", iface)]).unwrap_or(f64::NAN)
}

fn state_is(samples: &[Sample], iface: &str, state: &str) -> bool {
    metrics::value(
        samples,
        "hvnet_vm_state",
        &[("iface", iface), ("state", state)],
    ) == Some(1.0)
}

/// A VM that keeps sending (ping to the bridge), and a steady UDP stream
/// toward it from the node: the incident's traffic pattern.
fn busy_vm(node: &ComputeNode, vm: &FakeVm, ip: &str, pps: u32) -> anyhow::Result<Background> {
    vm.guest
        .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    vm.ping(BRIDGE_ADDR, 1)?;
    let ping = vm.keep_pinging(BRIDGE_ADDR)?;
    let udp = node
        .ns
        .command(env!("CARGO_BIN_EXE_hvnet-lab"))
        .args([
            "udp-send",
            "--to",
            &format!("{ip}:9"),
            "--pps",
            &pps.to_string(),
            "--seconds",
            "120",
        ])
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Background(vec![ping, udp]))
}

#[test]
fn rx_stall_is_detected_then_recovered_in_time_with_full_ring_drops_counted() -> anyhow::Result<()>
{
    require_root();
    let node = ComputeNode::create(&unique_prefix("s"))?;
    let vm = node.add_vm("taps0", 0, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        PORT,
        &["--interfaces", "taps*"],
        &node.dir.join("hvnet.log"),
    )?;
    let _traffic = busy_vm(&node, &vm, "10.250.0.60", 600)?;
    eventually(&agent, &node.ns, Duration::from_secs(5), "taps0 ok", |s| {
        state_is(s, "taps0", "ok")
    })?;

    let stalled = |s: &[Sample]| gauge(s, "hvnet_vm_rx_stalled", "taps0") == 1.0;
    // Present and 0 on every scrape: a missing series fails the window
    // (NaN is not 0), it never passes for "not stalled".
    let not_reported_healthy = |s: &[Sample]| gauge(s, "hvnet_vm_rx_stalled", "taps0") != 0.0;
    let nothing = |_: &[Sample]| false;
    // Healthy for a while under load first: no false alarm.
    assert!(watch(
        &agent,
        &node.ns,
        Duration::from_secs(4),
        "4 s of healthy load",
        |_| false,
        not_reported_healthy
    )
    .is_err_and(|e| e.to_string().contains("timed out")));

    // On-call runs tcpdump on the tap: its copies of the frames must not
    // pass for the VMM reading them.
    let _tcpdump = Background(vec![node
        .ns
        .command("tcpdump")
        .args(["-i", "taps0", "-n", "-w", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?]);
    vm.set_mode(VmmMode::RxStall)?;
    let detect = watch(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "rx_stalled",
        stalled,
        nothing,
    )?;
    eprintln!(
        "detection latency: {detect:.2} s (budget {:.1} s)",
        STALL_AFTER + 2.0 * POLL
    );
    assert!(
        detect <= STALL_AFTER + 2.0 * POLL + SCRAPE_SLACK,
        "stall detected after {detect:.2} s"
    );
    let samples = agent.scrape(&node.ns)?;
    assert!(state_is(&samples, "taps0", "rx_stalled"));

    // The queue fills to its length, then the tap drops for FULL_RING.
    watch(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "backlog at 1000 and full_ring drops",
        |s| {
            gauge(s, "hvnet_vm_rx_backlog_packets", "taps0") == 1000.0
                && metrics::value(
                    s,
                    "hvnet_vm_dropped_packets_total",
                    &[
                        ("iface", "taps0"),
                        ("reason", "full_ring"),
                        ("direction", "to_vm"),
                    ],
                )
                .is_some_and(|v| v > 0.0)
        },
        nothing,
    )?;

    vm.set_mode(VmmMode::Running)?;
    let recover = watch(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "recovery",
        |s| gauge(s, "hvnet_vm_rx_stalled", "taps0") == 0.0 && state_is(s, "taps0", "ok"),
        nothing,
    )?;
    eprintln!(
        "recovery latency: {recover:.2} s (budget {:.1} s)",
        2.0 * POLL
    );
    assert!(
        recover <= 2.0 * POLL + SCRAPE_SLACK,
        "recovery reported after {recover:.2} s"
    );

    let samples = agent.scrape(&node.ns)?;
    assert_eq!(gauge(&samples, "hvnet_vm_rx_stalls_total", "taps0"), 1.0);
    let stalled_for = gauge(&samples, "hvnet_vm_rx_stall_seconds_total", "taps0");
    assert!(
        stalled_for >= detect - POLL,
        "stall seconds {stalled_for}, detected after {detect}"
    );
    assert!(
        agent.log_text().contains("ok -> rx_stalled: RX stalled"),
        "{}",
        agent.log_text()
    );

    // A second episode counts once more.
    vm.set_mode(VmmMode::RxStall)?;
    watch(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "second stall",
        stalled,
        nothing,
    )?;
    vm.set_mode(VmmMode::Running)?;
    watch(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "second recovery",
        |s| state_is(s, "taps0", "ok"),
        nothing,
    )?;
    assert_eq!(
        gauge(
            &agent.scrape(&node.ns)?,
            "hvnet_vm_rx_stalls_total",
            "taps0"
        ),
        2.0
    );
    Ok(())
}

#[test]
fn paused_and_vmm_less_vms_are_never_called_rx_stalled() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("p"))?;
    let mut vm = node.add_vm("tapp0", 0, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        PORT,
        &["--interfaces", "tapp*"],
        &node.dir.join("hvnet.log"),
    )?;
    let _traffic = busy_vm(&node, &vm, "10.250.0.61", 600)?;
    eventually(&agent, &node.ns, Duration::from_secs(5), "tapp0 ok", |s| {
        state_is(s, "tapp0", "ok")
    })?;
    let stalled = |s: &[Sample]| gauge(s, "hvnet_vm_rx_stalled", "tapp0") == 1.0;

    // QMP stop: nothing moves either way, the queue fills and drops.
    vm.set_mode(VmmMode::Paused)?;
    let paused = watch(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "paused",
        |s| state_is(s, "tapp0", "paused"),
        stalled,
    )?;
    eprintln!("paused reported after {paused:.2} s");
    // ...and stays paused, not rx_stalled, with the ring full.
    assert!(watch(
        &agent,
        &node.ns,
        Duration::from_secs(4),
        "staying paused",
        |_| false,
        // Every scrape must say paused: a missing series fails too.
        |s| !state_is(s, "tapp0", "paused")
    )
    .is_err_and(|e| e.to_string().contains("timed out")));
    vm.set_mode(VmmMode::Running)?;
    watch(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "ok after cont",
        |s| state_is(s, "tapp0", "ok"),
        stalled,
    )?;

    // The VMM dies: the tap stays without carrier.
    vm.kill_vmm()?;
    watch(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "no_carrier",
        |s| state_is(s, "tapp0", "no_carrier"),
        stalled,
    )?;
    assert!(watch(
        &agent,
        &node.ns,
        Duration::from_secs(4),
        "staying no_carrier",
        |_| false,
        |s| !state_is(s, "tapp0", "no_carrier")
    )
    .is_err_and(|e| e.to_string().contains("timed out")));
    let samples = agent.scrape(&node.ns)?;
    assert_eq!(gauge(&samples, "hvnet_vm_rx_stalls_total", "tapp0"), 0.0);
    Ok(())
}
