//! hvnet: a hypervisor-side eBPF tracer for KVM/libvirt compute nodes.
//!
//! The layers, bottom up (a module imports only from layers below it):
//! - `kernel`: load and attach the eBPF programs, read their maps and
//!   events, the kernel's BTF and limits;
//! - `interfaces`: the node's interfaces over rtnetlink (which taps exist);
//! - `identity`: who is behind a tap (libvirt, QEMU, Neutron names);
//! - `analysis`: per-VM stall detection, DHCP tracking, timelines;
//! - `agent`: the running agent's state, tying the above together;
//! - `export`, `api`, `serve`: what /metrics and /api/v1 show, and the
//!   secured web server;
//! - `daemon` (`hvnet run`), `client`, `cli`, `bench`: the commands.
//!
//! Data flows one way: config -> kernel/interfaces -> agent -> export.

pub mod agent;
pub mod analysis;
pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod export;
pub mod frames;
pub mod identity;
pub mod interfaces;
pub mod kernel;
pub mod serve;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
