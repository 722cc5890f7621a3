//! Checks, before touching the kernel, that the agent may load and attach
//! eBPF programs, so that a missing capability is one clear error line.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read /proc/self/status to check capabilities: {0}")]
    Status(std::io::Error),
    #[error(
        "hvnet lacks {missing}: run it as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (AmbientCapabilities= in the systemd unit)"
    )]
    Missing { missing: String },
}

/// Effective capability mask from a /proc/<pid>/status text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The capabilities hvnet needs that `cap_eff` lacks (empty: all present).
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel allows.
pub fn missing_capabilities(cap_eff: u64) -> Vec<&'static str> {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        missing.push("CAP_PERFMON");
    }
    missing
}

pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Status)?;
    let cap_eff = effective_capabilities(&status).unwrap_or(0);
    let missing = missing_capabilities(cap_eff);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        let status = "Name:\thvnet\nCapEff:\t000001ffffffffff\n";
        let caps = effective_capabilities(status).unwrap();
        assert!(missing_capabilities(caps).is_empty());
    }

    #[test]
    fn an_unprivileged_user_misses_all_three() {
        let caps = effective_capabilities("CapEff:\t0000000000000000\n").unwrap();
        assert_eq!(
            missing_capabilities(caps),
            ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]
        );
    }

    #[test]
    fn bpf_without_net_admin_is_not_enough() {
        let caps = (1u64 << CAP_BPF) | (1u64 << CAP_PERFMON);
        assert_eq!(missing_capabilities(caps), ["CAP_NET_ADMIN"]);
    }
}
