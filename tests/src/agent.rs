//! hvnet as a child process inside the lab's node netns.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{http, metrics, netns::NetNs};

pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    ns_path: PathBuf,
}

/// The hvnet binary: $HVNET_BIN (set by `cargo xtask test`) or the release build.
pub fn hvnet_bin() -> PathBuf {
    std::env::var_os("HVNET_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/hvnet"))
}

impl Agent {
    /// Starts `hvnet run` in `ns` listening on 127.0.0.1:`port` there, and
    /// waits until /healthz answers.
    pub fn start(ns: &NetNs, port: u16, extra: &[&str], log: &Path) -> anyhow::Result<Self> {
        Self::start_wrapped(ns, port, &[], extra, log)
    }

    /// Like [`Agent::start`], run through `wrapper` (e.g. `setpriv ...` to
    /// run it as an unprivileged user with chosen capabilities).
    pub fn start_wrapped(
        ns: &NetNs,
        port: u16,
        wrapper: &[&str],
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Self::spawn(ns, addr, wrapper, extra, log)?;
        let mut agent = Self {
            child: Some(child),
            addr,
            log: log.to_owned(),
            ns_path: ns.path(),
        };
        agent.wait_healthy(ns)?;
        Ok(agent)
    }

    /// Starts `hvnet run --listen addr` in `ns` and waits until `healthy`
    /// says yes (for agents behind TLS or auth, checked with curl).
    pub fn start_checked(
        ns: &NetNs,
        addr: SocketAddr,
        extra: &[&str],
        log: &Path,
        healthy: impl Fn() -> bool,
    ) -> anyhow::Result<Self> {
        let child = Self::spawn(ns, addr, &[], extra, log)?;
        let mut agent = Self {
            child: Some(child),
            addr,
            log: log.to_owned(),
            ns_path: ns.path(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(child) = agent.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("hvnet exited at start ({status}):\n{}", agent.log_text());
                }
            }
            if healthy() {
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("hvnet did not become healthy:\n{}", agent.log_text())
    }

    /// Sends `signal` to the agent (e.g. SIGHUP to re-read its web config).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    fn spawn(
        ns: &NetNs,
        addr: SocketAddr,
        wrapper: &[&str],
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Child> {
        let log_file = std::fs::File::create(log)?;
        let bin = hvnet_bin().display().to_string();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = ns.command(program);
                cmd.args(rest).arg(&bin);
                cmd
            }
            None => ns.command(&bin),
        };
        cmd.args(["run", "--listen", &addr.to_string()]);
        // Lab tests compare every breakdown series, zeros included: full
        // detail unless the test chooses (a missing series is never a 0).
        if !extra.contains(&"--metrics-detail") {
            cmd.args(["--metrics-detail", "full"]);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting hvnet (build it with `cargo xtask build`)")
    }

    fn wait_healthy(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("hvnet exited at start ({status}):\n{}", self.log_text());
                }
            }
            if let Ok(resp) = http::get(ns, self.addr, "/healthz") {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("hvnet did not become healthy:\n{}", self.log_text())
    }

    /// `hvnet explain <name>` against this agent, run inside `ns`.
    pub fn explain(&self, ns: &NetNs, name: &str) -> anyhow::Result<String> {
        ns.exec_ok(&[
            &hvnet_bin().display().to_string(),
            "explain",
            name,
            "--agent",
            &self.addr.to_string(),
        ])
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn scrape(&self, ns: &NetNs) -> anyhow::Result<Vec<metrics::Sample>> {
        let resp = http::get(ns, self.addr, "/metrics")?;
        if resp.status != 200 {
            bail!("/metrics answered {}: {}", resp.status, resp.body);
        }
        Ok(metrics::parse(&resp.body))
    }

    pub fn pid(&self) -> Option<u32> {
        // `ip netns exec` (and setpriv) exec hvnet in place, so the child's
        // pid is hvnet's.
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait (up to `grace`) for a clean exit.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "hvnet did not exit within {grace:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    pub fn ns_path(&self) -> &Path {
        &self.ns_path
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
