//! The kernel matrix: the same core lab checks and a capability report on
//! the host kernel and on each Debian kernel booted as a compute node.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    boot::{self, NodeRun, StepOutcome},
    initramfs::{self, Payload},
};
use crate::{
    agent::{hvnet_bin, Agent},
    guest::image::GuestImage,
    metrics,
    node::ComputeNode,
    testkit::poll_until,
};

/// One core lab check: a lab test run by exact name.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Step label and table column (one word: the console protocol splits
    /// on spaces).
    pub label: &'static str,
    /// The test binary (a file under tests/tests).
    pub test: &'static str,
    pub name: &'static str,
    /// Runs only where the kernel has TCX (6.6+); elsewhere "n/a".
    pub tcx_only: bool,
    /// Runs on the vhost-net datapath (needs /dev/vhost-net; "n/a" without).
    pub vhost: bool,
}

/// Environment of a vhost check: every fake VM on /dev/vhost-net, and the
/// vhost test may not skip.
const VHOST_ENV: &[(&str, &str)] = &[
    ("HVNET_LAB_DATAPATH", "vhost"),
    ("HVNET_REQUIRE_VHOST", "1"),
];

pub const CHECKS: &[Check] = &[
    Check {
        label: "counts",
        test: "tc_lab",
        name: "counts_equal_what_the_vmm_relayed_per_direction_and_class",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "clsact+kill9",
        test: "tc_lab",
        name: "netlink_mode_filters_sit_beside_foreign_ones_and_survive_kill_9_then_restart_cleans_up",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "tcx+sigterm",
        test: "tc_lab",
        name: "tcx_mode_coexists_with_a_foreign_filter_and_sigterm_removes_only_hvnet",
        tcx_only: true,
        vhost: false,
    },
    Check {
        label: "tcx+kill9",
        test: "tc_lab",
        name: "kill_9_in_tcx_mode_leaves_nothing_attached_and_a_restart_counts_again",
        tcx_only: true,
        vhost: false,
    },
    Check {
        label: "stall",
        test: "stall_lab",
        name: "rx_stall_is_detected_then_recovered_in_time_with_full_ring_drops_counted",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "paused",
        test: "stall_lab",
        name: "paused_and_vmm_less_vms_are_never_called_rx_stalled",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "dhcp-in-stall",
        test: "dhcp_lab",
        name: "udhcpc_renewals_during_a_stall_are_retries_with_undelivered_acks_then_delivered_after_recovery",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "bridge-drop",
        test: "hops_lab",
        name: "a_reply_dropped_by_a_bridge_rule_is_lost_on_node_for_that_vm_only",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "vxlan-hop",
        test: "hops_lab",
        name: "replies_through_a_vxlan_uplink_are_followed_inside_the_tunnel_and_counted_exactly",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "vlan-hop",
        test: "hops_lab",
        name: "a_reply_on_a_vlan_the_node_does_not_carry_is_lost_at_the_uplink_with_its_vlan_named",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "hop-parser",
        test: "kernel_parser",
        name: "the_hop_program_finds_dhcp_behind_vlan_tags_and_inside_tunnels_as_userspace_does",
        tcx_only: false,
        vhost: false,
    },
    Check {
        label: "vhost",
        test: "vhost_lab",
        name: "vhost_net_counts_exactly_names_vmm_and_worker_and_sees_tun_recvmsg",
        tcx_only: false,
        vhost: true,
    },
    Check {
        label: "vhost-stall",
        test: "stall_lab",
        name: "rx_stall_is_detected_then_recovered_in_time_with_full_ring_drops_counted",
        tcx_only: false,
        vhost: true,
    },
    Check {
        label: "vhost-paused",
        test: "stall_lab",
        name: "paused_and_vmm_less_vms_are_never_called_rx_stalled",
        tcx_only: false,
        vhost: true,
    },
    Check {
        label: "vhost-dhcp-in-stall",
        test: "dhcp_lab",
        name: "udhcpc_renewals_during_a_stall_are_retries_with_undelivered_acks_then_delivered_after_recovery",
        tcx_only: false,
        vhost: true,
    },
];

const REPORT_STEP: &str = "report";
/// Booting, then every check under TCG (measured: well under this).
const NODE_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Where the matrix finds what it runs.
#[derive(Debug, Clone)]
pub struct MatrixInputs {
    /// Kernel label -> unpacked kernel cache (see `cargo xtask setup`).
    pub kernels: Vec<(String, PathBuf)>,
    /// Test binary name (tc_lab, ...) -> built executable.
    pub test_bins: BTreeMap<String, PathBuf>,
    pub lab_bin: PathBuf,
    pub work_dir: PathBuf,
    /// Also run the checks on this machine's own kernel.
    pub host: bool,
}

