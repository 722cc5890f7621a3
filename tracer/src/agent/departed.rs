//! Series of taps that are gone, kept for a grace period.
//!
//! When a VM stops, its tap vanishes between two scrapes: removing its
//! series at once would lose what it counted since the last scrape. For
//! `grace` after removal the final counter values (and hvnet_vm_info) stay
//! visible, frozen; gauges (state, backlog, lease) do not, so no alert
//! keeps firing for a VM that no longer exists. A new tap with the same
//! name ends the grace at once: the name's series belong to the new VM
//! from its first scrape, starting from zero (a counter reset, never the
//! old VM's counts carried over).

use std::collections::VecDeque;
use std::time::Duration;

use crate::export::VmView;

/// More than this many departed taps within one grace period (mass
/// evacuation, churn storms): the oldest go first; memory stays bounded.
const MAX_DEPARTED: usize = 4096;

pub struct DepartedSeries {
    grace: Duration,
    entries: VecDeque<(VmView, f64)>,
}

impl DepartedSeries {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            entries: VecDeque::new(),
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Keeps `view` (marked departed) until `now + grace`.
    pub fn keep(&mut self, mut view: VmView, now: f64) {
        if self.grace.is_zero() {
            return;
        }
        self.forget_name(&view.iface);
        view.departed = true;
        if self.entries.len() >= MAX_DEPARTED {
            self.entries.pop_front();
        }
        self.entries
            .push_back((view, now + self.grace.as_secs_f64()));
    }

    /// A new interface took the name: its series start now.
    pub fn forget_name(&mut self, iface: &str) {
        self.entries.retain(|(view, _)| view.iface != iface);
    }

    pub fn prune(&mut self, now: f64) {
        self.entries.retain(|(_, until)| *until > now);
    }

    /// Views still within their grace, except names in use again. `attached`
    /// also covers the moment a removed tap is kept here but not yet
    /// detached: a scrape then must not show it twice.
    pub fn visible(&self, now: f64, attached: &[&str]) -> Vec<VmView> {
        self.entries
            .iter()
            .filter(|(view, until)| *until > now && !attached.contains(&view.iface.as_str()))
            .map(|(view, _)| view.clone())
            .collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(iface: &str) -> VmView {
        VmView {
            iface: iface.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn kept_for_the_grace_period_then_gone() {
        let mut d = DepartedSeries::new(Duration::from_secs(15));
        d.keep(view("vnet0"), 100.0);
        let seen = d.visible(114.9, &[]);
        assert_eq!(seen.len(), 1);
        assert!(seen[0].departed);
        assert!(d.visible(115.0, &[]).is_empty());
        d.prune(115.0);
        assert!(d.is_empty());
    }

    #[test]
    fn zero_grace_keeps_nothing() {
        let mut d = DepartedSeries::new(Duration::ZERO);
        d.keep(view("vnet0"), 100.0);
        assert!(d.is_empty());
    }

    #[test]
    fn a_reused_name_ends_the_grace_at_once() {
        let mut d = DepartedSeries::new(Duration::from_secs(15));
        d.keep(view("vnet0"), 100.0);
        d.keep(view("vnet1"), 100.0);
        assert_eq!(d.visible(101.0, &["vnet0"]).len(), 1);
        d.forget_name("vnet0");
        assert_eq!(d.len(), 1);
        // The same name departing twice keeps only the latest.
        d.keep(view("vnet1"), 105.0);
        assert_eq!(d.len(), 1);
        assert_eq!(d.visible(118.0, &[]).len(), 1);
    }

    #[test]
    fn bounded_under_churn() {
        let mut d = DepartedSeries::new(Duration::from_secs(3600));
        for i in 0..(MAX_DEPARTED + 100) {
            d.keep(view(&format!("tap{i}")), 0.0);
        }
        assert_eq!(d.len(), MAX_DEPARTED);
        assert!(d.visible(1.0, &[]).iter().all(|v| v.iface != "tap0"));
    }
}
