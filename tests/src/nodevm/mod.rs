//! A compute node in a VM: a Debian kernel (unpacked by `cargo xtask
//! setup`) booted under QEMU TCG with hvnet, the lab's node pieces and the
//! core lab tests in its initramfs, reporting over the serial console.
//! `cargo xtask test --kernels` runs the kernel matrix with it.

pub mod boot;
pub mod initramfs;
pub mod matrix;