/// One kernel's results.
#[derive(Debug)]
pub struct KernelRow {
    pub label: String,
    pub release: String,
    pub steps: Vec<StepOutcome>,
    /// Why the row has no results, if the VM never ran its plan.
    pub error: Option<String>,
}

fn tcx_capable(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// The plan for one kernel: the report, then every check that applies.
fn plan(
    inputs: &MatrixInputs,
    tcx: bool,
    vhost: bool,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut steps = vec![(
        REPORT_STEP.to_owned(),
        vec![inputs.lab_bin.display().to_string(), "kernel-report".into()],
    )];
    let applies = |c: &&Check| (tcx || !c.tcx_only) && (vhost || !c.vhost);
    for check in CHECKS.iter().filter(applies) {
        let bin = inputs
            .test_bins
            .get(check.test)
            .with_context(|| format!("no test binary for {}", check.test))?;
        // `env K=V ... test-binary ...`: the same line on the host and in the VM.
        let mut argv = Vec::new();
        if check.vhost {
            argv.push("env".to_owned());
            argv.extend(VHOST_ENV.iter().map(|(k, v)| format!("{k}={v}")));
        }
        argv.extend([
            bin.display().to_string(),
            "--exact".into(),
            check.name.into(),
            "--test-threads=1".into(),
            "--nocapture".into(),
        ]);
        steps.push((check.label.to_owned(), argv));
    }
    Ok(steps)
}

fn plan_text(steps: &[(String, Vec<String>)]) -> String {
    let hvnet = hvnet_bin();
    steps
        .iter()
        .map(|(label, argv)| {
            format!(
                "{label}\tHVNET_BIN={} RUST_BACKTRACE=1 {}\n",
                hvnet.display(),
                argv.join(" ")
            )
        })
        .collect()
}

/// Runs the matrix: the host first (if asked), then each kernel in a VM.
pub fn run(inputs: &MatrixInputs) -> anyhow::Result<Vec<KernelRow>> {
    std::fs::create_dir_all(&inputs.work_dir)?;
    let mut rows = Vec::new();
    if inputs.host {
        eprintln!("kernel matrix: host kernel");
        rows.push(run_on_host(inputs)?);
    }
    for (label, cache) in &inputs.kernels {
        eprintln!("kernel matrix: booting Debian {label} as a compute node (QEMU TCG)");
        rows.push(match run_in_vm(inputs, label, cache) {
            Ok(row) => row,
            Err(err) => KernelRow {
                label: label.clone(),
                release: String::new(),
                steps: Vec::new(),
                error: Some(format!("{err:#}")),
            },
        });
    }
    Ok(rows)
}

fn run_on_host(inputs: &MatrixInputs) -> anyhow::Result<KernelRow> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let mut run = NodeRun {
        release: release.clone(),
        ..Default::default()
    };
    let vhost = Path::new("/dev/vhost-net").exists();
    for (label, argv) in plan(inputs, tcx_capable(&release), vhost)? {
        let started = std::time::Instant::now();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| format!("running {}", argv[0]))?;
        run.absorb(&format!("HVNET-NODE begin {label}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines().filter(|l| l.starts_with("HVNET-NODE ")) {
            run.absorb(line);
        }
        let code = out.status.code().unwrap_or(-1);
        if code != 0 {
            for line in text.lines().rev().take(80).collect::<Vec<_>>().iter().rev() {
                run.absorb(&format!("HVNET-NODE log {line}"));
            }
        }
        run.absorb(&format!(
            "HVNET-NODE end {label} {code} {}",
            started.elapsed().as_secs()
        ));
        eprintln!("  {label}: exit {code} in {:?}", started.elapsed());
    }
    Ok(KernelRow {
        label: "host".into(),
        release,
        steps: run.steps,
        error: None,
    })
}

fn release_of(image: &GuestImage) -> String {
    image
        .kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned()
}

