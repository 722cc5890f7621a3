//! Per-VM analysis, free of I/O: RX-stall detection from counters, DHCP
//! exchanges and verdicts from events, each VM's record and timeline.

pub mod dhcp;
pub mod stall;
pub mod timeline;
pub mod vm;
