//! Privileged lab tests of VM identity and tap churn.

use std::{path::PathBuf, time::Duration};

use hvnet_lab::{
    agent::{hvnet_bin, Agent},
    expect::eventually,
    metrics,
    node::ComputeNode,
    testkit::require_root,
    unique_prefix,
};

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

#[test]
fn a_libvirt_status_file_names_the_vm_in_metrics_and_explain() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("i"))?;
    let vm = node.add_vm("tapi0", 0, &fake_vmm())?;
    // The file libvirt keeps for a running domain, in a directory of the lab's own.
    let libvirt = node.dir.join("libvirt-qemu");
    std::fs::create_dir_all(&libvirt)?;
    std::fs::write(
        libvirt.join("instance-00000001.xml"),
        format!(
            "<domstatus state='running' pid='1'><domain type='kvm' id='1'><name>instance-00000001</name>\
             <uuid>6f1c2a9e-5b7d-4c1e-9a3f-2b8d7e6c5a41</uuid><metadata>\
             <nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'><nova:name>web-1</nova:name>\
             <nova:owner><nova:project uuid='9a1f'>payments</nova:project></nova:owner></nova:instance>\
             </metadata><devices><interface type='bridge'><mac address='{}'/><source bridge='br0'/>\
             <target dev='tapi0'/></interface></devices></domain></domstatus>",
            vm.guest_mac
        ),
    )?;
    let libvirt_arg = libvirt.display().to_string();
    let agent = Agent::start(
        &node.ns,
        9478,
        &[
            "--interfaces",
            "tapi*",
            "--libvirt-run-dir",
            &libvirt_arg,
            "--project-label",
        ],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "the VM's identity",
        |s| {
            metrics::value(
                s,
                "hvnet_vm_info",
                &[
                    ("iface", "tapi0"),
                    ("vm_name", "web-1"),
                    ("vm_uuid", "6f1c2a9e-5b7d-4c1e-9a3f-2b8d7e6c5a41"),
                    ("mac", vm.guest_mac.as_str()),
                    ("project", "payments"),
                ],
            ) == Some(1.0)
        },
    )?;
    let text = node.ns.exec_ok(&[
        &hvnet_bin().display().to_string(),
        "explain",
        "web-1",
        "--agent",
        "127.0.0.1:9478",
    ])?;
    assert!(text.starts_with("VM web-1 (tapi0):"), "{text}");
    let missing = node
        .ns
        .command(&hvnet_bin().display().to_string())
        .args(["explain", "nope", "--agent", "127.0.0.1:9478"])
        .output()?;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("no monitored VM or interface named \"nope\""));
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

#[test]
fn five_hundred_tap_create_destroy_cycles_leak_nothing() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("ch"))?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapch*"],
        &node.dir.join("hvnet.log"),
    )?;
    let pid = agent.pid().ok_or_else(|| anyhow::anyhow!("no agent pid"))?;
    let batch = ["ip", "-n", node.ns.name(), "-batch", "-"];
    let mut before = 0;
    let mut per_round = Vec::new();
    for round in 0..10 {
        // The first two rounds warm up (allocator arenas, map and table
        // capacity at 50 taps); memory must stay flat over the other 400 cycles.
        if round == 2 {
            std::thread::sleep(Duration::from_secs(2));
            before = rss_kib(pid)?;
        }
        // 50 taps appear, get attached, and vanish again, per round.
        let mut script = String::new();
        for i in 0..50 {
            script.push_str(&format!(
                "tuntap add dev tapch{round}x{i} mode tap\nlink set tapch{round}x{i} up\n"
            ));
        }
        run_batch(&batch, &script)?;
        eventually(
            &agent,
            &node.ns,
            Duration::from_secs(10),
            "50 taps attached",
            |s| metrics::value(s, "hvnet_agent_interfaces", &[]) == Some(50.0),
        )?;
        let script: String = (0..50)
            .map(|i| format!("link del tapch{round}x{i}\n"))
            .collect();
        run_batch(&batch, &script)?;
        eventually(
            &agent,
            &node.ns,
            Duration::from_secs(10),
            "all taps gone",
            |s| metrics::value(s, "hvnet_agent_interfaces", &[]) == Some(0.0),
        )?;
        per_round.push(rss_kib(pid)?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid)?;
    let samples = agent.scrape(&node.ns)?;
    let stale: Vec<_> = samples
        .iter()
        .filter(|s| s.name.starts_with("hvnet_vm_") || s.name.starts_with("hvnet_dhcp_"))
        .collect();
    assert!(
        stale.is_empty(),
        "stale per-VM series after churn: {:?}",
        stale.first()
    );
    eprintln!("500 tap cycles: agent RSS per round {per_round:?} KiB; {before} KiB after warm-up, {after} KiB at the end; 0 per-VM series left");
    assert!(
        after < before + 1024,
        "agent memory grew from {before} to {after} KiB over 400 cycles"
    );
    // No TCX program or tc filter can outlive its interface; the last one
    // is checked on a fresh tap: hvnet attaches exactly its two programs.
    node.ns
        .ip(&["tuntap", "add", "dev", "tapchlast", "mode", "tap"])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(5),
        "last tap attached",
        |s| metrics::value(s, "hvnet_agent_interfaces", &[]) == Some(1.0),
    )?;
    let mut programs = hvnet_lab::expect::tcx_programs(&node.ns, "tapchlast")?;
    programs.sort();
    assert_eq!(programs, ["hvnet_egress", "hvnet_ingress"]);
    Ok(())
}

fn run_batch(cmd: &[&str], script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(script.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "ip -batch failed");
    Ok(())
}
