//! Small helpers every privileged test file uses.

use std::{
    process::Child,
    time::{Duration, Instant},
};

/// Background processes of a test (clients, traffic generators), killed
/// when the test ends, however it ends.
pub struct Background(pub Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lab tests create network namespaces and taps and load eBPF.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests create netns and taps: run `cargo xtask test` as root"
    );
}

/// The most common lab: a compute node (with dnsmasq when `dhcp`), one
/// fake VM on tap `tap`, and hvnet watching `<tap's prefix>*`. Bind the
/// result as `let (node, vm, agent) = ...`: locals drop in reverse, so the
/// agent stops first and the node goes last.
pub fn lab_with_one_vm(
    tag: &str,
    tap: &str,
    dhcp: bool,
    fake_vmm: &std::path::Path,
) -> anyhow::Result<(
    crate::node::ComputeNode,
    crate::node::FakeVm,
    crate::agent::Agent,
)> {
    let mut node = crate::node::ComputeNode::create(&crate::unique_prefix(tag))?;
    if dhcp {
        node.start_dhcp_server("2m")?;
    }
    let vm = node.add_vm(tap, 0, fake_vmm)?;
    let glob = format!("{}*", tap.trim_end_matches(|c: char| c.is_ascii_digit()));
    let agent = crate::agent::Agent::start(
        &node.ns,
        9478,
        &["--interfaces", &glob],
        &node.dir.join("hvnet.log"),
    )?;
    Ok((node, vm, agent))
}

/// Calls `check` every `interval` until it says yes (returns how long that
/// took), fails (its error is returned), or `timeout` passes.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check()? {
            return Ok(start.elapsed());
        }
        std::thread::sleep(interval);
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// A steady UDP stream toward a guest at `ip` (port 9, discard), sent from
/// inside `ns` by the lab binary `lab_bin` (`hvnet-lab udp-send`): the
/// incident happened under load, and a queue only backs up with traffic.
pub fn udp_load(
    ns: &crate::netns::NetNs,
    lab_bin: &str,
    ip: &str,
    pps: u32,
    seconds: u32,
) -> anyhow::Result<Child> {
    Ok(ns
        .command(lab_bin)
        .args(["udp-send", "--to", &format!("{ip}:9")])
        .args(["--pps", &pps.to_string(), "--seconds", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?)
}
