//! The production datapath: a VM whose NIC is served by vhost-net (the
//! fake VMM drives /dev/vhost-net; the kernel's vhost worker moves the
//! frames). Needs /dev/vhost-net: where it is missing (this project's
//! build machine) the test says so and stops; the kernel matrix runs it in
//! its compute-node VMs with HVNET_REQUIRE_VHOST=1, where it must run.

use std::{path::PathBuf, time::Duration};

use hvnet_lab::{
    agent::Agent,
    expect::{counts_match, eventually},
    metrics,
    node::ComputeNode,
    testkit::require_root,
    unique_prefix, BRIDGE_ADDR,
};

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

/// False (with the reason printed) when this kernel has no vhost-net.
fn vhost_available() -> bool {
    if std::path::Path::new("/dev/vhost-net").exists() {
        return true;
    }
    assert!(
        std::env::var_os("HVNET_REQUIRE_VHOST").is_none(),
        "HVNET_REQUIRE_VHOST is set but /dev/vhost-net is missing (load vhost_net)"
    );
    eprintln!(
        "skipped: /dev/vhost-net is missing on this kernel (module vhost_net); \
         `cargo xtask test --kernels` runs this test in compute-node VMs"
    );
    false
}

fn comm(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn vhost_net_counts_exactly_names_vmm_and_worker_and_sees_tun_recvmsg() -> anyhow::Result<()> {
    require_root();
    if !vhost_available() {
        return Ok(());
    }
    let node = ComputeNode::create(&unique_prefix("v"))?;
    let vm = node.add_vm_on("tapv0", 0, &fake_vmm(), "vhost")?;
    vm.guest
        .ip(&["addr", "add", "10.250.0.61/24", "dev", "eth0"])?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapv*"],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "tapv0 attached",
        |s| metrics::value(s, "hvnet_agent_interfaces", &[]) == Some(1.0),
    )?;

    // Frames both ways through the vhost worker; counts exact against the
    // driver's own ring counts.
    let base = vm.stats()?;
    vm.ping(BRIDGE_ADDR, 3)?;
    let after = counts_match(&agent, &node.ns, "tapv0", &vm.control, Some(&base))?;
    let delivered: u64 =
        after.to_vm.packets.iter().sum::<u64>() - base.to_vm.packets.iter().sum::<u64>();
    assert!(
        delivered >= 3,
        "the vhost RX ring delivered {delivered} frames for 3 pings"
    );

    // The tun_recvmsg probe: attached (kprobe on these kernels) and counting
    // this tap's vhost RX work.
    let samples = agent.scrape(&node.ns)?;
    let kprobe = metrics::value(
        &samples,
        "hvnet_agent_probe_attached",
        &[("probe", "vhost_tun_recvmsg"), ("kind", "kprobe")],
    );
    let fentry = metrics::value(
        &samples,
        "hvnet_agent_probe_attached",
        &[("probe", "vhost_tun_recvmsg"), ("kind", "fentry")],
    );
    assert!(
        kprobe == Some(1.0) || fentry == Some(1.0),
        "vhost probe not attached (kprobe {kprobe:?}, fentry {fentry:?}):\n{}",
        agent.log_text()
    );
    let calls = metrics::value(
        &samples,
        "hvnet_vm_vhost_rx_calls_total",
        &[("iface", "tapv0")],
    )
    .ok_or_else(|| anyhow::anyhow!("hvnet_vm_vhost_rx_calls_total{{iface=\"tapv0\"}} missing"))?;
    assert!(calls >= 3.0, "tun_recvmsg calls for tapv0: {calls}");

    // The VMM and its vhost worker, named for on-call.
    let resp = hvnet_lab::http::get(&node.ns, agent.addr, "/api/v1/vms")?;
    anyhow::ensure!(resp.status == 200, "/api/v1/vms: {}", resp.status);
    let vms: Vec<hvnet::api::Vm> = serde_json::from_str(&resp.body)?;
    let ours = vms
        .iter()
        .find(|v| v.iface == "tapv0")
        .ok_or_else(|| anyhow::anyhow!("tapv0 missing from /api/v1/vms: {}", resp.body))?;
    assert_eq!(ours.identity.vmm_pid, Some(vm.vmm_pid), "{ours:?}");
    let workers = &ours.identity.vhost_workers;
    assert!(!workers.is_empty(), "no vhost worker named: {ours:?}");
    for tid in workers {
        assert_eq!(comm(*tid), format!("vhost-{}", vm.vmm_pid), "worker {tid}");
    }
    let explain = agent.explain(&node.ns, "tapv0")?;
    assert!(
        explain.contains(&format!("VMM pid {}", vm.vmm_pid)) && explain.contains("vhost workers"),
        "{explain}"
    );
    eprintln!(
        "vhost: {delivered} frames delivered, {calls} tun_recvmsg calls, workers {workers:?}"
    );
    Ok(())
}
