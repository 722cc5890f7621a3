//! `hvnet-lab bench-cost`: what hvnet costs on real traffic, measured the
//! way the kernel measures it (BPF_ENABLE_STATS: run time and run count per
//! program), against empty programs on the same hooks in the same run;
//! and throughput with and without hvnet, interleaved. Every figure is a
//! ratio or an absolute taken in this one run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::programs::{
    links::LinkOrder,
    tc::{SchedClassifierLinkId, TcAttachOptions},
    tp_btf::BtfTracePointLinkId,
    BtfTracePoint, SchedClassifier, TcAttachType,
};

use crate::{agent::Agent, netns::NetNs};

const NODE_ADDR: &str = "10.250.8.1";
const PEER_ADDR: &str = "10.250.8.2";
const TAP: &str = "tapb0";
/// An uplink beside the tap (a second veth pair to the peer): hvnet's hop
/// programs run on it, which see all of a node's traffic.
const UPLINK: &str = "uplb0";
const NODE_UPLINK_ADDR: &str = "10.250.9.1";
const PEER_UPLINK_ADDR: &str = "10.250.9.2";

/// One program's kernel-measured cost over one phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub runs: u64,
    pub ns: u64,
}

impl Cost {
    pub fn per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.ns as f64 / self.runs as f64)
    }
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, other: Cost) {
        self.runs += other.runs;
        self.ns += other.ns;
    }
}

/// run_time_ns and run_cnt of every loaded program named in `names`, by
/// (name, program id): a restarted hvnet's programs are new ones, and a
/// program freed between two snapshots must not blur the difference.
fn program_stats(names: &[&str]) -> anyhow::Result<BTreeMap<(String, u32), Cost>> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if let Some(wanted) = names.iter().find(|n| kernel_name(n) == name) {
            out.insert(
                ((*wanted).to_owned(), info.id()),
                Cost {
                    runs: info.run_count(),
                    ns: info.run_time().as_nanos() as u64,
                },
            );
        }
    }
    Ok(out)
}

/// What each program named in `names` cost between two snapshots, over
/// the programs loaded in both; a name with no such program is an error
/// (never 0 runs).
fn spent_between(
    names: &[&str],
    before: &BTreeMap<(String, u32), Cost>,
    after: &BTreeMap<(String, u32), Cost>,
) -> anyhow::Result<BTreeMap<String, Cost>> {
    let mut spent: BTreeMap<String, Cost> = BTreeMap::new();
    for (key, a) in after {
        if let Some(b) = before.get(key) {
            *spent.entry(key.0.clone()).or_default() += Cost {
                runs: a.runs.saturating_sub(b.runs),
                ns: a.ns.saturating_sub(b.ns),
            };
        }
    }
    if let Some(missing) = names.iter().find(|n| !spent.contains_key(**n)) {
        bail!("program {missing} is not loaded: nothing to measure");
    }
    Ok(spent)
}

/// A program's name as the kernel keeps it (15 characters at most).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

pub struct Row {
    pub phase: &'static str,
    pub hook: &'static str,
    pub hvnet: Cost,
    pub empty: Cost,
}

pub struct Throughput {
    pub what: &'static str,
    pub unit: &'static str,
    pub with: Vec<f64>,
    pub without: Vec<f64>,
}

impl Throughput {
    /// with / without of each round: the two sides of a round ran
    /// back to back, so slow drift of the machine cancels out of each.
    pub fn paired_ratios(&self) -> Vec<f64> {
        self.with
            .iter()
            .zip(&self.without)
            .filter(|(_, without)| **without > 0.0)
            .map(|(with, without)| with / without)
            .collect()
    }
}

/// None when nothing was measured (never shown as 0).
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

