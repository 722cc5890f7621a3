//! Forwards what hvnet's eBPF programs log through aya-log to the agent's
//! log. The programs keep aya-log off the packet path, so today the object
//! carries no log map and there is nothing to forward; where a program does
//! log, its records are read here as they arrive, never left to fill the
//! log ring unread.

use tokio::io::{unix::AsyncFd, Interest};

pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Reads the log ring whenever it has records, until the agent exits.
pub async fn forward(logger: EbpfLogger) {
    // The AsyncFd owns the logger and with it the ring's fd for as long as
    // it is registered: the I/O-safety concern behind the deprecation (an
    // fd closed under the reactor) cannot arise (as in `events`).
    #[allow(deprecated)]
    let registered = AsyncFd::with_interest(logger, Interest::READABLE);
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(err) => {
            log::warn!("eBPF program logs will not be shown: watching their ring failed: {err}");
            return;
        }
    };
    loop {
        match ring.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => {
                log::warn!("eBPF program logs stop: {err}");
                return;
            }
        }
    }
}
