//! A real guest: QEMU (TCG) booting the Debian kernel and the generated
//! initramfs, its virtio-net NIC on a lab tap passed by fd (`-netdev
//! {"type":"tap","fd":"N","vhost":false}`) the way libvirt does it. The test talks to the guest
//! over the serial console and to QEMU over QMP.

use std::{
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::net::UnixStream, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::image::GuestImage;
use crate::{
    node::ComputeNode,
    tap::{open_tap, TapFraming},
};

/// The fd number the tap has inside QEMU.
const TAP_FD: i32 = 3;
/// Booting under TCG, loading modules and getting a lease.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Who the guest is, as libvirt would put it on QEMU's command line.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub uuid: String,
    pub mac: String,
    pub tap: String,
}

/// The guest's own eth0 counters (/sys/class/net/eth0/statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
}

pub struct QemuGuest {
    pub spec: GuestSpec,
    qemu: Child,
    console_in: ChildStdin,
    console_out: Receiver<String>,
    console_log: Vec<String>,
    qmp: BufReader<UnixStream>,
    node_ns: String,
}

/// Why a real-VM test cannot run here, if it cannot.
pub fn unavailable_reason(image: &anyhow::Result<GuestImage>) -> Option<String> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        return Some("qemu-system-x86_64 is not installed (apt package qemu-system-x86; `cargo xtask setup` installs it)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    image.as_ref().err().map(|e| format!("{e:#}"))
}

impl QemuGuest {
    /// Creates the tap on the node's bridge, boots the guest on it and
    /// waits until its init answers on the console.
    pub fn boot(node: &ComputeNode, image: &GuestImage, spec: GuestSpec) -> anyhow::Result<Self> {
        let tap_mac = format!("fe{}", &spec.mac[2..]);
        node.create_tap(&spec.tap, &tap_mac)?;
        let tap_name = spec.tap.clone();
        let tap = node
            .ns
            .enter(move || open_tap(&tap_name, TapFraming::VnetHeader))?;
        let initramfs = node.dir.join(format!("{}.initramfs", spec.name));
        image.write_initramfs(&initramfs)?;
        let qmp_path = node.dir.join(format!("{}.qmp", spec.name));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35,accel=tcg", "-m", "256", "-smp", "1"])
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args([
                "-append",
                "console=ttyS0 quiet loglevel=1 ipv6.disable=1 iomem=relaxed panic=-1",
                "-name",
                &format!("guest={},debug-threads=on", spec.name),
                "-uuid",
                &spec.uuid,
                // JSON, as libvirt (>= 7) writes -netdev and -device.
                "-netdev",
                &format!(r#"{{"type":"tap","fd":"{TAP_FD}","vhost":false,"id":"hostnet0"}}"#),
                "-device",
                &format!(
                    r#"{{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"{}"}}"#,
                    spec.mac
                ),
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp_path.display()),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let raw_tap = tap.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls: dup2
        // puts the tap on fd 3 without close-on-exec, as libvirt hands it over.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself is a no-op that keeps close-on-exec.
                let rc = if raw_tap == TAP_FD {
                    libc::fcntl(TAP_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw_tap, TAP_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut qemu = cmd.spawn().context("starting qemu-system-x86_64")?;
        drop(tap);
        let console_in = qemu.stdin.take().context("qemu stdin")?;
        let stdout = qemu.stdout.take().context("qemu stdout")?;
        let (tx, console_out) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    break;
                }
            }
        });
        let qmp = match connect_qmp(&qmp_path, &mut qemu) {
            Ok(qmp) => qmp,
            Err(err) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(err);
            }
        };
        let mut guest = Self {
            spec,
            qemu,
            console_in,
            console_out,
            console_log: Vec::new(),
            qmp,
            node_ns: node.ns.name().to_owned(),
        };
        guest.wait_for_line("HVNET ready", BOOT_TIMEOUT)?;
        Ok(guest)
    }

    pub fn pid(&self) -> u32 {
        self.qemu.id()
    }

    fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "guest {}: no {prefix:?} within {timeout:?}; console:\n{}",
                    self.spec.name,
                    self.console_tail()
                );
            }
            match self.console_out.recv_timeout(left) {
                Ok(line) => {
                    self.console_log.push(line.clone());
                    if let Some(at) = line.find(prefix) {
                        return Ok(line[at..].to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.qemu.try_wait().ok().flatten();
                    let mut stderr = String::new();
                    if let Some(mut err) = self.qemu.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                    }
                    bail!(
                        "guest {}: QEMU exited ({status:?}): {stderr}\nconsole:\n{}",
                        self.spec.name,
                        self.console_tail()
                    );
                }
            }
        }
    }

    pub fn console_tail(&self) -> String {
        let start = self.console_log.len().saturating_sub(40);
        self.console_log[start..].join("\n")
    }

    /// Sends one command to the guest's init and returns its "HVNET ..." reply.
    pub fn command(&mut self, line: &str) -> anyhow::Result<String> {
        while let Ok(stale) = self.console_out.try_recv() {
            self.console_log.push(stale);
        }
        writeln!(self.console_in, "{line}")?;
        self.console_in.flush()?;
        let reply = self.wait_for_line("HVNET ", Duration::from_secs(20))?;
        if let Some(err) = reply.strip_prefix("HVNET error ") {
            bail!("guest {} refused {line:?}: {err}", self.spec.name);
        }
        Ok(reply)
    }

    pub fn counters(&mut self) -> anyhow::Result<GuestCounters> {
        let reply = self.command("stats")?;
        let numbers: Vec<u64> = reply
            .trim_start_matches("HVNET stats")
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("guest stats reply {reply:?}"))?;
        let [rx_packets, tx_packets, rx_bytes, tx_bytes, rx_dropped] = numbers[..] else {
            bail!("guest stats reply {reply:?}");
        };
        Ok(GuestCounters {
            rx_packets,
            tx_packets,
            rx_bytes,
            tx_bytes,
            rx_dropped,
        })
    }

    /// The guest's IPv4 address on eth0, if it has a lease.
    pub fn address(&mut self) -> anyhow::Result<Option<String>> {
        let reply = self.command("addr")?;
        let addr = reply.trim_start_matches("HVNET addr").trim();
        Ok((!addr.is_empty()).then(|| addr.to_owned()))
    }

    /// A QMP command; returns its "return" value.
    pub fn qmp(&mut self, execute: &str) -> anyhow::Result<Value> {
        qmp_execute(&mut self.qmp, execute)
    }
}