fn spawn_quiet(ns: &NetNs, args: &[String]) -> anyhow::Result<Child> {
    let (program, rest) = args.split_first().context("empty command")?;
    Ok(ns
        .command(program)
        .args(rest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// iperf3's client and servers on CPUs of their own (where there are two):
/// left to the scheduler, the two sides of an A/B comparison landed on
/// different CPU layouts from round to round, and that spread (+-9 %
/// measured) was larger than the effect being measured.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

fn pinned(cpu: usize) -> Vec<String> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus > cpu.max(1) {
        vec!["-A".into(), cpu.to_string()]
    } else {
        Vec::new()
    }
}

/// Runs an iperf3 client and returns (bits/s received, packets/s sent).
fn iperf(ns: &NetNs, args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let out = ns
        .command("iperf3")
        .args(["-J"])
        .args(pinned(CLIENT_CPU))
        .args(args)
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 {args:?}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3 {args:?}: {err}");
    }
    // A field iperf3 did not report is an error, never a zero.
    let end = &json["end"];
    let missing = |what: &str| anyhow::anyhow!("iperf3 {args:?} reported no {what}");
    let bits = end["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| end["sum"]["bits_per_second"].as_f64())
        .ok_or_else(|| missing("bits_per_second"))?;
    // Packets: UDP only (TCP reports none).
    let packets = match end["sum"]["packets"].as_f64() {
        Some(packets) => {
            let seconds = end["sum"]["seconds"]
                .as_f64()
                .ok_or_else(|| missing("seconds"))?;
            packets / seconds.max(0.001)
        }
        None => 0.0,
    };
    Ok((bits, packets))
}

fn server_args(address: &str, port: &str) -> Vec<String> {
    let mut args: Vec<String> = ["iperf3", "-s", "-B", address, "-p", port]
        .map(String::from)
        .into();
    args.extend(pinned(SERVER_CPU));
    args
}

pub struct Lab {
    node: NetNs,
    peer: NetNs,
    dir: std::path::PathBuf,
    servers: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What iperf3 sends in a phase through the tap or the uplink.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Udp64,
    Tcp,
}

impl Lab {
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let node = NetNs::create(&format!("{prefix}-node"))?;
        let peer = NetNs::create(&format!("{prefix}-peer"))?;
        node.veth_to(
            TAP,
            None,
            &format!("{NODE_ADDR}/24"),
            &peer,
            &format!("{PEER_ADDR}/24"),
        )?;
        node.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            peer.name(),
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{NODE_UPLINK_ADDR}/24"),
            "dev",
            UPLINK,
        ])?;
        node.ip(&["link", "set", UPLINK, "up"])?;
        peer.ip(&[
            "addr",
            "add",
            &format!("{PEER_UPLINK_ADDR}/24"),
            "dev",
            "eth1",
        ])?;
        peer.ip(&["link", "set", "eth1", "up"])?;
        let dir = std::env::temp_dir().join(format!("{prefix}-cost"));
        std::fs::create_dir_all(&dir)?;
        let servers = vec![
            spawn_quiet(&node, &server_args(NODE_ADDR, "5201"))?,
            spawn_quiet(&node, &server_args("127.0.0.1", "5202"))?,
            spawn_quiet(&node, &server_args(NODE_UPLINK_ADDR, "5203"))?,
        ];
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            node,
            peer,
            dir,
            servers,
        })
    }

    /// hvnet running with its programs on the tap and the uplink:
    /// measurements start once it has attached, not while it is still
    /// starting up.
    fn agent(&self) -> anyhow::Result<Agent> {
        let agent = Agent::start(
            &self.node,
            9478,
            &["--interfaces", "tapb*", "--uplinks", "uplb*"],
            &self.dir.join("hvnet.log"),
        )?;
        crate::testkit::poll_until(
            "hvnet attached to the tap and the uplink",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let samples = agent.scrape(&self.node)?;
                let uplinks = [("role", "uplink")];
                Ok(
                    crate::metrics::value(&samples, "hvnet_agent_interfaces", &[]) == Some(1.0)
                        && crate::metrics::value(&samples, "hvnet_agent_hops", &uplinks)
                            == Some(1.0),
                )
            },
        )?;
        Ok(agent)
    }

    /// iperf3 from the peer to the node's `address:port`, `seconds` long:
    /// (bits/s received, packets/s sent).
    fn iperf_from_peer(
        &self,
        address: &str,
        port: &str,
        traffic: Traffic,
        seconds: &str,
    ) -> anyhow::Result<(f64, f64)> {
        let mut args = vec!["-c", address, "-p", port];
        if traffic == Traffic::Udp64 {
            // 64-byte datagrams as fast as iperf3 can send them.
            args.extend(["-u", "-l", "64", "-b", "0"]);
        }
        args.extend(["-t", seconds]);
        iperf(&self.peer, &args)
    }

    /// The traffic of each phase, `seconds` long.
    fn run_phase(&self, phase: &str, seconds: u32) -> anyhow::Result<()> {
        let t = seconds.to_string();
        match phase {
            "udp64_via_tap" => {
                self.iperf_from_peer(NODE_ADDR, "5201", Traffic::Udp64, &t)?;
            }
            "tcp_via_tap" => {
                self.iperf_from_peer(NODE_ADDR, "5201", Traffic::Tcp, &t)?;
            }
            "udp64_via_uplink" => {
                self.iperf_from_peer(NODE_UPLINK_ADDR, "5203", Traffic::Udp64, &t)?;
            }
            "tcp_via_uplink" => {
                self.iperf_from_peer(NODE_UPLINK_ADDR, "5203", Traffic::Tcp, &t)?;
            }
            "loopback_tcp" => {
                iperf(
                    &self.node,
                    &["-c", "127.0.0.1", "-p", "5202", "-l", "1K", "-t", &t],
                )?;
            }
            "loopback_drops" => {
                // UDP to a closed port on the node itself: freed on lo
                // (no socket), never near a monitored tap.
                let seconds = u64::from(seconds);
                self.node.enter(move || {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    let target = format!("{NODE_ADDR}:9");
                    let end = std::time::Instant::now() + Duration::from_secs(seconds);
                    while std::time::Instant::now() < end {
                        for _ in 0..64 {
                            // ECONNREFUSED from the ICMP answers is expected.
                            let _ = socket.send_to(&[0u8; 32], &target);
                        }
                    }
                    Ok(())
                })?;
            }
            other => bail!("unknown phase {other}"),
        }
        Ok(())
    }
}

