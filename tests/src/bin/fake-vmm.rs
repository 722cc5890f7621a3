//! A VMM stand-in for the lab, doing what QEMU's tap backend does: it holds
//! the VM's host tap open, reads frames the host sends to the VM and writes
//! the frames the VM sends. The VM side is a tap in the guest's netns, so
//! real network stacks and clients run as the guest.
//!
//! Faults (set over the control socket): `rx_stall` stops reading the host
//! tap (the incident's virtio RX bug), `paused` stops both directions.
//!
//! `--datapath vhost` is QEMU with `vhost=on`: the host tap is handed to
//! /dev/vhost-net and the kernel's vhost worker moves the frames between
//! the tap and this process's virtio rings. Then `rx_stall` is the fault
//! as vhost sees it: the "guest" stops taking filled RX buffers and posting
//! new ones, the ring runs out, the worker stops dequeuing, the tap backs up.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use hvnet_lab::{
    netns::enter_netns,
    tap::{open_tap, TapFraming},
    vhost::{VhostNet, QUEUE_SIZE, RX, TX},
    vmm::{DirectionStats, VmmMode, VmmStats},
};
use tracer_common::{class, classify::classify_frame};

#[derive(Parser)]
struct Args {
    /// Netns holding the host tap (the compute node).
    #[arg(long)]
    node_netns: String,
    /// The host tap to open (created beforehand, as libvirt does).
    #[arg(long)]
    tap: String,
    /// Netns of the guest.
    #[arg(long)]
    guest_netns: String,
    /// Name of the guest's interface.
    #[arg(long, default_value = "eth0")]
    guest_if: String,
    /// Control socket path.
    #[arg(long)]
    control: PathBuf,
    /// How frames reach the host tap: `plain` (read/write, QEMU's
    /// userspace tap backend) or `vhost` (/dev/vhost-net).
    #[arg(long, default_value = "plain")]
    datapath: String,
    /// QEMU-style identity after `--` (`-name guest=...`, `-uuid ...`):
    /// only there to be read from /proc/<pid>/cmdline, as QEMU's are.
    #[arg(last = true)]
    _qemu_args: Vec<String>,
}

const MODE_RUNNING: u8 = 0;
const MODE_RX_STALL: u8 = 1;
const MODE_PAUSED: u8 = 2;

#[derive(Default)]
struct Counters {
    packets: [AtomicU64; class::COUNT],
    bytes: [AtomicU64; class::COUNT],
}

impl Counters {
    fn add(&self, frame: &[u8]) {
        let cls = usize::from(classify_frame(frame));
        self.packets[cls].fetch_add(1, Ordering::Relaxed);
        self.bytes[cls].fetch_add(frame.len() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            packets: std::array::from_fn(|i| self.packets[i].load(Ordering::Relaxed)),
            bytes: std::array::from_fn(|i| self.bytes[i].load(Ordering::Relaxed)),
        }
    }
}

#[derive(Default)]
struct Shared {
    mode: AtomicU8,
    to_vm: Counters,
    from_vm: Counters,
    write_errors: AtomicU64,
}

/// Waits up to 50 ms for `fd` to be readable.
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}