/// Boots kernel `label` as a compute node carrying hvnet, the lab, its
/// tools and `extra_bins`, and runs `steps` (label, argv) in it.
pub fn boot_node(
    cache: &Path,
    label: &str,
    lab_bin: &Path,
    extra_bins: &[&Path],
    steps: &[(String, Vec<String>)],
    work_dir: &Path,
) -> anyhow::Result<NodeRun> {
    let image = GuestImage::locate(cache)?;
    let mut payload = Payload::default();
    payload.binary(&hvnet_bin())?;
    payload.binary(lab_bin)?;
    for bin in extra_bins {
        payload.binary(bin)?;
    }
    // The lab's fake VMM sits beside hvnet-lab (tests name it by path).
    payload.binary(&lab_bin.with_file_name("fake-vmm"))?;
    for tool in ["ip", "tc", "dnsmasq", "nft"] {
        payload.tool(tool)?;
    }
    // Test binaries resolve `<manifest dir>/../target/...`.
    payload.dir(Path::new(env!("CARGO_MANIFEST_DIR")));
    std::fs::create_dir_all(work_dir)?;
    let initrd = work_dir.join(format!("node-{label}.initramfs"));
    initramfs::write(&image, &payload, &plan_text(steps), &initrd)?;
    let console = work_dir.join(format!("node-{label}.console.log"));
    boot::run(&image.kernel, &initrd, NODE_TIMEOUT, &console)
}

fn run_in_vm(inputs: &MatrixInputs, label: &str, cache: &Path) -> anyhow::Result<KernelRow> {
    let release = release_of(&GuestImage::locate(cache)?);
    // The node VM loads vhost_net (a failed insmod is reported).
    let steps = plan(inputs, tcx_capable(&release), true)?;
    let bins: Vec<&Path> = inputs.test_bins.values().map(PathBuf::as_path).collect();
    let run = boot_node(
        cache,
        label,
        &inputs.lab_bin,
        &bins,
        &steps,
        &inputs.work_dir,
    )?;
    let mut error = None;
    if !run.insmod_failures.is_empty() {
        error = Some(format!(
            "modules failed to load: {}",
            run.insmod_failures.join(", ")
        ));
    }
    Ok(KernelRow {
        label: label.to_owned(),
        release: run.release,
        steps: run.steps,
        error,
    })
}

/// Capability report lines the `report` step printed, parsed as
/// `key value...`.
fn report_values<'a>(row: &'a KernelRow, key: &str) -> Vec<&'a str> {
    row.steps
        .iter()
        .filter(|s| s.label == REPORT_STEP)
        .flat_map(|s| s.reports.iter())
        .filter_map(|r| r.strip_prefix(key)?.strip_prefix(' '))
        .collect()
}

fn cell(row: &KernelRow, label: &str) -> String {
    match row.steps.iter().find(|s| s.label == label) {
        Some(step) if step.passed() => format!("ok ({} s)", step.seconds),
        Some(step) => match step.status {
            Some(code) => format!("FAIL (exit {code})"),
            None => "FAIL (did not end)".into(),
        },
        None if row.error.is_some() && row.steps.is_empty() => "-".into(),
        None => "n/a".into(),
    }
}

/// The matrix as Markdown: what attached, then the checks.
pub fn render(rows: &[KernelRow]) -> String {
    let mut out = String::new();
    out.push_str("| kernel | tc attach | probes attached | BTF offsets | kfree_skb reasons |");
    for check in CHECKS {
        out.push_str(&format!(" {} |", check.label));
    }
    out.push_str("\n|---|---|---|---|---|");
    out.push_str(&"---|".repeat(CHECKS.len()));
    out.push('\n');
    for row in rows {
        let probes: Vec<&str> = report_values(row, "probe");
        let attached: Vec<String> = probes
            .iter()
            .filter_map(|p| {
                let f: Vec<&str> = p.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "1").then(|| format!("{} ({})", f[0], f[1]))
            })
            .collect();
        let first = |key: &str| {
            report_values(row, key)
                .first()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into())
        };
        out.push_str(&format!(
            "| {} {} | {} | {} | {} | {} |",
            row.label,
            row.release,
            first("tc"),
            if attached.is_empty() {
                "?".into()
            } else {
                attached.join(", ")
            },
            first("btf"),
            first("drop_reasons"),
        ));
        for check in CHECKS {
            out.push_str(&format!(" {} |", cell(row, check.label)));
        }
        out.push('\n');
    }
    for row in rows {
        if let Some(err) = &row.error {
            out.push_str(&format!("\n{} {}: {err}\n", row.label, row.release));
        }
        for step in row.steps.iter().filter(|s| !s.passed()) {
            out.push_str(&format!(
                "\n{} {} {} failed; last output:\n",
                row.label, row.release, step.label
            ));
            for line in &step.log {
                out.push_str(&format!("    {line}\n"));
            }
        }
        // A probe attached by one kind (kprobe) is not missing when the
        // other kind (fentry) was not needed.
        let probes = report_values(row, "probe");
        let attached_names: Vec<&str> = probes
            .iter()
            .filter(|p| p.split_whitespace().nth(2) == Some("1"))
            .filter_map(|p| p.split_whitespace().next())
            .collect();
        let missing: Vec<&str> = probes
            .into_iter()
            .filter(|p| p.split_whitespace().nth(2) == Some("0"))
            .filter(|p| {
                p.split_whitespace()
                    .next()
                    .is_some_and(|name| !attached_names.contains(&name))
            })
            .collect();
        for probe in missing {
            out.push_str(&format!(
                "{} {}: not attached: {probe}\n",
                row.label, row.release
            ));
        }
    }
    out
}

