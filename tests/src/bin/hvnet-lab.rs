//! The lab's entry points: `demo` (the README's main job), plus small tools
//! that run as guest programs inside a guest netns.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use hvnet_lab::{
    agent::Agent,
    http,
    netns::{enter_netns, NetNs},
    node::{ComputeNode, FakeVm},
    raw_frames::{interface_mac, parse_mac, FrameSender},
    vmm::{self, VmmMode},
    BRIDGE_ADDR, PEER_ADDR,
};

#[derive(Parser)]
#[command(name = "hvnet-lab", about = "hvnet's embedded lab")]
struct Cli {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a compute node with fake VMs and dnsmasq, run hvnet on it.
    Demo {
        #[arg(long, default_value_t = 2)]
        vms: u8,
        /// Path of the hvnet binary.
        #[arg(long)]
        hvnet: Option<PathBuf>,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// Port on this host's loopback that forwards to the agent.
        #[arg(long, default_value_t = 9478)]
        port: u16,
        /// Do not play the incident (RX stall + DHCP renewal) on the first VM.
        #[arg(long)]
        no_incident: bool,
    },
    /// Send UDP broadcasts to 10.250.0.255 (run inside a guest netns).
    UdpBroadcast {
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Send UDP datagrams at a steady rate (run inside a lab netns; the
    /// target must be a lab address).
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 500)]
        pps: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Flood ARP requests out of an interface (a broken or hostile guest),
    /// run inside a lab guest's namespace. Targets 10.250.0.250, which no
    /// lab host has, so nothing answers.
    ArpFlood {
        #[arg(long, default_value = "eth0")]
        iface: String,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Send one hand-built DHCP message out of an interface (lab netns
    /// only): a client's broadcast request, or with --reply a server's
    /// answer to the client, optionally VLAN-tagged.
    DhcpFrame {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        reply: bool,
        /// DHCP message type (1 DISCOVER, 2 OFFER, 3 REQUEST, 5 ACK, ...).
        #[arg(long = "type")]
        message_type: u8,
        #[arg(long, value_parser = parse_xid)]
        xid: u32,
        #[arg(long)]
        client_mac: String,
        #[arg(long)]
        vlan: Option<u16>,
    },
    /// hvnet's cost on real traffic (kernel run-time stats against empty
    /// programs on the same hooks) and throughput with and without it.
    BenchCost {
        /// Seconds of traffic per phase and per throughput sample.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Throughput rounds (each: with hvnet, then without).
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
    /// hvnet on a dense node: attach time, RSS, idle CPU, /metrics latency
    /// and SIGTERM time with N idle taps (one run per --taps).
    BenchScale {
        #[arg(long = "taps", default_values_t = [500usize, 2000])]
        taps: Vec<usize>,
        /// attach_mode(s) to measure each size with.
        #[arg(
            long = "mode",
            default_values_t = ["auto".to_owned(), "netlink".to_owned(), "tcx".to_owned()]
        )]
        modes: Vec<String>,
    },
    /// Set a fake VMM's fault mode: running, rx_stall or paused.
    VmmMode { control: PathBuf, mode: String },
    /// What hvnet attaches on this kernel (one fake VM, attach_mode auto),
    /// as `HVNET-NODE report` lines: the kernel matrix's first step.
    KernelReport,
    /// The kernel matrix: the core lab checks on this kernel and on each
    /// given Debian kernel booted as a compute node under QEMU.
    KernelMatrix {
        /// LABEL=DIR of a kernel unpacked by `cargo xtask setup`.
        #[arg(long = "kernel", value_parser = parse_pair)]
        kernels: Vec<(String, PathBuf)>,
        /// NAME=PATH of a built lab test binary (tc_lab, stall_lab, dhcp_lab).
        #[arg(long = "test-bin", value_parser = parse_pair)]
        test_bins: Vec<(String, PathBuf)>,
        /// Where initramfs images, console logs and the table go.
        #[arg(long)]
        work_dir: PathBuf,
        /// Skip the host kernel's row.
        #[arg(long)]
        no_host: bool,
    },
    /// Boot a kernel as a compute node and run shell commands in it (each
    /// STEP is a shell command line; its output is shown when it fails).
    NodeVm {
        /// A kernel unpacked by `cargo xtask setup` (target/hvnet-kernels/6.1).
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        work_dir: PathBuf,
        /// Extra binaries to carry (at their host paths, with their libraries).
        #[arg(long = "bin")]
        bins: Vec<PathBuf>,
        #[arg(required = true)]
        steps: Vec<String>,
    },
}

fn parse_pair(text: &str) -> Result<(String, PathBuf), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
        .ok_or_else(|| format!("expected NAME=PATH, got {text:?}"))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// An xid as 0x-prefixed hex or decimal.
fn parse_xid(text: &str) -> Result<u32, String> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("invalid xid {text:?}: {e}"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        LabCommand::Demo {
            vms,
            hvnet,
            duration,
            port,
            no_incident,
        } => demo(vms, hvnet, duration, port, !no_incident),
        LabCommand::UdpBroadcast { count } => udp_broadcast(count),
        LabCommand::UdpSend { to, pps, seconds } => udp_send(to, pps, seconds),
        LabCommand::ArpFlood { iface, seconds } => arp_flood(&iface, seconds),
        LabCommand::DhcpFrame {
            iface,
            reply,
            message_type,
            xid,
            client_mac,
            vlan,
        } => dhcp_frame(&iface, reply, message_type, xid, &client_mac, vlan),
        LabCommand::BenchCost { seconds, rounds } => {
            let (rows, throughput) =
                hvnet_lab::cost::run(&hvnet_lab::unique_prefix("c"), seconds, rounds)?;
            print!("{}", hvnet_lab::cost::render(&rows, &throughput));
            Ok(())
        }
        LabCommand::BenchScale { taps, modes } => {
            let mut results = Vec::new();
            for n in taps {
                for mode in &modes {
                    eprintln!("bench-scale: {n} taps, attach_mode {mode}");
                    let prefix = hvnet_lab::unique_prefix("s");
                    results.push(hvnet_lab::scale::run(&prefix, n, mode)?);
                }
            }
            print!("{}", hvnet_lab::scale::render(&results));
            Ok(())
        }
        LabCommand::VmmMode { control, mode } => {
            let mode = VmmMode::parse(&mode).context("mode is running, rx_stall or paused")?;
            vmm::set_mode(&control, mode)
        }
        LabCommand::KernelReport => hvnet_lab::nodevm::matrix::kernel_report(),
        LabCommand::KernelMatrix {
            kernels,
            test_bins,
            work_dir,
            no_host,
        } => kernel_matrix(kernels, test_bins, work_dir, !no_host),
        LabCommand::NodeVm {
            kernel,
            work_dir,
            bins,
            steps,
        } => {
            let bins: Vec<&Path> = bins.iter().map(PathBuf::as_path).collect();
            let steps: Vec<(String, Vec<String>)> = steps
                .into_iter()
                .enumerate()
                .map(|(n, cmd)| (format!("step{n}"), vec![cmd]))
                .collect();
            let lab = std::env::current_exe()?;
            let run = hvnet_lab::nodevm::matrix::boot_node(
                &kernel, "adhoc", &lab, &bins, &steps, &work_dir,
            )?;
            for step in &run.steps {
                println!(
                    "{}: exit {:?} in {} s",
                    step.label, step.status, step.seconds
                );
                for line in &step.log {
                    println!("    {line}");
                }
            }
            Ok(())
        }
    }
}

