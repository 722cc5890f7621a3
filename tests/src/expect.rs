//! Assertions the privileged tests share: hvnet's counters against what
//! the fake VMM really relayed, and what tc shows on an interface.

use std::time::{Duration, Instant};

use anyhow::bail;
use tracer_common::{class, direction};

use crate::{
    agent::Agent,
    metrics::{self, Sample},
    netns::NetNs,
    vmm::{DirectionStats, VmmStats},
};

const DIRECTIONS: [(u8, &str); 2] = [(direction::TO_VM, "to_vm"), (direction::FROM_VM, "from_vm")];
const CLASSES: [(u8, &str); 4] = [
    (class::DHCP, "dhcp"),
    (class::ARP, "arp"),
    (class::BROADCAST, "broadcast"),
    (class::OTHER, "other"),
];

fn side(stats: &VmmStats, dir: u8) -> &DirectionStats {
    if dir == direction::TO_VM {
        &stats.to_vm
    } else {
        &stats.from_vm
    }
}

fn side_mut(stats: &mut VmmStats, dir: u8) -> &mut DirectionStats {
    if dir == direction::TO_VM {
        &mut stats.to_vm
    } else {
        &mut stats.from_vm
    }
}

/// hvnet's packets and bytes for one (interface, direction, class); None
/// where the series is missing.
fn counted(
    samples: &[Sample],
    iface: &str,
    dir_name: &str,
    cls_name: &str,
) -> (Option<f64>, Option<f64>) {
    let labels = [
        ("iface", iface),
        ("direction", dir_name),
        ("class", cls_name),
    ];
    (
        metrics::value(samples, "hvnet_vm_packets_total", &labels),
        metrics::value(samples, "hvnet_vm_bytes_total", &labels),
    )
}

/// Differences between hvnet's series for `iface` and the VMM's counts
/// (minus `baseline`, what the VMM had relayed before hvnet attached).
pub fn count_mismatches(
    samples: &[Sample],
    iface: &str,
    vmm: &VmmStats,
    baseline: Option<&VmmStats>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (dir, dir_name) in DIRECTIONS {
        for (cls, cls_name) in CLASSES {
            let i = usize::from(cls);
            let base = baseline.map(|b| side(b, dir));
            let want_packets = side(vmm, dir).packets[i] - base.map_or(0, |b| b.packets[i]);
            let want_bytes = side(vmm, dir).bytes[i] - base.map_or(0, |b| b.bytes[i]);
            let (got_packets, got_bytes) = counted(samples, iface, dir_name, cls_name);
            if got_packets != Some(want_packets as f64) || got_bytes != Some(want_bytes as f64) {
                problems.push(format!(
                    "{iface} {dir_name} {cls_name}: hvnet {got_packets:?} packets / {got_bytes:?} bytes, VMM relayed {want_packets} / {want_bytes}"
                ));
            }
        }
    }
    problems
}

/// Waits (up to 5 s) for a quiet moment in which hvnet's counters equal
/// the VMM's exactly, and returns the VMM stats they matched.
pub fn counts_match(
    agent: &Agent,
    ns: &NetNs,
    iface: &str,
    control: &std::path::Path,
    baseline: Option<&VmmStats>,
) -> anyhow::Result<VmmStats> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let before = crate::vmm::stats(control)?;
        let samples = agent.scrape(ns)?;
        let after = crate::vmm::stats(control)?;
        if before == after {
            last = count_mismatches(&samples, iface, &after, baseline);
            if last.is_empty() {
                return Ok(after);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "hvnet's counts never matched the VMM's:\n  {}",
        last.join("\n  ")
    )
}

/// A baseline for [`counts_match`] taken at a quiet moment after hvnet
/// attached: what the VMM relayed that hvnet's counters do not hold. Frames
/// that cross between the attach and this call (a neighbour probe the
/// kernel sends seconds after earlier traffic) are on both sides then, so
/// only what follows is compared. Every series must be present.
pub fn quiet_baseline(
    agent: &Agent,
    ns: &NetNs,
    iface: &str,
    control: &std::path::Path,
) -> anyhow::Result<VmmStats> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = String::from("no quiet moment");
    while Instant::now() < deadline {
        let before = crate::vmm::stats(control)?;
        let samples = agent.scrape(ns)?;
        let after = crate::vmm::stats(control)?;
        if before == after {
            match not_counted(&samples, iface, &after) {
                Ok(base) => return Ok(base),
                Err(err) => last = err.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("no baseline for {iface}: {last}")
}

/// The VMM's counts minus hvnet's, per direction and class.
fn not_counted(samples: &[Sample], iface: &str, vmm: &VmmStats) -> anyhow::Result<VmmStats> {
    let mut base = vmm.clone();
    for (dir, dir_name) in DIRECTIONS {
        for (cls, cls_name) in CLASSES {
            let i = usize::from(cls);
            let (Some(packets), Some(bytes)) = counted(samples, iface, dir_name, cls_name) else {
                bail!("{iface} {dir_name} {cls_name}: hvnet's series missing");
            };
            let (packets, bytes) = (packets as u64, bytes as u64);
            let side = side_mut(&mut base, dir);
            side.packets[i] = side.packets[i].checked_sub(packets).ok_or_else(|| {
                anyhow::anyhow!("{iface} {dir_name} {cls_name}: hvnet counted more than relayed")
            })?;
            side.bytes[i] = side.bytes[i].checked_sub(bytes).ok_or_else(|| {
                anyhow::anyhow!(
                    "{iface} {dir_name} {cls_name}: hvnet counted more bytes than relayed"
                )
            })?;
        }
    }
    Ok(base)
}

/// Polls /metrics until `check` holds (up to `timeout`).
pub fn eventually(
    agent: &Agent,
    ns: &NetNs,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> anyhow::Result<Duration> {
    // A failed scrape (agent still starting) is a "not yet".
    crate::testkit::poll_until(what, timeout, Duration::from_millis(50), || {
        Ok(agent.scrape(ns).is_ok_and(|samples| check(&samples)))
    })
    .map_err(|err| anyhow::anyhow!("{err}:\n{}", agent.log_text()))
}

/// Polls /metrics every 100 ms until `check` holds (returns the seconds it
/// took); fails at once if `forbidden` is ever seen on the way.
pub fn watch(
    agent: &Agent,
    ns: &NetNs,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
    forbidden: impl Fn(&[Sample]) -> bool,
) -> anyhow::Result<f64> {
    crate::testkit::poll_until(what, timeout, Duration::from_millis(100), || {
        let samples = agent.scrape(ns)?;
        anyhow::ensure!(
            !forbidden(&samples),
            "forbidden state seen while waiting for {what}"
        );
        Ok(check(&samples))
    })
    .map(|took| took.as_secs_f64())
    .map_err(|err| anyhow::anyhow!("{err}:\n{}", agent.log_text()))
}

/// Names of the TCX programs attached to `iface` in `ns` (both directions).
pub fn tcx_programs(ns: &NetNs, iface: &str) -> anyhow::Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let iface = iface.to_owned();
    ns.enter(move || {
        let mut names = Vec::new();
        for attach in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx(&iface, attach)?;
            names.extend(
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
            );
        }
        Ok(names)
    })
}

/// `tc filter show dev <iface> <ingress|egress>` inside `ns`.
pub fn tc_filters(ns: &NetNs, iface: &str, hook: &str) -> anyhow::Result<String> {
    ns.exec_ok(&["tc", "filter", "show", "dev", iface, hook])
}
