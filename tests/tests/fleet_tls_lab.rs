//! On-call across a fleet: three compute nodes (namespaces), each with its
//! own hvnet behind TLS and basic auth (the exporter-toolkit web config),
//! scraped by one real Prometheus with the shipped rules and Alertmanager.
//! Every node runs a VM on a tap of the same name (libvirt's vnetN repeats
//! on every node). A stall on one node must page with labels that lead to
//! that node, and `hvnet explain --agent https://<that node>` with the CA
//! and credentials must print its timeline.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::{hvnet_bin, Agent},
    metrics,
    netns::NetNs,
    node::{ComputeNode, FakeVm},
    pki::{htpasswd_hash, write_web_config, Curl, Pki},
    promstack,
    testkit::{poll_until, require_root, Background},
    unique_prefix,
    vmm::VmmMode,
    PEER_ADDR,
};

const TAP: &str = "tapf0";
const POLL: Duration = Duration::from_millis(250);

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

struct Site {
    node: ComputeNode,
    vm: FakeVm,
    _agent: Agent,
    addr: SocketAddr,
    clients: Background,
}

/// The management link between the monitoring namespace and node `i`.
fn management_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 250, 200 + i as u8, 2], 9478))
}

fn connect(mon: &NetNs, node: &ComputeNode, i: usize) -> anyhow::Result<()> {
    let (m, u) = (format!("m{i}"), format!("u{i}"));
    mon.ip(&[
        "link",
        "add",
        &m,
        "type",
        "veth",
        "peer",
        "name",
        &u,
        "netns",
        node.ns.name(),
    ])?;
    mon.ip(&[
        "addr",
        "add",
        &format!("10.250.{}.1/24", 200 + i),
        "dev",
        &m,
    ])?;
    mon.ip(&["link", "set", &m, "up"])?;
    node.ns.ip(&[
        "addr",
        "add",
        &format!("10.250.{}.2/24", 200 + i),
        "dev",
        &u,
    ])?;
    node.ns.ip(&["link", "set", &u, "up"])?;
    Ok(())
}