/// True when every check that applies passed on every kernel.
pub fn all_passed(rows: &[KernelRow]) -> bool {
    rows.iter().all(|row| {
        row.error.is_none() && !row.steps.is_empty() && row.steps.iter().all(StepOutcome::passed)
    })
}

/// The `report` step: one fake VM, hvnet in `auto` mode, and what it
/// attached, as `HVNET-NODE report` lines.
pub fn kernel_report() -> anyhow::Result<()> {
    let node = ComputeNode::create(&crate::unique_prefix("r"))?;
    let vmm = std::env::current_exe()?.with_file_name("fake-vmm");
    let _vm = node.add_vm("tapr0", 0, &vmm)?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapr*"],
        &node.dir.join("hvnet.log"),
    )?;
    let mut samples = Vec::new();
    poll_until(
        "tapr0 attached",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            samples = agent.scrape(&node.ns)?;
            Ok(metrics::value(&samples, "hvnet_agent_interfaces", &[]) == Some(1.0))
        },
    )?;
    let mut mechanism = None;
    let mut probes = 0;
    for s in samples
        .iter()
        .filter(|s| s.name == "hvnet_agent_probe_attached")
    {
        let probe = s.labels.get("probe").map(String::as_str).unwrap_or("?");
        let kind = s.labels.get("kind").map(String::as_str).unwrap_or("?");
        if probe == "tc_egress" && s.value == 1.0 {
            mechanism = Some(kind.to_owned());
        }
        println!("HVNET-NODE report probe {probe} {kind} {}", s.value);
        probes += 1;
    }
    if probes == 0 {
        bail!("hvnet_agent_probe_attached is missing from /metrics");
    }
    let mechanism =
        mechanism.context("hvnet_agent_probe_attached{probe=\"tc_egress\"} is not 1")?;
    println!("HVNET-NODE report tc {mechanism} (auto)");
    let log = agent.log_text();
    let capability = |prefix: &str| {
        log.lines()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.trim().to_owned()))
    };
    let btf = capability("kernel BTF:").context("the agent logged no `kernel BTF:` line")?;
    println!("HVNET-NODE report btf {btf}");
    let reasons =
        capability("kfree_skb drop reasons:").context("the agent logged no drop reason line")?;
    println!("HVNET-NODE report drop_reasons {reasons}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_starts_at_6_6() {
        assert!(!tcx_capable("6.1.0-57-cloud-amd64"));
        assert!(!tcx_capable("5.14.0-362.el9.x86_64"));
        assert!(tcx_capable("6.6.0"));
        assert!(tcx_capable("6.12.117+deb12-cloud-amd64"));
        assert!(tcx_capable("6.18.3"));
    }

    #[test]
    fn the_table_marks_failures_and_checks_that_do_not_apply() {
        let mut run = NodeRun::default();
        for line in [
            "HVNET-NODE begin report",
            "HVNET-NODE report probe tc_egress netlink 1",
            "HVNET-NODE report probe vhost_tun_recvmsg kprobe 0",
            "HVNET-NODE report tc netlink (auto)",
            "HVNET-NODE end report 0 5",
            "HVNET-NODE begin counts",
            "HVNET-NODE log boom",
            "HVNET-NODE end counts 101 9",
        ] {
            run.absorb(line);
        }
        let row = KernelRow {
            label: "6.1".into(),
            release: "6.1.0-57-cloud-amd64".into(),
            steps: run.steps,
            error: None,
        };
        let table = render(std::slice::from_ref(&row));
        assert!(
            table.contains("| 6.1 6.1.0-57-cloud-amd64 | netlink (auto) |"),
            "{table}"
        );
        assert!(table.contains("FAIL (exit 101)"), "{table}");
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("    boom"), "{table}");
        assert!(!all_passed(&[row]));
    }
}
