//! Configuration: a TOML file plus command-line flags, resolved into one
//! [`Config`]. Flags override the file; the file overrides the defaults.
//! File keys mirror the flags (`--poll-interval` is `poll_interval`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    duration::{parse_duration, parse_duration_or_zero, DurationError},
    interfaces::ifmatch::{InterfaceGlobError, InterfaceMatcher},
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9478";
pub const DEFAULT_INTERFACES: &str = "tap*,vnet*";
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(3);
/// A scrape interval (Prometheus' example config scrapes every 15 s): long
/// enough for the last increments of a removed tap to be scraped.
pub const DEFAULT_SERIES_GRACE: Duration = Duration::from_secs(15);
pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const DEFAULT_LIBVIRT_RUN_DIR: &str = "/run/libvirt/qemu";
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// The shortest poll interval or stall-after accepted.
pub const MIN_DURATION: Duration = Duration::from_millis(10);
/// Taps hvnet attaches to at most (its kernel maps are sized for this many).
pub const DEFAULT_MAX_INTERFACES: u32 = tracer_common::MAX_MONITORED;
/// The largest max_interfaces accepted (map memory grows with it).
pub const MAX_MAX_INTERFACES: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid listen address {0:?}: use ADDR:PORT, e.g. 127.0.0.1:9478")]
    Listen(String),
    // `reason`, not `source`: the message already carries it, and a source
    // would be printed twice in the error chain.
    #[error("{key}: {reason}")]
    Duration {
        key: &'static str,
        reason: DurationError,
    },
    #[error("{key} {value:?} is too short: use at least {minimum:?}")]
    TooShort {
        key: &'static str,
        value: String,
        minimum: Duration,
    },
    #[error(transparent)]
    Interfaces(#[from] InterfaceGlobError),
    #[error("invalid attach_mode {0:?}: use auto, tcx or netlink")]
    AttachMode(String),
    #[error("invalid max_interfaces {0}: use 1 to 65536")]
    MaxInterfaces(u64),
    #[error("invalid metrics_detail {0:?}: use default or full")]
    MetricsDetail(String),
}

/// How the tc programs are attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links where the kernel has them (6.6+) and the node has at most
    /// 128 matching taps at start, else netlink clsact filters (each TCX
    /// attach and detach waits a kernel grace period: slow for thousands).
    Auto,
    /// TCX links only (no qdisc involved; links die with the agent).
    Tcx,
    /// A clsact qdisc (created only if absent, never deleted) and a cls_bpf
    /// filter beside any existing ones.
    Netlink,
}

impl std::str::FromStr for AttachMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "netlink" => Ok(Self::Netlink),
            other => Err(ConfigError::AttachMode(other.to_owned())),
        }
    }
}

/// The config file, exactly as written. Unknown keys are errors: a typo
/// must not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub interfaces: Option<Vec<String>>,
    pub poll_interval: Option<String>,
    pub stall_after: Option<String>,
    pub series_grace: Option<String>,
    pub attach_mode: Option<String>,
    pub btf: Option<PathBuf>,
    pub libvirt_run_dir: Option<PathBuf>,
    pub proc_root: Option<PathBuf>,
    pub project_label: Option<bool>,
    /// exporter-toolkit web config (TLS, basic auth, headers).
    pub web_config_file: Option<PathBuf>,
    pub max_interfaces: Option<u64>,
    /// `default` or `full` (see [`MetricsDetail`]).
    pub metrics_detail: Option<String>,
    /// Follow DHCP through the taps' bridges and their ports.
    pub bridge_hops: Option<bool>,
    /// Uplink globs to follow DHCP through (e.g. ["bond*", "eth*"]).
    pub uplinks: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.message().to_owned(),
        })
    }
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    pub listen: Option<String>,
    pub interfaces: Option<String>,
    pub poll_interval: Option<String>,
    pub stall_after: Option<String>,
    pub series_grace: Option<String>,
    pub attach_mode: Option<String>,
    pub btf: Option<PathBuf>,
    pub libvirt_run_dir: Option<PathBuf>,
    pub proc_root: Option<PathBuf>,
    /// `--project-label` or `--project-label=false` (overrides the file).
    pub project_label: Option<bool>,
    pub web_config_file: Option<PathBuf>,
    pub max_interfaces: Option<u64>,
    pub metrics_detail: Option<String>,
    pub bridge_hops: Option<bool>,
    /// Comma-separated globs; empty names no uplink.
    pub uplinks: Option<String>,
}

