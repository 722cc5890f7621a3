//! Soak: minutes of heavy load on several fake VMs, and not a single stall
//! report. Slow, so not in the default run: `cargo xtask test --soak`
//! (HVNET_SOAK_SECONDS sets the length, default 180).

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::Agent,
    expect::eventually,
    metrics,
    node::{ComputeNode, FakeVm},
    testkit::Background,
    unique_prefix, BRIDGE_ADDR,
};

fn spawn(mut cmd: std::process::Command) -> anyhow::Result<Child> {
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

#[test]
#[ignore = "minutes long: run with `cargo xtask test --soak`"]
fn soak_heavy_load_idle_and_downed_guests_never_stall() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let seconds: u64 = std::env::var("HVNET_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let fake_vmm = PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"));
    let lab = env!("CARGO_BIN_EXE_hvnet-lab");
    let node = ComputeNode::create(&unique_prefix("soak"))?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapk*"],
        &node.dir.join("hvnet.log"),
    )?;

    let mut vms: Vec<FakeVm> = Vec::new();
    for i in 0..5u8 {
        let vm = node.add_vm(&format!("tapk{i}"), i, &fake_vmm)?;
        vm.guest.ip(&[
            "addr",
            "add",
            &format!("10.250.0.{}/24", 80 + i),
            "dev",
            "eth0",
        ])?;
        vm.ping(BRIDGE_ADDR, 1)?;
        vms.push(vm);
    }
    let mut load = Background(Vec::new());
    for port in [5201, 5202, 5203] {
        let mut server = node.ns.command("iperf3");
        server.args(["-s", "-B", BRIDGE_ADDR, "-p", &port.to_string()]);
        load.0.push(spawn(server)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let duration = seconds.to_string();
    // tapk0: TCP at line rate from the VM; tapk1: TCP toward the VM.
    let mut up = vms[0].guest.command("iperf3");
    up.args(["-c", BRIDGE_ADDR, "-p", "5201", "-t", &duration]);
    load.0.push(spawn(up)?);
    let mut down = vms[1].guest.command("iperf3");
    down.args(["-c", BRIDGE_ADDR, "-p", "5202", "-t", &duration, "-R"]);
    load.0.push(spawn(down)?);
    // tapk2: a small-packet UDP flood both ways.
    let mut small = vms[2].guest.command("iperf3");
    small.args([
        "-c",
        BRIDGE_ADDR,
        "-p",
        "5203",
        "-t",
        &duration,
        "-u",
        "-b",
        "20M",
        "-l",
        "64",
    ]);
    load.0.push(spawn(small)?);
    let mut flood = node.ns.command(lab);
    flood.args([
        "udp-send",
        "--to",
        "10.250.0.82:9",
        "--pps",
        "20000",
        "--seconds",
        &duration,
    ]);
    load.0.push(spawn(flood)?);
    // tapk3 stays idle. tapk4's guest takes its interface down while
    // broadcasts keep arriving for it.
    vms[4].guest.ip(&["link", "set", "eth0", "down"])?;
    let mut bcast = node.ns.command("sh");
    bcast.args([
        "-c",
        &format!("while true; do {lab} udp-broadcast --count 5; sleep 0.2; done"),
    ]);
    load.0.push(spawn(bcast)?);

    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "5 VMs attached",
        |s| metrics::value(s, "hvnet_agent_interfaces", &[]) == Some(5.0),
    )?;
    let start = Instant::now();
    let mut scrapes = 0u32;
    let mut peak_pps = 0.0f64;
    let mut last: Option<(Instant, f64)> = None;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let samples = agent.scrape(&node.ns)?;
        scrapes += 1;
        for vm in &vms {
            let stalled = metrics::value(&samples, "hvnet_vm_rx_stalled", &[("iface", &vm.tap)]);
            anyhow::ensure!(
                stalled != Some(1.0),
                "{} reported rx_stalled under load after {:?}:\n{}",
                vm.tap,
                start.elapsed(),
                agent.log_text()
            );
        }
        let total: f64 = samples
            .iter()
            .filter(|s| s.name == "hvnet_vm_packets_total")
            .map(|s| s.value)
            .sum();
        if let Some((at, before)) = last {
            peak_pps = peak_pps.max((total - before) / at.elapsed().as_secs_f64());
        }
        last = Some((Instant::now(), total));
    }
    let samples = agent.scrape(&node.ns)?;
    for vm in &vms {
        let stalls = metrics::value(&samples, "hvnet_vm_rx_stalls_total", &[("iface", &vm.tap)]);
        assert_eq!(stalls, Some(0.0), "{} had stall episodes", vm.tap);
        let state = ["ok", "idle", "paused", "no_carrier"]
            .into_iter()
            .find(|s| {
                metrics::value(
                    &samples,
                    "hvnet_vm_state",
                    &[("iface", &vm.tap), ("state", s)],
                ) == Some(1.0)
            });
        let full_ring = metrics::value(
            &samples,
            "hvnet_vm_dropped_packets_total",
            &[("iface", &vm.tap), ("reason", "full_ring")],
        );
        eprintln!("{}: state {state:?}, full_ring drops {full_ring:?}", vm.tap);
    }
    eprintln!("soak: {seconds} s, {scrapes} scrapes, 0 stall reports, peak {peak_pps:.0} frames/s across the taps");
    Ok(())
}
