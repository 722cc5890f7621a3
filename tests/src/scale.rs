//! hvnet on a dense node: N taps (persistent, on the lab bridge), the
//! agent started on all of them at once. Measured in one run per size:
//! time until all are attached, time for one more tap to be attached, RSS,
//! idle CPU, /metrics latency and size, SIGTERM to exit, and that nothing
//! is left attached afterwards (`cargo xtask bench`, BENCHMARKS.md).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::{
    agent::Agent,
    expect::{tc_filters, tcx_programs},
    http, metrics,
    node::ComputeNode,
    testkit::rss_kib,
};

/// Scrapes timed for the latency percentiles.
const SCRAPES: usize = 40;
/// Idle CPU is measured over this long, after attach has settled.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub taps: usize,
    /// attach_mode, and what `auto` resolved to: "auto (netlink)".
    pub mode: String,
    pub attach_all: Duration,
    pub attach_one_more: Duration,
    pub rss_mib: f64,
    pub idle_cpu_percent: f64,
    pub scrape_p50_ms: f64,
    pub scrape_p99_ms: f64,
    pub metrics_kib: usize,
    pub series: usize,
    pub sigterm_exit: Duration,
    pub left_attached: usize,
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces: fields start after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5); utime and stime are 14, 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn attached(agent: &Agent, node: &ComputeNode) -> Option<f64> {
    agent
        .scrape(&node.ns)
        .ok()
        .and_then(|s| metrics::value(&s, "hvnet_agent_interfaces", &[]))
}

/// What the agent logged after byte `from` of its log.
fn log_since(log: &std::path::Path, from: u64) -> anyhow::Result<String> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(log)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Creates `taps` persistent taps `tsN` in the node's netns in one `ip
/// -batch`. Not on the bridge: a Linux bridge takes at most 1024 ports
/// (BR_MAX_PORTS; "Exchange full" beyond), so dense nodes spread taps over
/// many bridges (Neutron's per-VM qbr) or OVS.
fn create_taps(node: &ComputeNode, taps: usize) -> anyhow::Result<()> {
    let script = node.dir.join("taps.batch");
    let mut text = String::new();
    for i in 0..taps {
        text.push_str(&format!(
            "tuntap add dev ts{i} mode tap\nlink set ts{i} up\n"
        ));
    }
    std::fs::write(&script, text)?;
    node.ns
        .exec_ok(&["ip", "-batch", &script.display().to_string()])
        .map(|_| ())
}

pub fn run(prefix: &str, taps: usize, mode: &str) -> anyhow::Result<ScaleResult> {
    let node = ComputeNode::create(prefix)?;
    create_taps(&node, taps)?;
    let started = Instant::now();
    let mut agent = Agent::start(
        &node.ns,
        9478,
        &[
            "--interfaces",
            "ts*",
            "--metrics-detail",
            "default",
            "--attach-mode",
            mode,
        ],
        &node.dir.join("hvnet.log"),
    )?;
    let pid = agent.pid().context("agent pid")?;
    while attached(&agent, &node) != Some(taps as f64) {
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "{taps} taps not attached within 300 s:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let attach_all = started.elapsed();
    // What `auto` resolved to on this node, as hvnet exports it.
    let mechanism = agent
        .scrape(&node.ns)?
        .into_iter()
        .find(|sample| sample.name == "hvnet_build_info")
        .and_then(|sample| sample.labels.get("attach_mechanism").cloned())
        .context("hvnet_build_info{attach_mechanism} missing")?;
    let mode_shown = if mechanism == mode {
        mode.to_owned()
    } else {
        format!("{mode} ({mechanism})")
    };

    // A new tap on a full node: from the moment it exists until hvnet has
    // attached to it (its log line; a scrape at 2000 taps itself takes
    // ~20 ms, too coarse to time this with), then confirmed in /metrics.
    let log_start = std::fs::metadata(&agent.log)?.len();
    node.ns
        .ip(&["tuntap", "add", "dev", "tsnew", "mode", "tap"])?;
    let added = Instant::now();
    while !log_since(&agent.log, log_start)?.contains("attached to tsnew ") {
        if added.elapsed() > Duration::from_secs(30) {
            bail!("a new tap was not attached within 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let attach_one_more = added.elapsed();
    while attached(&agent, &node) != Some(taps as f64 + 1.0) {
        if added.elapsed() > Duration::from_secs(30) {
            bail!("the new tap is attached but not counted in /metrics");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // Idle: nothing scrapes, nothing changes.
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid)?;
    let window_start = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let idle_ticks = cpu_ticks(pid)? - before;
    let idle_cpu_percent =
        100.0 * idle_ticks as f64 / ticks_per_sec / window_start.elapsed().as_secs_f64();
    let rss_mib = rss_kib(pid)? as f64 / 1024.0;

    let addr = agent.addr;
    let (mut latencies, body) = node.ns.enter(move || {
        let mut latencies = Vec::with_capacity(SCRAPES);
        let mut body = String::new();
        for _ in 0..SCRAPES {
            let t = Instant::now();
            let resp = http::get_here(addr, "/metrics")?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            if resp.status != 200 {
                bail!("/metrics answered {}", resp.status);
            }
            body = resp.body;
        }
        Ok((latencies, body))
    })?;
    latencies.sort_by(f64::total_cmp);
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();

    let stopping = Instant::now();
    let status = agent.terminate(Duration::from_secs(60))?;
    let sigterm_exit = stopping.elapsed();
    if !status.success() {
        bail!("hvnet exited with {status} on SIGTERM");
    }
    // Nothing of hvnet's left (checked on a sample of taps): no TCX
    // program, no hvnet filter (its clsact qdiscs stay, empty and inert).
    let mut left_attached = 0;
    for i in (0..taps).step_by((taps / 50).max(1)) {
        let tap = format!("ts{i}");
        left_attached += tcx_programs(&node.ns, &tap)?
            .iter()
            .filter(|p| p.starts_with("hvnet"))
            .count();
        for hook in ["ingress", "egress"] {
            left_attached += tc_filters(&node.ns, &tap, hook)?.matches("hvnet_").count();
        }
    }
    Ok(ScaleResult {
        taps,
        mode: mode_shown,
        attach_all,
        attach_one_more,
        rss_mib,
        idle_cpu_percent,
        scrape_p50_ms: percentile(&latencies, 0.5),
        scrape_p99_ms: percentile(&latencies, 0.99),
        metrics_kib: body.len() / 1024,
        series,
        sigterm_exit,
        left_attached,
    })
}

/// The table `cargo xtask bench` prints.
pub fn render(results: &[ScaleResult]) -> String {
    let mut out = String::from(
        "| taps | attach mode | all attached | one more attached | RSS | idle CPU (% of a core) | /metrics p50 / p99 | /metrics size, series | SIGTERM to exit | left attached |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.1} s | {} ms | {:.0} MiB | {:.2} % | {:.1} / {:.1} ms | {} KiB, {} | {:.2} s | {} |\n",
            r.taps,
            r.mode,
            r.attach_all.as_secs_f64(),
            r.attach_one_more.as_millis(),
            r.rss_mib,
            r.idle_cpu_percent,
            r.scrape_p50_ms,
            r.scrape_p99_ms,
            r.metrics_kib,
            r.series,
            r.sigterm_exit.as_secs_f64(),
            r.left_attached,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
