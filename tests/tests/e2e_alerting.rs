//! End to end, on-call path: the lab + hvnet + a real Prometheus scraping
//! it with the shipped rules + a real Alertmanager routing to a webhook
//! receiver. An RX stall and a forced DHCP renewal must page with the right
//! VM labels, and resolve on recovery; every dashboard query must run
//! against that Prometheus without error and, with the lab's data, return
//! something.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::Agent,
    dashboards::{metric_names, panel_queries, substitute},
    expect::eventually,
    metrics,
    node::ComputeNode,
    promstack::{self, received},
    testkit::{poll_until, Background},
    unique_prefix,
    vmm::VmmMode,
    BRIDGE_ADDR, PEER_ADDR,
};

/// Alerts, queries and the guest are polled this often.
const POLL: Duration = Duration::from_millis(250);

fn wait_for(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    poll_until(what, timeout, POLL, check)
}

#[test]
fn a_stall_with_dhcp_retries_pages_with_vm_labels_resolves_and_every_dashboard_query_works(
) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run `cargo xtask test` as root"
    );
    let mut node = ComputeNode::create(&unique_prefix("e"))?;
    node.start_dhcp_server("2m")?;
    let vm = node.add_vm("tape0", 0, &PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm")))?;
    // The detail operators run by default: the alerts must work with it.
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tape*", "--metrics-detail", "default"],
        &node.dir.join("hvnet.log"),
    )?;
    let rules = hvnet_lab::dashboards::dir()
        .join("alerts.yml")
        .canonicalize()?;
    let stack = promstack::start(&node.ns, &node.dir, agent.addr, &rules)?;
    let mut background = Background(vec![vm.spawn_dhcp_client(&node.udhcpc_script())?]);
    eventually(&agent, &node.ns, Duration::from_secs(15), "a lease", |s| {
        metrics::value(
            s,
            "hvnet_dhcp_lease_remaining_seconds",
            &[("iface", "tape0")],
        )
        .is_some()
    })?;
    wait_for("the guest's address", Duration::from_secs(5), || {
        Ok(vm.ipv4()?.is_some())
    })?;
    vm.ping(BRIDGE_ADDR, 1)?;
    background.0.push(vm.keep_pinging(PEER_ADDR)?);
    // The incident happened under load: a steady stream toward the VM fills
    // its queue once the VMM stops draining it (full_ring drops).
    let guest_ip = vm.ipv4()?.unwrap_or_default();
    background.0.push(hvnet_lab::testkit::udp_load(
        &node.ns,
        env!("CARGO_BIN_EXE_hvnet-lab"),
        &guest_ip,
        300,
        300,
    )?);
    wait_for("Prometheus scraping hvnet", Duration::from_secs(15), || {
        Ok(promstack::query(&node.ns, r#"up{job="hvnet"} == 1"#)?.len() == 1)
    })?;

    vm.set_mode(VmmMode::RxStall)?;
    let stalled_at = Instant::now();
    eventually(
        &agent,
        &node.ns,
        Duration::from_secs(8),
        "rx_stalled",
        |s| metrics::value(s, "hvnet_vm_rx_stalled", &[("iface", "tape0")]) == Some(1.0),
    )?;
    // SAFETY: kill(2) on our own child: udhcpc renews on SIGUSR1.
    unsafe { libc::kill(background.0[0].id() as i32, libc::SIGUSR1) };

    let firing = |name: &str| {
        received(&stack).into_iter().any(|(alert, status, labels)| {
            alert == name
                && status == "firing"
                && labels["iface"] == "tape0"
                && labels["vm_name"] == "tape0"
        })
    };
    let took = wait_for(
        "the DHCP-during-stall page",
        Duration::from_secs(60),
        || Ok(firing("HvnetDhcpRetriesDuringStall")),
    )?;
    eprintln!(
        "HvnetDhcpRetriesDuringStall received {:?} after the stall began",
        stalled_at.elapsed()
    );
    let _ = took;
    wait_for("the RX-stall page", Duration::from_secs(60), || {
        Ok(firing("HvnetVMRxStalled"))
    })?;
    eprintln!(
        "HvnetVMRxStalled received {:?} after the stall began",
        stalled_at.elapsed()
    );

    // Every dashboard query, as Grafana would send it for this VM, while the
    // stall is on (so the stall panels have data too).
    let scrape = agent.scrape(&node.ns)?;
    let mut problems = Vec::new();
    let queries = panel_queries()?;
    for q in &queries {
        let promql = substitute(&q.expr, ".*", "tape0");
        match promstack::query(&node.ns, &promql) {
            Ok(result) if result.is_empty() => problems.push(format!(
                "{} / {}: empty result for {promql}",
                q.dashboard, q.panel
            )),
            Ok(_) => {}
            Err(err) => problems.push(format!("{} / {}: {err:#}", q.dashboard, q.panel)),
        }
        for name in metric_names(&q.expr)
            .iter()
            .filter(|n| n.starts_with("hvnet_"))
        {
            if !scrape.iter().any(|s| &s.name == name) {
                problems.push(format!(
                    "{} / {}: {name} is not in a live scrape",
                    q.dashboard, q.panel
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard queries:\n{}",
        problems.join("\n")
    );
    eprintln!(
        "{} dashboard queries ran against Prometheus: no error, none empty",
        queries.len()
    );

    vm.set_mode(VmmMode::Running)?;
    let resolved = |name: &str| {
        received(&stack).into_iter().any(|(alert, status, labels)| {
            alert == name && status == "resolved" && labels["iface"] == "tape0"
        })
    };
    wait_for(
        "the RX-stall page to resolve",
        Duration::from_secs(60),
        || Ok(resolved("HvnetVMRxStalled")),
    )?;
    wait_for("the DHCP page to resolve", Duration::from_secs(60), || {
        Ok(resolved("HvnetDhcpRetriesDuringStall"))
    })?;
    let payloads = stack
        .notifications
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    for p in &payloads {
        for a in p["alerts"].as_array().into_iter().flatten() {
            eprintln!(
                "webhook: {} {} labels={} summary={:?}",
                a["status"].as_str().unwrap_or(""),
                a["labels"]["alertname"].as_str().unwrap_or(""),
                a["labels"],
                a["annotations"]["summary"].as_str().unwrap_or("")
            );
        }
    }
    // Nothing about this healthy-otherwise VM may page but the two above.
    let pages: Vec<String> = received(&stack)
        .into_iter()
        .filter(|(_, _, labels)| labels["severity"] == "critical")
        .map(|(alert, _, _)| alert)
        .filter(|a| {
            a != "HvnetVMRxStalled"
                && a != "HvnetDhcpRetriesDuringStall"
                && a != "HvnetLeaseExpiringWhileStalled"
        })
        .collect();
    assert!(pages.is_empty(), "unexpected pages: {pages:?}");
    Ok(())
}
