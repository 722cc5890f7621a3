//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{client::AgentOptions, config::FlagOverrides};

#[derive(Debug, Parser)]
#[command(
    name = "hvnet",
    version,
    about = "Per-VM packet counters and RX-stall detection for KVM compute nodes, with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach to matching taps and serve Prometheus metrics.
    Run(RunArgs),
    /// Measure the tc programs against an empty program (BPF_PROG_TEST_RUN).
    Bench(BenchArgs),
    /// Follow the agent's live events (stall transitions, DHCP, verdicts) as JSON lines.
    Events(AgentArgs),
    /// A live per-VM table: pps each way, backlog, state, last DHCP verdict, lease left.
    Top(TopArgs),
    /// The incident timeline of one VM, in plain words.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent: a URL (http://host:port, https://host:port) or ADDR:PORT. Default: the `listen` address in --config, else http://127.0.0.1:9478.
    #[arg(long, env = "HVNET_AGENT", value_name = "URL")]
    pub agent: Option<String>,
    /// The agent's own config file (e.g. /etc/hvnet/hvnet.toml): its listen address, and https when its web config serves TLS.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the agent's TLS certificate with, besides the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for agents that require one.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Basic-auth user; the password comes from --password-file or HVNET_PASSWORD.
    #[arg(long, env = "HVNET_USER", value_name = "NAME")]
    pub user: Option<String>,
    /// File holding the basic-auth password (first line).
    #[arg(long, value_name = "FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
    /// How long to wait for the TCP connection.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,
    /// How long a request may take in all (event streams: the connection only).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
}

impl AgentArgs {
    pub fn options(&self) -> AgentOptions {
        AgentOptions {
            agent: self.agent.clone(),
            config: self.config.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            user: self.user.clone(),
            password_file: self.password_file.clone(),
            password_env: std::env::var("HVNET_PASSWORD").ok(),
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
        }
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    crate::duration::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Print one table (two samples a second apart) and exit.
    #[arg(long)]
    pub once: bool,
    /// With --once: the rows as JSON, for scripts.
    #[arg(long, requires = "once")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The VM: its tap name (e.g. tap3f2a1c9d-1e, vnet0), VM name or UUID.
    pub vm: String,
    /// The explanation and its timeline as JSON, for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file; its keys mirror these flags (poll_interval, ...).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address for /metrics, /healthz and /api/v1/vms [default: 127.0.0.1:9478].
    #[arg(long)]
    pub listen: Option<String>,
    /// Comma-separated interface globs to monitor [default: tap*,vnet*].
    #[arg(long)]
    pub interfaces: Option<String>,
    /// How often per-VM state is evaluated [default: 1s].
    #[arg(long)]
    pub poll_interval: Option<String>,
    /// How long frames may wait undrained before a VM counts as RX-stalled [default: 3s].
    #[arg(long)]
    pub stall_after: Option<String>,
    /// How long a removed tap's final counters stay exported (0s: drop at once) [default: 15s].
    #[arg(long)]
    pub series_grace: Option<String>,
    /// tc attach mechanism: auto (TCX on 6.6+ for up to 128 taps at start, else netlink), tcx or netlink [default: auto].
    #[arg(long)]
    pub attach_mode: Option<String>,
    /// Kernel BTF file [default: /sys/kernel/btf/vmlinux].
    #[arg(long)]
    pub btf: Option<PathBuf>,
    /// libvirt's directory of running domains' status XML [default: /run/libvirt/qemu].
    #[arg(long)]
    pub libvirt_run_dir: Option<PathBuf>,
    /// The /proc to find the process holding each tap in (a host's /proc mounted elsewhere, e.g. in a container) [default: /proc].
    #[arg(long)]
    pub proc_root: Option<PathBuf>,
    /// Add the VM's project (nova metadata) to hvnet_vm_info; more series, so off by default.
    /// `--project-label` alone turns it on; `--project-label=false` turns off what the config file turned on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub project_label: Option<bool>,
    /// Prometheus exporter-toolkit web config (TLS, client certificates, basic auth, headers); re-read on change and on SIGHUP.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Most taps attached at once (kernel maps are sized for them; taps beyond wait) [default: 4096].
    #[arg(long)]
    pub max_interfaces: Option<u64>,
    /// Series per tap: `default` (17 for an idle tap; breakdowns by class, DHCP type, verdict and
    /// client state appear once non-zero) or `full` (every breakdown from 0: 62).
    #[arg(long, value_name = "default|full")]
    pub metrics_detail: Option<String>,
    /// Follow DHCP replies through the taps' Linux bridges and their ports (veth pairs of a
    /// hybrid plug) [default: true]; `--bridge-hops=false` attaches to taps only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub bridge_hops: Option<bool>,
    /// Uplinks to follow DHCP replies through, as globs (e.g. `bond*,eth*,vlan*`); VLAN tags and
    /// VXLAN/Geneve tunnels on them are looked into [default: none].
    #[arg(long, value_name = "GLOBS")]
    pub uplinks: Option<String>,
}

impl RunArgs {
    pub fn overrides(&self) -> FlagOverrides {
        FlagOverrides {
            listen: self.listen.clone(),
            interfaces: self.interfaces.clone(),
            poll_interval: self.poll_interval.clone(),
            stall_after: self.stall_after.clone(),
            series_grace: self.series_grace.clone(),
            attach_mode: self.attach_mode.clone(),
            btf: self.btf.clone(),
            libvirt_run_dir: self.libvirt_run_dir.clone(),
            proc_root: self.proc_root.clone(),
            project_label: self.project_label,
            web_config_file: self.web_config_file.clone(),
            max_interfaces: self.max_interfaces,
            metrics_detail: self.metrics_detail.clone(),
            bridge_hops: self.bridge_hops,
            uplinks: self.uplinks.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Iterations per kernel test run.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Test runs per measurement; the median is reported.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
}
