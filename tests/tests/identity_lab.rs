//! Privileged lab tests of VM identity and tap churn.

use std::{path::PathBuf, time::Duration};

use hvnet_lab::{
    agent::{hvnet_bin, Agent},
    expect::eventually,
    metrics,
    netns::NetNs,
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
    let text = agent.explain(&node.ns, "web-1")?;
    assert!(text.starts_with("VM web-1 (tapi0):"), "{text}");
    let missing = node
        .ns
        .command(&hvnet_bin().display().to_string())
        .args(["explain", "nope", "--agent", "127.0.0.1:9478"])
        .output()?;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("no monitored VM or interface named \"nope\""));

    // A second NIC of the same domain: its name now means two taps, and
    // explain says which ones instead of picking one.
    std::fs::write(
        libvirt.join("instance-00000001.xml"),
        format!(
            "<domstatus state='running' pid='1'><domain type='kvm' id='1'><name>instance-00000001</name>\
             <uuid>6f1c2a9e-5b7d-4c1e-9a3f-2b8d7e6c5a41</uuid><metadata>\
             <nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'><nova:name>web-1</nova:name>\
             </nova:instance></metadata><devices><interface type='bridge'><mac address='{}'/><source bridge='br0'/>\
             <target dev='tapi0'/></interface><interface type='bridge'><mac address='52:54:00:12:34:99'/>\
             <source bridge='br0'/><target dev='tapi1'/></interface></devices></domain></domstatus>",
            vm.guest_mac
        ),
    )?;
    node.create_tap("tapi1", "fe:54:00:12:34:99")?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "the second NIC named",
        |s| {
            metrics::value(
                s,
                "hvnet_vm_info",
                &[("iface", "tapi1"), ("vm_name", "web-1")],
            ) == Some(1.0)
        },
    )?;
    let ambiguous = node
        .ns
        .command(&hvnet_bin().display().to_string())
        .args(["explain", "web-1", "--agent", "http://127.0.0.1:9478"])
        .output()?;
    let stderr = String::from_utf8_lossy(&ambiguous.stderr);
    assert_eq!(ambiguous.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tapi0, tapi1"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let text = agent.explain(&node.ns, "tapi1")?;
    assert!(text.starts_with("VM web-1 (tapi1):"), "{text}");
    Ok(())
}

fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn seven_hundred_tap_create_destroy_cycles_leak_nothing() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("ch"))?;
    // A short grace, so departed series must also come and go.
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapch*", "--series-grace", "1s"],
        &node.dir.join("hvnet.log"),
    )?;
    let pid = agent.pid().ok_or_else(|| anyhow::anyhow!("no agent pid"))?;
    let batch = ["ip", "-n", node.ns.name(), "-batch", "-"];
    let mut before = 0;
    let mut fds_before = 0;
    let mut per_round = Vec::new();
    for round in 0..14 {
        // The first six rounds warm up (allocator arenas, map and table
        // capacity at 50 taps, HTTP connection buffers: measured to plateau
        // after 4-6 rounds); memory must stay flat over the last 400 cycles.
        if round == 6 {
            std::thread::sleep(Duration::from_secs(2));
            before = hvnet_lab::testkit::rss_kib(pid)?;
            fds_before = open_fds(pid)?;
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
        per_round.push(hvnet_lab::testkit::rss_kib(pid)?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = hvnet_lab::testkit::rss_kib(pid)?;
    // Each TCX link or netlink attachment is an fd in the agent: a leaked
    // attachment would show here.
    let fds_after = open_fds(pid)?;
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
    eprintln!("700 tap cycles: agent RSS per round {per_round:?} KiB; {before} KiB after warm-up, {after} KiB at the end; open fds {fds_before} -> {fds_after}; 0 per-VM series left");
    assert_eq!(
        fds_after, fds_before,
        "the agent's open fds (links, programs) leaked"
    );
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

/// A VM-side veth standing in for a tap, at a chosen ifindex: reuse is
/// what this test is about.
fn veth_vm(
    node: &ComputeNode,
    guest: &NetNs,
    name: &str,
    index: Option<u32>,
) -> anyhow::Result<()> {
    node.ns
        .veth_to(name, index, "10.250.7.1/24", guest, "10.250.7.2/24")
}

fn icmp_to_vm(s: &[metrics::Sample], iface: &str) -> Vec<f64> {
    s.iter()
        .filter(|x| {
            x.name == "hvnet_vm_packets_total"
                && x.labels.get("iface").map(String::as_str) == Some(iface)
                && x.labels.get("direction").map(String::as_str) == Some("to_vm")
                && x.labels.get("class").map(String::as_str) == Some("other")
        })
        .map(|x| x.value)
        .collect()
}

#[test]
fn a_reused_ifindex_or_name_never_inherits_another_vms_counts() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("ri"))?;
    let guest = NetNs::create(&format!("{}-g", node.prefix))?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapri*", "--series-grace", "60s"],
        &node.dir.join("hvnet.log"),
    )?;
    let ping = |count: &str| {
        node.ns.exec_ok(&[
            "busybox",
            "ping",
            "-c",
            count,
            "-i",
            "0.2",
            "-W",
            "2",
            "10.250.7.2",
        ])
    };
    // /api/v1/vms carries the ifindex (the metrics do not).
    let ifindex_of = |iface: &str| {
        let resp = hvnet_lab::http::get(&node.ns, agent.addr, "/api/v1/vms")?;
        let vms: Vec<hvnet::api::Vm> = serde_json::from_str(&resp.body)?;
        anyhow::Ok(
            vms.iter()
                .find(|v| v.iface == iface && !v.departed)
                .map(|v| v.ifindex),
        )
    };

    // VM A on tapri0 at ifindex 4242 sends 3 pings' worth toward the VM.
    veth_vm(&node, &guest, "tapri0", Some(4242))?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "tapri0 attached",
        |s| icmp_to_vm(s, "tapri0") == [0.0],
    )?;
    ping("3")?;
    eventually(&agent, &node.ns, Duration::from_secs(3), "A counted", |s| {
        icmp_to_vm(s, "tapri0") == [3.0]
    })?;

    // A goes; B arrives on another name with the same ifindex: B starts
    // from zero while A's final count stays visible for the grace period.
    node.ns.ip(&["link", "del", "tapri0"])?;
    veth_vm(&node, &guest, "tapri1", Some(4242))?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "B attached at A's ifindex",
        |s| icmp_to_vm(s, "tapri1") == [0.0] && icmp_to_vm(s, "tapri0") == [3.0],
    )?;
    assert_eq!(ifindex_of("tapri1")?, Some(4242));
    ping("2")?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "B counted alone",
        |s| icmp_to_vm(s, "tapri1") == [2.0] && icmp_to_vm(s, "tapri0") == [3.0],
    )?;

    // C reuses A's name (libvirt reuses vnetN names) within A's grace: one
    // series for the name, C's, from zero; never two, never A's 3.
    node.ns.ip(&["link", "del", "tapri1"])?;
    veth_vm(&node, &guest, "tapri0", None)?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "C owns the name",
        |s| {
            icmp_to_vm(s, "tapri0") == [0.0]
                && metrics::value(
                    s,
                    "hvnet_vm_state",
                    &[("iface", "tapri0"), ("state", "idle")],
                )
                .is_some()
        },
    )?;
    ping("1")?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "C counted alone",
        |s| icmp_to_vm(s, "tapri0") == [1.0] && icmp_to_vm(s, "tapri1") == [2.0],
    )?;
    Ok(())
}

