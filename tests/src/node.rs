//! The emulated compute node: a netns with a bridge, dnsmasq, and fake VMs
//! whose taps hang off the bridge, each with its own guest netns.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    netns::{run, NetNs},
    vmm::{self, VmmMode, VmmStats},
    BRIDGE_ADDR, PEER_ADDR,
};

const DHCLIENT_SCRIPT: &str = r#"#!/bin/sh
# dhclient hook for lab guests: addresses only (never resolv.conf, which
# belongs to the host).
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    ;;
  EXPIRE|FAIL|RELEASE|STOP|PREINIT) ip -4 addr flush dev "$interface" ;;
esac
exit 0
"#;

const UDHCPC_SCRIPT: &str = include_str!("scripts/udhcpc.sh");

pub struct ComputeNode {
    pub ns: NetNs,
    pub prefix: String,
    pub dir: PathBuf,
    dnsmasq: Option<Child>,
}

impl ComputeNode {
    /// Creates `<prefix>-node` with bridge br0 (10.250.0.1/24). Multicast
    /// snooping is off: its IGMP queries would reach taps the guest never
    /// reads, an extra frame that is not the guest's traffic.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ns = NetNs::create(&format!("{prefix}-node"))?;
        add_quiet_bridge(&ns, "br0")?;
        ns.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        ns.ip(&["addr", "add", &format!("{PEER_ADDR}/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        for (name, text) in [
            ("udhcpc.script", UDHCPC_SCRIPT),
            ("dhclient.script", DHCLIENT_SCRIPT),
        ] {
            let script = dir.join(name);
            std::fs::write(&script, text)?;
            run(Command::new("chmod").arg("755").arg(&script))?;
        }
        Ok(Self {
            ns,
            prefix: prefix.to_owned(),
            dir,
            dnsmasq: None,
        })
    }

    /// Starts dnsmasq as the DHCP server on br0 (no DNS), with `lease`
    /// (dnsmasq's minimum is 2m).
    pub fn start_dhcp_server(&mut self, lease: &str) -> anyhow::Result<()> {
        self.dnsmasq = Some(spawn_dnsmasq(&self.ns, "br0", &self.dir, lease)?);
        Ok(())
    }

    pub fn stop_dhcp_server(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn udhcpc_script(&self) -> PathBuf {
        self.dir.join("udhcpc.script")
    }

    pub fn dhclient_script(&self) -> PathBuf {
        self.dir.join("dhclient.script")
    }

    /// A persistent tap on br0 with `mac`, as libvirt creates one before
    /// handing its fd to QEMU.
    pub fn create_tap(&self, tap: &str, mac: &str) -> anyhow::Result<()> {
        self.create_tap_on(tap, mac, "br0")
    }

    /// A persistent tap with `mac` on the bridge `master`.
    pub fn create_tap_on(&self, tap: &str, mac: &str, master: &str) -> anyhow::Result<()> {
        self.ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.ns
            .ip(&["link", "set", tap, "address", mac, "master", master, "up"])
            .map(|_| ())
    }

    /// Starts a fake VM: a persistent tap `tap` on br0 (as libvirt creates
    /// it), a guest netns, and a fake VMM relaying between them.
    /// The datapath comes from HVNET_LAB_DATAPATH (`plain` by default,
    /// `vhost` for /dev/vhost-net).
    pub fn add_vm(&self, tap: &str, index: u8, fake_vmm: &Path) -> anyhow::Result<FakeVm> {
        let datapath = std::env::var("HVNET_LAB_DATAPATH").unwrap_or_else(|_| "plain".into());
        FakeVm::start(self, tap, index, fake_vmm, &datapath, "br0")
    }

    /// A fake VM plugged as Neutron's hybrid plug does it: its tap on a
    /// bridge of its own (qbrN), joined to br0 (standing for br-int) by a
    /// veth pair (qvbN on qbrN, qvoN on br0).
    pub fn add_hybrid_vm(&self, tap: &str, index: u8, fake_vmm: &Path) -> anyhow::Result<FakeVm> {
        let (qbr, qvb, qvo) = (
            format!("qbr{index}"),
            format!("qvb{index}"),
            format!("qvo{index}"),
        );
        add_quiet_bridge(&self.ns, &qbr)?;
        self.ns
            .ip(&["link", "add", &qvb, "type", "veth", "peer", "name", &qvo])?;
        self.ns.ip(&["link", "set", &qvb, "master", &qbr, "up"])?;
        self.ns.ip(&["link", "set", &qvo, "master", "br0", "up"])?;
        self.ns.ip(&["link", "set", &qbr, "up"])?;
        FakeVm::start(self, tap, index, fake_vmm, "plain", &qbr)
    }

    /// A fake VM on an explicit datapath (`plain` or `vhost`).
    pub fn add_vm_on(
        &self,
        tap: &str,
        index: u8,
        fake_vmm: &Path,
        datapath: &str,
    ) -> anyhow::Result<FakeVm> {
        FakeVm::start(self, tap, index, fake_vmm, datapath, "br0")
    }
}

/// A Linux bridge that forwards at once (no STP, no forward delay) and
/// sends no IGMP queries of its own (multicast snooping off): its ports
/// see only the lab's own frames.
pub fn add_quiet_bridge(ns: &NetNs, name: &str) -> anyhow::Result<()> {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "bridge",
        "mcast_snooping",
        "0",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])
    .map(|_| ())
}

