//! Running out of file descriptors (systemd's default soft limit is 1024;
//! a dense node has thousands of taps): hvnet attaches what the limit
//! allows, keeps reading and exporting every tap it has, says why the
//! others wait (log and metric), and attaches them once descriptors free.

use std::time::Duration;

use hvnet_lab::{
    agent::Agent,
    expect::eventually,
    metrics::{self, Sample},
    node::ComputeNode,
    testkit::require_root,
    unique_prefix,
};

const TAPS: usize = 40;
/// A hard open-file limit far below what 40 taps need (about 4 each on
/// top of ~30 at start and the 64 hvnet keeps for polling).
const NOFILE: u32 = 140;

fn waiting(s: &[Sample]) -> Option<f64> {
    metrics::value(
        s,
        "hvnet_agent_interfaces_waiting",
        &[("reason", "fd_limit")],
    )
}

fn attached(s: &[Sample]) -> Option<f64> {
    metrics::value(s, "hvnet_agent_interfaces", &[])
}

/// (attached, waiting for descriptors); an error when either series is
/// missing: a vanished series is never a 0.
fn attached_and_waiting(s: &[Sample]) -> anyhow::Result<(f64, f64)> {
    let attached = attached(s).ok_or_else(|| anyhow::anyhow!("hvnet_agent_interfaces missing"))?;
    let waiting = waiting(s).ok_or_else(|| {
        anyhow::anyhow!("hvnet_agent_interfaces_waiting{{reason=\"fd_limit\"}} missing")
    })?;
    Ok((attached, waiting))
}

#[test]
fn at_the_open_file_limit_attached_taps_stay_watched_and_the_rest_wait_and_attach_later(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("l"))?;
    for i in 0..TAPS {
        node.ns
            .ip(&["tuntap", "add", "dev", &format!("tapl{i}"), "mode", "tap"])?;
        node.ns.ip(&["link", "set", &format!("tapl{i}"), "up"])?;
    }
    let agent = Agent::start_wrapped(
        &node.ns,
        9478,
        &["prlimit", &format!("--nofile={NOFILE}:{NOFILE}")],
        &["--interfaces", "tapl*"],
        &node.dir.join("hvnet.log"),
    )?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "some taps waiting, and every tap either attached or waiting",
        |s| {
            // Scrapes are answered while taps attach: wait for a settled
            // reconcile (the two counts come from separate locks).
            attached_and_waiting(s).is_ok_and(|(a, w)| w > 0.0 && a > 0.0 && a + w == TAPS as f64)
        },
    )?;
    let samples = agent.scrape(&node.ns)?;
    let (now_attached, now_waiting) = attached_and_waiting(&samples)?;
    eprintln!("nofile {NOFILE}: {now_attached} taps attached, {now_waiting} waiting");
    assert_eq!(now_attached + now_waiting, TAPS as f64);
    let log = agent.log_text();
    assert!(log.contains("open-file limit is reached"), "{log}");
    assert!(log.contains("raise LimitNOFILE"), "{log}");

    // The attached taps keep being polled and exported; no map read fails.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100));
        let samples = agent.scrape(&node.ns)?;
        let failed: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "hvnet_agent_map_read_success" && s.value != 1.0)
            .collect();
        assert!(failed.is_empty(), "map reads failed: {failed:?}");
        // (More may attach as the exact count of open descriptors allows.)
        let (a, w) = attached_and_waiting(&samples)?;
        assert_eq!(a + w, TAPS as f64);
        let states = samples
            .iter()
            .filter(|s| s.name == "hvnet_vm_state" && s.value == 1.0)
            .count();
        assert_eq!(states as f64, a, "every attached tap is evaluated");
        let info = samples.iter().filter(|s| s.name == "hvnet_vm_info").count();
        assert_eq!(info as f64, a);
    }
    assert!(
        !agent.log_text().contains("reading map"),
        "{}",
        agent.log_text()
    );

    let (_, now_waiting) = attached_and_waiting(&agent.scrape(&node.ns)?)?;
    assert!(now_waiting > 0.0, "the limit must still hold taps back");
    // Descriptors freed (VMs gone): the waiting taps are attached.
    let gone: Vec<String> = agent
        .scrape(&node.ns)?
        .iter()
        .filter(|s| s.name == "hvnet_vm_info")
        .filter_map(|s| s.labels.get("iface").cloned())
        .collect();
    for tap in &gone {
        node.ns.ip(&["link", "del", tap])?;
    }
    let left = TAPS - gone.len();
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "the waiting taps attached",
        |s| {
            attached_and_waiting(s)
                .is_ok_and(|(a, w)| a > 0.0 && a + w == left as f64 && w < now_waiting)
        },
    )?;
    let samples = agent.scrape(&node.ns)?;
    eprintln!(
        "after {} taps left: {:?} attached, {:?} waiting",
        gone.len(),
        attached(&samples),
        waiting(&samples)
    );
    Ok(())
}

