//! Who is behind each attached tap: re-read from libvirt, QEMU's command
//! line or the tap's name when taps change, and now and then.

use super::{lock, AgentState};
use crate::identity::Identity;

/// How often identities are re-read without a tap change (a VM renamed,
/// libvirt restarted).
const IDENTITY_REFRESH_SECS: f64 = 30.0;
/// ...and while some tap is known only by name, within a minute of a tap
/// change: a VM that is starting has its tap before its QEMU process and
/// its libvirt status file. A tap still nameless after that has no source
/// to wait for (re-reading 2000 of them every 3 s was a seventh of the idle
/// CPU on a dense node): it is looked at with the rest.
const WEAK_IDENTITY_REFRESH_SECS: f64 = 3.0;
const WEAK_IDENTITY_WINDOW_SECS: f64 = 60.0;

impl AgentState {
    /// Re-reads identities after a tap change, or when they are due.
    pub(super) fn refresh_identities_if_due(&self, taps_changed: bool) {
        let now = self.now();
        let recent_change = {
            let mut changed_at = lock(&self.taps_changed_at);
            if taps_changed {
                *changed_at = now;
            }
            now - *changed_at < WEAK_IDENTITY_WINDOW_SECS
        };
        let any_weak = recent_change && lock(&self.identities).values().any(Identity::is_weak);
        let every = if any_weak {
            WEAK_IDENTITY_REFRESH_SECS
        } else {
            IDENTITY_REFRESH_SECS
        };
        if taps_changed || now - *lock(&self.identity_refreshed) >= every {
            self.refresh_identities();
        }
    }

    /// Re-reads who is behind each attached tap.
    fn refresh_identities(&self) {
        let names: Vec<String> = lock(&self.attached)
            .values()
            .map(|l| l.name.clone())
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (found, skipped) = self.resolver.resolve(&refs);
        let mut known = lock(&self.identities);
        for (tap, identity) in &found {
            if known.get(tap) != Some(identity) {
                log::info!(
                    "{tap} is VM {:?} ({})",
                    identity.vm_name,
                    identity.describe()
                );
            }
        }
        for s in skipped {
            if !known.contains_key(&s.device) {
                log::debug!("{} of VM {}: skipped: {}", s.device, s.domain, s.reason);
            }
        }
        *known = found;
        *lock(&self.identity_refreshed) = self.now();
    }

    pub fn identity(&self, iface: &str) -> Identity {
        lock(&self.identities)
            .get(iface)
            .cloned()
            .unwrap_or_else(|| Identity {
                vm_name: iface.to_owned(),
                source: "tap".into(),
                ..Default::default()
            })
    }
}