fn connect_qmp(path: &Path, qemu: &mut Child) -> anyhow::Result<BufReader<UnixStream>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(stream) => break stream,
            Err(err) => {
                if let Some(status) = qemu.try_wait()? {
                    let mut stderr = String::new();
                    if let Some(mut err) = qemu.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                    }
                    bail!("QEMU exited at start ({status}): {stderr}");
                }
                if Instant::now() > deadline {
                    bail!("QMP socket {}: {err}", path.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut qmp = BufReader::new(stream);
    let mut greeting = String::new();
    qmp.read_line(&mut greeting)?;
    if !greeting.contains("QMP") {
        bail!("unexpected QMP greeting {greeting:?}");
    }
    qmp_execute(&mut qmp, "qmp_capabilities")?;
    Ok(qmp)
}

fn qmp_execute(qmp: &mut BufReader<UnixStream>, execute: &str) -> anyhow::Result<Value> {
    let request = json!({ "execute": execute }).to_string();
    qmp.get_mut().write_all(format!("{request}\n").as_bytes())?;
    loop {
        let mut line = String::new();
        if qmp.read_line(&mut line)? == 0 {
            bail!("QMP connection closed during {execute}");
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("QMP reply to {execute}: {line:?}"))?;
        // Asynchronous events (STOP, RESUME, ...) interleave with replies.
        if value.get("event").is_some() {
            continue;
        }
        if let Some(err) = value.get("error") {
            bail!("QMP {execute}: {err}");
        }
        return Ok(value.get("return").cloned().unwrap_or(Value::Null));
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = Command::new("ip")
            .args(["-n", &self.node_ns, "link", "del", &self.spec.tap])
            .output();
    }
}

/// Where the guest's boot files are expected.
pub fn image_cache() -> PathBuf {
    super::image::default_cache()
}