#[test]
fn beyond_max_interfaces_taps_wait_instead_of_losing_counts() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("m"))?;
    for i in 0..5 {
        node.ns
            .ip(&["tuntap", "add", "dev", &format!("tapm{i}"), "mode", "tap"])?;
        node.ns.ip(&["link", "set", &format!("tapm{i}"), "up"])?;
    }
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapm*", "--max-interfaces", "3"],
        &node.dir.join("hvnet.log"),
    )?;
    let capacity = |s: &[Sample]| {
        metrics::value(
            s,
            "hvnet_agent_interfaces_waiting",
            &[("reason", "capacity")],
        )
    };
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "3 attached, 2 waiting for room",
        |s| attached(s) == Some(3.0) && capacity(s) == Some(2.0),
    )?;
    let log = agent.log_text();
    assert!(log.contains("raise max_interfaces"), "{log}");
    // The maps hold every tap accepted: nothing refused in the kernel.
    let samples = agent.scrape(&node.ns)?;
    for map in ["VM_COUNTERS", "DEQUEUED", "DROPS", "VHOST_RX"] {
        assert_eq!(
            metrics::value(
                &samples,
                "hvnet_agent_map_update_failures_total",
                &[("map", map)]
            ),
            Some(0.0),
            "{map}"
        );
    }
    assert!(metrics::value(&samples, "hvnet_agent_probe_read_errors_total", &[]).is_some());
    // A VM leaves: one waiting tap takes its place.
    let leaving = samples
        .iter()
        .find(|s| s.name == "hvnet_vm_info")
        .and_then(|s| s.labels.get("iface").cloned())
        .ok_or_else(|| anyhow::anyhow!("no attached tap"))?;
    node.ns.ip(&["link", "del", &leaving])?;
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "a waiting tap attached",
        |s| attached(s) == Some(3.0) && capacity(s) == Some(1.0),
    )?;
    Ok(())
}

/// Series that carry `iface`.
fn series_of(samples: &[Sample], iface: &str) -> usize {
    samples
        .iter()
        .filter(|s| s.labels.get("iface").map(String::as_str) == Some(iface))
        .count()
}

#[test]
fn idle_taps_cost_at_most_twenty_series_each_by_default_and_sixty_in_full_detail(
) -> anyhow::Result<()> {
    require_root();
    const IDLE: usize = 20;
    let node = ComputeNode::create(&unique_prefix("q"))?;
    for i in 0..IDLE {
        node.ns
            .ip(&["tuntap", "add", "dev", &format!("tapq{i}"), "mode", "tap"])?;
        node.ns
            .ip(&["link", "set", &format!("tapq{i}"), "master", "br0", "up"])?;
    }
    let mut per_tap = Vec::new();
    for (detail, port) in [("default", 9478), ("full", 9479)] {
        let mut agent = Agent::start(
            &node.ns,
            port,
            &["--interfaces", "tapq*", "--metrics-detail", detail],
            &node.dir.join(format!("hvnet-{detail}.log")),
        )?;
        // Attached, and every tap's state evaluated (its gauges are out).
        eventually(
            &agent,
            &node.ns,
            Duration::from_secs(10),
            "every idle tap exported",
            |s| {
                attached(s) == Some(IDLE as f64)
                    && (0..IDLE).all(|i| {
                        let iface = format!("tapq{i}");
                        metrics::value(s, "hvnet_vm_rx_stalled", &[("iface", &iface)]).is_some()
                    })
            },
        )?;
        let samples = agent.scrape(&node.ns)?;
        let counts: Vec<usize> = (0..IDLE)
            .map(|i| series_of(&samples, &format!("tapq{i}")))
            .collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        let least = counts.iter().copied().min().unwrap_or(0);
        eprintln!("{detail}: {least}..{most} series per idle tap");
        per_tap.push((detail, least, most));
        agent.terminate(Duration::from_secs(5))?;
    }
    let (_, default_least, default_most) = per_tap[0];
    let (_, full_least, _) = per_tap[1];
    assert!(
        default_most <= 20 && default_least >= 12,
        "default detail: {default_least}..{default_most} series per idle tap"
    );
    assert!(
        full_least >= 55,
        "full detail shows every breakdown: {full_least} series per idle tap"
    );
    Ok(())
}
