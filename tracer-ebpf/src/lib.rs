#![no_std]
// This file exists so that tracer/ can name tracer-ebpf as a build dependency
// (cargo then rebuilds the agent when the eBPF crate changes).
