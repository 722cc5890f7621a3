//! hvnet: a hypervisor-side eBPF tracer for KVM/libvirt compute nodes.
//!
//! Data flows one way: config -> loader/links (kernel) -> collect -> export.

pub mod agent;
pub mod api;
pub mod bench;
pub mod btf;
pub mod cli;
pub mod client;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod departed;
pub mod dhcp;
pub mod drops;
pub mod duration;
pub mod ebpf_log;
pub mod events;
pub mod export;
pub mod fd_limit;
pub mod frames;
pub mod identity;
pub mod ifmatch;
pub mod link_dump;
pub mod links;
pub mod loader;
pub mod map_batch;
pub mod optional_probes;
pub mod privileges;
pub mod program_error;
pub mod qemu_cmdline;
pub mod serve;
pub mod stall;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod timeline;
pub mod vm;