fn kernel_matrix(
    kernels: Vec<(String, PathBuf)>,
    test_bins: Vec<(String, PathBuf)>,
    work_dir: PathBuf,
    host: bool,
) -> anyhow::Result<()> {
    use hvnet_lab::nodevm::matrix;
    let inputs = matrix::MatrixInputs {
        kernels,
        test_bins: test_bins.into_iter().collect(),
        lab_bin: std::env::current_exe()?,
        work_dir: work_dir.clone(),
        host,
    };
    let rows = matrix::run(&inputs)?;
    let table = matrix::render(&rows);
    println!("\n{table}");
    let out = work_dir.join("kernel-matrix.md");
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    if !matrix::all_passed(&rows) {
        bail!(
            "the kernel matrix has failures (table above, also in {})",
            out.display()
        );
    }
    Ok(())
}

fn udp_broadcast(count: u32) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_broadcast(true)?;
    for i in 0..count {
        socket.send_to(
            format!("hvnet-lab broadcast {i}").as_bytes(),
            "10.250.0.255:9",
        )?;
    }
    Ok(())
}

/// Sends broadcast ARP requests as fast as the interface takes them; prints
/// how many it sent.
fn arp_flood(iface: &str, seconds: u64) -> anyhow::Result<()> {
    let sender = FrameSender::open(iface)?;
    let mac = interface_mac(iface)?;
    let mut frame = vec![0xffu8; 6];
    frame.extend(mac);
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend(mac);
    frame.extend([10, 250, 0, 249]);
    frame.extend([0u8; 6]);
    frame.extend([10, 250, 0, 250]);
    frame.resize(60, 0);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            if sender.send(&frame) {
                sent += 1;
            }
        }
    }
    println!("{sent}");
    Ok(())
}

