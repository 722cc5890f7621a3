//! Boots the compute-node VM under QEMU TCG and reads its plan's results
//! from the serial console.

use std::{
    io::{BufRead, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// How one plan step ended inside the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub label: String,
    /// The step's exit status; None if the VM stopped before it ended.
    pub status: Option<i32>,
    pub seconds: u64,
    /// `HVNET-NODE report ...` lines the step printed.
    pub reports: Vec<String>,
    /// The tail of the step's output when it failed.
    pub log: Vec<String>,
}

impl StepOutcome {
    pub fn passed(&self) -> bool {
        self.status == Some(0)
    }
}

/// What the VM said.
#[derive(Debug, Default)]
pub struct NodeRun {
    pub release: String,
    pub steps: Vec<StepOutcome>,
    pub insmod_failures: Vec<String>,
    pub finished: bool,
}

impl NodeRun {
    /// Folds one console line into the run.
    pub fn absorb(&mut self, line: &str) {
        let Some(rest) = line.split_once("HVNET-NODE ").map(|(_, r)| r) else {
            return;
        };
        let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        match word {
            "kernel" => self.release = tail.trim().to_owned(),
            "insmod-failed" => self.insmod_failures.push(tail.trim().to_owned()),
            "begin" => self.steps.push(StepOutcome {
                label: tail.trim().to_owned(),
                status: None,
                seconds: 0,
                reports: Vec::new(),
                log: Vec::new(),
            }),
            "report" => {
                if let Some(step) = self.steps.last_mut() {
                    step.reports.push(tail.to_owned());
                }
            }
            "log" => {
                if let Some(step) = self.steps.last_mut() {
                    step.log.push(tail.to_owned());
                }
            }
            "end" => {
                let mut fields = tail.split_whitespace();
                let label = fields.next().unwrap_or_default();
                let status = fields.next().and_then(|s| s.parse().ok());
                let seconds = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                if let Some(step) = self.steps.last_mut().filter(|s| s.label == label) {
                    step.status = status;
                    step.seconds = seconds;
                }
            }
            "done" => self.finished = true,
            _ => {}
        }
    }
}

/// Boots `kernel` with `initramfs` (2 vCPUs, 2 GiB, TCG), echoes every
/// `HVNET-NODE` line as it arrives, keeps the whole console in
/// `console_log`, and returns when the VM powers off or `timeout` passes.
pub fn run(
    kernel: &Path,
    initramfs: &Path,
    timeout: Duration,
    console_log: &Path,
) -> anyhow::Result<NodeRun> {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 loglevel=4 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(console_log)
        .with_context(|| format!("creating {}", console_log.display()))?;
    let mut node = NodeRun::default();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!(
                "the node VM did not finish within {timeout:?} (console: {})",
                console_log.display()
            );
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                if line.contains("HVNET-NODE ") && !line.contains("HVNET-NODE log ") {
                    eprintln!("  {}", line.trim());
                }
                node.absorb(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = qemu.wait()?;
    if !node.finished {
        let mut stderr = String::new();
        if let Some(mut err) = qemu.stderr.take() {
            use std::io::Read as _;
            let _ = err.read_to_string(&mut stderr);
        }
        bail!(
            "the node VM stopped ({status}) before its plan finished: {} (console: {})",
            stderr.trim(),
            console_log.display()
        );
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_fold_into_steps() {
        let mut run = NodeRun::default();
        for line in [
            "[    1.0] random kernel noise",
            "HVNET-NODE kernel 6.1.0-57-cloud-amd64",
            "HVNET-NODE insmod-failed vhost_net",
            "HVNET-NODE begin report",
            "HVNET-NODE report probe tc_egress netlink 1",
            "HVNET-NODE end report 0 12",
            "HVNET-NODE begin counts",
            "HVNET-NODE log assertion failed",
            "HVNET-NODE end counts 101 40",
            "HVNET-NODE begin stall",
        ] {
            run.absorb(line);
        }
        assert_eq!(run.release, "6.1.0-57-cloud-amd64");
        assert_eq!(run.insmod_failures, ["vhost_net"]);
        assert_eq!(run.steps.len(), 3);
        assert!(run.steps[0].passed());
        assert_eq!(run.steps[0].reports, ["probe tc_egress netlink 1"]);
        assert_eq!(run.steps[1].status, Some(101));
        assert_eq!(run.steps[1].log, ["assertion failed"]);
        assert_eq!(run.steps[2].status, None, "a step the VM never ended");
        assert!(!run.finished);
    }
}