/// The systemd unit's user: nobody, with exactly `caps` (setpriv names).
fn as_nobody_with(caps: &str) -> Vec<String> {
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn without_read_rights_vms_are_named_by_tap_and_the_log_says_which_capability_fixes_it(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("p"))?;
    let vm = node.add_vm("tapp0", 0, &fake_vmm())?;
    // libvirt keeps its status files root-only.
    let libvirt = node.dir.join("libvirt-qemu");
    std::fs::create_dir_all(&libvirt)?;
    std::fs::write(
        libvirt.join("db-9.xml"),
        format!(
            "<domstatus state='running' pid='1'><domain type='kvm'><name>db-9</name><uuid>9d9d</uuid>\
             <devices><interface type='bridge'><mac address='{}'/><target dev='tapp0'/></interface>\
             </devices></domain></domstatus>",
            vm.guest_mac
        ),
    )?;
    std::process::Command::new("chmod")
        .arg("700")
        .arg(&libvirt)
        .status()?;
    // A root-owned QEMU-looking process, whose fds nobody else may read.
    let _vmm_like = hvnet_lab::testkit::Background(vec![std::process::Command::new("bash")
        .args(["-c", "exec -a qemu-system-x86_64 sleep 60"])
        .spawn()?]);
    let libvirt_arg = libvirt.display().to_string();
    let args = ["--interfaces", "tapp*", "--libvirt-run-dir", &libvirt_arg];
    let named = |agent: &Agent, vm_name: &str| {
        eventually(agent, &node.ns, Duration::from_secs(5), vm_name, |s| {
            metrics::value(
                s,
                "hvnet_vm_info",
                &[("iface", "tapp0"), ("vm_name", vm_name)],
            ) == Some(1.0)
        })
    };

    // What the agent cannot do without: it runs, counts, names by tap...
    let minimal = as_nobody_with("+bpf,+perfmon,+net_admin");
    let wrapper: Vec<&str> = minimal.iter().map(String::as_str).collect();
    let log = node.dir.join("hvnet-minimal.log");
    let mut agent = Agent::start_wrapped(&node.ns, 9478, &wrapper, &args, &log)?;
    named(&agent, "tapp0")?;
    // ...and says once per source what is missing (the tap's name is the
    // default before the first identity look, so wait for the look).
    hvnet_lab::testkit::poll_until(
        "the identity sources' capability warnings",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let text = agent.log_text();
            Ok(text.contains("CAP_DAC_READ_SEARCH") && text.contains("CAP_SYS_PTRACE"))
        },
    )?;
    agent.terminate(Duration::from_secs(5))?;
    let text = agent.log_text();
    for needle in ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"] {
        assert_eq!(text.matches(needle).count(), 1, "{needle} once in:\n{text}");
    }

    // With the two read-only capabilities the unit grants, libvirt names it.
    let full = as_nobody_with("+bpf,+perfmon,+net_admin,+dac_read_search,+sys_ptrace");
    let wrapper: Vec<&str> = full.iter().map(String::as_str).collect();
    let log = node.dir.join("hvnet-unit.log");
    let agent = Agent::start_wrapped(&node.ns, 9478, &wrapper, &args, &log)?;
    named(&agent, "db-9")?;
    assert!(
        !agent.log_text().contains("permission denied"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn a_proc_tree_given_with_proc_root_names_the_vm_from_its_qemu_command_line() -> anyhow::Result<()>
{
    require_root();
    let node = ComputeNode::create(&unique_prefix("pr"))?;
    let _vm = node.add_vm("tapf0", 0, &fake_vmm())?;
    // A host's /proc as a container would see it mounted elsewhere: the
    // QEMU holding tapf0 on fd 27 (libvirt's JSON syntax), and a vhost worker.
    let proc_root = node.dir.join("host-proc");
    let qemu = proc_root.join("7001");
    std::fs::create_dir_all(qemu.join("fdinfo"))?;
    std::fs::write(
        qemu.join("fdinfo/27"),
        "pos:\t0\nflags:\t0104002\nmnt_id:\t15\niff:\ttapf0\n",
    )?;
    let argv = [
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "guest=instance-0000beef,debug-threads=on",
        "-uuid",
        "5e1f7a2b-0c3d-4e5f-8a9b-0c1d2e3f4a5b",
        "-netdev",
        r#"{"type":"tap","fd":"27","vhost":true,"vhostfd":"29","id":"hostnet0"}"#,
        "-device",
        r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"fa:16:3e:be:ef:01"}"#,
    ];
    std::fs::write(qemu.join("cmdline"), argv.join("\0") + "\0")?;
    let worker = qemu.join("task/7009");
    std::fs::create_dir_all(&worker)?;
    std::fs::write(worker.join("comm"), "vhost-7001\n")?;
    let proc_arg = proc_root.display().to_string();
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapf*", "--proc-root", &proc_arg],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(3),
        "named from the fake /proc",
        |s| {
            metrics::value(
                s,
                "hvnet_vm_info",
                &[
                    ("iface", "tapf0"),
                    ("vm_name", "instance-0000beef"),
                    ("vm_uuid", "5e1f7a2b-0c3d-4e5f-8a9b-0c1d2e3f4a5b"),
                    ("mac", "fa:16:3e:be:ef:01"),
                ],
            ) == Some(1.0)
        },
    )?;
    let text = agent.explain(&node.ns, "instance-0000beef")?;
    assert!(text.contains("VMM pid 7001, vhost workers 7009"), "{text}");
    Ok(())
}
