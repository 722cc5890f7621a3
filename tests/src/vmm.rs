//! The fake VMM's control protocol (one text line per request on a Unix
//! socket) and the client the lab uses.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tracer_common::class;

/// What the VMM does with each direction; the faults the lab injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmMode {
    /// Relay both ways.
    Running,
    /// Stop reading the host tap (the incident: the VM's RX queue is not
    /// drained) while still relaying what the VM sends.
    RxStall,
    /// Relay nothing either way (QMP `stop`).
    Paused,
}

impl VmmMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::RxStall => "rx_stall",
            Self::Paused => "paused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(Self::Running),
            "rx_stall" => Some(Self::RxStall),
            "paused" => Some(Self::Paused),
            _ => None,
        }
    }
}

/// Frames and bytes per class, indexed by `tracer_common::class`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    pub packets: [u64; class::COUNT],
    pub bytes: [u64; class::COUNT],
}

impl DirectionStats {
    pub fn total_packets(&self) -> u64 {
        self.packets.iter().sum()
    }
}

/// What the VMM relayed: `to_vm` = frames it read from the host tap,
/// `from_vm` = frames it wrote into the host tap successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStats {
    pub mode: VmmMode,
    pub to_vm: DirectionStats,
    pub from_vm: DirectionStats,
    pub write_errors: u64,
}

/// Sends one request line and returns the reply line.
pub fn request(control: &Path, line: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(control)
        .with_context(|| format!("connecting to fake VMM at {}", control.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{line}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let reply = reply.trim_end().to_owned();
    if let Some(err) = reply.strip_prefix("error: ") {
        bail!("fake VMM refused {line:?}: {err}");
    }
    Ok(reply)
}

pub fn stats(control: &Path) -> anyhow::Result<VmmStats> {
    let reply = request(control, "stats")?;
    serde_json::from_str(&reply).with_context(|| format!("bad stats reply {reply:?}"))
}

pub fn set_mode(control: &Path, mode: VmmMode) -> anyhow::Result<()> {
    request(control, &format!("mode {}", mode.as_str())).map(|_| ())
}