/// Relays frames from `src` to `dst` while `allowed(mode)`; counts each
/// frame at the point QEMU would (read from the host tap for to_vm,
/// written into the host tap for from_vm).
fn relay(mut src: File, mut dst: File, shared: Arc<Shared>, toward_vm: bool) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let mode = shared.mode.load(Ordering::Relaxed);
        let blocked = mode == MODE_PAUSED || (toward_vm && mode == MODE_RX_STALL);
        if blocked {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if !readable(src.as_raw_fd()) {
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(e).context("reading a tap"),
        };
        let frame = &buf[..n];
        if toward_vm {
            shared.to_vm.add(frame);
        }
        // A tap write is one whole frame or an error, never partial.
        match dst.write(frame) {
            Ok(written) if written == frame.len() => {
                if !toward_vm {
                    shared.from_vm.add(frame);
                }
            }
            Ok(_) => {
                shared.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            // The receiving interface is down: the frame is lost, as on a NIC.
            Err(_) => {
                shared.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Waits up to 50 ms for any of `fds` to be readable; which are.
fn readable_set(fds: &[RawFd]) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of fds.len() pollfds.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
    pfds.iter()
        .map(|p| rc > 0 && p.revents & libc::POLLIN != 0)
        .collect()
}

/// The vhost datapath: the kernel fills RX buffers from the host tap and
/// sends TX buffers into it; this loop hands filled RX buffers to the guest
/// tap and reposts them, and turns guest frames into TX buffers. Counted
/// where QEMU would: to_vm when a filled RX buffer is taken, from_vm when
/// the device completes a TX buffer (the tap has it).
fn vhost_loop(mut dev: VhostNet, mut guest: File, shared: Arc<Shared>) -> anyhow::Result<()> {
    for id in 0..QUEUE_SIZE {
        dev.post_rx(id);
    }
    dev.kick(RX)?;
    let mut free_tx: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
    let mut in_flight: Vec<Option<Vec<u8>>> = vec![None; usize::from(QUEUE_SIZE)];
    let mut buf = vec![0u8; 65536];
    loop {
        let mode = shared.mode.load(Ordering::Relaxed);
        let ready = readable_set(&[dev.call_fd(RX), dev.call_fd(TX), guest.as_raw_fd()]);
        dev.clear_call(RX);
        dev.clear_call(TX);
        // A stalled or paused guest neither takes filled RX buffers nor
        // posts new ones: the ring runs dry and vhost stops reading the tap.
        if mode == MODE_RUNNING {
            let used = dev.take_used(RX);
            for &(id, len) in &used {
                let frame = dev.rx_frame(id, len).to_vec();
                shared.to_vm.add(&frame);
                if guest
                    .write(&frame)
                    .map(|n| n != frame.len())
                    .unwrap_or(true)
                {
                    shared.write_errors.fetch_add(1, Ordering::Relaxed);
                }
                dev.post_rx(id);
            }
            if !used.is_empty() {
                dev.kick(RX)?;
            }
        }
        for (id, _) in dev.take_used(TX) {
            if let Some(frame) = in_flight[usize::from(id)].take() {
                shared.from_vm.add(&frame);
            }
            free_tx.push(id);
        }
        if mode != MODE_PAUSED && ready[2] && !free_tx.is_empty() {
            let n = match guest.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the guest tap"),
            };
            if let Some(id) = free_tx.pop() {
                let frame = buf[..n].to_vec();
                if dev.post_tx(id, &frame) {
                    in_flight[usize::from(id)] = Some(frame);
                    dev.kick(TX)?;
                } else {
                    shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    free_tx.push(id);
                }
            }
        }
    }
}

fn serve_control(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming().flatten() {
        if let Err(err) = handle_control(stream, &shared) {
            eprintln!("fake-vmm: control: {err:#}");
        }
    }
}

fn handle_control(stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next()) {
        (Some("stats"), None) => {
            let mode = match shared.mode.load(Ordering::Relaxed) {
                MODE_RX_STALL => VmmMode::RxStall,
                MODE_PAUSED => VmmMode::Paused,
                _ => VmmMode::Running,
            };
            serde_json::to_string(&VmmStats {
                mode,
                to_vm: shared.to_vm.snapshot(),
                from_vm: shared.from_vm.snapshot(),
                write_errors: shared.write_errors.load(Ordering::Relaxed),
            })?
        }
        (Some("mode"), Some(name)) => match VmmMode::parse(name) {
            Some(mode) => {
                let code = match mode {
                    VmmMode::Running => MODE_RUNNING,
                    VmmMode::RxStall => MODE_RX_STALL,
                    VmmMode::Paused => MODE_PAUSED,
                };
                shared.mode.store(code, Ordering::Relaxed);
                "ok".to_owned()
            }
            None => format!("error: unknown mode {name:?} (running, rx_stall, paused)"),
        },
        _ => format!("error: unknown request {:?}", line.trim()),
    };
    let mut stream = stream;
    writeln!(stream, "{reply}")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A tun fd belongs to the netns it was opened in: open each tap after
    // entering its namespace (this thread only; children inherit nothing).
    enter_netns(&PathBuf::from("/run/netns").join(&args.node_netns))?;
    let vhost = match args.datapath.as_str() {
        "plain" => false,
        "vhost" => true,
        other => bail!("unknown --datapath {other:?} (plain, vhost)"),
    };
    let framing = if vhost {
        TapFraming::VnetHeader
    } else {
        TapFraming::Plain
    };
    let host_tap = open_tap(&args.tap, framing)?;
    // The vhost device is owned by this process: its worker is
    // `vhost-<pid>` (a kernel thread before 6.4, a thread of ours since).
    let vhost_dev = if vhost {
        Some(VhostNet::open(&host_tap)?)
    } else {
        None
    };
    enter_netns(&PathBuf::from("/run/netns").join(&args.guest_netns))?;
    let guest_tap = open_tap(&args.guest_if, TapFraming::Plain)?;

    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .with_context(|| format!("binding {}", args.control.display()))?;
    let shared = Arc::new(Shared::default());

    let (to_vm, from_vm) = match vhost_dev {
        Some(dev) => {
            let shared = shared.clone();
            // One loop serves both directions; the tap stays open with it.
            let both = std::thread::spawn(move || {
                let _tap = host_tap;
                vhost_loop(dev, guest_tap, shared)
            });
            (both, std::thread::spawn(|| Ok(())))
        }
        None => {
            let to_vm = {
                let (src, dst, shared) = (
                    host_tap.try_clone()?,
                    guest_tap.try_clone()?,
                    shared.clone(),
                );
                std::thread::spawn(move || relay(src, dst, shared, true))
            };
            let from_vm = {
                let shared = shared.clone();
                std::thread::spawn(move || relay(guest_tap, host_tap, shared, false))
            };
            (to_vm, from_vm)
        }
    };
    {
        let shared = shared.clone();
        std::thread::spawn(move || serve_control(listener, shared));
    }
    println!("ready");
    std::io::stdout().flush()?;

    // Either relay ending is fatal: report which one and why.
    for (name, handle) in [("to_vm", to_vm), ("from_vm", from_vm)] {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => bail!("{name} relay stopped: {err:#}"),
            Err(_) => bail!("{name} relay panicked"),
        }
    }
    Ok(())
}