/// How many series each tap gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsDetail {
    /// Per-tap series that alerts and the overview need, always (also at
    /// 0, states one-hot); breakdowns (class, DHCP type, verdict, client
    /// state, malformed, throttled) only once non-zero. An idle tap has 17
    /// series.
    #[default]
    Default,
    /// Every breakdown series from the start, at 0 (62 series per tap).
    Full,
}

impl MetricsDetail {
    fn parse(text: &str) -> Result<Self, ConfigError> {
        match text {
            "default" => Ok(Self::Default),
            "full" => Ok(Self::Full),
            other => Err(ConfigError::MetricsDetail(other.to_owned())),
        }
    }
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub interfaces: InterfaceMatcher,
    pub poll_interval: Duration,
    pub stall_after: Duration,
    /// How long a removed tap's final counters stay exported.
    pub series_grace: Duration,
    pub attach_mode: AttachMode,
    pub btf: PathBuf,
    /// Where libvirt keeps running domains' status XML (identity source).
    pub libvirt_run_dir: PathBuf,
    /// /proc, for the process holding each tap and its QEMU command line.
    pub proc_root: PathBuf,
    /// Add the VM's project to hvnet_vm_info (more series: off by default).
    pub project_label: bool,
    /// exporter-toolkit web config file; None: plain HTTP, no auth.
    pub web_config_file: Option<PathBuf>,
    /// Most taps attached at once; the kernel maps are sized for them and
    /// taps beyond are refused (log + hvnet_agent_interfaces_waiting).
    pub max_interfaces: u32,
    pub metrics_detail: MetricsDetail,
    /// Follow DHCP through the taps' bridges and their ports (default on).
    pub bridge_hops: bool,
    /// Uplinks to follow DHCP through (none by default: an uplink carries
    /// all of the node's traffic, so the operator opts in).
    pub uplinks: Option<InterfaceMatcher>,
}

impl Config {
    pub fn resolve(file: FileConfig, flags: FlagOverrides) -> Result<Self, ConfigError> {
        let listen_text = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text
            .parse()
            .map_err(|_| ConfigError::Listen(listen_text.clone()))?;

        let interfaces = match (flags.interfaces, file.interfaces) {
            (Some(flag), _) => InterfaceMatcher::parse_list(&flag)?,
            (None, Some(list)) => InterfaceMatcher::new(&list)?,
            (None, None) => InterfaceMatcher::parse_list(DEFAULT_INTERFACES)?,
        };

        let poll_interval = resolve_duration(
            "poll_interval",
            flags.poll_interval.or(file.poll_interval),
            DEFAULT_POLL_INTERVAL,
        )?;
        let stall_after = resolve_duration(
            "stall_after",
            flags.stall_after.or(file.stall_after),
            DEFAULT_STALL_AFTER,
        )?;
        let series_grace = match flags.series_grace.or(file.series_grace) {
            Some(text) => {
                parse_duration_or_zero(&text).map_err(|reason| ConfigError::Duration {
                    key: "series_grace",
                    reason,
                })?
            }
            None => DEFAULT_SERIES_GRACE,
        };
        let attach_mode = flags
            .attach_mode
            .or(file.attach_mode)
            .map(|m| m.parse())
            .transpose()?
            .unwrap_or(AttachMode::Auto);
        let btf = flags
            .btf
            .or(file.btf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BTF));

        let libvirt_run_dir = flags
            .libvirt_run_dir
            .or(file.libvirt_run_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBVIRT_RUN_DIR));
        let proc_root = flags
            .proc_root
            .or(file.proc_root)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PROC_ROOT));

        let project_label = flags.project_label.or(file.project_label).unwrap_or(false);
        let bridge_hops = flags.bridge_hops.or(file.bridge_hops).unwrap_or(true);
        let uplink_globs: Vec<String> = match (flags.uplinks, file.uplinks) {
            (Some(flag), _) => flag.split(',').map(str::to_owned).collect(),
            (None, Some(list)) => list,
            (None, None) => Vec::new(),
        };
        let uplinks = if uplink_globs.iter().all(|g| g.trim().is_empty()) {
            None
        } else {
            Some(InterfaceMatcher::new(&uplink_globs)?)
        };
        let web_config_file = flags.web_config_file.or(file.web_config_file);
        let max_interfaces = match flags.max_interfaces.or(file.max_interfaces) {
            None => DEFAULT_MAX_INTERFACES,
            Some(n) if (1..=u64::from(MAX_MAX_INTERFACES)).contains(&n) => n as u32,
            Some(n) => return Err(ConfigError::MaxInterfaces(n)),
        };
        let metrics_detail = match flags.metrics_detail.or(file.metrics_detail) {
            Some(text) => MetricsDetail::parse(&text)?,
            None => MetricsDetail::Default,
        };

        Ok(Self {
            listen,
            interfaces,
            poll_interval,
            stall_after,
            series_grace,
            attach_mode,
            btf,
            libvirt_run_dir,
            proc_root,
            project_label,
            web_config_file,
            max_interfaces,
            metrics_detail,
            bridge_hops,
            uplinks,
        })
    }
}

