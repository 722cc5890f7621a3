//! Network namespaces owned by the lab: created with `ip netns add`, removed
//! (with every process still inside) when dropped, also on test failure.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context as _};

pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with loopback up and IPv6 off (no router
    /// solicitations or MLD reports muddying exact counts).
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.exec_ok(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`, checked.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run(&mut cmd)
    }

    /// A veth pair named `name` on both sides, this end here and the other
    /// in `other`, both up and without addresses (an uplink's cable).
    pub fn link_to(&self, name: &str, other: &NetNs) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", name, "up"])?;
        other.ip(&["link", "set", name, "up"]).map(|_| ())
    }

    /// A veth pair standing in for a tap: `name` here (at ifindex `index`
    /// when given; `ip tuntap` cannot choose one) with `node_cidr`, its
    /// peer `eth0` in `guest` with `guest_cidr`, both up.
    pub fn veth_to(
        &self,
        name: &str,
        index: Option<u32>,
        node_cidr: &str,
        guest: &NetNs,
        guest_cidr: &str,
    ) -> anyhow::Result<()> {
        let index_text = index.map(|i| i.to_string());
        let mut args = vec!["link", "add", name];
        if let Some(i) = &index_text {
            args.extend(["index", i.as_str()]);
        }
        args.extend([
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            guest.name(),
        ]);
        self.ip(&args)?;
        self.ip(&["addr", "add", node_cidr, "dev", name])?;
        self.ip(&["link", "set", name, "up"])?;
        guest.ip(&["addr", "add", guest_cidr, "dev", "eth0"])?;
        guest.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A command to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a command inside the namespace and checks it succeeded.
    pub fn exec_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (program, rest) = args.split_first().context("empty command")?;
        let mut cmd = self.command(program);
        cmd.args(rest);
        run(&mut cmd)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it
    /// creates live in the namespace; the caller's thread is untouched).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter_netns(&path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside the netns panicked"))?
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &std::path::Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd only changes this thread's netns.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes left inside (dnsmasq, udhcpc, a crashed agent) would
        // keep the namespace's interfaces alive: end them first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2) on a pid inside our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out: Output = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