fn empty_tc(baselines: &mut aya::Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    Ok(baselines
        .program_mut(hvnet::kernel::loader::EMPTY_PROGRAM)
        .context("no empty tc program")?
        .try_into()?)
}

/// The empty tc program on the tap and the uplink, both directions, at
/// the head or the tail of each TCX chain.
fn attach_empty_tc(
    baselines: &mut aya::Ebpf,
    first: bool,
) -> anyhow::Result<Vec<SchedClassifierLinkId>> {
    let program = empty_tc(baselines)?;
    let mut links = Vec::new();
    for device in [TAP, UPLINK] {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            links.push(program.attach_with_options(
                device,
                direction,
                TcAttachOptions::TcxOrder(if first {
                    LinkOrder::first()
                } else {
                    LinkOrder::last()
                }),
            )?);
        }
    }
    Ok(links)
}

fn detach_empty_tc(
    baselines: &mut aya::Ebpf,
    links: Vec<SchedClassifierLinkId>,
) -> anyhow::Result<()> {
    let program = empty_tc(baselines)?;
    for link in links {
        program.detach(link)?;
    }
    Ok(())
}

/// Where the empty baseline of one half-phase is attached.
enum EmptyLinks {
    Tc(Vec<SchedClassifierLinkId>),
    Tracepoint(&'static str, BtfTracePointLinkId),
}

fn empty_tp<'a>(baselines: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut BtfTracePoint> {
    Ok(baselines
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

/// An empty BTF tracepoint program, after every program already there.
fn attach_empty_tp(baselines: &mut aya::Ebpf, name: &str) -> anyhow::Result<BtfTracePointLinkId> {
    Ok(empty_tp(baselines, name)?.attach()?)
}

fn detach_empty_tp(
    baselines: &mut aya::Ebpf,
    name: &str,
    link: BtfTracePointLinkId,
) -> anyhow::Result<()> {
    Ok(empty_tp(baselines, name)?.detach(link)?)
}

/// Per-program cost on real traffic against empty programs on the same
/// hooks, then throughput with and without hvnet.
pub fn run(
    prefix: &str,
    seconds: u32,
    rounds: usize,
) -> anyhow::Result<(Vec<Row>, Vec<Throughput>)> {
    let lab = Lab::create(prefix)?;
    let mut agent = Some(lab.agent()?);
    let names = [
        "hvnet_egress",
        "hvnet_ingress",
        "hvnet_hop_egress",
        "hvnet_hop_ingress",
        "hvnet_empty",
        "hvnet_dequeue",
        "hvnet_empty_dequeue",
        "hvnet_drop",
        "hvnet_empty_drop",
    ];
    // The empty programs beside hvnet's: tc on the same tap and uplink
    // (TCX, both directions; each phase's traffic crosses one of them),
    // tp_btf programs on the same tracepoints.
    let mut baselines = lab
        .node
        .enter(|| Ok(hvnet::kernel::loader::load_empty_baselines()?))?;
    // Run-time stats cost every BPF program on the host two clock reads a
    // run: on for the cost phases only, never during the throughput A/B.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let mut rows = Vec::new();
    for (phase, hooks) in [
        (
            "udp64_via_tap",
            &[("tc", "hvnet_ingress", "hvnet_empty")][..],
        ),
        ("tcp_via_tap", &[("tc", "hvnet_ingress", "hvnet_empty")][..]),
        (
            "udp64_via_uplink",
            &[("tc_uplink", "hvnet_hop_ingress", "hvnet_empty")][..],
        ),
        (
            "tcp_via_uplink",
            &[("tc_uplink", "hvnet_hop_ingress", "hvnet_empty")][..],
        ),
        (
            "loopback_tcp",
            &[(
                "skb_copy_datagram_iovec",
                "hvnet_dequeue",
                "hvnet_empty_dequeue",
            )][..],
        ),
        (
            "loopback_drops",
            &[("kfree_skb", "hvnet_drop", "hvnet_empty_drop")][..],
        ),
    ] {
        // Whichever program runs first on a hook pays for what the first
        // run there costs (measured: 0.1-0.25x of an empty program, in a
        // TCX chain and on a tracepoint alike): the empty programs run
        // first for half of each phase and last for the other half.
        let mut spent: BTreeMap<String, Cost> = BTreeMap::new();
        let tracepoint = hooks
            .iter()
            .find_map(|(hook, _, empty)| (!hook.starts_with("tc")).then_some(*empty));
        for empty_first in [true, false] {
            let links = match tracepoint {
                // A tracepoint runs its programs in the order they were
                // attached: for the empty one to go first, hvnet restarts
                // after it.
                Some(empty) => {
                    if empty_first {
                        agent = None;
                    }
                    let link = attach_empty_tp(&mut baselines, empty)?;
                    if empty_first {
                        agent = Some(lab.agent()?);
                    }
                    EmptyLinks::Tracepoint(empty, link)
                }
                None => {
                    // Attaching names devices of the node's netns: the
                    // object goes into its thread and back.
                    let (back, links) = lab.node.enter(move || {
                        let mut baselines = baselines;
                        let links = attach_empty_tc(&mut baselines, empty_first)?;
                        Ok((baselines, links))
                    })?;
                    baselines = back;
                    EmptyLinks::Tc(links)
                }
            };
            // Both snapshots of one half are of the same hvnet process.
            let before = program_stats(&names)?;
            lab.run_phase(phase, seconds.div_ceil(2))?;
            let after = program_stats(&names)?;
            for (name, cost) in spent_between(&names, &before, &after)? {
                *spent.entry(name).or_default() += cost;
            }
            match links {
                EmptyLinks::Tc(links) => detach_empty_tc(&mut baselines, links)?,
                EmptyLinks::Tracepoint(empty, link) => {
                    detach_empty_tp(&mut baselines, empty, link)?
                }
            }
        }
        let delta = |name: &str| -> anyhow::Result<Cost> {
            spent
                .get(name)
                .copied()
                .with_context(|| format!("program {name} was not measured"))
        };
        for (hook, hvnet_prog, empty_prog) in hooks {
            let mut hvnet_cost = delta(hvnet_prog)?;
            // The empty program runs in both directions: compare with both
            // of hvnet's.
            let egress = match *hook {
                "tc" => Some("hvnet_egress"),
                "tc_uplink" => Some("hvnet_hop_egress"),
                _ => None,
            };
            if let Some(egress) = egress {
                hvnet_cost += delta(egress)?;
            }
            rows.push(Row {
                phase,
                hook,
                hvnet: hvnet_cost,
                empty: delta(empty_prog)?,
            });
        }
    }
    drop(stats);
    drop(baselines);
    drop(agent);

    // Throughput, A/B interleaved: per round and kind of traffic, with
    // hvnet and without; the ratio is the median of the rounds' own ratios.
    let mut throughput = vec![
        Throughput {
            what: "udp64_via_tap",
            unit: "packets/s",
            with: vec![],
            without: vec![],
        },
        Throughput {
            what: "tcp_via_tap",
            unit: "bits/s",
            with: vec![],
            without: vec![],
        },
        Throughput {
            what: "loopback_tcp",
            unit: "bits/s",
            with: vec![],
            without: vec![],
        },
    ];
    let t = seconds.to_string();
    let measure = |what: &str| -> anyhow::Result<f64> {
        Ok(match what {
            "udp64_via_tap" => {
                lab.iperf_from_peer(NODE_ADDR, "5201", Traffic::Udp64, &t)?
                    .1
            }
            "tcp_via_tap" => lab.iperf_from_peer(NODE_ADDR, "5201", Traffic::Tcp, &t)?.0,
            "loopback_tcp" => iperf(&lab.node, &["-c", "127.0.0.1", "-p", "5202", "-t", &t])?.0,
            other => bail!("no throughput measurement for {other}"),
        })
    };
    for round in 0..rounds {
        // ABBA: which side runs first alternates, so neither always gets
        // the fresher (or the warmer) machine.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        // The two sides of one kind of traffic run back to back (hvnet
        // started or stopped between them): the machine drifts less
        // between them than over a whole round of every kind.
        for row in &mut throughput {
            for with in order {
                let agent = if with { Some(lab.agent()?) } else { None };
                let value = measure(row.what)?;
                drop(agent);
                if with {
                    row.with.push(value)
                } else {
                    row.without.push(value)
                }
            }
        }
    }
    Ok((rows, throughput))
}

pub fn render(rows: &[Row], throughput: &[Throughput]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| traffic | hook | hvnet ns/run | empty ns/run | ratio | runs |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for row in rows {
        let (h, e) = (row.hvnet.per_run(), row.empty.per_run());
        let ratio = match (h, e) {
            (Some(h), Some(e)) if e > 0.0 => format!("{:.2}x", h / e),
            _ => "-".into(),
        };
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {ratio} | {} |",
            row.phase,
            row.hook,
            fmt(h),
            fmt(e),
            row.hvnet.runs
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| throughput | unit | median with hvnet | median without | ratio (median of rounds) | ratio range | rounds |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for t in throughput {
        let side = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.4e}"));
        let mut ratios = t.paired_ratios();
        ratios.sort_by(|a, b| a.total_cmp(b));
        let ratio = median(&ratios).map_or_else(|| "-".into(), |r| format!("{r:.3}x"));
        let range = match (ratios.first(), ratios.last()) {
            (Some(low), Some(high)) => format!("{low:.3}-{high:.3}x"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {ratio} | {range} | {} |",
            t.what,
            t.unit,
            side(median(&t.with)),
            side(median(&t.without)),
            ratios.len()
        );
    }
    out
}