/// dnsmasq as a DHCP server only (no DNS) on `iface` in `ns`, handing out
/// 10.250.0.100-199 for `lease`, its files in `dir`; checked alive.
pub fn spawn_dnsmasq(ns: &NetNs, iface: &str, dir: &Path, lease: &str) -> anyhow::Result<Child> {
    let leases = dir.join(format!("dnsmasq-{iface}.leases"));
    let log = dir.join(format!("dnsmasq-{iface}.log"));
    let mut child = ns
        .command("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=0",
            &format!("--interface={iface}"),
            "--bind-interfaces",
            "--dhcp-authoritative",
            "--log-dhcp",
            "--user=root",
            &format!("--dhcp-range=10.250.0.100,10.250.0.199,255.255.255.0,{lease}"),
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!(
            "--pid-file={}",
            dir.join(format!("dnsmasq-{iface}.pid")).display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (apt package dnsmasq-base)")?;
    // dnsmasq binds at once; give it a moment and check it is alive.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = child.try_wait()? {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("dnsmasq exited at start ({status}): {log}");
    }
    Ok(child)
}

impl Drop for ComputeNode {
    fn drop(&mut self) {
        self.stop_dhcp_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct FakeVm {
    pub tap: String,
    pub guest: NetNs,
    pub guest_mac: String,
    pub control: PathBuf,
    /// The fake VMM's pid (its vhost worker is `vhost-<pid>`).
    pub vmm_pid: u32,
    node_ns: String,
    vmm: Child,
}

impl FakeVm {
    fn start(
        node: &ComputeNode,
        tap: &str,
        index: u8,
        fake_vmm: &Path,
        datapath: &str,
        master: &str,
    ) -> anyhow::Result<Self> {
        let guest = NetNs::create(&format!("{}-vm{index}", node.prefix))?;
        // libvirt's convention: the tap's MAC is the guest's with fe:.
        let guest_mac = format!("52:54:00:fa:{:02x}:{index:02x}", std::process::id() as u8);
        let tap_mac = format!("fe:54:00:fa:{:02x}:{index:02x}", std::process::id() as u8);
        node.create_tap_on(tap, &tap_mac, master)?;
        let control = node.dir.join(format!("{tap}.ctl"));
        let mut cmd = Command::new(fake_vmm);
        cmd.args(["--node-netns", node.ns.name(), "--tap", tap])
            .args(["--datapath", datapath])
            .args(["--guest-netns", guest.name(), "--control"])
            .arg(&control);
        if datapath == "vhost" {
            // As QEMU with vhost=on is seen on a node: a VMM by its
            // -name/-uuid, holding the tap and /dev/vhost-net.
            cmd.args(["--", "-name", &format!("guest={tap}-vm,debug-threads=on")])
                .args([
                    "-uuid",
                    &format!("00000000-0000-4000-8000-0000000000{index:02x}"),
                ]);
        }
        let mut vmm = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", fake_vmm.display()))?;
        let stdout = vmm.stdout.take().context("fake-vmm stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = vmm.kill();
            bail!("fake-vmm for {tap} did not start: {line:?}");
        }
        let vm = Self {
            vmm_pid: vmm.id(),
            tap: tap.to_owned(),
            guest,
            guest_mac,
            control,
            node_ns: node.ns.name().to_owned(),
            vmm,
        };
        vm.guest
            .ip(&["link", "set", "eth0", "address", &vm.guest_mac, "up"])?;
        Ok(vm)
    }

    pub fn stats(&self) -> anyhow::Result<VmmStats> {
        vmm::stats(&self.control)
    }

    pub fn set_mode(&self, mode: VmmMode) -> anyhow::Result<()> {
        vmm::set_mode(&self.control, mode)
    }

    /// Gets a lease with busybox udhcpc in the guest (then udhcpc exits).
    pub fn dhcp(&self, script: &Path) -> anyhow::Result<String> {
        self.dhcp_tries(script, 5)
    }

    /// udhcpc giving up after `tries` DISCOVERs a second apart.
    pub fn dhcp_tries(&self, script: &Path, tries: u32) -> anyhow::Result<String> {
        self.guest.exec_ok(&[
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            "-t",
            &tries.to_string(),
            "-T",
            "1",
            "-s",
            &script.display().to_string(),
        ])?;
        self.ipv4()?
            .context("udhcpc succeeded but eth0 has no address")
    }

    /// A long-running udhcpc that keeps renewing (for the demo).
    pub fn spawn_dhcp_client(&self, script: &Path) -> anyhow::Result<Child> {
        self.guest
            .command("busybox")
            .args([
                "udhcpc", "-i", "eth0", "-f", "-t", "0", "-T", "2", "-A", "2", "-s",
            ])
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting udhcpc")
    }

    /// ISC dhclient in the foreground, with the lab's hook script and its
    /// own lease file (nothing of the host's is touched).
    pub fn spawn_dhclient(&self, script: &Path, dir: &Path) -> anyhow::Result<Child> {
        let tag = self.guest.name();
        self.guest
            .command("dhclient")
            .args(["-d", "-4", "-sf"])
            .arg(script)
            .arg("-lf")
            .arg(dir.join(format!("{tag}.leases")))
            .arg("-pf")
            .arg(dir.join(format!("{tag}.pid")))
            .arg("eth0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dhclient (apt package isc-dhcp-client)")
    }

    pub fn ipv4(&self) -> anyhow::Result<Option<String>> {
        let out = self
            .guest
            .ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        Ok(out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .map(str::to_owned))
    }

    /// Pings `target` (inside the lab) `count` times from the guest.
    pub fn ping(&self, target: &str, count: u32) -> anyhow::Result<()> {
        self.guest
            .exec_ok(&[
                "busybox",
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                target,
            ])
            .map(|_| ())
    }

    /// Pings `target` from the guest every 0.5 s until the returned child
    /// is killed: a running VM keeps sending while its RX queue is stuck
    /// (that is what tells an RX stall from a paused VM).
    pub fn keep_pinging(&self, target: &str) -> anyhow::Result<Child> {
        self.guest
            .command("busybox")
            .args(["ping", "-i", "0.5", target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting busybox ping in the guest")
    }

    /// Kills the VMM: its tap stays (persistent, as libvirt's) without
    /// carrier, the way a crashed QEMU leaves it.
    pub fn kill_vmm(&mut self) -> anyhow::Result<()> {
        self.vmm.kill()?;
        self.vmm.wait()?;
        Ok(())
    }

    /// Deletes the VM's tap (the VMM keeps running on a dead fd).
    pub fn delete_tap(&self) -> anyhow::Result<()> {
        run(Command::new("ip").args(["-n", &self.node_ns, "link", "del", &self.tap])).map(|_| ())
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
        let _ = Command::new("ip")
            .args(["-n", &self.node_ns, "link", "del", &self.tap])
            .output();
    }
}
