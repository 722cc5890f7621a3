//! The kernel side: the eBPF object (loaded, attached, detached), its maps
//! and event ring read, the running kernel's BTF, drop reasons and limits.

pub mod btf;
pub mod collect;
pub mod counter_array;
pub mod drops;
pub mod ebpf_log;
pub mod events;
pub mod fd_limit;
pub mod loader;
pub mod optional_probes;
pub mod privileges;
pub mod program_error;
pub mod slot_table;
