//! Naming kernel drops for people: reason numbers come from this kernel's
//! BTF (`enum skb_drop_reason`), the direction from where in the tap's
//! life the reason can happen.

use std::collections::HashMap;

/// Reasons raised on the transmit path of a tap, i.e. for frames on their
/// way to the VM: the tap's ring (tun_net_xmit), its qdisc, its filters.
const TO_VM_REASONS: &[&str] = &[
    "full_ring",
    "qdisc_drop",
    "qdisc_overlimit",
    "qdisc_congested",
    "qdisc_egress",
    "tc_egress",
    "tap_txfilter",
    "dev_ready",
    "tun_drop",
    "tx_timeout",
];

/// Direction label for a drop reason: `to_vm` for transmit-path reasons,
/// `unknown` for the generic not_specified, `from_vm` otherwise (frames the
/// VM sent, dropped while the tap was still their device: bridge ingress,
/// tun_get_user).
pub fn drop_direction(reason: &str) -> &'static str {
    if TO_VM_REASONS.contains(&reason) || reason.starts_with("qdisc_") {
        "to_vm"
    } else if reason == "not_specified" {
        "unknown"
    } else {
        "from_vm"
    }
}

/// The label for a reason number: its BTF name, or `reason_<n>` when this
/// kernel's BTF does not name it.
pub fn reason_name(reasons: &HashMap<u32, String>, reason: u32) -> String {
    reasons
        .get(&reason)
        .cloned()
        .unwrap_or_else(|| format!("reason_{reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_and_qdisc_drops_are_toward_the_vm() {
        assert_eq!(drop_direction("full_ring"), "to_vm");
        assert_eq!(drop_direction("qdisc_drop"), "to_vm");
        assert_eq!(drop_direction("qdisc_something_new"), "to_vm");
        assert_eq!(drop_direction("not_specified"), "unknown");
        assert_eq!(drop_direction("vlan_filter"), "from_vm");
    }

    #[test]
    fn unnamed_reasons_keep_their_number() {
        let reasons = HashMap::from([(77, "full_ring".to_owned())]);
        assert_eq!(reason_name(&reasons, 77), "full_ring");
        assert_eq!(reason_name(&reasons, 999), "reason_999");
    }
}