fn scrape(curl: &Curl, ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Vec<metrics::Sample>> {
    let reply = curl.get(ns, &format!("https://{addr}/metrics"))?;
    anyhow::ensure!(reply.status == 200, "/metrics answered {}", reply.status);
    Ok(metrics::parse(&reply.body))
}

fn explain(mon: &NetNs, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(mon
        .command(&hvnet_bin().display().to_string())
        .args(args)
        .output()?)
}

#[test]
fn a_stall_on_one_of_three_tls_nodes_pages_for_that_node_and_explain_reaches_it(
) -> anyhow::Result<()> {
    require_root();
    let prefix = unique_prefix("f");
    let mon = NetNs::create(&format!("{prefix}-mon"))?;
    let dir = std::env::temp_dir().join(format!("{prefix}-fleet"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::create(&dir.join("pki"))?;
    let prometheus_hash = htpasswd_hash("prometheus", "scrape-secret")?;
    let oncall_hash = htpasswd_hash("oncall", "on call secret")?;
    let password_file = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, format!("{text}\n"))?;
        Ok(path)
    };
    let prometheus_password = password_file("prometheus.pass", "scrape-secret")?;
    let oncall_password = password_file("oncall.pass", "on call secret")?;
    let oncall = Curl {
        ca: Some(pki.ca_cert.clone()),
        user: Some(("oncall".into(), "on call secret".into())),
        client: None,
    };

    let mut sites = Vec::new();
    for i in 1..=3 {
        let mut node = ComputeNode::create(&unique_prefix(&format!("f{i}")))?;
        connect(&mon, &node, i)?;
        node.start_dhcp_server("2m")?;
        let vm = node.add_vm(TAP, 0, &fake_vmm())?;
        let addr = management_addr(i);
        let server = pki.issue(
            &format!("node{i}"),
            &[&format!("IP:{}", addr.ip()), &format!("DNS:node{i}")],
            false,
        )?;
        let web = node.dir.join("web.yml");
        write_web_config(
            &web,
            &server,
            None,
            &[("prometheus", &prometheus_hash), ("oncall", &oncall_hash)],
        )?;
        let agent = Agent::start_checked(
            &node.ns,
            addr,
            &[
                "--interfaces",
                "tapf*",
                "--web.config.file",
                &web.display().to_string(),
            ],
            &node.dir.join("hvnet.log"),
            || {
                oncall
                    .get(&node.ns, &format!("https://{addr}/healthz"))
                    .is_ok_and(|r| r.status == 200)
            },
        )?;
        let clients = Background(vec![vm.spawn_dhcp_client(&node.udhcpc_script())?]);
        sites.push(Site {
            node,
            vm,
            _agent: agent,
            addr,
            clients,
        });
    }

    // The page must lead to the right node: Prometheus sees all three
    // through TLS with its own credentials.
    let targets: Vec<String> = sites.iter().map(|s| format!("'{}'", s.addr)).collect();
    let jobs = format!(
        "  - job_name: hvnet\n    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      password_file: {}\n    static_configs:\n      - targets: [{}]\n",
        pki.ca_cert.display(),
        prometheus_password.display(),
        targets.join(", ")
    );
    let rules = hvnet_lab::dashboards::dir()
        .join("alerts.yml")
        .canonicalize()?;
    let stack = promstack::start_with_jobs(&mon, &dir, &jobs, &rules)?;

    for site in &sites {
        poll_until(
            "a lease on every node",
            Duration::from_secs(20),
            POLL,
            || {
                Ok(scrape(&oncall, &mon, site.addr).is_ok_and(|s| {
                    metrics::value(&s, "hvnet_dhcp_lease_remaining_seconds", &[("iface", TAP)])
                        .is_some()
                }))
            },
        )?;
    }
    poll_until(
        "Prometheus scraping all three over TLS",
        Duration::from_secs(20),
        POLL,
        || Ok(promstack::query(&mon, r#"up{job="hvnet"} == 1"#)?.len() == 3),
    )?;

    // The incident on node 2, under load: its VMM stops draining RX.
    let stalled = &sites[1];
    let guest_ip = stalled.vm.ipv4()?.unwrap_or_default();
    let load = Background(vec![
        stalled.vm.keep_pinging(PEER_ADDR)?,
        hvnet_lab::testkit::udp_load(
            &stalled.node.ns,
            env!("CARGO_BIN_EXE_hvnet-lab"),
            &guest_ip,
            300,
            300,
        )?,
    ]);
    stalled.vm.set_mode(VmmMode::RxStall)?;
    let began = Instant::now();
    poll_until(
        "node 2's VM rx_stalled",
        Duration::from_secs(10),
        POLL,
        || {
            Ok(scrape(&oncall, &mon, stalled.addr).is_ok_and(|s| {
                metrics::value(&s, "hvnet_vm_rx_stalled", &[("iface", TAP)]) == Some(1.0)
            }))
        },
    )?;
    // SAFETY: kill(2) on our own child: udhcpc renews on SIGUSR1.
    unsafe { libc::kill(stalled.clients.0[0].id() as i32, libc::SIGUSR1) };

    let page = |stack: &promstack::Stack| -> Option<serde_json::Value> {
        let all = stack
            .notifications
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        all.iter()
            .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
            .find(|a| {
                a["status"] == "firing"
                    && a["labels"]["alertname"] == "HvnetDhcpRetriesDuringStall"
                    && a["labels"]["severity"] == "critical"
            })
    };
    poll_until("the page", Duration::from_secs(60), POLL, || {
        Ok(page(&stack).is_some())
    })?;
    let alert = page(&stack).ok_or_else(|| anyhow::anyhow!("page vanished"))?;
    eprintln!("page {:?} after the stall began: {alert}", began.elapsed());
    let instance = alert["labels"]["instance"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        instance,
        stalled.addr.to_string(),
        "the page names the stalled node"
    );
    assert_eq!(alert["labels"]["iface"], TAP);
    let dashboard = alert["annotations"]["dashboard_url"]
        .as_str()
        .unwrap_or_default();
    assert!(
        dashboard.ends_with(&format!(
            "/d/hvnet-vm/hvnet-vm?var-node={instance}&var-vm={TAP}"
        )),
        "{dashboard}"
    );
    assert!(
        alert["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("README.md#hvnetdhcpretriesduringstall")),
        "{alert}"
    );
    let runbook = alert["annotations"]["runbook"].as_str().unwrap_or_default();
    assert!(
        runbook.contains(&format!("--agent https://{instance}")),
        "{runbook}"
    );

    // From the page to the answer: the CLI, from the monitoring side.
    let ca = pki.ca_cert.display().to_string();
    let agent_url = format!("https://{instance}");
    let oncall_pw = oncall_password.display().to_string();
    let out = explain(
        &mon,
        &[
            "explain",
            TAP,
            "--agent",
            &agent_url,
            "--ca-file",
            &ca,
            "--user",
            "oncall",
            "--password-file",
            &oncall_pw,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- hvnet explain {TAP} --agent {agent_url} ---\n{text}---");
    assert!(text.contains("rx_stalled since"), "{text}");
    assert!(text.contains("while RX is stalled"), "{text}");
    let out = explain(
        &mon,
        &[
            "explain",
            TAP,
            "--json",
            "--agent",
            &agent_url,
            "--ca-file",
            &ca,
            "--user",
            "oncall",
            "--password-file",
            &oncall_pw,
        ],
    )?;
    let json: hvnet::client::ExplainJson = serde_json::from_slice(&out.stdout)?;
    assert!(!json.timeline.is_empty(), "{json:?}");

    // The same tap name on a healthy node tells a different story.
    let healthy = sites[0].addr.to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            mon.name(),
            &hvnet_bin().display().to_string(),
        ])
        .args([
            "explain",
            TAP,
            "--agent",
            &format!("https://{healthy}"),
            "--ca-file",
            &ca,
            "--user",
            "oncall",
        ])
        .env("HVNET_PASSWORD", "on call secret")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let headline = text.lines().next().unwrap_or_default();
    assert!(
        out.status.success()
            && (headline.starts_with("VM tapf0 (tapf0): ok")
                || headline.starts_with("VM tapf0 (tapf0): idle"))
            && !text.contains("while RX is stalled"),
        "{text}"
    );

    // No credentials, or no CA: a clear error and exit code 1.
    let out = explain(
        &mon,
        &["explain", TAP, "--agent", &agent_url, "--ca-file", &ca],
    )?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires authentication"));
    let out = explain(&mon, &["explain", TAP, "--agent", &agent_url])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));

    // Nothing paged for the two healthy nodes.
    let all = stack
        .notifications
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let stray: Vec<String> = all
        .iter()
        .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
        .filter(|a| {
            a["labels"]["severity"] == "critical" && a["labels"]["instance"] != instance.as_str()
        })
        .map(|a| a["labels"].to_string())
        .collect();
    assert!(stray.is_empty(), "pages for healthy nodes: {stray:?}");

    sites[1].vm.set_mode(VmmMode::Running)?;
    drop(load);
    drop(stack);
    drop(sites);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