fn resolve_duration(
    key: &'static str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        Some(text) => {
            let value =
                parse_duration(&text).map_err(|reason| ConfigError::Duration { key, reason })?;
            // Sub-millisecond timers are no use to anyone, and a value that
            // rounds to zero would panic the timer after the programs are
            // attached: refuse it here.
            if value < MIN_DURATION {
                return Err(ConfigError::TooShort {
                    key,
                    value: text,
                    minimum: MIN_DURATION,
                });
            }
            Ok(value)
        }
        None => Ok(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("hvnet.toml"), text)
    }

    #[test]
    fn defaults_match_the_agent_contract() {
        let cfg = Config::resolve(FileConfig::default(), FlagOverrides::default()).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9478");
        assert_eq!(cfg.interfaces.globs(), ["tap*", "vnet*"]);
        assert_eq!(cfg.poll_interval, Duration::from_secs(1));
        assert_eq!(cfg.stall_after, Duration::from_secs(3));
        assert_eq!(cfg.series_grace, Duration::from_secs(15));
        assert_eq!(cfg.attach_mode, AttachMode::Auto);
        assert!(!cfg.project_label);
        assert_eq!(cfg.max_interfaces, 4096);
    }

    #[test]
    fn bridges_are_followed_by_default_and_uplinks_only_when_named() {
        let cfg = Config::resolve(FileConfig::default(), FlagOverrides::default()).unwrap();
        assert!(cfg.bridge_hops && cfg.uplinks.is_none());
        let cfg = file("bridge_hops = false\nuplinks = [\"bond*\", \"eth*\"]").unwrap();
        let cfg = Config::resolve(cfg, FlagOverrides::default()).unwrap();
        assert!(!cfg.bridge_hops);
        assert!(cfg.uplinks.as_ref().is_some_and(|u| u.matches("eth0")));
        // The flag wins, and an empty one names no uplink.
        let cfg = file("uplinks = [\"eth*\"]").unwrap();
        let none = FlagOverrides {
            uplinks: Some(String::new()),
            ..Default::default()
        };
        assert!(Config::resolve(cfg, none).unwrap().uplinks.is_none());
        let bad = FlagOverrides {
            uplinks: Some("eth0/1".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), bad).unwrap_err();
        assert!(err.to_string().contains("eth0/1"), "{err}");
    }

    #[test]
    fn max_interfaces_is_bounded() {
        let ok = file("max_interfaces = 2000").unwrap();
        assert_eq!(
            Config::resolve(ok, FlagOverrides::default())
                .unwrap()
                .max_interfaces,
            2000
        );
        for bad in ["max_interfaces = 0", "max_interfaces = 100000"] {
            let err = Config::resolve(file(bad).unwrap(), FlagOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("max_interfaces"), "{err}");
        }
    }

    #[test]
    fn metrics_detail_is_default_unless_the_file_or_the_flag_says_full() {
        let cfg = Config::resolve(FileConfig::default(), FlagOverrides::default()).unwrap();
        assert_eq!(cfg.metrics_detail, MetricsDetail::Default);
        let full = file("metrics_detail = \"full\"").unwrap();
        assert_eq!(
            Config::resolve(full, FlagOverrides::default())
                .unwrap()
                .metrics_detail,
            MetricsDetail::Full
        );
        let back = FlagOverrides {
            metrics_detail: Some("default".into()),
            ..Default::default()
        };
        let full = file("metrics_detail = \"full\"").unwrap();
        assert_eq!(
            Config::resolve(full, back).unwrap().metrics_detail,
            MetricsDetail::Default
        );
        let typo = file("metrics_detail = \"fulll\"").unwrap();
        let err = Config::resolve(typo, FlagOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("use default or full"), "{err}");
    }

    #[test]
    fn the_project_label_comes_from_the_file_or_the_flag() {
        let on = file("project_label = true").unwrap();
        assert!(
            Config::resolve(on, FlagOverrides::default())
                .unwrap()
                .project_label
        );
        let flag = FlagOverrides {
            project_label: Some(true),
            ..Default::default()
        };
        assert!(
            Config::resolve(FileConfig::default(), flag)
                .unwrap()
                .project_label
        );
        assert!(file("project_label = \"yes\"").is_err());
        // The flag can also turn off what the file turned on.
        let off = FlagOverrides {
            project_label: Some(false),
            ..Default::default()
        };
        let on = file("project_label = true").unwrap();
        assert!(!Config::resolve(on, off).unwrap().project_label);
    }

    #[test]
    fn durations_too_short_for_a_timer_are_refused_once() {
        let tiny = FlagOverrides {
            poll_interval: Some("0.0000000001s".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), tiny).unwrap_err();
        assert!(err.to_string().contains("poll_interval"), "{err}");
        assert!(err.to_string().contains("too short"), "{err}");
        let zero = FlagOverrides {
            stall_after: Some("0s".into()),
            ..Default::default()
        };
        let err = anyhow::Error::from(Config::resolve(FileConfig::default(), zero).unwrap_err());
        let chain = format!("{err:#}");
        assert_eq!(
            chain.matches("must be greater than zero").count(),
            1,
            "{chain}"
        );
    }

    #[test]
    fn file_overrides_defaults_and_flags_override_file() {
        let f = file(
            r#"
listen = "127.0.0.1:9999"
interfaces = ["vm-*"]
poll_interval = "250ms"
stall_after = "5s"
series_grace = "0s"
attach_mode = "netlink"
"#,
        )
        .unwrap();
        let flags = FlagOverrides {
            listen: Some("127.0.0.1:9100".into()),
            stall_after: Some("2s".into()),
            ..Default::default()
        };
        let cfg = Config::resolve(f, flags).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(cfg.interfaces.globs(), ["vm-*"]);
        assert_eq!(cfg.poll_interval, Duration::from_millis(250));
        assert_eq!(cfg.stall_after, Duration::from_secs(2));
        assert_eq!(cfg.attach_mode, AttachMode::Netlink);
        assert_eq!(cfg.series_grace, Duration::ZERO, "0s turns the grace off");
    }

    #[test]
    fn a_typo_in_a_key_is_an_error_naming_the_key() {
        let err = file("pol_interval = \"1s\"").unwrap_err().to_string();
        assert!(err.contains("pol_interval"), "{err}");
        assert!(err.contains("hvnet.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_value() {
        let bad_listen = FlagOverrides {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), bad_listen).unwrap_err();
        assert!(err.to_string().contains("localhost"));

        let bad_poll = FlagOverrides {
            poll_interval: Some("fast".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), bad_poll).unwrap_err();
        assert!(err.to_string().contains("poll_interval"), "{err}");

        let bad_glob = FlagOverrides {
            interfaces: Some("tap[".into()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), bad_glob).is_err());

        let bad_grace = file("series_grace = \"15\"").unwrap();
        let err = Config::resolve(bad_grace, FlagOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("series_grace"), "{err}");

        let bad_mode = file("attach_mode = \"xdp\"").unwrap();
        let err = Config::resolve(bad_mode, FlagOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("xdp"));
    }

    #[test]
    fn wrong_value_type_in_file_is_an_error() {
        assert!(file("interfaces = \"tap*\"").is_err());
    }
}

#[cfg(test)]
mod shipped_config {
    use super::*;

    /// The example config shipped for operators parses and resolves.
    #[test]
    fn the_example_config_file_is_valid() {
        let text = include_str!("../deploy/hvnet.toml");
        let file = FileConfig::parse(Path::new("deploy/hvnet.toml"), text).unwrap();
        let cfg = Config::resolve(file, FlagOverrides::default()).unwrap();
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.stall_after, DEFAULT_STALL_AFTER);
        assert_eq!(cfg.series_grace, DEFAULT_SERIES_GRACE);
    }
}
