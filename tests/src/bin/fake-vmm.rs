//! A VMM stand-in for the lab, doing what QEMU's tap backend does: it holds
//! the VM's host tap open, reads frames the host sends to the VM and writes
//! the frames the VM sends. The VM side is a tap in the guest's netns, so
//! real network stacks and clients run as the guest.
//!
//! Faults (set over the control socket): `rx_stall` stops reading the host
//! tap (the incident's virtio RX bug), `paused` stops both directions.

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
    let host_tap = open_tap(&args.tap, TapFraming::Plain)?;
    enter_netns(&PathBuf::from("/run/netns").join(&args.guest_netns))?;
    let guest_tap = open_tap(&args.guest_if, TapFraming::Plain)?;

    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .with_context(|| format!("binding {}", args.control.display()))?;
    let shared = Arc::new(Shared::default());

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
