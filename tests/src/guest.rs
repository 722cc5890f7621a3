//! A real QEMU guest for the lab: boot files, initramfs, the VM process.

pub mod cpio;
pub mod image;
pub mod qemu;