/// Sends one hand-built DHCP message out of `iface`: a client's request
/// (broadcast, from `client_mac`) or a server's reply (to `client_mac`,
/// from the interface's own MAC), optionally 802.1Q-tagged.
fn dhcp_frame(
    iface: &str,
    reply: bool,
    message_type: u8,
    xid: u32,
    client_mac: &str,
    vlan: Option<u16>,
) -> anyhow::Result<()> {
    let client = parse_mac(client_mac)?;
    let own = interface_mac(iface)?;
    let op = if reply { 2 } else { 1 };
    let message = hvnet::frames::dhcp_message(op, xid, client, message_type);
    let frame = if reply {
        hvnet::frames::udp_frame(
            client,
            own,
            [10, 250, 0, 3],
            [10, 250, 0, 150],
            67,
            68,
            &message,
        )
    } else {
        hvnet::frames::udp_frame([0xff; 6], client, [0; 4], [255; 4], 68, 67, &message)
    };
    let frame = match vlan {
        Some(id) => hvnet::frames::with_vlan_tag(&frame, id),
        None => frame,
    };
    if !FrameSender::open(iface)?.send(&frame) {
        bail!("sending on {iface}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn udp_send(to: SocketAddr, pps: u32, seconds: u64) -> anyhow::Result<()> {
    let allowed = match to.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[0] == 10 && v4.octets()[1] == 250,
        std::net::IpAddr::V6(_) => false,
    };
    if !allowed {
        bail!("{to} is outside the lab's 10.250.0.0/16: refusing to send there");
    }
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let payload = [0x5au8; 64];
    let end = Instant::now() + Duration::from_secs(seconds);
    // Send in 10 ms batches: steady enough, and cheap on a 2-core machine.
    let per_batch = (pps / 100).max(1);
    while Instant::now() < end {
        let batch_start = Instant::now();
        for _ in 0..per_batch {
            // ENOBUFS/EAGAIN under a full queue is expected: keep the rate.
            let _ = socket.send_to(&payload, to);
        }
        if let Some(rest) = Duration::from_millis(10).checked_sub(batch_start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

fn demo(
    vms: u8,
    hvnet: Option<PathBuf>,
    duration: Option<u64>,
    port: u16,
    incident: bool,
) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab creates network namespaces and taps: run it as root");
    }
    if let Some(path) = hvnet {
        std::env::set_var("HVNET_BIN", path);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
    }
    let exe = std::env::current_exe()?;
    let fake_vmm = exe.with_file_name("fake-vmm");
    let prefix = format!("hvdemo{}", std::process::id() % 10_000);

    println!(
        "hvnet lab: building compute node {prefix}-node (bridge br0 {BRIDGE_ADDR}/24, dnsmasq)"
    );
    let mut node = ComputeNode::create(&prefix)?;
    node.start_dhcp_server("2m")?;
    let agent_log = node.dir.join("hvnet.log");
    let agent = Agent::start(&node.ns, 9478, &["--interfaces", "tap*"], &agent_log)?;

    let mut guests: Vec<FakeVm> = Vec::new();
    let mut clients = Vec::new();
    for i in 0..vms {
        let vm = node.add_vm(&format!("tap{i}"), i, &fake_vmm)?;
        clients.push(vm.spawn_dhcp_client(&node.udhcpc_script())?);
        println!(
            "  VM {i}: tap{i} <-> {}:eth0 ({}), control {}",
            vm.guest.name(),
            vm.guest_mac,
            vm.control.display()
        );
        guests.push(vm);
    }
    wait_for_leases(&guests, Duration::from_secs(15));
    for vm in &guests {
        // Steady guest traffic to a peer on the bridge (not the DHCP
        // server): ICMP both ways, ARP refreshes. The loop restarts ping
        // when the guest loses its address and gets it back.
        let _ = vm
            .guest
            .command("sh")
            .args([
                "-c",
                &format!("while :; do busybox ping -q -i 0.5 {PEER_ADDR}; sleep 1; done"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    let forward_port = forward_to_agent(&node.ns, port, agent.addr)?;
    println!();
    println!(
        "hvnet is running in {} (log: {})",
        node.ns.name(),
        agent_log.display()
    );
    println!(
        "  scrape:  curl -s http://127.0.0.1:{forward_port}/metrics | grep hvnet_vm_packets_total"
    );
    println!("  VMs:     curl -s http://127.0.0.1:{forward_port}/api/v1/vms");
    println!(
        "  fault:   {} vmm-mode {} rx_stall   (or paused, running)",
        exe.display(),
        guests
            .first()
            .map_or(String::new(), |v| v.control.display().to_string())
    );
    println!("Ctrl-C stops the demo and removes everything it created.\n");

    if incident {
        println!(
            "The incident plays on tap0: at 15 s its VMM stops draining the RX queue, at 20 s"
        );
        println!(
            "the guest renews its lease, at 40 s the VMM recovers. Watch STATE and LAST DHCP.\n"
        );
    }
    let started = Instant::now();
    let mut previous: Option<(Instant, Vec<hvnet::api::Vm>)> = None;
    let mut tick = 0u32;
    let mut script: Vec<(u64, IncidentStep)> = if incident && !guests.is_empty() {
        vec![
            (15, IncidentStep::Stall),
            (20, IncidentStep::Renew),
            (34, IncidentStep::Explain),
            (40, IncidentStep::Recover),
            (43, IncidentStep::Renew),
            (48, IncidentStep::Explain),
        ]
    } else {
        Vec::new()
    };
    while !STOP.load(Ordering::SeqCst) {
        if duration.is_some_and(|d| started.elapsed() >= Duration::from_secs(d)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        tick += 1;
        while script
            .first()
            .is_some_and(|(at, _)| started.elapsed() >= Duration::from_secs(*at))
        {
            let (_, step) = script.remove(0);
            play(step, &guests[0], &clients[0], &node, agent.addr);
        }
        if !tick.is_multiple_of(10) {
            continue;
        }
        if tick % 50 == 10 {
            // Now and then a broadcast from each guest, to exercise every class.
            for vm in &guests {
                let _ = vm
                    .guest
                    .command(&exe.display().to_string())
                    .args(["udp-broadcast", "--count", "2"])
                    .output();
            }
        }
        match http::get(&node.ns, agent.addr, "/api/v1/vms") {
            Ok(resp) => {
                let now = Instant::now();
                let vms: Vec<hvnet::api::Vm> = match serde_json::from_str(&resp.body) {
                    Ok(vms) => vms,
                    Err(err) => {
                        println!("agent answered /api/v1/vms with something else: {err}");
                        continue;
                    }
                };
                let before = previous
                    .as_ref()
                    .map(|(at, v)| (v.as_slice(), at.elapsed().as_secs_f64()));
                println!(
                    "{}",
                    hvnet::client::render_top(&hvnet::client::top_rows(&vms, before))
                );
                previous = Some((now, vms));
            }
            Err(err) => println!("agent not answering: {err:#}"),
        }
    }
    for mut client in clients {
        let _ = client.kill();
        let _ = client.wait();
    }
    println!("\nstopping: hvnet detaches, the lab is removed");
    let mut agent = agent;
    agent.terminate(Duration::from_secs(5))?;
    drop(guests);
    drop(node);
    Ok(())
}

#[derive(Clone, Copy)]
enum IncidentStep {
    Stall,
    Renew,
    Explain,
    Recover,
}

fn play(
    step: IncidentStep,
    vm: &FakeVm,
    client: &std::process::Child,
    node: &ComputeNode,
    agent: SocketAddr,
) {
    match step {
        IncidentStep::Stall => {
            println!(">>> {}: the VMM stops draining the VM's RX queue (the virtio bug); the VM still sends\n", vm.tap);
            if let Err(err) = vm.set_mode(VmmMode::RxStall) {
                println!("fault injection failed: {err:#}");
            }
        }
        IncidentStep::Renew => {
            println!(
                ">>> {}: the guest renews its DHCP lease (udhcpc SIGUSR1)\n",
                vm.tap
            );
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(client.id() as i32, libc::SIGUSR1) };
        }
        IncidentStep::Recover => {
            println!(">>> {}: the VMM drains its RX queue again\n", vm.tap);
            if let Err(err) = vm.set_mode(VmmMode::Running) {
                println!("recovery failed: {err:#}");
            }
        }
        IncidentStep::Explain => {
            println!(">>> hvnet explain {}", vm.tap);
            match http::get(&node.ns, agent, &format!("/api/v1/vms/{}/explain", vm.tap)) {
                Ok(resp) => println!("{}", resp.body),
                Err(err) => println!("explain failed: {err:#}"),
            }
        }
    }
}

fn wait_for_leases(guests: &[FakeVm], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for vm in guests {
        while Instant::now() < deadline {
            if let Ok(Some(ip)) = vm.ipv4() {
                println!("  {} got {ip} from dnsmasq", vm.tap);
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Forwards 127.0.0.1:`port` (or the next free port) on this host to the
/// agent's address inside the node netns, so the demo can be scraped from
/// the host. Returns the port actually used.
fn forward_to_agent(ns: &NetNs, port: u16, agent: SocketAddr) -> anyhow::Result<u16> {
    let mut bound = None;
    for candidate in port..port.saturating_add(10) {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", candidate)) {
            bound = Some((listener, candidate));
            break;
        }
    }
    let (listener, used) =
        bound.with_context(|| format!("ports {port}..{} are all busy on 127.0.0.1", port + 9))?;
    let ns_path = ns.path();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let ns_path = ns_path.clone();
            std::thread::spawn(move || {
                if let Err(err) = proxy(client, &ns_path, agent) {
                    eprintln!("forwarder: {err:#}");
                }
            });
        }
    });
    Ok(used)
}

fn proxy(mut client: TcpStream, ns_path: &Path, agent: SocketAddr) -> anyhow::Result<()> {
    enter_netns(ns_path)?;
    let mut upstream = TcpStream::connect(agent)?;
    let mut client_read = client.try_clone()?;
    let mut upstream_write = upstream.try_clone()?;
    let up = std::thread::spawn(move || {
        let _ = copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    copy(&mut upstream, &mut client)?;
    let _ = client.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}
