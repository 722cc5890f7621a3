//! Small helpers every privileged test file uses.

use std::process::Child;

/// Background processes of a test (clients, traffic generators), killed
/// when the test ends, however it ends.
pub struct Background(pub Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lab tests create network namespaces and taps and load eBPF.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests create netns and taps: run `cargo xtask test` as root"
    );
}
