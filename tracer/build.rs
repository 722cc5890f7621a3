//! Builds the eBPF object (tracer-ebpf) with aya-build and lets the agent
//! embed it with `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata_root()?;
    let ebpf_dir = metadata.join("tracer-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "tracer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (needs nightly rust-src and bpf-linker: run `cargo xtask setup`)")
}

fn cargo_metadata_root() -> anyhow::Result<std::path::PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?;
    std::path::PathBuf::from(manifest_dir)
        .parent()
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| anyhow!("tracer/ has no parent directory"))
}
